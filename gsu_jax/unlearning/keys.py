r"""The unlearning job's random streams: everything random in a run derives from these, hence from the config.

Independent streams folded from one root key (:func:`stream_key`): the monitoring latents (``monitor``), the FID
latents (``fid``), the per-example ELBO keys of the evaluation (``elbo``) and, per seed, the step keys (``run``); the
data order of seed ``s`` comes from ``numpy.random.default_rng([s, 1])`` (:func:`data_order_rng`). The monitoring
and FID latents therefore do not depend on the seed or the method (every run is read on the *same* fixed z, and
every model of the table, original and oracle included, is scored on the same samples), and no loss key equals
them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import numpy as np

__all__ = ["data_order_rng", "monitoring_latents", "monitoring_noise", "seed_step_keys", "stream_key"]

# The root of the JAX key streams (folded into it by name) and the numpy stream of the data order.
_ROOT_SEED = 0
_DATA_STREAM = 1


def stream_key(name: str, *indices: int) -> jax.Array:
    """The root key of the named independent stream (``monitor``, ``fid``, ``elbo``, ``run``), indices folded in.

    Streams are folded from one root key by the CRC32 of their name, so they are independent of each other and
    of the seeds (a seed is folded into the ``run`` stream only).
    """
    key = jax.random.fold_in(jax.random.key(_ROOT_SEED), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    for index in indices:
        key = jax.random.fold_in(key, index)
    return key


def monitoring_noise(num_samples: int, noise_shape: Sequence[int]) -> jax.Array:
    """The fixed monitoring noises ``f32[num_samples, *noise_shape]`` (VAE: ``z``; DDPM: ``x_T``): the same for
    every seed, method and model."""
    return jax.random.normal(stream_key("monitor"), (num_samples, *noise_shape))


def monitoring_latents(num_samples: int, latent_dim: int) -> jax.Array:
    """The fixed monitoring latents ``f32[num_samples, latent_dim]`` of a VAE (:func:`monitoring_noise`)."""
    return monitoring_noise(num_samples, (latent_dim,))


def seed_step_keys(seed: int, num_steps: int) -> jax.Array:
    """The step keys of one seed, ``key[num_steps]`` (everything a method's losses see comes from these)."""
    return jax.random.split(stream_key("run", seed), num_steps)


def data_order_rng(seed: int) -> np.random.Generator:
    """The generator of seed ``seed``'s data order (its forget and retain batch schedules, drawn in that order)."""
    return np.random.default_rng([seed, _DATA_STREAM])
