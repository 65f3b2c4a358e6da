"""How the step cost grows with batch size and parameter count (table, fitted exponents, log-log PNG plot).

Two sweeps on the MLP VAE (latent 2), Adam 1e-3, forget batch = retain batch = B:

* batch sweep: B in ``cfg.scaling_batches`` at hidden 400 (the protocol model);
* size sweep: hidden width in ``cfg.scaling_hidden`` at B = 128 (parameter count ~ 2 * 784 * hidden).

Steps: the registry's ``s`` and ``sa_per_example`` (jvp/vjp) and the bench-built materialised per-example SA
(skipped where ``B x |params|`` exceeds ``cfg.materialised_max_elements``). The fitted exponent ``k`` of
``time ~ x^k`` (least squares on the log-log points) lets a user extrapolate: ``k ~ 1`` means linear growth,
``k << 1`` that fixed overheads (launches, small kernels) still dominate at these sizes.

Correctness at every point: the ``s`` direction against ``g_r - (g_f.g_r / |g_f|^2) g_f`` evaluated in float64
from batch gradients computed separately; ``sa_per_example`` (jvp/vjp) against the materialised route.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bench import common
from bench.common import Budget, Report, Section, SectionTimeout
from bench.step import (
    adam,
    materialised_sa_per_example,
    protocol_batches,
    protocol_model,
    time_step,
)
from gsu_jax import io

MATERIALISED = "sa_per_example, materialised"


def _s_reference(loss_fn, params, forget, retain, key) -> np.ndarray:
    from gsu_jax.methods import split_step_keys

    forget_keys, retain_keys, _ = split_step_keys(key, forget, retain)

    @jax.jit
    def grads(p):
        def mean_loss(q, batch, keys):
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(q, batch, keys))

        return ravel_pytree(jax.grad(mean_loss)(p, forget, forget_keys))[0], ravel_pytree(
            jax.grad(mean_loss)(p, retain, retain_keys)
        )[0]

    with jax.default_matmul_precision("highest"):  # the reference is the accurate side (GPU default: TF32)
        g_f, g_r = (np.asarray(g, np.float64) for g in grads(params))
    return g_r - (g_f @ g_r) / (g_f @ g_f) * g_f


def _per_example_sa_reference(loss_fn, params, forget, retain, key, *, chunk: int = 64) -> np.ndarray:
    """``mean_i P^c_{g_r}(-grad l(x_i))`` accumulated chunk by chunk (memory ``chunk x |params|``, any B)."""
    with jax.default_matmul_precision("highest"):  # the reference is the accurate side (GPU default: TF32)
        return _per_example_sa_sum(loss_fn, params, forget, retain, key, chunk=chunk)


def _per_example_sa_sum(loss_fn, params, forget, retain, key, *, chunk: int) -> np.ndarray:
    from gsu_jax.methods import split_step_keys

    forget_keys, retain_keys, _ = split_step_keys(key, forget, retain)
    g_r = jax.grad(lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, retain, retain_keys)))(params)
    flat_r = ravel_pytree(g_r)[0]

    @jax.jit
    def chunk_sum(batch, keys):
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, batch, keys)
        flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
        inner = -jnp.matmul(flat, flat_r, precision=jax.lax.Precision.HIGHEST)
        coefficient = jnp.where(inner < 0, inner / jnp.sum(jnp.square(flat_r)), 0.0)
        return -flat.shape[0] * common.leading_mean(flat) - jnp.sum(coefficient) * flat_r

    size = forget_keys.shape[0]
    total = np.zeros(flat_r.size)
    for start in range(0, size, chunk):
        part = jax.tree_util.tree_map(lambda x: x[start : start + chunk], forget)
        total += np.asarray(chunk_sum(part, forget_keys[start : start + chunk]), np.float64)
    return total / size


def _measure_point(*, batch: int, hidden: int, sweep: str, cfg, budget: Budget, rows: list) -> None:
    from gsu_jax.methods import make_method

    _, params, loss_fn = protocol_model(hidden=hidden)
    forget, retain, _ = protocol_batches(batch, batch, seed=batch)
    key = jax.random.key(3)
    keys = list(jax.random.split(jax.random.key(4), cfg.scaling_warmup + 2 * cfg.scaling_reps + 2))
    num_params = common.parameter_count(params)
    base = {"sweep": sweep, "B": batch, "hidden": hidden, "params": num_params}
    factories = {
        "s": lambda opt: make_method("s", loss_fn=loss_fn, optimizer=opt),
        "sa_per_example": lambda opt: make_method("sa_per_example", loss_fn=loss_fn, optimizer=opt),
        MATERIALISED: lambda opt: materialised_sa_per_example(loss_fn, opt),
    }
    references: dict[str, np.ndarray] = {}
    tolerance = common.default_precision_tolerance()
    for name, factory in factories.items():
        row = {**base, "name": name}
        try:
            if name == MATERIALISED and batch * num_params > cfg.materialised_max_elements:
                raise SectionTimeout(f"B x params = {batch * num_params:.2e} > {cfg.materialised_max_elements:.0e}")
            if not budget.allows(cfg.scaling_row_s):
                raise SectionTimeout(f"time budget ({budget.left():.0f} s left)")
            if name == "s":
                want = _s_reference(loss_fn, params, forget, retain, key)
            else:
                if "per_example" not in references:
                    references["per_example"] = _per_example_sa_reference(loss_fn, params, forget, retain, key)
                want = references["per_example"]
            timed = time_step(
                factory(adam()),
                params=params,
                forget=forget,
                retain=retain,
                check_key=key,
                keys=keys,
                warmup=cfg.scaling_warmup,
                reps=cfg.scaling_reps,
                check=lambda u, name=name, want=want: common.check_close(f"{name} direction", u, want, rtol=tolerance),
            )
            row.update(timed.timing.summary(), rel_err=timed.rel_err, gflops=timed.gflops, status="ok")
        except Exception as error:  # noqa: BLE001
            common.row_failure(row, error)
        rows.append(row)


def fitted_exponent(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def _short(count: int) -> str:
    """``631188 -> '631k'``, ``2522388 -> '2.5M'``, ``128 -> '128'`` (tick labels)."""
    if count >= 1_000_000:
        return f"{count / 1e6:.1f}M"
    if count >= 10_000:
        return f"{count / 1e3:.0f}k"
    return str(count)


def _plot(rows: list[dict[str, Any]], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, sweep, x_key, label in (
        (axes[0], "batch", "B", "batch size B (forget = retain)"),
        (axes[1], "size", "params", "parameters"),
    ):
        for name in ("s", "sa_per_example", MATERIALISED):
            points = sorted(
                (r[x_key], r["median_ms"])
                for r in rows
                if r["sweep"] == sweep and r["name"] == name and r.get("status") == "ok"
            )
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set_xscale("log")
        axis.set_yscale("log")
        ticks = sorted({r[x_key] for r in rows if r["sweep"] == sweep and r.get("status") == "ok"})
        if ticks:
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xticks(ticks, [_short(t) for t in ticks])
        axis.set_xlabel(label)
        axis.set_ylabel("step time, median ms")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend()
    axes[0].set_title("hidden 400 (631k parameters)")
    axes[1].set_title("B = 128")
    device = jax.devices()[0]
    fig.suptitle(f"Unlearning step cost, MLP VAE, Adam ({device.platform}: {getattr(device, 'device_kind', '')})")
    fig.tight_layout()
    io.write_png(path, fig, dpi=110)
    plt.close(fig)
    return None


def run(report: Report, cfg, budget: Budget, torch_device: str | None) -> None:
    del torch_device  # JAX only: the growth of our steps
    rows: list[dict[str, Any]] = []
    for batch in cfg.scaling_batches:
        _measure_point(batch=batch, hidden=400, sweep="batch", cfg=cfg, budget=budget, rows=rows)
    for hidden in cfg.scaling_hidden:
        shared = [r for r in rows if r["sweep"] == "batch" and r["B"] == 128 and r["hidden"] == hidden]
        if shared:  # the protocol point belongs to both sweeps: measured once
            rows.extend({**r, "sweep": "size"} for r in shared)
        else:
            _measure_point(batch=128, hidden=hidden, sweep="size", cfg=cfg, budget=budget, rows=rows)

    notes = [f"Median of {cfg.scaling_reps} synchronised steps after {cfg.scaling_warmup} warm-ups."]
    for sweep, x_key, what in (("batch", "B", "batch size"), ("size", "params", "parameter count")):
        for name in ("s", "sa_per_example", MATERIALISED):
            points = [
                (r[x_key], r["median_ms"])
                for r in rows
                if r["sweep"] == sweep and r["name"] == name and r.get("status") == "ok"
            ]
            exponent = fitted_exponent(*zip(*points)) if len(points) >= 2 else None
            if exponent is not None:
                notes.append(
                    f"{name}: time ~ ({what})^{exponent:.2f} over {min(p[0] for p in points):,}.."
                    f"{max(p[0] for p in points):,}"
                )
    plot_path = os.path.join(report.out_dir, "scaling.png")
    problem = _plot(rows, plot_path)
    notes.append(problem or f"log-log plot: {plot_path}")
    report.add(
        Section(
            key="scaling",
            title="Scaling of the step cost with batch size and parameter count (MLP VAE, latent 2)",
            columns=[
                ("sweep", "sweep"),
                ("B", "B"),
                ("hidden", "hidden"),
                ("params", "params"),
                ("name", "step"),
                ("median_ms", "median ms"),
                ("iqr_ms", "IQR ms"),
                ("gflops", "GFLOP"),
                ("rel_err", "rel. err"),
                ("status", "status"),
            ],
            rows=rows,
            notes=notes,
        )
    )
