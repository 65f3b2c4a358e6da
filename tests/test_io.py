"""Tests for gsu_jax.io: atomic writers, the JSON normaliser (the exact bytes the run files had), image tiling."""

from __future__ import annotations

import doctest
import os
import stat

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gsu_jax import io, reporting


def test_doctests():
    assert doctest.testmod(io, raise_on_error=True).attempted > 0


def _values():
    return {
        "b": np.float32(0.5),
        "a": {"n": np.int64(3), "t": (1, 2), "flag": np.bool_(True)},
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "array": np.arange(3, dtype=np.int32),
    }


def test_report_json_bytes_strict_json_in_key_order(tmp_path):
    reporting.write_json(str(tmp_path / "r.json"), _values())
    assert (tmp_path / "r.json").read_text() == (
        '{\n  "b": 0.5,\n  "a": {\n    "n": 3,\n    "t": [\n      1,\n      2\n    ],\n    "flag": true\n  },\n'
        '  "nan": null,\n  "inf": null,\n  "array": [\n    0,\n    1,\n    2\n  ]\n}\n'
    )


def test_sorted_json_keeps_non_finite_numbers(tmp_path):
    """metrics.json / summary.json: keys sorted at every level, NaN written as JSON's NaN."""
    io.write_json(tmp_path / "m.json", {"b": float("nan"), "a": {"y": 1, "x": np.float32(2.0)}}, sort_keys=True)
    assert (tmp_path / "m.json").read_text() == '{\n  "a": {\n    "x": 2.0,\n    "y": 1\n  },\n  "b": NaN\n}\n'


def test_one_line_json():
    assert io.json_text({"z": (1, np.float32(0.25)), "a": None}, indent=None) == '{"z": [1, 0.25], "a": null}'


def test_json_normalize_is_what_json_reads_back():
    config = ml_collections.ConfigDict({"shape": (28, 28, 1), "lr": 1e-3})
    value = {"config": config, "w": jnp.arange(2.0), "n": np.int64(7), "x": float("nan"), 3: "int key"}
    normalized = io.json_normalize(value)
    assert normalized["config"] == {"shape": [28, 28, 1], "lr": 1e-3}
    assert normalized["w"] == [0.0, 1.0] and normalized["n"] == 7 and type(normalized["n"]) is int
    assert np.isnan(normalized["x"]) and normalized["3"] == "int key"
    assert list(normalized) == ["config", "w", "n", "x", "3"]  # order kept unless sort_keys
    assert list(io.json_normalize({"b": 1, "a": 2}, sort_keys=True)) == ["a", "b"]
    assert io.json_normalize(value, nonfinite_as_null=True)["x"] is None
    with pytest.raises(TypeError, match="cannot write object"):
        io.json_normalize({"bad": object()})


def test_atomic_writes_replace_whole_files_with_open_permissions(tmp_path):
    path = tmp_path / "out.txt"
    io.write_text(path, "first")
    io.write_text(path, "second — complete")
    assert path.read_text(encoding="utf-8") == "second — complete"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    io.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError, match="interrupted"), io.atomic_file(path) as handle:
        handle.write("trunc")
        raise RuntimeError("interrupted")
    assert path.read_text(encoding="utf-8") == "second — complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.txt"]


def test_csv_rows_with_missing_columns(tmp_path):
    io.write_csv(tmp_path / "h.csv", [{"epoch": 1, "loss": 0.5}, {"epoch": 2}], ["epoch", "loss"])
    assert (tmp_path / "h.csv").read_bytes() == b"epoch,loss\r\n1,0.5\r\n2,\r\n"


def test_tile_images_with_and_without_gaps():
    images = np.random.default_rng(0).uniform(size=(5, 4, 3, 1)).astype(np.float32)
    plain = io.tile_images(images, 3)
    assert plain.shape == (8, 9, 1) and plain.dtype == np.float32
    np.testing.assert_array_equal(plain[4:8, 0:3], images[3])
    np.testing.assert_array_equal(plain[4:8, 6:9], 0.0)  # the empty sixth cell
    gapped = io.tile_images(images, 3, gap=1, fill=1.0)
    assert gapped.shape == (2 * 5 - 1, 3 * 4 - 1, 1)
    np.testing.assert_array_equal(gapped[5:9, 0:3], images[3])
    np.testing.assert_array_equal(gapped[4], 1.0)  # the white line between the rows
    with pytest.raises(ValueError, match="expects"):
        io.tile_images(images[0], 3)


def test_png_bytes_equal_savefig_to_a_path(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure():
        fig = Figure(figsize=(2, 2), dpi=100)
        FigureCanvasAgg(fig)
        fig.subplots().imshow(np.linspace(0, 1, 16).reshape(4, 4), cmap="gray")
        return fig

    figure().savefig(tmp_path / "direct.png", dpi=110)
    io.write_png(tmp_path / "atomic.png", figure(), dpi=110)
    assert (tmp_path / "atomic.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
