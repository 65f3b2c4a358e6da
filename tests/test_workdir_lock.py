"""One run per workdir (issue 17): a second process on a busy workdir is refused at once, naming the workdir and the
holder; a killed holder leaves no stale lock; the command lines exit 2 in one line and change nothing."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import subprocess
import sys

import pytest

from gsu_jax.workdir_lock import LOCK_FILE, WorkdirBusyError, exclusive_workdir, lock_holder

REPO = pathlib.Path(__file__).resolve().parents[1]
_HOLD = (
    "import sys, time\n"
    "from gsu_jax.workdir_lock import exclusive_workdir\n"
    "with exclusive_workdir(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


@contextlib.contextmanager
def held_by_another_process(workdir: pathlib.Path):
    """A child process holding ``workdir``'s lock until the block ends (then SIGKILLed, as a crash would end it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)


def _state(workdir: pathlib.Path) -> dict[pathlib.Path, tuple[int, int]]:
    return {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in workdir.rglob("*")}


def test_a_busy_workdir_is_refused_naming_it_and_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    workdir = tmp_path / "run"
    with held_by_another_process(workdir) as pid:
        assert lock_holder(workdir) == pid
        with pytest.raises(WorkdirBusyError) as excinfo:
            with exclusive_workdir(workdir):
                pytest.fail("a busy workdir was entered")
        message = str(excinfo.value)
        assert repr(str(workdir.resolve())) in message and f"process {pid} on this host" in message
    # SIGKILL: the kernel released the lock with the process; the lock file stays and is simply locked again.
    assert lock_holder(workdir) is None and (workdir / LOCK_FILE).exists()
    with exclusive_workdir(workdir) as held:
        assert held == workdir.resolve()


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with exclusive_workdir(tmp_path):
        with exclusive_workdir(f"{tmp_path}/./"):  # the same directory, spelt differently
            pass
        assert lock_holder(tmp_path) is not None  # still held by the outer block
    assert lock_holder(tmp_path) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "program, config",
    [("train.py", "configs/smoke.py"), ("unlearn.py", "configs/unlearn_smoke.py")],
)
def test_a_second_run_on_a_busy_workdir_exits_2_in_one_line_and_changes_nothing(tmp_path, program, config):
    workdir = tmp_path / "busy"
    with held_by_another_process(workdir) as pid:
        before = _state(workdir)
        done = subprocess.run(
            [sys.executable, program, "--config", config, f"--workdir={workdir}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        after = _state(workdir)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"{program}: error: workdir {str(workdir.resolve())!r} is in use by process {pid}")
    assert after == before  # nothing written: no checkpoint, report or model of the refused run
