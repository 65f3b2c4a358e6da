"""The registry of unlearning methods: one record per method, its hyperparameters and where the rule comes from.

``METHODS[name]`` is a :class:`Method`: the rule in one line, its source (the paper it reads, cited directly, or
"ours"), its hyperparameters (each a :class:`gsu_jax.schema.Field`, the type of every config field) and where the guidance
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
from collections.abc import Mapping
from typing import Any

import optax

from gsu_jax import published_rules, remap_surgery, update_rules
from gsu_jax.schema import REQUIRED, Field, at_least, check_value, greater_than, one_of, within
from gsu_jax.update_rules import DirectionRule, RuleState


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry record (``METHODS[name]``).

    Attributes:
      name: registry key.
      rule: the update rule in one line (``u`` is descended by the optimizer).
      source: where the rule comes from.
      hparams: hyperparameter name -> :class:`gsu_jax.schema.Field` (defaults in :attr:`defaults`).
      guidance: where the guidance add-on enters for this rule (every method accepts it).
      direction: the rule itself, ``(StepInputs, hparams) -> Direction``.
      optimizer: the optimizer its defaults were measured with (``{"name": optax name, "learning_rate": ...}``),
        which ``unlearn.py`` gives it unless ``config.method_optimizers`` says otherwise; None: the run's
        ``config.optimizer`` (the protocol's Adam 1e-3).
      gradients: which of ``g_f`` ("forget") and ``g_r`` ("retain") the rule reads; the step computes only these
        (the other batch's losses still come from a forward pass) and leaves ``cos_forget_retain`` out of the
        metrics when one is missing.
      state: what the rule fixes at its first step (:class:`gsu_jax.update_rules.RuleState`), or None.
      class_conditional: the rule's loss reads class labels through the model (a class-conditional DDPM);
        ``unlearn.py`` refuses it for other models before any work.
    """

    name: str
    rule: str
    source: str
    hparams: Mapping[str, Field]
    guidance: str
    direction: DirectionRule = dataclasses.field(repr=False)
    optimizer: Mapping[str, Any] | None = None
    gradients: frozenset[str] = frozenset({"forget", "retain"})
    state: RuleState | None = None
    class_conditional: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter name -> default (:data:`REQUIRED` where the caller must pass a value)."""
        return {name: hparam.default for name, hparam in self.hparams.items()}


# ----------------------------------------------------------------------------------------- hyperparameters


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_nonnegative_finite(value: Any) -> bool:
    """Predicate for :func:`gsu_jax.methods.make_method`'s own numeric arguments (guidance weight)."""
    return _is_real(value) and math.isfinite(value) and value >= 0


def is_positive_int(value: Any) -> bool:
    """Predicate for :func:`gsu_jax.methods.make_method`'s own integer arguments (chunk size, memory budget)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_regex(value: str) -> bool:
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _hparam(default: Any, kind: type, allowed: str, check: Any, doc: str, **options: Any) -> Field:
    """A method hyperparameter: a schema Field in scope ``run`` (method settings never change trained models)."""
    return Field(default, kind, allowed, check, "run", doc, **options)


def _only_on_conflict(default: bool, what: str) -> Field:
    return _hparam(
        default, bool, "True or False", None, f"project {what} only where it conflicts (negative inner product)"
    )


# UNO's reference code sums its losses over the batch and weighs cos^2 by 1e3; cos^2 is scale-free, so on our mean
# losses the same direction needs 1e3 / B (B the retain batch size): None selects that faithful default.
_ORTHOGONALITY_WEIGHT = _hparam(
    None,
    float,
    "None or a finite number >= 0",
    at_least(0),
    "lambda, the weight of cos^2(g_f, g_r); None: 1e3 / B_r, the reference's 1e3 on summed losses rescaled to means",
    nullable=True,
)
# The papers the sources cite (written into report.json with each method's record).
_BAE = 'Bae et al., "Gradient Surgery for One-shot Unlearning on Generative Model", 2023, arXiv:2307.04550'
_PCGRAD = 'Yu et al., "Gradient Surgery for Multi-Task Learning", 2020, arXiv:2001.06782'
_UNO = "Mandal & Gottwald, 2025, arXiv:2506.04712"
_SALUN = 'Fan et al., "SalUn", ICLR 2024, arXiv:2310.12508 (OPTML-Group/Unlearn-Saliency, DDPM/runners/diffusion.py)'
_AMNESIA = (
    'Heng & Soh, "Selective Amnesia", NeurIPS 2023, arXiv:2305.10120 (clear-nus/selective-amnesia, '
    "ddpm/runners/diffusion.py)"
)
# remap_surgery's SGD step, and its retain_lookahead (the lookahead goes where the step's forget part leads).
_REMAP_LEARNING_RATE = 3e-3

_GUIDANCE_AFTER_PROJECTION = "w * grad guidance_loss added to u after the projection (never projected)"
_GUIDANCE_ADDED = "w * grad guidance_loss added to u"

# The protocol's optimizer (docs/protocol.md §2): what a method whose record names none of its own is run with.
PROTOCOL_OPTIMIZER: Mapping[str, Any] = {"name": "adam", "learning_rate": 1e-3}


def build_optimizer(spec: Mapping[str, Any]) -> optax.GradientTransformation:
    """``optax.<name>(learning_rate, **kwargs)`` from an optimizer spec (a :attr:`Method.optimizer`, or a validated
    ``config.optimizer``)."""
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "learning_rate")}
    return getattr(optax, spec["name"])(spec["learning_rate"], **kwargs)


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
                "num_directions": _hparam(
                    8,
                    int,
                    "an integer >= 1 dividing the retain batch size",
                    at_least(1),
                    "K, the number of equal contiguous groups of the retain batch (K = B_r: per-example)",
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
        Method(
            "ascent",
            "u = -g_f",
            "gradient ascent baseline (A)",
            {},
            _GUIDANCE_ADDED,
            update_rules.ascent_rule,
            gradients=frozenset({"forget"}),
        ),
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
            gradients=frozenset({"retain"}),
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
            "u = a_t P^c_{g_r}(D g_s) + D g_r, a_t = 0.7 * 2^(-t/20), g_s = grad mean_i l(x_i -> its retained partner, an optimal-transport pairing "
            "of the two batches) (a bounded forget loss), "
            "D = (F_r + damping)^-1/2 the retain data's diagonal Fisher",
            "ours (gsu-jax): forget by descending a surrogate whose minimum exists, projected off g_r; a surrogate "
            "target for the forgotten data as in Selective Amnesia (Heng & Soh, 2023, arXiv:2305.10120)",
            {
                "forget_only": _hparam(
                    "decoder",
                    str,
                    "None or a valid regular expression",
                    _is_regex,
                    "the surrogate moves only the parameters whose path matches this regex; None: all",
                    nullable=True,
                ),
                "pairing": _hparam(
                    "balanced",
                    str,
                    "'nearest' or 'balanced'",
                    one_of(("nearest", "balanced")),
                    "each forget example's surrogate target: its nearest retained image in the retain batch, or its "
                    "partner in an entropic optimal-transport pairing of the two batches (each retain image carries "
                    "equal mass in the plan; the row-wise argmax is near-balanced)",
                ),
                "unmatched_weight": _hparam(
                    0.0,
                    float,
                    "a finite number >= 0",
                    at_least(0),
                    "weight of what the parameters forget_only does not match follow (unmatched_objective): 0, they "
                    "stay out of the forget update; with 'surrogate', 1 is forget_only=None; needs forget_only",
                ),
                "retain_lookahead": _hparam(
                    _REMAP_LEARNING_RATE,
                    float,
                    "a finite number >= 0",
                    at_least(0),
                    "the retain part uses g_r at theta - retain_lookahead * a_t * P(D g_s), where the step's forget part "
                    "leads; 0: at theta. The default is the default SGD learning rate (change both together): the retain "
                    "part then repairs, to first order, what the forget part costs the retained data through curvature",
                ),
                "unmatched_objective": _hparam(
                    "surrogate",
                    str,
                    "'surrogate' or 'ascent'",
                    one_of(("surrogate", "ascent")),
                    "what the unmatched parameters follow when unmatched_weight > 0: the surrogate, or ascent on the "
                    "forget examples' own loss",
                ),
                "projection": _hparam(
                    "conflict",
                    str,
                    "'conflict', 'always' or 'none'",
                    one_of(("conflict", "always", "none")),
                    "g_s projected off g_r: 'conflict' (only when <g_s, g_r> < 0), 'always' or 'none'",
                ),
                "gate": _hparam(
                    False,
                    bool,
                    "True or False",
                    None,
                    "drop example i from the surrogate once l(x_i -> n_i) <= l(x_i) (forgotten)",
                ),
                "forget_half_life": _hparam(
                    20.0,
                    float,
                    "None or a finite number > 0",
                    greater_than(0),
                    "steps over which forget_weight halves (annealing); None: constant",
                    nullable=True,
                ),
                "saliency": _hparam(
                    1.0,
                    float,
                    "a number in (0, 1]",
                    within(0, 1, low_open=True),
                    "keep only this fraction of the surrogate gradient's coordinates, the largest (SalUn-style: "
                    "Fan et al., 2024, arXiv:2310.12508)",
                ),
                "precondition": _hparam(
                    "retain_rms",
                    str,
                    "'none', 'retain_fisher' or 'retain_rms'",
                    one_of(("none", "retain_fisher", "retain_rms")),
                    "g_s and g_r divided per coordinate by sqrt(F_r) ('retain_rms') or F_r ('retain_fisher'), F_r the "
                    "retain batch's damped diagonal Fisher, before the projection; 'none': raw gradients. Meant for "
                    "SGD (Adam would redo the per-coordinate scaling)",
                ),
                "fisher_damping": _hparam(
                    0.1,
                    float,
                    "a finite number > 0",
                    greater_than(0),
                    "damping added to the diagonal Fisher, as a multiple of its mean",
                ),
                "forget_weight": _hparam(
                    0.7, float, "a finite number >= 0", at_least(0), "weight of the projected surrogate gradient"
                ),
                "retain_weight": _hparam(
                    1.0, float, "a finite number >= 0", at_least(0), "weight of g_r added to the update"
                ),
                "image_field": _hparam(
                    "image",
                    str,
                    "a string naming a field of the examples",
                    None,
                    "the example field that is paired and replaced by 'target'",
                ),
            },
            _GUIDANCE_AFTER_PROJECTION,
            remap_surgery.remap_surgery_rule,
            optimizer={"name": "sgd", "learning_rate": _REMAP_LEARNING_RATE},
            gradients=frozenset({"retain"}),  # the surrogate replaces g_f: only cos_forget_retain read it
        ),
        Method(
            "sa_gated",
            "u = mean_i w_i P^c_{g_r}(-grad l(x_i)) + (1 - mean_i w_i) g_r, w_i = 1[l(x_i) < forget_loss_target]",
            "ours (gsu-jax): ascent that stops per example once its loss reaches the retrained oracle's level",
            {
                "forget_loss_target": _hparam(
                    REQUIRED,
                    float,
                    "a number (+inf: never gate, -inf: gate everything)",
                    None,
                    "the retrain-from-scratch oracle's mean forget loss: examples at or above it stop ascending",
                    finite=False,
                ),
                "temperature": _hparam(
                    0.0,
                    float,
                    "a finite number >= 0",
                    at_least(0),
                    "0: hard gate 1[l < target]; > 0: smooth gate sigmoid((target - l) / temperature)",
                ),
                "only_on_conflict": _only_on_conflict(True, "each example's ascent gradient"),
                "combine": _hparam(
                    "fill",
                    str,
                    "'fill', 'sa' or 'pcgrad'",
                    one_of(("fill", "sa", "pcgrad")),
                    "'fill': gated-out share goes to retain descent; 'sa': gated ascent alone (zero once all are "
                    "gated); 'pcgrad': two-task PCGrad of the gated ascent and g_r",
                ),
                "ascend_only": _hparam(
                    None,
                    str,
                    "None or a valid regular expression",
                    _is_regex,
                    "ascend only the parameters whose path matches this regex (e.g. 'decoder'); None: all",
                    nullable=True,
                ),
            },
            _GUIDANCE_AFTER_PROJECTION,
            update_rules.sa_gated_rule,
        ),
    )
}


def _image_field(what: str) -> Field:
    return _hparam("image", str, "a string naming a field of the examples", None, what)


def _grad_clip() -> Field:
    return _hparam(
        1.0,
        float,
        "None or a finite number > 0",
        greater_than(0),
        "the update's global norm is clipped to this (the reference's clip_grad_norm_ 1.0); None: no clipping",
        nullable=True,
    )


def _salun(name: str, project: bool) -> Method:
    surgery = ", forget gradient projected off g_r on conflict" if project else ""
    return Method(
        name,
        "u = m * clip(grad mean_i ||eps(x_t, c_i) - sg[eps(x_t, c'_i)]||^2 + alpha g_r, 1), m = top 50% of "
        f"|grad L_f(theta*)|{surgery}",
        f"{_SALUN}{'; with gradient surgery (ours)' if project else ''}",
        {
            "mask_fraction": _hparam(
                0.5,
                float,
                "a number in (0, 1]",
                within(0, 1, low_open=True),
                "the share of parameters the saliency mask keeps (largest |grad L_f| at theta*; 1: no mask)",
            ),
            "retain_weight": _hparam(
                None,
                float,
                "None or a finite number >= 0",
                at_least(0),
                "alpha, the weight of g_r; None: 1e-3 * H*W*C, the reference's alpha on a pixel-summed retain loss "
                "rescaled to our pixel-mean one",
                nullable=True,
            ),
            "grad_clip": _grad_clip(),
            "image_field": _image_field("the example field whose pixels retain_weight=None counts"),
        },
        "w * grad guidance_loss added to u (after the mask)",
        published_rules.salun_rule(project=project),
        optimizer={"name": "adam", "learning_rate": 1e-4},
        gradients=frozenset({"retain"}),  # the random-label loss replaces g_f
        state=published_rules.SALUN_STATE,
        class_conditional=True,
    )


def _selective_amnesia(name: str, project: bool) -> Method:
    surgery = ", surrogate gradient projected off g_r on conflict" if project else ""
    return Method(
        name,
        "u = clip(grad mean_i l(x_i -> uniform noise) + gamma g_r + 2 lambda F (theta - theta*), 1), F the diagonal "
        f"Fisher at theta*{surgery}",
        f"{_AMNESIA}{'; with gradient surgery (ours)' if project else ''}",
        {
            "ewc_weight": _hparam(
                10.0,
                float,
                "a finite number >= 0",
                at_least(0),
                "lambda of the EWC penalty lambda * sum F (theta - theta*)^2 (the reference's CIFAR-10 DDPM value; "
                "our F is on another scale, see gsu_jax.published_rules)",
            ),
            "replay_weight": _hparam(
                1.0, float, "a finite number >= 0", at_least(0), "gamma, the weight of the replayed retain gradient"
            ),
            "grad_clip": _grad_clip(),
            "image_field": _image_field("the example field the noise surrogate replaces (as 'target')"),
        },
        "w * grad guidance_loss added to u (after the clipping)",
        published_rules.selective_amnesia_rule(project=project),
        optimizer={"name": "adam", "learning_rate": 1e-4},
        gradients=frozenset({"retain"}),  # the noise surrogate replaces g_f
        state=published_rules.AMNESIA_STATE,
    )


METHODS.update(
    (method.name, method)
    for method in (
        _salun("salun", False),
        _salun("salun_surgery", True),
        _selective_amnesia("selective_amnesia", False),
        _selective_amnesia("selective_amnesia_surgery", True),
    )
)


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
    for key, field in method.hparams.items():
        value = hparams.get(key, field.default)
        if value is REQUIRED:
            raise ValueError(f"method {name!r} needs {key} ({field.help}); allowed: {field.allowed}")
        resolved[key] = check_value(key, value, field, prefix=f"method {name!r}: ")
    return resolved
