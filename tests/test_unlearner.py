"""gsu_jax.unlearn: the library entry point for a user's own model.

Its steps against make_method's step driven by hand (the same batches and keys), its stopping rule, its batch
order, its refusals, and the step loop it shares with unlearn.py (tests/test_readme_example.py runs the README's
example).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gsu_jax import methods
from gsu_jax.unlearner import batch_schedule, step_loop, unlearn


def _loss(params, example, key):
    """A noisy linear regression: the key enters, so a wrong per-example key changes the result."""
    noise = 0.01 * jax.random.normal(key, ())
    return jnp.square(example["x"] @ params["w"] + params["b"] - example["y"] + noise)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, 3)).astype(np.float32)
    forget = {"x": x[:16], "y": np.ones(16, np.float32)}
    retain = {"x": x[16:], "y": np.zeros(32, np.float32)}
    return forget, retain


PARAMS = {"w": jnp.array([0.1, -0.2, 0.3]), "b": jnp.array(0.05)}


def _batches(data, batch: int, steps: int):
    return [{name: value[t * batch : (t + 1) * batch] for name, value in data.items()} for t in range(steps)]


def test_each_update_is_the_registry_step_with_the_documented_keys():
    forget, retain = _data()
    forget_batches, retain_batches = _batches(forget, 4, 4), _batches(retain, 8, 4)
    key = jax.random.key(3)
    result = unlearn(
        _loss, PARAMS, forget_batches, retain_batches, key=key, method="sa", optimizer=optax.sgd(0.05), max_steps=4
    )
    # By hand: the documented key stream (split once; step t gets fold_in(steps_key, t)).
    method = methods.make_method("sa", loss_fn=_loss, optimizer=optax.sgd(0.05))
    _, steps_key = jax.random.split(key)
    params, state = PARAMS, method.init(PARAMS)
    for t in range(4):
        params, state, step_metrics = method.step(
            params, state, forget_batches[t], retain_batches[t], jax.random.fold_in(steps_key, t)
        )
        assert result.history[t]["forget_loss"] == pytest.approx(float(step_metrics["forget_loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), result.params, params)
    assert result.stopped_at is None and result.steps_run == 4 and result.nonfinite_steps == 0
    assert int(result.state.step) == 4


def test_the_stopping_rule_keeps_the_model_at_the_stop():
    forget, retain = _data()
    calls = []

    def stop(updates, params):
        calls.append(updates)
        return updates >= 2

    common = dict(key=jax.random.key(0), method="sa", optimizer=optax.sgd(0.05), max_steps=5, batch_size=4)
    stopped = unlearn(_loss, PARAMS, forget, retain, stop=stop, **common)
    assert calls == [0, 1, 2] and stopped.stopped_at == 2 and stopped.steps_run == 2
    continued = unlearn(_loss, PARAMS, forget, retain, stop=lambda u, p: u >= 2, continue_to_budget=True, **common)
    assert continued.stopped_at == 2 and continued.steps_run == 5
    # The same key draws the same batches: the model at the stop is the stopped run's, the end model differs.
    jax.tree.map(np.testing.assert_array_equal, continued.params, stopped.params)
    assert not np.allclose(continued.params_at_end["w"], continued.params["w"])
    at_start = unlearn(_loss, PARAMS, forget, retain, stop=lambda u, p: True, **common)
    assert at_start.stopped_at == 0 and at_start.steps_run == 0
    jax.tree.map(np.testing.assert_array_equal, at_start.params, PARAMS)


def test_array_data_is_drawn_in_fresh_permutations_and_the_key_fixes_the_run():
    order = batch_schedule(np.arange(10), 4, 5, np.random.default_rng(0))
    assert order.shape == (5, 4)
    flat = order.ravel()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    forget, retain = _data()
    common = dict(method="sa", optimizer=optax.sgd(0.05), max_steps=3, batch_size=4)
    first = unlearn(_loss, PARAMS, forget, retain, key=jax.random.key(1), **common)
    again = unlearn(_loss, PARAMS, forget, retain, key=jax.random.key(1), **common)
    other = unlearn(_loss, PARAMS, forget, retain, key=jax.random.key(2), **common)
    jax.tree.map(np.testing.assert_array_equal, first.params, again.params)
    assert not np.array_equal(first.params["w"], other.params["w"])


def test_an_iterable_that_runs_out_ends_the_run():
    forget, retain = _data()
    result = unlearn(
        _loss,
        PARAMS,
        iter(_batches(forget, 4, 2)),
        retain,
        key=jax.random.key(0),
        method="s",
        optimizer=optax.sgd(0.05),
        max_steps=10,
        batch_size=4,
    )
    assert result.steps_run == 2


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on():
    forget, retain = _data()
    batches = _batches(forget, 4, 3)
    batches[1] = {**batches[1], "y": np.full(4, np.nan, np.float32)}  # the second step's loss is NaN
    retain_batches = _batches(retain, 4, 3)
    common = dict(key=jax.random.key(0), method="sa", optimizer=optax.sgd(0.05))
    seen = {}
    result = unlearn(
        _loss, PARAMS, batches, retain_batches, max_steps=3, stop=lambda t, p: seen.setdefault(t, p) is None, **common
    )
    assert result.nonfinite_steps == 1 and result.steps_run == 3
    assert [row["nonfinite_skipped"] for row in result.history] == [0, 1, 0]
    jax.tree.map(np.testing.assert_array_equal, seen[2], seen[1])  # the skipped step left the parameters as they were
    first = unlearn(_loss, PARAMS, batches[:1], retain_batches[:1], max_steps=1, **common)
    jax.tree.map(np.testing.assert_array_equal, seen[1], first.params)


def test_an_empty_iterable_is_refused():
    forget, retain = _data()
    with pytest.raises(ValueError, match="retain_data is an empty iterable"):
        unlearn(_loss, PARAMS, forget, [], key=jax.random.key(0), method="sa", max_steps=2, batch_size=4)
    with pytest.raises(TypeError, match="forget_data's first batch must be a pytree of arrays"):
        unlearn(_loss, PARAMS, [1, 2], retain, key=jax.random.key(0), method="sa", max_steps=2, batch_size=4)


def test_non_finite_steps_are_skipped_then_refused():
    forget, retain = _data()

    def nan_loss(params, example, key):
        return _loss(params, example, key) * jnp.nan

    with pytest.raises(FloatingPointError, match="diverged: the last 3 steps"):
        unlearn(
            nan_loss, PARAMS, forget, retain, key=jax.random.key(0), method="sa", optimizer=optax.sgd(0.1), max_steps=3
        )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(method="nope"), ValueError, r"method='nope' is unknown; allowed: .*remap_surgery"),
        (dict(max_steps=0), ValueError, r"max_steps=0 is invalid; allowed: an integer >= 1"),
        (dict(batch_size=2.5), ValueError, r"batch_size=2.5 is invalid"),
        (dict(stop=3), TypeError, r"stop must be None or a callable"),
        (dict(key=0), TypeError, r"key must be one JAX PRNG key"),
        (dict(params={"w": jnp.zeros(3, jnp.int32)}), TypeError, r"params\['w'\] has dtype int32"),
        (dict(forget={"x": np.zeros((4, 3)), "y": np.zeros(5)}), ValueError, r"forget_data's arrays must share"),
        (dict(retain=7), TypeError, r"retain_data must be a pytree of arrays"),
        (dict(hparams={"nope": 1}), ValueError, r"nope"),
    ],
)
def test_bad_arguments_are_refused_before_any_step(change, error, match):
    forget, retain = _data()
    arguments = dict(params=PARAMS, forget=forget, retain=retain, key=jax.random.key(0), method="sa")
    arguments.update(change)
    calls = []

    def loss(params, example, key):
        calls.append(1)
        return _loss(params, example, key)

    with pytest.raises(error, match=match):
        unlearn(
            loss,
            arguments.pop("params"),
            arguments.pop("forget"),
            arguments.pop("retain"),
            max_steps=arguments.pop("max_steps", 2),
            batch_size=arguments.pop("batch_size", 4),
            **arguments,
        )
    assert not calls  # never traced


def test_step_loop_calls_its_hooks_in_order_skips_nonfinite_steps_and_stops():
    """The loop both unlearn and unlearn.py run, on a scalar 'model' whose step adds its input (NaN at step 3)."""
    events = []

    def step(params, state, forget, retain, key):
        del retain, key
        return params + forget, state + 1, {"loss": forget}

    def before_step(t, params, state, counters):
        events.append(("before", t, float(params), int(state), counters))

    def after_step(record):
        events.append(("after", record.step, float(record.params), record.finite))
        return record.step == 4  # stop after the fourth update

    inputs = [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]
    end = step_loop(
        step,
        jnp.float32(0.0),
        jnp.int32(0),
        lambda t: (jnp.float32(inputs[t]), None, None),
        max_steps=6,
        after_step=after_step,
        diverged=lambda consecutive, at: AssertionError("must not diverge"),
        before_step=before_step,
    )
    assert events == [
        ("before", 0, 0.0, 0, (0, 0)),
        ("after", 1, 1.0, True),
        ("before", 1, 1.0, 1, (0, 0)),
        ("after", 2, 3.0, True),
        ("before", 2, 3.0, 2, (0, 0)),
        ("after", 3, 3.0, False),  # skipped: parameters and state kept
        ("before", 3, 3.0, 2, (1, 1)),
        ("after", 4, 7.0, True),
    ]
    assert (float(end.params), int(end.state), end.nonfinite_steps, end.consecutive_nonfinite) == (7.0, 3, 1, 0)

    # continue_to_budget runs on after the stop; a source that runs out (None) ends the loop.
    records = []
    step_loop(
        step,
        jnp.float32(0.0),
        jnp.int32(0),
        lambda t: None if t == 5 else (jnp.float32(1.0), None, None),
        max_steps=6,
        after_step=lambda record: records.append(record.step) or True,
        diverged=lambda consecutive, at: AssertionError("must not diverge"),
        continue_to_budget=True,
    )
    assert records == [1, 2, 3, 4, 5]

    # Every step of a budget shorter than the window non-finite: diverged(consecutive, step) is raised.
    with pytest.raises(FloatingPointError, match="2 in a row up to 2"):
        step_loop(
            step,
            jnp.float32(0.0),
            jnp.int32(0),
            lambda t: (jnp.float32(float("nan")), None, None),
            max_steps=2,
            after_step=lambda record: False,
            diverged=lambda consecutive, at: FloatingPointError(f"{consecutive} in a row up to {at}"),
        )
