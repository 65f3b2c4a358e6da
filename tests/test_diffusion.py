"""Diffusion: schedules against their closed forms, the per-example epsilon loss against a NumPy reference, the
scan samplers against an oracle and a Python-loop reference, classifier-free guidance, and the per-example
(jvp/vjp) unlearning route on the U-Net against the materialised per-example gradients."""

from __future__ import annotations

import doctest

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gsu_jax import diffusion, methods
from gsu_jax.diffusion import epsilon_loss, generate, make_schedule, predict_epsilon, sample, sampling_timesteps
from gsu_jax.losses import batch_mean
from gsu_jax.models import UNet
from gsu_jax.per_example import per_example_grads

TINY = {"channels": 8, "channel_mults": (1, 2), "num_groups": 4, "time_embed_dim": 16}
NUM_CLASSES = 10
T = 20  # training steps of the schedule the U-Net tests use
PROBE_SHAPE = (4, 4, 1)


class Constant(nnx.Variable):
    """A fixed array held by a fake model (not a trainable parameter)."""


class Probe(nnx.Module):
    """``eps_hat = scale * x + t (+ 100 * label)``: its output reveals the ``x_t``, ``t`` and label the loss fed it."""

    def __init__(self, *, num_classes: int = 0):
        self.image_shape = PROBE_SHAPE
        self.num_classes = num_classes
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x, t, label=None):
        out = self.scale[...] * x + t
        if self.num_classes:
            out = out + 100.0 * (self.num_classes if label is None else label)
        return out


class Oracle(nnx.Module):
    """The exact noise when all data is ONE image ``x0*``: ``eps(x, t) = (x - sqrt(abar_t) x0*) / sqrt(1 - abar_t)``."""

    def __init__(self, x0: np.ndarray, schedule: diffusion.NoiseSchedule):
        self.image_shape = x0.shape
        self.num_classes = 0
        self.num_train_steps = schedule.num_train_steps
        self.x0 = Constant(jnp.asarray(x0))
        self.alphas_cumprod = Constant(schedule.alphas_cumprod)

    def __call__(self, x, t, label=None):
        abar = self.alphas_cumprod[...][jnp.round(t * self.num_train_steps).astype(jnp.int32)]
        return (x - jnp.sqrt(abar) * self.x0[...]) / jnp.sqrt(1.0 - abar)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("cosine", T)


@pytest.fixture(scope="module")
def conditional():
    return nnx.split(UNet(**TINY, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0)))


def _images(seed: int, batch: int, shape=(28, 28, 1)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(batch, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ schedules


@hypothesis.settings(max_examples=20)
@hypothesis.given(name=st.sampled_from(diffusion.SCHEDULES), steps=st.integers(21, 2000))
def test_schedules_are_valid_variance_schedules(name, steps):
    schedule = make_schedule(name, steps)
    betas, abar = np.asarray(schedule.betas, np.float64), np.asarray(schedule.alphas_cumprod, np.float64)
    assert betas.shape == abar.shape == (steps,) and schedule.num_train_steps == steps
    assert np.all(betas > 0) and np.all(betas < 1)
    assert np.all((abar > 0) & (abar < 1)) and np.all(np.diff(abar) < 0)
    np.testing.assert_allclose(abar, np.cumprod(1.0 - betas), rtol=1e-4)


@pytest.mark.parametrize("steps", [10, 1000])
def test_cosine_schedule_matches_its_closed_form(steps):
    f = np.cos((np.arange(steps + 1) / steps + 0.008) / 1.008 * np.pi / 2) ** 2
    schedule = make_schedule("cosine", steps)
    # abar_t = f(t + 1) / f(0) wherever beta was not clipped at 0.999 (only the very last step is).
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1], f[1:-1] / f[0], rtol=1e-5)
    assert float(schedule.betas[-1]) == pytest.approx(0.999)


def test_linear_schedule_has_the_rescaled_ho_endpoints():
    for steps in (1000, 100):
        betas = np.asarray(make_schedule("linear", steps).betas)
        np.testing.assert_allclose(betas[[0, -1]], [1e-4 * 1000 / steps, 0.02 * 1000 / steps], rtol=1e-6)
        np.testing.assert_allclose(np.diff(betas), np.diff(betas)[0], rtol=1e-3)


@pytest.mark.parametrize(
    "name,steps,error,match",
    [
        ("quadratic", 10, ValueError, r"unknown noise schedule 'quadratic'; allowed: \['cosine', 'linear'\]"),
        ("cosine", 0, ValueError, "num_train_steps must be an integer >= 1, got 0"),
        ("cosine", 2.5, TypeError, "num_train_steps must be an integer"),
        ("linear", 20, ValueError, r"linear schedule needs num_train_steps >= 21 .* got 20; use the 'cosine'"),
    ],
)
def test_schedule_refusals(name, steps, error, match):
    with pytest.raises(error, match=match):
        make_schedule(name, steps)


def test_sampling_timesteps_stride_evenly_and_end_at_zero():
    assert sampling_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    assert sampling_timesteps(1000, 5).tolist() == [999, 749, 500, 250, 0]
    assert sampling_timesteps(7, 1).tolist() == [6]


# -------------------------------------------------------------------------------------------------- the loss


@jax.jit
def _draws(keys, class_dropout):
    """Each example's (t, noise, dropped) from its key, split as documented in ``epsilon_loss``."""

    def one(key):
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        return (
            jax.random.randint(t_key, (), 0, T),
            jax.random.normal(noise_key, PROBE_SHAPE, jnp.float32),
            jax.random.bernoulli(dropout_key, class_dropout),
        )

    return jax.vmap(one)(keys)


def _reference_losses(schedule, images, labels, keys, *, num_classes=0, class_dropout=0.0):
    """The epsilon loss of the Probe for every example, the noising done in float64 NumPy."""
    t, noise, dropped = (np.asarray(a) for a in _draws(keys, class_dropout))
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[t].reshape(-1, 1, 1, 1)
    noise = noise.astype(np.float64)
    x_t = np.sqrt(abar) * (2.0 * images.astype(np.float64) - 1.0) + np.sqrt(1.0 - abar) * noise
    prediction = x_t + (t / T).reshape(-1, 1, 1, 1)
    if num_classes:
        prediction = prediction + 100.0 * np.where(dropped, num_classes, labels).reshape(-1, 1, 1, 1)
    return np.mean((prediction - noise) ** 2, axis=(1, 2, 3)), t, dropped


@pytest.mark.parametrize("num_classes,class_dropout", [(0, 0.0), (3, 0.5)])
def test_loss_noising_equals_a_numpy_reference(schedule, num_classes, class_dropout):
    graphdef, params = nnx.split(Probe(num_classes=num_classes))
    loss_fn = epsilon_loss(graphdef, schedule=schedule, class_dropout=class_dropout)
    images, labels = _images(0, 8, PROBE_SHAPE), np.arange(8, dtype=np.int32) % 3
    key = jax.random.key(42)
    keys = jax.random.split(key, 8)
    batch = {"image": images, "label": labels}

    @jax.jit
    def losses_and_mean(params):
        # batch_mean splits its key into exactly these per-example keys.
        return jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys), batch_mean(loss_fn)(params, batch, key)

    losses, mean = losses_and_mean(params)
    reference, t, dropped = _reference_losses(
        schedule, images, labels, keys, num_classes=num_classes, class_dropout=class_dropout
    )
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    assert len(set(t.tolist())) > 1  # each example drew its own timestep
    if class_dropout:
        assert 0 < dropped.sum() < 8  # some labels dropped to the null label, some kept
    np.testing.assert_allclose(mean, np.mean(losses), rtol=1e-5)


def test_loss_uses_one_key_per_example(schedule, conditional):
    graphdef, params = conditional
    loss_fn = epsilon_loss(graphdef, schedule=schedule)
    batch = {"image": np.repeat(_images(1, 1), 4, axis=0), "label": np.full(4, 2, np.int32)}
    keys = jax.random.split(jax.random.key(0), 4)
    batched = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0, 0)))
    losses = np.asarray(batched(params, batch, keys))
    assert len(np.unique(losses)) == 4  # same example, different keys: different t and noise
    same_keys = np.asarray(batched(params, batch, jnp.stack([keys[0]] * 4)))
    np.testing.assert_allclose(same_keys, losses[0], rtol=1e-6)


def test_unconditional_loss_ignores_labels(schedule):
    graphdef, params = nnx.split(Probe())
    loss_fn = jax.jit(epsilon_loss(graphdef, schedule=schedule))
    image, key = _images(2, 1, PROBE_SHAPE)[0], jax.random.key(3)
    assert float(loss_fn(params, {"image": image, "label": 0}, key)) == float(loss_fn(params, {"image": image}, key))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"class_dropout": 1.5}, ValueError, r"class_dropout must be a probability in \[0, 1\], got 1.5"),
        ({"class_dropout": "0.1"}, TypeError, "class_dropout must be a probability"),
        ({"schedule": (1, 2)}, TypeError, "schedule must be a NoiseSchedule"),
    ],
)
def test_loss_refusals(schedule, kwargs, error, match):
    graphdef, _ = nnx.split(Probe())
    with pytest.raises(error, match=match):
        epsilon_loss(graphdef, **{"schedule": schedule, **kwargs})


def test_conditional_loss_needs_a_label(schedule):
    graphdef, params = nnx.split(Probe(num_classes=3))
    with pytest.raises(ValueError, match="needs an example mapping with key 'label'"):
        epsilon_loss(graphdef, schedule=schedule)(params, {"image": np.zeros(PROBE_SHAPE)}, jax.random.key(0))


# ------------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler,num_steps", [("ddim", T), ("ddim", 5), ("ddpm", T), ("ddpm", 3)])
def test_samplers_recover_the_one_data_point_from_the_exact_noise(schedule, sampler, num_steps):
    # With the exact noise of a one-point data distribution, every step's x0 estimate is that point: both samplers
    # must land on it from any x_T (DDPM's last step adds no noise).
    x0 = np.random.default_rng(5).uniform(-0.9, 0.9, size=PROBE_SHAPE).astype(np.float32)
    graphdef, params = nnx.split(Oracle(x0, schedule))
    noise = jax.random.normal(jax.random.key(1), (3, *PROBE_SHAPE))
    images = generate(
        graphdef, params, noise, schedule=schedule, num_steps=num_steps, sampler=sampler, key=jax.random.key(2)
    )
    np.testing.assert_allclose(images, np.broadcast_to((x0 + 1) / 2, images.shape), atol=1e-4)


@pytest.fixture(scope="module")
def loop_reference(conditional):
    """The reverse chain as a Python loop over the steps, updates in float64 NumPy (the formulas of ``sample``),
    the guided noise prediction jitted once for every call."""
    graphdef, params = conditional
    eps_fn = jax.jit(lambda x, t, y, w: predict_epsilon(graphdef, params, x, t, label=y, guidance_scale=w))

    def run(schedule, noise, *, num_steps, sampler, label, guidance_scale, key):
        abar = np.asarray(schedule.alphas_cumprod, np.float64)
        timesteps = sampling_timesteps(schedule.num_train_steps, num_steps)
        step_keys = jax.random.split(key, num_steps)
        x = np.asarray(noise, np.float64)
        for i, t in enumerate(timesteps):
            a = abar[t]
            a_prev = abar[timesteps[i + 1]] if i + 1 < num_steps else 1.0
            eps = np.asarray(
                eps_fn(
                    x.astype(np.float32),
                    np.float32(t / schedule.num_train_steps),
                    jnp.int32(label),
                    np.float32(guidance_scale),
                ),
                np.float64,
            )
            x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
            if sampler == "ddim":
                x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
            else:
                beta = 1 - a / a_prev
                z = np.asarray(jax.random.normal(step_keys[i], x.shape), np.float64)
                x = (
                    np.sqrt(a_prev) * beta / (1 - a) * x0
                    + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
                    + np.sqrt(beta * (1 - a_prev) / (1 - a)) * z
                )
        return np.clip((x + 1) / 2, 0, 1)

    return run


# The first step divides by sqrt(abar_{T-1}) ~ 1e-2, which turns float32 rounding differences (batched vs single
# convolutions, float32 vs float64 updates) into ~1e-4 on a few pixels; a wrong key, label, timestep or formula
# moves whole images by orders of magnitude more, hence a loose max and a tight mean.
def _assert_images_close(got, expected):
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert np.mean(np.abs(np.asarray(got) - expected)) < 2e-5


GUIDED = dict(num_steps=4, guidance_scale=1.5)


def test_ddim_scan_equals_a_python_loop(schedule, conditional, loop_reference):
    graphdef, params = conditional
    noise = jax.random.normal(jax.random.key(0), (28, 28, 1))
    got = sample(graphdef, params, noise, schedule=schedule, sampler="ddim", label=3, **GUIDED)
    _assert_images_close(got, loop_reference(schedule, noise, sampler="ddim", label=3, key=jax.random.key(0), **GUIDED))


def test_ddpm_generate_equals_sample_and_a_python_loop(schedule, conditional, loop_reference):
    graphdef, params = conditional
    noise = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    labels, key = np.array([3, 8], np.int32), jax.random.key(7)
    batch = generate(graphdef, params, noise, schedule=schedule, sampler="ddpm", labels=labels, key=key, **GUIDED)
    assert batch.shape == (2, 28, 28, 1) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    keys = jax.random.split(key, 2)  # one key per example
    for b in range(2):
        one = sample(
            graphdef, params, noise[b], schedule=schedule, sampler="ddpm", label=int(labels[b]), key=keys[b], **GUIDED
        )
        reference = loop_reference(schedule, noise[b], sampler="ddpm", label=labels[b], key=keys[b], **GUIDED)
        _assert_images_close(batch[b], reference)
        _assert_images_close(one, reference)


def test_ddim_is_deterministic_in_the_noise_and_ddpm_follows_its_key(schedule, conditional):
    graphdef, params = conditional
    noise = jax.random.normal(jax.random.key(0), (28, 28, 1))
    options = dict(schedule=schedule, label=3, **GUIDED)  # the specs compiled by the tests above
    ddim = [
        sample(graphdef, params, noise, sampler="ddim", key=key, **options)
        for key in (None, jax.random.key(1), jax.random.key(2))
    ]
    assert np.array_equal(ddim[0], ddim[1]) and np.array_equal(ddim[0], ddim[2])
    ddpm = [sample(graphdef, params, noise, sampler="ddpm", key=jax.random.key(k), **options) for k in (1, 1, 2)]
    assert np.array_equal(ddpm[0], ddpm[1]) and not np.allclose(ddpm[0], ddpm[2])


def test_guidance_combines_the_conditional_and_null_predictions(conditional):
    graphdef, params = conditional
    x, t, y = jax.random.normal(jax.random.key(0), (28, 28, 1)), jnp.float32(0.4), jnp.int32(5)

    @jax.jit
    def predictions(w):
        model = nnx.merge(graphdef, params)
        return (
            predict_epsilon(graphdef, params, x, t, label=y, guidance_scale=w),
            model(x, t, y),
            model(x, t),
            predict_epsilon(graphdef, params, x, t),
        )

    guided, conditional_eps, null_eps, unlabelled = predictions(0.0)  # a traced w = 0
    chex.assert_trees_all_close(guided, conditional_eps, atol=1e-5, rtol=1e-5)
    guided, *_ = predictions(2.0)
    chex.assert_trees_all_close(guided, 3.0 * conditional_eps - 2.0 * null_eps, atol=1e-4, rtol=1e-4)
    assert not np.allclose(conditional_eps, null_eps, atol=1e-4)
    chex.assert_trees_all_close(unlabelled, null_eps, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_steps": 0}, ValueError, "num_steps must be an integer >= 1, got 0"),
        ({"num_steps": T + 1}, ValueError, rf"num_steps must be in \[1, {T}\] \(the schedule's T\), got {T + 1}"),
        ({"sampler": "euler"}, ValueError, r"unknown sampler 'euler'; allowed: \['ddim', 'ddpm'\]"),
        ({"sampler": "ddpm"}, ValueError, "sampler='ddpm' draws fresh noise at every step and needs a key"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": 2.0}, ValueError, "guidance_scale=2.0 needs the labels to guide towards"),
        ({"labels": np.array([1, 10])}, ValueError, r"labels must be classes in \[0, 10\), got values in \[1, 10\]"),
        ({"labels": np.array([1])}, ValueError, r"labels must be integers of shape \(2,\)"),
        ({"noise": np.zeros((2, 32, 32, 1))}, ValueError, r"noise must have shape \(B, \*\(28, 28, 1\)\)"),
    ],
)
def test_generate_refusals_before_any_work(schedule, conditional, kwargs, error, match):
    graphdef, params = conditional
    options = {"noise": np.zeros((2, 28, 28, 1), np.float32), "schedule": schedule, "num_steps": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(graphdef, params, **options)


def test_unconditional_sampling_refuses_labels_and_guidance(schedule):
    graphdef, params = nnx.split(Probe())
    noise = np.zeros(PROBE_SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"guidance_scale=1.0 needs a class-conditional model"):
        sample(graphdef, params, noise, schedule=schedule, num_steps=2, label=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\); sample it with label=None"):
        sample(graphdef, params, noise, schedule=schedule, num_steps=2, label=1)
    with pytest.raises(ValueError, match=r"noise must be ONE example of shape \(4, 4, 1\)"):
        sample(graphdef, params, noise[None], schedule=schedule, num_steps=2)


# ------------------------------------------------------------------------------------- unlearning on the U-Net


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def test_sa_per_example_step_on_the_unet_equals_the_materialised_computation(schedule, conditional):
    # One jitted step of the sa_per_example method (its jvp/vjp route, projecting on conflict) against B
    # materialised per-example gradients of the same keys, each projected in float64 onto the normal plane of the
    # retain gradient d where -grad l(x_i) conflicts with d, then averaged. SGD makes the update recoverable.
    graphdef, params = conditional
    loss_fn = epsilon_loss(graphdef, schedule=schedule, class_dropout=0.25)
    forget = {"image": _images(10, 4), "label": np.array([1, 1, 4, 7], np.int32)}
    retain = {"image": _images(11, 4), "label": np.array([0, 2, 3, 9], np.int32)}
    key = jax.random.key(0)
    learning_rate = 1e3  # keeps the float32 rounding of params - lr * u small relative to lr * u
    method = methods.make_method("sa_per_example", loss_fn=loss_fn, optimizer=optax.sgd(learning_rate))

    @jax.jit
    def compute(params):
        new_params, _, metrics = method.step(params, method.init(params), forget, retain, key)
        forget_keys, retain_keys, _ = methods.split_step_keys(key, forget, retain)
        retain_grad = jax.grad(lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, retain, retain_keys)))(
            params
        )
        update = jax.tree.map(lambda old, new: (old - new) / learning_rate, params, new_params)
        return update, metrics, per_example_grads(loss_fn, params, forget, forget_keys), retain_grad

    update, metrics, grads, retain_grad = compute(params)
    got, d = _flat(update), _flat(retain_grad)
    ascents = [-_flat(jax.tree.map(lambda g, i=i: g[i], grads)) for i in range(4)]
    conflicts = [u @ d < 0 for u in ascents]
    assert any(conflicts)  # the projection is exercised
    reference = np.mean(
        [u - ((u @ d) / (d @ d) if conflict else 0.0) * d for u, conflict in zip(ascents, conflicts)], axis=0
    )
    assert np.linalg.norm(got - reference) <= 1e-4 * np.linalg.norm(reference)
    assert float(metrics["projected"]) == pytest.approx(np.mean(conflicts))
    assert all(np.isfinite(float(value)) for value in metrics.values())


def test_docstring_examples_run():
    result = doctest.testmod(diffusion, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
