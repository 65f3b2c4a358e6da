"""Chunked against unchunked unlearning steps on the conv VAE (``python -m bench --sections chunking``).

Workload: ``ConvVAE`` (28x28x1, 32-64 channels, latent 16), ``cfg.chunking_batch`` forget + as many retain images
(real digits: 1 and the others), Adam 1e-3; each method's step compiled unchunked and with
``chunk_size=cfg.chunking_chunk``. Why a section of its own: on XLA:CPU the chunked conv-VAE step used to take 23x the
unchunked one (convolution gradients inside the chunk loop left XLA:CPU's library path;
:mod:`gsu_jax.models.conv` says why and what the loop bodies now trace instead). Correctness first: the chunked
step's update direction (Adam's first moment after one step from a zero state, ``(1 - b1) u``) must equal the
unchunked one's to float32 rounding. Timed with the bench's one protocol (:func:`bench.step.time_step`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from flax import nnx

from bench import common
from bench.common import Budget, Report, Section, Target
from bench.step import adam, time_step

METHODS = ("sa", "sa_per_example")
TARGET_RATIO = 1.5  # issue 15: a chunked (64) conv-VAE sa step <= 1.5x the unchunked one at 1024 + 1024


def _step_row(name, *, loss_fn, params, forget, retain, chunk, cfg, check) -> dict[str, Any]:
    """One row: ``name``'s step with ``chunk_size=chunk``, checked by ``check(u)`` then timed
    (:func:`bench.step.time_step`: the bench's one protocol)."""
    from gsu_jax.methods import make_method

    method = make_method(name, loss_fn=loss_fn, optimizer=adam(), chunk_size=chunk)
    keys = list(jax.random.split(jax.random.key(1), 8))
    timed = time_step(
        method,
        params=params,
        forget=forget,
        retain=retain,
        check_key=jax.random.key(0),
        check=check,
        keys=keys,
        warmup=cfg.chunking_warmup,
        reps=cfg.chunking_reps,
    )
    return {
        "method": name,
        "chunk": "none" if chunk is None else chunk,
        **timed.timing.summary(),
        "temp_mib": None if timed.temp_bytes is None else timed.temp_bytes / 2**20,
        "rel_err": timed.rel_err,
    }


def run(report: Report, cfg, budget: Budget, torch_device: str | None) -> None:
    del torch_device, budget  # JAX only; two methods x two compilations, sized by the mode
    from gsu_jax.losses import negative_elbo
    from gsu_jax.models import ConvVAE

    graphdef, params = nnx.split(ConvVAE(rngs=nnx.Rngs(0)))
    loss_fn = negative_elbo(graphdef)
    size = cfg.chunking_batch
    forget, _ = common.image_batch(size, digits=[1], seed=0)
    retain, source = common.image_batch(size, digits=[0, 2, 3, 4, 5, 6, 7, 8, 9], seed=1)
    forget, retain = jax.device_put(forget), jax.device_put(retain)
    rows, targets = [], []
    at_target_size = (size, cfg.chunking_chunk) == (1024, 64)
    for name in METHODS:
        reference: list[np.ndarray] = []

        def keep(direction, reference=reference):  # the unchunked direction is the chunked row's reference
            reference.append(direction)
            return None

        def against_unchunked(direction, name=name, reference=reference):
            return common.check_close(f"{name} chunked vs unchunked", direction, reference[0], rtol=1e-4)

        row = functools.partial(_step_row, name, loss_fn=loss_fn, params=params, forget=forget, retain=retain, cfg=cfg)
        unchunked = row(chunk=None, check=keep)
        chunked = row(chunk=cfg.chunking_chunk, check=against_unchunked)
        ratio = chunked["median_ms"] / unchunked["median_ms"]
        chunked["x_unchunked"] = ratio
        unchunked["x_unchunked"] = 1.0
        rows += [unchunked, chunked]
        if name == "sa":
            targets.append(
                Target(
                    f"CPU: chunked ({cfg.chunking_chunk}) conv-VAE sa step <= {TARGET_RATIO}x the unchunked one "
                    f"at {size} + {size}",
                    # judged at the target's sizes on a CPU only (the dry run's tiny sizes say nothing)
                    ratio <= TARGET_RATIO if at_target_size and jax.default_backend() == "cpu" else None,
                    f"{chunked['median_ms']:.0f} ms vs {unchunked['median_ms']:.0f} ms = {ratio:.2f}x",
                )
            )
    report.add(
        Section(
            key="chunking",
            title=f"Chunked against unchunked steps, conv VAE (latent 16), {size} forget + {size} retain, Adam 1e-3",
            columns=[
                ("method", "method"),
                ("chunk", "chunk_size"),
                ("median_ms", "median ms"),
                ("iqr_ms", "IQR ms"),
                ("x_unchunked", "x unchunked"),
                ("temp_mib", "temporaries MiB"),
                ("rel_err", "rel. err vs unchunked"),
            ],
            rows=rows,
            targets=targets,
            notes=[
                f"Data: {source}. Median of {cfg.chunking_reps} synchronised steps after {cfg.chunking_warmup} "
                "warm-ups, alternating between the states after the first and the second step, with fresh keys. "
                "temporaries: XLA's temp_size_in_bytes of the compiled step (the memory chunking bounds; arguments "
                "and outputs excluded).",
            ],
        )
    )
