"""The unlearning config: its schema and defaults (:data:`UNLEARN_SCHEMA`, :func:`default_unlearn_config`) and
the parsing of each field into the values a run uses, every refusal an :class:`UnlearnConfigError` naming the value
and what is allowed.

Field by field only: checks that need the data or the disk (forget classes against the data, checkpoints, cached
models, saved results) are :func:`gsu_jax.unlearning.plan.plan_run`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import optax

from gsu_jax import example_sets, io, methods
from gsu_jax.config_validation import (
    PARALLEL_SCHEMA,
    default_train_config,
    parse_class_list,
    validate_parallel,
    validate_train_config,
)
from gsu_jax.method_registry import PROTOCOL_OPTIMIZER, build_optimizer
from gsu_jax.schema import ConfigError, Field, at_least, one_of, validate_config, within
from gsu_jax.unlearning.errors import UnlearnConfigError

__all__ = [
    "GATED_TARGETS",
    "OPTIMIZERS",
    "UNLEARN_SCHEMA",
    "build_optimizer",
    "check_gated_target",
    "default_unlearn_config",
    "jsonable_config",
    "parse_config_values",
    "parse_forget_classes",
    "parse_forget_set",
    "parse_method_hparams",
    "parse_method_optimizers",
    "parse_methods",
    "parse_optimizer",
    "parse_threshold",
    "parse_train_config",
]


# Optimizers the config may name: optax factories taking the learning rate first.
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop", "adabelief", "lion", "nadam", "radam")
_SAVE_PARAMS = ("first_seed", "all", "none")
# The named sources of sa_gated's forget-loss target (gated_target may also be a number).
GATED_TARGETS = ("oracle", "heldout")

UNLEARN_SCHEMA: dict[str, Field] = {
    "forget_classes": Field(
        "1", str, "a comma-separated list of class indices, e.g. '1' or '1,7'", None, "run", "Classes to unlearn."
    ),
    "forget": Field(
        "",
        str,
        "'' (forget_classes decides), 'classes:1,7', 'fraction:0.01' or 'indices:<file>'",
        None,
        "run",
        "The training examples to unlearn (gsu_jax.example_sets); a fraction is drawn with the train config's seed. "
        "forget_classes is the shorthand for 'classes:<list>'.",
        optional=True,
    ),
    "methods": Field(
        f"{methods.RECOMMENDED_METHOD},sa_gated,pcgrad,sa,s,ascent",
        str,
        f"'all' or a comma-separated list of {', '.join(methods.METHODS)}",
        None,
        "run",
        "Unlearning methods to run (gsu_jax.methods registry), in table order.",
    ),
    "seeds": Field(3, int, "an integer >= 1", at_least(1), "run", "Number of seeds per method."),
    "first_seed": Field(0, int, "an integer >= 0", at_least(0), "run", "Seeds are first_seed .. first_seed+seeds-1."),
    "threshold": Field(
        "auto",
        str,
        "'auto' or a number in (0, 1)",
        None,
        "run",
        "Stop at the first step with forget fraction below this; auto = oracle + 2 binomial SE.",
    ),
    "monitor_samples": Field(
        1024, int, "an integer >= 1", at_least(1), "run", "Samples decoded from the fixed monitoring z at every step."
    ),
    "published_threshold": Field(
        0.02,
        float,
        "a number in (0, 1)",
        within(0.0, 1.0, low_open=True, high_open=True),
        "run",
        "The published stopping threshold, reported beside the main one.",
    ),
    "published_monitor_samples": Field(
        128,
        int,
        "an integer >= 1",
        at_least(1),
        "run",
        "Monitoring samples of the published setting (the first ones of the same z).",
    ),
    "max_steps": Field(50, int, "an integer >= 1", at_least(1), "run", "Step budget per run."),
    "checkpoint_every_steps": Field(
        0,
        int,
        "an integer >= 0 (0: off)",
        at_least(0),
        "run",
        "Save a (method, seed) run's state every this many steps and resume from it (gsu_jax.unlearning.inflight); "
        "for long runs: a small VAE run takes seconds.",
        optional=True,
    ),
    "continue_to_budget": Field(
        True,
        bool,
        "True or False",
        None,
        "run",
        "Keep stepping after the stop to the budget (the protocol's FID at the end).",
    ),
    "batch_size": Field(128, int, "an integer >= 1", at_least(1), "run", "Forget examples per step."),
    "retain_batch_size": Field(128, int, "an integer >= 1", at_least(1), "run", "Retain examples per step."),
    "chunk_size": Field(
        0,
        int,
        "an integer >= 0 (0: whole batches)",
        at_least(0),
        "run",
        "Examples differentiated at once in every pass of a method step over a batch "
        "(gsu_jax.methods.make_method's chunk_size): bounds activation memory at large batches; "
        "the update is the same to float32 rounding. 0 processes each batch at once.",
    ),
    "optimizer": Field(
        dict(PROTOCOL_OPTIMIZER),
        dict,
        f"{{'name': one of {', '.join(OPTIMIZERS)}, 'learning_rate': a number > 0, ...kwargs}}",
        None,
        "run",
        "The unlearning optimizer (Adam 1e-3 in the protocol).",
    ),
    "method_optimizers": Field(
        {},
        dict,
        "{method name: {'learning_rate': ..., 'name': ...}} (fields override config.optimizer)",
        None,
        "run",
        "Per-method optimizer overrides (recorded per method in the report).",
    ),
    "method_hparams": Field(
        {},
        dict,
        "{method name: {hyperparameter: value}}",
        None,
        "run",
        "Hyperparameters per method (see gsu_jax.methods.METHODS[name].hparams).",
    ),
    "gated_target": Field(
        "oracle",
        str,
        "'oracle', 'heldout' or a number",
        None,
        "run",
        "sa_gated's forget_loss_target: the oracle's mean forget loss, the original model's "
        "on held-out forget-class examples, or a given number.",
    ),
    "gated_target_scale": Field(
        1.0,
        float,
        "a number > 0",
        lambda v: v > 0,
        "run",
        "sa_gated's target = L_orig + scale * (L_ref - L_orig) on the forget training "
        "examples (L_ref from gated_target; 1 = the reference level itself).",
    ),
    "guidance_weight": Field(
        0.0,
        float,
        "a number >= 0",
        at_least(0.0),
        "run",
        "Weight of the classifier uniformity term (guidance classifier); > 0 labels +guided.",
    ),
    "guidance_samples": Field(
        128, int, "an integer >= 1", at_least(1), "run", "Latents decoded per step by the guidance term."
    ),
    "fid_samples": Field(5000, int, "an integer >= 2", at_least(2), "run", "Generated samples per FID."),
    "monitor_sample_steps": Field(
        10,
        int,
        "an integer >= 1",
        at_least(1),
        "run",
        "DDIM steps of the monitoring samples (DDPM; a VAE decodes in one pass).",
    ),
    "fid_sample_steps": Field(
        50,
        int,
        "an integer >= 1",
        at_least(1),
        "run",
        "DDIM steps of the FID samples, the sample grids and the class-conditional protocol "
        "(DDPM; a VAE decodes in one pass).",
    ),
    "elbo_samples": Field(
        4,
        int,
        "an integer >= 1",
        at_least(1),
        "run",
        "Loss draws averaged per example in held-out and MIA losses (VAE: reparameterisation "
        "samples; DDPM: timestep and noise), with fixed keys.",
    ),
    "grid_samples": Field(64, int, "an integer in [1, 400]", within(1, 400), "run", "Samples per PNG panel."),
    "save_params": Field(
        "first_seed",
        str,
        "one of " + ", ".join(_SAVE_PARAMS),
        one_of(_SAVE_PARAMS),
        "run",
        "Which seeds' unlearned parameters are saved with orbax.",
    ),
    "checkpoint": Field(
        "",
        str,
        "'' (train what is missing), a train.py workdir, or an orbax checkpoint of nnx.state(model) of the "
        "model config.train builds",
        None,
        "run",
        "train.py workdir holding the generative model (and evaluator/guidance roles); or a plain orbax "
        "checkpoint of a registry model's parameters not written by train.py, whose model, kwargs and training "
        "data config.train states (imported into <train_dir>/model; the classifiers and oracle train from "
        "config.train).",
    ),
    "oracle_checkpoint": Field(
        "",
        str,
        "'' (train it) or a train.py workdir of the oracle",
        None,
        "run",
        "train.py workdir of the model retrained without the forget classes.",
    ),
    "train_dir": Field(
        "",
        str,
        "'' (<workdir>/train) or a directory",
        None,
        "run",
        "Where missing models are trained (a cache that may be shared between workdirs).",
    ),
    "progress": Field(True, bool, "True or False", None, "run", "Print one progress line per phase and run."),
    "train": Field(
        {},
        dict,
        "a train.py config (configs/mnist_vae.py)",
        None,
        "run",
        "The train config of every model trained here (oracle: + exclude_classes).",
    ),
    # Devices and hosts of everything this run computes, the models it trains included (they replace
    # train.mesh / train.distributed, which never change a result).
    **PARALLEL_SCHEMA,
}


def default_unlearn_config() -> ml_collections.ConfigDict:
    """Every field of :data:`UNLEARN_SCHEMA` at its default; ``method_hparams`` lists every method's defaults.

    ``train`` starts as the default train config (configs/*.py replace it, e.g. by ``configs/mnist_vae.py``).
    Hyperparameters whose default is ``None`` become typed placeholders (so ``--config.method_hparams.<method>.
    <name>=...`` can set them); ``sa_gated``'s required ``forget_loss_target`` is left out: ``gated_target`` sets it.
    """
    config = ml_collections.ConfigDict()
    for name, field in UNLEARN_SCHEMA.items():
        if name == "method_hparams":
            config.method_hparams = ml_collections.ConfigDict(
                {
                    method: {
                        key: ml_collections.config_dict.placeholder(field.kind)
                        if field.default is None
                        else field.default
                        for key, field in record.hparams.items()
                        if field.default is not methods.REQUIRED
                    }
                    for method, record in methods.METHODS.items()
                }
            )
        elif name == "method_optimizers":
            # Unset (None) means "config.optimizer"; set e.g. --config.method_optimizers.sa_gated.learning_rate=3e-3.
            # A method whose record names the optimizer its defaults were measured with starts with that one.
            config.method_optimizers = ml_collections.ConfigDict(
                {
                    method: {
                        "name": ml_collections.config_dict.placeholder(str)
                        if record.optimizer is None
                        else record.optimizer["name"],
                        "learning_rate": ml_collections.config_dict.placeholder(float)
                        if record.optimizer is None
                        else float(record.optimizer["learning_rate"]),
                    }
                    for method, record in methods.METHODS.items()
                }
            )
        elif name == "train":
            config.train = default_train_config()
        elif field.kind is dict:
            setattr(config, name, ml_collections.ConfigDict(dict(field.default)))
        else:
            setattr(config, name, field.default)
    return config


# ------------------------------------------------------------------------------------------- parsing


def parse_config_values(config: Any) -> dict[str, Any]:
    """Every field of an unlearning config checked against :data:`UNLEARN_SCHEMA` (and the parallel fields), as a
    plain dict; the fields with their own syntax are parsed further by the functions below."""
    if isinstance(config, ml_collections.ConfigDict):
        raw = dict(config.items())
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise UnlearnConfigError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
    # forget_classes may be given as an int (e.g. in Python); the contract is the comma-separated string.
    if isinstance(raw.get("forget_classes"), (int, np.integer)) and not isinstance(raw.get("forget_classes"), bool):
        raw["forget_classes"] = str(int(raw["forget_classes"]))
    if isinstance(raw.get("threshold"), (int, float)) and not isinstance(raw.get("threshold"), bool):
        raw["threshold"] = repr(float(raw["threshold"]))
    raw = {**{name: field.default for name, field in PARALLEL_SCHEMA.items()}, **raw}
    try:
        values = validate_config(raw, UNLEARN_SCHEMA)
        values.update(validate_parallel(values))
    except ConfigError as err:
        raise UnlearnConfigError(str(err)) from err
    return values


def parse_methods(value: str) -> tuple[str, ...]:
    """``config.methods`` ('all' or a comma-separated list) as registry names, in table order."""
    names = tuple(token.strip() for token in value.split(",") if token.strip())
    if names == ("all",):
        return tuple(methods.METHODS)
    if not names:
        raise UnlearnConfigError(
            f"config.methods={value!r} is empty; allowed: 'all' or a comma-separated list of "
            f"{', '.join(methods.METHODS)}"
        )
    for name in names:
        if name not in methods.METHODS:
            raise UnlearnConfigError(
                f"config.methods: unknown method {name!r}; allowed: 'all' or any of {', '.join(methods.METHODS)}"
            )
    if len(set(names)) != len(names):
        raise UnlearnConfigError(f"config.methods={value!r} lists a method twice; list each once")
    return names


def parse_threshold(value: Any) -> float | None:
    """``config.threshold``: a number in (0, 1), or ``None`` for ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise UnlearnConfigError(
            f"config.threshold={value!r} is invalid; allowed: 'auto' or a number in (0, 1)"
        ) from None
    if not 0.0 < threshold < 1.0:
        raise UnlearnConfigError(f"config.threshold={value!r} is outside (0, 1); allowed: 'auto' or a number in (0, 1)")
    return threshold


def parse_optimizer(value: Mapping[str, Any], *, field: str = "optimizer") -> dict[str, Any]:
    """An optimizer spec ``{'name', 'learning_rate', **kwargs}``, refused unless optax can build it."""
    spec = dict(value)
    name = spec.pop("name", None)
    learning_rate = spec.pop("learning_rate", None)
    if name not in OPTIMIZERS:
        raise UnlearnConfigError(f"config.{field}.name={name!r} is invalid; allowed: {', '.join(OPTIMIZERS)}")
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not (math.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise UnlearnConfigError(f"config.{field}.learning_rate={learning_rate!r} is invalid; allowed: a number > 0")
    try:
        getattr(optax, name)(learning_rate, **spec)
    except TypeError as err:
        raise UnlearnConfigError(f"config.{field}={dict(value)!r} cannot build optax.{name}: {err}") from err
    return {"name": name, "learning_rate": float(learning_rate), **spec}


def _per_method_mappings(field: str, value: Mapping[str, Any], allowed: str) -> list[tuple[str, Mapping[str, Any]]]:
    """``config.<field>``'s (method, mapping) entries, refusing an unknown method or an entry that is no mapping."""
    for name, entry in value.items():
        if name not in methods.METHODS:
            raise UnlearnConfigError(f"config.{field}: unknown method {name!r}; allowed: {', '.join(methods.METHODS)}")
        if not isinstance(entry, Mapping):
            raise UnlearnConfigError(f"config.{field}.{name}={entry!r} is invalid; allowed: {allowed}")
    return list(value.items())


def parse_method_optimizers(overrides: Mapping[str, Any], optimizer: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``config.method_optimizers``: per method, its set fields over the parsed ``optimizer`` (methods that set
    nothing are left out: they use ``optimizer``)."""
    method_optimizers = {}
    for name, override in _per_method_mappings(
        "method_optimizers", overrides, "a mapping like {'learning_rate': 3e-3}"
    ):
        override = {key: value for key, value in override.items() if value is not None}
        if override:
            # Another optimizer takes only config.optimizer's learning rate, none of its keyword arguments (Adam's
            # b1 means nothing to SGD).
            same = override.get("name", optimizer["name"]) == optimizer["name"]
            base = optimizer if same else {"learning_rate": optimizer["learning_rate"]}
            method_optimizers[name] = parse_optimizer({**base, **override}, field=f"method_optimizers.{name}")
    return method_optimizers


def parse_method_hparams(value: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``config.method_hparams``, each of the methods ``names`` resolved against the registry with them."""
    result = {
        name: dict(hparams)
        for name, hparams in _per_method_mappings(
            "method_hparams", value, "a mapping of hyperparameter names to values"
        )
    }
    for name in names:
        trial = dict(result.get(name, {}))
        if name == "sa_gated":
            trial.setdefault("forget_loss_target", 0.0)  # filled from the oracle (or held-out data) at run time
        try:
            methods.resolve_hparams(name, **trial)
        except ValueError as err:
            raise UnlearnConfigError(f"config.method_hparams.{name}: {err}") from err
    return result


def parse_train_config(config: Any, *, field: str) -> dict[str, Any]:
    """A train config validated as ``train.py`` would, its refusals naming ``config.<field>.``."""
    try:
        return validate_train_config(config)
    except ConfigError as err:
        raise UnlearnConfigError(str(err).replace("config.", f"config.{field}.", 1)) from err


def parse_forget_classes(value: str) -> tuple[int, ...]:
    """``config.forget_classes`` (a comma-separated list) as class indices; the data is not consulted here."""
    if value.strip() == "":
        raise UnlearnConfigError(
            "config.forget_classes='' is empty; allowed: a comma-separated list of class indices, e.g. '1'"
        )
    try:
        return parse_class_list(value, field="forget_classes")
    except ConfigError as err:
        raise UnlearnConfigError(str(err)) from err


def parse_forget_set(values: Mapping[str, Any]) -> example_sets.ExampleSet:
    """``config.forget`` with its shorthand ``config.forget_classes`` (:func:`gsu_jax.example_sets.
    combined_example_set`; ``forget`` empty means ``classes:<forget_classes>``); the data is not consulted here."""
    if not values.get("forget", "").strip():
        return example_sets.ExampleSet("classes", classes=parse_forget_classes(values["forget_classes"]))
    try:
        return example_sets.combined_example_set(
            values,
            field="forget",
            classes_field="forget_classes",
            default_classes=UNLEARN_SCHEMA["forget_classes"].default,
        )
    except ConfigError as err:
        raise UnlearnConfigError(str(err)) from err


def check_gated_target(value: str) -> None:
    """Refuses a ``config.gated_target`` that is neither one of :data:`GATED_TARGETS` nor a number."""
    if value not in GATED_TARGETS:
        try:
            if math.isnan(float(value)):
                raise ValueError
        except ValueError:
            raise UnlearnConfigError(
                f"config.gated_target={value!r} is invalid; allowed: 'oracle', 'heldout' or a number"
            ) from None


def jsonable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config values as recorded in the report and with every unlearned model (sorted, JSON types)."""
    return io.json_normalize(dict(config), sort_keys=True)
