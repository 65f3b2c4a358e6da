"""Tests for the published baselines ``salun`` and ``selective_amnesia`` (and their surgery variants): two steps of
each against a NumPy float64 reference of its rule (the fixed state from the FIRST step's parameters), the DDPM's
random-label loss, the refusals, and the state's round trip through an in-flight checkpoint.

The model is a tiny class-conditional regressor ``(x, c) -> tanh(x W) V + E[c]`` whose per-example loss reads the
``"target"`` and ``"pseudo_label"`` fields as the DDPM's loss does (the target replaces the input image; a pseudo
label replaces the regression target by the model's own stopped output under that label), plus one draw from its
key, so the per-example keys matter.
"""

from __future__ import annotations

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gsu_jax import diffusion, methods, published_rules
from gsu_jax.config_validation import load_config_file
from gsu_jax.losses import negative_elbo
from gsu_jax.methods import make_method, split_step_keys
from gsu_jax.models import MLPVAE, UNet
from gsu_jax.unlearning import inflight, plan_run

REPO = pathlib.Path(__file__).resolve().parents[1]

DIM, HIDDEN, CLASSES = 4, 3, 5
FORGET_SIZE, RETAIN_SIZE = 5, 7
LEARNING_RATE = 0.05


def conditional_loss(params, example, key):
    image = example.get("target", example["image"])
    noisy = image + 0.1 * jax.random.normal(key, image.shape)

    def output(label):
        return jnp.tanh(noisy @ params["w"]) @ params["v"] + params["embed"][label]

    goal = image
    if "pseudo_label" in example:
        goal = jax.lax.stop_gradient(output(example["pseudo_label"]))
    return jnp.mean(jnp.square(output(example["label"]) - goal))


@pytest.fixture(scope="module")
def problem():
    keys = jax.random.split(jax.random.key(3), 6)
    params = {
        "w": 0.8 * jax.random.normal(keys[0], (DIM, HIDDEN)),
        "v": 0.8 * jax.random.normal(keys[1], (HIDDEN, DIM)),
        "embed": 0.5 * jax.random.normal(keys[2], (CLASSES, DIM)),
    }
    forget = {"image": jax.random.uniform(keys[3], (FORGET_SIZE, DIM)), "label": jnp.full(FORGET_SIZE, 1)}
    retain = {
        "image": jax.random.uniform(keys[4], (RETAIN_SIZE, DIM)),
        "label": jnp.array([0, 2, 3, 4, 0, 2, 3]),
    }
    return params, forget, retain


# ------------------------------------------------------------------------------------------ NumPy reference


_EXAMPLE_GRAD = jax.jit(jax.grad(conditional_loss))


def _grad(params, example, key):
    """One example's gradient as float64 NumPy leaves (the single-example loss's gradient, no vmap)."""
    return jax.tree.map(lambda g: np.asarray(g, np.float64), _EXAMPLE_GRAD(params, example, key))


def _mean_grad(params, batch, keys, **fields):
    size = len(keys)
    grads = []
    for i in range(size):
        example = {name: value[i] for name, value in batch.items()}
        example.update({name: value[i] for name, value in fields.items()})
        grads.append(_grad(params, example, keys[i]))
    return jax.tree.map(lambda *leaves: sum(leaves) / size, *grads), grads


def _flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _unflat(vector, like):
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(vector[start : start + leaf.size].reshape(leaf.shape))
        start += leaf.size
    return jax.tree.unflatten(treedef, out)


def _project_on_conflict(a, v):
    dot = a @ v
    return a - (dot / (v @ v)) * v if dot < 0 else a


def _clip(u, max_norm):
    return u * min(1.0, max_norm / np.linalg.norm(u))


def reference_steps(name, params0, forget, retain, step_keys, **hparams):
    """The parameters after ``len(step_keys)`` SGD steps of ``name``, in float64 NumPy."""
    resolved = methods.resolve_hparams(name, **hparams)
    project = name.endswith("_surgery")
    theta0 = _flat(params0)
    theta = theta0.copy()
    state = None
    for key in step_keys:
        forget_keys, retain_keys, _ = split_step_keys(key, forget, retain)
        params = jax.tree.map(jnp.asarray, _unflat(theta.astype(np.float32), params0))
        retain_grad, retain_grads = _mean_grad(params, retain, retain_keys)
        g_r = _flat(retain_grad)
        if name.startswith("salun"):
            if state is None:  # the mask: top half of |grad L_f| at theta*, one global threshold
                g_f = _flat(_mean_grad(params, forget, forget_keys)[0])
                k = int(np.ceil(resolved["mask_fraction"] * g_f.size))
                state = (np.abs(g_f) >= np.sort(np.abs(g_f))[::-1][k - 1]).astype(np.float64)
            pseudo = np.asarray(retain["label"])[np.arange(FORGET_SIZE) % RETAIN_SIZE]
            forget_part = _flat(_mean_grad(params, forget, forget_keys, pseudo_label=jnp.asarray(pseudo))[0])
            if project:
                forget_part = _project_on_conflict(forget_part, g_r)
            alpha = resolved["retain_weight"] if resolved["retain_weight"] is not None else 1e-3 * DIM
            u = state * _clip(forget_part + alpha * g_r, resolved["grad_clip"])
        else:
            if state is None:  # the anchor and the retain batch's diagonal Fisher at theta*
                state = (theta.copy(), np.mean([_flat(g) ** 2 for g in retain_grads], axis=0))
            noise = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(k, 0x5A), (DIM,))) for k in forget_keys])
            forget_part = _flat(_mean_grad(params, forget, forget_keys, target=jnp.asarray(noise, jnp.float32))[0])
            if project:
                forget_part = _project_on_conflict(forget_part, g_r)
            anchor, fisher = state
            u = forget_part + resolved["replay_weight"] * g_r + 2 * resolved["ewc_weight"] * fisher * (theta - anchor)
            u = _clip(u, resolved["grad_clip"])
        theta = theta - LEARNING_RATE * u
    return _unflat(theta, params0)


NAMES = ("salun", "salun_surgery", "selective_amnesia", "selective_amnesia_surgery")
# Settings where every part of the rule is active on the toy: the clip binds (0.5 < ||u||) and the EWC anchor pulls.
HPARAMS = {
    "salun": {"grad_clip": 0.5},
    "salun_surgery": {"grad_clip": 0.5, "retain_weight": 2.0},
    "selective_amnesia": {"grad_clip": 0.5, "ewc_weight": 50.0},
    "selective_amnesia_surgery": {"ewc_weight": 50.0, "replay_weight": 0.5},
}


@pytest.mark.parametrize("flat_parameters", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_two_steps_equal_the_numpy_reference_with_the_state_fixed_at_the_first(problem, name, flat_parameters):
    params, forget, retain = problem
    method = make_method(
        name,
        loss_fn=conditional_loss,
        optimizer=optax.sgd(LEARNING_RATE),
        flat_parameters=flat_parameters,
        **HPARAMS[name],
    )
    step = jax.jit(method.step)
    keys = jax.random.split(jax.random.key(11), 2)
    state = method.init(params)
    updated = params
    for key in keys:
        updated, state, metrics = step(updated, state, forget, retain, key)
    expected = reference_steps(name, params, forget, retain, keys, **HPARAMS[name])
    chex.assert_trees_all_close(jax.tree.map(np.asarray, updated), expected, rtol=2e-4, atol=2e-6)
    assert int(state.step) == 2 and set(metrics) >= {"forget_loss", "retain_loss", "projected", "update_norm"}
    # The state after two steps is the one computed at the first (theta*), not at the second step's parameters.
    if name.startswith("selective_amnesia"):
        anchor = state.rule["anchor"] if not flat_parameters else _unflat(np.asarray(state.rule["anchor"]), params)
        chex.assert_trees_all_close(jax.tree.map(np.asarray, anchor), jax.tree.map(np.asarray, params))


def test_the_state_template_follows_the_step_layout(problem):
    params, _, _ = problem
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    flat = make_method("selective_amnesia", loss_fn=conditional_loss, optimizer=optax.sgd(0.1)).init(params)
    assert flat.rule["fisher"].shape == (size,) and not np.any(flat.rule["anchor"])
    tree = make_method("salun", loss_fn=conditional_loss, optimizer=optax.sgd(0.1), flat_parameters=False)
    chex.assert_trees_all_equal_shapes(tree.init(params).rule, params)
    assert make_method("sa", loss_fn=conditional_loss, optimizer=optax.sgd(0.1)).init(params).rule == ()


def test_salun_mask_keeps_the_top_fraction_and_the_default_alpha_counts_pixels(problem):
    params, forget, retain = problem
    mask = published_rules.SALUN_STATE.compute(
        methods.StepInputs(
            loss_fn=conditional_loss,
            params=params,
            step=jnp.int32(0),
            forget_batch=forget,
            retain_batch=retain,
            forget_keys=jax.random.split(jax.random.key(0), FORGET_SIZE),
            retain_keys=jax.random.split(jax.random.key(1), RETAIN_SIZE),
            forget_losses=jnp.zeros(FORGET_SIZE),
            forget_grad=None,
            retain_grad=None,
        ),
        {"mask_fraction": 0.25},
    )
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert int(sum(np.sum(leaf) for leaf in jax.tree.leaves(mask))) == int(np.ceil(0.25 * size))
    images = {"image": jnp.zeros((3, 28, 28, 1))}
    default = {"retain_weight": None, "image_field": "image"}
    assert published_rules.salun_retain_weight(default, images) == pytest.approx(0.784)
    assert published_rules.salun_retain_weight({**default, "retain_weight": 2.0}, images) == 2.0


def test_noise_surrogates_are_uniform_per_example_and_drawn_from_their_own_stream():
    keys = jax.random.split(jax.random.key(5), 64)
    noise = np.asarray(published_rules.noise_surrogates({"image": jnp.zeros((64, 28, 28, 1))}, keys))
    assert noise.shape == (64, 28, 28, 1) and noise.min() >= 0 and noise.max() < 1
    assert abs(noise.mean() - 0.5) < 0.01 and not np.allclose(noise[0], noise[1])
    expected = jax.random.uniform(jax.random.fold_in(keys[3], 0x5A), (28, 28, 1))
    np.testing.assert_array_equal(noise[3], np.asarray(expected))
    # Not the draws of the DDPM loss's own three subkeys of the same example key.
    for subkey in jax.random.split(keys[3], 3):
        assert not np.allclose(noise[3], np.asarray(jax.random.uniform(subkey, (28, 28, 1))))


def test_pseudo_label_loss_of_the_ddpm_is_zero_for_its_own_label_and_refused_unconditionally():
    schedule = diffusion.make_schedule("cosine", 20)
    example = {"image": jnp.full((28, 28, 1), 0.3), "label": jnp.int32(2)}
    graphdef, params = nnx.split(UNet(channels=8, num_groups=4, time_embed_dim=16, num_classes=10, rngs=nnx.Rngs(0)))
    loss_fn = diffusion.epsilon_loss(graphdef, schedule=schedule)
    key = jax.random.key(0)
    # Pulled to its own stopped prediction: zero loss and zero gradient (to the rounding of two fused evaluations of
    # the same prediction); another label: a positive loss.
    value, grad = jax.jit(jax.value_and_grad(loss_fn))(params, {**example, "pseudo_label": jnp.int32(2)}, key)
    assert float(value) < 1e-12 and max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grad)) < 1e-6
    assert float(jax.jit(loss_fn)(params, {**example, "pseudo_label": jnp.int32(7)}, key)) > 1e-6
    graphdef, params = nnx.split(UNet(channels=8, num_groups=4, time_embed_dim=16, num_classes=0, rngs=nnx.Rngs(0)))
    unconditional = diffusion.epsilon_loss(graphdef, schedule=schedule)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        jax.eval_shape(unconditional, params, {**example, "pseudo_label": jnp.int32(7)}, key)
    # A VAE has no label to replace: its loss refuses the field instead of ignoring it.
    graphdef, params = nnx.split(MLPVAE(latent_dim=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="negative_elbo: an example with a 'pseudo_label'"):
        jax.eval_shape(negative_elbo(graphdef), params, {**example, "pseudo_label": jnp.int32(7)}, key)


def test_batches_without_the_fields_a_rule_reads_are_refused_in_one_line(problem):
    _, forget, retain = problem
    with pytest.raises(ValueError, match=r"^salun reads the examples' 'label' field, which the batch lacks; allowed"):
        published_rules.pseudo_labels({"image": forget["image"]}, retain)
    with pytest.raises(ValueError, match=r"^selective_amnesia reads the examples' 'image' field"):
        published_rules.noise_surrogates(forget["image"], jax.random.split(jax.random.key(0), FORGET_SIZE))


def test_rule_state_survives_an_inflight_checkpoint(problem, tmp_path):
    params, forget, retain = problem
    method = make_method("selective_amnesia", loss_fn=conditional_loss, optimizer=optax.adam(1e-3))
    params1, state1, _ = jax.jit(method.step)(params, method.init(params), forget, retain, jax.random.key(0))
    host = {"next_step": 1, "stop": None}
    identity = {"method": "selective_amnesia"}
    inflight.save(tmp_path, inflight.InflightState(params1, state1, None, host), identity)
    restored = inflight.restore(tmp_path, params, method.init(params), identity)
    chex.assert_trees_all_equal(restored.opt_state.rule, state1.rule)
    chex.assert_trees_all_equal(restored.params, params1)
    assert int(restored.opt_state.step) == 1


def test_methods_all_leaves_the_label_methods_out_for_a_vae(tmp_path):
    config = load_config_file(REPO / "configs" / "unlearn_smoke.py")
    config.methods = "all"
    names = plan_run(config, tmp_path / "run").method_names
    assert "salun" not in names and "salun_surgery" not in names and "selective_amnesia" in names
    assert names == tuple(name for name, method in methods.METHODS.items() if not method.class_conditional)
