"""Unit tests of the unlearning run (gsu_jax.unlearning) and its report writers (gsu_jax.reporting).

In-process and fast: the stopping rule wiring on a scripted monitor, the independence of the monitoring latents
from every loss key, config validation without writing anything, the classifier-independence refusals, and the
report writers. The real pipeline through ``unlearn.py`` is tested in test_unlearn_cli.py.
"""

from __future__ import annotations

import json
import math
import pathlib
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gsu_jax import data as data_lib
from gsu_jax import io, methods, metrics, reporting, training, unlearning
from gsu_jax.unlearning.loop import batch_schedule, run_steps, seed_record
from gsu_jax.unlearning.report import SUMMARY_KEYS

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load_config(name: str) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_test_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ------------------------------------------------------------------------------------------- stopping rule


class _ScriptedEvaluation:
    """Stands in for the compiled monitor: the fraction after ``t`` updates is ``script[t]`` (params count t)."""

    monitor_keys = ("forget_fraction", "forget_fraction_published")

    def __init__(self, main: list[float], published: list[float]):
        self.main, self.published = main, published

    def monitor(self, params):
        t = int(params["updates"])
        return self.main[t], self.published[t]


def _counting_step(params, state, forget_batch, retain_batch, key):
    del forget_batch, retain_batch, key
    return {"updates": params["updates"] + 1}, state, {"update_norm": jnp.float32(1.0)}


def _tiny_plan(*, budget: int, continue_to_budget: bool, published_threshold: float = 0.02):
    images = np.zeros((10, 2, 2, 1), np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0, 2, 2, 2, 2], np.int32)
    train = data_lib.ImageDataset(images=images, labels=labels, name="tiny", num_classes=3)
    return types.SimpleNamespace(
        config={
            "max_steps": budget,
            "batch_size": 2,
            "retain_batch_size": 3,
            "continue_to_budget": continue_to_budget,
            "published_threshold": published_threshold,
        },
        run_data=types.SimpleNamespace(train=train),
        forget_idx=np.array([0, 1, 2]),
        retain_idx=np.arange(3, 10),
    )


def _run(main, published, *, threshold, continue_to_budget, budget=None):
    budget = len(main) - 1 if budget is None else budget
    plan = _tiny_plan(budget=budget, continue_to_budget=continue_to_budget)
    method = types.SimpleNamespace(init=lambda params: ())
    params0 = {"updates": jnp.int32(0)}
    return run_steps(
        plan,
        _ScriptedEvaluation(main, published),
        _counting_step,
        method,
        params0,
        seed=0,
        threshold=threshold,
        start_fractions=(main[0], published[0]),
    )


def test_run_stops_at_first_update_below_threshold_and_keeps_those_params():
    main = [0.30, 0.20, 0.04, 0.20, 0.01, 0.01]  # below 0.05 first after 2 updates (then rises again)
    published = [0.30, 0.10, 0.03, 0.01, 0.00, 0.00]  # below 0.02 first after 3 updates
    run = _run(main, published, threshold=0.05, continue_to_budget=True)
    assert run["stop"] == metrics.stopping_step(main, 0.05) == 2
    assert run["stop_published"] == metrics.stopping_step(published, 0.02) == 3
    assert int(run["params_at_stop"]["updates"]) == 2  # the parameters right after the stopping update
    assert int(run["params_at_end"]["updates"]) == 5  # continued to the budget
    assert run["steps_run"] == 5 and len(run["step_times"]) == 5
    assert run["fractions"] == main and run["published_fractions"] == published
    assert [row["step"] for row in run["rows"]] == [0, 1, 2, 3, 4, 5]


def test_run_without_continue_ends_at_the_stop():
    main = [0.30, 0.20, 0.04, 0.20, 0.01, 0.01]
    published = [0.30, 0.10, 0.05, 0.01, 0.00, 0.00]
    run = _run(main, published, threshold=0.05, continue_to_budget=False)
    assert run["stop"] == 2 and run["steps_run"] == 2
    assert run["params_at_end"] is None  # the budget was not reached: no end-of-budget evaluation
    assert run["stop_published"] is None  # the published rule had not fired when the run ended
    assert run["fractions"] == main[:3]


def test_run_that_never_crosses_is_not_reached_and_evaluated_at_the_budget():
    main = [0.30, 0.20, 0.10, 0.08]
    run = _run(main, main, threshold=0.05, continue_to_budget=False)
    assert run["stop"] is None and run["steps_run"] == 3
    assert int(run["params_at_stop"]["updates"]) == 3  # "at stop" falls back to the budget
    record = seed_record(run, {"fid_retain": 1.0, "mia_auc": 0.5}, {"fid_retain": 2.0}, budget=3)
    assert record["steps_to_threshold"] is None and record["time_to_unlearn_s"] is None
    assert record["evaluated_at_step"] == 3
    assert record["fid_retain_at_stop"] == 1.0 and record["fid_retain_at_end"] == 2.0 and record["mia_auc"] == 0.5


def test_original_already_below_threshold_stops_at_zero_updates():
    main = [0.01, 0.01, 0.01]
    run = _run(main, main, threshold=0.05, continue_to_budget=True)
    assert run["stop"] == 0 and int(run["params_at_stop"]["updates"]) == 0
    assert int(run["params_at_end"]["updates"]) == 2


def test_batch_schedule_is_fresh_permutations_of_the_set():
    rng = np.random.default_rng(0)
    indices = np.arange(10, 17)  # 7 examples, batches of 3: a pass every 7/3 steps
    schedule = batch_schedule(indices, 3, 7, rng)
    assert schedule.shape == (7, 3)
    flat = schedule.reshape(-1)
    for start in range(0, 21, 7):  # every consecutive pass is a permutation of the set
        assert sorted(flat[start : start + 7].tolist()) == indices.tolist()
    other = batch_schedule(indices, 3, 7, np.random.default_rng(1))
    assert not np.array_equal(schedule, other)  # fresh shuffles per seed


# ------------------------------------------------------------------------------------------- randomness


def test_monitoring_latents_are_fixed_and_independent_of_every_loss_key():
    z = unlearning.monitoring_latents(1024, 2)
    chex.assert_trees_all_equal(z, unlearning.monitoring_latents(1024, 2))  # no seed, no method enters
    # The published 128-sample monitor reads a prefix of the same latents.
    chex.assert_trees_all_equal(unlearning.monitoring_latents(128, 2), z[:128])
    monitor_key = jax.random.key_data(unlearning.stream_key("monitor"))
    step_keys = np.concatenate(
        [np.asarray(jax.random.key_data(unlearning.seed_step_keys(seed, 50))) for seed in range(10)]
    )
    assert not (step_keys == np.asarray(monitor_key)).all(axis=1).any()
    # Every key a loss sees is derived from a step key; none reproduces the monitoring draw.
    for step_key in unlearning.seed_step_keys(0, 5):
        assert not np.allclose(np.asarray(jax.random.normal(step_key, (1024, 2))), np.asarray(z))
    streams = {
        name: np.asarray(jax.random.key_data(unlearning.stream_key(name))) for name in ("monitor", "fid", "elbo", "run")
    }
    assert len({value.tobytes() for value in streams.values()}) == len(streams)


def test_step_keys_differ_between_seeds_and_steps():
    keys = np.asarray(jax.random.key_data(unlearning.seed_step_keys(0, 50)))
    other = np.asarray(jax.random.key_data(unlearning.seed_step_keys(1, 50)))
    assert len({k.tobytes() for k in keys}) == 50
    assert not np.array_equal(keys, other)


# ------------------------------------------------------------------------------------------- config


def test_main_and_smoke_configs_validate_without_writing(tmp_path):
    workdir = tmp_path / "never_created"
    names = ["unlearn_mnist", "unlearn_smoke", "unlearn_ddpm_smoke"]
    if (REPO.parent / "shared" / "data" / "mnist").is_dir():  # the GPU run's data: the real MNIST test set
        names.append("unlearn_mnist_ddpm")
    for name in names:
        plan = unlearning.plan_run(_load_config(name), workdir)
        assert plan.forget_classes == (1,)
        assert not workdir.exists()
    main = unlearning.plan_run(_load_config("unlearn_mnist"), workdir)
    assert main.config["monitor_samples"] == 1024 and main.config["max_steps"] == 50
    assert main.config["optimizer"] == {"name": "adam", "learning_rate": 1e-3}
    # The recommended method comes first, with the learning rate its defaults were measured at (its registry
    # record, as SalUn's and Selective Amnesia's published Adam 1e-4); every other method runs at the protocol's.
    assert main.method_names[0] == methods.RECOMMENDED_METHOD == "remap_surgery"
    assert main.config["method_optimizers"]["remap_surgery"] == {"name": "sgd", "learning_rate": 3e-3}
    assert main.config["method_optimizers"] == {
        name: dict(record.optimizer) for name, record in methods.METHODS.items() if record.optimizer is not None
    }
    assert main.config["method_optimizers"]["salun"] == {"name": "adam", "learning_rate": 1e-4}
    assert main.threshold is None and not main.guided
    assert np.all(main.run_data.train.labels[main.forget_idx] == 1)
    assert not np.any(main.run_data.train.labels[main.retain_idx] == 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("methods", "sa,nope", "unknown method 'nope'"),
        ("methods", "all", None),
        ("forget_classes", "1,7", None),
        ("threshold", "0.05", None),
        ("threshold", "1.0", "outside (0, 1)"),
        ("threshold", "often", "'auto' or a number"),
        ("gated_target", "maybe", "gated_target"),
        ("gated_target", "512.5", None),
    ],
)
def test_plan_validation(tmp_path, field, value, message):
    config = _load_config("unlearn_smoke")
    setattr(config, field, value)
    if message is None:
        plan = unlearning.plan_run(config, tmp_path / "w")
        if field == "methods":
            # A VAE: every method but those whose loss relabels (salun needs a class-conditional DDPM).
            assert plan.method_names == tuple(n for n, m in methods.METHODS.items() if not m.class_conditional)
    else:
        with pytest.raises(unlearning.UnlearnConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            unlearning.plan_run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_method_learning_rate_given_on_the_command_line_replaces_the_registry_one(tmp_path):
    config = _load_config("unlearn_smoke")
    config.method_optimizers.remap_surgery.learning_rate = 1e-4
    config.method_optimizers.sa.learning_rate = 2e-4
    plan = unlearning.plan_run(config, tmp_path / "w")
    assert plan.config["method_optimizers"]["remap_surgery"]["learning_rate"] == 1e-4
    assert plan.config["method_optimizers"]["sa"] == {"name": "adam", "learning_rate": 2e-4}


def test_a_method_optimizer_of_another_name_takes_none_of_the_run_optimizers_arguments():
    from gsu_jax.unlearning.config import parse_method_optimizers

    run_optimizer = {"name": "adam", "learning_rate": 1e-3, "b1": 0.8}
    parsed = parse_method_optimizers(
        {"remap_surgery": {"name": "sgd", "learning_rate": 3e-3}, "sa": {"learning_rate": 2e-4}}, run_optimizer
    )
    assert parsed["remap_surgery"] == {"name": "sgd", "learning_rate": 3e-3}  # no b1: optax.sgd has none
    assert parsed["sa"] == {"name": "adam", "learning_rate": 2e-4, "b1": 0.8}
    only_named = parse_method_optimizers({"s": {"name": "sgd"}}, run_optimizer)
    assert only_named["s"] == {"name": "sgd", "learning_rate": 1e-3}  # the run's learning rate, not its b1
    assert methods.METHODS["remap_surgery"].optimizer == {"name": "sgd", "learning_rate": 3e-3}


def test_method_hyperparameters_are_validated_against_the_registry(tmp_path):
    config = _load_config("unlearn_smoke")
    config.methods = "sa_span"
    config.method_hparams.sa_span.num_directions = 0
    with pytest.raises(unlearning.UnlearnConfigError, match="num_directions"):
        unlearning.plan_run(config, tmp_path / "w")


def test_guided_labels():
    config = _load_config("unlearn_smoke")
    config.guidance_weight = 0.0
    assert unlearning.plan_run(config, "/tmp/unused_label_check").label("sa") == "sa"
    config.guidance_weight = 5.0
    assert unlearning.plan_run(config, "/tmp/unused_label_check").label("sa") == "sa+guided"


# ------------------------------------------------------------------------------------------- integrity


def _fake_trained(role: str, params, fingerprint: str, seed: int = 0) -> training.TrainedModel:
    from gsu_jax.checkpointing import state_digest

    metadata = {
        "role": role,
        "seed": seed,
        "params_digest": state_digest(params),
        "train_fingerprint": fingerprint,
        "num_train": 10,
    }
    return training.TrainedModel(graphdef=None, params=params, config=ml_collections.ConfigDict(), metadata=metadata)


def test_classifier_independence_accepts_distinct_runs():
    evaluator = _fake_trained("evaluator", {"w": jnp.ones(3)}, "aaa")
    guidance = _fake_trained("guidance", {"w": jnp.zeros(3)}, "bbb")
    evidence = unlearning.check_classifier_independence(evaluator, guidance)
    assert evidence["evaluator"]["params_digest"] != evidence["guidance"]["params_digest"]


@pytest.mark.parametrize("flaw", ["same_object", "same_params", "same_data", "same_role"])
def test_classifier_independence_refuses(flaw):
    params = {"w": jnp.ones(3)}
    evaluator = _fake_trained("evaluator", params, "aaa")
    guidance = {
        "same_object": _fake_trained("guidance", params, "bbb"),
        "same_params": _fake_trained("guidance", {"w": jnp.ones(3)}, "bbb"),
        "same_data": _fake_trained("guidance", {"w": jnp.zeros(3)}, "aaa"),
        "same_role": _fake_trained("evaluator", {"w": jnp.zeros(3)}, "bbb"),
    }[flaw]
    with pytest.raises(RuntimeError, match="not independent"):
        unlearning.check_classifier_independence(evaluator, guidance)


# ------------------------------------------------------------------------------------------- reporting


def _fake_report() -> dict:
    stat = metrics.summarize
    method = {key: stat([1.0, 2.0]) for key in SUMMARY_KEYS}
    method.update(steps_to_threshold=stat([2, None]), steps_to_published_threshold=stat([1, 1]), guided=True)
    reference = {
        "forget_fraction": 0.03,
        "fid_retain": 10.0,
        "fid_all": 11.0,
        "inception_score": 8.0,
        "nelbo_heldout_retain": 140.0,
        "nelbo_heldout_forget": 60.0,
        "mia_auc": 0.55,
    }
    return {
        "command": "python unlearn.py --config configs/unlearn_mnist.py --workdir runs/unlearn",
        "config": {
            "max_steps": 50,
            "continue_to_budget": True,
            "batch_size": 128,
            "retain_batch_size": 128,
            "optimizer": {"name": "adam", "learning_rate": 1e-3},
            "fid_samples": 5000,
            "guidance_weight": 10.0,
        },
        "forget_classes": [1],
        "seeds": [0, 1],
        "threshold": {
            "mode": "auto",
            "value": 0.012,
            "monitor_samples": 1024,
            "oracle_forget_fraction": 0.006,
            "published": {"value": 0.02, "monitor_samples": 128},
        },
        "data": {
            "spec": "embedded",
            "fingerprint": "f" * 64,
            "num_forget_train": 450,
            "num_retain_train": 4050,
            "num_heldout": 500,
        },
        "device": "cpu",
        "original": reference,
        "oracle": dict(reference, fid_retain=float("nan")),
        "methods": {"sa+guided": method},
    }


def test_markdown_table_labels_and_counts(tmp_path):
    report = _fake_report()
    table = reporting.markdown_table(report)
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, original, oracle, one method
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| sa+guided |" in table
    assert "2.0 (1/2 stopped)" in table  # one seed of two reached the threshold
    assert "1.50 ± 0.71" in table  # mean ± sample std over seeds
    reporting.write_markdown(str(tmp_path / "report.md"), report)
    text = (tmp_path / "report.md").read_text()
    assert report["command"] in text and table in text and "+guided" in text


def test_json_writer_turns_non_finite_into_null(tmp_path):
    report = _fake_report()
    reporting.write_json(str(tmp_path / "r.json"), report)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["oracle"]["fid_retain"] is None
    assert loaded["methods"]["sa+guided"]["steps_to_threshold"]["per_seed"] == [2, None]


def test_csv_and_pictures(tmp_path):
    rows = [
        {"seed": 0, "step": 0, "forget_fraction": 0.5},
        {"seed": 0, "step": 1, "forget_fraction": 0.25, "update_norm": np.float32(2.0)},
    ]
    reporting.write_step_csv(str(tmp_path / "log.csv"), rows)
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines == ["seed,step,forget_fraction,update_norm", "0,0,0.5,", "0,1,0.25,2"]
    images = np.random.default_rng(0).uniform(size=(5, 4, 4, 1)).astype(np.float32)
    grid = io.tile_images(images, 3)
    assert grid.shape == (8, 12, 1)
    np.testing.assert_array_equal(grid[4:8, 0:4], images[3])
    reporting.save_sample_panels(str(tmp_path / "s.png"), {"before": images, "after": images})
    reporting.plot_forget_fraction(
        str(tmp_path / "f.png"),
        {"sa": [[0.3, 0.1], [0.3, 0.2, 0.0]]},
        threshold=0.05,
        threshold_label="auto",
        oracle_fraction=0.01,
    )
    for name in ("s.png", "f.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_to_unlearn_per_seed_is_step_time_times_steps():
    run = {"seed": 3, "stop": 4, "stop_published": None, "steps_run": 10, "step_times": [0.01] * 10}
    record = seed_record(run, {}, None, budget=10)
    assert math.isclose(record["time_to_unlearn_s"], 0.04)
    assert math.isclose(record["step_time_ms"], 10.0)


def test_example_set_stop_is_the_first_gap_that_reaches_the_oracle_band():
    """A forget set of examples stops at the first loss gap at or above the oracle's band's low end (a gap that
    jumps past the band has forgotten too much, and stops there too); there is no published rule (NaN never stops)."""
    band = metrics.loss_gap_band(0.2, 0.5)  # [-0.8, 1.2]
    nan = float("nan")
    run = _run([-6.0, -3.0, -0.5, 0.9, -0.1], [nan] * 5, threshold=band, continue_to_budget=True)
    assert run["stop"] == 2 and int(run["params_at_stop"]["updates"]) == 2
    assert run["stop_published"] is None
    jumped = _run([-6.0, -3.0, 4.0], [nan] * 3, threshold=band, continue_to_budget=True)
    assert jumped["stop"] == 2
    assert _run([0.0, 5.0], [nan] * 2, threshold=band, continue_to_budget=False)["stop"] == 0
