r"""The main job: unlearn forget classes from a trained VAE or DDPM with every requested method, evaluate, report.

``unlearn_and_evaluate(config, workdir) -> report`` (``unlearn.py`` is its command line). Two phases:

1. :func:`plan_run` validates *everything* before any work and writes nothing: every config field, the method
   names and hyperparameters, the forget classes against the data (absent class, empty forget set, forget set
   equal to all data), the threshold and budget, an explicit ``checkpoint`` (must hold a finished generative VAE),
   and any models already cached in ``train_dir`` (must have been trained with the same config and data).
   Refusals are :class:`UnlearnConfigError` (a ``ValueError``), one line naming the value and what is allowed.
2. :func:`execute` trains what is missing through the same code as ``train.py``
   (:func:`gsu_jax.training.train_and_evaluate`), runs every (method, seed), evaluates and writes the report.

**Models.** Four, from three training runs of the same train config (``config.train``, a ``train.py`` config):

* the *original* generative model, the *evaluator* and the *guidance classifier*: roles ``generative``,
  ``evaluator``, ``guidance`` of one ``train.py`` workdir (``config.checkpoint``, or trained into
  ``<train_dir>/model``). The training code gives the two classifiers different keys (the role folds into the
  seed) and disjoint halves of the training digits: they are distinct models from distinct runs;
* the *oracle*: the same config with ``exclude_classes`` = the forget classes (retrain from scratch without the
  forget set), role ``generative`` of ``config.oracle_checkpoint`` or ``<train_dir>/oracle``.

**Evaluation integrity.** The evaluator scores every run (forget fraction, FID, inception score) and is never
passed to a method: a method's step closes over the loss and, for ``guidance_weight > 0``, the *guidance*
classifier only. :func:`check_classifier_independence` refuses to run when the two classifiers are the same
object, have the same parameters, the same role, the same training examples or were not trained as separate
runs. Every guided result is labelled ``<method>+guided`` in every table and file name.

**Randomness.** Independent streams folded from one root key (:func:`stream_key`): the monitoring latents
(``monitor``), the FID latents (``fid``), the per-example ELBO keys of the evaluation (``elbo``) and, per seed, the
step keys (``run``); the data order of seed ``s`` comes from ``numpy.random.default_rng([s, 1])``. The monitoring
and FID latents therefore do not depend on the seed or the method (every run is read on the *same* fixed z, and
every model of the table, original and oracle included, is scored on the same samples), and no loss key equals
them.

**The run** (per method, per seed): fresh permutations of the forget and retain training examples for the seed,
consumed 128 + 128 per step (reshuffled at each pass); the method's step is compiled ONCE per method (ahead of
time, reused across seeds) and timed alone, synchronised with ``block_until_ready``, excluding the monitoring.
After every update the forget fraction is measured on ``monitor_samples`` images decoded from the fixed z and
labelled by the evaluator. The run *stops* at the first update count ``t`` with fraction < threshold (updates
applied, REFERENCE.md section 2) and, when ``continue_to_budget``, continues to ``max_steps`` so that the
protocol's end-of-budget FID is measured too. Seeds that never cross the threshold are evaluated "at stop" at the
budget and counted as not reached (the table says how many reached).

The loop is a Python loop over the compiled step with a compiled monitor, not one ``lax.scan``: the step has to
be timed alone anyway, the stopping step's parameters must be kept, and with the per-step host read of one
scalar the overhead is a dispatch (~0.1 ms) against steps of several ms on CPU.

**Devices.** ``config.mesh`` / ``config.distributed`` (:mod:`gsu_jax.parallel`) run each method's step on a
mesh: forget and retain batches split over the ``data`` devices, parameters and optimizer state replicated or split
over ``model``; the monitoring and the evaluation run on each process's copy of the parameters, and process 0
alone prints and writes the report, logs and PNGs (every process saves its shards of the unlearned parameters).

**Thresholds.** ``threshold="auto"``: the oracle's forget fraction on the same fixed z plus two binomial standard
errors (:func:`gsu_jax.metrics.auto_threshold`), on ``monitor_samples`` (1024) samples. The published setting
(``published_threshold`` 0.02 on ``published_monitor_samples`` 128 samples) is evaluated on the *first 128 of the
same monitoring samples* in the same runs (a second stopping rule read off the same trajectory; with
``continue_to_budget=False`` a run ends at the main rule's stop, so the published stop is only seen if it came
first).

**``sa_gated``** needs ``forget_loss_target``: by default (``gated_target="oracle"``) the oracle's mean negative
ELBO on the forget *training* examples, i.e. the level a model that never saw them reaches -- this uses the
oracle, a reference model the user must have trained. Without an oracle, ``gated_target="heldout"`` uses the
original model's mean negative ELBO on *held-out* examples of the forget classes (examples it never trained on: the
same "unseen" level, estimated from the model itself); ``gated_target`` may also be a number.
``gated_target_scale`` moves the target along the gap from the original model's own loss on the forget examples
``L_orig`` to that reference ``L_ref``: ``L_orig + scale * (L_ref - L_orig)`` (2 = as far beyond the reference as the
original is below it).

**Evaluation** of a model (original, oracle, each method at the stop and at the end of the budget): forget
fraction on the monitoring z; classifier-FID (evaluator features) of ``fid_samples`` samples against the retained
training images and against all training images; inception score; mean held-out negative ELBO on retained and on
forget classes, and on the forget training examples; membership-inference AUC of the loss attack, forget
training examples (members) against held-out examples of the same classes. Losses average ``elbo_samples``
reparameterisation draws per example with fixed keys, identical for every model.

**DDPMs** (:mod:`gsu_jax.generative`, ``config.train.model = "ddpm_unet"``): the same run, with the family's loss
(epsilon MSE at one random timestep, averaged over ``elbo_samples`` fixed keys; report keys ``eps_loss_*`` where a
VAE's are ``nelbo_*``), fixed initial noises ``x_T`` instead of ``z`` (streams ``monitor``/``fid`` as above) and a
few-step DDIM sampler: ``monitor_sample_steps`` steps for the per-step monitoring, ``fid_sample_steps`` for the FID,
the grids and the class-conditional protocol. A class-conditional DDPM is sampled with labels ``i mod K`` and the
train config's ``guidance_scale``; its evaluation adds samples generated FROM the forget label(s) (SalUn, Selective
Amnesia): ``forget_label_class_prob`` (the evaluator's probability of that label), ``forget_label_accuracy`` and
``forget_label_entropy``. The guidance add-on (``guidance_weight > 0``) is VAE-only and refused for a DDPM.

**Non-finite steps.** A step whose new parameters or optimizer state are not finite is skipped (parameters and
optimizer state kept, the step's batch and key consumed) and counted: ``nonfinite_skipped`` in the log rows,
``nonfinite_steps`` per seed and per method in the report. :data:`MAX_CONSECUTIVE_NONFINITE` skipped steps in a row
stop the job with :class:`UnlearningDivergedError` (``unlearn.py`` exits 1), and parameters are checked finite
before every save: a NaN model is never written.

**Reproducibility and resumption.** Everything random derives from the config (see *Randomness*), so the same
config gives the same report on the same device and software, except the fields listed in
:data:`gsu_jax.reporting.VOLATILE_REPORT_FIELDS` (wall-clock times, the command line, which results were resumed).
The report records the full config, the data fingerprints, the models' parameter digests, the package versions,
JAX's numeric flags, the device and the code (git commit and a digest of the ``gsu_jax`` sources). Every finished
(method, seed) run is saved atomically to ``results/<label>/seed_<s>.json``; a run killed at any point and re-run
with the same command and workdir reads those back (after checking they were computed by the same config, code,
packages, device and models, else it refuses to mix them), redoes the rest, and writes the same report.

Outputs in the workdir: ``report.json``, ``report.md``, ``logs/<label>.csv`` (one row per seed and step),
``samples/<label>.png`` (original / at stop / at end / oracle on the same z), ``forget_fraction.png``,
``results/<label>/seed_<s>.json`` (each finished run), and ``unlearned/<label>/seed_<s>/`` (orbax, via
:mod:`gsu_jax.checkpointing`) with the parameters at the stopping step. JSON, Markdown, CSV and PNG files are
written atomically (a killed run leaves the previous file or none, never half of one).

Example:
    >>> import ml_collections
    >>> from gsu_jax.unlearning import unlearn_and_evaluate
    >>> config = ...  # configs/unlearn_smoke.py get_config()  # doctest: +SKIP
    >>> report = unlearn_and_evaluate(config, "/tmp/unlearn_demo")  # doctest: +SKIP
    >>> sorted(report["methods"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import platform
import shutil
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gsu_jax import checkpointing, io, losses, methods, metrics, models, parallel, provenance, reporting, training
from gsu_jax import data as data_lib
from gsu_jax import generative as families
from gsu_jax.config_validation import (
    PARALLEL_SCHEMA,
    ROLES,
    ConfigError,
    Field,
    at_least,
    default_train_config,
    one_of,
    parse_class_list,
    validate_config,
    validate_parallel,
    validate_train_config,
    within,
)

__all__ = [
    "MAX_CONSECUTIVE_NONFINITE",
    "OPTIMIZERS",
    "UNLEARN_SCHEMA",
    "RunPlan",
    "SavedResultError",
    "UnlearnConfigError",
    "UnlearningDivergedError",
    "build_optimizer",
    "check_classifier_independence",
    "default_unlearn_config",
    "execute",
    "format_summary",
    "monitoring_latents",
    "monitoring_noise",
    "plan_run",
    "seed_step_keys",
    "stream_key",
    "unlearn_and_evaluate",
]


class UnlearnConfigError(ConfigError):
    """A request ``unlearn.py`` refuses before any work (exit status 2): one line, naming the value."""


class UnlearningDivergedError(RuntimeError):
    """A run's updates stayed non-finite (or a model to save is not finite); nothing of that run was saved."""


class SavedResultError(checkpointing.CheckpointCorruptError):
    """A (method, seed) result saved in the workdir is unreadable or damaged (``unlearn.py`` exits 1)."""


# A run whose last this-many steps (or all its steps, for a shorter budget) had non-finite updates has diverged.
MAX_CONSECUTIVE_NONFINITE = 5


# Optimizers the config may name: optax factories taking the learning rate first.
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop", "adabelief", "lion", "nadam", "radam")
_SAVE_PARAMS = ("first_seed", "all", "none")
_GATED_TARGETS = ("oracle", "heldout")
# Generated images per compiled FID call (bounds activation memory for the convolutional models). Not only a memory
# bound: a VAE's FID latents are drawn padded to a multiple of it (another size draws other z, other FIDs), and XLA
# picks kernels per batch shape (another size changes the features' last float32 bits). gsu_jax.training's
# held-out evaluation keeps its own 500 for the same reason.
_FID_CHUNK = 1000
# Real training images per compiled feature-extraction call (FID reference statistics); 1000 as always, for the
# same reason: features of another chunk shape differ in their last bits.
_REAL_FEATURES_CHUNK = 1000
# Built once at import: one compiled feature extractor per (graphdef, chunk shape), whatever the caller.
_classifier_features = jax.jit(models.classifier_features, static_argnums=0)


@jax.jit
def _tree_all_finite(tree: Any) -> jax.Array:
    """``bool[]``: every element of every leaf is finite (integer leaves always are)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


# Independent key streams (folded into the root key by name).
_ROOT_SEED = 0
_DATA_STREAM = 1

UNLEARN_SCHEMA: dict[str, Field] = {
    "forget_classes": Field(
        "1", str, "a comma-separated list of class indices, e.g. '1' or '1,7'", None, "run", "Classes to unlearn."
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
        {"name": "adam", "learning_rate": 1e-3},
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
        "'' (train what is missing) or a train.py workdir",
        None,
        "run",
        "train.py workdir holding the generative model (and evaluator/guidance roles).",
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
                        key: _hparam_default(hparam)
                        for key, hparam in record.hparams.items()
                        if hparam.default is not methods.REQUIRED
                    }
                    for method, record in methods.METHODS.items()
                }
            )
        elif name == "method_optimizers":
            # Unset (None) means "config.optimizer"; set e.g. --config.method_optimizers.sa_gated.learning_rate=3e-3.
            # A method whose record names the learning rate its defaults were measured with starts with that one.
            config.method_optimizers = ml_collections.ConfigDict(
                {
                    method: {
                        "learning_rate": ml_collections.config_dict.placeholder(float)
                        if record.learning_rate is None
                        else float(record.learning_rate)
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


def _hparam_default(hparam: methods.HParam) -> Any:
    """The default, or for ``None`` a placeholder typed by what the hyperparameter accepts (str, int or float)."""
    if hparam.default is not None:
        return hparam.default
    for kind, probe in ((int, 1), (float, 0.5), (str, "x")):
        if hparam.is_valid(probe):
            return ml_collections.config_dict.placeholder(kind)
    return None


# ------------------------------------------------------------------------------------------- keys


def stream_key(name: str, *indices: int) -> jax.Array:
    """The root key of the named independent stream (``monitor``, ``fid``, ``elbo``, ``run``), indices folded in.

    Streams are folded from one root key by the CRC32 of their name, so they are independent of each other and
    of the seeds (a seed is folded into the ``run`` stream only).
    """
    key = jax.random.fold_in(jax.random.key(_ROOT_SEED), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    for index in indices:
        key = jax.random.fold_in(key, index)
    return key


def monitoring_noise(num_samples: int, noise_shape: Sequence[int]) -> jax.Array:
    """The fixed monitoring noises ``f32[num_samples, *noise_shape]`` (VAE: ``z``; DDPM: ``x_T``): the same for
    every seed, method and model."""
    return jax.random.normal(stream_key("monitor"), (num_samples, *noise_shape))


def monitoring_latents(num_samples: int, latent_dim: int) -> jax.Array:
    """The fixed monitoring latents ``f32[num_samples, latent_dim]`` of a VAE (:func:`monitoring_noise`)."""
    return monitoring_noise(num_samples, (latent_dim,))


def seed_step_keys(seed: int, num_steps: int) -> jax.Array:
    """The step keys of one seed, ``key[num_steps]`` (everything a method's losses see comes from these)."""
    return jax.random.split(stream_key("run", seed), num_steps)


# ------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A validated request (from :func:`plan_run`); :func:`execute` carries it out.

    Attributes:
        config: the validated unlearning config values (plain dict; ``train`` is the validated train config of
            the original model's run).
        workdir: absolute output directory (not created yet).
        command: the command line recorded in the report.
        forget_classes: the classes to unlearn.
        method_names: registry names, in table order.
        method_hparams: per method, the user's hyperparameters (validated against the registry).
        seeds: the seeds.
        threshold: the fixed threshold, or ``None`` for ``auto``.
        model_dir: train workdir of the original model (existing checkpoint or to train).
        oracle_dir: train workdir of the oracle.
        train_model: roles to train into ``model_dir`` (empty when all exist in a given checkpoint).
        classifier_dir: train workdir holding the evaluator and guidance roles.
        train_classifiers: roles to train into ``classifier_dir``.
        train_oracle: whether the oracle must be trained into ``oracle_dir``.
        oracle_config: the oracle's train config values.
        classifier_config: the train config values of the evaluator/guidance run.
        run_data: the data split of the original model's training run.
        forget_idx, retain_idx: positions in ``run_data.train`` of the forget and retain training examples.
        mesh: the device mesh of the method steps (``config.mesh``), ``None`` for one device.
    """

    config: dict[str, Any]
    workdir: pathlib.Path
    command: str
    forget_classes: tuple[int, ...]
    method_names: tuple[str, ...]
    method_hparams: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    threshold: float | None
    model_dir: pathlib.Path
    train_model: tuple[str, ...]
    classifier_dir: pathlib.Path
    train_classifiers: tuple[str, ...]
    oracle_dir: pathlib.Path
    train_oracle: bool
    oracle_config: dict[str, Any]
    classifier_config: dict[str, Any]
    run_data: training.RunData
    forget_idx: np.ndarray
    retain_idx: np.ndarray
    mesh: jax.sharding.Mesh | None = None

    @property
    def guided(self) -> bool:
        return self.config["guidance_weight"] > 0

    def label(self, name: str) -> str:
        """The method's name in every table and file: ``+guided`` when the guidance term is on."""
        return f"{name}+guided" if self.guided else name


def _refuse(message: str) -> UnlearnConfigError:
    return UnlearnConfigError(message)


def _parse_methods(value: str) -> tuple[str, ...]:
    names = tuple(token.strip() for token in value.split(",") if token.strip())
    if names == ("all",):
        return tuple(methods.METHODS)
    if not names:
        raise _refuse(
            f"config.methods={value!r} is empty; allowed: 'all' or a comma-separated list of "
            f"{', '.join(methods.METHODS)}"
        )
    for name in names:
        if name not in methods.METHODS:
            raise _refuse(
                f"config.methods: unknown method {name!r}; allowed: 'all' or any of {', '.join(methods.METHODS)}"
            )
    if len(set(names)) != len(names):
        raise _refuse(f"config.methods={value!r} lists a method twice; list each once")
    return names


def _parse_threshold(value: Any) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise _refuse(f"config.threshold={value!r} is invalid; allowed: 'auto' or a number in (0, 1)") from None
    if not 0.0 < threshold < 1.0:
        raise _refuse(f"config.threshold={value!r} is outside (0, 1); allowed: 'auto' or a number in (0, 1)")
    return threshold


def _parse_optimizer(value: Mapping[str, Any], *, field: str = "optimizer") -> dict[str, Any]:
    spec = dict(value)
    name = spec.pop("name", None)
    learning_rate = spec.pop("learning_rate", None)
    if name not in OPTIMIZERS:
        raise _refuse(f"config.{field}.name={name!r} is invalid; allowed: {', '.join(OPTIMIZERS)}")
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not (math.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise _refuse(f"config.{field}.learning_rate={learning_rate!r} is invalid; allowed: a number > 0")
    try:
        getattr(optax, name)(learning_rate, **spec)
    except TypeError as err:
        raise _refuse(f"config.{field}={dict(value)!r} cannot build optax.{name}: {err}") from err
    return {"name": name, "learning_rate": float(learning_rate), **spec}


def build_optimizer(spec: Mapping[str, Any]) -> optax.GradientTransformation:
    """``optax.<name>(learning_rate, **kwargs)`` from a validated ``config.optimizer``."""
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "learning_rate")}
    return getattr(optax, spec["name"])(spec["learning_rate"], **kwargs)


def _parse_method_hparams(value: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    result = {}
    for name, hparams in value.items():
        if name not in methods.METHODS:
            raise _refuse(f"config.method_hparams: unknown method {name!r}; allowed: {', '.join(methods.METHODS)}")
        if not isinstance(hparams, Mapping):
            raise _refuse(
                f"config.method_hparams.{name}={hparams!r} is invalid; allowed: a mapping of "
                "hyperparameter names to values"
            )
        result[name] = dict(hparams)
    for name in names:
        trial = dict(result.get(name, {}))
        if name == "sa_gated":
            trial.setdefault("forget_loss_target", 0.0)  # filled from the oracle (or held-out data) at run time
        try:
            methods.resolve_hparams(name, **trial)
        except ValueError as err:
            raise _refuse(f"config.method_hparams.{name}: {err}") from err
    return result


def _train_values(config: Any, *, field: str) -> dict[str, Any]:
    try:
        return validate_train_config(config)
    except ConfigError as err:
        raise _refuse(str(err).replace("config.", f"config.{field}.", 1)) from err


def _checkpoint_metadata(workdir: pathlib.Path, role: str) -> dict[str, Any] | None:
    """The latest checkpoint metadata of ``role`` in a train workdir (read-only), ``None`` if it has none."""
    directory = workdir / role / "checkpoints"
    if not directory.is_dir():
        return None
    with checkpointing.Checkpointer(directory, create=False) as ckpt:
        if ckpt.latest_step() is None:
            return None
        return ckpt.read_metadata()


def _check_cached(workdir: pathlib.Path, roles: Sequence[str], values: Mapping[str, Any], *, field: str) -> None:
    """Refuses cached roles in ``workdir`` trained with another config or data, with train.py's own dry run."""
    if not roles:
        return
    try:
        training.check_resumable(dict(values, roles=",".join(roles)), workdir)
    except (checkpointing.CheckpointMismatchError, checkpointing.CheckpointCorruptError) as err:
        # train.py's remedy names its own flags; unlearn.py's is another train_dir (or deleting the cache).
        reason = str(err).split("; pass --overwrite")[0]
        raise _refuse(f"{field}: {reason}; use another {field} (or delete {str(workdir)!r})") from err


def _loaded_checkpoint_config(path: pathlib.Path, *, field: str) -> dict[str, Any]:
    """The train config of the finished generative VAE in a ``train.py`` workdir, or a refusal."""
    if not path.exists():
        raise _refuse(f"config.{field}={str(path)!r} not found; allowed: a train.py workdir (or '' to train one)")
    roles_present = [role for role in ROLES if (path / role / "checkpoints").is_dir()]
    if not roles_present:
        raise _refuse(
            f"config.{field}={str(path)!r} holds no train.py checkpoint (no <role>/checkpoints); "
            "allowed: a train.py workdir"
        )
    try:
        saved = _checkpoint_metadata(path, "generative")
    except checkpointing.CheckpointError as err:
        raise _refuse(f"config.{field}={str(path)!r}: {err}") from err
    if saved is None:
        raise _refuse(
            f"config.{field}={str(path)!r} holds no generative model (roles present: "
            f"{', '.join(roles_present)}); allowed: a train.py workdir with a trained VAE"
        )
    generative_models = sorted(name for family in families.FAMILIES.values() for name in family.models)
    if saved.get("role") != "generative" or saved.get("model") not in generative_models:
        raise _refuse(
            f"config.{field}={str(path)!r} holds a {saved.get('model')!r} {saved.get('role')!r} model, "
            f"not a generative one; allowed: a workdir with one of {', '.join(generative_models)}"
        )
    if not saved.get("finished"):
        raise _refuse(
            f"config.{field}={str(path)!r}: its generative model is not finished (epoch "
            f"{saved.get('epoch')} of {saved.get('num_epochs')}); resume it with train.py first"
        )
    # Checkpoints written before the DDPM fields existed lack them; they never read them (see gsu_jax.generative).
    defaults = default_train_config()
    saved_config = {**{name: defaults[name] for name in families.FAMILIES["ddpm"].fields}, **saved["config"]}
    return _train_values(ml_collections.ConfigDict(saved_config), field=field)


def _config_values(config: Any) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        raw = dict(config.items())
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise _refuse(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
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
        raise _refuse(str(err)) from err
    return values


def plan_run(config: Any, workdir: str | pathlib.Path, *, command: str | None = None) -> RunPlan:
    """Validates an unlearning request completely, touching nothing on disk; see the module docstring.

    Args:
        config: an unlearning config (``configs/unlearn_mnist.py``).
        workdir: the output directory (created by :func:`execute`, not here).
        command: the command line to record in the report (default: a ``unlearn_and_evaluate`` call).

    Returns:
        The :class:`RunPlan`.

    Raises:
        UnlearnConfigError: one line naming the bad value and what is allowed.
    """
    values = _config_values(config)
    try:
        mesh = parallel.run_mesh(values, ("batch_size", "retain_batch_size"))  # joins the hosts first
    except ConfigError as err:
        raise _refuse(str(err)) from err
    names = _parse_methods(values["methods"])
    threshold = _parse_threshold(values["threshold"])
    values["optimizer"] = _parse_optimizer(values["optimizer"])
    method_optimizers = {}
    for name, override in values["method_optimizers"].items():
        if name not in methods.METHODS:
            raise _refuse(f"config.method_optimizers: unknown method {name!r}; allowed: {', '.join(methods.METHODS)}")
        if not isinstance(override, Mapping):
            raise _refuse(
                f"config.method_optimizers.{name}={override!r} is invalid; allowed: a mapping like "
                "{'learning_rate': 3e-3}"
            )
        override = {key: value for key, value in override.items() if value is not None}
        if override:
            method_optimizers[name] = _parse_optimizer(
                {**values["optimizer"], **override}, field=f"method_optimizers.{name}"
            )
    values["method_optimizers"] = method_optimizers
    method_hparams = _parse_method_hparams(values["method_hparams"], names)
    if values["forget_classes"].strip() == "":
        raise _refuse("config.forget_classes='' is empty; allowed: a comma-separated list of class indices, e.g. '1'")
    try:
        forget_classes = parse_class_list(values["forget_classes"], field="forget_classes")
    except ConfigError as err:
        raise _refuse(str(err)) from err
    if not workdir or not str(workdir).strip():
        raise _refuse("workdir is empty; allowed: a directory path")
    workdir = pathlib.Path(workdir).expanduser().absolute()
    if workdir.exists() and not workdir.is_dir():
        raise _refuse(f"workdir {str(workdir)!r} exists and is not a directory")

    train_dir = pathlib.Path(values["train_dir"]).expanduser().absolute() if values["train_dir"] else workdir / "train"
    if values["checkpoint"]:
        model_dir = pathlib.Path(values["checkpoint"]).expanduser().absolute()
        train_values = _loaded_checkpoint_config(model_dir, field="checkpoint")
        train_model: tuple[str, ...] = ()
    else:
        model_dir = train_dir / "model"
        train_values = _train_values(values["train"], field="train")
        train_model = ("generative",)
    train_values = dict(train_values, mesh=values["mesh"], distributed=values["distributed"])
    values["train"] = train_values
    try:
        run_data = training.prepare_data(train_values)
    except ConfigError as err:
        raise _refuse(str(err).replace("config.", "config.train.", 1)) from err
    if run_data.excluded_classes:
        raise _refuse(
            f"the original model's train config excludes classes {list(run_data.excluded_classes)}: it "
            "is an oracle, not a model to unlearn from; allowed: a config with exclude_classes=''"
        )
    out_of_range = [c for c in forget_classes if c >= run_data.train.num_classes]
    if out_of_range:
        raise _refuse(
            f"config.forget_classes={values['forget_classes']!r} names class {out_of_range[0]}; allowed: "
            f"classes 0..{run_data.train.num_classes - 1} of the data"
        )
    try:
        forget_idx, retain_idx = data_lib.select_forget_retain(run_data.train.labels, classes=list(forget_classes))
    except (ValueError, TypeError) as err:
        raise _refuse(f"config.forget_classes={values['forget_classes']!r}: {err}") from err
    values["threshold"] = "auto" if threshold is None else threshold
    if values["gated_target"] not in _GATED_TARGETS:
        try:
            if math.isnan(float(values["gated_target"])):
                raise ValueError
        except ValueError:
            raise _refuse(
                f"config.gated_target={values['gated_target']!r} is invalid; allowed: 'oracle', 'heldout' or a number"
            ) from None

    if values["guidance_weight"] > 0 and train_values["model"] not in models.VAE_MODELS:
        raise _refuse(
            f"config.guidance_weight={values['guidance_weight']!r} is VAE-only (the uniformity term decodes "
            f"latents); allowed for model {train_values['model']!r}: 0"
        )
    # Roles needed besides the generative model: the evaluator always, the guidance classifier when guided.
    classifier_roles = ("evaluator", "guidance") if values["guidance_weight"] > 0 else ("evaluator",)
    if not values["checkpoint"]:
        # Everything trains into one train.py workdir (train_and_evaluate resumes or skips what is finished).
        classifier_dir, train_classifiers = model_dir, classifier_roles
    elif all(_checkpoint_metadata(model_dir, role) is not None for role in classifier_roles):
        classifier_dir, train_classifiers = model_dir, ()
    else:
        # A given checkpoint without its classifiers: train them with its config into the train dir, never
        # writing into the user's checkpoint.
        classifier_dir, train_classifiers = train_dir / "classifiers", classifier_roles

    oracle_values = dict(train_values, exclude_classes=",".join(str(c) for c in forget_classes), roles="generative")
    oracle_values = _train_values(oracle_values, field="train")
    if values["oracle_checkpoint"]:
        oracle_dir = pathlib.Path(values["oracle_checkpoint"]).expanduser().absolute()
        saved_oracle = _loaded_checkpoint_config(oracle_dir, field="oracle_checkpoint")
        saved_excluded = tuple(sorted(parse_class_list(saved_oracle["exclude_classes"])))
        if saved_excluded != tuple(sorted(forget_classes)):
            raise _refuse(
                f"config.oracle_checkpoint={str(oracle_dir)!r} was trained without classes "
                f"{list(saved_excluded)}, not the forget classes {list(forget_classes)}; allowed: an "
                "oracle trained with exclude_classes equal to forget_classes"
            )
        oracle_values, train_oracle = dict(saved_oracle, mesh=values["mesh"], distributed=values["distributed"]), False
    else:
        oracle_dir, train_oracle = train_dir / "oracle", True

    # Refuse cached models of another config now, rather than after the workdir has been written.
    if classifier_dir == model_dir:
        _check_cached(model_dir, train_model + tuple(train_classifiers), train_values, field="config.train_dir")
    else:
        _check_cached(model_dir, train_model, train_values, field="config.train_dir")
        _check_cached(classifier_dir, tuple(train_classifiers), train_values, field="config.train_dir")
    if train_oracle:
        _check_cached(oracle_dir, ("generative",), oracle_values, field="config.train_dir")

    if values["monitor_samples"] < 2:
        raise _refuse(f"config.monitor_samples={values['monitor_samples']} is too few; allowed: an integer >= 2")
    _check_saved_results(workdir, values)
    return RunPlan(
        config=values,
        workdir=workdir,
        command=command or f"unlearn_and_evaluate(config, {str(workdir)!r})",
        forget_classes=forget_classes,
        method_names=names,
        method_hparams=method_hparams,
        seeds=tuple(range(values["first_seed"], values["first_seed"] + values["seeds"])),
        threshold=threshold,
        model_dir=model_dir,
        train_model=train_model,
        classifier_dir=classifier_dir,
        train_classifiers=tuple(train_classifiers),
        oracle_dir=oracle_dir,
        train_oracle=train_oracle,
        oracle_config=oracle_values,
        classifier_config=train_values,
        run_data=run_data,
        forget_idx=forget_idx,
        retain_idx=retain_idx,
        mesh=mesh,
    )


# ------------------------------------------------------------------------------------------- integrity


def check_classifier_independence(evaluator: training.TrainedModel, guidance: training.TrainedModel) -> dict:
    """Refuses an evaluator and a guidance classifier that are not distinct models from distinct runs.

    Checks: distinct parameter objects, different parameter digests, roles ``evaluator`` / ``guidance``,
    different training examples (training-data fingerprints) and different training keys (the role folds into
    the seed, so the same ``seed`` still gives different keys; identical role and seed would not).

    Returns:
        The evidence recorded in the report (digests, fingerprints, roles, seeds).

    Raises:
        RuntimeError: any check fails.
    """
    evidence = {
        "evaluator": {
            "role": evaluator.metadata.get("role"),
            "seed": evaluator.metadata.get("seed"),
            "params_digest": evaluator.metadata.get("params_digest"),
            "train_fingerprint": evaluator.metadata.get("train_fingerprint"),
            "num_train": evaluator.metadata.get("num_train"),
        },
        "guidance": {
            "role": guidance.metadata.get("role"),
            "seed": guidance.metadata.get("seed"),
            "params_digest": guidance.metadata.get("params_digest"),
            "train_fingerprint": guidance.metadata.get("train_fingerprint"),
            "num_train": guidance.metadata.get("num_train"),
        },
    }
    problems = []
    if evaluator.params is guidance.params:
        problems.append("they are the same parameter object")
    if checkpointing.state_digest(evaluator.params) == checkpointing.state_digest(guidance.params):
        problems.append("their parameters are identical")
    if (evidence["evaluator"]["role"], evidence["guidance"]["role"]) != ("evaluator", "guidance"):
        problems.append(f"roles are {evidence['evaluator']['role']!r}/{evidence['guidance']['role']!r}")
    if evidence["evaluator"]["train_fingerprint"] == evidence["guidance"]["train_fingerprint"]:
        problems.append("they were trained on the same examples")
    if problems:
        raise RuntimeError("the evaluator and the guidance classifier are not independent: " + "; ".join(problems))
    return evidence


# ------------------------------------------------------------------------------------------- evaluation


class _Evaluation:
    """Compiled evaluation of generators by the evaluator on fixed noises and fixed per-example keys.

    Family-generic (:mod:`gsu_jax.generative`): a VAE decodes its fixed ``z`` once; a DDPM denoises its fixed
    ``x_T`` with ``monitor_sample_steps`` DDIM steps for the per-step monitoring and ``fid_sample_steps`` for the
    FID, the grids and the class-conditional protocol. A class-conditional DDPM is sampled with the fixed labels
    ``i mod K`` (sample ``i``) and the train config's guidance scale; on top, samples generated FROM the forget
    label(s) (cycled over the same monitoring noises) are scored as in SalUn / Selective Amnesia: the evaluator's
    probability of the label, its accuracy and the entropy of its prediction.
    """

    def __init__(self, plan: RunPlan, generator: training.TrainedModel, evaluator: training.TrainedModel):
        config = plan.config
        self.gen_graphdef = generator.graphdef
        self.eval_graphdef = evaluator.graphdef
        self.eval_params = evaluator.params
        family = families.family_of(generator.metadata["model"])
        model_kwargs = dict(generator.metadata["model_kwargs"])
        settings = families.settings_of(family, config["train"])
        noise_shape = family.noise_shape(model_kwargs)
        self.family = family
        self.loss_prefix = family.report_prefix
        self.conditional = family.is_conditional(model_kwargs)
        num_classes = int(model_kwargs.get("num_classes", 0) or 0)
        self.num_monitor = config["monitor_samples"]
        self.num_published = config["published_monitor_samples"]
        self.z_monitor = monitoring_noise(max(self.num_monitor, self.num_published), noise_shape)
        num_fid = config["fid_samples"]
        # The VAE keeps the padded draw of its earlier reports (same z, same numbers); a DDPM pays per sample.
        chunk = _FID_CHUNK if family.name == "vae" else min(_FID_CHUNK, num_fid)
        padded = chunk * math.ceil(num_fid / chunk)
        self.num_fid = num_fid
        self.z_fid = jax.random.normal(stream_key("fid"), (padded, *noise_shape)).reshape(-1, chunk, *noise_shape)

        def cycled(count: int, classes: Sequence[int]) -> jax.Array | None:
            return jnp.asarray(np.resize(np.asarray(classes, np.int32), count)) if self.conditional else None

        self.monitor_labels = cycled(self.z_monitor.shape[0], range(num_classes))
        self.fid_labels = None if not self.conditional else cycled(padded, range(num_classes)).reshape(-1, chunk)
        self.forget_labels = cycled(self.num_monitor, plan.forget_classes)
        monitor_generate = family.generator(self.gen_graphdef, settings, num_steps=config["monitor_sample_steps"])
        final_generate = family.generator(self.gen_graphdef, settings, num_steps=config["fid_sample_steps"])
        forget = jnp.asarray(plan.forget_classes, jnp.int32)
        gen_graphdef, eval_graphdef = self.gen_graphdef, self.eval_graphdef
        num_monitor, num_published = self.num_monitor, self.num_published

        @jax.jit
        def monitor(gen_params, eval_params, z, labels):
            images = monitor_generate(gen_params, z, labels)
            logits = models.classifier_logits(eval_graphdef, eval_params, images)
            return (
                metrics.forget_fraction_from_logits(logits[:num_monitor], forget),
                metrics.forget_fraction_from_logits(logits[:num_published], forget),
            )

        @jax.jit
        def sample_outputs(gen_params, eval_params, z, labels):
            images = final_generate(gen_params, z, labels)
            features = models.classifier_features(eval_graphdef, eval_params, images)
            logits = models.classifier_logits(eval_graphdef, eval_params, images)
            return features, jax.nn.softmax(logits)

        loss_fn = family.loss(gen_graphdef, settings)

        @jax.jit
        def example_losses(gen_params, images, labels, keys):
            def one(inputs):
                image, label, example_keys = inputs
                draws = jax.vmap(lambda key: loss_fn(gen_params, {"image": image, "label": label}, key))(example_keys)
                return jnp.mean(draws)

            return jax.lax.map(one, (images, labels, keys), batch_size=256)

        self._monitor, self._sample_outputs, self._example_losses = monitor, sample_outputs, example_losses
        self._grid = jax.jit(final_generate)
        self.loss_fn = loss_fn

        run_data = plan.run_data
        train = run_data.train
        heldout_forget = np.flatnonzero(np.isin(run_data.heldout.labels, plan.forget_classes))
        heldout_retain = np.flatnonzero(~np.isin(run_data.heldout.labels, plan.forget_classes))
        if heldout_forget.size == 0 or heldout_retain.size == 0:
            raise RuntimeError(
                "the held-out data has no examples of the forget classes or none of the retained "
                "ones; membership inference and held-out losses need both (raise holdout_fraction)"
            )
        # One array of every example whose loss is read: forget training (members), held-out forget (non-members),
        # held-out retained; one compiled call evaluates all of them.
        images = np.concatenate(
            [
                train.images[plan.forget_idx],
                run_data.heldout.images[heldout_forget],
                run_data.heldout.images[heldout_retain],
            ]
        )
        labels = np.concatenate(
            [
                train.labels[plan.forget_idx],
                run_data.heldout.labels[heldout_forget],
                run_data.heldout.labels[heldout_retain],
            ]
        )
        self._loss_images, self._loss_labels = jnp.asarray(images), jnp.asarray(labels)
        self._splits = np.cumsum([plan.forget_idx.size, heldout_forget.size])
        self._loss_keys = jax.random.split(stream_key("elbo"), (images.shape[0], config["elbo_samples"]))

        # Real-data feature statistics, once: retained training images and all training images.
        features_all = self._features(jnp.asarray(train.images))
        self.real_all = metrics.feature_statistics(features_all)
        self.real_retain = metrics.feature_statistics(features_all[plan.retain_idx])

    def _features(self, images: jax.Array) -> np.ndarray:
        chunks = [
            np.asarray(_classifier_features(self.eval_graphdef, self.eval_params, images[i : i + _REAL_FEATURES_CHUNK]))
            for i in range(0, images.shape[0], _REAL_FEATURES_CHUNK)
        ]
        return np.concatenate(chunks).astype(np.float64)

    def monitor(self, gen_params) -> tuple[float, float]:
        """``(forget fraction on monitor_samples, on the published_monitor_samples)`` of the fixed noises."""
        main, published = self._monitor(gen_params, self.eval_params, self.z_monitor, self.monitor_labels)
        return float(main), float(published)

    def grid(self, gen_params, count: int) -> np.ndarray:
        labels = None if self.monitor_labels is None else self.monitor_labels[:count]
        return np.asarray(self._grid(gen_params, self.z_monitor[:count], labels))

    def example_losses(self, gen_params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-example family loss: (forget training, held-out forget, held-out retained)."""
        values = np.asarray(
            self._example_losses(gen_params, self._loss_images, self._loss_labels, self._loss_keys), np.float64
        )
        return tuple(np.split(values, self._splits))

    def _forget_label_protocol(self, gen_params) -> dict[str, float]:
        """Samples generated FROM the forget label(s): the evaluator's probability of that label, its accuracy
        (the complement of SalUn's unlearning accuracy) and the mean entropy of its prediction (nats)."""
        z = self.z_monitor[: self.num_monitor]
        _, probs = self._sample_outputs(gen_params, self.eval_params, z, self.forget_labels)
        probs = np.asarray(probs, np.float64)
        labels = np.asarray(self.forget_labels)
        entropy = -np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=1)
        return {
            "forget_label_class_prob": float(probs[np.arange(labels.size), labels].mean()),
            "forget_label_accuracy": float(np.mean(np.argmax(probs, axis=1) == labels)),
            "forget_label_entropy": float(entropy.mean()),
        }

    def evaluate(self, gen_params, forget_classes: Sequence[int]) -> dict[str, float]:
        """Every metric of one generator (see the module docstring)."""
        features, probs = [], []
        for index, chunk in enumerate(self.z_fid):
            labels = None if self.fid_labels is None else self.fid_labels[index]
            f, p = self._sample_outputs(gen_params, self.eval_params, chunk, labels)
            features.append(np.asarray(f))
            probs.append(np.asarray(p))
        features = np.concatenate(features)[: self.num_fid].astype(np.float64)
        probs = np.concatenate(probs)[: self.num_fid].astype(np.float64)
        generated = metrics.feature_statistics(features)
        forget_train, heldout_forget, heldout_retain = self.example_losses(gen_params)
        main, published = self.monitor(gen_params)
        prefix = self.loss_prefix
        result = {
            "forget_fraction": main,
            "forget_fraction_published": published,
            "forget_fraction_fid_samples": metrics.forget_fraction(np.argmax(probs, axis=1), list(forget_classes)),
            "fid_retain": metrics.frechet_distance_from_stats(self.real_retain, generated),
            "fid_all": metrics.frechet_distance_from_stats(self.real_all, generated),
            "inception_score": metrics.inception_score(probs)[0],
            f"{prefix}_heldout_retain": float(heldout_retain.mean()),
            f"{prefix}_heldout_forget": float(heldout_forget.mean()),
            f"{prefix}_forget_train": float(forget_train.mean()),
            "mia_auc": metrics.membership_inference_auc(forget_train, heldout_forget),
        }
        if self.conditional:
            result.update(self._forget_label_protocol(gen_params))
        return result


# ------------------------------------------------------------------------------------------- the run


def _batch_schedule(indices: np.ndarray, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """``int64[steps, batch]`` positions: consecutive fresh permutations of ``indices``, cut into batches."""
    passes = math.ceil(steps * batch / indices.size)
    order = np.concatenate([rng.permutation(indices) for _ in range(passes)])
    return order[: steps * batch].reshape(steps, batch)


def _run_one(
    plan: RunPlan,
    evaluation: _Evaluation,
    compiled_step,
    method: methods.UnlearningMethod,
    params0,
    seed: int,
    threshold: float,
    start_fractions: tuple[float, float],
    *,
    label: str = "run",
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One (method, seed) run: steps, monitoring, stopping; returns the trajectory and the two parameter sets.

    With a ``mesh`` (the plan's) the steps run on it (state placed as ``state_shardings``, batches split over the
    data axis) and the monitoring, like everything host-side, on this process's copy of the parameters.

    Non-finite guard: a step whose new parameters or optimizer state are not finite (a NaN or infinite gradient
    or update) is skipped -- the parameters and the optimizer state stay as they were, the step's batch and key
    are consumed -- and counted (``nonfinite_steps``; the log row has ``nonfinite_skipped=1``). The check runs on
    the step's outputs outside the compiled step, so finite runs execute exactly the program they always did.

    Raises:
        UnlearningDivergedError: the last :data:`MAX_CONSECUTIVE_NONFINITE` steps (all steps, for a shorter
            budget) were skipped.
    """
    config = plan.config
    budget = config["max_steps"]
    rng = np.random.default_rng([seed, _DATA_STREAM])
    train = plan.run_data.train
    forget_schedule = _batch_schedule(plan.forget_idx, config["batch_size"], budget, rng)
    retain_schedule = _batch_schedule(plan.retain_idx, config["retain_batch_size"], budget, rng)
    keys = seed_step_keys(seed, budget)

    params, state = params0, method.init(params0)
    divergence_window = min(MAX_CONSECUTIVE_NONFINITE, budget)
    nonfinite_steps = consecutive_nonfinite = 0
    if mesh is not None:
        params, state = parallel.put((params, state), state_shardings)
    fractions, published = [start_fractions[0]], [start_fractions[1]]
    local_params = params0
    step_times, rows = (
        [],
        [
            {
                "seed": seed,
                "step": 0,
                "forget_fraction": start_fractions[0],
                "forget_fraction_published": start_fractions[1],
            }
        ],
    )
    stop = 0 if start_fractions[0] < threshold else None
    stop_published = 0 if start_fractions[1] < config["published_threshold"] else None
    params_at_stop = params0 if stop == 0 else None
    for t in range(budget):
        if stop is not None and not config["continue_to_budget"]:
            break
        forget_batch = data_lib.as_batch(train, forget_schedule[t])
        retain_batch = data_lib.as_batch(train, retain_schedule[t])
        if mesh is None:
            forget_batch, retain_batch, key = jax.device_put(forget_batch), jax.device_put(retain_batch), keys[t]
        else:
            forget_batch, retain_batch = (
                parallel.shard_batch(forget_batch, mesh),
                parallel.shard_batch(retain_batch, mesh),
            )
            key = parallel.put(keys[t], parallel.replicated(mesh))
        jax.block_until_ready((forget_batch, retain_batch, key))
        started = time.perf_counter()
        new_params, new_state, step_metrics = compiled_step(params, state, forget_batch, retain_batch, key)
        jax.block_until_ready(new_params)
        step_times.append(time.perf_counter() - started)
        finite = bool(_tree_all_finite((new_params, new_state)))
        if finite:
            params, state, consecutive_nonfinite = new_params, new_state, 0
            local_params = params if mesh is None else parallel.localize(params)
            main, pub = evaluation.monitor(local_params)
        else:
            # Skip the step: keep the parameters and optimizer state; the fractions are those of the kept model.
            nonfinite_steps += 1
            consecutive_nonfinite += 1
            if consecutive_nonfinite >= divergence_window:
                raise UnlearningDivergedError(
                    f"{label} seed {seed} diverged: the last {consecutive_nonfinite} steps (up to step {t + 1}) had "
                    "non-finite updates and were skipped; nothing of this run was saved. Lower the learning rate "
                    "(config.optimizer.learning_rate or config.method_optimizers) or check the data"
                )
            main, pub = fractions[-1], published[-1]
        fractions.append(main)
        published.append(pub)
        if stop is None and main < threshold:
            stop, params_at_stop = t + 1, local_params
        if stop_published is None and pub < config["published_threshold"]:
            stop_published = t + 1
        rows.append(
            {
                "seed": seed,
                "step": t + 1,
                "forget_fraction": main,
                "forget_fraction_published": pub,
                "step_time_ms": 1e3 * step_times[-1],
                "nonfinite_skipped": int(not finite),
                **{name: float(value) for name, value in step_metrics.items()},
            }
        )
    return {
        "seed": seed,
        "stop": stop,
        "stop_published": stop_published,
        "steps_run": len(step_times),
        "nonfinite_steps": nonfinite_steps,
        "fractions": fractions,
        "published_fractions": published,
        "step_times": step_times,
        "rows": rows,
        "params_at_stop": params_at_stop if params_at_stop is not None else local_params,
        "params_at_end": local_params if len(step_times) == budget else None,
    }


def _per_seed_record(
    run: dict[str, Any], at_stop: dict[str, float], at_end: dict[str, float] | None, budget: int
) -> dict[str, Any]:
    step_ms = 1e3 * float(np.median(run["step_times"])) if run["step_times"] else None
    record = {
        "seed": run["seed"],
        "steps_to_threshold": run["stop"],
        "steps_to_published_threshold": run["stop_published"],
        "evaluated_at_step": run["stop"] if run["stop"] is not None else budget,
        "steps_run": run["steps_run"],
        "nonfinite_steps": run.get("nonfinite_steps", 0),
        "step_time_ms": step_ms,
        "step_time_ms_mean": 1e3 * float(np.mean(run["step_times"])) if run["step_times"] else None,
        "time_to_unlearn_s": (
            None if run["stop"] is None or step_ms is None else metrics.time_to_unlearn(step_ms / 1e3, run["stop"])
        ),
    }
    for key, value in at_stop.items():
        record["mia_auc" if key == "mia_auc" else f"{key}_at_stop"] = value
    for key, value in (at_end or {}).items():
        record[f"{key}_at_end"] = value
    return record


_SUMMARY_KEYS = (
    "step_time_ms",
    "step_time_ms_mean",
    "time_to_unlearn_s",
    "forget_fraction_at_stop",
    "forget_fraction_published_at_stop",
    "forget_fraction_fid_samples_at_stop",
    "fid_retain_at_stop",
    "fid_all_at_stop",
    "inception_score_at_stop",
    "nelbo_heldout_retain_at_stop",
    "nelbo_heldout_forget_at_stop",
    "nelbo_forget_train_at_stop",
    "mia_auc",
    "forget_fraction_at_end",
    "forget_fraction_fid_samples_at_end",
    "fid_retain_at_end",
    "fid_all_at_end",
    "inception_score_at_end",
    "nelbo_heldout_retain_at_end",
    "nelbo_heldout_forget_at_end",
    "nelbo_forget_train_at_end",
    "mia_auc_at_end",
)
# Added to the summary of a class-conditional DDPM (the SalUn / Selective Amnesia protocol).
_CONDITIONAL_KEYS = ("forget_label_class_prob", "forget_label_accuracy", "forget_label_entropy")


def _summary_keys(loss_prefix: str, conditional: bool) -> tuple[str, ...]:
    """:data:`_SUMMARY_KEYS` with the family's loss names (``nelbo`` for a VAE), plus the conditional protocol."""
    keys = tuple(key.replace("nelbo_", f"{loss_prefix}_", 1) for key in _SUMMARY_KEYS)
    if conditional:
        keys += tuple(f"{key}_{when}" for key in _CONDITIONAL_KEYS for when in ("at_stop", "at_end"))
    return keys


def _summarize_method(
    name: str,
    label: str,
    hparams: dict[str, Any],
    per_seed: list[dict[str, Any]],
    compile_seconds: float,
    guided: bool,
    summary_keys: Sequence[str] = _SUMMARY_KEYS,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "method": name,
        "label": label,
        "guided": guided,
        "rule": methods.METHODS[name].rule,
        "source": methods.METHODS[name].source,
        "hparams": hparams,
        "compile_s": compile_seconds,
        "steps_to_threshold": metrics.summarize([r["steps_to_threshold"] for r in per_seed]),
        "steps_to_published_threshold": metrics.summarize([r["steps_to_published_threshold"] for r in per_seed]),
        "nonfinite_steps": sum(r.get("nonfinite_steps", 0) for r in per_seed),
    }
    for key in summary_keys:
        summary[key] = metrics.summarize([r.get(key) for r in per_seed])
    summary["per_seed"] = per_seed
    return summary


def _progress(plan: RunPlan, message: str) -> None:
    if plan.config["progress"] and parallel.is_main_process():
        print(f"[unlearn] {message}", file=sys.stderr, flush=True)


def _load(plan: RunPlan, workdir: pathlib.Path, role: str) -> training.TrainedModel:
    """A trained role, restored through the run's mesh (every process reads its shards) into this process's copy."""
    model = training.load_trained(workdir, role, mesh=plan.mesh)
    return model if plan.mesh is None else model._replace(params=parallel.localize(model.params))


def _parallel_record(plan: RunPlan) -> dict[str, Any]:
    return {
        "mesh": None if plan.mesh is None else dict(plan.mesh.shape),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }


# ------------------------------------------------------------------------------------------- saved results
#
# Each finished (method, seed) run is saved as ONE JSON file, results/<label>/seed_<s>.json, written atomically
# (temporary file, fsync, rename) as the run's last act, after its sample grid and its unlearned parameters: the
# file's presence means everything of that run is on disk. A re-run in the same workdir reads these files back
# instead of recomputing the runs (the resumed report equals the uninterrupted one but for
# reporting.VOLATILE_REPORT_FIELDS), after checking that each was computed by the same config, code, packages,
# device and models; a run killed before its file was written is redone from its first step.

_RESULT_FORMAT = "gsu_jax.unlearn_result/v1"
_RESULTS_DIR = "results"
# Config fields that choose which runs to do or where the models come from, not what one (method, seed) run
# computes: saved runs stay valid when they change. The models enter a run's identity by their parameter digests,
# the method's own optimizer and hyperparameters as resolved for it.
_SELECTION_FIELDS = (
    "methods",
    "seeds",
    "first_seed",
    "progress",
    "checkpoint",
    "oracle_checkpoint",
    "train_dir",
    "optimizer",
    "method_optimizers",
    "method_hparams",
)
_MAX_DIFFERENCES = 3


def _config_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    return io.json_normalize({key: value for key, value in config.items() if key not in _SELECTION_FIELDS})


def _result_path(workdir: pathlib.Path, label: str, seed: int) -> pathlib.Path:
    return workdir / _RESULTS_DIR / label / f"seed_{seed}.json"


def _content_digest(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _read_result(path: pathlib.Path) -> dict[str, Any]:
    """A saved result, checked against the digest stored with it; :class:`SavedResultError` names a bad file."""
    remedy = "delete it to recompute that run"
    try:
        saved = json.loads(path.read_text())
        content = saved["content"]
        intact = saved["format"] == _RESULT_FORMAT and saved["digest"] == _content_digest(content)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SavedResultError(
            f"saved result {str(path)!r} is unreadable ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:120]}); {remedy}"
        ) from err
    if not intact:
        raise SavedResultError(
            f"saved result {str(path)!r} is damaged or was edited (its content does not match "
            f"the digest saved with it); {remedy}"
        )
    return content


def _mismatch_message(path: pathlib.Path, workdir: pathlib.Path, differences: Sequence[str]) -> str:
    shown = "; ".join(differences[:_MAX_DIFFERENCES])
    more = f" (and {len(differences) - _MAX_DIFFERENCES} more)" if len(differences) > _MAX_DIFFERENCES else ""
    return (
        f"workdir {str(workdir)!r} holds results of another run, which are not mixed with this one: "
        f"{str(path.relative_to(workdir))!r} differs in {shown}{more}; use another workdir, or delete "
        f"{str(workdir / _RESULTS_DIR)!r} to recompute every run"
    )


def _check_saved_results(workdir: pathlib.Path, config: Mapping[str, Any]) -> None:
    """Refuses (before any work) a workdir whose saved runs used another config, code, packages or device.

    A damaged saved result is refused too, chained to its :class:`SavedResultError` (``unlearn.py`` exits 1 for
    damage on disk, 2 for a workdir of another run).
    """
    directory = workdir / _RESULTS_DIR
    if not directory.is_dir():
        return
    current = {"config": _config_identity(config), **provenance.environment_identity()}
    for path in sorted(directory.glob("*/seed_*.json")):
        try:
            identity = _read_result(path)["identity"]
        except SavedResultError as err:
            raise _refuse(str(err)) from err
        differences = provenance.differences({key: identity.get(key) for key in current}, current)
        if differences:
            raise _refuse(_mismatch_message(path, workdir, differences))


def _load_result(workdir: pathlib.Path, label: str, seed: int, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The saved result of (label, seed), or ``None``.

    Raises:
        SavedResultError: the file is unreadable or damaged.
        checkpointing.CheckpointMismatchError: it was computed by another run (config, code, models, ...).
    """
    path = _result_path(workdir, label, seed)
    if not path.is_file():
        return None
    content = _read_result(path)
    differences = provenance.differences(content["identity"], identity)
    if differences:
        raise checkpointing.CheckpointMismatchError(_mismatch_message(path, workdir, differences))
    return content


def _save_result(workdir: pathlib.Path, label: str, seed: int, content: Mapping[str, Any]) -> dict[str, Any]:
    """Writes a finished run's result atomically; returns it as it reads back (what the report is built from)."""
    content = io.json_normalize(content)
    path = _result_path(workdir, label, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"format": _RESULT_FORMAT, "digest": _content_digest(content), "content": content}
    io.write_text(path, io.json_text(saved, indent=None))
    return content


def _train_missing(plan: RunPlan) -> dict[str, Any]:
    """Trains (or resumes, or finds finished) every model the plan needs, with train.py's own code."""
    started = time.perf_counter()
    trained = {}
    model_roles = tuple(
        role
        for role in ROLES
        if role in plan.train_model + (plan.train_classifiers if plan.classifier_dir == plan.model_dir else ())
    )
    if model_roles:
        config = ml_collections.ConfigDict(dict(plan.config["train"], roles=",".join(model_roles)))
        trained["model"] = training.train_and_evaluate(config, plan.model_dir)
    if plan.train_classifiers and plan.classifier_dir != plan.model_dir:
        config = ml_collections.ConfigDict(dict(plan.classifier_config, roles=",".join(plan.train_classifiers)))
        trained["classifiers"] = training.train_and_evaluate(config, plan.classifier_dir)
    if plan.train_oracle:
        trained["oracle"] = training.train_and_evaluate(ml_collections.ConfigDict(plan.oracle_config), plan.oracle_dir)
    return {"seconds": time.perf_counter() - started, "runs": trained}


def execute(plan: RunPlan) -> dict[str, Any]:
    """Carries out a validated plan: trains what is missing, runs every (method, seed), writes the report.

    Returns:
        The report dict (also written to ``report.json``; see :mod:`gsu_jax.reporting`).
    """
    started = time.perf_counter()
    config = plan.config
    # Every process has planned from the disk as it was before any of them writes to it.
    parallel.barrier("execute:planned")
    workdir = checkpointing.ensure_writable_directory(plan.workdir)
    _progress(plan, f"models: {plan.model_dir} (original), {plan.oracle_dir} (oracle); training what is missing")
    training_record = _train_missing(plan)
    _progress(plan, f"models ready in {training_record['seconds']:.1f} s")

    generator = _load(plan, plan.model_dir, "generative")
    evaluator = _load(plan, plan.classifier_dir, "evaluator")
    oracle = _load(plan, plan.oracle_dir, "generative")
    if generator.metadata["train_fingerprint"] != plan.run_data.generative.fingerprint():
        raise RuntimeError(
            f"the generative model in {str(plan.model_dir)!r} was trained on other data than "
            "its config describes now (training-data fingerprints differ)"
        )
    integrity: dict[str, Any] = {
        "evaluator_used_inside_runs": False,
        "evaluator_params_digest": evaluator.metadata["params_digest"],
        "monitoring_latents": "stream 'monitor' (independent of seeds and of every loss key)",
    }
    guidance_loss = None
    if plan.guided:
        guidance = _load(plan, plan.classifier_dir, "guidance")
        integrity["classifiers"] = check_classifier_independence(evaluator, guidance)
        retained = [c for c in range(plan.run_data.train.num_classes) if c not in plan.forget_classes]
        guidance_loss = losses.uniformity_guidance_loss(
            generator.graphdef,
            guidance.graphdef,
            guidance.params,
            retained_classes=retained,
            num_samples=config["guidance_samples"],
            latent_dim=int(generator.metadata["model_kwargs"]["latent_dim"]),
        )
        integrity["guidance_params_digest"] = guidance.metadata["params_digest"]

    evaluation = _Evaluation(plan, generator, evaluator)
    integrity["monitoring_latents_digest"] = checkpointing.state_digest(evaluation.z_monitor)
    original_eval = evaluation.evaluate(generator.params, plan.forget_classes)
    oracle_eval = evaluation.evaluate(oracle.params, plan.forget_classes)
    if plan.threshold is None:
        threshold = metrics.auto_threshold(oracle_eval["forget_fraction"], config["monitor_samples"])
    else:
        threshold = plan.threshold
    gated_target = _gated_target(config, original_eval, oracle_eval, evaluation.loss_prefix)

    _progress(
        plan,
        f"original: forget fraction {original_eval['forget_fraction']:.4f}, FID retain "
        f"{original_eval['fid_retain']:.2f}; oracle: {oracle_eval['forget_fraction']:.4f}, "
        f"{oracle_eval['fid_retain']:.2f}; threshold {threshold:.4f}",
    )
    start_fractions = (original_eval["forget_fraction"], original_eval["forget_fraction_published"])
    for sub in ("logs", "samples", "unlearned"):
        (workdir / sub).mkdir(exist_ok=True)
    original_grid = evaluation.grid(generator.params, config["grid_samples"])
    oracle_grid = evaluation.grid(oracle.params, config["grid_samples"])

    method_reports: dict[str, Any] = {}
    curves: dict[str, list[list[float]]] = {}
    resumed: list[str] = []
    model_digests = {
        "original": generator.metadata["params_digest"],
        "oracle": oracle.metadata["params_digest"],
        **{role: digest for role, digest in integrity.items() if role.endswith("params_digest")},
    }
    run_identity = {
        "config": _config_identity(config),
        **provenance.environment_identity(),
        "models": model_digests,
        "threshold": threshold,
        "gated_target": gated_target,
    }
    for name in plan.method_names:
        label = plan.label(name)
        hparams = dict(plan.method_hparams.get(name, {}))
        if name == "sa_gated":
            hparams.setdefault("forget_loss_target", gated_target)
        optimizer_spec = config["method_optimizers"].get(name, config["optimizer"])
        method = methods.make_method(
            name,
            loss_fn=evaluation.loss_fn,
            optimizer=build_optimizer(optimizer_spec),
            guidance_loss=guidance_loss,
            guidance_weight=config["guidance_weight"],
            chunk_size=config["chunk_size"] or None,
            **hparams,
        )
        identities = {
            seed: {**run_identity, "method": label, "hparams": hparams, "optimizer": optimizer_spec, "seed": seed}
            for seed in plan.seeds
        }
        saved = {seed: _load_result(workdir, label, seed, identities[seed]) for seed in plan.seeds}
        compiled_step, compile_seconds, state_shardings = None, None, None
        if any(result is None for result in saved.values()):
            # Compile once per method, ahead of time, on the shapes every seed uses.
            example_state = method.init(generator.params)
            forget_example = jax.device_put(
                data_lib.as_batch(plan.run_data.train, plan.forget_idx[:1].repeat(config["batch_size"]))
            )
            retain_example = jax.device_put(
                data_lib.as_batch(plan.run_data.train, plan.retain_idx[:1].repeat(config["retain_batch_size"]))
            )
            compile_started = time.perf_counter()
            if plan.mesh is None:
                compiled_step = (
                    jax.jit(method.step)
                    .lower(generator.params, example_state, forget_example, retain_example, seed_step_keys(0, 1)[0])
                    .compile()
                )
            else:
                step, *shardings = parallel.shard_method_step(method.step, plan.mesh, generator.params, example_state)
                state_shardings = tuple(shardings)
                compiled_step = step.lower(
                    *parallel.put((generator.params, example_state), state_shardings),
                    parallel.shard_batch(jax.device_get(forget_example), plan.mesh),
                    parallel.shard_batch(jax.device_get(retain_example), plan.mesh),
                    parallel.put(seed_step_keys(0, 1)[0], parallel.replicated(plan.mesh)),
                ).compile()
            compile_seconds = time.perf_counter() - compile_started
            _progress(plan, f"{label}: step compiled in {compile_seconds:.1f} s")

        per_seed, rows = [], []
        curves[label] = []
        for seed in plan.seeds:
            result = saved[seed]
            if result is None:
                result = _run_seed(
                    plan,
                    evaluation,
                    compiled_step,
                    method,
                    generator,
                    seed,
                    threshold,
                    start_fractions,
                    label=label,
                    hparams=hparams,
                    compile_seconds=compile_seconds,
                    grids=(original_grid, oracle_grid),
                    identity=identities[seed],
                    state_shardings=state_shardings,
                )
            else:
                resumed.append(f"{label} seed {seed}")
                _progress(
                    plan, f"{label} seed {seed}: finished before; read back from {_result_path(workdir, label, seed)}"
                )
            if compile_seconds is None:  # every seed was read back: the compile time of the run that did them
                compile_seconds = result["compile_s"]
            record = result["record"]
            per_seed.append(record)
            at_end = record.get("fid_retain_at_end")
            _progress(
                plan,
                f"{label} seed {seed}: stop {record['steps_to_threshold']} (published rule "
                f"{record['steps_to_published_threshold']}), FID retain "
                f"{record['fid_retain_at_stop']:.2f} -> {'n/a' if at_end is None else format(at_end, '.2f')}"
                f", step {record['step_time_ms'] or float('nan'):.1f} ms"
                + (f", {record['nonfinite_steps']} non-finite step(s) skipped" if record["nonfinite_steps"] else ""),
            )
            rows.extend(result["rows"])
            curves[label].append(result["fractions"])
        if parallel.is_main_process():
            reporting.write_step_csv(str(workdir / "logs" / f"{label}.csv"), rows)
        method_reports[label] = _summarize_method(
            name,
            label,
            hparams,
            per_seed,
            compile_seconds,
            plan.guided,
            _summary_keys(evaluation.loss_prefix, evaluation.conditional),
        )
        method_reports[label]["optimizer"] = optimizer_spec

    report = {
        "command": plan.command,
        # The method to use when in doubt (its defaults are the measured ones); it heads the default methods list.
        "recommended_method": methods.RECOMMENDED_METHOD,
        "config": _jsonable_config(config),
        "forget_classes": list(plan.forget_classes),
        "seeds": list(plan.seeds),
        "threshold": {
            "mode": "auto" if plan.threshold is None else "fixed",
            "value": threshold,
            "monitor_samples": config["monitor_samples"],
            "oracle_forget_fraction": oracle_eval["forget_fraction"],
            "original_forget_fraction": original_eval["forget_fraction"],
            "original_already_below": original_eval["forget_fraction"] < threshold,
            "published": {
                "value": config["published_threshold"],
                "monitor_samples": config["published_monitor_samples"],
                "original_forget_fraction": original_eval["forget_fraction_published"],
            },
        },
        "sa_gated_forget_loss_target": {
            "source": config["gated_target"],
            "scale": config["gated_target_scale"],
            "value": gated_target,
            "original_forget_train_loss": original_eval[f"{evaluation.loss_prefix}_forget_train"],
        },
        "data": {
            "spec": config["train"]["data"],
            "fingerprint": plan.run_data.source_fingerprint,
            "train_fingerprint": plan.run_data.train.fingerprint(),
            "heldout_fingerprint": plan.run_data.heldout.fingerprint(),
            "num_train": len(plan.run_data.train),
            "num_forget_train": int(plan.forget_idx.size),
            "num_retain_train": int(plan.retain_idx.size),
            "num_heldout": len(plan.run_data.heldout),
        },
        "models": {
            "original": _model_record(plan.model_dir, generator),
            "evaluator": _model_record(plan.classifier_dir, evaluator),
            "oracle": _model_record(plan.oracle_dir, oracle),
        },
        "integrity": integrity,
        "generative": _generative_record(evaluation, config),
        "versions": {**provenance.package_versions(), "python": platform.python_version()},
        "jax_flags": provenance.jax_flags(),
        "code": provenance.code_version(),
        "device": provenance.device_description(),
        "parallel": _parallel_record(plan),
        "original": original_eval,
        "oracle": oracle_eval,
        "methods": method_reports,
        "reproducibility": {
            "volatile_fields": list(reporting.VOLATILE_REPORT_FIELDS),
            "volatile_log_columns": list(reporting.VOLATILE_LOG_COLUMNS),
        },
        "resumed": resumed,
        "timing": {"training_s": training_record["seconds"], "total_s": time.perf_counter() - started},
    }
    report["timing"]["total_s"] = time.perf_counter() - started
    if parallel.is_main_process():
        reporting.plot_forget_fraction(
            str(workdir / "forget_fraction.png"),
            curves,
            threshold=threshold,
            threshold_label=f"threshold {threshold:.4f} ({report['threshold']['mode']})",
            oracle_fraction=oracle_eval["forget_fraction"],
        )
        report["timing"]["total_s"] = time.perf_counter() - started
        reporting.write_json(str(workdir / "report.json"), report)
        reporting.write_markdown(str(workdir / "report.md"), report)
    return report


def _gated_target(
    config: Mapping[str, Any],
    original_eval: Mapping[str, float],
    oracle_eval: Mapping[str, float],
    loss_prefix: str = "nelbo",
) -> float:
    """``sa_gated``'s forget-loss target: ``L_orig + scale * (L_ref - L_orig)`` (a given number is used as is).

    ``L_orig`` is the original model's mean family loss (VAE: negative ELBO, key prefix ``nelbo``; DDPM: epsilon
    loss, ``eps_loss``) on the forget training examples; ``L_ref`` is the
    oracle's on the same examples (``gated_target='oracle'``) or the original model's on held-out examples of the
    forget classes (``'heldout'``: the fallback without an oracle, the loss level of examples it never saw).
    """
    if config["gated_target"] not in _GATED_TARGETS:
        return float(config["gated_target"])
    reference = (
        oracle_eval[f"{loss_prefix}_forget_train"]
        if config["gated_target"] == "oracle"
        else original_eval[f"{loss_prefix}_heldout_forget"]
    )
    if config["gated_target_scale"] == 1.0:
        return reference
    start = original_eval[f"{loss_prefix}_forget_train"]
    return start + config["gated_target_scale"] * (reference - start)


def _generative_record(evaluation: _Evaluation, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the report's loss columns and sampling are (``reporting`` names the loss columns from it)."""
    record = {
        "family": evaluation.family.name,
        "loss_prefix": evaluation.loss_prefix,
        "loss_label": evaluation.family.loss_label,
        "class_conditional": evaluation.conditional,
    }
    if evaluation.family.name == "ddpm":
        record.update(
            sampler="ddim",
            monitor_sample_steps=config["monitor_sample_steps"],
            fid_sample_steps=config["fid_sample_steps"],
            guidance_scale=config["train"]["guidance_scale"] if evaluation.conditional else None,
            monitoring_labels="i mod K (all classes)" if evaluation.conditional else "none (unconditional)",
        )
    return record


def _model_record(workdir: pathlib.Path, model: training.TrainedModel) -> dict[str, Any]:
    meta = model.metadata
    return {
        "workdir": str(workdir),
        "role": meta.get("role"),
        "model": meta.get("model"),
        "model_kwargs": meta.get("model_kwargs"),
        "seed": meta.get("seed"),
        "step": meta.get("step"),
        "num_train": meta.get("num_train"),
        "train_fingerprint": meta.get("train_fingerprint"),
        "excluded_classes": meta.get("excluded_classes"),
        "params_digest": meta.get("params_digest"),
    }


def _jsonable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return io.json_normalize(dict(config), sort_keys=True)


def _run_seed(
    plan: RunPlan,
    evaluation: _Evaluation,
    compiled_step,
    method: methods.UnlearningMethod,
    generator: training.TrainedModel,
    seed: int,
    threshold: float,
    start_fractions: tuple[float, float],
    *,
    label: str,
    hparams: dict[str, Any],
    compile_seconds: float,
    grids: tuple[np.ndarray, np.ndarray],
    identity: dict[str, Any],
    state_shardings: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Runs and evaluates one (method, seed), writes its grid and unlearned model, then its result (last).

    Files are written by process 0 only; the unlearned model by every process (each its shards)."""
    config, workdir, budget = plan.config, plan.workdir, plan.config["max_steps"]
    run = _run_one(
        plan,
        evaluation,
        compiled_step,
        method,
        generator.params,
        seed,
        threshold,
        start_fractions,
        label=label,
        mesh=plan.mesh,
        state_shardings=state_shardings,
    )
    at_stop = evaluation.evaluate(run["params_at_stop"], plan.forget_classes)
    at_end = None
    if run["params_at_end"] is not None:
        at_end = at_stop if run["stop"] is None else evaluation.evaluate(run["params_at_end"], plan.forget_classes)
    record = _per_seed_record(run, at_stop, at_end, budget)
    record["params_digest_at_stop"] = checkpointing.state_digest(run["params_at_stop"])
    record["params_digest_at_end"] = (
        None if run["params_at_end"] is None else checkpointing.state_digest(run["params_at_end"])
    )
    first = seed == plan.seeds[0]
    if first and parallel.is_main_process():
        original_grid, oracle_grid = grids
        panels = {
            "original": original_grid,
            f"{label} at stop (step {record['evaluated_at_step']})": evaluation.grid(
                run["params_at_stop"], config["grid_samples"]
            ),
        }
        if run["params_at_end"] is not None:
            panels[f"at end (step {budget})"] = evaluation.grid(run["params_at_end"], config["grid_samples"])
        panels["oracle"] = oracle_grid
        reporting.save_sample_panels(str(workdir / "samples" / f"{label}.png"), panels)
    saved_params = config["save_params"] == "all" or (config["save_params"] == "first_seed" and first)
    if saved_params:
        _save_unlearned(workdir / "unlearned" / label / f"seed_{seed}", run, record, plan, label, hparams, generator)
    content = {
        "identity": identity,
        "record": record,
        "rows": run["rows"],
        "fractions": run["fractions"],
        "compile_s": compile_seconds,
        "unlearned_saved": saved_params,
    }
    if not parallel.is_main_process():
        return io.json_normalize(content)
    return _save_result(workdir, label, seed, content)


def _save_unlearned(
    directory: pathlib.Path,
    run: dict[str, Any],
    record: dict[str, Any],
    plan: RunPlan,
    label: str,
    hparams: dict[str, Any],
    generator: training.TrainedModel,
) -> None:
    """Saves the parameters at the stopping step (the unlearned model) with orbax, with what produced them.

    Refuses non-finite parameters (nothing is written). A directory left by an earlier, interrupted attempt at
    this run is replaced: its run had not finished (its result file, written after this, was missing). With a mesh,
    every process saves its shards of the parameters placed on the mesh (orbax writes each once).
    """
    if not bool(_tree_all_finite(run["params_at_stop"])):
        raise UnlearningDivergedError(
            f"{label} seed {run['seed']}: the parameters at step "
            f"{record['evaluated_at_step']} are not finite; refusing to save them to "
            f"{str(directory)!r}"
        )
    if parallel.is_main_process():
        shutil.rmtree(directory, ignore_errors=True)
    parallel.barrier(f"unlearn:save:{label}:{run['seed']}:cleared")
    params = run["params_at_stop"]
    if plan.mesh is not None:
        params = parallel.put(params, parallel.param_shardings(params, plan.mesh))
    with checkpointing.Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(
            record["evaluated_at_step"],
            params,
            metadata={
                "role": "unlearned",
                "model": generator.metadata["model"],
                "model_kwargs": generator.metadata["model_kwargs"],
                "method": label,
                "hparams": hparams,
                "seed": run["seed"],
                "forget_classes": list(plan.forget_classes),
                "steps_to_threshold": run["stop"],
                "original_params_digest": generator.metadata["params_digest"],
                "train_fingerprint": generator.metadata["train_fingerprint"],
                "config": _jsonable_config(plan.config),
            },
        )


def format_summary(report: Mapping[str, Any]) -> str:
    """The table printed at the end of a run (the same as in report.md), with the threshold line."""
    threshold = report["threshold"]
    head = (
        f"threshold {threshold['mode']} = {threshold['value']:.4f} on {threshold['monitor_samples']} samples "
        f"(original {threshold['original_forget_fraction']:.4f}, oracle {threshold['oracle_forget_fraction']:.4f});"
        f" seeds {report['seeds']}"
    )
    return head + "\n\n" + reporting.markdown_table(report)


def unlearn_and_evaluate(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Validates (:func:`plan_run`) and runs (:func:`execute`) an unlearning request; returns the report."""
    return execute(plan_run(config, workdir))
