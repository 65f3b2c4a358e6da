"""Determinism: the same config and seeds give bit-identical parameters and identical report numbers (CPU).

Two ``train.py`` runs of configs/smoke.py run side by side (plus the oracle's run), then two ``unlearn.py`` runs of
configs/unlearn_smoke.py on the first run's models, also side by side, each a separate process: nothing is shared
but the files. Everything they write must agree except the fields that measure wall-clock time or name the
workdir (:data:`gsu_jax.reporting.VOLATILE_REPORT_FIELDS`, the ``seconds``/path fields of train.py's metrics).
Resumption after a SIGKILL is tested in test_faults.py.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
import subprocess
import sys

import chex
import numpy as np
import pytest

from gsu_jax import checkpointing, provenance, reporting, training

REPO = pathlib.Path(__file__).resolve().parent.parent
ROLES = ("generative", "evaluator", "guidance")
# train.py metrics that are wall-clock times or paths into the workdir (not results).
TRAIN_VOLATILE = ("seconds", "checkpoint", "samples_png")
# One guided method, two seeds, three steps: enough for distinct trajectories, a few seconds per run.
UNLEARN_OVERRIDES = ("--config.methods=sa", "--config.seeds=2", "--config.save_params=all")

pytestmark = pytest.mark.slow


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two identical train.py runs and the oracle's: {"a": workdir, "b": workdir, "oracle": workdir}."""
    root = tmp_path_factory.mktemp("determinism_train")
    workdirs = {"a": root / "a", "b": root / "b", "oracle": root / "oracle"}
    extra = {"oracle": ("--config.exclude_classes=1", "--config.roles=generative")}
    processes = {
        name: _start("train.py", "--config", "configs/smoke.py", "--workdir", str(workdir), *extra.get(name, ()))
        for name, workdir in workdirs.items()
    }
    for process in processes.values():
        _finish(process)
    return workdirs


@pytest.fixture(scope="module")
def unlearned(trained, tmp_path_factory):
    """Two identical unlearn.py runs on run a's models: [(workdir, report), (workdir, report)]."""
    root = tmp_path_factory.mktemp("determinism_unlearn")
    workdirs = [root / "first", root / "second"]
    processes = [
        _start(
            "unlearn.py",
            "--config",
            "configs/unlearn_smoke.py",
            "--workdir",
            str(workdir),
            f"--config.checkpoint={trained['a']}",
            f"--config.oracle_checkpoint={trained['oracle']}",
            *UNLEARN_OVERRIDES,
        )
        for workdir in workdirs
    ]
    for process in processes:
        _finish(process)
    return [(workdir, json.loads((workdir / "report.json").read_text())) for workdir in workdirs]


def test_two_training_runs_give_bit_identical_models(trained):
    for role in ROLES:
        first = training.load_trained(trained["a"], role)
        second = training.load_trained(trained["b"], role)
        chex.assert_trees_all_equal(first.params, second.params)  # bit for bit, every leaf
        assert first.metadata["params_digest"] == second.metadata["params_digest"]
        assert first.metadata["opt_state_digest"] == second.metadata["opt_state_digest"]
        assert first.metadata["history"] == second.metadata["history"]
        metrics = [
            json.loads((workdir / role / "metrics.json").read_text()) for workdir in (trained["a"], trained["b"])
        ]
        for values in metrics:
            for key in TRAIN_VOLATILE:
                values.pop(key, None)
        assert metrics[0] == metrics[1]


def test_training_checkpoints_record_seed_config_fingerprints_versions_and_device(trained):
    model = training.load_trained(trained["a"], "generative")
    metadata = model.metadata
    run_data = training.prepare_data(model.config)
    assert metadata["seed"] == model.config.seed == 0
    assert metadata["config"]["num_epochs"] == 3 and metadata["config"]["data"] == "embedded"
    assert metadata["source_fingerprint"] == run_data.source_fingerprint
    assert metadata["train_fingerprint"] == run_data.generative.fingerprint()
    assert metadata["heldout_fingerprint"] == run_data.heldout.fingerprint()
    assert metadata["versions"] == provenance.package_versions()
    assert metadata["device"].startswith("cpu:")


def test_two_unlearning_runs_give_identical_reports(unlearned):
    (first_dir, first), (second_dir, second) = unlearned
    assert reporting.without_volatile_fields(first) == reporting.without_volatile_fields(second)
    # What is left out is only what the module says is volatile: timings, the command (it names the workdir).
    assert first["command"].replace(str(first_dir), str(second_dir)) == second["command"]
    assert first["resumed"] == second["resumed"] == []
    per_seed = first["methods"]["sa+guided"]["per_seed"]
    # The runs moved the model (three steps of two different seeds), so equality is not vacuous.
    digests_at_end = {record["params_digest_at_end"] for record in per_seed}
    assert len(digests_at_end) == 2 and first["models"]["original"]["params_digest"] not in digests_at_end


def _log_without_volatile_columns(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for column in reporting.VOLATILE_LOG_COLUMNS:
            del row[column]
    return rows


def test_two_unlearning_runs_write_identical_logs_and_bit_identical_unlearned_models(unlearned):
    (first_dir, first), (second_dir, _) = unlearned
    for label, summary in first["methods"].items():
        rows = _log_without_volatile_columns(first_dir / "logs" / f"{label}.csv")
        assert rows == _log_without_volatile_columns(second_dir / "logs" / f"{label}.csv")
        assert {row["nonfinite_skipped"] for row in rows if row["step"] != "0"} == {"0"}
        for record in summary["per_seed"]:
            saved = []
            for workdir in (first_dir, second_dir):
                with checkpointing.Checkpointer(
                    workdir / "unlearned" / label / f"seed_{record['seed']}", create=False
                ) as ckpt:
                    metadata = ckpt.read_metadata()
                    target = checkpointing.abstract_like(
                        training.load_trained(first["models"]["original"]["workdir"], "generative").params
                    )
                    saved.append(ckpt.restore(abstract_params=target)[0])
                assert metadata["params_digest"] == record["params_digest_at_stop"]
            chex.assert_trees_all_equal(*saved)


def test_the_report_records_what_reproduces_it(unlearned, trained):
    _, report = unlearned[0]
    generator = training.load_trained(trained["a"], "generative")
    run_data = training.prepare_data(generator.config)
    assert report["seeds"] == [0, 1] and report["config"]["seeds"] == 2
    assert report["config"]["train"]["seed"] == generator.config.seed
    assert report["config"]["max_steps"] == 3 and report["config"]["methods"] == "sa"
    assert report["data"]["fingerprint"] == run_data.source_fingerprint
    assert report["data"]["train_fingerprint"] == run_data.train.fingerprint()
    assert report["data"]["heldout_fingerprint"] == run_data.heldout.fingerprint()
    assert report["models"]["original"]["params_digest"] == generator.metadata["params_digest"]
    versions = report["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert versions[package] == provenance.package_versions()[package]
    assert report["device"].startswith("cpu:")
    assert report["jax_flags"]["jax_enable_x64"] is False and "jax_threefry_partitionable" in report["jax_flags"]
    # The digest of the gsu_jax sources the run imported (not compared with today's: the tree may have changed since).
    assert re.fullmatch(r"[0-9a-f]{64}", report["code"]["source_digest"])
    assert set(report["code"]) >= {"git_commit", "git_dirty"}
    assert report["reproducibility"]["volatile_fields"] == list(reporting.VOLATILE_REPORT_FIELDS)


def test_without_volatile_fields_drops_exactly_the_listed_fields():
    record = {
        "seed": 0,
        "fid_retain_at_stop": 1.5,
        "step_time_ms": 3.0,
        "step_time_ms_mean": 3.1,
        "time_to_unlearn_s": 0.2,
    }
    report = {
        "command": "python unlearn.py ...",
        "timing": {"total_s": 9.0},
        "resumed": ["sa seed 0"],
        "seeds": [0],
        "methods": {
            "sa": {
                "compile_s": 1.0,
                "step_time_ms": {"mean": 3.0},
                "fid_retain_at_stop": {"mean": 1.5},
                "per_seed": [record],
            }
        },
    }
    kept = reporting.without_volatile_fields(report)
    assert kept == {
        "seeds": [0],
        "methods": {"sa": {"fid_retain_at_stop": {"mean": 1.5}, "per_seed": [{"seed": 0, "fid_retain_at_stop": 1.5}]}},
    }
    assert report["methods"]["sa"]["compile_s"] == 1.0  # the input is left alone
    np.testing.assert_equal(reporting.without_volatile_fields({"x": float("nan")}), {"x": None})
