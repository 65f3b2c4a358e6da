r"""An original model that ``train.py`` did not write: ``config.checkpoint`` naming a plain orbax checkpoint of the
parameters of a registry model, e.g. ``ocp.StandardCheckpointer().save(path, nnx.state(model))`` for a model of
:func:`gsu_jax.models.build_model`. Such a checkpoint records no model, kwargs or data, so ``config.train`` states
them: the model is the one ``config.train`` builds, trained on the data split ``config.train`` describes.

* :func:`plan_import` (at plan time, before any work) refuses a checkpoint whose tree, shapes or dtypes differ from
  the parameters of that model, reading orbax's metadata only. When ``<train_dir>/model`` already holds an import,
  the checkpoint is restored once to compare its parameter digest with the imported one: the same parameters are
  reused (resumption), other ones are refused rather than mixed with results computed from the first.
* :func:`import_checkpoint` (at execution) writes the parameters once into ``<train_dir>/model`` as a finished
  ``train.py``-format ``generative`` checkpoint, through :class:`~gsu_jax.checkpointing.Checkpointer` (the one way
  checkpoints are written here), so that loading, the classifiers and oracle trained from ``config.train``, the
  report and resumption treat it exactly like a trained model. Its metadata's ``imported`` names the source path
  and the parameter digest; the digest is part of its ``identity`` too, so a run that would *train* the original
  model into the same ``train_dir`` refuses it instead of taking it for its own.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from gsu_jax import checkpointing, provenance, training
from gsu_jax.schema import ConfigError
from gsu_jax.training.plan import RolePlan, plan_role
from gsu_jax.training.role import checkpoint_metadata
from gsu_jax.training.role_checkpoints import checkpoint_dir
from gsu_jax.unlearning.errors import UnlearnConfigError

__all__ = ["ForeignImport", "import_checkpoint", "is_orbax_checkpoint", "plan_import"]

# Files orbax writes at the top of a checkpoint it saved (older versions write only the second).
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")
# The allowed value, in every refusal of this module.
_ALLOWED = (
    "allowed: a train.py workdir, or an orbax checkpoint of nnx.state(model) of the model config.train builds "
    "(set config.train.model, .latent_dim and .model_kwargs to the saved model's)"
)


@dataclasses.dataclass(frozen=True)
class ForeignImport:
    """A validated foreign checkpoint (from :func:`plan_import`); :func:`import_checkpoint` writes it.

    Attributes:
        source: the orbax checkpoint (``config.checkpoint``), absolute.
        model_dir: the train workdir it is imported into (``<train_dir>/model``).
        role_plan: the ``generative`` role of ``config.train``: the model, its kwargs and its data.
        metadata: what ``train.py`` would record for that role (:func:`~gsu_jax.training.role.checkpoint_metadata`).
        max_to_keep: ``config.train.max_to_keep``.
    """

    source: pathlib.Path
    model_dir: pathlib.Path
    role_plan: RolePlan
    metadata: dict[str, Any]
    max_to_keep: int


def is_orbax_checkpoint(path: pathlib.Path) -> bool:
    """Whether ``path`` is a directory orbax saved a checkpoint into (not a train.py workdir, whose checkpoints sit
    in ``<role>/checkpoints/<step>``)."""
    return path.is_dir() and any((path / marker).is_file() for marker in _ORBAX_MARKERS)


def plan_import(
    source: pathlib.Path,
    train_values: Mapping[str, Any],
    run_data: training.RunData,
    model_dir: pathlib.Path,
    saved: Mapping[str, Any] | None,
) -> ForeignImport:
    """Validates the foreign checkpoint ``source`` against the model of ``train_values``; ``saved`` is the metadata
    of the generative checkpoint already in ``model_dir`` (``None``: nothing imported yet). Writes nothing.

    Raises:
        UnlearnConfigError: one line naming the checkpoint, the first mismatching leaf with both shapes, or the
            earlier import it differs from.
    """
    try:
        role_plan = plan_role("generative", train_values, run_data)
    except ConfigError as err:
        raise UnlearnConfigError(str(err).replace("config.", "config.train.", 1)) from err
    abstract = _abstract_params(role_plan)
    _check_tree(source, abstract, role_plan)
    if saved is not None:
        _check_earlier_import(source, abstract, role_plan, model_dir, saved)
    return ForeignImport(
        source=source,
        model_dir=model_dir,
        role_plan=role_plan,
        metadata=checkpoint_metadata(role_plan, train_values, run_data),
        max_to_keep=train_values["max_to_keep"],
    )


def import_checkpoint(foreign: ForeignImport) -> dict[str, Any]:
    """Writes the foreign parameters into ``<model_dir>/generative`` as a finished train.py checkpoint, unless the
    import is there already (:func:`plan_import` checked it holds these parameters).

    Returns:
        The ``imported`` record (``from``, ``params_digest``) with ``reused``: whether an earlier import was kept.
    """
    with checkpointing.Checkpointer(
        checkpoint_dir(foreign.model_dir / "generative"), max_to_keep=foreign.max_to_keep
    ) as ckpt:
        if ckpt.latest_step() is not None:
            return {**ckpt.read_metadata()["imported"], "reused": True}
        params = _restore(foreign.source, _abstract_params(foreign.role_plan))
        digest = checkpointing.state_digest(params)
        imported = {"from": str(foreign.source), "params_digest": digest}
        # Step 0, epoch 0, no history: nothing was trained here; "finished" lets load_trained read it as a model.
        metadata = {
            **foreign.metadata,
            "identity": _identity(foreign.role_plan, digest),
            "epoch": 0,
            "finished": True,
            "history": [],
            "nonfinite_steps": 0,
            "consecutive_nonfinite": 0,
            "imported": imported,
        }
        ckpt.save(0, params, metadata=metadata)
    return {**imported, "reused": False}


def _abstract_params(role_plan: RolePlan) -> Any:
    """The restore target of the model's parameters: the state of ``nnx.split(model)``, as train.py saves it."""
    _, state = nnx.split(nnx.eval_shape(lambda: role_plan.spec.build(jax.random.key(0))))
    return checkpointing.abstract_like(state)


def _identity(role_plan: RolePlan, digest: str) -> dict[str, Any]:
    """The import's checkpoint identity: train.py's for the role, plus the digest of the imported parameters."""
    return {**role_plan.identity, "imported_params_digest": digest}


def _describe(role_plan: RolePlan) -> str:
    kwargs = ", ".join(f"{key}={value!r}" for key, value in role_plan.spec.model_kwargs)
    return f"{role_plan.spec.model_name}({kwargs})"


def _check_tree(source: pathlib.Path, abstract: Any, role_plan: RolePlan) -> None:
    """Refuses a checkpoint whose leaves (paths, shapes, dtypes) differ from the model's, from orbax's metadata."""
    shown = f"config.checkpoint={str(source)!r}"
    try:
        found = checkpointing.orbax_leaf_shapes(source)
    except Exception as err:  # orbax raises assorted types for a directory it cannot read
        raise UnlearnConfigError(
            f"{shown} is not readable by orbax ({type(err).__name__}: {checkpointing.first_line(err)}); {_ALLOWED}"
        ) from err
    expected = checkpointing.leaf_shapes(abstract)
    model = _describe(role_plan)
    for path, (shape, dtype) in expected.items():
        if path not in found:
            raise UnlearnConfigError(f"{shown} has no leaf {path!r} ({_shape(shape, dtype)} in {model}); {_ALLOWED}")
        if found[path] != (shape, dtype):
            raise UnlearnConfigError(
                f"{shown}: leaf {path!r} is {_shape(*found[path])}, {model} has {_shape(shape, dtype)}; {_ALLOWED}"
            )
    extra = [path for path in found if path not in expected]
    if extra:
        raise UnlearnConfigError(
            f"{shown} has leaf {extra[0]!r} ({_shape(*found[extra[0]])}), which {model} lacks "
            f"({len(extra)} such leaves); {_ALLOWED}"
        )


def _check_earlier_import(
    source: pathlib.Path, abstract: Any, role_plan: RolePlan, model_dir: pathlib.Path, saved: Mapping[str, Any]
) -> None:
    """Refuses to reuse ``model_dir``'s generative checkpoint unless it was imported from these very parameters
    under the same ``config.train``."""
    shown = f"config.checkpoint={str(source)!r}"
    remedy = f"allowed: another config.train_dir (or delete {str(model_dir / 'generative')!r})"
    earlier = saved.get("imported")
    if earlier is None:
        raise UnlearnConfigError(
            f"{shown} is to be imported into {str(model_dir)!r}, which holds a generative model trained by "
            f"train.py; {remedy}"
        )
    digest = checkpointing.state_digest(_restore(source, abstract))
    if digest != earlier["params_digest"]:
        raise UnlearnConfigError(
            f"{shown} holds other parameters (digest {digest[:12]}...) than those imported into {str(model_dir)!r} "
            f"from {earlier['from']!r} (digest {earlier['params_digest'][:12]}...); {remedy}"
        )
    differences = provenance.differences(saved.get("identity", {}), _identity(role_plan, digest))
    if saved.get("train_fingerprint") != role_plan.train_fingerprint:
        differences.append("training data: fingerprint differs")
    if differences:
        raise UnlearnConfigError(
            f"{shown} was imported into {str(model_dir)!r} under another config.train ({differences[0]}); {remedy}"
        )


def _restore(source: pathlib.Path, abstract: Any) -> Any:
    try:
        return checkpointing.restore_orbax_tree(source, abstract)
    except Exception as err:  # orbax/tensorstore raise assorted types for damaged arrays
        raise UnlearnConfigError(
            f"config.checkpoint={str(source)!r}: its arrays cannot be restored "
            f"({type(err).__name__}: {checkpointing.first_line(err)}); allowed: an intact orbax checkpoint"
        ) from err


def _shape(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{tuple(shape)} {dtype}"
