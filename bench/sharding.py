"""``python -m bench.sharding``: sharded unlearning steps over device counts, and one device's largest batch.

Two sections, each a table in ``results.md`` / ``results.json`` under ``--out`` (written by
:class:`bench.common.Report`, timed by :func:`bench.common.measure`):

* ``--section devices`` (``scaling-devices``): examples/s of the jitted, data-sharded step of ``sa`` and
  ``sa_per_example`` on the MLP VAE (784-400-2) and the conv VAE (28x28x1, latent 16) for each device count in
  ``--devices`` (default 1,2,4,8). Each count runs in its own subprocess (a JAX process fixes its device count at
  start-up): on a CPU host with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N fake devices sharing
  the host's cores, so the table measures the partitioning overhead, not a speed-up); on a GPU/TPU host the
  subprocess sees its first N accelerators (counts above the available devices are reported as skipped). Steps
  go through :func:`gsu_jax.parallel.shard_method_step` (batch split over the mesh's ``data`` axis, state
  replicated). Before timing, every sharded step's parameters after one Adam step are compared with the
  single-device step's (same process, ``jax.jit`` on one device): the ``rel. err`` column.
* ``--section max-batch``: what ONE device holds and sustains on the conv VAE. Per method, forget = retain batch
  ``B`` doubles from ``--start-batch`` for as long as the compiled step fits the device's memory: each doubling
  is only *compiled* (abstract batches, nothing allocated) and its peak need read from XLA's buffer assignment
  (:func:`bench.common.compiled_memory_bytes`: arguments + outputs + temporaries) against the device's
  ``memory_stats()['bytes_limit']`` (``--memory-limit-mib`` where the backend reports none, as on CPU). No time
  budget cuts the search. The largest batch that fits is then run and timed (halved if it still runs out of
  memory at run time): examples/s (``2B / median step time``) and XLA's temporary bytes per step. Rows with
  ``chunk_size`` (:func:`gsu_jax.methods.make_method`'s step option) show how far chunking moves the limit.

Usage::

    python -m bench.sharding --quick --out DIR                 # CPU: both sections at small sizes
    python -m bench.sharding --section devices --devices 1,2,4,8
    PYTHONPATH=. python3 -m bench.sharding --gpu --out $OUT    # the GPU call (max-batch on one device: compiles, then times)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

MODELS = ("mlp_vae", "conv_vae")
DEVICE_METHODS = ("sa", "sa_per_example")
# (method, chunk_size): the two per-batch and per-example surgery steps unchunked, then chunked.
# Ordered by importance: rows the time budget cannot reach are reported as skipped.
MAX_BATCH_ROWS = (
    ("sa", None),
    ("sa_per_example", None),
    ("sa", 1024),
    ("sa_per_example", 1024),
    ("sa_span", None),
    ("uno", None),
)


@dataclasses.dataclass
class Sizes:
    """Sizes of one mode."""

    mode: str
    devices: list[int]
    device_batch: int  # forget = retain batch of the device sweep (a multiple of every device count)
    device_warmup: int
    device_reps: int
    start_batch: int
    max_batch: int
    max_batch_rows: tuple[tuple[str, int | None], ...]
    batch_warmup: int
    batch_reps: int
    budget_s: float
    memory_limit_mib: float | None = None  # used where the device reports no bytes_limit (CPU)


def sizes(mode: str) -> Sizes:
    if mode == "quick":  # CPU, minutes on 2 shared cores
        return Sizes(
            mode="quick",
            devices=[1, 2, 4, 8],
            device_batch=64,
            device_warmup=2,
            device_reps=5,
            start_batch=16,
            max_batch=64,
            max_batch_rows=(("sa", None), ("sa_per_example", None), ("sa", 16)),
            batch_warmup=1,
            batch_reps=3,
            budget_s=900,
            memory_limit_mib=1024,
        )
    # gpu: one device, max-batch only; the memory search only compiles, and budget_s is a backstop under the
    # session's hard limit (bench/gpu_session2.sh gives the call 130 s)
    return Sizes(
        mode="gpu",
        devices=[1],
        device_batch=1024,
        device_warmup=3,
        device_reps=10,
        start_batch=2048,
        max_batch=2**22,  # a sanity cap: the search stops at the device's memory long before
        max_batch_rows=MAX_BATCH_ROWS,
        batch_warmup=2,
        batch_reps=5,
        budget_s=110,
    )


# ----------------------------------------------------------------------------------------------------------------
# Workloads


def build_model(name: str):
    """``(params, loss_fn)`` of the benchmark's MLP VAE (784-400-2, the protocol model) or conv VAE (latent 16)."""
    from flax import nnx

    from gsu_jax.losses import negative_elbo
    from gsu_jax.models import MLPVAE, ConvVAE

    if name == "mlp_vae":
        model = MLPVAE(hidden=400, latent_dim=2, rngs=nnx.Rngs(0))
    elif name == "conv_vae":
        model = ConvVAE(rngs=nnx.Rngs(0))
    else:
        raise ValueError(f"unknown benchmark model {name!r}; allowed: {', '.join(MODELS)}")
    graphdef, params = nnx.split(model)
    return params, negative_elbo(graphdef)


def make_step(name: str, loss_fn, *, chunk_size: int | None = None):
    import optax

    from gsu_jax.methods import make_method

    hparams = {"forget_loss_target": float("inf")} if name == "sa_gated" else {}
    return make_method(name, loss_fn=loss_fn, optimizer=optax.adam(1e-3), chunk_size=chunk_size, **hparams)


def batches(size: int, *, seed: int):
    from bench.common import image_batch

    forget, source = image_batch(size, digits=[1], seed=seed)
    retain, _ = image_batch(size, digits=[0, 2, 3, 4, 5, 6, 7, 8, 9], seed=seed + 1)
    return forget, retain, source


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


# ----------------------------------------------------------------------------------------------------------------
# Device sweep (one subprocess per device count)


def device_worker(count: int, cfg: Sizes) -> list[dict[str, Any]]:
    """Runs in a process that sees ``count`` devices: sharded steps checked against one device, then timed."""
    import jax
    from jax.flatten_util import ravel_pytree

    from bench import common
    from gsu_jax import parallel

    if jax.device_count() < count:
        return [{"devices": count, "status": f"skipped: {jax.device_count()} {jax.default_backend()} devices"}]
    mesh = parallel.make_mesh(data=count, model=1, devices=jax.devices()[:count])
    rows = []
    for model in MODELS:
        params, loss_fn = build_model(model)
        forget, retain, source = batches(cfg.device_batch, seed=0)
        for name in DEVICE_METHODS:
            row = {
                "model": model,
                "params": common.parameter_count(params),
                "method": name,
                "devices": count,
                "B": 2 * cfg.device_batch,
                "data": source,
            }
            try:
                method = make_step(name, loss_fn)
                state = method.init(params)
                key = jax.random.key(1)
                reference = jax.jit(method.step)(params, state, forget, retain, key)[0]
                step, params_sharding, state_sharding = parallel.shard_method_step(method.step, mesh, params, state)
                sharded_params = parallel.put(params, params_sharding)
                sharded_state = parallel.put(state, state_sharding)
                sharded_forget = parallel.shard_batch(forget, mesh)
                sharded_retain = parallel.shard_batch(retain, mesh)
                compiled = step.lower(sharded_params, sharded_state, sharded_forget, sharded_retain, key).compile()
                new_params, new_state, _ = compiled(sharded_params, sharded_state, sharded_forget, sharded_retain, key)
                row["rel_err"] = common.check_close(
                    f"{name} sharded over {count} devices vs one device",
                    ravel_pytree(new_params)[0],
                    ravel_pytree(reference)[0],
                    rtol=common.default_precision_tolerance(),
                )
                row["batch_sharded"] = str(sharded_forget["image"].sharding.spec)
                keys = list(jax.random.split(jax.random.key(2), 8))
                starts = ((sharded_params, sharded_state), (new_params, new_state))
                call = common.alternating_step_call(compiled, starts, sharded_forget, sharded_retain, keys)

                timing = common.measure(call, sync=common.jax_sync, warmup=cfg.device_warmup, reps=cfg.device_reps)
                analysis = compiled.memory_analysis()
                row.update(
                    timing.summary(),
                    examples_per_s=2 * cfg.device_batch / (timing.median_ms / 1e3),
                    temp_mib=analysis.temp_size_in_bytes / 2**20 if analysis is not None else None,
                    status="ok",
                )
            except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
                common.row_failure(row, error)
            rows.append(row)
    return rows


def _device_environment(count: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in flag]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_devices(report, cfg: Sizes, budget) -> None:
    from bench.common import Section

    rows: list[dict[str, Any]] = []
    for count in cfg.devices:
        if not budget.allows(30):
            rows.append({"devices": count, "status": f"skipped: time budget ({budget.left():.0f} s left)"})
            continue
        command = [sys.executable, "-m", "bench.sharding", "--worker", str(count), "--mode", cfg.mode]
        print(f"devices={count}: {' '.join(command)}", flush=True)
        done = subprocess.run(
            command,
            env=_device_environment(count),
            capture_output=True,
            text=True,
            timeout=max(budget.left(), 30),
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"devices": count, "status": f"ERROR worker exit {done.returncode}: {tail[0][:200]}"})
            continue
        rows.extend(json.loads(lines[-1][len("ROWS ") :]))
    single = {
        (r.get("model"), r.get("method")): r["examples_per_s"]
        for r in rows
        if r.get("devices") == 1 and r.get("status") == "ok"
    }
    for row in rows:
        base = single.get((row.get("model"), row.get("method")))
        if base and row.get("status") == "ok":
            row["speedup"] = row["examples_per_s"] / base
    import jax

    platform = jax.default_backend()
    notes = [
        f"Forget = retain batch {cfg.device_batch} ({2 * cfg.device_batch} examples per step), Adam 1e-3, batch "
        "sharded over the mesh's data axis by gsu_jax.parallel.shard_method_step, parameters replicated; median "
        f"of {cfg.device_reps} synchronised steps after {cfg.device_warmup} warm-ups; one subprocess per device "
        "count.",
        "rel. err: parameters after one sharded Adam step against the single-device step of the same process.",
    ]
    if platform == "cpu":
        notes.append(
            f"CPU: the N devices are fake (XLA_FLAGS=--xla_force_host_platform_device_count=N) and share the "
            f"host's {os.cpu_count()} cores, so this table measures the cost of partitioning (per-device programs, "
            "cross-device reductions), not a speed-up; real speed-up needs N real accelerators."
        )
    report.add(
        Section(
            key="devices",
            title="Sharded unlearning step over device counts (data parallel)",
            columns=[
                ("model", "model"),
                ("params", "params"),
                ("method", "method"),
                ("devices", "devices"),
                ("B", "examples/step"),
                ("median_ms", "median ms"),
                ("iqr_ms", "IQR ms"),
                ("examples_per_s", "examples/s"),
                ("speedup", "vs 1 device"),
                ("temp_mib", "temp MiB/device"),
                ("rel_err", "rel. err"),
                ("status", "status"),
            ],
            rows=rows,
            notes=notes,
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# Largest batch on one device


def _measure_batch(name: str, chunk_size: int | None, batch: int, params, loss_fn, cfg: Sizes) -> dict[str, Any]:
    import jax

    from bench import common

    forget, retain, source = batches(batch, seed=batch)
    method = make_step(name, loss_fn, chunk_size=chunk_size)
    state = method.init(params)
    forget, retain = jax.device_put(forget), jax.device_put(retain)
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = jax.jit(method.step).lower(params, state, forget, retain, key).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    new_params, new_state, metrics = compiled(params, state, forget, retain, key)
    jax.block_until_ready(new_params)
    if not all(bool(np.isfinite(float(value))) for value in metrics.values()):
        raise common.CorrectnessError(f"non-finite metrics after one step at B={batch}")
    keys = list(jax.random.split(jax.random.key(2), 8))
    starts = ((params, state), (new_params, new_state))
    call = common.alternating_step_call(compiled, starts, forget, retain, keys)

    timing = common.measure(call, sync=common.jax_sync, warmup=cfg.batch_warmup, reps=cfg.batch_reps, pipelined=False)
    return {
        **timing.summary(),
        "examples_per_s": 2 * batch / (timing.median_ms / 1e3),
        "compile_s": compile_s,
        "temp_mib": analysis.temp_size_in_bytes / 2**20 if analysis is not None else None,
        "total_mib": (common.compiled_memory_bytes(compiled) or 0) / 2**20 or None,
        "data": source,
    }


def _memory_limit(cfg: Sizes) -> tuple[int, str]:
    """The bytes one device may use, and where the number comes from."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "the device's memory_stats()['bytes_limit']"
    if cfg.memory_limit_mib is None:
        raise ValueError("the device reports no bytes_limit; give --memory-limit-mib")
    return int(cfg.memory_limit_mib * 2**20), f"--memory-limit-mib {cfg.memory_limit_mib:g} (no bytes_limit reported)"


def _compiled_bytes(name: str, chunk_size: int | None, batch: int, params, loss_fn) -> int:
    """Peak bytes of the step at forget = retain = ``batch``, from compiling it on abstract batches."""
    import jax

    from bench import common

    forget, retain, _ = batches(1, seed=0)
    shapes = [
        jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((batch, *leaf.shape[1:]), leaf.dtype), tree)
        for tree in (forget, retain)
    ]
    method = make_step(name, loss_fn, chunk_size=chunk_size)
    compiled = jax.jit(method.step).lower(params, method.init(params), *shapes, jax.random.key(0)).compile()
    need = common.compiled_memory_bytes(compiled)
    if need is None:
        raise RuntimeError("this backend reports no memory analysis of a compiled step: the search cannot run")
    return need


def _largest_fitting(
    name, chunk_size, params, loss_fn, cfg: Sizes, limit: int, budget
) -> tuple[list[dict], int | None]:
    """Doubles B while the compiled step fits ``limit`` bytes; the probed points and the largest batch that fit.

    The time budget is only a backstop (the GPU session's hard limit): a search it stops says so in its last point.
    """
    points, batch, largest = [], cfg.start_batch, None
    while batch <= cfg.max_batch:
        point = {"method": name, "chunk_size": chunk_size, "B": 2 * batch}
        if not budget.allows(10):
            points.append({**point, "status": f"search stopped: time budget ({budget.left():.0f} s left)"})
            break
        try:
            need = _compiled_bytes(name, chunk_size, batch, params, loss_fn)
        except Exception as error:  # noqa: BLE001 - an OOM at compile time ends the doubling like an overflow
            if not _is_out_of_memory(error):
                raise
            points.append({**point, "status": "OOM at compile"})
            break
        points.append({**point, "need_mib": need / 2**20, "status": "fits" if need <= limit else "over the limit"})
        if need > limit:
            break
        largest, batch = batch, batch * 2
    else:
        if points:
            points[-1]["status"] += f" (cap {2 * cfg.max_batch})"
    return points, largest


def run_max_batch(report, cfg: Sizes, budget) -> None:
    import jax

    from bench import common
    from bench.common import Section

    params, loss_fn = build_model("conv_vae")
    limit, limit_source = _memory_limit(cfg)
    rows: list[dict[str, Any]] = []
    best: list[dict[str, Any]] = []
    for name, chunk_size in cfg.max_batch_rows:
        points, batch = _largest_fitting(name, chunk_size, params, loss_fn, cfg, limit, budget)
        rows.extend(points)
        print(f"{name} chunk_size={chunk_size}: largest fitting B={None if batch is None else 2 * batch}", flush=True)
        if batch is None:
            first = f"{points[0]['status']} at B={points[0]['B']}" if points else "not searched"
            best.append({"method": name, "chunk_size": chunk_size, "status": f"none fits ({first})"})
        next_status = points[-1]["status"] if points else "-"
        while batch is not None:
            row = {"method": name, "chunk_size": chunk_size, "B": 2 * batch, "limit": next_status}
            if not budget.allows(5):
                best.append({**row, "status": f"not timed: time budget ({budget.left():.0f} s left)"})
                break
            try:
                row.update(_measure_batch(name, chunk_size, batch, params, loss_fn, cfg), status="ok")
            except Exception as error:  # noqa: BLE001 - a run-time OOM halves the batch; anything else is reported
                if not _is_out_of_memory(error):
                    common.row_failure(row, error)
                    best.append(row)
                    break
                print(f"!! {name} chunk_size={chunk_size} B={2 * batch}: OOM at run time", file=sys.stderr)
                best.append({**row, "status": "OOM at run time"})
                next_status, batch = f"OOM at run time at B={2 * batch}", batch // 2
                if batch < 1:
                    break
                continue
            best.append(row)
            break
    device = jax.devices()[0]
    notes = [
        f"One {device.platform} device ({getattr(device, 'device_kind', '?')}); conv VAE 28x28x1, latent 16 "
        f"({common.parameter_count(params):,} parameters), Adam 1e-3, forget = retain = B/2; B doubles from "
        f"{2 * cfg.start_batch} while the compiled step's peak need (arguments + outputs + temporaries, XLA's "
        f"buffer assignment) fits {limit / 2**20:,.0f} MiB ({limit_source}); the largest that fits is timed.",
        f"examples/s = B / median step time ({cfg.batch_reps} synchronised steps after {cfg.batch_warmup} warm-ups); "
        "temp MiB: XLA's temporaries of the compiled step (memory_analysis().temp_size_in_bytes); total MiB adds "
        "arguments and outputs.",
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')} (share of device memory "
        "JAX may allocate).",
    ]
    report.add(
        Section(
            key="max_batch_points",
            title="One device: the compiled step's peak memory as the batch doubles (conv VAE)",
            columns=[
                ("method", "method"),
                ("chunk_size", "chunk_size"),
                ("B", "examples/step"),
                ("need_mib", "peak need MiB"),
                ("status", "status"),
            ],
            rows=rows,
            notes=notes,
        )
    )
    report.add(
        Section(
            key="max_batch",
            title="One device: the largest batch that fits and what it sustains (conv VAE)",
            columns=[
                ("method", "method"),
                ("chunk_size", "chunk_size"),
                ("B", "largest examples/step"),
                ("examples_per_s", "examples/s"),
                ("median_ms", "median ms"),
                ("temp_mib", "temp MiB"),
                ("total_mib", "total MiB"),
                ("compile_s", "compile s"),
                ("limit", "next doubling"),
                ("status", "status"),
            ],
            rows=best,
        )
    )


def _report_class():
    from bench import common

    class ShardingReport(common.Report):
        """``common.Report`` whose environment block names this module's command line."""

        def environment_markdown(self) -> str:
            lines = super().environment_markdown().splitlines()
            lines[0] = (
                f"- command: `{self.env['command']}` ({self.env['date_utc']} UTC, commit {self.env.get('git_commit')})"
            )
            return "\n".join(lines)

    return ShardingReport


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sharding", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU sizes (default)")
    mode.add_argument("--gpu", action="store_true", help="one accelerator: max-batch at GPU sizes")
    parser.add_argument(
        "--section",
        default=None,
        help="comma-separated subset of devices (alias scaling-devices), max-batch; default: quick both, gpu max-batch",
    )
    parser.add_argument("--devices", default=None, help="device counts of the devices section, e.g. 1,2,4,8")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/sharding-<mode>)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the run")
    parser.add_argument(
        "--memory-limit-mib",
        type=float,
        default=None,
        help="device memory for the max-batch search where the device reports no bytes_limit (CPU; quick: 1024)",
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:  # a device-count subprocess: print the rows as one JSON line
        cfg = sizes(args.mode or "quick")
        print("ROWS " + json.dumps(device_worker(args.worker, cfg), default=float), flush=True)
        return 0

    cfg = sizes("gpu" if args.gpu else "quick")
    if args.budget_s is not None:
        cfg.budget_s = args.budget_s
    if args.memory_limit_mib is not None:
        cfg.memory_limit_mib = args.memory_limit_mib
    if args.devices:
        cfg.devices = [int(count) for count in args.devices.split(",") if count.strip()]
    default_sections = "max-batch" if args.gpu else "devices,max-batch"
    sections = [
        {"scaling-devices": "devices"}.get(s.strip(), s.strip())
        for s in (args.section or default_sections).split(",")
        if s.strip()
    ]
    unknown = sorted(set(sections) - {"devices", "max-batch"})
    if unknown:
        parser.error(f"unknown section(s) {unknown}; allowed: devices (scaling-devices), max-batch")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"sharding-{cfg.mode}")

    import jax

    from bench import common

    jax.devices()
    total = common.Budget(cfg.budget_s)
    report = _report_class()(out_dir, mode=f"sharding {cfg.mode}", env=common.environment(None))
    report.env["command"] = "python -m bench.sharding " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report.environment_markdown(), flush=True)
    crashed = False
    for section in sections:
        try:
            if section == "devices":
                run_devices(report, cfg, total)
            else:
                run_max_batch(report, cfg, total)
        except Exception:  # noqa: BLE001 - keep what the other section measured
            import traceback

            crashed = True
            print(f"!! section {section} crashed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    report.write()
    print(f"\nTotal {total.elapsed():.0f} s. Results: {out_dir}/results.md, results.json", flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
