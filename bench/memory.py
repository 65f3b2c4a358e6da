"""``python -m bench.memory``: temporaries of one compiled unlearning step, unchunked and chunked (the README table).

Compiles (never runs) each method's step on the conv VAE (28x28x1, latent 16) at forget = retain = ``--batch``
examples with Adam, for abstract inputs, and prints XLA's ``memory_analysis().temp_size_in_bytes``
(:func:`gsu_jax.methods.step_temp_bytes`) without chunking and with ``chunk_size=--chunk-size``. About a minute on
the 2-core CPU at the defaults; the numbers are the compiler's buffer assignment for this backend.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bench import common
from gsu_jax.losses import negative_elbo
from gsu_jax.methods import make_method, step_temp_bytes
from gsu_jax.models import ConvVAE

# One method per code path of gsu_jax.methods (tests/test_memory.py's docstring says which rules each stands for).
_METHODS = ("sa", "sa_per_example", "sa_gated", "sa_span", "uno")


def temp_mib_table(*, batch: int, chunk_size: int) -> list[dict[str, object]]:
    """One row per method: ``{"method", "unchunked_mib", "chunked_mib"}`` (MiB of temporaries)."""
    graphdef, params = nnx.split(ConvVAE(rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    images = {
        "image": jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    loss_fn = negative_elbo(graphdef)
    hparams = {"sa_gated": {"forget_loss_target": 200.0}}
    rows = []
    for name in _METHODS:
        row: dict[str, object] = {"method": name}
        for column, chunk in (("unchunked_mib", None), ("chunked_mib", chunk_size)):
            method = make_method(
                name, loss_fn=loss_fn, optimizer=optax.adam(1e-3), chunk_size=chunk, **hparams.get(name, {})
            )
            row[column] = step_temp_bytes(method, params, images, images) / 2**20
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="forget = retain examples per step")
    parser.add_argument("--chunk-size", type=int, default=64, help="make_method's chunk_size for the chunked column")
    args = parser.parse_args()
    if args.batch < 1 or args.chunk_size < 1:
        parser.error(f"--batch={args.batch} and --chunk-size={args.chunk_size} must be integers >= 1")
    rows = temp_mib_table(batch=args.batch, chunk_size=args.chunk_size)
    print(
        common.markdown_table(
            (
                ("method", "method"),
                ("unchunked_mib", "unchunked MiB"),
                ("chunked_mib", f"chunk_size={args.chunk_size} MiB"),
            ),
            rows,
        )
    )
    print(
        f"\nconv VAE 28x28x1, forget = retain = {args.batch}, Adam; {jax.default_backend()} backend, "
        f"jax {jax.__version__}"
    )


if __name__ == "__main__":
    main()
