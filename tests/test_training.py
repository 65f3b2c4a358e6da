"""Tests of gsu_jax.training and gsu_jax.config_validation on configs/smoke.py (tiny models, seconds).

One uninterrupted smoke run (module fixture) is the reference; the other runs reuse its compiled programs (same
shapes), so the file stays fast: resumption after interruptions, refusals, overwrite, corruption, loading.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import shutil

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from gsu_jax import checkpointing, config_validation, losses, models, training
from gsu_jax.config_validation import validate_train_config
from gsu_jax.schema import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_TEST_DIR = REPO.parent / "shared" / "data" / "mnist"


def _load_config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_config(**overrides) -> ml_collections.ConfigDict:
    config = _load_config_module("smoke").get_config()
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _steps(workdir: pathlib.Path, role: str) -> list[int]:
    return sorted(int(p.name) for p in (workdir / role / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: every role, three epochs each, a checkpoint after every epoch."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    results = training.train_and_evaluate(smoke_config(), workdir)
    return workdir, results


# ------------------------------------------------------------------------------------------- training


def test_run_writes_every_role_with_metrics_png_and_history(reference):
    workdir, results = reference
    assert set(results) == {"generative", "evaluator", "guidance"}
    generative = results["generative"]
    for key in ("heldout_neg_elbo", "heldout_reconstruction", "heldout_kl", "train_neg_elbo"):
        assert math.isfinite(generative[key]) and generative[key] > 0
    assert generative["heldout_neg_elbo"] == pytest.approx(
        generative["heldout_reconstruction"] + generative["heldout_kl"], rel=1e-5
    )
    png = pathlib.Path(generative["samples_png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    for role in ("evaluator", "guidance"):
        # Two tiny epochs: far from good, but the classifier learned something beyond chance (10%).
        assert 0.2 < results[role]["heldout_accuracy"] <= 1.0
    for role, metrics in results.items():
        assert metrics["nonfinite_steps"] == 0 and metrics["resumed_from_step"] is None
        assert _steps(workdir, role)[-1] == metrics["steps"]
        saved = json.loads((workdir / role / "metrics.json").read_text())
        assert saved["steps"] == metrics["steps"]
        history = (workdir / role / "history.csv").read_text().splitlines()
        assert history[0] == "epoch,step,loss,skipped_steps" and len(history) == 1 + metrics["epochs"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["roles"]) == set(results)


def test_evaluator_and_guidance_are_separate_models_from_separate_runs(reference):
    """Issue 4's integrity rule: different keys, disjoint training examples, distinct parameters."""
    workdir, _ = reference
    evaluator = training.load_trained(workdir, "evaluator")
    guidance = training.load_trained(workdir, "guidance")
    assert evaluator.metadata["train_fingerprint"] != guidance.metadata["train_fingerprint"]
    for ours, theirs in zip(jax.tree.leaves(evaluator.params), jax.tree.leaves(guidance.params)):
        assert not np.array_equal(ours, theirs)
    run_data = training.prepare_data(smoke_config())
    rows = lambda dataset: {row.tobytes() for row in np.asarray(dataset.images)}  # noqa: E731
    assert not rows(run_data.evaluator) & rows(run_data.guidance)
    assert len(run_data.evaluator) + len(run_data.guidance) == len(run_data.train)
    assert not rows(run_data.train) & rows(run_data.heldout)


def test_interrupted_and_resumed_runs_end_bit_identical(tmp_path, reference, monkeypatch):
    """Kill the run (KeyboardInterrupt right after a checkpoint) twice, resume twice: same final parameters."""
    reference_dir, reference_results = reference
    workdir = tmp_path / "interrupted"
    config = smoke_config(roles="generative,evaluator")
    real_save = checkpointing.Checkpointer.save
    saves = {"count": 0, "stop_after": 1}

    def save_then_maybe_interrupt(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        saves["count"] += 1
        if saves["count"] == saves["stop_after"]:
            raise KeyboardInterrupt(f"interrupted after saving step {step}")

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_maybe_interrupt)
    steps_per_epoch = reference_results["generative"]["steps"] // 3
    with pytest.raises(KeyboardInterrupt):  # after generative epoch 1
        training.train_and_evaluate(config, workdir)
    assert _steps(workdir, "generative") == [steps_per_epoch]
    with pytest.raises(training.CheckpointNotFoundError, match="not finished"):
        training.load_trained(workdir, "generative")

    saves.update(count=0, stop_after=3)  # generative epochs 2 and 3, then evaluator epoch 1
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(config, workdir)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    results = training.train_and_evaluate(config, workdir)
    assert results["generative"]["resumed_from_step"] == reference_results["generative"]["steps"]
    assert results["evaluator"]["resumed_from_step"] == reference_results["evaluator"]["steps"] // 3

    for role in ("generative", "evaluator"):
        resumed = training.load_trained(workdir, role)
        uninterrupted = training.load_trained(reference_dir, role)
        chex.assert_trees_all_equal(resumed.params, uninterrupted.params)  # bit for bit
        assert resumed.metadata["history"] == uninterrupted.metadata["history"]
        assert results[role]["final_train_loss"] == reference_results[role]["final_train_loss"]


def test_rerun_of_a_finished_workdir_only_evaluates(reference):
    workdir, results = reference
    # Fields that do not change the trained parameters may differ (scope "run").
    again = training.train_and_evaluate(smoke_config(checkpoint_every_steps=1000, num_sample_images=4), workdir)
    for role in results:
        assert again[role]["resumed_from_step"] == results[role]["steps"]
        assert again[role]["steps"] == results[role]["steps"]
    assert again["generative"]["heldout_neg_elbo"] == results["generative"]["heldout_neg_elbo"]
    assert again["evaluator"]["heldout_accuracy"] == results["evaluator"]["heldout_accuracy"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"latent_dim": 3}, r"latent_dim: 2 -> 3"),
        ({"seed": 1}, r"seed: 0 -> 1"),
        ({"holdout_fraction": 0.2}, r"training data: fingerprint"),
        ({"roles": "evaluator", "classifier_num_epochs": 4}, r"evaluator checkpoint .*classifier_num_epochs: 3 -> 4"),
    ],
)
def test_workdir_of_another_config_or_data_is_refused_before_anything_is_written(reference, overrides, expected):
    workdir, _ = reference
    before = {path: path.stat().st_mtime_ns for path in workdir.rglob("*")}
    with pytest.raises(checkpointing.CheckpointMismatchError, match=expected) as excinfo:
        training.train_and_evaluate(smoke_config(**overrides), workdir)
    assert "--overwrite" in str(excinfo.value)
    with pytest.raises(checkpointing.CheckpointMismatchError, match=expected):
        training.check_resumable(smoke_config(**overrides), workdir)
    assert {path: path.stat().st_mtime_ns for path in workdir.rglob("*")} == before


def test_a_classifier_change_leaves_the_generative_role_resumable(reference):
    workdir, results = reference
    saved = training.check_resumable(smoke_config(roles="generative", classifier_num_epochs=4), workdir)
    assert saved["generative"]["finished"] and saved["generative"]["step"] == results["generative"]["steps"]
    assert training.check_resumable(smoke_config(), workdir / "fresh") == dict.fromkeys(results)
    again = training.train_and_evaluate(smoke_config(roles="generative", classifier_num_epochs=4), workdir)
    assert again["generative"]["resumed_from_step"] == results["generative"]["steps"]


def test_overwrite_discards_the_roles_checkpoints_and_retrains(tmp_path, reference):
    reference_dir, _ = reference
    workdir = tmp_path / "copy"
    shutil.copytree(reference_dir, workdir)
    config = smoke_config(seed=1, roles="generative")
    with pytest.raises(checkpointing.CheckpointMismatchError):
        training.train_and_evaluate(config, workdir)
    results = training.train_and_evaluate(config, workdir, overwrite=True)
    assert results["generative"]["resumed_from_step"] is None
    retrained = training.load_trained(workdir, "generative")
    original = training.load_trained(reference_dir, "generative")
    assert retrained.metadata["seed"] == 1
    assert not np.array_equal(jax.tree.leaves(retrained.params)[0], jax.tree.leaves(original.params)[0])
    # Roles not being trained are left alone.
    assert _steps(workdir, "evaluator") == _steps(reference_dir, "evaluator")


def test_corrupt_latest_checkpoint_is_refused_naming_step_and_path(tmp_path, reference):
    reference_dir, results = reference
    workdir = tmp_path / "copy"
    shutil.copytree(reference_dir, workdir)
    step = results["generative"]["steps"]
    step_dir = workdir / "generative" / "checkpoints" / str(step)
    data_file = max(
        (p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    data_file.write_bytes(bytes(raw))
    for attempt in (
        lambda: training.train_and_evaluate(smoke_config(), workdir),
        lambda: training.load_trained(workdir, "generative"),
    ):
        with pytest.raises(checkpointing.CheckpointCorruptError) as excinfo:
            attempt()
        assert f"step {step}" in str(excinfo.value) and str(step_dir) in str(excinfo.value)


def _damage_largest_params_file(step_dir: pathlib.Path) -> pathlib.Path:
    data_file = max(
        (p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # truncated on disk
    return data_file


def test_restore_fallback_resumes_from_the_newest_good_checkpoint_and_ends_bit_identical(tmp_path, reference):
    """Latest generative step truncated: refused before any work without the flag (naming step and file); with
    ``restore_fallback`` the run resumes from the step before, sets the bad one aside, and ends identical."""
    reference_dir, results = reference
    workdir = tmp_path / "copy"
    shutil.copytree(reference_dir, workdir)
    final = results["generative"]["steps"]
    steps = _steps(workdir, "generative")
    assert steps[-1] == final and len(steps) >= 2
    bad_file = _damage_largest_params_file(workdir / "generative" / "checkpoints" / str(final))
    config = smoke_config(roles="generative")
    before = {path: path.stat().st_mtime_ns for path in workdir.rglob("*")}
    with pytest.raises(checkpointing.CheckpointCorruptError) as excinfo:
        training.train_and_evaluate(config, workdir)
    message = str(excinfo.value)
    assert f"step {final}" in message and f"file '{bad_file}' is truncated" in message
    assert f"earlier steps {', '.join(map(str, steps[:-1]))} remain" in message
    assert "--config.restore_fallback=True" in message
    assert {path: path.stat().st_mtime_ns for path in workdir.rglob("*")} == before  # refused before any work

    again = training.train_and_evaluate(smoke_config(roles="generative", restore_fallback=True), workdir)
    skipped = again["generative"]["skipped_checkpoints"]
    assert [item["step"] for item in skipped] == [final] and str(bad_file) in skipped[0]["reason"]
    moved = pathlib.Path(skipped[0]["moved_to"])
    assert moved.parent == workdir / "generative" / "corrupt_checkpoints" and moved.is_dir()
    assert again["generative"]["resumed_from_step"] == steps[-2]
    resumed = training.load_trained(workdir, "generative")
    uninterrupted = training.load_trained(reference_dir, "generative")
    chex.assert_trees_all_equal(resumed.params, uninterrupted.params)  # bit for bit
    assert again["generative"]["heldout_neg_elbo"] == results["generative"]["heldout_neg_elbo"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["roles"]["generative"]["skipped_checkpoints"] == skipped
    # A checkpoint of another config is refused as such, not skipped as if damaged.
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"latent_dim: 2 -> 3"):
        training.train_and_evaluate(smoke_config(roles="generative", latent_dim=3, restore_fallback=True), workdir)


def test_restore_fallback_refuses_when_no_checkpoint_verifies(tmp_path, reference):
    reference_dir, _ = reference
    workdir = tmp_path / "copy"
    shutil.copytree(reference_dir / "evaluator", workdir / "evaluator")
    for step in _steps(workdir, "evaluator"):
        _damage_largest_params_file(workdir / "evaluator" / "checkpoints" / str(step))
    with pytest.raises(checkpointing.CheckpointCorruptError, match=r"no checkpoint in .* verifies: step \d+: file"):
        training.train_and_evaluate(smoke_config(roles="evaluator", restore_fallback=True), workdir)


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    real_disk_usage = shutil.disk_usage

    def nearly_full(path):
        total, used, _ = real_disk_usage(path)
        return type(real_disk_usage(path))(total, used, 3 * 2**20)  # 3 MiB free

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)  # the free-space check (gsu_jax.training.run) reads it
    workdir = tmp_path / "full"
    with pytest.raises(
        checkpointing.WorkdirError,
        match=r"has 3\.0 MiB free; the checkpoints of this run need "
        r"about \d+\.\d MiB",
    ):
        training.train_and_evaluate(smoke_config(), workdir)
    assert list(workdir.iterdir()) == []  # nothing trained or written


def test_workdir_that_is_a_file_or_unwritable_is_refused_before_training(tmp_path):
    from test_checkpointing import unwritable_directory

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for workdir, expected in (
        (a_file, "exists and is not a directory"),
        (a_file / "below", "cannot be created"),
        (unwritable_directory(tmp_path), "is not writable"),
    ):
        with pytest.raises(checkpointing.WorkdirError, match=expected):
            training.train_and_evaluate(smoke_config(), workdir)


def test_load_trained_gives_a_usable_model(reference):
    workdir, results = reference
    evaluator = training.load_trained(workdir, "evaluator")
    assert isinstance(evaluator.config, ml_collections.ConfigDict) and evaluator.config.seed == 0
    assert evaluator.metadata["role"] == "evaluator" and evaluator.metadata["finished"]
    data = training.prepare_data(smoke_config())
    logits = models.classifier_logits(evaluator.graphdef, evaluator.params, jnp.asarray(data.heldout.images))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == data.heldout.labels))
    assert accuracy == pytest.approx(results["evaluator"]["heldout_accuracy"], abs=1e-6)
    vae = training.load_trained(workdir, "generative")
    assert nnx.merge(vae.graphdef, vae.params).latent_dim == 2
    with pytest.raises(ValueError, match="unknown role 'critic'"):
        training.load_trained(workdir, "critic")
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="no trained generative model"):
        training.load_trained(workdir / "nowhere", "generative")


def test_oracle_excludes_classes_from_the_generative_data_only():
    data = training.prepare_data(smoke_config(exclude_classes="1,7"))
    assert not np.isin(data.generative.labels, [1, 7]).any()
    assert len(data.generative) == np.isin(data.train.labels, [1, 7], invert=True).sum()
    assert set(np.unique(data.evaluator.labels)) == set(range(10))
    with pytest.raises(ConfigError, match="exclude_classes='12'"):
        training.prepare_data(smoke_config(exclude_classes="12"))


@pytest.mark.skipif(not MNIST_TEST_DIR.is_dir(), reason=f"the real MNIST test set is not at {MNIST_TEST_DIR}")
def test_eval_data_leaves_all_of_data_for_training():
    data = training.prepare_data(smoke_config(eval_data=f"idx:{MNIST_TEST_DIR}"))
    assert len(data.train) == 5000 and len(data.heldout) == 10000


def test_diverging_training_stops_with_an_error_and_writes_no_nan_model(tmp_path):
    workdir = tmp_path / "diverge"
    with pytest.raises(training.TrainingDivergedError, match="non-finite gradients"):
        training.train_and_evaluate(smoke_config(roles="generative", learning_rate=1e30), workdir)
    for step in _steps(workdir, "generative"):
        # Whatever was saved before the divergence was detected is finite.
        with checkpointing.Checkpointer(workdir / "generative" / "checkpoints") as ckpt:
            assert ckpt.read_metadata(step)["consecutive_nonfinite"] < 18


def test_a_nan_gradient_skips_exactly_its_step_counts_it_and_the_rest_is_a_replay_without_it():
    """One poisoned example (its loss times NaN: NaN gradients) in batch 1 of 3: that step is skipped (parameters
    and Adam state untouched), flagged and counted; the epoch equals a replay of steps 0 and 2 alone."""
    graphdef, params = nnx.split(models.build_model("mlp_classifier", hidden=8, rngs=nnx.Rngs(0)))
    base = losses.cross_entropy(graphdef)
    poison = 10  # a label no real example has

    def loss_fn(params, example, key):
        real = {"image": example["image"], "label": example["label"] % poison}
        return base(params, real, key) * jnp.where(example["label"] == poison, jnp.nan, 1.0)

    inner = optax.adam(1e-2)
    optimizer = optax.apply_if_finite(inner, max_consecutive_errors=int(np.iinfo(np.int32).max))
    data = training.prepare_data(smoke_config())
    images, labels = np.asarray(data.evaluator.images[:300]), np.asarray(data.evaluator.labels[:300]).copy()
    key = jax.random.key(5)
    # The epoch's plan, as make_train_epoch documents it: a permutation cut into batches, one key per step.
    order_key, steps_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(order_key, 300))[:192].reshape(3, 64)
    step_keys = jax.random.split(steps_key, 3)
    labels[order[1, 7]] = poison
    epoch = training.make_train_epoch(loss_fn, optimizer, num_batches=3, batch_size=64)
    start = jax.tree.map(jnp.copy, params)
    out_params, out_state, batch_losses, finite = epoch(
        start, optimizer.init(start), jnp.asarray(images), jnp.asarray(labels), key
    )
    assert np.asarray(finite).tolist() == [True, False, True]
    assert np.isnan(np.asarray(batch_losses)[1]) and np.isfinite(np.asarray(batch_losses)[[0, 2]]).all()
    assert int(out_state.total_notfinite) == 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(out_params))

    replay_params, replay_state = params, inner.init(params)
    batch_loss = losses.batch_mean(base)
    for index in (0, 2):
        batch = {"image": jnp.asarray(images[order[index]]), "label": jnp.asarray(labels[order[index]])}
        _, loss_key = jax.random.split(step_keys[index])
        grads = jax.grad(batch_loss)(replay_params, batch, loss_key)
        updates, replay_state = inner.update(grads, replay_state, replay_params)
        replay_params = optax.apply_updates(replay_params, updates)
    chex.assert_trees_all_close(out_params, replay_params, rtol=1e-5, atol=1e-6)


def test_random_translate_is_a_zero_filled_shift():
    image = np.zeros((28, 28, 1), np.float32)
    image[5:23, 6:20] = np.random.default_rng(0).random((18, 14, 1))  # content at least 2 px from every edge
    rolls = [np.roll(image, (dy, dx), axis=(0, 1)) for dy in range(-2, 3) for dx in range(-2, 3)]
    keys = jax.random.split(jax.random.key(0), 64)
    shifted = jax.jit(jax.vmap(lambda k: training.random_translate(jnp.asarray(image), max_shift=2, key=k)))(keys)
    seen = set()
    for out in np.asarray(shifted):
        matches = [i for i, rolled in enumerate(rolls) if np.array_equal(out, rolled)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # many different offsets are drawn
    same = training.random_translate(jnp.asarray(image), max_shift=0, key=keys[0])
    np.testing.assert_array_equal(same, image)


def test_stepwise_epoch_draws_the_same_batches_as_the_scanned_epoch():
    """The conv models' step-by-step epoch (see make_train_epoch) and the scanned epoch compute the same thing."""
    graphdef, params = nnx.split(models.build_model("mlp_classifier", hidden=8, rngs=nnx.Rngs(0)))
    optimizer = optax.adamw(1e-2, weight_decay=1e-2)
    data = training.prepare_data(smoke_config())
    images, labels = jnp.asarray(data.evaluator.images[:300]), jnp.asarray(data.evaluator.labels[:300])
    outputs = []
    for scan in (True, False):
        epoch = training.make_train_epoch(
            losses.cross_entropy(graphdef), optimizer, num_batches=3, batch_size=64, augment_shift=2, scan=scan
        )
        start = jax.tree.map(jnp.copy, params)
        outputs.append(epoch(start, optimizer.init(start), images, labels, jax.random.key(3)))
    (scan_params, _, scan_losses, scan_finite), (step_params, _, step_losses, step_finite) = outputs
    chex.assert_trees_all_close(scan_params, step_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scan_losses, step_losses, rtol=1e-5)
    assert scan_finite.all() and step_finite.all()


# ------------------------------------------------------------------------------------------- config validation


def test_all_shipped_configs_validate():
    for name in ("smoke", "mnist_vae", "mnist_convvae", "ddpm_smoke", "mnist_ddpm"):
        values = validate_train_config(_load_config_module(name).get_config())
        assert set(values) == set(config_validation.TRAIN_SCHEMA)


def test_unknown_key_is_refused_with_a_did_you_mean_hint():
    config = smoke_config()
    config.latnt_dim = 3
    with pytest.raises(ConfigError, match=r"^config\.latnt_dim is not a known field; did you mean 'latent_dim'\?$"):
        validate_train_config(config)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("latent_dim", 0, r"config\.latent_dim=0 is invalid: allowed: an integer >= 1"),
        ("latent_dim", 2.5, r"config\.latent_dim=2\.5 is invalid: expected int, got float"),
        ("num_epochs", True, r"config\.num_epochs=True is invalid: expected int, got bool"),
        ("learning_rate", -1e-3, r"config\.learning_rate=-0\.001 is invalid: allowed: a number > 0"),
        ("learning_rate", float("nan"), r"config\.learning_rate=nan is invalid: not finite"),
        ("holdout_fraction", 0.9, r"allowed: a number in \(0, 0\.5\]"),
        ("evaluator_fraction", 1.0, r"allowed: a number in \(0, 1\)"),
        ("model", "gan", r"config\.model='gan' is invalid: allowed: one of conv_vae, ddpm_unet, mlp_vae"),
        ("classifier", "mlp_vae", r"allowed: one of cnn_classifier, mlp_classifier"),
        ("data", "mnist", r"config\.data='mnist' is invalid: allowed: a data spec"),
        ("eval_data", "idx:", r"config\.eval_data='idx:' is invalid"),
        ("seed", -1, r"config\.seed=-1 is invalid: allowed: an integer >= 0"),
        ("progress_bar", "yes", r"expected bool, got str"),
        ("classifier_augment_shift", 9, r"allowed: an integer in \[0, 8\]"),
        ("roles", "", r"config\.roles='' is invalid"),
        ("roles", "generative,evaluater", r"unknown role 'evaluater'; did you mean 'evaluator'\?"),
        ("exclude_classes", "1,x", r"'x' is not a class index"),
        ("exclude_classes", "3,3", r"a class is listed twice"),
        (
            "model_kwargs",
            {"hiden": 3},
            r"config\.model_kwargs\.hiden is not a hyperparameter of 'mlp_vae'; did you mean 'hidden'\?",
        ),
        (
            "model_kwargs",
            {"latent_dim": 3},
            r"config\.model_kwargs\.latent_dim cannot be set: it is fixed by config\.latent_dim",
        ),
        ("model_kwargs", {"hidden": 1.5}, r"config\.model_kwargs\.hidden=1\.5 is invalid: expected int"),
        (
            "classifier_kwargs",
            {"num_classes": 3},
            r"classifier_kwargs\.num_classes cannot be set: it is fixed by the data",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line_naming_field_and_value(field, value, expected):
    values = dict(smoke_config().items())  # a plain mapping: ConfigDict itself would refuse a change of type
    values[field] = value
    with pytest.raises(ConfigError, match=expected) as excinfo:
        validate_train_config(values)
    assert "\n" not in str(excinfo.value)


def test_missing_field_is_refused():
    values = dict(smoke_config().items())
    del values["kl_weight"]
    with pytest.raises(ConfigError, match=r"config\.kl_weight is missing"):
        validate_train_config(values)


def test_optional_field_missing_from_an_older_config_takes_its_default():
    """Configs saved in checkpoints before restore_fallback existed still validate (it never changes results)."""
    values = dict(smoke_config().items())
    del values["restore_fallback"]
    assert validate_train_config(values)["restore_fallback"] is False
    assert "restore_fallback" not in values
    assert config_validation.TRAIN_SCHEMA["restore_fallback"].scope == "run"


def test_a_model_the_data_cannot_feed_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.model_kwargs=.*num_groups.*cannot build a model"):
        training.train_and_evaluate(
            smoke_config(model="conv_vae", model_kwargs=ml_collections.ConfigDict({"channels": 6, "num_groups": 4})),
            tmp_path / "never",
        )
    with pytest.raises(ConfigError, match=r"config\.batch_size=5000 exceeds the 4500 training examples"):
        training.train_and_evaluate(smoke_config(batch_size=5000), tmp_path / "never")


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20))
def test_any_unknown_key_is_refused(name):
    hypothesis.assume(name not in config_validation.TRAIN_SCHEMA)
    values = dict(smoke_config().items())
    values[name] = 1
    with pytest.raises(ConfigError, match=rf"^config\.{name} is not a known field"):
        validate_train_config(values)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    value=st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), st.none())
)
def test_latent_dim_accepts_exactly_the_positive_integers(value):
    values = dict(smoke_config().items())
    values["latent_dim"] = value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        assert validate_train_config(values)["latent_dim"] == value
    else:
        with pytest.raises(ConfigError, match=r"^config\.latent_dim="):
            validate_train_config(values)
