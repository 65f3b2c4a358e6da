"""A role's plan: its model and hyperparameters (:class:`~gsu_jax.training.programs.ProgramSpec`), its data, its
PRNG key and the config fields that identify its checkpoints, all fixed before anything trains.

Every key of a role derives from ``(seed, role)`` (:func:`role_key`) and one of the independent streams below, and
the training stream from the epoch too, so that a resumed run draws exactly the keys of the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from gsu_jax import data as data_lib
from gsu_jax import generative as families
from gsu_jax.config_validation import ROLES, fields_in_scope
from gsu_jax.schema import ConfigError
from gsu_jax.training.programs import ProgramSpec
from gsu_jax.training.run_data import RunData

__all__ = [
    "EVAL_STREAM",
    "INIT_STREAM",
    "SAMPLE_STREAM",
    "TRAIN_STREAM",
    "RolePlan",
    "batch_fields",
    "plan_role",
    "role_key",
]

# Each role folds its index into the seed: distinct keys for distinct roles.
_ROLE_INDEX = {role: index for index, role in enumerate(ROLES)}
# Independent key streams of one role, folded into its key.
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM, SAMPLE_STREAM = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class RolePlan:
    """Everything that determines one role's training run."""

    role: str
    spec: ProgramSpec
    train: data_lib.ImageDataset
    heldout: data_lib.ImageDataset
    key: jax.Array
    identity: dict[str, Any]
    train_fingerprint: str

    @property
    def generative(self) -> bool:
        return self.spec.generative

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.spec.model_kwargs)


def role_key(seed: int, role: str) -> jax.Array:
    """The key every key of ``role`` derives from."""
    return jax.random.fold_in(jax.random.key(seed), _ROLE_INDEX[role])


def plan_role(role: str, values: Mapping[str, Any], run_data: RunData) -> RolePlan:
    """The plan of ``role`` under the validated config ``values``; builds its model abstractly to refuse, as a
    :class:`ConfigError`, a batch larger than its data or model kwargs that do not fit the data's images."""
    train = run_data.for_role(role)
    generative = role == "generative"
    family = families.family_of(values["model"])
    if generative:
        model_field, kwargs_field, prefix = "model", "model_kwargs", ""
        kwargs = family.model_kwargs(values, train.image_shape, train.num_classes)
    else:
        model_field, kwargs_field, prefix = "classifier", "classifier_kwargs", "classifier_"
        kwargs = {**values["classifier_kwargs"], "image_shape": train.image_shape, "num_classes": train.num_classes}
    batch_size = values[f"{prefix}batch_size"]
    if batch_size > len(train):
        raise ConfigError(
            f"config.{prefix}batch_size={batch_size} exceeds the {len(train)} training examples of "
            f"the {role} role; allowed: 1..{len(train)}"
        )
    spec = ProgramSpec(
        model_name=values[model_field],
        model_kwargs=tuple(sorted(kwargs.items())),
        generative=generative,
        family_settings=tuple(sorted(families.settings_of(family, values).items())) if generative else (),
        learning_rate=values[f"{prefix}learning_rate"],
        weight_decay=0.0 if generative else values["classifier_weight_decay"],
        num_epochs=values[f"{prefix}num_epochs"],
        num_batches=len(train) // batch_size,
        batch_size=batch_size,
        augment_shift=0 if generative else values["classifier_augment_shift"],
    )
    try:
        nnx.eval_shape(lambda: spec.build(jax.random.key(0)))
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"config.{kwargs_field}={values[kwargs_field]!r} with config.{model_field}="
            f"{spec.model_name!r} cannot build a model for images {train.image_shape} (the images of "
            f"{train.name!r}): {err}"
        ) from err
    return RolePlan(
        role=role,
        spec=spec,
        train=train,
        heldout=run_data.heldout,
        key=role_key(values["seed"], role),
        # Fields only another family reads never change this model (old workdirs stay resumable).
        identity={
            field: values[field]
            for field in fields_in_scope(role)
            if field not in families.other_families_fields(family)
        },
        train_fingerprint=train.fingerprint(),
    )


def batch_fields(plans: list[RolePlan]) -> list[str]:
    """The config fields holding the batch sizes of ``plans``' roles (each once, in role order)."""
    fields = ["batch_size" if plan.generative else "classifier_batch_size" for plan in plans]
    return list(dict.fromkeys(fields))
