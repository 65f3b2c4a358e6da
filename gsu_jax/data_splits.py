"""Seeded splits of a dataset and the forget/retain selection: which examples train, evaluate, are forgotten.

:func:`stratified_split` and :func:`train_test_split` hold out a seeded, class-stratified share;
:func:`select_forget_retain` returns sorted, disjoint, covering ``int64`` index arrays of the forget and the retain
set, by class list, by explicit indices (e.g. from :func:`load_indices_file`) or by a seeded fraction.

Example:
    >>> from gsu_jax import data, data_splits
    >>> digits = data.load_dataset("embedded")
    >>> train, held_out = data_splits.train_test_split(digits, test_fraction=0.1, seed=0)
    >>> forget_idx, retain_idx = data_splits.select_forget_retain(train.labels, classes=[1])
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from gsu_jax.data import ImageDataset, index_array, short_listing

__all__ = ["load_indices_file", "select_forget_retain", "stratified_split", "train_test_split"]


# --------------------------------------------------------------------------------------------- splits


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return int(seed)


def _check_fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")
    return float(value)


def _label_array(labels: object) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"labels must hold integers, got dtype {array.dtype}")
    return array


def stratified_split(
    labels: Sequence[int] | np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of positions ``0..N-1`` into ``(train_idx, test_idx)``.

    Each class c with n_c examples contributes ``round(test_fraction * n_c)`` (halves rounded up) examples to the
    test side, drawn uniformly at random with ``numpy.random.default_rng(seed)``; the rest go to the train side.

    Args:
        labels: ``int[N]`` class labels.
        test_fraction: share of each class held out, strictly between 0 and 1.
        seed: non-negative int; the same seed and labels always give the same split.

    Returns:
        ``(train_idx, test_idx)``: sorted, disjoint ``int64`` arrays whose union is ``0..N-1``.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1), or a split side that would be empty.
    """
    labels = _label_array(labels)
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    rng = np.random.default_rng(_check_seed(seed))
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        num_test = int(np.floor(test_fraction * members.size + 0.5))
        test_parts.append(rng.permutation(members)[:num_test])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    if test_idx.size == 0 or test_idx.size == labels.size:
        raise ValueError(
            f"test_fraction={test_fraction} of {labels.size} examples leaves "
            f"{'no test' if test_idx.size == 0 else 'no training'} examples; choose a fraction that keeps both"
        )
    train_idx = np.setdiff1d(np.arange(labels.size, dtype=np.int64), test_idx, assume_unique=True)
    return train_idx, test_idx


def train_test_split(dataset: ImageDataset, *, test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Stratified, seeded hold-out split of a dataset (see :func:`stratified_split`); both keep file order.

    Example:
        >>> from gsu_jax import data
        >>> train, test = train_test_split(data.load_dataset("embedded"), test_fraction=0.1, seed=0)
        >>> len(train), len(test)
        (4500, 500)
    """
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    train_idx, test_idx = stratified_split(dataset.labels, test_fraction=test_fraction, seed=seed)
    return dataset.subset(train_idx), dataset.subset(test_idx)


def load_indices_file(path: str | os.PathLike) -> np.ndarray:
    """Reads example indices from a ``.npy`` file (1-D integer array) or a text file of integers.

    Text files hold integers separated by whitespace, commas or newlines; ``#`` starts a comment.

    Returns:
        ``int64[M]`` in file order (duplicates and range are checked by :func:`select_forget_retain`).

    Raises:
        ValueError: a token that is not an integer (with its line), a non-1-D or non-integer ``.npy``, or a
            file without any index; every message names the file.
    """
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a numpy .npy file of integers: {err}") from err
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{path}: must hold a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
        values = array.astype(np.int64)
    else:
        numbers = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            for token in line.split("#", 1)[0].replace(",", " ").split():
                try:
                    numbers.append(int(token))
                except ValueError as err:
                    raise ValueError(f"{path}, line {line_number}: {token!r} is not an integer index") from err
        values = np.asarray(numbers, dtype=np.int64)
    if values.size == 0:
        raise ValueError(f"{path}: holds no indices")
    return values


def select_forget_retain(
    labels: Sequence[int] | np.ndarray,
    *,
    classes: int | Iterable[int] | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions ``0..N-1`` into a forget set and a retain set by exactly one criterion.

    Args:
        labels: ``int[N]`` class labels of the data.
        classes: forget every example whose label is in this class (or list of classes).
        indices: forget exactly these positions (e.g. from :func:`load_indices_file`); no repeats.
        fraction: forget ``round(fraction * N)`` positions drawn uniformly without replacement.
        seed: non-negative int for ``fraction``; the same seed always draws the same set.

    Returns:
        ``(forget_idx, retain_idx)``: sorted, disjoint ``int64`` arrays whose union is ``0..N-1``.

    Raises:
        ValueError: not exactly one criterion; an empty forget set; a class absent from the data (named, with the
            classes present); repeated or out-of-range indices; a forget set that is all the data (empty retain
            set); ``fraction`` outside (0, 1).
        TypeError: non-integer labels, classes or indices.

    Example:
        >>> forget, retain = select_forget_retain([0, 1, 1, 2], classes=[1])
        >>> forget.tolist(), retain.tolist()
        ([1, 2], [0, 3])
    """
    given = [
        name
        for name, value in (("classes", classes), ("indices", indices), ("fraction", fraction))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of classes=, indices=, fraction= to select the forget set, got "
            f"{', '.join(given) if given else 'none'}"
        )
    labels = _label_array(labels)
    size = labels.size

    if classes is not None:
        wanted = np.asarray([classes] if isinstance(classes, (int, np.integer)) else list(classes))
        if wanted.size == 0:
            raise ValueError("classes is empty: the forget set would be empty; name at least one class")
        if not np.issubdtype(wanted.dtype, np.integer):
            raise TypeError(f"classes must be integers, got {wanted.tolist()!r}")
        present = np.unique(labels)
        absent = [int(c) for c in wanted if c not in present]
        if absent:
            raise ValueError(
                f"class{'es' if len(absent) > 1 else ''} {short_listing(absent)} absent from the data; "
                f"classes present: {short_listing(present.tolist())}"
            )
        forget = np.flatnonzero(np.isin(labels, wanted)).astype(np.int64)
        criterion = f"classes {short_listing(np.unique(wanted).tolist())}"
    elif indices is not None:
        forget = index_array(indices, size, what="forget indices")
        values, counts = np.unique(forget, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"forget indices repeat positions {short_listing(values[counts > 1].tolist())}; give each once"
            )
        forget = values
        criterion = f"{forget.size} explicit indices"
    else:
        fraction = _check_fraction(fraction, "fraction")
        count = int(np.floor(fraction * size + 0.5))
        if count == 0:
            raise ValueError(
                f"fraction={fraction} of {size} examples selects no example: the forget set would be empty"
            )
        rng = np.random.default_rng(_check_seed(seed))
        forget = np.sort(rng.choice(size, size=count, replace=False)).astype(np.int64)
        criterion = f"fraction={fraction}"

    if forget.size == size:
        raise ValueError(f"{criterion} selects all {size} examples: the retain set would be empty")
    retain = np.setdiff1d(np.arange(size, dtype=np.int64), forget, assume_unique=True)
    return forget, retain
