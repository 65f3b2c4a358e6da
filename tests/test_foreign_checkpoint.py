"""``config.checkpoint`` naming a plain orbax checkpoint of a registry model that train.py did not write (issue 14).

In-process and tiny (the smoke train config, one method, one seed, no guidance): a model built by
``gsu_jax.models.build_model`` and saved with ``ocp.StandardCheckpointer`` unlearns end to end through
``unlearn_and_evaluate`` (the entry point of ``unlearn.py``) with its parameters imported bit for bit; a second run
reuses the import; mismatched, changed or unrecognisable checkpoints are refused at plan time in one line, before
anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gsu_jax import checkpointing, models, training, unlearning

REPO = pathlib.Path(__file__).resolve().parent.parent


def _tiny_config(checkpoint: pathlib.Path):
    spec = importlib.util.spec_from_file_location("_test_foreign_unlearn_smoke", REPO / "configs" / "unlearn_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.methods = "remap_surgery"
    config.seeds = 1
    config.max_steps = 2
    config.guidance_weight = 0.0
    config.monitor_samples, config.fid_samples, config.grid_samples = 64, 100, 4  # the machinery, not the numbers
    config.checkpoint = str(checkpoint)
    return config


def _save_registry_model(path: pathlib.Path, *, seed: int = 7, **kwargs) -> nnx.State:
    """What a user does outside train.py: build a registry model (the smoke config's mlp_vae) and save its state."""
    kwargs = {"hidden": 16, "latent_dim": 2, **kwargs}
    model = models.build_model("mlp_vae", rngs=nnx.Rngs(seed), **kwargs)
    state = nnx.state(model)
    with ocp.StandardCheckpointer() as saver:
        saver.save(path, state)
    return state


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory):
    """One end-to-end run on a foreign checkpoint, then the same command again (resumption)."""
    root = tmp_path_factory.mktemp("foreign")
    source = root / "my_vae"
    state = _save_registry_model(source)
    workdir = root / "run"
    first = unlearning.unlearn_and_evaluate(_tiny_config(source), workdir)
    step_dir = workdir / "train" / "model" / "generative" / "checkpoints" / "0"
    manifest = (step_dir / checkpointing.FILES_MANIFEST).read_text()
    second = unlearning.unlearn_and_evaluate(_tiny_config(source), workdir)
    return {
        "source": source,
        "state": state,
        "workdir": workdir,
        "first": first,
        "second": second,
        "manifest": manifest,
    }


def test_foreign_checkpoint_unlearns_end_to_end_with_its_parameters_bit_for_bit(foreign_run):
    source, workdir, report = foreign_run["source"], foreign_run["workdir"], foreign_run["first"]
    digest = checkpointing.state_digest(foreign_run["state"])
    original = report["models"]["original"]
    assert original["imported"] == {"from": str(source), "params_digest": digest}
    assert original["params_digest"] == digest
    assert original["workdir"] == str(workdir / "train" / "model")
    assert report["models"]["evaluator"]["imported"] is None and report["models"]["oracle"]["imported"] is None
    loaded = training.load_trained(workdir / "train" / "model", "generative")
    for saved, restored in zip(jax.tree.leaves(foreign_run["state"]), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(restored))
    assert loaded.metadata["imported"]["params_digest"] == digest and loaded.metadata["finished"]
    assert "remap_surgery" in report["methods"]
    assert json.loads((workdir / "report.json").read_text())["models"]["original"]["imported"]["from"] == str(source)


def test_a_second_run_reuses_the_import(foreign_run):
    workdir, second = foreign_run["workdir"], foreign_run["second"]
    step_dir = workdir / "train" / "model" / "generative" / "checkpoints"
    assert [p.name for p in step_dir.iterdir() if p.name.isdigit()] == ["0"]
    # The step was not rewritten: its file list (sizes and sha256 of every file) is the one of the first import.
    assert (step_dir / "0" / checkpointing.FILES_MANIFEST).read_text() == foreign_run["manifest"]
    assert second["models"]["original"] == foreign_run["first"]["models"]["original"]
    assert second["resumed"]  # the finished (method, seed) runs are read back, as for a trained model


def test_a_changed_foreign_checkpoint_is_refused_not_mixed(foreign_run, tmp_path):
    changed = tmp_path / "my_vae_retrained"
    _save_registry_model(changed, seed=8)  # same model, other parameters
    with pytest.raises(unlearning.UnlearnConfigError, match=r"holds other parameters \(digest") as err:
        unlearning.plan_run(_tiny_config(changed), foreign_run["workdir"])
    assert "\n" not in str(err.value) and "config.train_dir" in str(err.value)


def test_a_train_dir_holding_an_import_refuses_to_train_the_original_there(foreign_run, tmp_path):
    config = _tiny_config(foreign_run["source"])
    config.checkpoint = ""
    config.train_dir = str(foreign_run["workdir"] / "train")
    with pytest.raises(unlearning.UnlearnConfigError, match="imported_params_digest"):
        unlearning.plan_run(config, tmp_path / "w")


def test_mismatched_checkpoint_is_refused_before_any_work_naming_the_leaf_and_shapes(tmp_path):
    source = tmp_path / "latent3"
    _save_registry_model(source, latent_dim=3)
    workdir = tmp_path / "w"
    with pytest.raises(unlearning.UnlearnConfigError) as err:
        unlearning.plan_run(_tiny_config(source), workdir)
    message = str(err.value)
    assert "\n" not in message
    assert f"config.checkpoint={str(source)!r}: leaf 'decoder_hidden/kernel/value' is (3, 16) float32" in message
    assert "has (2, 16) float32" in message and "config.train.model, .latent_dim and .model_kwargs" in message
    assert not workdir.exists()


def test_a_tree_of_another_structure_is_refused_naming_the_missing_leaf(tmp_path):
    source = tmp_path / "pure_dict"
    state = nnx.to_pure_dict(nnx.state(models.build_model("mlp_vae", rngs=nnx.Rngs(0), hidden=16, latent_dim=2)))
    with ocp.StandardCheckpointer() as saver:
        saver.save(source, state)
    with pytest.raises(unlearning.UnlearnConfigError, match=r"has no leaf 'decoder_hidden/bias/value' \(\(16,\)"):
        unlearning.plan_run(_tiny_config(source), tmp_path / "w")


def test_a_directory_that_is_neither_is_refused_in_one_line(tmp_path):
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "weights.npy").write_bytes(b"not orbax")
    with pytest.raises(unlearning.UnlearnConfigError) as err:
        unlearning.plan_run(_tiny_config(neither), tmp_path / "w")
    message = str(err.value)
    assert "\n" not in message
    assert "holds no train.py checkpoint (no <role>/checkpoints) nor an orbax checkpoint" in message
    assert "allowed: a train.py workdir or an orbax checkpoint of config.train's model" in message
    assert not (tmp_path / "w").exists()


def test_an_unreadable_orbax_checkpoint_is_refused_in_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "_CHECKPOINT_METADATA").write_text("{not json")
    with pytest.raises(unlearning.UnlearnConfigError, match="is not readable by orbax") as err:
        unlearning.plan_run(_tiny_config(broken), tmp_path / "w")
    assert "\n" not in str(err.value)
