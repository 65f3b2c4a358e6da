"""The examples of a training run: ``config.data`` loaded and split into what each role trains on and the held-out data.

:func:`prepare_data` is the one place that decides which examples a role sees (see the split in the package
docstring, :mod:`gsu_jax.training`); the unlearning side calls it too, to draw forget/retain batches from the very
examples a model trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gsu_jax import data as data_lib
from gsu_jax import data_splits, example_sets
from gsu_jax.config_validation import validate_train_config
from gsu_jax.schema import ConfigError

__all__ = ["RunData", "prepare_data"]


@dataclasses.dataclass(frozen=True)
class RunData:
    """The exact examples each role trains and is evaluated on (see the package docstring, :mod:`gsu_jax.training`).

    Attributes:
        train: the training data (every class).
        heldout: the held-out data (every class).
        generative: what the generative role trains on (``train`` minus ``exclude`` / ``exclude_classes``).
        evaluator: what the evaluator trains on.
        guidance: what the guidance classifier trains on.
        source_fingerprint: fingerprint of ``config.data`` as loaded (before any split).
        excluded_classes: the classes left out of ``generative`` (``()`` when ``exclude`` names examples).
        excluded: what the checkpoints record of the examples left out (:func:`gsu_jax.example_sets.
            selection_record`), ``None`` when none is.
    """

    train: data_lib.ImageDataset
    heldout: data_lib.ImageDataset
    generative: data_lib.ImageDataset
    evaluator: data_lib.ImageDataset
    guidance: data_lib.ImageDataset
    source_fingerprint: str
    excluded_classes: tuple[int, ...]
    excluded: dict[str, Any] | None = None

    def for_role(self, role: str) -> data_lib.ImageDataset:
        """The training examples of ``role``."""
        return getattr(self, role)


def _load(spec: str, field: str, data_dir: str) -> data_lib.ImageDataset:
    try:
        return data_lib.load_dataset(spec, data_dir=data_dir or None)
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise ConfigError(f"config.{field}={spec!r} cannot be loaded: {err}") from err


def _check_compatible(reference: data_lib.ImageDataset, other: data_lib.ImageDataset, field: str) -> None:
    if other.image_shape != reference.image_shape or other.num_classes != reference.num_classes:
        raise ConfigError(
            f"config.{field}={other.name!r} has images {other.image_shape} with {other.num_classes} classes but "
            f"config.data={reference.name!r} has {reference.image_shape} with {reference.num_classes}; "
            "they must match"
        )


def prepare_data(config: Any) -> RunData:
    """Loads and splits the data of a train config exactly as :func:`train_and_evaluate` does.

    The unlearning side uses it to draw forget/retain batches from the very examples a model trained on (compare
    ``fingerprint()`` with the checkpoint's ``train_fingerprint``) and held-out examples it never saw.

    Raises:
        ConfigError: an invalid config, data that cannot be loaded, held-out or evaluator data whose image shape
            or class count differs from ``config.data``, an excluded class absent from the data or excluding
            every class, or a split that leaves a side empty.
    """
    values = validate_train_config(config)
    source = _load(values["data"], "data", values["data_dir"])
    seed = values["seed"]
    if values["eval_data"]:
        heldout = _load(values["eval_data"], "eval_data", values["data_dir"])
        _check_compatible(source, heldout, "eval_data")
        train = source
    else:
        try:
            train, heldout = data_splits.train_test_split(source, test_fraction=values["holdout_fraction"], seed=seed)
        except ValueError as err:
            raise ConfigError(f"config.holdout_fraction={values['holdout_fraction']!r}: {err}") from err

    excluded_set = example_sets.combined_example_set(
        values, field="exclude", classes_field="exclude_classes", default_classes=""
    )
    excluded, excluded_record, generative = (), None, train
    if excluded_set is not None:
        field, shown = example_sets.spec_field(values, field="exclude", classes_field="exclude_classes")
        left_out, kept = example_sets.select_examples(
            excluded_set, train.labels, seed=seed, field=field, shown=shown, num_classes=train.num_classes
        )
        excluded = excluded_set.classes
        excluded_record = example_sets.selection_record(excluded_set, train, left_out)
        generative = train.subset(kept)

    if values["evaluator_data"]:
        evaluator = _load(values["evaluator_data"], "evaluator_data", values["data_dir"])
        _check_compatible(source, evaluator, "evaluator_data")
        guidance = train
    else:
        try:
            guidance_idx, evaluator_idx = data_splits.stratified_split(
                train.labels, test_fraction=values["evaluator_fraction"], seed=seed
            )
        except ValueError as err:
            raise ConfigError(f"config.evaluator_fraction={values['evaluator_fraction']!r}: {err}") from err
        evaluator, guidance = train.subset(evaluator_idx), train.subset(guidance_idx)
    return RunData(
        train=train,
        heldout=heldout,
        generative=generative,
        evaluator=evaluator,
        guidance=guidance,
        source_fingerprint=source.fingerprint(),
        excluded_classes=excluded,
        excluded=excluded_record,
    )
