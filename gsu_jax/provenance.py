"""Where a run's numbers come from: package versions, code (git commit, source digest), JAX flags, device.

Checkpoints, saved unlearning results, reports and benchmarks record these, and a resumed run compares them with
its own (:func:`environment_identity`, :func:`differences`): numbers computed by other code, packages, flags or
devices are not mixed with this run's.

Example:
    >>> differences({"seed": 0, "model": {"latent": 2}}, {"seed": 0, "model": {"latent": 16}, "lr": 1e-3})
    ['model.latent: 2 -> 16', 'lr: <unset> -> 0.001']
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
import pathlib
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

import jax

from gsu_jax import io

__all__ = [
    "JAX_FLAGS",
    "PACKAGES",
    "code_version",
    "device_description",
    "device_name",
    "differences",
    "environment_identity",
    "git_commit",
    "jax_flags",
    "package_version",
    "package_versions",
    "source_digest",
]

# The packages a checkpoint's numbers depend on.
PACKAGES: tuple[str, ...] = ("gsu-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections")
# JAX settings that change numbers (precision, random bits) without changing any config field.
JAX_FLAGS: tuple[str, ...] = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_threefry_partitionable",
    "jax_default_prng_impl",
)
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_GIT_TIMEOUT_S = 10


# ------------------------------------------------------------------------------------------- software


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (``"absent"`` if not installed)."""
    return {name: package_version(name) or "absent" for name in PACKAGES}


def jax_flags() -> dict[str, Any]:
    """The values of :data:`JAX_FLAGS` in this process."""
    return {name: getattr(jax.config, name) for name in JAX_FLAGS}


# ------------------------------------------------------------------------------------------- code


def _git(*args: str) -> str | None:
    """``git <args>`` in the checkout holding this package: its stdout, or ``None`` without git or a checkout."""
    try:
        return subprocess.run(
            ["git", "-C", str(_PACKAGE_DIR.parent), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(*, short: bool = False) -> str | None:
    """The checkout's HEAD commit (``short``: git's abbreviation), or ``None`` outside a git checkout."""
    return _git("rev-parse", *(["--short"] if short else []), "HEAD") or None


def code_version() -> dict[str, Any]:
    """The git commit of the code that produced a report, whether tracked files had local changes, and
    :func:`source_digest` (``git_commit``/``git_dirty`` are ``None`` when git cannot tell)."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if commit is None or dirty is None:
        return {"git_commit": None, "git_dirty": None, "source_digest": source_digest()}
    return {"git_commit": commit, "git_dirty": bool(dirty), "source_digest": source_digest()}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of every ``gsu_jax`` source file (relative path and bytes, sorted): the code behind the numbers.

    Unlike the git commit it also pins uncommitted changes, and it exists outside a git checkout.
    """
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- device


def device_name() -> str:
    """``platform:kind`` of the default device, e.g. ``cpu:cpu`` or ``gpu:NVIDIA H100 80GB HBM3``."""
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


def device_description() -> str:
    """:func:`device_name` with the device count and the host's machine and processor."""
    return f"{device_name()} ({jax.device_count()} device(s), {platform.machine()}, {platform.processor() or 'cpu'})"


def environment_identity() -> dict[str, Any]:
    """Besides the config, what fixes a run's numbers: code, package versions, Python, device, JAX flags."""
    return {
        "code": source_digest(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "device": device_description(),
        "jax_flags": jax_flags(),
    }


# ------------------------------------------------------------------------------------------- what differs


def differences(saved: Any, current: Any) -> list[str]:
    """``"path: saved -> current"`` for every leaf where the JSON forms of two values differ.

    Dicts are compared key by key (``saved``'s keys in order, then those only ``current`` has; a missing key
    reads ``<unset>``), paths join keys with dots; NaN equals NaN; ``(28, 28)`` equals ``[28, 28]``.
    """
    return _leaf_differences(io.json_normalize(saved), io.json_normalize(current), "")


def _leaf_differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        found = []
        for key in list(saved) + [k for k in current if k not in saved]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                found.append(
                    f"{path}: {'<unset>' if key not in saved else repr(saved[key])} -> "
                    f"{'<unset>' if key not in current else repr(current[key])}"
                )
            else:
                found.extend(_leaf_differences(saved[key], current[key], path))
        return found
    same = saved == current or (
        isinstance(saved, float) and isinstance(current, float) and math.isnan(saved) and math.isnan(current)
    )
    return [] if same else [f"{prefix}: {saved!r} -> {current!r}"]
