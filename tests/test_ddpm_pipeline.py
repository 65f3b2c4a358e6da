"""The DDPM through the same entry points as the VAE: train.py, unlearn.py, resume, report, refusals.

One tiny real run is shared by the module: ``unlearn.py`` (configs/unlearn_ddpm_smoke.py, a subprocess) trains the
class-conditional DDPM of configs/ddpm_smoke.py, its evaluator and the oracle through train.py's code, and unlearns
digit 1 with ``remap_surgery``, ``sa``, ``sa_per_example``, ``salun`` and ``selective_amnesia`` (the last two also
with surgery); ``train.py`` then re-runs on the finished DDPM workdir. The resume test
re-trains the same DDPM in this process, killed after its first checkpoint, and must end bit-identical to the
subprocess's uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import pathlib
import subprocess
import sys

import chex
import numpy as np
import pytest

from gsu_jax import checkpointing, generative, training, unlearning
from gsu_jax.config_validation import load_config_file, validate_train_config
from gsu_jax.schema import ConfigError
from gsu_jax.unlearning.evaluation import gated_target

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_SMOKE = REPO / "configs" / "ddpm_smoke.py"
UNLEARN_SMOKE = REPO / "configs" / "unlearn_ddpm_smoke.py"

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _train_config(**overrides):
    config = load_config_file(TRAIN_SMOKE)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    """``unlearn.py`` from nothing: trains the DDPM, its evaluator and the oracle DDPM (train.py's code; the two
    DDPMs share their compiled programs), unlearns with the smoke config's seven methods: (workdir, report)."""
    workdir = tmp_path_factory.mktemp("ddpm") / "unlearn"
    done = _run("unlearn.py", "--config", str(UNLEARN_SMOKE), "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eps-MSE" in done.stdout  # the printed table names the DDPM's loss
    return workdir, json.loads((workdir / "report.json").read_text())


@pytest.fixture(scope="module")
def trained(unlearned):
    """The DDPM trained by the unlearning run: (its train.py workdir, train.py re-run on it)."""
    workdir = unlearned[0] / "train" / "model"
    # A finished workdir: train.py only re-evaluates (and prints the DDPM's headline).
    done = _run("train.py", "--config", str(TRAIN_SMOKE), "--workdir", str(workdir), "--config.roles=generative")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_train_cli_evaluates_the_ddpm_with_metrics_and_samples(trained):
    workdir, done = trained
    assert "generative: held-out epsilon MSE" in done.stdout
    metrics = json.loads((workdir / "generative" / "metrics.json").read_text())
    assert metrics["model"] == "ddpm_unet" and metrics["resumed_from_step"] == metrics["steps"]
    assert 0 < metrics["heldout_eps_loss"] < 2 and 0 < metrics["train_eps_loss"] < 2
    assert "heldout_neg_elbo" not in metrics  # no VAE names on a DDPM
    assert pathlib.Path(metrics["samples_png"]).stat().st_size > 0
    model = training.load_trained(workdir, "generative")
    assert model.metadata["model_kwargs"]["num_classes"] == 10  # class_conditional: K from the data
    # The VAE-only fields stay out of the DDPM's identity (and the DDPM's out of a VAE's).
    assert "latent_dim" not in model.metadata["identity"] and "diffusion_steps" in model.metadata["identity"]


def test_interrupted_and_resumed_ddpm_run_ends_bit_identical(tmp_path, trained, monkeypatch):
    """Kill after the first epoch's checkpoint, resume: the same parameters, bit for bit, as the CLI's run."""
    reference_dir, _ = trained
    config = _train_config(roles="generative")
    real_save = checkpointing.Checkpointer.save

    def save_then_interrupt(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        raise KeyboardInterrupt(f"interrupted after saving step {step}")

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(config, tmp_path)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    with pytest.raises(training.CheckpointNotFoundError, match="not finished"):
        training.load_trained(tmp_path, "generative")
    results = training.train_and_evaluate(config, tmp_path)
    reference = training.load_trained(reference_dir, "generative")
    assert results["generative"]["resumed_from_step"] == reference.metadata["steps_per_epoch"]
    resumed = training.load_trained(tmp_path, "generative")
    chex.assert_trees_all_equal(resumed.params, reference.params)
    assert resumed.metadata["history"] == reference.metadata["history"]


def test_unlearning_report_holds_the_ddpm_metrics(unlearned):
    workdir, report = unlearned
    family = report["generative"]
    assert family == {
        "family": "ddpm",
        "loss_prefix": "eps_loss",
        "loss_label": "eps-MSE",
        "class_conditional": True,
        "sampler": "ddim",
        "monitor_sample_steps": 2,
        "fid_sample_steps": 3,
        "guidance_scale": 1.0,
        "monitoring_labels": "i mod K (all classes)",
    }
    assert set(report["methods"]) == {
        "remap_surgery",
        "sa",
        "sa_per_example",
        "salun",
        "salun_surgery",
        "selective_amnesia",
        "selective_amnesia_surgery",
    }
    for name in ("original", "oracle"):
        evaluation = report[name]
        for key in ("eps_loss_heldout_retain", "eps_loss_heldout_forget", "eps_loss_forget_train"):
            assert 0 < evaluation[key] < 2, (name, key)
        assert 0 <= evaluation["forget_label_class_prob"] <= 1 and 0 <= evaluation["forget_label_accuracy"] <= 1
        assert 0 <= evaluation["forget_label_entropy"] <= np.log(10) + 1e-6
        assert np.isfinite(evaluation["fid_retain"]) and not any(key.startswith("nelbo") for key in evaluation)
    for summary in report["methods"].values():
        for key in (
            "eps_loss_heldout_forget_at_stop",
            "forget_label_class_prob_at_stop",
            "forget_label_entropy_at_end",
            "fid_retain_at_end",
        ):
            assert len(summary[key]["per_seed"]) == len(report["seeds"]), key
        for record in summary["per_seed"]:
            assert record["steps_run"] == report["config"]["max_steps"]
    markdown = (workdir / "report.md").read_text()
    assert "held-out eps-MSE retain" in markdown and "p(forget label) on its samples" in markdown
    assert (workdir / "samples" / "sa_per_example.png").stat().st_size > 0


def test_monitoring_noises_are_fixed_and_the_same_for_every_method_and_seed(unlearned):
    workdir, report = unlearned
    x_t = unlearning.monitoring_noise(report["config"]["monitor_samples"], (28, 28, 1))
    assert report["integrity"]["monitoring_latents_digest"] == checkpointing.state_digest(x_t)
    chex.assert_trees_all_equal(unlearning.monitoring_noise(8, (28, 28, 1)), x_t[:8])  # a prefix, no seed enters
    start = []
    for label in report["methods"]:
        with open(workdir / "logs" / f"{label}.csv") as handle:
            start += [float(row["forget_fraction"]) for row in csv.DictReader(handle) if row["step"] == "0"]
    assert len(start) == len(report["methods"]) * len(report["seeds"])
    assert start == [pytest.approx(report["original"]["forget_fraction"], abs=1e-6)] * len(start)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"diffusion_schedule": "quadratic"},
            "config.diffusion_schedule='quadratic' is invalid: allowed: one of cosine",
        ),
        ({"diffusion_steps": 1}, "config.diffusion_steps=1 is invalid: allowed: an integer >= 2"),
        (
            {"sample_steps": 51},
            "config.sample_steps=51 is invalid: allowed: an integer in [1, config.diffusion_steps=50]",
        ),
        ({"class_dropout": 1.0}, "config.class_dropout=1.0 is invalid: allowed: a number in [0, 1)"),
        ({"guidance_scale": -1.0}, "config.guidance_scale=-1.0 is invalid: allowed: a number >= 0"),
        ({"class_dropout": 0.0, "guidance_scale": 2.0}, "config.guidance_scale=2.0 needs an unconditional model"),
        ({"class_conditional": "yes"}, "config.class_conditional='yes' is invalid: expected bool"),
    ],
)
def test_bad_ddpm_train_values_are_refused_in_one_line(overrides, expected):
    values = dict(_train_config().items())  # a plain mapping: ConfigDict itself refuses a str for a bool field
    values.update(overrides)
    with pytest.raises(ConfigError) as error:
        validate_train_config(values)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_reserved_unet_hyperparameters_are_refused():
    config = _train_config()
    config.model_kwargs.num_classes = 3
    with pytest.raises(ConfigError, match=r"config.model_kwargs.num_classes cannot be set"):
        validate_train_config(config)


def test_bad_ddpm_requests_exit_2_with_one_line_through_both_clis(tmp_path):
    commands = {
        "train": (
            ["train.py", "--config", str(TRAIN_SMOKE), "--workdir", str(tmp_path / "t"), "--config.sample_steps=500"],
            "config.sample_steps=500 is invalid",
        ),
        "unlearn_steps": (
            [
                "unlearn.py",
                "--config",
                str(UNLEARN_SMOKE),
                "--workdir",
                str(tmp_path / "u1"),
                "--config.monitor_sample_steps=0",
            ],
            "config.monitor_sample_steps=0 is invalid",
        ),
        "unlearn_guidance": (
            [
                "unlearn.py",
                "--config",
                str(UNLEARN_SMOKE),
                "--workdir",
                str(tmp_path / "u2"),
                "--config.guidance_weight=10",
            ],
            "config.guidance_weight=10.0 is VAE-only",
        ),
    }
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        done = {name: pool.submit(_run, *args, timeout=300) for name, (args, _) in commands.items()}
    for name, (_, expected) in commands.items():
        result = done[name].result()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (name, lines)
    assert not any(tmp_path.iterdir())  # nothing written


def test_families_dispatch_on_the_model_name():
    assert generative.family_of("mlp_vae").name == "vae" and generative.family_of("ddpm_unet").name == "ddpm"
    with pytest.raises(ValueError, match="not a generative model"):
        generative.family_of("mlp_classifier")
    ddpm = generative.FAMILIES["ddpm"]
    assert ddpm.noise_shape({"image_shape": [28, 28, 1]}) == (28, 28, 1)
    assert set(generative.other_families_fields(ddpm)) == {"latent_dim", "kl_weight"}


def test_sa_gated_target_reads_the_family_loss():
    """sa_gated's forget-loss target comes from the DDPM's epsilon loss (eps_loss_*), not the VAE's ELBO keys."""
    config = {"gated_target": "oracle", "gated_target_scale": 2.0}
    original = {"eps_loss_forget_train": 0.1, "eps_loss_heldout_forget": 0.3}
    oracle = {"eps_loss_forget_train": 0.25}
    assert gated_target(config, original, oracle, "eps_loss") == pytest.approx(0.1 + 2.0 * 0.15)
    held_out = dict(config, gated_target="heldout", gated_target_scale=1.0)
    assert gated_target(held_out, original, oracle, "eps_loss") == pytest.approx(0.3)
