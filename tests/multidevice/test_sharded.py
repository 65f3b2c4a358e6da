"""Sharded steps equal single-device steps; batches and per-example work are really split; sharded checkpoints
restore on other device counts. Runs in one process with 8 fake CPU devices (see conftest.py): the 8-device mesh
splits both axes, a data-only mesh over 4 of them checks pure data parallelism in the same process (a second
process for 4 devices cost as much again in start-up and compilation)."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gsu_jax import checkpointing, losses, methods, models, parallel, per_example, training

NUM_DEVICES = int(os.environ.get("GSU_JAX_MULTIDEVICE", "0"))
# All 8 devices: both axes (data 4 x model 2); the first 4: pure data parallelism.
MESH_SHAPES = {"data_and_model": (4, 2), "data_only": (4, 1)}
BATCH = 16
# Every leaf of at least this many elements is split over the model axis (the tiny model's weight matrices).
MIN_SIZE = 256


def _mesh(name: str):
    """The mesh ``MESH_SHAPES[name]`` over the first ``data * model`` of the 8 fake devices."""
    assert jax.device_count() == NUM_DEVICES == 8, "the parent test sets the fake CPU device count"
    data, model = MESH_SHAPES[name]
    return parallel.make_mesh(data=data, model=model, devices=jax.devices()[: data * model])


@pytest.fixture(scope="module", params=list(MESH_SHAPES))
def mesh(request):
    return _mesh(request.param)


@pytest.fixture(scope="module")
def both_axes_mesh():
    return _mesh("data_and_model")


@pytest.fixture(scope="module")
def vae():
    model = models.build_model("mlp_vae", rngs=nnx.Rngs(0), hidden=16, latent_dim=2)
    graphdef, params = nnx.split(model)
    return graphdef, params


def _batch(seed: int, size: int = BATCH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((size, 28, 28, 1), dtype=np.float32),
        "label": rng.integers(0, 10, size).astype(np.int32),
    }


def _method(name: str, graphdef) -> methods.UnlearningMethod:
    # SGD: the step's maths shows through unamplified (Adam's first update is ~sign(g), which turns float32
    # rounding of a near-zero gradient entry into a full learning-rate step).
    hparams = {"forget_loss_target": 1e4} if name == "sa_gated" else {}
    return methods.make_method(name, loss_fn=losses.negative_elbo(graphdef), optimizer=optax.sgd(1e-4), **hparams)


# Every method a VAE admits on both axes (salun needs a class-conditional DDPM, and a surgery variant of a published
# baseline only adds a projection the others shard already); data only, the ones whose steps differ most in
# structure: two full-batch gradients, per-example projection, a per-example Gram matrix, gating. Compilation
# dominates the cost.
METHODS_BOTH_AXES = [
    name
    for name, record in methods.METHODS.items()
    if not record.class_conditional and (not name.endswith("_surgery") or name == "remap_surgery")
]
METHODS_DATA_ONLY = ["s", "sa_per_example", "sa_span", "sa_gated"]


@pytest.mark.parametrize(
    "mesh_name, name",
    [("data_and_model", name) for name in METHODS_BOTH_AXES] + [("data_only", name) for name in METHODS_DATA_ONLY],
)
def test_sharded_unlearning_step_equals_single_device(mesh_name, name, vae):
    mesh = _mesh(mesh_name)
    data = mesh.shape["data"]
    graphdef, params = vae
    method = _method(name, graphdef)
    state = method.init(params)
    batches = [(_batch(2 * t), _batch(2 * t + 1)) for t in range(2)]
    keys = jax.random.split(jax.random.key(7), 2)

    single = jax.jit(method.step)
    p1, s1 = params, state
    for (forget, retain), key in zip(batches, keys):
        p1, s1, m1 = single(p1, s1, forget, retain, key)

    step, params_sharding, state_sharding = parallel.shard_method_step(
        method.step, mesh, params, state, min_size=MIN_SIZE
    )
    p2, s2 = parallel.put((params, state), (params_sharding, state_sharding))
    sharded_args = [(parallel.shard_batch(f, mesh), parallel.shard_batch(r, mesh)) for f, r in batches]
    compiled = step.lower(p2, s2, *sharded_args[0], keys[0]).compile()
    for (forget, retain), key in zip(sharded_args, keys):
        p2, s2, m2 = compiled(p2, s2, forget, retain, key)

    chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m2, m1, rtol=1e-5, atol=1e-5)
    # The state stays where it was put: split over the model axis where large enough, replicated otherwise.
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x.sharding.spec, p2), jax.tree.map(lambda s: s.spec, params_sharding)
    )
    # Each device holds BATCH / data examples of every per-example computation: the partitioned program's
    # image operands have the per-device batch size and never the whole batch.
    hlo = compiled.as_text()
    assert f"f32[{BATCH // data},28,28,1]" in hlo
    assert f"f32[{BATCH},28,28,1]" not in hlo


def test_batch_and_per_example_losses_are_split(mesh, vae):
    graphdef, params = vae
    data = mesh.shape["data"]
    batch = parallel.shard_batch(_batch(0), mesh)
    for leaf in jax.tree.leaves(batch):
        assert leaf.sharding.spec == P("data")
        assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {BATCH // data}
    keys = parallel.put(jax.random.split(jax.random.key(0), BATCH), parallel.batch_sharding(mesh))
    loss_fn = losses.negative_elbo(graphdef)
    per_example_losses = jax.jit(lambda p, b, k: per_example.per_example_losses(loss_fn, p, b, k))
    values = per_example_losses(parallel.put(params, parallel.replicated(mesh)), batch, keys)
    # Nothing forced the output's placement: the partitioner kept each example's loss on its example's device.
    assert values.sharding.spec == P("data")
    assert {shard.data.shape for shard in values.addressable_shards} == {(BATCH // data,)}
    reference = per_example.per_example_losses(loss_fn, params, _batch(0), jax.random.split(jax.random.key(0), BATCH))
    np.testing.assert_allclose(np.asarray(values), np.asarray(reference), rtol=1e-5)


@pytest.mark.parametrize("model_name, augment_shift, scan", [("mlp_vae", 0, True), ("mlp_classifier", 2, False)])
def test_sharded_training_epoch_equals_single_device(model_name, augment_shift, scan, mesh):
    kwargs = {"hidden": 16, **({"latent_dim": 2} if model_name == "mlp_vae" else {})}
    graphdef, params = nnx.split(models.build_model(model_name, rngs=nnx.Rngs(1), **kwargs))
    loss_fn = losses.negative_elbo(graphdef) if model_name == "mlp_vae" else losses.cross_entropy(graphdef)
    optimizer = optax.adam(1e-3) if model_name == "mlp_vae" else optax.sgd(1e-2)
    rng = np.random.default_rng(3)
    images, labels = rng.random((80, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 80).astype(np.int32)
    key = jax.random.key(5)

    single = training.make_train_epoch(
        loss_fn, optimizer, num_batches=4, batch_size=BATCH, augment_shift=augment_shift, scan=scan
    )
    start = jax.tree.map(jnp.copy, params)
    p1, _, losses1, finite1 = single(start, optimizer.init(start), jnp.asarray(images), jnp.asarray(labels), key)

    shardings = (
        parallel.param_shardings(params, mesh, min_size=MIN_SIZE),
        parallel.param_shardings(jax.eval_shape(optimizer.init, params), mesh, min_size=MIN_SIZE),
    )
    sharded = training.make_train_epoch(
        loss_fn,
        optimizer,
        num_batches=4,
        batch_size=BATCH,
        augment_shift=augment_shift,
        scan=scan,
        mesh=mesh,
        state_shardings=shardings,
    )
    p2, s2 = parallel.put((params, optimizer.init(params)), shardings)
    rep = parallel.replicated(mesh)
    p2, _, losses2, finite2 = sharded(p2, s2, *parallel.put((images, labels, key), rep))

    chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses2), np.asarray(losses1), rtol=1e-5)
    assert np.asarray(finite1).all() and np.asarray(finite2).all()
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x.sharding.spec, p2), jax.tree.map(lambda s: s.spec, shardings[0])
    )


def test_training_refuses_a_batch_the_data_axis_cannot_split(both_axes_mesh, vae):
    graphdef, _ = vae
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by the mesh's data axis \(4 devices\)"):
        training.make_train_epoch(
            losses.negative_elbo(graphdef), optax.sgd(1e-3), num_batches=1, batch_size=10, mesh=both_axes_mesh
        )


def test_sharded_checkpoint_restores_on_other_device_counts(tmp_path, vae):
    _, params = vae
    optimizer = optax.adam(1e-3)
    state = optimizer.init(params)
    saving_mesh = parallel.make_mesh(data=NUM_DEVICES // 2, model=2)
    shardings = (
        parallel.param_shardings(params, saving_mesh, min_size=MIN_SIZE),
        parallel.param_shardings(state, saving_mesh, min_size=MIN_SIZE),
    )
    saved_params, saved_state = parallel.put((params, state), shardings)
    assert any(leaf.sharding.spec != P() for leaf in jax.tree.leaves(saved_params)), "nothing was model-sharded"
    with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, saved_params, saved_state, metadata={"role": "test"})

    abstract = (
        checkpointing.abstract_like(params),
        checkpointing.abstract_like(jax.eval_shape(optimizer.init, params)),
    )
    # Half the devices (saved on data 4 x model 2, restored on a data-only mesh over 4 of the 8), and a single device.
    half = jax.devices()[: NUM_DEVICES // 2]
    targets = {"half": parallel.make_mesh(data=len(half), model=1, devices=half), "one": None}
    for label, target in targets.items():
        abstract_params, abstract_state = abstract
        if target is not None:
            abstract_params, abstract_state = jax.tree.map(
                lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                abstract,
                (parallel.param_shardings(params, target), parallel.param_shardings(state, target)),
            )
        with checkpointing.Checkpointer(tmp_path / "ckpt", create=False) as ckpt:
            restored, restored_state, metadata = ckpt.restore(
                abstract_params=abstract_params, abstract_opt_state=abstract_state
            )
        devices = {d for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set}
        assert len(devices) == (len(half) if target is not None else 1), label
        assert metadata["params_digest"] == checkpointing.state_digest(params)
        chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(params))
        chex.assert_trees_all_equal(jax.device_get(restored_state), jax.device_get(state))
