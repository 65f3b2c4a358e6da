"""Loading a trained role from a train workdir: :func:`load_trained` and the :class:`TrainedModel` it returns.

The unlearning side's way in: it reads a role's finished checkpoint (verified bit for bit by
:mod:`gsu_jax.checkpointing`), rebuilds the model from the checkpoint's own metadata, and never needs the config
or the data the role was trained with.
"""

from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from gsu_jax import models, parallel
from gsu_jax.checkpointing import Checkpointer, CheckpointMismatchError, CheckpointNotFoundError, abstract_like
from gsu_jax.config_validation import ROLES
from gsu_jax.training.role_checkpoints import checkpoint_dir, on_shardings

__all__ = ["TrainedModel", "load_trained"]


class TrainedModel(NamedTuple):
    """A trained role, loaded by :func:`load_trained`.

    Attributes:
        graphdef: the model's ``nnx.GraphDef``.
        params: its parameters (``nnx.State``); ``nnx.merge(graphdef, params)`` rebuilds the module.
        config: the (validated) config it was trained with, as a ``ConfigDict``.
        metadata: the checkpoint's JSON metadata (role, model, model_kwargs, data fingerprints, step, history,
            package versions, ...).
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    config: ml_collections.ConfigDict
    metadata: dict[str, Any]


def load_trained(workdir: str | pathlib.Path, role: str, *, mesh: jax.sharding.Mesh | None = None) -> TrainedModel:
    """Loads the finished model of ``role`` from a train workdir (the latest checkpoint, verified bit for bit).

    Args:
        workdir: a directory written by :func:`train_and_evaluate` / ``train.py``.
        role: ``"generative"``, ``"evaluator"`` or ``"guidance"``.
        mesh: restore the parameters onto this mesh (:func:`gsu_jax.parallel.param_shardings`), whatever the
            device count that saved them; ``None``: onto the default device.

    Returns:
        :class:`TrainedModel` ``(graphdef, params, config, metadata)``.

    Raises:
        ValueError: an unknown role.
        CheckpointNotFoundError: no checkpoint of that role, or its training has not finished (the message says
            how to finish it).
        CheckpointCorruptError: the checkpoint cannot be read back intact.

    Example:
        >>> evaluator = load_trained("runs/mnist_vae", "evaluator")  # doctest: +SKIP
        >>> logits = models.classifier_logits(evaluator.graphdef, evaluator.params, images)  # doctest: +SKIP
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    directory = checkpoint_dir(pathlib.Path(workdir).expanduser().absolute() / role)
    hint = f"train it with: python train.py --config <config> --workdir {workdir}"
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no trained {role} model in workdir {str(workdir)!r}; {hint}")
    with Checkpointer(directory, create=False) as ckpt:
        if ckpt.latest_step() is None:
            raise CheckpointNotFoundError(f"no complete {role} checkpoint in {str(directory)!r}; {hint}")
        metadata = ckpt.read_metadata()
        if metadata.get("role") != role:
            raise CheckpointMismatchError(
                f"{str(directory)!r} holds a {metadata.get('role')!r} checkpoint, not a {role!r} one"
            )
        if not metadata.get("finished"):
            raise CheckpointNotFoundError(
                f"the {role} model in {str(workdir)!r} is not finished (epoch {metadata.get('epoch')} of "
                f"{metadata.get('num_epochs')}); re-run the same train.py command to resume it"
            )
        kwargs = dict(metadata["model_kwargs"])
        kwargs["image_shape"] = tuple(kwargs["image_shape"])
        abstract_model = nnx.eval_shape(lambda: models.build_model(metadata["model"], rngs=nnx.Rngs(0), **kwargs))
        graphdef, abstract_params = nnx.split(abstract_model)
        abstract_params = abstract_like(abstract_params)
        if mesh is not None:
            abstract_params = on_shardings(abstract_params, parallel.param_shardings(abstract_params, mesh))
        params, _, metadata = ckpt.restore(metadata["step"], abstract_params=abstract_params)
    return TrainedModel(graphdef, params, ml_collections.ConfigDict(metadata["config"]), metadata)
