"""The registry of unlearning methods: one record per method, its hyperparameters and where the rule comes from.

``METHODS[name]`` is a :class:`Method`: the rule in one line, its source (the paper it reads, cited directly, or
"ours"), its hyperparameters (:class:`HParam`: default, meaning, allowed values, validation) and where the guidance
add-on enters; its ``direction`` is the rule itself, from :mod:`gsu_jax.update_rules` or
:mod:`gsu_jax.remap_surgery`. :func:`resolve_hparams` validates a caller's hyperparameters against the record.
:mod:`gsu_jax.methods` builds the step and re-exports every name here.

Sources: Bae, Kim, Jung & Lim, "Gradient Surgery for One-shot Unlearning on Generative Model" (2023,
arXiv:2307.04550), the method this project reimplements, states the update only in its abstract ("projecting
gradients onto the normal plane of the gradients to be retained"); the variants below are the readings of it that
later work uses. PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning" (2020, arXiv:2001.06782). UNO and
UNO-S: Mandal & Gottwald (2025, arXiv:2506.04712).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

from gsu_jax import remap_surgery, update_rules
from gsu_jax.update_rules import DirectionRule


class _Required:
    """Marks a hyperparameter without a default (the caller must pass it)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method: its default (or :data:`REQUIRED`), what it means and what is allowed.

    Attributes:
      default: the value used when the caller passes none; :data:`REQUIRED` when there is none.
      doc: one line on what it does.
      allowed: the allowed values, in words (quoted by refusals).
      is_valid: predicate on a candidate value.
      convert: turns a valid value into its canonical Python type (e.g. ``np.int64(4)`` -> ``4``, ``3`` -> ``3.0``).
    """

    default: Any
    doc: str
    allowed: str
    is_valid: Callable[[Any], bool]
    convert: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry record (``METHODS[name]``).

    Attributes:
      name: registry key.
      rule: the update rule in one line (``u`` is descended by the optimizer).
      source: where the rule comes from.
      hparams: hyperparameter name -> :class:`HParam` (defaults in :attr:`defaults`).
      guidance: where the guidance add-on enters for this rule (every method accepts it).
      direction: the rule itself, ``(StepInputs, hparams) -> Direction``.
      learning_rate: the learning rate its defaults were measured with, which ``unlearn.py`` gives it unless
        ``config.method_optimizers`` says otherwise; None: the run's ``config.optimizer`` (the protocol's 1e-3).
    """

    name: str
    rule: str
    source: str
    hparams: Mapping[str, HParam]
    guidance: str
    direction: DirectionRule = dataclasses.field(repr=False)
    learning_rate: float | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter name -> default (:data:`REQUIRED` where the caller must pass a value)."""
        return {name: hparam.default for name, hparam in self.hparams.items()}


# ----------------------------------------------------------------------------------------- hyperparameters


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_nonnegative_finite(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value) and value >= 0


def _is_not_nan(value: Any) -> bool:
    return _is_real(value) and not math.isnan(value)


def is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_optional_regex(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _only_on_conflict(default: bool, what: str) -> HParam:
    return HParam(
        default, f"project {what} only where it conflicts (negative inner product)", "True or False", _is_bool, bool
    )


# UNO's reference code sums its losses over the batch and weighs cos^2 by 1e3; cos^2 is scale-free, so on our mean
# losses the same direction needs 1e3 / B (B the retain batch size): None selects that faithful default.
_ORTHOGONALITY_WEIGHT = HParam(
    None,
    "lambda, the weight of cos^2(g_f, g_r); None: 1e3 / B_r, the reference's 1e3 on summed losses rescaled to means",
    "None or a finite number >= 0",
    lambda value: value is None or is_nonnegative_finite(value),
    lambda value: None if value is None else float(value),
)
# The papers the sources cite (written into report.json with each method's record).
_BAE = 'Bae et al., "Gradient Surgery for One-shot Unlearning on Generative Model", 2023, arXiv:2307.04550'
_PCGRAD = 'Yu et al., "Gradient Surgery for Multi-Task Learning", 2020, arXiv:2001.06782'
_UNO = "Mandal & Gottwald, 2025, arXiv:2506.04712"

_GUIDANCE_AFTER_PROJECTION = "w * grad guidance_loss added to u after the projection (never projected)"
_GUIDANCE_ADDED = "w * grad guidance_loss added to u"

# The method ``unlearn.py`` runs first and ``report.json`` names: forgets and keeps the rest by default (README).
RECOMMENDED_METHOD = "remap_surgery"

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "sa",
            "u = P_{g_r}(-g_f) = -g_f + (<g_f, g_r> / ||g_r||^2) g_r",
            f"{_BAE}: the abstract's wording",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.sa_rule(only_on_conflict=False),
        ),
        Method(
            "sa_conflict",
            "u = P_{g_r}(-g_f) if <-g_f, g_r> < 0 else -g_f",
            f"PCGrad-style reading of {_BAE} (PCGrad: {_PCGRAD})",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.sa_rule(only_on_conflict=True),
        ),
        Method(
            "sa_per_example",
            "u = mean_i P_{g_r}(-grad l(x_i)) (each on conflict by default), via one jvp and one vjp",
            f"per-sample reading of {_BAE}; the B inner products are one jvp and the mean one vjp of the "
            "per-example losses, so no per-example gradient is stored",
            # Projection onto a fixed normal plane is linear, so projecting always gives exactly ``sa``; only the
            # per-example conflict test makes this rule different, hence the default.
            {"only_on_conflict": _only_on_conflict(True, "each example's ascent gradient")},
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.sa_per_example_rule,
        ),
        Method(
            "sa_span",
            "u = -g_f minus its least-squares component in span{G_1..G_K}, G_k = mean grad of retain group k",
            f"subspace reading of {_BAE}",
            {
                "num_directions": HParam(
                    8,
                    "K, the number of equal contiguous groups of the retain batch (K = B_r: per-example)",
                    "an integer >= 1 dividing the retain batch size",
                    is_positive_int,
                    int,
                ),
                "only_on_conflict": _only_on_conflict(False, "-g_f off the span"),
            },
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.sa_span_rule,
        ),
        Method(
            "pcgrad",
            "u = P^c_{g_r}(-g_f) + P^c_{-g_f}(g_r) (each projected off the other only on conflict)",
            f"two-task PCGrad ({_PCGRAD}), the method Bae et al. cite",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.pcgrad_rule,
        ),
        Method(
            "s",
            "u = P_{g_f}(g_r) = g_r - (<g_f, g_r> / ||g_f||^2) g_f",
            f"UNO's reading of gradient surgery ({_UNO})",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.s_rule,
        ),
        Method("ascent", "u = -g_f", "gradient ascent baseline (A)", {}, _GUIDANCE_ADDED, update_rules.ascent_rule),
        Method(
            "ascent_descent",
            "u = -g_f on even steps, g_r on odd steps (first step ascends)",
            f"ascent-descent baseline (A-D), as in the UNO reference code ({_UNO})",
            {},
            _GUIDANCE_ADDED,
            update_rules.alternate(update_rules.ascent_rule, update_rules.retain_finetune_rule),
        ),
        Method(
            "retain_finetune",
            "u = g_r",
            "fine-tuning on the retain set baseline",
            {},
            _GUIDANCE_ADDED,
            update_rules.retain_finetune_rule,
        ),
        Method(
            "uno",
            "u = grad [L_r + lambda cos^2(g_f, g_r)] (gradient through the gradients)",
            f"UNO ({_UNO}), lambda = 1e3",
            {"orthogonality_weight": _ORTHOGONALITY_WEIGHT},
            "w * grad guidance_loss added to u (outside cos^2, unlike the reference code)",
            update_rules.uno_rule,
        ),
        Method(
            "uno_s",
            "u = uno's update on even steps, s's on odd steps (first step is UNO)",
            f"UNO-S ({_UNO})",
            {"orthogonality_weight": _ORTHOGONALITY_WEIGHT},
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.alternate(update_rules.uno_rule, update_rules.s_rule),
        ),
        Method(
            "remap_surgery",
            "u = P^c_{g_r}(g_s) + g_r, g_s = grad mean_i l(x_i -> nearest retained image) (a bounded forget loss)",
            "ours (gsu-jax): forget by descending a surrogate whose minimum exists, projected off g_r; a surrogate "
            "target for the forgotten data as in Selective Amnesia (Heng & Soh, 2023, arXiv:2305.10120)",
            {
                "forget_only": HParam(
                    "decoder",
                    "the surrogate moves only the parameters whose path matches this regex; None: all",
                    "None or a valid regular expression",
                    _is_optional_regex,
                    lambda value: value,
                ),
                "projection": HParam(
                    "conflict",
                    "g_s projected off g_r: 'conflict' (only when <g_s, g_r> < 0), 'always' or 'none'",
                    "'conflict', 'always' or 'none'",
                    lambda value: value in ("conflict", "always", "none"),
                    str,
                ),
                "gate": HParam(
                    False,
                    "drop example i from the surrogate once l(x_i -> n_i) <= l(x_i) (forgotten)",
                    "True or False",
                    _is_bool,
                    bool,
                ),
                "forget_half_life": HParam(
                    20.0,
                    "steps over which forget_weight halves (annealing); None: constant",
                    "None or a finite number > 0",
                    lambda v: v is None or (is_nonnegative_finite(v) and v > 0),
                    lambda v: None if v is None else float(v),
                ),
                "saliency": HParam(
                    1.0,
                    "keep only this fraction of the surrogate gradient's coordinates, the largest (SalUn-style: Fan et al., 2024, arXiv:2310.12508)",
                    "a number in (0, 1]",
                    lambda v: is_nonnegative_finite(v) and 0 < v <= 1,
                    float,
                ),
                "forget_weight": HParam(
                    1.0,
                    "weight of the projected surrogate gradient",
                    "a finite number >= 0",
                    is_nonnegative_finite,
                    float,
                ),
                "retain_weight": HParam(
                    1.0, "weight of g_r added to the update", "a finite number >= 0", is_nonnegative_finite, float
                ),
                "image_field": HParam(
                    "image",
                    "the example field that is paired and replaced by 'target'",
                    "a string naming a field of the examples",
                    lambda v: isinstance(v, str),
                    str,
                ),
            },
            _GUIDANCE_AFTER_PROJECTION,
            remap_surgery.remap_surgery_rule,
            learning_rate=3e-3,
        ),
        Method(
            "sa_gated",
            "u = mean_i w_i P^c_{g_r}(-grad l(x_i)) + (1 - mean_i w_i) g_r, w_i = 1[l(x_i) < forget_loss_target]",
            "ours (gsu-jax): ascent that stops per example once its loss reaches the retrained oracle's level",
            {
                "forget_loss_target": HParam(
                    REQUIRED,
                    "the retrain-from-scratch oracle's mean forget loss: examples at or above it stop ascending",
                    "a number (+inf: never gate, -inf: gate everything)",
                    _is_not_nan,
                    float,
                ),
                "temperature": HParam(
                    0.0,
                    "0: hard gate 1[l < target]; > 0: smooth gate sigmoid((target - l) / temperature)",
                    "a finite number >= 0",
                    is_nonnegative_finite,
                    float,
                ),
                "only_on_conflict": _only_on_conflict(True, "each example's ascent gradient"),
                "combine": HParam(
                    "fill",
                    "'fill': gated-out share goes to retain descent; 'sa': gated ascent alone (zero once all are "
                    "gated); 'pcgrad': two-task PCGrad of the gated ascent and g_r",
                    "'fill', 'sa' or 'pcgrad'",
                    lambda value: value in ("fill", "sa", "pcgrad"),
                    str,
                ),
                "ascend_only": HParam(
                    None,
                    "ascend only the parameters whose path matches this regex (e.g. 'decoder'); None: all",
                    "None or a valid regular expression",
                    _is_optional_regex,
                    lambda value: value,
                ),
            },
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.sa_gated_rule,
        ),
    )
}


def resolve_hparams(name: str, **hparams: Any) -> dict[str, Any]:
    """Validates ``hparams`` for method ``name`` and fills in the defaults.

    Args:
      name: a key of :data:`METHODS`.
      **hparams: hyperparameters of that method (see ``METHODS[name].hparams``).

    Returns:
      Every hyperparameter of the method, by name (ints and floats as Python ``int``/``float``).

    Raises:
      ValueError: unknown method, unknown or invalid hyperparameter, or a required one missing; the message names
        the bad value and lists what is allowed.
    """
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    unknown = sorted(set(hparams) - set(method.hparams))
    if unknown:
        allowed = ", ".join(f"{key}={hparam.default!r}" for key, hparam in method.hparams.items()) or "none"
        raise ValueError(f"method {name!r} has no hyperparameter {', '.join(unknown)}; allowed: {allowed}")
    resolved = {}
    for key, hparam in method.hparams.items():
        value = hparams.get(key, hparam.default)
        if value is REQUIRED:
            raise ValueError(f"method {name!r} needs {key} ({hparam.doc}); allowed: {hparam.allowed}")
        if not hparam.is_valid(value):
            raise ValueError(f"method {name!r}: {key}={value!r} is invalid; allowed: {hparam.allowed}")
        resolved[key] = hparam.convert(value)
    return resolved
