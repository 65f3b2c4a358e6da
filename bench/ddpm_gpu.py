"""The DDPM GPU run (issues 7 and 13) in one call: measure the step rate, train, unlearn, collect under $OUT.

Run through ``bench/ddpm_gpu.sh`` (which installs the carried wheels and wraps this in an outer ``timeout``)::

    python bench/ddpm_gpu.py run --out $OUT [--budget-s 520] [--smoke] [--forget-classes 1,3,8]
        [--methods sa,s] [--seeds 3] [--reuse] [--unconditional]

Phases, each its own process (so that each holds the accelerator alone) with a timeout from what is left of the
budget, every phase's outputs copied to ``--out`` as soon as it ends (a phase killed by its timeout still leaves
what the earlier ones wrote):

1. ``probe``: compiles the DDPM's real training epoch (``gsu_jax.training``'s own programs) and times one epoch;
2. ``train.py`` processes at once, sharing the accelerator: ``configs/mnist_ddpm.py`` (DDPM + evaluator) and one
   oracle per forget class (the same recipe with ``exclude_classes=c``), with as many epochs as the budget affords;
3. ``unlearn.py`` on ``configs/unlearn_mnist_ddpm.py`` from those checkpoints, once per forget class: runs the
   config's methods (or ``--methods``) and reports forget fraction, FID and the forget-label protocol before and
   after, under ``$OUT/forget_<c>/``.

``--reuse`` skips phases 1-2 when ``--workdir`` already holds the finished DDPM, its evaluator and every oracle,
trained for the same ``--smoke`` / ``--unconditional`` (a second call on the same warm machine: train once, unlearn in
as many calls as the methods need). The unlearning time is budgeted at ``_UNLEARN_S_PER_RUN`` per method, class and
seed; a call whose runs would leave less than 40 % of ``--budget-s`` for training (all of it, with ``--reuse``) is
refused before any work.

``--smoke`` swaps in configs/ddpm_smoke.py / configs/unlearn_ddpm_smoke.py on the embedded digits (what the CPU
check of this script runs). Only the standard library is imported here; the phases import gsu_jax.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
# Seconds reserved besides the training epochs (measured on CPU, estimated for the GPU): each train.py/unlearn.py
# process start, held-out evaluation and sample PNG of a DDPM, the unlearning phase (two methods compiled, 50 steps
# each with monitoring, six full evaluations), and a safety margin.
_PROCESS_START_S = 15.0
_EVALUATION_S = 30.0
# One method, class and seed: 50 monitored steps and two evaluations (about 100 s on the H100 with sa and s, 2026-11-26).
_UNLEARN_S_PER_RUN = 100.0
_MARGIN_S = 25.0
# An oracle trains on the data minus one digit: about 0.9 of the DDPM's steps.
_ORACLE_SHARE = 0.9


def _configs(smoke: bool) -> tuple[str, str, str]:
    if smoke:
        return "configs/ddpm_smoke.py", "configs/unlearn_ddpm_smoke.py", "embedded"
    return "configs/mnist_ddpm.py", "configs/unlearn_mnist_ddpm.py", "idx:.carry/mnist"


# ------------------------------------------------------------------------------------------- phase 1: probe


def probe(train_config: str, data: str) -> dict:
    """Compiles and times the generative role's training epoch exactly as train.py runs it (prints JSON)."""
    import jax

    from gsu_jax import provenance, training
    from gsu_jax.config_validation import load_config_file, validate_train_config
    from gsu_jax.training import plan as training_plan
    from gsu_jax.training import programs as training_programs

    config = load_config_file(REPO / train_config)
    config.data = data
    values = validate_train_config(config)
    run_data = training.prepare_data(values)
    plan = training_plan.plan_role("generative", values, run_data)  # the bench times train.py's own programs
    programs = training_programs.compiled_programs(plan.spec)
    params, opt_state = programs.init_state(jax.random.key(0))
    images, labels = jax.numpy.asarray(plan.train.images), jax.numpy.asarray(plan.train.labels)
    timings = []
    for epoch in range(2):
        started = time.perf_counter()
        params, opt_state, losses, _ = programs.train_epoch(params, opt_state, images, labels, jax.random.key(epoch))
        jax.block_until_ready(losses)
        timings.append(time.perf_counter() - started)
    return {
        "device": provenance.device_name(),
        "first_epoch_s": timings[0],
        "epoch_s": timings[1],
        "compile_s": max(0.0, timings[0] - timings[1]),
        "steps_per_epoch": plan.spec.num_batches,
        "batch_size": plan.spec.batch_size,
        "num_train": len(plan.train),
        "config_epochs": values["num_epochs"],
        "first_epoch_loss": float(losses.mean()),
    }


# ------------------------------------------------------------------------------------------- orchestration


def _phases(
    commands: dict[str, list[str]],
    *,
    timeout: float,
    out: pathlib.Path,
    record: dict,
    env: dict[str, str] | None = None,
) -> bool:
    """Runs the named commands concurrently (each its own process) under one timeout; True if all exit 0."""
    started = time.perf_counter()
    processes = {}
    for name, command in commands.items():
        print(f"[ddpm_gpu] {name}: {' '.join(command)} (timeout {timeout:.0f} s)", flush=True)
        processes[name] = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    all_ok = True
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - started)))
            status = process.returncode
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            status = "timeout"
        command = " ".join(commands[name])
        (out / f"{name}.log").write_text(f"$ {command}\n--- stdout\n{stdout}\n--- stderr\n{stderr[-20000:]}\n")
        record["phases"][name] = {"status": status, "seconds": round(time.perf_counter() - started, 1)}
        print(f"[ddpm_gpu] {name}: {status} after {record['phases'][name]['seconds']} s", flush=True)
        if stdout.strip():
            print(stdout.strip()[-4000:], flush=True)
        all_ok = all_ok and status == 0
    return all_ok


def _copy(source: pathlib.Path, target: pathlib.Path) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _collect_training(workdir: pathlib.Path, out: pathlib.Path, prefix: str, record: dict) -> None:
    for role in ("generative", "evaluator"):
        metrics_path = workdir / role / "metrics.json"
        if metrics_path.is_file():
            record[f"{prefix}_{role}"] = json.loads(metrics_path.read_text())
            _copy(metrics_path, out / f"{prefix}_{role}_metrics.json")
    _copy(workdir / "generative" / "samples.png", out / f"{prefix}_samples.png")


def _finished(workdir: pathlib.Path, roles: tuple[str, ...]) -> bool:
    """Whether train.py finished every role of ``roles`` in ``workdir`` (a role's metrics are written last)."""
    return all((workdir / role / "metrics.json").is_file() for role in roles)


def _reusable(workdir: pathlib.Path, oracle_dirs: dict, settings: dict) -> bool:
    """Whether ``workdir`` holds the finished DDPM, its evaluator and every oracle, trained with ``settings``."""
    marker = workdir / "train_settings.json"
    if not marker.is_file() or json.loads(marker.read_text()) != settings:
        return False
    models = _finished(workdir / "model", ("generative", "evaluator"))
    return models and all(_finished(path, ("generative",)) for path in oracle_dirs.values())


def _collect_unlearning(workdir: pathlib.Path, out: pathlib.Path, record: dict) -> None:
    for name in ("report.json", "report.md", "forget_fraction.png"):
        _copy(workdir / name, out / name)
    for sub in ("samples", "logs"):
        for path in sorted((workdir / sub).glob("*")):
            _copy(path, out / sub / path.name)
    report_path = workdir / "report.json"
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text())
    keys = (
        "forget_fraction",
        "fid_retain",
        "fid_all",
        "inception_score",
        "forget_label_class_prob",
        "forget_label_entropy",
        "eps_loss_heldout_retain",
        "eps_loss_heldout_forget",
        "mia_auc",
    )
    summary = {name: {key: report[name].get(key) for key in keys} for name in ("original", "oracle")}
    method_keys = [f"{key}_{when}" for key in keys if key != "mia_auc" for when in ("at_stop", "at_end")]
    for label, method in report["methods"].items():
        summary[label] = {
            "steps_to_threshold": method["steps_to_threshold"]["per_seed"],
            "step_time_ms": method["step_time_ms"]["mean"],
        }
        for key in method_keys + ["mia_auc"]:
            if method.get(key):
                summary[label][key] = method[key]["mean"]
    record.update(threshold=report["threshold"]["value"], device=report["device"], summary=summary)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    train_config, unlearn_config, data = _configs(args.smoke)
    classes = [token.strip() for token in args.forget_classes.split(",") if token.strip()]
    workdir = pathlib.Path(args.workdir).absolute()
    workdir = workdir / ("unconditional" if args.unconditional else "conditional")
    model_dir = workdir / "model"
    oracle_dirs = {c: workdir / f"oracle_{c}" for c in classes}
    methods = args.methods
    if args.unconditional:  # salun relabels the forget examples: it needs class labels (unlearn.py refuses it)
        methods = ",".join(name for name in methods.split(",") if not name.startswith("salun"))
    runs = len(classes) * len(methods.split(",")) * (args.seeds or 1)
    # What the trained models depend on (a later --reuse call must ask for the same).
    settings = {"smoke": args.smoke, "unconditional": args.unconditional, "budget_s": args.budget_s, "runs": runs}
    reuse = args.reuse and _reusable(workdir, oracle_dirs, {**settings, "runs": None, "budget_s": None})
    unlearn_s = _UNLEARN_S_PER_RUN * runs
    if unlearn_s > (args.budget_s if reuse else 0.6 * args.budget_s):
        raise SystemExit(
            f"[ddpm_gpu] {runs} unlearning runs (methods x classes x seeds) need about {unlearn_s:.0f} s, more than "
            f"{'the' if reuse else '60 % of the'} --budget-s {args.budget_s:.0f} s"
            f"{'' if reuse else ' (training needs the rest)'}; allowed: fewer --methods, --forget-classes or --seeds, "
            "or --reuse models trained by an earlier call"
        )
    if not reuse:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        # The marker is what --reuse compares; the budget and runs of this call do not change the models' recipe.
        (workdir / "train_settings.json").write_text(json.dumps({**settings, "runs": None, "budget_s": None}))
    record: dict = {
        "budget_s": args.budget_s,
        "smoke": args.smoke,
        "train_config": train_config,
        "unlearn_config": unlearn_config,
        "data": data,
        "forget_classes": classes,
        "methods": methods,
        "seeds": args.seeds,
        "reused_models": reuse,
        "class_conditional": not args.unconditional,
        "phases": {},
        "unlearning": {},
    }

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def save() -> None:
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")

    python = sys.executable
    if not reuse and not _train(args, record, out, workdir, oracle_dirs, train_config, data, runs, left, save):
        return 1
    for forget_class, oracle_dir in oracle_dirs.items():
        # One unlearning workdir per class and method list (a later call with other methods starts its own).
        unlearn_dir = workdir / f"unlearn_{forget_class}" / methods.replace(",", "+")
        unlearn_command = [
            python,
            "unlearn.py",
            "--config",
            unlearn_config,
            "--workdir",
            str(unlearn_dir),
            f"--config.checkpoint={model_dir}",
            f"--config.oracle_checkpoint={oracle_dir}",
            f"--config.forget_classes={forget_class}",
            "--config.progress=True",
            f"--config.methods={methods}",
            *([f"--config.seeds={args.seeds}"] if args.seeds else []),
        ]
        entry = record["unlearning"].setdefault(forget_class, {"command": " ".join(unlearn_command[1:])})
        class_out = out / f"forget_{forget_class}"
        class_out.mkdir(parents=True, exist_ok=True)
        ok = _phases({f"unlearn_{forget_class}": unlearn_command}, timeout=left() - 5, out=out, record=record)
        _collect_unlearning(unlearn_dir, class_out, entry)
        save()
        if not ok:
            return 1
    return 0


def _train(args, record, out, workdir, oracle_dirs, train_config, data, runs, left, save) -> bool:
    """Phases 1 and 2: probe the epoch time, then train the DDPM and every oracle at once in what the budget leaves."""
    python = sys.executable
    probe_out = workdir / "probe.json"
    ok = _phases(
        {
            "probe": [
                python,
                "bench/ddpm_gpu.py",
                "probe",
                "--config",
                train_config,
                "--data",
                data,
                "--json",
                str(probe_out),
            ]
        },
        timeout=min(150.0, left()),
        out=out,
        record=record,
    )
    if not ok:
        save()
        return False
    record["probe"] = json.loads(probe_out.read_text())
    epoch_s, compile_s = record["probe"]["epoch_s"], record["probe"]["compile_s"]
    # The DDPM and the oracles train at once (processes sharing the accelerator: their compiles, evaluations and
    # process starts overlap); their epochs are budgeted as if they did not overlap at all (the worst case).
    unlearn_s = _UNLEARN_S_PER_RUN * runs
    fixed = compile_s + _EVALUATION_S + _PROCESS_START_S + unlearn_s + _MARGIN_S
    affordable = math.floor((left() - fixed) / ((1 + _ORACLE_SHARE * len(oracle_dirs)) * epoch_s))
    epochs = max(1, min(record["probe"]["config_epochs"], affordable))
    record["epochs"] = epochs
    record["train_steps"] = epochs * record["probe"]["steps_per_epoch"]
    print(
        f"[ddpm_gpu] epoch {epoch_s:.2f} s, compile {compile_s:.1f} s, {left():.0f} s left: {epochs} epochs "
        f"({record['train_steps']} steps) of {record['probe']['config_epochs']} configured",
        flush=True,
    )
    save()
    model_dir = workdir / "model"
    common = [f"--config.data={data}", f"--config.num_epochs={epochs}", "--config.progress_bar=False"]
    if args.unconditional:
        common += ["--config.class_conditional=False", "--config.guidance_scale=0"]
    train_commands = {
        "train": [
            python,
            "train.py",
            "--config",
            train_config,
            "--workdir",
            str(model_dir),
            *common,
            "--config.roles=generative,evaluator",
        ],
    }
    for forget_class, oracle_dir in oracle_dirs.items():
        # The retrain-from-scratch oracle of each forget class: the same recipe without that class.
        train_commands[f"train_oracle_{forget_class}"] = [
            python,
            "train.py",
            "--config",
            train_config,
            "--workdir",
            str(oracle_dir),
            *common,
            f"--config.exclude_classes={forget_class}",
            "--config.roles=generative",
        ]
    record["train_commands"] = {name: " ".join(command[1:]) for name, command in train_commands.items()}
    # Several JAX processes on one accelerator: none may preallocate most of its memory.
    fraction = f"{0.9 / len(train_commands):.2f}"
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=fraction)
    ok = _phases(train_commands, timeout=left() - unlearn_s / 2, out=out, record=record, env=env)
    _collect_training(model_dir, out, "model", record)
    for forget_class, oracle_dir in oracle_dirs.items():
        _collect_training(oracle_dir, out, f"oracle_{forget_class}", record)
    save()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    run_parser = sub.add_parser("run", help="the whole GPU run")
    run_parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/ddpm_gpu"))
    run_parser.add_argument("--workdir", default="/tmp/gsu_ddpm_gpu", help="checkpoints (not copied to --out)")
    run_parser.add_argument("--budget-s", type=float, default=520.0, help="the whole run's time budget")
    run_parser.add_argument("--smoke", action="store_true", help="tiny configs on the embedded digits (CPU check)")
    run_parser.add_argument("--forget-classes", default="1", help="comma-separated digits, one oracle and run each")
    run_parser.add_argument(
        "--methods",
        default="sa,s",
        help="config.methods for unlearn.py (default sa,s: what fits one call with training)",
    )
    run_parser.add_argument("--seeds", type=int, default=None, help="config.seeds for unlearn.py")
    run_parser.add_argument("--reuse", action="store_true", help="keep a workdir whose models are all finished")
    run_parser.add_argument("--unconditional", action="store_true", help="train and unlearn unconditional DDPMs")
    probe_parser = sub.add_parser("probe", help="time one training epoch (phase 1)")
    probe_parser.add_argument("--config", required=True)
    probe_parser.add_argument("--data", required=True)
    probe_parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.mode == "probe":
        result = probe(args.config, args.data)
        from gsu_jax import io  # the probe process has imported gsu_jax; the orchestrator stays standard-library

        io.write_json(args.json, result)
        print(json.dumps(result))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
