"""Two jax.distributed processes on loopback (CPU, gloo collectives) run unlearn.py and report what one process
with the same two-device mesh reports."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 600
# A tiny request: the models are trained once (by the one-process run) and cached for the two-process run,
# which restores them on its mesh, unlearns with sharded steps, saves the unlearned parameters from both
# processes and writes the report from process 0.
OVERRIDES = [
    "--config",
    "configs/unlearn_smoke.py",
    "--config.seeds=1",
    "--config.methods=s,sa",
    "--config.guidance_weight=0.0",
    "--config.max_steps=2",
    "--config.fid_samples=100",
    "--config.monitor_samples=64",
    "--config.elbo_samples=1",
    "--config.train.batch_size=240",
    "--config.train.classifier_batch_size=240",
    "--config.train.num_epochs=1",
    "--config.train.classifier_num_epochs=1",
    "--config.train.roles=generative,evaluator",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )


def _unlearn(workdir: pathlib.Path, train_dir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "unlearn.py", *OVERRIDES, f"--workdir={workdir}", f"--config.train_dir={train_dir}", *extra]


def _numbers(report: dict) -> dict[str, float]:
    """Every result of a report (model evaluations, per-seed records), not timings or environment."""
    out = {}
    for model in ("original", "oracle"):
        out.update({f"{model}.{k}": v for k, v in report[model].items()})
    for label, summary in report["methods"].items():
        for record in summary["per_seed"]:
            out.update({f"{label}.{record['seed']}.{k}": v for k, v in record.items() if "time" not in k})
    out["threshold"] = report["threshold"]["value"]
    return out


def test_two_processes_report_what_one_process_reports(tmp_path):
    train_dir = tmp_path / "train"
    one = subprocess.run(
        _unlearn(tmp_path / "one", train_dir, "--config.mesh.data=2"),
        cwd=ROOT,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, f"the one-process run failed:\n{one.stderr[-4000:]}"

    port = _free_port()
    procs = [
        subprocess.Popen(
            _unlearn(
                tmp_path / "two",
                train_dir,
                "--config.mesh.data=-1",
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={index}",
            ),
            cwd=ROOT,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate() for proc in procs]
        pytest.fail(
            "the two-process run did not finish in time:\n"
            + "\n".join(f"--- process {i} stderr:\n{err[-3000:]}" for i, (_, err) in enumerate(outputs))
        )
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    assert not failed, "the two-process run failed:\n" + "\n".join(
        f"--- process {i} (exit {procs[i].returncode}) stderr:\n{outputs[i][1][-3000:]}" for i in range(2)
    )

    reference = json.loads((tmp_path / "one" / "report.json").read_text())
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["parallel"] == {"mesh": {"data": 2, "model": 1}, "process_count": 2, "device_count": 2}
    assert reference["parallel"] == {"mesh": {"data": 2, "model": 1}, "process_count": 1, "device_count": 2}
    expected, got = _numbers(reference), _numbers(report)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
        else:
            assert got[key] == value, key
    # Process 0 wrote the files; both saved the unlearned parameters together (one orbax checkpoint).
    assert (tmp_path / "two" / "report.md").is_file() and (tmp_path / "two" / "samples" / "s.png").is_file()
    assert (tmp_path / "two" / "unlearned" / "s" / "seed_0").is_dir()
    # The summary table is printed by process 0 only.
    assert "threshold" in outputs[0][0] and "threshold" not in outputs[1][0]
