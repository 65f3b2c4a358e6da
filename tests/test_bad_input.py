"""Bad input and faults through the real command lines (subprocesses): the exit-status matrix.

Every case runs ``train.py`` or ``unlearn.py`` as a user would and checks the promise of issue 8: exit status 2
for a usage error (a bad flag, config value or data file, an unusable workdir), 1 for a failure found while
running (a corrupt checkpoint, diverging training); in both cases exactly one line on stderr naming the problem
and no Python traceback; ``--debug`` adds the traceback and keeps the status. Usage errors write nothing.

The cases run concurrently (a few processes at a time) in one module fixture; each test then checks one case.
The optax transforms' trace-time refusals of mismatched trees are checked here too (in-process, no CLI).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import os
import pathlib
import shutil
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_checkpointing import unwritable_directory
from test_data import tiny_digits, write_idx

import gsu_jax
from gsu_jax import models

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "smoke.py")]
CONVVAE = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "mnist_convvae.py")]
UNLEARN = [sys.executable, str(REPO / "unlearn.py"), "--config", str(REPO / "configs" / "unlearn_smoke.py")]
_PARALLEL = 3  # processes at once: each imports JAX; more would only queue on a small machine

# name: (command, extra arguments, exit status, fragments of the one stderr line, whether --workdir stays absent).
# "{data}" is the directory of malformed data files, "{ckpt}" a train workdir whose checkpoint is damaged (an array
# file truncated), "{ckpt_meta}" one whose orbax step metadata is damaged, "{ro}" a directory this process cannot
# write, "{foreign}" an orbax checkpoint of a registry model of another latent size than the smoke config's and
# "{neither}" a directory that is neither a train workdir nor an orbax checkpoint.
CASES = {
    # -- flags and config values (train.py; an unknown flag and a bad --config.model_kwargs key: test_train_cli.py)
    "train_positional_argument": (TRAIN, ["extra"], 2, ["unexpected arguments ['extra']"], True),
    "train_non_boolean_flag": (TRAIN, ["--overwrite=maybe"], 2, ["--overwrite", "maybe"], True),
    "train_int_field_given_a_float": (TRAIN, ["--config.batch_size=1.5"], 2, ["--config.batch_size", "1.5"], True),
    "train_out_of_range_value": (
        TRAIN,
        ["--config.learning_rate=-1"],
        2,
        ["config.learning_rate=-1.0 is invalid: allowed: a number > 0"],
        True,
    ),
    "train_bool_field_given_a_word": (
        TRAIN,
        ["--config.restore_fallback=maybe"],
        2,
        ["--config.restore_fallback=maybe", "Non-boolean"],
        True,
    ),
    "train_unknown_field_with_hint": (
        TRAIN,
        ["--config.chekpoint_every_steps=5"],
        2,
        ["config.chekpoint_every_steps is not a known field; did you mean 'checkpoint_every_steps'?"],
        True,
    ),
    # -- data files (train.py)
    "train_idx_wrong_magic": (
        TRAIN,
        ["--config.data=idx:{data}/magic"],
        2,
        ["{data}/magic/t-images-idx3-ubyte: IDX magic number 2049, expected 2051"],
        True,
    ),
    "train_idx_truncated": (
        TRAIN,
        ["--config.data=idx:{data}/truncated"],
        2,
        ["{data}/truncated/t-images-idx3-ubyte.gz: truncated"],
        True,
    ),
    "train_idx_count_mismatch": (
        TRAIN,
        ["--config.data=idx:{data}/counts"],
        2,
        ["{data}/counts/t-images-idx3-ubyte holds 12 images but {data}/counts/t-labels-idx1-ubyte holds 10 labels"],
        True,
    ),
    "train_heldout_images_of_another_shape": (
        TRAIN,
        ["--config.eval_data=idx:{data}/small"],
        2,
        ["config.eval_data='idx:{data}/small' has images (5, 4, 1)", "(28, 28, 1)", "they must match"],
        True,
    ),
    "train_images_the_model_cannot_take": (
        CONVVAE,
        ["--config.data=idx:{data}/small", "--config.eval_data="],
        2,
        [
            "cannot build a model for images (5, 4, 1) (the images of 'idx:{data}/small')",
            "not supported by the convolutional models",
        ],
        True,
    ),
    # -- workdirs
    "train_workdir_unwritable": (TRAIN, ["--workdir={ro}"], 2, ["is not writable"], True),
    "train_workdir_below_a_file": (
        TRAIN,
        ["--workdir={data}/magic/t-images-idx3-ubyte/run"],
        2,
        ["cannot be created"],
        True,
    ),
    # -- runtime failures (train.py)
    "train_corrupt_checkpoint": (
        TRAIN,
        ["--workdir={ckpt}", "--config.roles=generative"],
        1,
        [
            "checkpoint step",
            "is corrupt: file '{ckpt}/generative/checkpoints/",
            "is truncated",
            "--config.restore_fallback=True",
        ],
        False,
    ),
    "train_damaged_step_metadata": (
        TRAIN,
        ["--workdir={ckpt_meta}", "--config.roles=generative"],
        1,
        ["_CHECKPOINT_METADATA' does not match the sha256 recorded at save time"],
        False,
    ),
    "train_diverging": (
        TRAIN,
        ["--config.roles=generative", "--config.learning_rate=1e30"],
        1,
        ["generative training diverged", "non-finite gradients", "config.learning_rate"],
        False,
    ),
    # -- unlearn.py
    "unlearn_unknown_train_field_with_hint": (
        UNLEARN,
        ["--config.train.latnt_dim=3"],
        2,
        ["config.train.latnt_dim is not a known field; did you mean 'latent_dim'?"],
        True,
    ),
    "unlearn_out_of_range_value": (UNLEARN, ["--config.monitor_samples=0"], 2, ["config.monitor_samples=0"], True),
    "unlearn_label_method_on_a_vae": (
        UNLEARN,
        ["--config.methods=sa,salun"],
        2,
        ["config.methods: 'salun' needs a class-conditional DDPM", "is a VAE; allowed: any method but salun"],
        True,
    ),
    "unlearn_idx_count_mismatch": (
        UNLEARN,
        ["--config.train.data=idx:{data}/counts"],
        2,
        ["config.train.data='idx:{data}/counts' cannot be loaded", "{data}/counts/t-images-idx3-ubyte holds 12 images"],
        True,
    ),
    "unlearn_workdir_unwritable": (UNLEARN, ["--workdir={ro}"], 2, ["is not writable"], True),
    "unlearn_corrupt_checkpoint": (
        UNLEARN,
        ["--config.checkpoint={ckpt}"],
        1,
        ["CheckpointCorruptError", "config.checkpoint='{ckpt}'", "is corrupt: file", "is truncated"],
        True,
    ),
    "unlearn_foreign_checkpoint_of_another_model": (
        UNLEARN,
        ["--config.checkpoint={foreign}"],
        2,
        [
            "config.checkpoint='{foreign}': leaf 'decoder_hidden/kernel/value' is (3, 16) float32",
            "has (2, 16) float32; allowed: a train.py workdir, or an orbax checkpoint of nnx.state(model)",
        ],
        True,
    ),
    "unlearn_checkpoint_neither_workdir_nor_orbax": (
        UNLEARN,
        ["--config.checkpoint={neither}"],
        2,
        ["config.checkpoint='{neither}' holds no train.py checkpoint (no <role>/checkpoints) nor an orbax checkpoint"],
        True,
    ),
    "unlearn_debug_shows_the_traceback": (
        UNLEARN,
        ["--config.max_steps=0", "--debug"],
        2,
        ["config.max_steps=0 is invalid"],
        True,
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Malformed data files, a finished tiny train workdir and a copy of it with a truncated checkpoint file."""
    root = tmp_path_factory.mktemp("bad_input")
    data = root / "data"
    images, labels = tiny_digits()
    for name in ("magic", "truncated", "counts", "small"):
        (data / name).mkdir(parents=True)
    write_idx(data / "magic", "t", images, labels, gz=False, images_magic=2049)
    images_path, _ = write_idx(data / "truncated", "t", images, labels, gz=True)
    images_path.write_bytes(gzip.compress(gzip.decompress(images_path.read_bytes())[:-7]))
    write_idx(data / "counts", "t", images, labels[:-2], gz=False)
    small_images, small_labels = tiny_digits(count=200, rows=5, cols=4)
    write_idx(data / "small", "t", small_images, small_labels, gz=False)

    good = root / "good"
    trained = subprocess.run(
        TRAIN + ["--workdir", str(good), "--config.roles=generative"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    damaged = root / "damaged"
    shutil.copytree(good, damaged)
    final = max(
        (p for p in (damaged / "generative" / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    data_file = max(
        (p for p in (final / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    data_file.write_bytes(data_file.read_bytes()[:100])
    # orbax's own step metadata damaged: orbax logs its failure to read it while listing steps; the CLI keeps to
    # its one line.
    damaged_meta = root / "damaged_meta"
    shutil.copytree(good, damaged_meta)
    step_metadata = damaged_meta / "generative" / "checkpoints" / final.name / "_CHECKPOINT_METADATA"
    step_metadata.write_bytes(bytes(byte ^ 0xFF for byte in step_metadata.read_bytes()))
    # A registry model saved with orbax outside train.py, of another latent size than configs/smoke.py's (2).
    foreign = root / "foreign"
    with ocp.StandardCheckpointer() as saver:
        saver.save(foreign, nnx.state(models.build_model("mlp_vae", rngs=nnx.Rngs(0), hidden=16, latent_dim=3)))
    neither = root / "neither"
    neither.mkdir()
    (neither / "weights.npy").write_bytes(b"not orbax")
    return {
        "data": str(data),
        "ckpt": str(damaged),
        "ckpt_meta": str(damaged_meta),
        "good": str(good),
        "foreign": str(foreign),
        "neither": str(neither),
        "root": root,
    }


@pytest.fixture(scope="module")
def results(files, tmp_path_factory):
    """Runs every case (a few at a time); ``{name: (workdir, returncode, stderr)}``."""
    read_only = unwritable_directory(tmp_path_factory.mktemp("read_only"))
    substitutions = {
        "{data}": files["data"],
        "{ckpt_meta}": files["ckpt_meta"],
        "{ckpt}": files["ckpt"],
        "{good}": files["good"],
        "{foreign}": files["foreign"],
        "{neither}": files["neither"],
        "{ro}": str(read_only),
    }

    def fill(text: str) -> str:
        for key, value in substitutions.items():
            text = text.replace(key, value)
        return text

    def run(name: str) -> tuple[pathlib.Path, int, str]:
        command, extra, _, _, _ = CASES[name]
        workdir = files["root"] / "runs" / name
        arguments = [fill(arg) for arg in extra]
        if not any(arg.startswith("--workdir") for arg in arguments):
            arguments.append(f"--workdir={workdir}")
        else:
            workdir = pathlib.Path(next(arg for arg in arguments if arg.startswith("--workdir")).split("=", 1)[1])
        done = subprocess.run(command + arguments, cwd=REPO, capture_output=True, text=True, timeout=600)
        return workdir, done.returncode, done.stderr

    with concurrent.futures.ThreadPoolExecutor(_PARALLEL) as pool:
        futures = {name: pool.submit(run, name) for name in CASES}
        outcomes = {name: future.result() for name, future in futures.items()}
    return outcomes, fill


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_exit_status_and_one_line_error(results, name):
    outcomes, fill = results
    workdir, returncode, stderr = outcomes[name]
    command, _, status, fragments, writes_nothing = CASES[name]
    program = pathlib.Path(command[1]).name
    assert returncode == status, (returncode, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    if name.endswith("debug_shows_the_traceback"):
        assert "Traceback (most recent call last)" in stderr
        assert lines[-1].startswith(f"{program}: error: ")
        lines = lines[-1:]
    else:
        assert "Traceback" not in stderr, stderr[-3000:]
        assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    for fragment in fragments:
        assert fill(fragment) in lines[0], (fill(fragment), lines[0])
    if writes_nothing and not name.endswith("unwritable"):
        assert not workdir.exists(), f"{workdir} was created"


@pytest.mark.slow
def test_full_disk_exits_2_before_training(tmp_path):
    """train.py on a disk reported (through a sitecustomize that patches shutil.disk_usage in the child) to have
    1 MiB free: exit 2 in one line before any role trains."""
    fake = tmp_path / "fake_full_disk"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import shutil\n"
        "_real = shutil.disk_usage\n"
        "def _full(path):\n"
        "    usage = _real(path)\n"
        "    return type(usage)(usage.total, usage.total - 2**20, 2**20)\n"
        "shutil.disk_usage = _full\n"
    )
    workdir = tmp_path / "run"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        TRAIN + [f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600, env=environment
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("train.py: error: workdir ") and "has 1.0 MiB free" in lines[0], lines[0]
    assert not any(workdir.iterdir())  # nothing trained or written


# ------------------------------------------------------------------------------------------- the optax transforms

_TRANSFORMS = {
    "normal_plane": (gsu_jax.project_normal_plane(), False),
    "normal_plane_on_conflict": (gsu_jax.project_normal_plane(only_on_conflict=True), False),
    "off_span": (gsu_jax.project_off_span(), True),
}


def _tree(leading: tuple[int, ...] = ()) -> dict:
    return {"w": jnp.ones(leading + (3, 2)), "b": jnp.ones(leading + (2,))}


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    transform=st.sampled_from(sorted(_TRANSFORMS)),
    damage=st.sampled_from(["drop_leaf", "extra_leaf", "shape", "dtype", "rename"]),
)
def test_transforms_refuse_mismatched_trees_at_trace_time(transform, damage):
    """A direction tree that does not match the updates is refused while TRACING (``jax.jit(...).trace``, which
    compiles and runs nothing), with ValueError/TypeError -- never a silent broadcast or a runtime crash."""
    optimizer, stacked = _TRANSFORMS[transform]
    updates = _tree()
    direction = _tree((2,) if stacked else ())
    if damage == "drop_leaf":
        del direction["b"]
    elif damage == "extra_leaf":
        direction["c"] = direction["b"]
    elif damage == "shape":
        direction["w"] = jnp.ones(((2,) if stacked else ()) + (2, 3))
    elif damage == "dtype":
        direction["b"] = direction["b"].astype(jnp.int32)
    else:
        direction = {"weights": direction["w"], "b": direction["b"]}

    def apply(updates, direction):
        return optimizer.update(updates, optimizer.init(updates), direction=direction)[0]

    with pytest.raises((ValueError, TypeError)):
        jax.jit(apply).trace(updates, direction)
    # The matching tree traces and runs (the refusal above is about the mismatch, not the transform).
    good = _tree((2,) if stacked else ())
    assert np.all(np.isfinite(jax.tree.leaves(jax.jit(apply)(updates, good))[0]))
