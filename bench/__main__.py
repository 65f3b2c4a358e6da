"""``python -m bench --quick | --full [--out DIR] [--dry-run]``: run the benchmark suite, print Markdown tables.

* ``--quick``: sizes for a CPU (a few minutes on 2 cores);
* ``--full``: sizes for one GPU call (about 5-6 minutes on an H100, kept inside ``--budget-s``);
* ``--dry-run`` (with ``--full``): every code path of ``--full`` at tiny sizes on whatever device is here, with
  ``ml_collections``, ``mlxtend`` and ``tensorflow_datasets`` made unimportable as on the GPU image, so the one
  GPU call cannot fail on a trivial bug.

Writes ``results.json`` and ``results.md`` (rewritten after every section), ``scaling.png`` and
``hlo_per_example.txt`` under ``--out`` (default ``bench/results/<mode>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

# JAX preallocates 75% of GPU memory by default; torch runs in the same process and needs room too.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")


@dataclasses.dataclass
class Config:
    """Sizes and repetitions of one mode."""

    mode: str
    budget_s: float
    # step.py
    warmup: int
    reps: int
    materialised_reps: int
    paired_reps: int
    step_row_s: float
    # per_example.py
    per_example_models: dict[str, list[int]]
    pe_warmup: int
    pe_reps: int
    per_example_row_s: float
    chunk_size: int
    torch_compile_batches: dict[str, list[int]]
    torch_compile_s: float
    hlo_batch: int
    bandwidth_elements: int
    # scaling.py
    scaling_batches: list[int]
    scaling_hidden: list[int]
    scaling_warmup: int
    scaling_reps: int
    scaling_row_s: float
    materialised_max_elements: float
    # chunking.py
    chunking_batch: int
    chunking_chunk: int
    chunking_warmup: int
    chunking_reps: int
    # share of the time budget per section; what a section leaves unused passes on to the next ones
    section_shares: dict[str, float]
    # filled in by main
    hlo_file: str | None = None
    gpu_rows: bool = False


def config(mode: str, *, dry_run: bool) -> Config:
    if mode == "quick":
        return Config(
            mode="quick",
            budget_s=480,
            warmup=3,
            reps=15,
            materialised_reps=3,
            paired_reps=50,
            step_row_s=8,
            per_example_models={"mlp_vae": [32, 128], "conv_vae": [16]},
            pe_warmup=1,
            pe_reps=5,
            per_example_row_s=6,
            chunk_size=32,
            torch_compile_batches={},
            torch_compile_s=90,
            hlo_batch=128,
            bandwidth_elements=2**24,
            scaling_batches=[32, 128, 512],
            scaling_hidden=[100, 400, 1600],
            scaling_warmup=2,
            scaling_reps=5,
            scaling_row_s=6,
            materialised_max_elements=2.1e7,
            chunking_batch=1024,
            chunking_chunk=64,
            chunking_warmup=1,
            chunking_reps=3,
            section_shares={"step": 0.45, "per_example": 0.25, "scaling": 0.15, "chunking": 0.15},
        )
    if dry_run:
        return Config(
            mode="full --dry-run",
            budget_s=900,
            warmup=1,
            reps=3,
            materialised_reps=2,
            paired_reps=3,
            step_row_s=5,
            per_example_models={"mlp_vae": [8, 16], "conv_vae": [8]},
            pe_warmup=1,
            pe_reps=2,
            per_example_row_s=5,
            chunk_size=4,
            torch_compile_batches={"mlp_vae": [16], "conv_vae": [8]},
            torch_compile_s=60,
            hlo_batch=16,
            bandwidth_elements=2**20,
            scaling_batches=[16, 32],
            scaling_hidden=[50, 100],
            scaling_warmup=1,
            scaling_reps=2,
            scaling_row_s=5,
            materialised_max_elements=1.1e7,
            chunking_batch=16,
            chunking_chunk=4,
            chunking_warmup=1,
            chunking_reps=2,
            gpu_rows=True,
            section_shares={"step": 0.35, "per_example": 0.35, "scaling": 0.15, "chunking": 0.15},
        )
    return Config(
        mode="full",
        budget_s=330,
        warmup=20,
        reps=200,
        materialised_reps=100,
        paired_reps=50,
        step_row_s=5,
        per_example_models={"mlp_vae": [64, 256, 1024, 4096], "conv_vae": [64, 256, 1024]},
        pe_warmup=5,
        pe_reps=30,
        per_example_row_s=4,
        chunk_size=256,
        torch_compile_batches={"mlp_vae": [1024], "conv_vae": [256]},
        torch_compile_s=60,
        hlo_batch=1024,
        bandwidth_elements=2**28,
        scaling_batches=[32, 128, 512, 2048],
        scaling_hidden=[100, 400, 1600, 3200],
        scaling_warmup=10,
        scaling_reps=50,
        scaling_row_s=4,
        materialised_max_elements=4e9,
        chunking_batch=1024,
        chunking_chunk=64,
        chunking_warmup=3,
        chunking_reps=20,
        gpu_rows=True,
        section_shares={"step": 0.3, "per_example": 0.45, "scaling": 0.15, "chunking": 0.1},
    )


class _BlockImports:
    """A ``sys.meta_path`` finder that makes the named top-level packages unimportable (the GPU image lacks them)."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by bench --dry-run: absent on the GPU)")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="CPU sizes, a few minutes")
    mode.add_argument("--full", action="store_true", help="GPU sizes, one call of about 5 minutes")
    parser.add_argument("--dry-run", action="store_true", help="with --full: every code path at tiny sizes")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<mode>)")
    parser.add_argument(
        "--sections",
        default="step,per_example,scaling,chunking",
        help="comma-separated subset of step,per_example,scaling,chunking",
    )
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default per mode)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows even if torch is installed")
    args = parser.parse_args(argv)
    if args.dry_run and not args.full:
        parser.error("--dry-run goes with --full (it checks the --full code paths at tiny sizes)")
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - {"step", "per_example", "scaling", "chunking"})
    if unknown:
        parser.error(f"unknown section(s) {unknown}; allowed: step, per_example, scaling, chunking")

    if args.dry_run:
        sys.meta_path.insert(0, _BlockImports({"ml_collections", "mlxtend", "tensorflow_datasets"}))

    cfg = config("quick" if args.quick else "full", dry_run=args.dry_run)
    if args.budget_s is not None:
        cfg.budget_s = args.budget_s
    out_dir = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", cfg.mode.replace(" --", "-").replace(" ", "-")
    )
    os.makedirs(out_dir, exist_ok=True)
    cfg.hlo_file = os.path.join(out_dir, "hlo_per_example.txt")

    import jax

    jax.devices()  # initialise the JAX backend before torch loads its own CUDA libraries
    from bench import common, torch_reference

    torch_device = None
    if args.no_torch:
        print("torch rows skipped (--no-torch)", flush=True)
    elif torch_reference.available():
        torch_device = torch_reference.default_device()
    else:
        print(
            "torch is not installed: its rows are skipped (pip install torch==2.13.0 gives the CPU wheel)", flush=True
        )
    total = common.Budget(cfg.budget_s)
    report = common.Report(out_dir, mode=cfg.mode, env=common.environment(torch_device))
    print(report.environment_markdown(), flush=True)

    crashed = []
    shares_left = sum(cfg.section_shares[name] for name in sections)
    for name in sections:
        budget = common.Budget(max(total.left(), 0.0) * cfg.section_shares[name] / shares_left)
        shares_left -= cfg.section_shares[name]
        print(f"\n### section {name} (budget {budget.seconds:.0f} s of {total.left():.0f} s left)", flush=True)
        try:
            module = __import__(f"bench.{name}", fromlist=["run"])
            module.run(report, cfg, budget, torch_device)
        except Exception:  # noqa: BLE001 - one broken section must not lose the others' numbers
            crashed.append(name)
            trace = traceback.format_exc()
            print(f"!! section {name} crashed:\n{trace}", file=sys.stderr, flush=True)
            report.add(
                common.Section(
                    key=name,
                    title=f"{name} (CRASHED)",
                    columns=[("error", "error")],
                    rows=[{"error": trace.strip().splitlines()[-1]}],
                )
            )
        print(f"### section {name} took {budget.elapsed():.0f} s", flush=True)

    report.write()
    print("\n## Targets (issue 5)\n")
    for target in report.targets():
        print(target.line())
    print(
        f"\nTotal {total.elapsed():.0f} s. Results: {out_dir}/results.md, results.json"
        + (", scaling.png" if "scaling" in sections else "")
        + (", hlo_per_example.txt" if "per_example" in sections else ""),
        flush=True,
    )
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
