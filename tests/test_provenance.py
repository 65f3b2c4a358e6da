"""Tests for gsu_jax.provenance: versions, code identity, device strings, and what differs between two runs."""

from __future__ import annotations

import doctest
import re

import jax

from gsu_jax import provenance


def test_doctests():
    assert doctest.testmod(provenance, raise_on_error=True).attempted > 0


def test_differences_compare_json_forms():
    saved = {"latent_dim": 2, "image_shape": [28, 28, 1], "model_kwargs": {"hidden": 400}, "loss": float("nan")}
    current = {"latent_dim": 16, "image_shape": (28, 28, 1), "model_kwargs": {"hidden": 400}, "loss": float("nan")}
    current["seed"] = 0
    assert provenance.differences(saved, current) == ["latent_dim: 2 -> 16", "seed: <unset> -> 0"]
    assert provenance.differences({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == ["a.b: 1 -> <unset>", "a.c: 2 -> 3"]
    assert provenance.differences({"a": 1}, {"a": 1}) == []


def test_versions_code_and_device():
    versions = provenance.package_versions()
    assert list(versions) == list(provenance.PACKAGES)
    assert versions["jax"] == jax.__version__
    assert provenance.package_version("no-such-distribution-gsu") is None
    code = provenance.code_version()
    assert re.fullmatch(r"[0-9a-f]{64}", code["source_digest"]) and code["source_digest"] == provenance.source_digest()
    if code["git_commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", code["git_commit"]) and isinstance(code["git_dirty"], bool)
        assert code["git_commit"].startswith(provenance.git_commit(short=True))
    assert provenance.device_name().startswith(f"{jax.devices()[0].platform}:")
    assert provenance.device_description().startswith(provenance.device_name() + " (")
    identity = provenance.environment_identity()
    assert set(identity) == {"code", "versions", "python", "device", "jax_flags"}
    assert set(identity["jax_flags"]) == set(provenance.JAX_FLAGS)
