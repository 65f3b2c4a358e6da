r"""Planning an unlearning run: :func:`plan_run` validates *everything* before any work and writes nothing; the
models the plan names are trained (:func:`train_missing_models`) and loaded (:func:`load_model`) here too.

:func:`plan_run` checks every config field (:mod:`gsu_jax.unlearning.config`), the forget classes against the data
(absent class, empty forget set, forget set equal to all data), an explicit ``checkpoint`` (must hold a finished
generative model), any models already cached in ``train_dir`` (must have been trained with the same config and
data) and any results already saved in the workdir (:mod:`gsu_jax.unlearning.results`). Refusals are
:class:`~gsu_jax.unlearning.errors.UnlearnConfigError` (a ``ValueError``), one line naming the value and what is
allowed.

**Models.** Four, from three training runs of the same train config (``config.train``, a ``train.py`` config),
trained when missing through the same code as ``train.py`` (:func:`gsu_jax.training.train_and_evaluate`):

* the *original* generative model, the *evaluator* and the *guidance classifier*: roles ``generative``,
  ``evaluator``, ``guidance`` of one ``train.py`` workdir (``config.checkpoint``, or trained into
  ``<train_dir>/model``). The training code gives the two classifiers different keys (the role folds into the
  seed) and disjoint halves of the training digits: they are distinct models from distinct runs.
  ``config.checkpoint`` may instead be a plain orbax checkpoint of the parameters of the model ``config.train``
  builds (:mod:`gsu_jax.unlearning.foreign`): it is checked here and imported into ``<train_dir>/model`` at
  execution, and the classifiers are trained from ``config.train`` as when nothing is given;
* the *oracle*: the same config with ``exclude_classes`` = the forget classes (retrain from scratch without the
  forget set), role ``generative`` of ``config.oracle_checkpoint`` or ``<train_dir>/oracle``. A forget set of
  examples (``config.forget='fraction:...'`` or ``'indices:...'``, :mod:`gsu_jax.example_sets`) is left out with
  the train config's ``exclude`` instead; a given oracle is refused unless the examples its checkpoint records as
  left out are the forget examples (same count, same fingerprint).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gsu_jax import checkpointing, example_sets, models, parallel, training
from gsu_jax import generative as families
from gsu_jax.config_validation import ROLES, default_train_config
from gsu_jax.method_registry import METHODS
from gsu_jax.schema import ConfigError
from gsu_jax.unlearning.config import (
    check_gated_target,
    parse_config_values,
    parse_forget_set,
    parse_method_hparams,
    parse_method_optimizers,
    parse_methods,
    parse_optimizer,
    parse_threshold,
    parse_train_config,
)
from gsu_jax.unlearning.errors import UnlearnConfigError
from gsu_jax.unlearning.foreign import ForeignImport, import_checkpoint, is_orbax_checkpoint, plan_import
from gsu_jax.unlearning.results import check_saved_results

__all__ = ["RunPlan", "load_model", "plan_run", "train_missing_models"]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A validated request (from :func:`plan_run`); :func:`execute` carries it out.

    Attributes:
        config: the validated unlearning config values (plain dict; ``train`` is the validated train config of
            the original model's run).
        workdir: absolute output directory (not created yet).
        command: the command line recorded in the report.
        forget_classes: the classes to unlearn (``()`` for a forget set of examples).
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
        forget_set: the parsed ``config.forget`` (whole classes unless ``fraction``/``indices``).
        forget_record: what the report and the oracle check read of the forget set
            (:func:`gsu_jax.example_sets.selection_record`).
        imported: the foreign orbax checkpoint to import into ``model_dir`` (``None``: ``config.checkpoint`` is a
            train.py workdir, or empty).
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
    forget_set: example_sets.ExampleSet | None = None
    forget_record: dict[str, Any] | None = None
    imported: ForeignImport | None = None

    @property
    def example_forget(self) -> bool:
        """A forget set of examples, not whole classes: the loss-gap evaluation and stop rule apply."""
        return self.forget_set is not None and not self.forget_set.is_classes

    @property
    def guided(self) -> bool:
        return self.config["guidance_weight"] > 0

    def label(self, name: str) -> str:
        """The method's name in every table and file: ``+guided`` when the guidance term is on."""
        return f"{name}+guided" if self.guided else name

    def progress(self, message: str) -> None:
        """One progress line on stderr (``config.progress``; process 0 only)."""
        if self.config["progress"] and parallel.is_main_process():
            print(f"[unlearn] {message}", file=sys.stderr, flush=True)


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
        raise UnlearnConfigError(f"{field}: {reason}; use another {field} (or delete {str(workdir)!r})") from err


def _train_roles_present(path: pathlib.Path) -> list[str]:
    """The roles of which ``path`` holds train.py checkpoints (``<role>/checkpoints``): empty unless a train workdir."""
    return [role for role in ROLES if (path / role / "checkpoints").is_dir()]


def _finished_checkpoint_config(path: pathlib.Path, *, field: str) -> dict[str, Any]:
    """The train config of the finished generative VAE in a ``train.py`` workdir, or a refusal."""
    # config.checkpoint may also be a foreign orbax checkpoint (see _original_model); the oracle may not.
    also = " or an orbax checkpoint of config.train's model" if field == "checkpoint" else ""
    if not path.exists():
        raise UnlearnConfigError(
            f"config.{field}={str(path)!r} not found; allowed: a train.py workdir{also} (or '' to train one)"
        )
    roles_present = _train_roles_present(path)
    if not roles_present:
        neither = " nor an orbax checkpoint (no _CHECKPOINT_METADATA)" if also else ""
        raise UnlearnConfigError(
            f"config.{field}={str(path)!r} holds no train.py checkpoint (no <role>/checkpoints){neither}; "
            f"allowed: a train.py workdir{also}"
        )
    try:
        saved = _checkpoint_metadata(path, "generative")
    except checkpointing.CheckpointError as err:
        raise UnlearnConfigError(f"config.{field}={str(path)!r}: {err}") from err
    if saved is None:
        raise UnlearnConfigError(
            f"config.{field}={str(path)!r} holds no generative model (roles present: "
            f"{', '.join(roles_present)}); allowed: a train.py workdir with a trained VAE"
        )
    generative_models = sorted(name for family in families.FAMILIES.values() for name in family.models)
    if saved.get("role") != "generative" or saved.get("model") not in generative_models:
        raise UnlearnConfigError(
            f"config.{field}={str(path)!r} holds a {saved.get('model')!r} {saved.get('role')!r} model, "
            f"not a generative one; allowed: a workdir with one of {', '.join(generative_models)}"
        )
    if not saved.get("finished"):
        raise UnlearnConfigError(
            f"config.{field}={str(path)!r}: its generative model is not finished (epoch "
            f"{saved.get('epoch')} of {saved.get('num_epochs')}); resume it with train.py first"
        )
    # Checkpoints written before the DDPM fields existed lack them; they never read them (see gsu_jax.generative).
    defaults = default_train_config()
    saved_config = {**{name: defaults[name] for name in families.FAMILIES["ddpm"].fields}, **saved["config"]}
    return parse_train_config(ml_collections.ConfigDict(saved_config), field=field)


def plan_run(config: Any, workdir: str | pathlib.Path, *, command: str | None = None) -> RunPlan:
    """Validates an unlearning request completely, touching nothing on disk; see the module docstring.

    The checks run in a fixed order (a config with two problems is refused for the first one): the fields, the
    output directory, the original model and its data, the forget classes against that data, ``gated_target``, the
    guidance term, the oracle, the cached models, ``monitor_samples``, the saved results.

    Args:
        config: an unlearning config (``configs/unlearn_mnist.py``).
        workdir: the output directory (created by :func:`~gsu_jax.unlearning.report.execute`, not here).
        command: the command line to record in the report (default: a ``unlearn_and_evaluate`` call).

    Returns:
        The :class:`RunPlan`.

    Raises:
        UnlearnConfigError: one line naming the bad value and what is allowed.
    """
    values = parse_config_values(config)
    try:
        mesh = parallel.run_mesh(values, ("batch_size", "retain_batch_size"))  # joins the hosts first
    except ConfigError as err:
        raise UnlearnConfigError(str(err)) from err
    names = parse_methods(values["methods"])
    threshold = parse_threshold(values["threshold"])
    values["optimizer"] = parse_optimizer(values["optimizer"])
    values["method_optimizers"] = parse_method_optimizers(values["method_optimizers"], values["optimizer"])
    method_hparams = parse_method_hparams(values["method_hparams"], names)
    forget_set = parse_forget_set(values)
    forget_classes = forget_set.classes
    if not forget_set.is_classes and threshold is not None:
        raise UnlearnConfigError(
            f"config.threshold={values['threshold']!r} is a forget fraction, meaningless for config.forget="
            f"{values['forget']!r} (examples, not classes); allowed: 'auto' (the oracle's loss gap +- 2 SE)"
        )
    workdir = _output_directory(workdir)

    train_dir = pathlib.Path(values["train_dir"]).expanduser().absolute() if values["train_dir"] else workdir / "train"
    model_dir, train_values, train_model, foreign_source = _original_model(values, train_dir)
    values["train"] = train_values
    run_data = _original_run_data(train_values)
    imported = None
    if foreign_source is not None:
        imported = plan_import(
            foreign_source, train_values, run_data, model_dir, saved=_readable_metadata(model_dir, "train_dir")
        )
    forget_idx, retain_idx = _forget_retain_split(run_data, forget_set, values, train_values["seed"])
    forget_record = example_sets.selection_record(forget_set, run_data.train, forget_idx)
    values["threshold"] = "auto" if threshold is None else threshold
    check_gated_target(values["gated_target"])

    _check_guidance_model(values, train_values, forget_set)
    names = _methods_for_model(names, values, train_values)
    classifier_dir, train_classifiers = _classifier_source(values, model_dir, train_dir)
    oracle_dir, oracle_values, train_oracle = _oracle_source(values, train_values, forget_set, forget_record, train_dir)

    # Refuse cached models of another config now, rather than after the workdir has been written.
    if classifier_dir == model_dir:
        _check_cached(model_dir, train_model + tuple(train_classifiers), train_values, field="config.train_dir")
    else:
        _check_cached(model_dir, train_model, train_values, field="config.train_dir")
        _check_cached(classifier_dir, tuple(train_classifiers), train_values, field="config.train_dir")
    if train_oracle:
        _check_cached(oracle_dir, ("generative",), oracle_values, field="config.train_dir")

    if values["monitor_samples"] < 2:
        raise UnlearnConfigError(
            f"config.monitor_samples={values['monitor_samples']} is too few; allowed: an integer >= 2"
        )
    check_saved_results(workdir, values)
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
        forget_set=forget_set,
        forget_record=forget_record,
        imported=imported,
    )


def _output_directory(workdir: str | pathlib.Path) -> pathlib.Path:
    """The workdir as an absolute path, refused when empty or a file (it is created later, by ``execute``)."""
    if not workdir or not str(workdir).strip():
        raise UnlearnConfigError("workdir is empty; allowed: a directory path")
    workdir = pathlib.Path(workdir).expanduser().absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UnlearnConfigError(f"workdir {str(workdir)!r} exists and is not a directory")
    return workdir


def _original_model(
    values: Mapping[str, Any], train_dir: pathlib.Path
) -> tuple[pathlib.Path, dict[str, Any], tuple[str, ...], pathlib.Path | None]:
    """``(its train workdir, its train config, roles to train there, foreign checkpoint or None)`` of the original
    model: a train.py workdir ``config.checkpoint`` (nothing to train); a foreign orbax checkpoint
    ``config.checkpoint`` (imported into ``<train_dir>/model``, described by ``config.train``); or
    ``<train_dir>/model`` trained with ``config.train``. The train config takes the run's devices and hosts
    (``config.mesh`` / ``config.distributed``)."""
    foreign_source = None
    if values["checkpoint"]:
        source = pathlib.Path(values["checkpoint"]).expanduser().absolute()
        train_model: tuple[str, ...] = ()
        if _train_roles_present(source) or not is_orbax_checkpoint(source):
            model_dir, train_values = source, _finished_checkpoint_config(source, field="checkpoint")
        else:
            # Orbax records no model, kwargs or data: config.train states them (checked in plan_import).
            model_dir, foreign_source = train_dir / "model", source
            train_values = parse_train_config(values["train"], field="train")
    else:
        model_dir = train_dir / "model"
        train_values = parse_train_config(values["train"], field="train")
        train_model = ("generative",)
    train_values = dict(train_values, mesh=values["mesh"], distributed=values["distributed"])
    return model_dir, train_values, train_model, foreign_source


def _readable_metadata(workdir: pathlib.Path, field: str) -> dict[str, Any] | None:
    """:func:`_checkpoint_metadata` of the generative role, a damaged checkpoint refused naming ``config.<field>``."""
    try:
        return _checkpoint_metadata(workdir, "generative")
    except checkpointing.CheckpointError as err:
        raise UnlearnConfigError(f"config.{field}: {err}") from err


def _original_run_data(train_values: Mapping[str, Any]) -> training.RunData:
    """The data split of the original model's training run, refused when that run is an oracle's."""
    try:
        run_data = training.prepare_data(train_values)
    except ConfigError as err:
        raise UnlearnConfigError(str(err).replace("config.", "config.train.", 1)) from err
    if run_data.excluded is not None and not run_data.excluded_classes:
        raise UnlearnConfigError(
            f"the original model's train config excludes examples ({run_data.excluded['spec']}): it is an "
            "oracle, not a model to unlearn from; allowed: a config with exclude=''"
        )
    if run_data.excluded_classes:
        raise UnlearnConfigError(
            f"the original model's train config excludes classes {list(run_data.excluded_classes)}: it "
            "is an oracle, not a model to unlearn from; allowed: a config with exclude_classes=''"
        )
    return run_data


def _forget_retain_split(
    run_data: training.RunData, forget_set: example_sets.ExampleSet, values: Mapping[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``run_data.train`` of the forget and retain examples, selected as ``train.py``'s ``exclude``
    selects them (:func:`gsu_jax.example_sets.select_examples`, ``seed`` the train config's)."""
    field, shown = example_sets.spec_field(values, field="forget", classes_field="forget_classes")
    try:
        forget_idx, retain_idx = example_sets.select_examples(
            forget_set,
            run_data.train.labels,
            seed=seed,
            field=field,
            shown=shown,
            num_classes=run_data.train.num_classes,
        )
    except ConfigError as err:
        raise UnlearnConfigError(str(err)) from err
    if not forget_set.is_classes:
        # The class-matched loss gap compares each forget example with held-out examples of its own class.
        heldout_counts = np.bincount(run_data.heldout.labels, minlength=run_data.train.num_classes)
        short = sorted({int(c) for c in run_data.train.labels[forget_idx] if heldout_counts[c] < 2})
        if short:
            raise UnlearnConfigError(
                f"config.forget={forget_set.spec!r} forgets examples of class {short[0]}, which has "
                f"{heldout_counts[short[0]]} held-out examples; allowed: forget examples of classes with at least 2 "
                "held-out examples (the loss gap compares each with unseen examples of its class; raise "
                "holdout_fraction)"
            )
    return forget_idx, retain_idx


def _check_guidance_model(
    values: Mapping[str, Any], train_values: Mapping[str, Any], forget_set: example_sets.ExampleSet
) -> None:
    """Refuses the guidance term (``guidance_weight > 0``) for a model that is not a VAE, or for a forget set of
    examples (the uniformity term pushes samples off the forget *classes*; examples spread over every class have
    none, and the term would push toward every class at once)."""
    if values["guidance_weight"] > 0 and not forget_set.is_classes:
        raise UnlearnConfigError(
            f"config.guidance_weight={values['guidance_weight']!r} needs forget classes (the guidance term moves "
            f"samples off classes), not config.forget={values['forget']!r}; allowed for a forget set of examples: 0"
        )
    if values["guidance_weight"] > 0 and train_values["model"] not in models.VAE_MODELS:
        raise UnlearnConfigError(
            f"config.guidance_weight={values['guidance_weight']!r} is VAE-only (the uniformity term decodes "
            f"latents); allowed for model {train_values['model']!r}: 0"
        )


def _methods_for_model(
    names: tuple[str, ...], values: Mapping[str, Any], train_values: Mapping[str, Any]
) -> tuple[str, ...]:
    """The methods to run on this model: a method whose loss needs class labels (``salun``) is refused for a model
    that takes none, or left out of ``methods='all'``."""
    family = families.family_of(train_values["model"])
    conditional = family.name == "ddpm" and bool(train_values["class_conditional"])
    if conditional:
        return names
    if [token.strip() for token in values["methods"].split(",") if token.strip()] == ["all"]:
        return tuple(name for name in names if not METHODS[name].class_conditional)
    for name in names:
        if METHODS[name].class_conditional:
            raise UnlearnConfigError(
                f"config.methods: {name!r} needs a class-conditional DDPM (its loss relabels the forget examples), "
                f"but model {train_values['model']!r} is "
                f"{'an unconditional DDPM' if family.name == 'ddpm' else 'a VAE'}; allowed: any method but "
                f"{', '.join(sorted(n for n, m in METHODS.items() if m.class_conditional))}"
            )
    return names


def _classifier_source(
    values: Mapping[str, Any], model_dir: pathlib.Path, train_dir: pathlib.Path
) -> tuple[pathlib.Path, tuple[str, ...]]:
    """``(train workdir, roles to train there)`` of the classifiers: the evaluator always, the guidance classifier
    when guided."""
    classifier_roles = ("evaluator", "guidance") if values["guidance_weight"] > 0 else ("evaluator",)
    if not values["checkpoint"]:
        # Everything trains into one train.py workdir (train_and_evaluate resumes or skips what is finished).
        return model_dir, classifier_roles
    if all(_checkpoint_metadata(model_dir, role) is not None for role in classifier_roles):
        return model_dir, ()
    # A given checkpoint without its classifiers: train them with its config into the train dir, never
    # writing into the user's checkpoint.
    return train_dir / "classifiers", classifier_roles


def _oracle_source(
    values: Mapping[str, Any],
    train_values: Mapping[str, Any],
    forget_set: example_sets.ExampleSet,
    forget_record: Mapping[str, Any],
    train_dir: pathlib.Path,
) -> tuple[pathlib.Path, dict[str, Any], bool]:
    """``(train workdir, train config, whether to train it)`` of the oracle: ``config.oracle_checkpoint`` (refused
    unless trained without exactly the forget set) or ``<train_dir>/oracle``."""
    forget_classes = forget_set.classes
    if forget_set.is_classes:
        oracle_values = dict(train_values, exclude_classes=",".join(str(c) for c in forget_classes), roles="generative")
    else:
        oracle_values = dict(train_values, exclude_classes="", exclude=forget_set.spec, roles="generative")
    oracle_values = parse_train_config(oracle_values, field="train")
    if not values["oracle_checkpoint"]:
        # One cached oracle per example set (named by the examples' fingerprint), so that forgetting examples
        # never collides with the class oracle or another set's in the same train_dir.
        name = "oracle" if forget_set.is_classes else f"oracle_examples_{forget_record['examples_fingerprint'][:12]}"
        return train_dir / name, oracle_values, True
    oracle_dir = pathlib.Path(values["oracle_checkpoint"]).expanduser().absolute()
    saved_oracle = _finished_checkpoint_config(oracle_dir, field="oracle_checkpoint")
    saved_set = example_sets.combined_example_set(
        saved_oracle, field="exclude", classes_field="exclude_classes", default_classes=""
    )
    if forget_set.is_classes and (saved_set is None or saved_set.is_classes):
        saved_excluded = tuple(sorted(saved_set.classes if saved_set else ()))
        if saved_excluded != tuple(sorted(forget_classes)):
            raise UnlearnConfigError(
                f"config.oracle_checkpoint={str(oracle_dir)!r} was trained without classes "
                f"{list(saved_excluded)}, not the forget classes {list(forget_classes)}; allowed: an "
                "oracle trained with exclude_classes equal to forget_classes"
            )
    else:
        _check_oracle_examples(oracle_dir, forget_record, saved_set)
    return oracle_dir, dict(saved_oracle, mesh=values["mesh"], distributed=values["distributed"]), False


def _check_oracle_examples(
    oracle_dir: pathlib.Path, forget_record: Mapping[str, Any], saved_set: example_sets.ExampleSet | None
) -> None:
    """Refuses an oracle whose checkpoint does not record leaving out exactly the forget examples (compared by
    count and fingerprint of the examples themselves: the same spec on other data or another seed differs)."""
    saved = (_checkpoint_metadata(oracle_dir, "generative") or {}).get("excluded") or {}
    same = saved.get("count") == forget_record["count"] and (
        saved.get("examples_fingerprint") == forget_record["examples_fingerprint"]
    )
    if not same:
        if saved:
            left_out = f"{saved['count']} examples ({saved['spec']})"
        else:  # a checkpoint of older code records classes only
            left_out = f"the examples of {saved_set.spec}" if saved_set else "nothing left out"
        raise UnlearnConfigError(
            f"config.oracle_checkpoint={str(oracle_dir)!r} was trained without {left_out}, not the "
            f"{forget_record['count']} forget examples ({forget_record['spec']}); allowed: an oracle trained by "
            f"train.py with exclude={forget_record['spec']!r} on the same data and seed"
        )


# ------------------------------------------------------------------------------------------- the models


def train_missing_models(plan: RunPlan) -> dict[str, Any]:
    """Imports a foreign original model (once), then trains (or resumes, or finds finished) every model the plan
    needs, with train.py's own code."""
    started = time.perf_counter()
    trained = {}
    if plan.imported is not None:
        trained["imported"] = import_checkpoint(plan.imported)
        parallel.barrier("train_missing_models:imported")
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


def load_model(plan: RunPlan, workdir: pathlib.Path, role: str) -> training.TrainedModel:
    """A trained role, restored through the run's mesh (every process reads its shards) into this process's copy."""
    model = training.load_trained(workdir, role, mesh=plan.mesh)
    return model if plan.mesh is None else model._replace(params=parallel.localize(model.params))
