"""Tests of gsu_jax.checkpointing: round trips, refusals and corruption detection (no training here)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gsu_jax import checkpointing
from gsu_jax.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointNotFoundError,
    WorkdirError,
    abstract_like,
)
from gsu_jax.models import build_model

# A restore that fails on a damaged file leaves orbax's pending read coroutines to be garbage-collected later, which
# Python reports as "exception ignored" in whichever test runs then; the failure itself is asserted where it happens.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _model_state(seed: int = 0):
    model = build_model("mlp_classifier", hidden=8, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    return graphdef, params


@pytest.fixture(scope="module")
def trained_like():
    """Parameters and an Adam state after one real update (non-zero moments and count)."""
    graphdef, params = _model_state()
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return graphdef, params, optimizer, opt_state


def _abstract(params, optimizer):
    abstract_params = abstract_like(params)
    return abstract_params, abstract_like(jax.eval_shape(optimizer.init, abstract_params))


def _largest_data_file(step_dir: pathlib.Path, item: str = "params") -> pathlib.Path:
    files = [path for path in (step_dir / item).rglob("*") if path.is_file() and path.parent.name == "d"]
    return max(files, key=lambda path: path.stat().st_size)


def test_round_trip_restores_params_opt_state_and_metadata(tmp_path, trained_like):
    _, params, optimizer, opt_state = trained_like
    metadata = {"role": "evaluator", "model_kwargs": {"image_shape": (28, 28, 1)}, "history": [{"loss": 0.5}]}
    with Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(7, params, opt_state, metadata=metadata)
        abstract_params, abstract_opt = _abstract(params, optimizer)
        restored_params, restored_opt, restored_meta = ckpt.restore(
            abstract_params=abstract_params, abstract_opt_state=abstract_opt
        )
    assert jax.tree.structure(restored_params) == jax.tree.structure(params)
    assert jax.tree.structure(restored_opt) == jax.tree.structure(opt_state)
    chex.assert_trees_all_equal(restored_params, params)
    chex.assert_trees_all_equal(restored_opt, opt_state)
    assert restored_meta["step"] == 7
    assert restored_meta["role"] == "evaluator"
    assert restored_meta["model_kwargs"] == {"image_shape": [28, 28, 1]}  # JSON form of the tuple
    assert restored_meta["history"] == [{"loss": 0.5}]
    assert restored_meta["versions"]["jax"] == jax.__version__


def test_params_only_restore_and_a_save_without_optimizer(tmp_path, trained_like):
    _, params, optimizer, opt_state = trained_like
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, params, opt_state, metadata={})
        ckpt.save(2, params, metadata={})  # e.g. an unlearned model: parameters only
        for step in (1, 2):
            restored, no_opt, meta = ckpt.restore(step, abstract_params=abstract_like(params))
            chex.assert_trees_all_equal(restored, params)
            assert no_opt is None and meta["has_opt_state"] == (step == 1)
        with pytest.raises(checkpointing.CheckpointMismatchError, match="no optimizer state"):
            ckpt.restore(2, abstract_params=abstract_like(params), abstract_opt_state=_abstract(params, optimizer)[1])


def test_latest_step_and_max_to_keep(tmp_path, trained_like):
    _, params, _, _ = trained_like
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (10, 20, 30):
            ckpt.save(step, params, metadata={"at": step})
        assert ckpt.all_steps() == [20, 30]
        assert ckpt.latest_step() == 30
        assert ckpt.read_metadata()["at"] == 30
        assert ckpt.read_metadata(20)["at"] == 20


def test_not_found(tmp_path, trained_like):
    _, params, _, _ = trained_like
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "absent", create=False)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
            ckpt.read_metadata()
        ckpt.save(3, params, metadata={})
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint step 4 .* steps present: 3"):
            ckpt.restore(4, abstract_params=abstract_like(params))


def test_flipped_bit_in_saved_arrays_is_detected_not_loaded(tmp_path, trained_like):
    _, params, optimizer, opt_state = trained_like
    with Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(1, params, opt_state, metadata={})
        ckpt.save(2, params, opt_state, metadata={})
        data_file = _largest_data_file(ckpt.step_path(2))
        raw = bytearray(data_file.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data_file.write_bytes(bytes(raw))
        abstract_params, abstract_opt = _abstract(params, optimizer)
        with pytest.raises(CheckpointCorruptError) as excinfo:
            ckpt.restore(abstract_params=abstract_params, abstract_opt_state=abstract_opt)
        message = str(excinfo.value)
        assert "step 2" in message and str(ckpt.step_path(2)) in message
        assert "earlier steps 1 remain" in message  # the previous good checkpoint is offered
        # The earlier step is intact and still loads.
        restored, _, _ = ckpt.restore(1, abstract_params=abstract_params, abstract_opt_state=abstract_opt)
        chex.assert_trees_all_equal(restored, params)


def test_truncated_array_file_is_detected(tmp_path, trained_like):
    _, params, optimizer, opt_state = trained_like
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, params, opt_state, metadata={})
        data_file = _largest_data_file(ckpt.step_path(5))
        data_file.write_bytes(data_file.read_bytes()[:64])
        abstract_params, abstract_opt = _abstract(params, optimizer)
        with pytest.raises(CheckpointCorruptError, match=r"step 5 .* is corrupt.*no earlier step remains"):
            ckpt.restore(abstract_params=abstract_params, abstract_opt_state=abstract_opt)


def test_garbled_metadata_is_detected(tmp_path, trained_like):
    _, params, _, _ = trained_like
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, params, metadata={"role": "guidance"})
        metadata_file = ckpt.step_path(4) / "metadata" / "metadata"
        assert metadata_file.is_file()
        metadata_file.write_text("{not json")
        with pytest.raises(CheckpointCorruptError, match=rf"step 4 .*file '{metadata_file}' is truncated"):
            ckpt.read_metadata()
        # Without the files manifest (a step saved before it existed), orbax's own read fails and is reported.
        (ckpt.step_path(4) / checkpointing.FILES_MANIFEST).unlink()
        with pytest.raises(CheckpointCorruptError, match=r"step 4 .*unreadable metadata"):
            ckpt.read_metadata()


def _every_file(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path for path in step_dir.rglob("*") if path.is_file())


def test_every_file_of_a_step_is_in_its_manifest_and_verifies(tmp_path, trained_like):
    _, params, _, opt_state = trained_like
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, params, opt_state, metadata={})
        step_dir = ckpt.step_path(3)
        assert ckpt.verify_files(3) is True
        manifest = json.loads((step_dir / checkpointing.FILES_MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(step_dir).as_posix() for p in _every_file(step_dir)}
        assert set(manifest) == on_disk - {checkpointing.FILES_MANIFEST}
        for name, entry in manifest.items():
            assert entry["size"] == (step_dir / name).stat().st_size


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "index"])
def test_any_damaged_file_is_refused_by_name_before_orbax_reads_it(tmp_path, trained_like, damage):
    """Each file of the step, damaged in turn: refused naming step and file; the earlier step is offered."""
    _, params, optimizer, opt_state = trained_like
    abstract_params, abstract_opt = _abstract(params, optimizer)
    with Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(1, params, opt_state, metadata={})
        ckpt.save(2, params, opt_state, metadata={})
        step_dir = ckpt.step_path(2)
        pristine = {path: path.read_bytes() for path in _every_file(step_dir)}
        targets = (
            [step_dir / "params" / "manifest.ocdbt", step_dir / "opt_state" / "manifest.ocdbt"]
            if damage == "index"
            else [p for p in pristine if p.name != checkpointing.FILES_MANIFEST]
        )
        for target in targets:
            raw = pristine[target]
            if damage in ("flip", "index"):
                target.write_bytes(bytes(b ^ 0xFF for b in raw))
            elif damage == "truncate":
                target.write_bytes(raw[: len(raw) // 2])
            else:
                target.unlink()
            with pytest.raises(CheckpointCorruptError) as excinfo:
                ckpt.restore(abstract_params=abstract_params, abstract_opt_state=abstract_opt)
            message = str(excinfo.value)
            assert f"step 2 at '{step_dir}'" in message and f"file '{target}'" in message, message
            assert "earlier steps 1 remain" in message and "restore_fallback" in message
            assert excinfo.value.step == 2 and str(target) in excinfo.value.reason
            target.write_bytes(raw)
        restored, _, _ = ckpt.restore(abstract_params=abstract_params, abstract_opt_state=abstract_opt)
        chex.assert_trees_all_equal(restored, params)


def test_damaged_files_manifest_is_refused(tmp_path, trained_like):
    _, params, _, _ = trained_like
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(6, params, metadata={})
        manifest = ckpt.step_path(6) / checkpointing.FILES_MANIFEST
        record = json.loads(manifest.read_text())
        first = sorted(record["files"])[0]
        record["files"][first]["size"] += 1  # an edited record: caught by the manifest's own digest
        manifest.write_text(json.dumps(record))
        with pytest.raises(
            CheckpointCorruptError,
            match=rf"step 6 .*file '{manifest}' .*does not match its own "
            "digest",
        ):
            ckpt.read_metadata()
        manifest.write_text('{"files": 3}')
        with pytest.raises(
            CheckpointCorruptError,
            match=rf"step 6 .*file '{manifest}' \(the list of the step's "
            r"files\) is unreadable",
        ):
            ckpt.read_metadata()


def test_restore_newest_good_skips_bad_steps_and_says_why(tmp_path, trained_like):
    _, params, optimizer, opt_state = trained_like
    abstract_params, abstract_opt = _abstract(params, optimizer)
    later = jax.tree.map(lambda leaf: leaf + 1, params)
    with Checkpointer(tmp_path / "ckpt", max_to_keep=5) as ckpt:
        ckpt.save(1, params, opt_state, metadata={"at": 1})
        ckpt.save(2, later, opt_state, metadata={"at": 2})
        ckpt.save(3, later, opt_state, metadata={"at": 3})
        # Step 3: a damaged array file (caught by the manifest). Step 2: no manifest, damaged bytes in its
        # parameter data (caught by orbax or the array digests).
        _largest_data_file(ckpt.step_path(3)).write_bytes(b"")
        (ckpt.step_path(2) / checkpointing.FILES_MANIFEST).unlink()
        for data_file in (ckpt.step_path(2) / "params").rglob("*"):
            if data_file.is_file() and data_file.parent.name == "d":
                data_file.write_bytes(bytes(b ^ 0xFF for b in data_file.read_bytes()))
        restored, restored_opt, metadata, skipped = ckpt.restore_newest_good(
            abstract_params=abstract_params, abstract_opt_state=abstract_opt
        )
        assert metadata["at"] == 1 and [item.step for item in skipped] == [3, 2]
        assert "is truncated" in skipped[0].reason and skipped[1].reason
        chex.assert_trees_all_equal(restored, params)
        chex.assert_trees_all_equal(restored_opt, opt_state)
        assert ckpt.all_steps() == [1, 2, 3]  # nothing moved or deleted by restoring
        _, _, metadata, skipped = ckpt.restore_newest_good(abstract_params=abstract_params, at_most=1)
        assert metadata["at"] == 1 and skipped == []
        moved = ckpt.set_aside(3, tmp_path / "bad")
        assert ckpt.all_steps() == [1, 2] and moved.parent == tmp_path / "bad" and moved.name.startswith("3-")
        _largest_data_file(ckpt.step_path(1)).write_bytes(b"x")
        with pytest.raises(CheckpointCorruptError, match=r"no checkpoint in .* verifies: step 2: .*; step 1: .*"):
            ckpt.restore_newest_good(abstract_params=abstract_params)
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(CheckpointNotFoundError):
        ckpt.restore_newest_good(abstract_params=abstract_params)


def test_half_written_step_is_never_listed_and_does_not_block_saving(tmp_path, trained_like):
    _, params, _, _ = trained_like
    directory = tmp_path / "ckpt"
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, params, metadata={})
    # What a run killed during a save leaves behind: orbax's temporary directory, never renamed.
    leftover = directory / "2.orbax-checkpoint-tmp"
    (leftover / "params").mkdir(parents=True)
    (leftover / "params" / "partial").write_bytes(b"\0" * 10)
    with Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [1]
        # The leftover does not block saving that step again (orbax removes leftovers in the background).
        ckpt.save(2, params, metadata={})
        assert ckpt.all_steps() == [1, 2]
        restored, _, _ = ckpt.restore(2, abstract_params=abstract_like(params))
    chex.assert_trees_all_equal(restored, params)


def test_unwritable_and_non_directory_workdirs_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(WorkdirError, match="exists and is not a directory"):
        checkpointing.ensure_writable_directory(a_file)
    with pytest.raises(WorkdirError, match="cannot be created"):
        checkpointing.ensure_writable_directory(a_file / "below")
    assert checkpointing.ensure_writable_directory(tmp_path / "new" / "dir").is_dir()
    read_only = unwritable_directory(tmp_path)
    try:
        with pytest.raises(WorkdirError, match="not writable"):
            checkpointing.ensure_writable_directory(read_only)
        with pytest.raises(WorkdirError, match="cannot be created"):
            checkpointing.ensure_writable_directory(read_only / "below")
    finally:
        if read_only.is_relative_to(tmp_path):
            read_only.chmod(0o700)


def unwritable_directory(tmp_path: pathlib.Path) -> pathlib.Path:
    """An existing directory this process cannot write: a mode-0500 one, or (as root, who ignores modes) the
    read-only sysfs; skips when neither is available."""
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o500)
        return read_only
    sysfs = pathlib.Path("/sys/kernel")
    probe = sysfs / ".gsu-probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return sysfs
    probe.unlink()
    pytest.skip("running as root without a read-only directory: the permission refusal cannot be provoked")


def test_state_digest_sees_every_bit(trained_like):
    _, params, _, opt_state = trained_like
    tree = {"params": params, "opt_state": opt_state}
    assert checkpointing.state_digest(tree) == checkpointing.state_digest(jax.tree.map(np.array, tree))
    leaves, treedef = jax.tree.flatten(tree)
    for index in (0, len(leaves) - 1):
        flipped = np.array(leaves[index]).copy()
        flipped.reshape(-1).view(np.uint8)[0] ^= 1
        changed = jax.tree.unflatten(treedef, leaves[:index] + [flipped] + leaves[index + 1 :])
        assert checkpointing.state_digest(changed) != checkpointing.state_digest(tree)


@pytest.fixture(scope="module")
def pristine_step(tmp_path_factory, trained_like):
    """One saved step (params + Adam state) to damage copies of."""
    _, params, optimizer, opt_state = trained_like
    directory = tmp_path_factory.mktemp("pristine") / "ckpt"
    with Checkpointer(directory) as ckpt:
        ckpt.save(9, params, opt_state, metadata={"role": "demo"})
        files = [p.relative_to(directory).as_posix() for p in _every_file(ckpt.step_path(9))]
    return directory, files, _abstract(params, optimizer), params


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(data=st.data())
def test_random_damage_to_any_file_is_refused_by_name_never_loaded(tmp_path_factory, pristine_step, data):
    """Any file of a step, any offset: a flipped byte, a truncation or appended bytes is refused naming that
    file (the manifest itself included); a restore never returns parameters other than those saved. (The one
    harmless edit: whitespace of the manifest's JSON; then the step still restores bit for bit.)"""
    source, files, (abstract_params, abstract_opt), params = pristine_step
    directory = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree(source, directory)
    name = data.draw(st.sampled_from(files), label="file")
    target = directory / name
    raw = bytearray(target.read_bytes())
    damage = data.draw(st.sampled_from(["flip", "truncate", "append"] if raw else ["append"]), label="damage")
    if damage == "flip":
        offset = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[offset] ^= data.draw(st.integers(1, 255), label="xor")
    elif damage == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1), label="keep") :]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16), label="extra")
    target.write_bytes(bytes(raw))
    with Checkpointer(directory, create=False) as ckpt:
        try:
            restored, _, _ = ckpt.restore(abstract_params=abstract_params, abstract_opt_state=abstract_opt)
        except CheckpointCorruptError as err:
            assert err.step == 9 and f"'{target}'" in str(err), str(err)
            return
    assert name == checkpointing.FILES_MANIFEST, f"damaged {name} was loaded"
    chex.assert_trees_all_equal(restored, params)
