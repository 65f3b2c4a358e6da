"""The syntax of a set of training examples to forget (``unlearn.py --config.forget=``) or to leave out of the
oracle's training (``train.py --config.exclude=``): one parser and one selection for both entry points, so that an
oracle trained with ``exclude=S`` leaves out exactly the examples ``forget=S`` unlearns on the same data and seed.

Forms (:data:`FORMS`):

* ``classes:1,7``: every training example of these classes (what ``forget_classes`` / ``exclude_classes``, the
  shorthands, say);
* ``fraction:0.01``: ``round(0.01 * N)`` of the ``N`` training examples, drawn uniformly without replacement with
  the train config's ``seed`` (the data seed: the same config always draws the same set);
* ``indices:<file>``: exactly these positions in the training split (after the held-out split), one per line
  (:func:`gsu_jax.data_splits.load_indices_file`: text or ``.npy``).

Every refusal is a one-line :class:`~gsu_jax.schema.ConfigError` naming the field, the value and what is allowed.
The selection is recorded (:func:`selection_record`) with a fingerprint of the selected examples themselves, so
that ``unlearn.py`` can refuse an oracle that left out other examples whatever spec produced them.

Example:
    >>> parse_example_set("fraction:0.01", field="forget")
    ExampleSet(kind='fraction', classes=(), fraction=0.01, path=None)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from gsu_jax import data_splits
from gsu_jax.config_validation import parse_class_list
from gsu_jax.data import ImageDataset
from gsu_jax.schema import ConfigError

__all__ = [
    "FORMS",
    "ExampleSet",
    "combined_example_set",
    "parse_example_set",
    "select_examples",
    "selection_record",
    "spec_field",
]

FORMS = (
    "'classes:<c>[,<c>...]' (e.g. 'classes:1,7'), 'fraction:<f in (0, 1)>' (e.g. 'fraction:0.01') or 'indices:<file>'"
)
_KINDS = ("classes", "fraction", "indices")


@dataclasses.dataclass(frozen=True)
class ExampleSet:
    """A parsed example-set spec; ``path`` is absolute (an oracle trained elsewhere reads the same file)."""

    kind: str
    classes: tuple[int, ...] = ()
    fraction: float | None = None
    path: str | None = None

    @property
    def is_classes(self) -> bool:
        """Whole classes: the class-level protocol (forget fraction of generated samples) applies."""
        return self.kind == "classes"

    @property
    def spec(self) -> str:
        """The canonical spec string (what a train config's ``exclude`` receives from ``unlearn.py``)."""
        if self.kind == "classes":
            return "classes:" + ",".join(str(c) for c in self.classes)
        if self.kind == "fraction":
            return f"fraction:{self.fraction!r}"
        return f"indices:{self.path}"


def _refuse(field: str, value: str, why: str) -> ConfigError:
    return ConfigError(f"config.{field}={value!r} is invalid: {why}; allowed: '' or {FORMS}")


def parse_example_set(value: Any, *, field: str) -> ExampleSet | None:
    """Parses ``config.<field>`` (``''`` -> ``None``: the shorthand decides). The syntax only: an ``indices`` file is
    read by :func:`select_examples` (still before any work), so that a checkpoint's recorded config stays valid
    where its file has since moved."""
    if not isinstance(value, str):
        raise _refuse(field, repr(value), "not a string")
    if not value.strip():
        return None
    kind, sep, rest = value.strip().partition(":")
    kind, rest = kind.strip(), rest.strip()
    if not sep:
        raise _refuse(field, value, "no ':' between the kind of set and what it names")
    if kind not in _KINDS:
        raise _refuse(field, value, f"{kind!r} is not a kind of set ({', '.join(_KINDS)})")
    if not rest:
        raise _refuse(field, value, f"'{kind}:' names nothing")
    if kind == "classes":
        try:
            return ExampleSet("classes", classes=parse_class_list(rest, field=field))
        except ConfigError as err:
            raise _refuse(field, value, str(err).split(" is invalid: ", 1)[-1].split("; allowed")[0]) from err
    if kind == "fraction":
        try:
            fraction = float(rest)
        except ValueError:
            raise _refuse(field, value, f"{rest!r} is not a number") from None
        if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise _refuse(field, value, f"the fraction {rest} is not strictly between 0 and 1")
        return ExampleSet("fraction", fraction=fraction)
    try:
        path = pathlib.Path(rest).expanduser().absolute()
    except RuntimeError as err:  # '~user/...' of an unknown user
        raise _refuse(field, value, str(err)) from err
    return ExampleSet("indices", path=str(path))


def combined_example_set(
    values: Mapping[str, Any], *, field: str, classes_field: str, default_classes: str
) -> ExampleSet | None:
    """The set named by ``config.<field>`` and its shorthand ``config.<classes_field>`` together.

    ``<field>`` empty means ``classes:<classes_field>`` (``None`` when that is empty too). Both given is refused
    unless ``<classes_field>`` is at its default or names the same classes: a silent precedence would train or
    forget another set than one of the two flags says.
    """
    chosen = parse_example_set(values.get(field, ""), field=field)
    shorthand = values[classes_field]
    classes = parse_class_list(shorthand, field=classes_field)
    if chosen is None:
        return ExampleSet("classes", classes=classes) if classes else None
    same = chosen.is_classes and sorted(chosen.classes) == sorted(classes)
    if shorthand.strip() not in ("", default_classes) and not same:
        raise ConfigError(
            f"config.{field}={values[field]!r} and config.{classes_field}={shorthand!r} both name the set; "
            f"allowed: one of them ({classes_field} is the shorthand for {field}='classes:<list>')"
        )
    return chosen


def spec_field(values: Mapping[str, Any], *, field: str, classes_field: str) -> tuple[str, str]:
    """``(name, value)`` of the config field that named the set: ``field`` when given, else its shorthand (what
    every refusal quotes back)."""
    name = field if str(values.get(field, "")).strip() else classes_field
    return name, values[name]


def select_examples(
    example_set: ExampleSet, labels: np.ndarray, *, seed: int, field: str, shown: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(selected, rest)``: sorted, disjoint positions in the training split (see
    :func:`gsu_jax.data_splits.select_forget_retain`); ``seed`` draws a ``fraction`` (the train config's seed).
    ``field`` and ``shown`` name the config field and the value the user gave (:func:`spec_field`), for refusals.

    Raises:
        ConfigError: a class outside ``0..num_classes-1`` or absent from the data, out-of-range or repeated
            indices, a set that is empty or all the data; naming ``config.<field>``.
    """
    if example_set.is_classes:
        out_of_range = [c for c in example_set.classes if c >= num_classes]
        if out_of_range:
            raise ConfigError(
                f"config.{field}={shown!r} names class {out_of_range[0]}; allowed: classes 0..{num_classes - 1} of "
                "the data"
            )
    try:
        if example_set.kind == "classes":
            return data_splits.select_forget_retain(labels, classes=list(example_set.classes))
        if example_set.kind == "fraction":
            return data_splits.select_forget_retain(labels, fraction=example_set.fraction, seed=seed)
        if not pathlib.Path(example_set.path).is_file():
            raise ConfigError(f"config.{field}={example_set.spec!r}: the indices file does not exist; allowed: {FORMS}")
        indices = data_splits.load_indices_file(example_set.path)
        return data_splits.select_forget_retain(labels, indices=indices)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as err:
        if example_set.is_classes:
            raise ConfigError(f"config.{field}={shown!r}: {err}") from err
        raise ConfigError(
            f"config.{field}={example_set.spec!r} selects no valid set of {len(labels)} training examples: {err}"
        ) from err


def selection_record(example_set: ExampleSet, train: ImageDataset, selected: np.ndarray) -> dict[str, Any]:
    """What a checkpoint and a report record of a selection: the spec, its kind, how many examples, and the
    fingerprint of the selected examples themselves (equal iff the same examples, whatever spec chose them)."""
    return {
        "spec": example_set.spec,
        "kind": example_set.kind,
        "count": int(selected.size),
        "examples_fingerprint": train.subset(selected).fingerprint(),
    }
