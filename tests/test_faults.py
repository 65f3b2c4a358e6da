"""Faults caused for real: interrupted runs resumed, NaN gradients, diverging runs, damaged or foreign saved results.

* ``train.py`` and ``unlearn.py`` subprocesses are killed with SIGKILL at a random (seeded) moment after their first
  checkpoint / first finished (method, seed) result reaches the disk, re-run with the same command and workdir, and
  must end bit-identical to an uninterrupted run started beside them. The same with SIGTERM (``train.py``) and
  SIGINT (``unlearn.py``), which must also stop cleanly: status 143 / 130 and one line saying what was saved. A kill that comes too late (the process had
  already finished) is retried on a fresh workdir with no delay, so every assertion is about a real interruption.
* NaN gradients are injected through the loss (NaN on marked forget examples; data with NaN pixels is refused by
  the loader) into the real compiled step of a real method: the poisoned steps are skipped and counted and the result equals a replay without them; poison on
  every step stops the run with an error; ``unlearn.py`` with an exploding learning rate exits 1 in one line and
  writes no model.
* Saved results that were edited, or computed by another config or other models, are refused.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gsu_jax import checkpointing, io, losses, methods, models, reporting, training, unlearning
from gsu_jax import data as data_lib
from gsu_jax.unlearning.loop import batch_schedule, run_steps, save_unlearned, seed_record
from gsu_jax.unlearning.results import load_result, read_result

REPO = pathlib.Path(__file__).resolve().parent.parent
ROLES = ("generative", "evaluator", "guidance")
TRAIN = ("train.py", "--config", "configs/smoke.py")
# One guided method, two seeds, three steps: two results, so a kill after the first leaves one to redo.
UNLEARN = (
    "unlearn.py",
    "--config",
    "configs/unlearn_smoke.py",
    "--config.methods=sa",
    "--config.seeds=2",
    "--config.save_params=all",
)
KILL_DELAYS = random.Random(8)  # seeded: the kill moments are random but the same on every test run

pytestmark = pytest.mark.slow


def _start(args: tuple[str, ...], workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args, "--workdir", str(workdir), *extra],
        cwd=REPO,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


def _kill_after(
    args: tuple[str, ...],
    workdir: pathlib.Path,
    extra: tuple[str, ...],
    saved: Callable[[pathlib.Path], bool],
    finished: Callable[[pathlib.Path], bool],
    sig: signal.Signals = signal.SIGKILL,
) -> tuple[pathlib.Path, str]:
    """Starts a run, sends it ``sig`` a random moment after ``saved(workdir)`` holds; returns the interrupted workdir
    and the run's stderr. A SIGKILL must end it by the signal, a SIGINT or SIGTERM with status ``128 + sig``.

    If the run finished before the signal landed, it is started again on a fresh workdir and signalled at once.
    """
    expected = -sig if sig == signal.SIGKILL else 128 + sig
    for attempt, delay in enumerate((KILL_DELAYS.uniform(0.0, 1.0), 0.0)):
        target = workdir.with_name(f"{workdir.name}_{attempt}")
        process = _start(args, target, *extra)
        deadline = time.monotonic() + 600
        while not saved(target) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=600)
        assert saved(target), f"the run ended before saving anything (status {process.returncode}): {stderr[-2000:]}"
        if not finished(target):
            assert process.returncode == expected, (process.returncode, stderr[-3000:])
            return target, stderr
    pytest.fail(f"both runs finished before the {sig.name} landed")


def _train_checkpoint_saved(workdir: pathlib.Path) -> bool:
    return any(path.name.isdigit() for path in workdir.glob("*/checkpoints/*"))


def _unlearn_result_saved(workdir: pathlib.Path) -> bool:
    return any(workdir.glob("results/*/seed_*.json"))


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    """An uninterrupted train.py run, the oracle's, and a run SIGKILLed after its first checkpoint, re-run."""
    root = tmp_path_factory.mktemp("faults_train")
    reference = _start(TRAIN, root / "reference")
    oracle = _start(TRAIN, root / "oracle", "--config.exclude_classes=1", "--config.roles=generative")
    finished = lambda workdir: (workdir / "summary.json").exists()  # noqa: E731
    interrupted, _ = _kill_after(TRAIN, root / "killed", (), _train_checkpoint_saved, finished)
    steps_at_kill = _checkpoint_steps(interrupted)
    terminated, terminated_stderr = _kill_after(
        TRAIN, root / "terminated", (), _train_checkpoint_saved, finished, signal.SIGTERM
    )
    steps_at_term = _checkpoint_steps(terminated)
    reruns = [_start(TRAIN, interrupted), _start(TRAIN, terminated)]
    for process in (reference, oracle, *reruns):
        _finish(process)
    return types.SimpleNamespace(
        reference=root / "reference",
        oracle=root / "oracle",
        resumed=interrupted,
        steps_at_kill=steps_at_kill,
        terminated=terminated,
        terminated_stderr=terminated_stderr,
        steps_at_term=steps_at_term,
    )


def _checkpoint_steps(workdir: pathlib.Path) -> dict[str, list[int]]:
    return {
        role: sorted(int(p.name) for p in (workdir / role / "checkpoints").glob("*") if p.name.isdigit())
        for role in ROLES
        if (workdir / role / "checkpoints").is_dir()
    }


@pytest.fixture(scope="module")
def unlearn_runs(train_runs, tmp_path_factory):
    """Beside an uninterrupted unlearn.py run: one SIGKILLed after its first saved result and re-run, and one that
    diverges (learning rate 1e30)."""
    root = tmp_path_factory.mktemp("faults_unlearn")
    models_args = (f"--config.checkpoint={train_runs.reference}", f"--config.oracle_checkpoint={train_runs.oracle}")
    reference = _start(UNLEARN, root / "reference", *models_args)
    diverging = subprocess.Popen(
        [
            sys.executable,
            *UNLEARN,
            "--workdir",
            str(root / "diverging"),
            *models_args,
            "--config.seeds=1",
            "--config.max_steps=8",
            "--config.optimizer.learning_rate=1e30",
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    finished = lambda workdir: (workdir / "report.json").exists()  # noqa: E731
    interrupted, _ = _kill_after(UNLEARN, root / "killed", models_args, _unlearn_result_saved, finished)
    saved_at_kill = sorted(str(p.relative_to(interrupted)) for p in interrupted.glob("results/*/seed_*.json"))
    ctrl_c, ctrl_c_stderr = _kill_after(
        UNLEARN, root / "ctrl_c", models_args, _unlearn_result_saved, finished, signal.SIGINT
    )
    saved_at_ctrl_c = sorted(str(p.relative_to(ctrl_c)) for p in ctrl_c.glob("results/*/seed_*.json"))
    reruns = [_start(UNLEARN, interrupted, *models_args), _start(UNLEARN, ctrl_c, *models_args)]
    for process in (reference, *reruns):
        _finish(process)
    diverged = diverging.communicate(timeout=600)
    return types.SimpleNamespace(
        reference=root / "reference",
        resumed=interrupted,
        saved_at_kill=saved_at_kill,
        reference_report=json.loads((root / "reference" / "report.json").read_text()),
        resumed_report=json.loads((interrupted / "report.json").read_text()),
        ctrl_c_stderr=ctrl_c_stderr,
        saved_at_ctrl_c=saved_at_ctrl_c,
        ctrl_c_report=json.loads((ctrl_c / "report.json").read_text()),
        diverging=root / "diverging",
        diverged_status=diverging.returncode,
        diverged_stderr=diverged[1],
        models_args=models_args,
    )


# ------------------------------------------------------------------------------------------- SIGKILL, train.py


def _assert_same_models(resumed_dir: pathlib.Path, reference_dir: pathlib.Path) -> None:
    """Every role of a resumed train.py workdir equals the uninterrupted run's: parameters bit for bit, optimizer
    state by digest, the loss history."""
    for role in ROLES:
        resumed = training.load_trained(resumed_dir, role)
        uninterrupted = training.load_trained(reference_dir, role)
        chex.assert_trees_all_equal(resumed.params, uninterrupted.params)  # bit for bit
        assert resumed.metadata["opt_state_digest"] == uninterrupted.metadata["opt_state_digest"]
        assert resumed.metadata["history"] == uninterrupted.metadata["history"]


def test_train_run_killed_with_sigkill_resumes_bit_identical(train_runs):
    assert train_runs.steps_at_kill["generative"], "the kill came before the first checkpoint"
    _assert_same_models(train_runs.resumed, train_runs.reference)
    # The re-run continued from what the killed run had saved, not from scratch.
    summary = json.loads((train_runs.resumed / "summary.json").read_text())
    for role, steps in train_runs.steps_at_kill.items():
        if steps:
            assert summary["roles"][role]["resumed_from_step"] == steps[-1], role


# ------------------------------------------------------------------------------------------- SIGKILL, unlearn.py


def test_unlearn_run_killed_with_sigkill_resumes_to_the_same_report(unlearn_runs):
    resumed, reference = unlearn_runs.resumed_report, unlearn_runs.reference_report
    assert unlearn_runs.saved_at_kill, "the kill came before the first result"
    # The results on disk at the kill were read back, the others recomputed: together, the uninterrupted report.
    read_back = {f"results/{entry.replace(' seed ', '/seed_')}.json" for entry in resumed["resumed"]}
    assert read_back == set(unlearn_runs.saved_at_kill)
    assert reporting.without_volatile_fields(resumed) == reporting.without_volatile_fields(reference)
    assert reference["resumed"] == []
    for label in reference["methods"]:
        logs = []
        for workdir in (unlearn_runs.resumed, unlearn_runs.reference):
            with open(workdir / "logs" / f"{label}.csv") as handle:
                logs.append(
                    [
                        {k: v for k, v in row.items() if k not in reporting.VOLATILE_LOG_COLUMNS}
                        for row in csv.DictReader(handle)
                    ]
                )
        assert logs[0] == logs[1]


def test_unlearn_run_killed_with_sigkill_saves_bit_identical_unlearned_models(unlearn_runs, train_runs):
    target = checkpointing.abstract_like(training.load_trained(train_runs.reference, "generative").params)
    for label, summary in unlearn_runs.reference_report["methods"].items():
        for record in summary["per_seed"]:
            restored = []
            for workdir in (unlearn_runs.resumed, unlearn_runs.reference):
                with checkpointing.Checkpointer(
                    workdir / "unlearned" / label / f"seed_{record['seed']}", create=False
                ) as ckpt:
                    params, _, metadata = ckpt.restore(abstract_params=target)
                assert metadata["params_digest"] == record["params_digest_at_stop"]
                restored.append(params)
            chex.assert_trees_all_equal(*restored)


# ------------------------------------------------------------------------------------------- SIGTERM and SIGINT


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_train_run_stopped_by_sigterm_says_what_it_saved_exits_143_and_resumes_bit_identical(train_runs):
    line = _one_line(train_runs.terminated_stderr)
    newest = {role: steps[-1] for role, steps in train_runs.steps_at_term.items() if steps}
    assert newest, "no checkpoint at the SIGTERM"
    assert line.startswith(f"train.py: interrupted by SIGTERM: checkpoints saved in '{train_runs.terminated}' (")
    assert all(f"{role} at step {step}" in line for role, step in newest.items()), (newest, line)
    assert line.endswith("; rerun the same command to resume")
    _assert_same_models(train_runs.terminated, train_runs.reference)


def test_unlearn_run_stopped_by_ctrl_c_says_what_it_saved_exits_130_and_resumes_to_the_same_report(unlearn_runs):
    line = _one_line(unlearn_runs.ctrl_c_stderr)
    count = len(unlearn_runs.saved_at_ctrl_c)
    assert count >= 1
    assert line.startswith(f"unlearn.py: interrupted by SIGINT: {count} finished (method, seed) run(s) saved in ")
    assert line.endswith("the run in flight abandoned; rerun the same command to resume")
    resumed, reference = unlearn_runs.ctrl_c_report, unlearn_runs.reference_report
    read_back = {f"results/{entry.replace(' seed ', '/seed_')}.json" for entry in resumed["resumed"]}
    assert read_back == set(unlearn_runs.saved_at_ctrl_c)
    assert reporting.without_volatile_fields(resumed) == reporting.without_volatile_fields(reference)


# ------------------------------------------------------------------------------------------- resuming inside a run

# The run's state saved every step: a SIGKILL between two saves loses at most one step.
_INFLIGHT = ("--config.checkpoint_every_steps=1",)


def _inflight_saved(workdir: pathlib.Path) -> bool:
    return any(path.name.isdigit() for path in workdir.glob("inflight/*/seed_*/*"))


def _kill_inside_a_run(workdir: pathlib.Path, extra: tuple[str, ...]) -> pathlib.Path:
    """SIGKILLs a run as soon as a (method, seed) run's state is on disk; retried (fresh workdir) when the kill came
    when no state was saved (between one seed's result and the next seed's first save, or after the end)."""
    for attempt in range(4):
        target = workdir.with_name(f"{workdir.name}_{attempt}")
        process = _start(UNLEARN, target, *extra)
        deadline = time.monotonic() + 600
        while not _inflight_saved(target) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        if _inflight_saved(target) and not (target / "report.json").exists():
            return target
    pytest.fail("no kill landed while a run's state was saved")


def test_an_unlearn_run_killed_inside_a_run_resumes_from_its_last_step_bit_identical(unlearn_runs, tmp_path):
    models_args = unlearn_runs.models_args
    killed = _kill_inside_a_run(tmp_path / "killed", (*models_args, *_INFLIGHT))
    saved_steps = sorted(int(p.name) for p in killed.glob("inflight/*/seed_*/*") if p.name.isdigit())
    rerun = subprocess.run(
        [sys.executable, *UNLEARN, "--workdir", str(killed), *models_args, *_INFLIGHT, "--config.progress=True"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step {saved_steps[-1]}" in rerun.stdout + rerun.stderr
    assert not list(killed.glob("inflight/*/*"))  # removed once the results were saved
    resumed_report = json.loads((killed / "report.json").read_text())
    reference_report = dict(unlearn_runs.reference_report)  # the same run without checkpoint_every_steps
    # Equal but for the config, which records the checkpointing and progress flags the reference run did not set.
    for report in (resumed_report, reference_report):
        report.pop("config")
    assert reporting.without_volatile_fields(resumed_report) == reporting.without_volatile_fields(reference_report)
    for label, summary in reference_report["methods"].items():
        for record, resumed in zip(summary["per_seed"], resumed_report["methods"][label]["per_seed"], strict=True):
            assert resumed["params_digest_at_stop"] == record["params_digest_at_stop"]  # bit for bit
            assert resumed["params_digest_at_end"] == record["params_digest_at_end"]


# ------------------------------------------------------------------------------------------- a disk that fills up

# Injected at the write layer (every Python-written file goes through gsu_jax.io.atomic_file, which fsyncs): in the
# child process, fsync of the temporary file of the second seed's result fails with ENOSPC, as on a full disk.
_ENOSPC_ON_SECOND_RESULT = (
    "import errno, os\n"
    "_fsync = os.fsync\n"
    "def _full(fd):\n"
    "    if '.seed_1.json.tmp-' in os.readlink(f'/proc/self/fd/{fd}'):\n"
    "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
    "    return _fsync(fd)\n"
    "os.fsync = _full\n"
)


def test_a_result_write_on_a_full_disk_fails_in_one_line_keeps_what_was_saved_and_resumes(unlearn_runs, tmp_path):
    fake = tmp_path / "full_disk"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(_ENOSPC_ON_SECOND_RESULT)
    workdir = tmp_path / "run"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, *UNLEARN, "--workdir", str(workdir), *unlearn_runs.models_args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 1, done.stderr[-3000:]
    (label,) = unlearn_runs.reference_report["methods"]
    failed = workdir / "results" / label / "seed_1.json"
    assert _one_line(done.stderr).startswith(
        f"unlearn.py: error: could not write '{failed}': No space left on device ("
    ), done.stderr
    assert "MiB free on its file system); free space and rerun the same command to resume" in done.stderr
    # The first seed's result is whole; the failed one left neither a file nor a temporary.
    assert read_result(workdir / "results" / label / "seed_0.json")  # intact: its digest checks
    assert not failed.exists() and not list(workdir.rglob(".*.tmp-*"))
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["resumed"] == [f"{label} seed 0"]
    assert reporting.without_volatile_fields(report) == reporting.without_volatile_fields(unlearn_runs.reference_report)


@contextlib.contextmanager
def _small_filesystem(path: pathlib.Path, size_mib: int):
    """A size-limited tmpfs mounted at ``path`` (needs root: skipped where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: pathlib.Path) -> pathlib.Path | None:
    """Writes a file until the file system is full (as another process filling the disk would).

    Returns None when the file system is already too full to create the file (CI once saw ``open`` fail with
    ENOSPC here): that is the state the test needs, so it is not an error.
    """
    filler = directory / "filler"
    try:
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        return None
    # Unbuffered writes: CI once saw a buffered file's close() re-raise ENOSPC while flushing what the failed
    # write left in its buffer. A raw descriptor has no buffer to flush, so closing it cannot fail that way.
    try:
        chunk = b"\0" * 2**16
        while True:
            os.write(descriptor, chunk)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
    finally:
        os.close(descriptor)
    return filler


def _free_space(directory: pathlib.Path) -> str:
    stats = os.statvfs(directory)
    return f"{stats.f_bavail * stats.f_frsize / 2**20:.1f} MiB and {stats.f_favail} inodes free"


def test_a_disk_that_fills_up_mid_training_fails_in_one_line_and_the_rerun_resumes_bit_identical(train_runs, tmp_path):
    """For real: train.py on a 64 MiB tmpfs that another writer fills after the first checkpoint."""
    with _small_filesystem(tmp_path / "small", 64) as small:
        # Freed with the filler: space for the rerun even if the run filled the disk by itself.
        reserve = small / "reserve"
        reserve.write_bytes(b"\0" * 2**22)
        workdir = small / "run"
        process = _start(TRAIN, workdir)
        deadline = time.monotonic() + 600
        while not _train_checkpoint_saved(workdir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # Paused while the filler fills the disk: on a loaded machine the run could otherwise fill it by itself
        # before the filler starts, and then no space would be freed for the rerun.
        process.send_signal(signal.SIGSTOP)
        filler = _fill(small)
        state = f"after filling: {_free_space(small)}; the filler {'was' if filler else 'could not be'} created"
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=600)
        if process.returncode == 0:
            pytest.fail(f"the run finished before the disk filled up ({state})")
        assert process.returncode == 1, f"{state}\n{stderr[-3000:]}"
        line = _one_line(stderr)
        assert line.startswith("train.py: error: could not write "), f"{state}: {line}"
        assert "No space left on device (" in line and "MiB free on its file system)" in line, line
        steps_at_failure = _checkpoint_steps(workdir)
        for path in (filler, reserve):  # space freed: the same command resumes from the last complete checkpoint
            if path is not None:
                path.unlink()
        _finish(_start(TRAIN, workdir))
        summary = json.loads((workdir / "summary.json").read_text())
        for role, steps in steps_at_failure.items():
            if steps:
                assert summary["roles"][role]["resumed_from_step"] == steps[-1], role
        _assert_same_models(workdir, train_runs.reference)


# ------------------------------------------------------------------------------------------- saved results


def _smoke_config(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_faults_unlearn_smoke", REPO / "configs" / "unlearn_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.methods, config.seeds, config.save_params = "sa", 2, "all"
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _mtimes(workdir: pathlib.Path) -> dict[pathlib.Path, int]:
    return {path: path.stat().st_mtime_ns for path in workdir.rglob("*")}


def test_results_of_another_config_are_refused_before_any_work(unlearn_runs, train_runs):
    workdir = unlearn_runs.reference
    before = _mtimes(workdir)
    models_dirs = {"checkpoint": str(train_runs.reference), "oracle_checkpoint": str(train_runs.oracle)}
    with pytest.raises(unlearning.UnlearnConfigError, match=r"holds results of another run.*config\.max_steps: 3 -> 4"):
        unlearning.plan_run(_smoke_config(max_steps=4, **models_dirs), workdir)
    # Selecting other seeds or methods is not another run: the saved ones stay usable.
    unlearning.plan_run(_smoke_config(seeds=3, **models_dirs), workdir)
    assert _mtimes(workdir) == before


def test_an_edited_saved_result_is_refused_naming_the_file(unlearn_runs, train_runs, tmp_path):
    workdir = tmp_path / "edited"
    shutil.copytree(unlearn_runs.reference, workdir)
    path = workdir / "results" / "sa+guided" / "seed_1.json"
    saved = json.loads(path.read_text())
    saved["content"]["record"]["fid_retain_at_end"] += 1.0
    path.write_text(json.dumps(saved))
    config = _smoke_config(checkpoint=str(train_runs.reference), oracle_checkpoint=str(train_runs.oracle))
    with pytest.raises(unlearning.UnlearnConfigError, match=r"seed_1\.json' is damaged or was edited") as info:
        unlearning.plan_run(config, workdir)
    assert isinstance(info.value.__cause__, unlearning.SavedResultError)
    # Through the command line: damage on disk is a runtime failure, exit 1, one line naming the file.
    done = subprocess.run(
        [sys.executable, *UNLEARN, "--workdir", str(workdir), *unlearn_runs.models_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith("unlearn.py: error: SavedResultError: ") and str(path) in lines[0]
    path.write_text(path.read_text()[:100])  # truncated
    with pytest.raises(unlearning.UnlearnConfigError, match=r"seed_1\.json' is unreadable"):
        unlearning.plan_run(config, workdir)


def test_a_saved_result_of_other_models_is_refused(unlearn_runs):
    workdir = unlearn_runs.reference
    content = read_result(workdir / "results" / "sa+guided" / "seed_0.json")
    identity = content["identity"]
    assert load_result(workdir, "sa+guided", 0, identity) == content
    other = dict(identity, models=dict(identity["models"], original="0" * 64))
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"models\.original: '[0-9a-f]{64}' -> '0{64}'"):
        load_result(workdir, "sa+guided", 0, other)


def test_atomic_writes_leave_the_previous_file_when_interrupted(tmp_path):
    path = tmp_path / "report.json"
    reporting.write_json(str(path), {"version": 1})
    with pytest.raises(RuntimeError, match="interrupted"), io.atomic_file(path) as handle:
        handle.write('{"version": 2, "trunc')
        raise RuntimeError("interrupted mid-write")
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------- non-finite steps


class _ConstantMonitor:
    """Stands in for the compiled monitor: the forget fraction never crosses the threshold."""

    monitor_keys = ("forget_fraction", "forget_fraction_published")

    @staticmethod
    def monitor(params):
        del params
        return 0.5, 0.5


# Examples with this label make their loss (and so their gradient) NaN in the poisoned loss below.
POISON = 2


def _nan_plan(poisoned: np.ndarray, *, budget: int):
    """Six forget and six retain 4x4 images; the forget examples at ``poisoned`` carry the POISON label."""
    images = np.random.default_rng(0).uniform(size=(12, 4, 4, 1)).astype(np.float32)
    labels = np.array([1] * 6 + [0] * 6, np.int32)
    labels[poisoned] = POISON
    train = data_lib.ImageDataset(images=images, labels=labels, name="nan_injected", num_classes=3)
    return types.SimpleNamespace(
        config={
            "max_steps": budget,
            "batch_size": 2,
            "retain_batch_size": 2,
            "continue_to_budget": True,
            "published_threshold": 0.02,
        },
        run_data=types.SimpleNamespace(train=train),
        forget_idx=np.arange(6),
        retain_idx=np.arange(6, 12),
    )


def _poisoned(loss_fn: losses.LossFn) -> losses.LossFn:
    """``loss_fn``, times NaN on POISON examples: their gradient is NaN (as an overflow or a log(0) would make it)."""

    def loss(params, example, key):
        return loss_fn(params, example, key) * jnp.where(example["label"] == POISON, jnp.nan, 1.0)

    return loss


@pytest.fixture(scope="module")
def tiny_method():
    """A real method ('sa', Adam) on a tiny VAE with the poisoned loss, its compiled step, its parameters."""
    graphdef, params = nnx.split(
        models.build_model("mlp_vae", image_shape=(4, 4, 1), hidden=8, latent_dim=2, rngs=nnx.Rngs(0))
    )
    method = methods.make_method("sa", loss_fn=_poisoned(losses.negative_elbo(graphdef)), optimizer=optax.adam(1e-2))
    return method, jax.jit(method.step), params


def test_nan_gradients_are_skipped_counted_and_the_rest_matches_a_replay_without_them(tiny_method):
    method, step, params0 = tiny_method
    budget, seed, poisoned = 9, 3, np.array([4])
    plan = _nan_plan(poisoned, budget=budget)
    run = run_steps(
        plan,
        _ConstantMonitor(),
        step,
        method,
        params0,
        seed=seed,
        threshold=0.01,
        start_fractions=(0.5, 0.5),
        label="sa",
    )
    # The schedule run_steps draws (forget first, then retain, from the seed's generator).
    rng = np.random.default_rng([seed, 1])
    forget_schedule = batch_schedule(plan.forget_idx, 2, budget, rng)
    retain_schedule = batch_schedule(plan.retain_idx, 2, budget, rng)
    poisoned_steps = [t for t in range(budget) if np.isin(forget_schedule[t], poisoned).any()]
    assert 0 < len(poisoned_steps) < budget
    assert run["nonfinite_steps"] == len(poisoned_steps)
    assert [row["step"] for row in run["rows"] if row.get("nonfinite_skipped")] == [t + 1 for t in poisoned_steps]
    assert all(np.isnan(row["forget_loss"]) for row in run["rows"] if row.get("nonfinite_skipped"))
    record = seed_record(run, {}, None, budget=budget)
    assert record["nonfinite_steps"] == len(poisoned_steps)

    # Replay: the same batches and keys, the poisoned steps left out entirely.
    keys = unlearning.seed_step_keys(seed, budget)
    params, state = params0, method.init(params0)
    for t in range(budget):
        if t in poisoned_steps:
            continue
        params, state, _ = step(
            params,
            state,
            data_lib.as_batch(plan.run_data.train, forget_schedule[t]),
            data_lib.as_batch(plan.run_data.train, retain_schedule[t]),
            keys[t],
        )
    chex.assert_trees_all_equal(run["params_at_end"], params)
    chex.assert_tree_all_finite(run["params_at_end"])


def test_nan_gradients_on_every_step_stop_the_run_with_an_error(tiny_method):
    method, step, params0 = tiny_method
    plan = _nan_plan(np.arange(6), budget=20)
    with pytest.raises(
        unlearning.UnlearningDivergedError,
        match=r"sa seed 0 diverged: the last 5 steps \(up to step 5\) had non-finite updates",
    ):
        run_steps(
            plan,
            _ConstantMonitor(),
            step,
            method,
            params0,
            seed=0,
            threshold=0.01,
            start_fractions=(0.5, 0.5),
            label="sa",
        )
    # A budget shorter than the window: every step skipped is a divergence too.
    with pytest.raises(unlearning.UnlearningDivergedError, match=r"the last 3 steps \(up to step 3\)"):
        run_steps(
            _nan_plan(np.arange(6), budget=3),
            _ConstantMonitor(),
            step,
            method,
            params0,
            seed=0,
            threshold=0.01,
            start_fractions=(0.5, 0.5),
            label="sa",
        )


def test_non_finite_parameters_are_never_saved(tmp_path):
    directory = tmp_path / "unlearned" / "sa" / "seed_0"
    run = {"seed": 0, "params_at_stop": {"w": jnp.array([1.0, jnp.nan])}}
    with pytest.raises(unlearning.UnlearningDivergedError, match="not finite; refusing to save"):
        save_unlearned(directory, run, {"evaluated_at_step": 3}, None, "sa", {}, None)
    assert not directory.exists()


def test_a_diverging_unlearn_run_exits_1_in_one_line_and_writes_no_model(unlearn_runs):
    lines = [line for line in unlearn_runs.diverged_stderr.splitlines() if line.strip()]
    assert unlearn_runs.diverged_status == 1, unlearn_runs.diverged_stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(
        "unlearn.py: error: UnlearningDivergedError: sa+guided seed 0 diverged"
    ), lines
    assert "Traceback" not in unlearn_runs.diverged_stderr
    workdir = unlearn_runs.diverging
    assert not list(workdir.glob("unlearned/*/*")) and not list(workdir.glob("results/*/*"))
    assert not (workdir / "report.json").exists()
