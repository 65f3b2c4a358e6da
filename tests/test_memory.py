"""Memory-bounded steps: every method's compiled step at batch 1024 + 1024 on the conv VAE fits a fixed budget.

The property is XLA's own buffer assignment (``compiled.memory_analysis().temp_size_in_bytes``, the working memory
a step needs beyond its arguments and outputs); the steps are compiled for abstract shapes and never run, so the
file costs compilations only. One step per code path of :mod:`gsu_jax.methods` is compiled: ``sa`` stands for
every rule built on the two mean gradients alone (``sa_conflict``, ``pcgrad``, ``s``, ``ascent``,
``ascent_descent``, ``retain_finetune``), ``sa_per_example`` for the jvp/vjp per-example route (``sa_gated`` adds
only the gate and a mask), ``sa_span`` for the group gradients and ``uno`` for the gradient of a gradient (``uno_s``
alternates it with ``s``). Equality of chunked and unchunked steps is tested in test_methods.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from gsu_jax.losses import negative_elbo
from gsu_jax.methods import chunk_size_for_budget, make_method, step_temp_bytes
from gsu_jax.models import ConvVAE

BATCH = 1024
CHUNK_SIZE = 64
BUDGET_BYTES = 128 * 2**20  # temporaries of one step; the unchunked sa step needs ~2.1 GiB


@pytest.fixture(scope="module")
def conv_vae():
    graphdef, params = nnx.split(ConvVAE(rngs=nnx.Rngs(0)))
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, 28, 28, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
    }
    return negative_elbo(graphdef), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), batch


def _temp_bytes(conv_vae, name, chunk_size):
    loss_fn, params, batch = conv_vae
    method = make_method(name, loss_fn=loss_fn, optimizer=optax.adam(1e-3), chunk_size=chunk_size)
    return step_temp_bytes(method, params, batch, batch)


def test_chunking_bounds_the_mean_gradient_step(conv_vae):
    unchunked = _temp_bytes(conv_vae, "sa", None)
    chunked = _temp_bytes(conv_vae, "sa", CHUNK_SIZE)
    assert unchunked > 8 * BUDGET_BYTES, unchunked  # the budget is a real constraint at this batch
    assert chunked <= BUDGET_BYTES, chunked
    assert chunked * 10 <= unchunked, (chunked, unchunked)


@pytest.mark.parametrize("name", ["sa_per_example", "sa_span", "uno"])
def test_every_code_path_fits_the_budget_when_chunked(conv_vae, name):
    assert _temp_bytes(conv_vae, name, CHUNK_SIZE) <= BUDGET_BYTES


def test_chunk_size_for_budget_returns_the_largest_power_of_two_that_fits():
    def loss_fn(params, example, key):
        del key
        return jnp.sum(jnp.tanh(example["x"] @ params["w"]) ** 2)

    params = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    batch = {"x": jax.ShapeDtypeStruct((256, 64), jnp.float32)}
    kwargs = dict(loss_fn=loss_fn, optimizer=optax.sgd(0.1), params=params, forget_batch=batch, retain_batch=batch)

    def temp(chunk_size):
        method = make_method("sa_per_example", loss_fn=loss_fn, optimizer=optax.sgd(0.1), chunk_size=chunk_size)
        return step_temp_bytes(method, params, batch, batch)

    unchunked, smallest = temp(None), temp(1)
    assert chunk_size_for_budget("sa_per_example", budget_bytes=unchunked, **kwargs) is None
    budget = (smallest + unchunked) // 2
    chunk = chunk_size_for_budget("sa_per_example", budget_bytes=budget, **kwargs)
    assert temp(chunk) <= budget < temp(2 * chunk)
    with pytest.raises(ValueError, match="even with chunk_size=1"):
        chunk_size_for_budget("sa_per_example", budget_bytes=smallest - 1, **kwargs)
    with pytest.raises(ValueError, match="budget_bytes must be an integer > 0"):
        chunk_size_for_budget("sa_per_example", budget_bytes=0, **kwargs)
