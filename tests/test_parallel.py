"""gsu_jax.parallel and the mesh/distributed config: refusals here (one device), sharded equivalence in a
subprocess with 8 fake CPU devices (tests/multidevice: a mesh over both axes and a data-only mesh over 4 of them)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from gsu_jax import parallel
from gsu_jax.config_validation import default_train_config, validate_train_config
from gsu_jax.schema import ConfigError, is_host_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Wall-clock bound of one multi-device pytest session (a hung collective must fail the test, not the CI job).
SUBPROCESS_TIMEOUT_S = 900


def test_multidevice_suite():
    num_devices = 8
    env = dict(
        os.environ,
        GSU_JAX_MULTIDEVICE=str(num_devices),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "multidevice")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"the {num_devices}-device tests did not finish in {SUBPROCESS_TIMEOUT_S} s:\n"
            f"{(err.stdout or b'')[-4000:]!r}"
        )
    assert result.returncode == 0, (
        f"the {num_devices}-device tests failed (exit {result.returncode}):\n"
        f"{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    )
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


# ------------------------------------------------------------------------------------------- the mesh


def test_make_mesh_shapes_and_refusals():
    mesh = parallel.make_mesh(data=-1)
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    assert mesh.axis_names == ("data", "model")
    count = jax.device_count()
    with pytest.raises(ValueError, match=rf"needs {count + 1} devices but only {count} are available"):
        parallel.make_mesh(data=count + 1)
    with pytest.raises(ValueError, match=r"mesh data=0 is invalid; allowed: an integer >= 1 or -1"):
        parallel.make_mesh(data=0)
    with pytest.raises(ValueError, match=r"mesh model=True is invalid"):
        parallel.make_mesh(model=True)
    with pytest.raises(ValueError, match=r"does not divide the 3 devices"):
        parallel.make_mesh(data=-1, model=2, devices=[jax.devices()[0]] * 3)


def test_one_device_means_no_mesh():
    """The default config (and data=-1 on one device) runs the plain single-device programs."""
    assert parallel.mesh_from_config({"data": 1, "model": 1}) is None
    if jax.device_count() == 1:
        assert parallel.mesh_from_config({"data": -1, "model": 1}) is None


def test_param_shardings_split_the_largest_divisible_axis():
    devices = [jax.devices()[0]] * 1
    mesh = parallel.make_mesh(data=1, model=1, devices=devices)
    tree = {"w": np.zeros((6, 8), np.float32), "b": np.zeros(8, np.float32)}
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(parallel.param_shardings(tree, mesh)))
    # The rule itself, for a model axis of 4: the largest axis it divides; too small or indivisible -> replicated.
    assert parallel._leaf_spec((6, 8), 4, 1) == jax.sharding.PartitionSpec(None, "model")
    assert parallel._leaf_spec((16, 8), 4, 1) == jax.sharding.PartitionSpec("model")
    assert parallel._leaf_spec((6, 7), 4, 1) == jax.sharding.PartitionSpec()
    assert parallel._leaf_spec((16, 8), 4, 1000) == jax.sharding.PartitionSpec()


def test_batch_refusals():
    mesh = parallel.make_mesh(data=1)
    with pytest.raises(ValueError, match=r"one common leading \(batch\) axis"):
        parallel.shard_batch({"a": np.zeros((4, 2)), "b": np.zeros((5,))}, mesh)
    with pytest.raises(
        ValueError,
        match=r"config.batch_size=10 is not divisible by the mesh's data axis \(4 "
        r"devices\); allowed: a multiple of 4, e.g. 8 or 12",
    ):
        parallel.check_batch_size(10, type("FakeMesh", (), {"shape": {"data": 4}})(), field="config.batch_size")


def test_put_and_localize_round_trip_keys_and_arrays():
    mesh = parallel.make_mesh(data=1)
    tree = {"x": np.arange(6, dtype=np.float32), "key": jax.random.key(3)}
    placed = parallel.put(tree, parallel.replicated(mesh))
    local = parallel.localize(placed)
    np.testing.assert_array_equal(np.asarray(local["x"]), tree["x"])
    np.testing.assert_array_equal(jax.random.key_data(local["key"]), jax.random.key_data(tree["key"]))


# ------------------------------------------------------------------------------------------- distributed


def test_initialize_distributed_refuses_partial_or_bad_arguments():
    with pytest.raises(ValueError, match=r"give all of coordinator_address, num_processes and process_id"):
        parallel.initialize_distributed(coordinator_address="127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"coordinator_address='nohostport' is invalid"):
        parallel.initialize_distributed(coordinator_address="nohostport", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"process_id=2 is invalid; allowed: an integer in \[0, 2\)"):
        parallel.initialize_distributed(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2)
    assert parallel.is_main_process()


# ------------------------------------------------------------------------------------------- config


def test_default_train_config_is_one_device():
    values = validate_train_config(default_train_config())
    assert values["mesh"] == {"data": 1, "model": 1}
    assert values["distributed"]["enabled"] is False


def test_configs_without_mesh_fields_validate_as_one_device():
    """Checkpoint records written before the mesh existed still load."""
    config = default_train_config().to_dict()
    del config["mesh"], config["distributed"]
    assert validate_train_config(config)["mesh"] == {"data": 1, "model": 1}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mesh": {"data": 0}}, r"config.mesh.data=0 is invalid: allowed: an integer >= 1 or -1"),
        ({"mesh": {"model": 0}}, r"config.mesh.model=0 is invalid"),
        ({"mesh": {"dat": 2}}, r"config.mesh.dat is not a known field; did you mean 'data'\?"),
        ({"mesh": {"data": "all"}}, r"config.mesh.data='all' is invalid: expected int"),
        (
            {"distributed": {"enabled": True, "num_processes": 2}},
            r"give all of coordinator_address, num_processes and process_id",
        ),
        (
            {"distributed": {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}},
            r"coordinator fields are set but enabled=False",
        ),
        (
            {"distributed": {"enabled": True, "coordinator_address": "h:1", "num_processes": 2, "process_id": 5}},
            r"process_id=5 with num_processes=2 is invalid",
        ),
        (
            {"distributed": {"enabled": True, "coordinator_address": "host", "num_processes": 2, "process_id": 0}},
            r"coordinator_address='host' is invalid: allowed: 'host:port'",
        ),
    ],
)
def test_mesh_and_distributed_refusals(overrides, message):
    config = default_train_config().to_dict()  # a plain mapping: ConfigDict's own type checks come first
    for field, values in overrides.items():
        config[field].update(values)
    with pytest.raises(ConfigError, match=message):
        validate_train_config(config)


def test_runs_refuse_a_mesh_larger_than_the_machine_before_any_work(tmp_path):
    from gsu_jax import training, unlearning
    from gsu_jax.config_validation import load_config_file

    count = jax.device_count()
    train = load_config_file(ROOT / "configs" / "smoke.py")
    train.mesh.data = count + 1
    with pytest.raises(ConfigError, match=rf"config.mesh=.*needs {count + 1} devices but only {count}"):
        training.train_and_evaluate(train, tmp_path / "train")
    config = load_config_file(ROOT / "configs" / "unlearn_smoke.py")
    config.mesh.data, config.mesh.model = -1, count + 1
    with pytest.raises(unlearning.UnlearnConfigError, match=r"config.mesh=.*does not divide"):
        unlearning.plan_run(config, tmp_path / "unlearn")
    assert not (tmp_path / "train").exists() and not (tmp_path / "unlearn").exists()


@pytest.mark.parametrize(
    "address, valid",
    [
        ("10.0.0.1:1234", True),
        ("node-01.cluster:65535", True),
        ("[::1]:8476", True),
        ("host", False),
        ("host:0", False),
        ("host:65536", False),
        (":1234", False),
        ("host:12ab", False),
    ],
)
def test_the_config_and_the_library_share_one_coordinator_address_rule(address, valid):
    """The train config's refusal and parallel.initialize_distributed's follow the same predicate."""
    assert is_host_port(address) is valid
    config = default_train_config().to_dict()
    config["distributed"].update({"enabled": True, "coordinator_address": address, "num_processes": 2})
    config["distributed"]["process_id"] = 0
    if valid:
        validate_train_config(config)
    else:
        with pytest.raises(ConfigError, match=re.escape(f"coordinator_address={address!r} is invalid")):
            validate_train_config(config)
        with pytest.raises(ValueError, match=re.escape(f"coordinator_address={address!r} is invalid")):
            parallel.initialize_distributed(coordinator_address=address, num_processes=2, process_id=0)
