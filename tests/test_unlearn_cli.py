"""End-to-end tests of ``unlearn.py`` through its real entry point (subprocesses), and every refusal.

One tiny run (configs/unlearn_smoke.py: trains tiny models, the oracle, three guided methods x 2 seeds x 3 steps)
is shared by the module; the refusals run concurrently, each in its own process, and must exit 2 with one line
on stderr and write nothing.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gsu_jax import checkpointing, metrics, training, unlearning
from gsu_jax.unlearning.results import read_result

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = "configs/unlearn_smoke.py"

pytestmark = pytest.mark.slow


def _command(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, "unlearn.py", "--config", SMOKE, "--workdir", str(workdir), *overrides]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The tiny end-to-end run: (workdir, completed process, report)."""
    workdir = tmp_path_factory.mktemp("unlearn") / "run"
    done = subprocess.run(_command(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done, json.loads((workdir / "report.json").read_text())


def test_end_to_end_report(smoke_run):
    workdir, done, report = smoke_run
    for key in ("original", "oracle", "methods", "config", "seeds", "data", "versions", "device", "threshold"):
        assert key in report
    assert report["seeds"] == [0, 1]
    assert set(report["methods"]) == {"remap_surgery+guided", "sa_gated+guided", "sa+guided"}
    assert report["recommended_method"] == "remap_surgery" == list(report["methods"])[0].split("+")[0]
    per_method = (
        "step_time_ms",
        "time_to_unlearn_s",
        "fid_retain_at_stop",
        "fid_all_at_stop",
        "fid_retain_at_end",
        "fid_all_at_end",
        "forget_fraction_at_stop",
        "mia_auc",
    )
    for summary in report["methods"].values():
        assert set(summary["steps_to_threshold"]) >= {"mean", "std", "per_seed"}
        assert len(summary["steps_to_threshold"]["per_seed"]) == 2
        for key in per_method:
            assert len(summary[key]["per_seed"]) == 2, key
        assert [record["seed"] for record in summary["per_seed"]] == [0, 1]
        assert summary["guided"] is True
        assert all(value > 0 for value in summary["step_time_ms"]["per_seed"])
    for reference in ("original", "oracle"):
        assert np.isfinite(report[reference]["fid_retain"]) and 0 <= report[reference]["mia_auc"] <= 1
    assert report["data"]["fingerprint"] and report["versions"]["jax"]
    # sa_gated's target is the oracle's mean loss on the forget training examples.
    assert report["sa_gated_forget_loss_target"]["value"] == pytest.approx(report["oracle"]["nelbo_forget_train"])
    # The threshold is the oracle's fraction plus two binomial standard errors on the same samples.
    threshold = report["threshold"]
    assert threshold["value"] == metrics.auto_threshold(
        threshold["oracle_forget_fraction"], threshold["monitor_samples"]
    )
    markdown = (workdir / "report.md").read_text()
    assert "python unlearn.py --config configs/unlearn_smoke.py" in markdown
    assert "| sa_gated+guided |" in markdown and "| sa+guided |" in markdown
    assert "| sa_gated+guided |" in done.stdout  # the table is printed at the end


def test_end_to_end_files(smoke_run):
    workdir, _, report = smoke_run
    for label in report["methods"]:
        assert (workdir / "logs" / f"{label}.csv").is_file()
        assert (workdir / "samples" / f"{label}.png").read_bytes()[:4] == b"\x89PNG"
        saved = workdir / "unlearned" / label / "seed_0"
        with checkpointing.Checkpointer(saved, create=False) as ckpt:
            metadata = ckpt.read_metadata()
        assert metadata["method"] == label and metadata["seed"] == 0
        # The saved model is the one at the stopping step: the original itself when it was already below.
        stopped_at = report["methods"][label]["per_seed"][0]["evaluated_at_step"]
        assert metadata["step"] == stopped_at
        same_as_original = metadata["params_digest"] == report["models"]["original"]["params_digest"]
        assert same_as_original == (stopped_at == 0)
        assert not (workdir / "unlearned" / label / "seed_1").exists()  # save_params="first_seed"
        # Each finished run is saved for resumption, and its numbers are the report's.
        for record in report["methods"][label]["per_seed"]:
            saved = read_result(workdir / "results" / label / f"seed_{record['seed']}.json")
            assert saved["record"]["fid_retain_at_stop"] == record["fid_retain_at_stop"]
            assert saved["identity"]["seed"] == record["seed"] and saved["identity"]["method"] == label
    assert report["resumed"] == [] and not list(workdir.rglob(".*.tmp-*"))
    assert (workdir / "forget_fraction.png").read_bytes()[:4] == b"\x89PNG"


def _log_rows(workdir: pathlib.Path, label: str) -> list[dict]:
    with open(workdir / "logs" / f"{label}.csv") as handle:
        return list(csv.DictReader(handle))


def test_stopping_steps_follow_the_logged_fractions(smoke_run):
    workdir, _, report = smoke_run
    threshold = report["threshold"]["value"]
    published = report["threshold"]["published"]["value"]
    for label, summary in report["methods"].items():
        rows = _log_rows(workdir, label)
        for record in summary["per_seed"]:
            seed_rows = [row for row in rows if int(row["seed"]) == record["seed"]]
            assert [int(row["step"]) for row in seed_rows] == list(range(report["config"]["max_steps"] + 1))
            fractions = [float(row["forget_fraction"]) for row in seed_rows]
            published_fractions = [float(row["forget_fraction_published"]) for row in seed_rows]
            assert record["steps_to_threshold"] == metrics.stopping_step(fractions, threshold)
            assert record["steps_to_published_threshold"] == metrics.stopping_step(published_fractions, published)
            assert record["steps_run"] == report["config"]["max_steps"]  # continue_to_budget


def test_monitoring_latents_are_the_same_for_every_method_and_seed(smoke_run):
    workdir, _, report = smoke_run
    latent_dim = report["models"]["original"]["model_kwargs"]["latent_dim"]
    z = unlearning.monitoring_latents(report["config"]["monitor_samples"], latent_dim)
    assert report["integrity"]["monitoring_latents_digest"] == checkpointing.state_digest(z)
    # Before any update every run reads the same model on the same z: the same fraction, the original's.
    start = {
        (label, row["seed"]): float(row["forget_fraction"])
        for label in report["methods"]
        for row in _log_rows(workdir, label)
        if row["step"] == "0"
    }
    assert len(start) == 2 * len(report["methods"])
    assert set(start.values()) == {report["original"]["forget_fraction"]}


def test_evaluator_and_guidance_are_distinct_models_from_distinct_runs(smoke_run):
    workdir, _, report = smoke_run
    model_dir = pathlib.Path(report["models"]["evaluator"]["workdir"])
    evaluator = training.load_trained(model_dir, "evaluator")
    guidance = training.load_trained(model_dir, "guidance")
    assert evaluator.params is not guidance.params
    assert checkpointing.state_digest(evaluator.params) != checkpointing.state_digest(guidance.params)
    assert (evaluator.metadata["role"], guidance.metadata["role"]) == ("evaluator", "guidance")
    assert evaluator.metadata["train_fingerprint"] != guidance.metadata["train_fingerprint"]
    # Disjoint training examples: the run data splits the training digits between the two classifiers.
    run_data = training.prepare_data(evaluator.config)
    assert run_data.evaluator.fingerprint() == evaluator.metadata["train_fingerprint"]
    assert run_data.guidance.fingerprint() == guidance.metadata["train_fingerprint"]
    evaluator_rows = {row.tobytes() for row in run_data.evaluator.images.reshape(len(run_data.evaluator), -1)}
    assert not any(
        row.tobytes() in evaluator_rows for row in run_data.guidance.images.reshape(len(run_data.guidance), -1)[:200]
    )
    evidence = report["integrity"]["classifiers"]
    assert evidence["evaluator"]["params_digest"] == evaluator.metadata["params_digest"]
    assert evidence["guidance"]["params_digest"] == guidance.metadata["params_digest"]
    assert report["integrity"]["evaluator_params_digest"] != report["integrity"]["guidance_params_digest"]
    unlearning.check_classifier_independence(evaluator, guidance)


# ------------------------------------------------------------------------------------------- refusals

REFUSALS = {
    "unknown_method": (["--config.methods=sa,magic"], "unknown method 'magic'"),
    "unknown_field": (["--config.methdos=sa"], "did you mean 'methods'"),
    "empty_forget_class": (["--config.forget_classes="], "forget_classes"),
    "absent_forget_class": (["--config.forget_classes=12"], "class 12"),
    "forget_set_is_all_data": (["--config.forget_classes=0,1,2,3,4,5,6,7,8,9"], "retain set would be empty"),
    "threshold_above_range": (["--config.threshold=1.5"], "outside (0, 1)"),
    "threshold_zero": (["--config.threshold=0"], "outside (0, 1)"),
    "zero_budget": (["--config.max_steps=0"], "max_steps=0"),
    "negative_budget": (["--config.max_steps=-5"], "max_steps=-5"),
    "checkpoint_not_found": (["--config.checkpoint=/nonexistent/gsu_run"], "not found"),
    "bad_flag_value": (["--config.seeds=three"], "seeds"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Runs every refusal concurrently; returns {name: (workdir, returncode, stderr)}."""
    root = tmp_path_factory.mktemp("refusals")
    processes = {}
    for name, (overrides, _) in REFUSALS.items():
        workdir = root / name
        processes[name] = (
            workdir,
            subprocess.Popen(
                _command(workdir, *overrides), cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            ),
        )
    results = {}
    for name, (workdir, process) in processes.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = (workdir, process.returncode, stderr)
    return results


def _assert_refused(workdir: pathlib.Path, returncode: int, stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("unlearn.py: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not workdir.exists()


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusal(refusals, name):
    workdir, returncode, stderr = refusals[name]
    _assert_refused(workdir, returncode, stderr, REFUSALS[name][1])


def _refuse_in_subprocess(tmp_path: pathlib.Path, *overrides: str) -> tuple[pathlib.Path, int, str]:
    workdir = tmp_path / "refused"
    done = subprocess.run(_command(workdir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=300)
    return workdir, done.returncode, done.stderr


def test_refuses_a_checkpoint_of_another_model(smoke_run, tmp_path):
    # The oracle's workdir is a VAE trained without digit 1: not a model to unlearn digit 1 from.
    workdir, _, report = smoke_run
    oracle_dir = report["models"]["oracle"]["workdir"]
    _assert_refused(*_refuse_in_subprocess(tmp_path, f"--config.checkpoint={oracle_dir}"), "excludes classes")


def test_refuses_a_cached_model_of_another_config(smoke_run, tmp_path):
    workdir, _, _ = smoke_run
    _assert_refused(
        *_refuse_in_subprocess(tmp_path, f"--config.train_dir={workdir / 'train'}", "--config.train.latent_dim=3"),
        "trained with a different config",
    )


def test_reuses_a_given_checkpoint(smoke_run, tmp_path):
    """A second run pointed at the first run's models trains nothing and reproduces its numbers."""
    workdir, _, report = smoke_run
    model_dir = report["models"]["original"]["workdir"]
    oracle_dir = report["models"]["oracle"]["workdir"]
    rerun = tmp_path / "rerun"
    done = subprocess.run(
        _command(
            rerun,
            f"--config.checkpoint={model_dir}",
            f"--config.oracle_checkpoint={oracle_dir}",
            "--config.methods=sa",
            "--config.seeds=1",
            "--config.save_params=none",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((rerun / "report.json").read_text())
    assert not (rerun / "train").exists()
    assert again["original"] == report["original"] and again["oracle"] == report["oracle"]
    first_seed = report["methods"]["sa+guided"]["per_seed"][0]
    rerun_seed = again["methods"]["sa+guided"]["per_seed"][0]
    for key in ("steps_to_threshold", "fid_retain_at_stop", "fid_retain_at_end", "mia_auc"):
        assert rerun_seed[key] == pytest.approx(first_seed[key], rel=1e-5, abs=1e-6), key


def test_recommended_method_never_reads_the_oracle(smoke_run, tmp_path):
    """The same run against a different oracle (another seed) takes bit-identical steps.

    A fixed threshold no run reaches keeps the oracle out of the stopping rule too, so every run takes all its
    steps; each step's losses (logged before the step, from the parameters the previous steps made) and the
    end-of-budget evaluation must then be equal: the oracle may score the method, never drive it.
    """
    workdir, _, report = smoke_run
    other_oracle = tmp_path / "other_oracle"
    trained = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/smoke.py",
            "--workdir",
            str(other_oracle),
            "--config.seed=5",
            "--config.exclude_classes=1",
            "--config.roles=generative",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = {}
    for name, oracle_dir in (("smoke", report["models"]["oracle"]["workdir"]), ("other", other_oracle)):
        out = tmp_path / name
        done = subprocess.run(
            _command(
                out,
                f"--config.checkpoint={report['models']['original']['workdir']}",
                f"--config.oracle_checkpoint={oracle_dir}",
                "--config.methods=remap_surgery",
                "--config.seeds=1",
                "--config.guidance_weight=0",
                "--config.threshold=1e-6",
            ),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        again = json.loads((out / "report.json").read_text())
        rows = [
            {key: value for key, value in row.items() if key != "step_time_ms"}
            for row in _log_rows(out, "remap_surgery")
        ]
        record = again["methods"]["remap_surgery"]["per_seed"][0]
        runs[name] = (
            again["models"]["oracle"]["params_digest"],
            rows,
            [record[key] for key in ("fid_retain_at_end", "nelbo_heldout_retain_at_end")],
        )
    assert runs["smoke"][0] != runs["other"][0]  # two different oracles ...
    assert runs["smoke"][1:] == runs["other"][1:]  # ... the same steps and the same unlearned model
    losses = [row["retain_loss"] for row in runs["smoke"][1][1:]]
    assert len(losses) == 3 and len(set(losses)) > 1  # it stepped: the parameters moved


def test_runtime_failure_is_one_line_exit_1(smoke_run, tmp_path):
    """A checkpoint damaged on disk fails while running: exit 1, one line; --debug shows the traceback."""
    import shutil

    workdir, _, report = smoke_run
    damaged = tmp_path / "damaged"
    shutil.copytree(report["models"]["original"]["workdir"], damaged)
    # Make the saved arrays disagree with the digest recorded at save time, as damage to their bytes would. The
    # bytes themselves are not edited here: where a byte edit lands in orbax's OCDBT files (array data, index,
    # unreferenced space) varies from run to run, and tests/test_checkpointing.py covers real byte damage.
    metadata_files = sorted((damaged / "generative" / "checkpoints").glob("*/metadata/metadata"))
    assert metadata_files, "no checkpoint metadata found to damage"
    for target in metadata_files:
        text = target.read_text()
        digest = json.loads(text)["params_digest"]
        target.write_text(text.replace(digest, "0" * len(digest)))
    overrides = (
        f"--config.checkpoint={damaged}",
        f"--config.oracle_checkpoint={report['models']['oracle']['workdir']}",
        "--config.methods=sa",
        "--config.seeds=1",
    )
    done = subprocess.run(_command(tmp_path / "out", *overrides), cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("unlearn.py: error: CheckpointCorruptError"), done.stderr
    assert "Traceback" not in done.stderr
    debug = subprocess.run(
        _command(tmp_path / "out_debug", *overrides, "--debug"), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ------------------------------------------------------------------------------------------- example sets


@pytest.fixture(scope="module")
def example_run(smoke_run, tmp_path_factory):
    """``forget=fraction:0.02`` end to end, from the smoke run's original model and classifiers (so only the oracle,
    trained with ``exclude=fraction:0.02``, and one method x one seed run here): (workdir, report)."""
    _, _, report = smoke_run
    workdir = tmp_path_factory.mktemp("unlearn_examples") / "run"
    overrides = (
        f"--config.checkpoint={report['models']['original']['workdir']}",
        f"--config.train_dir={workdir.parent / 'train'}",
        "--config.forget=fraction:0.02",
        "--config.methods=sa",
        "--config.seeds=1",
        "--config.guidance_weight=0",
        "--config.save_params=none",
    )
    done = subprocess.run(_command(workdir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, json.loads((workdir / "report.json").read_text())


def test_end_to_end_forget_set_of_examples(example_run):
    workdir, report = example_run
    forget_set, threshold = report["forget_set"], report["threshold"]
    assert forget_set["kind"] == "examples" and forget_set["spec"] == "fraction:0.02"
    assert forget_set["count"] == report["data"]["num_forget_train"] == 90 and report["forget_classes"] == []
    # The oracle's checkpoint records exactly the forget examples as left out.
    oracle = report["models"]["oracle"]
    assert oracle["excluded"]["examples_fingerprint"] == forget_set["examples_fingerprint"]
    assert oracle["num_train"] == report["data"]["num_train"] - 90
    # The stop: the oracle's gap +- 2 SE, named; the first logged gap that reaches its low end.
    assert threshold["mode"] == "oracle_loss_gap_band" and threshold["name"] == "oracle loss gap ± 2 SE"
    low, high = threshold["value"]
    gap, se = report["oracle"]["loss_gap"], report["oracle"]["loss_gap_se"]
    assert (low, high) == pytest.approx((gap - 2 * se, gap + 2 * se))
    for key in ("loss_gap", "nelbo_forget_train", "nelbo_heldout", "mia_auc", "fid_retain"):
        assert math.isfinite(report["original"][key]) and math.isfinite(report["oracle"][key]), key
    assert "forget_fraction" not in report["original"]
    # Class-matched (each forget example against held-out examples of its class; tests/test_example_sets.py
    # checks the formula), so not the difference of the two means, but of the same order.
    assert report["original"]["loss_gap_se"] > 0 and report["oracle"]["loss_gap_se"] > 0
    with open(workdir / "logs" / "sa.csv", newline="") as handle:
        gaps = [float(row["loss_gap"]) for row in csv.DictReader(handle)]
    reached = [t for t, value in enumerate(gaps) if value >= low]
    assert report["methods"]["sa"]["per_seed"][0]["steps_to_threshold"] == (reached[0] if reached else None)
    markdown = (workdir / "report.md").read_text()
    assert "forget set: 90 training examples (`fraction:0.02`: examples, not whole classes)" in markdown
    assert "| loss gap: stop |" in markdown and "MIA AUC (forget vs held-out)" in markdown
    assert "forget fraction at stop" not in markdown and "published setting" not in markdown


def test_refuses_an_oracle_trained_without_other_examples(example_run, tmp_path):
    """unlearn.py refuses an oracle whose recorded excluded examples are not its forget set, in one line."""
    _, report = example_run
    config = _smoke_config()
    config.checkpoint = report["models"]["original"]["workdir"]
    config.oracle_checkpoint = report["models"]["oracle"]["workdir"]
    config.guidance_weight = 0.0
    config.forget = "fraction:0.02"
    assert unlearning.plan_run(config, tmp_path / "same").train_oracle is False
    for forget, message in (
        ("fraction:0.03", "was trained without 90 examples (fraction:0.02), not the 135 forget examples"),
        ("", "not the 450 forget examples (classes:1)"),
    ):
        config.forget = forget
        with pytest.raises(unlearning.UnlearnConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            unlearning.plan_run(config, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def _smoke_config():
    from gsu_jax.config_validation import load_config_file

    return load_config_file(REPO / SMOKE)
