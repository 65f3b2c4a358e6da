"""End-to-end tests of train.py through its real entry point (subprocesses), on configs/smoke.py."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.py")


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, exactly one line on stderr starting 'train.py: error:', no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    result = run_train("--config", SMOKE, "--workdir", str(workdir))
    return workdir, result


@pytest.mark.slow
def test_smoke_run_through_the_entry_point(smoke_run):
    workdir, result = smoke_run
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    for role in ("generative", "evaluator", "guidance"):
        metrics = summary["roles"][role]
        checkpoint = pathlib.Path(metrics["checkpoint"])
        assert checkpoint.is_dir() and checkpoint.parent == workdir / role / "checkpoints"
        assert {"params", "opt_state", "metadata"} <= {p.name for p in checkpoint.iterdir()}
        assert f"{role}:" in result.stdout
    png = workdir / "generative" / "samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert "held-out -ELBO" in result.stdout and "held-out accuracy" in result.stdout


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_with_status_2(smoke_run):
    # (Resumption itself is tested in-process in test_training.py; here: the refusal's exit status and line.)
    workdir, first = smoke_run
    assert first.returncode == 0
    other = run_train("--config", SMOKE, "--workdir", str(workdir), "--config.latent_dim=3")
    assert_usage_error(other, "latent_dim: 2 -> 3", "--overwrite")


@pytest.mark.slow
def test_corrupt_checkpoint_exits_1_without_traceback_and_restore_fallback_resumes(smoke_run, tmp_path):
    """The OCDBT index of the latest step damaged on disk: one line naming step and file, exit 1, and no
    traceback from orbax/tensorstore threads at exit; --config.restore_fallback=True resumes from the step before."""
    reference, first = smoke_run
    assert first.returncode == 0
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    steps = sorted(int(p.name) for p in (workdir / "generative" / "checkpoints").iterdir() if p.name.isdigit())
    index = workdir / "generative" / "checkpoints" / str(steps[-1]) / "params" / "manifest.ocdbt"
    index.write_bytes(bytes(byte ^ 0xFF for byte in index.read_bytes()))
    refused = run_train("--config", SMOKE, "--workdir", str(workdir), "--config.roles=generative")
    assert refused.returncode == 1, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused.stderr and "Event loop" not in refused.stderr, lines
    assert f"checkpoint step {steps[-1]}" in lines[0] and f"file '{index}'" in lines[0]
    assert "--config.restore_fallback=True" in lines[0]

    resumed = run_train(
        "--config", SMOKE, "--workdir", str(workdir), "--config.roles=generative", "--config.restore_fallback=True"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipped corrupt checkpoint step {steps[-1]}" in resumed.stderr and "Traceback" not in resumed.stderr
    assert f"resumed from step {steps[-2]} (skipped corrupt step {steps[-1]}" in resumed.stdout
    # The run ends where the uninterrupted one did: same held-out -ELBO line.
    elbo = lambda text: text.split("held-out -ELBO ")[1].split(" ")[0]  # noqa: E731
    assert elbo(resumed.stdout) == elbo(first.stdout)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--config.latent_dim=0"], ["config.latent_dim=0 is invalid", "an integer >= 1"]),
        (["--config.latnt_dim=3"], ["config.latnt_dim is not a known field; did you mean 'latent_dim'?"]),
        (["--config.num_epochs=abc"], ["--config.num_epochs=abc"]),
        (["--config.model_kwargs.hiden=3"], ["hiden", "hidden"]),
        (["--config.data=idx:/nonexistent/mnist"], ["config.data='idx:/nonexistent/mnist' cannot be loaded"]),
        (["--bogus_flag"], ["bogus_flag"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, fragments):
    result = run_train("--config", SMOKE, "--workdir", str(tmp_path / "never"), *args)
    assert_usage_error(result, *fragments)
    assert not (tmp_path / "never").exists()  # refused before anything is written


def test_missing_config_file_and_missing_workdir_flag(tmp_path):
    assert_usage_error(
        run_train("--config", str(tmp_path / "absent.py"), "--workdir", str(tmp_path)), "absent.py: no such file"
    )
    assert_usage_error(run_train("--config", SMOKE), "--workdir")


def test_unwritable_workdir_is_refused_before_training(tmp_path):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    assert_usage_error(run_train("--config", SMOKE, "--workdir", str(a_file)), "exists and is not a directory")


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_train("--config", SMOKE, "--workdir", str(tmp_path / "w"), "--config.latent_dim=0", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("train.py: error: config.latent_dim=0")
