"""Forget sets of examples (gsu_jax.example_sets): the spec parser shared by ``train.py --config.exclude=`` and
``unlearn.py --config.forget=``, the shorthands, the selection both sides make, and the loss-gap metric and stop.

In-process and fast (no training): the end-to-end run with ``forget=fraction:...`` and the oracle refusal are in
test_unlearn_cli.py.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from gsu_jax import metrics, training
from gsu_jax.config_validation import load_config_file, validate_train_config
from gsu_jax.example_sets import ExampleSet, combined_example_set, parse_example_set
from gsu_jax.schema import ConfigError
from gsu_jax.unlearning import UnlearnConfigError, plan_run
from gsu_jax.unlearning.config import parse_forget_set

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def unlearn_config():
    return load_config_file(REPO / "configs" / "unlearn_smoke.py")


def test_parses_every_form(tmp_path):
    assert parse_example_set("classes:1,7", field="forget") == ExampleSet("classes", classes=(1, 7))
    assert parse_example_set(" fraction: 0.01 ", field="forget") == ExampleSet("fraction", fraction=0.01)
    assert parse_example_set("indices:idx.txt", field="forget").path == str(pathlib.Path("idx.txt").absolute())
    assert parse_example_set("", field="forget") is None
    assert ExampleSet("fraction", fraction=0.01).spec == "fraction:0.01"
    assert ExampleSet("classes", classes=(1, 7)).spec == "classes:1,7"


@pytest.mark.parametrize(
    "value, message",
    [
        ("frac:0.1", "'frac' is not a kind of set"),
        ("fraction", "no ':' between the kind"),
        ("fraction:", "'fraction:' names nothing"),
        ("fraction:x", "'x' is not a number"),
        ("fraction:1.5", "not strictly between 0 and 1"),
        ("fraction:0", "not strictly between 0 and 1"),
        ("fraction:nan", "not strictly between 0 and 1"),
        ("classes:a", "'a' is not a class index"),
        ("classes:1,1", "a class is listed twice"),
        ("indices:", "'indices:' names nothing"),
    ],
)
def test_each_bad_spec_is_refused_naming_it_and_the_forms(value, message):
    with pytest.raises(ConfigError) as err:
        parse_example_set(value, field="forget")
    text = str(err.value)
    assert text.startswith(f"config.forget={value!r} is invalid") and message in text, text
    assert "'fraction:<f in (0, 1)>'" in text and "'indices:<file>'" in text and "\n" not in text


def test_shorthands_and_conflicts():
    def forget(spec, classes):
        return parse_forget_set({"forget": spec, "forget_classes": classes})

    assert forget("", "1,7") == ExampleSet("classes", classes=(1, 7))  # forget unset: the shorthand decides
    assert forget("classes:7", "1") == ExampleSet("classes", classes=(7,))  # the shorthand at its default
    assert forget("classes:7", "7").classes == (7,)  # both say the same
    assert forget("fraction:0.1", "1").kind == "fraction"
    with pytest.raises(UnlearnConfigError, match=r"config.forget='fraction:0.1' and config.forget_classes='7' both"):
        forget("fraction:0.1", "7")
    train = {"exclude_classes": "", "exclude": ""}
    assert combined_example_set(train, field="exclude", classes_field="exclude_classes", default_classes="") is None
    train_config = load_config_file(REPO / "configs" / "smoke.py")
    train_config.exclude, train_config.exclude_classes = "fraction:0.1", "1"
    with pytest.raises(ConfigError, match=r"config.exclude='fraction:0.1' and config.exclude_classes='1' both"):
        validate_train_config(train_config)
    train_config.exclude = "fractoin:0.1"
    with pytest.raises(ConfigError, match=r"config.exclude='fractoin:0.1' is invalid"):
        validate_train_config(train_config)


@pytest.mark.parametrize("form", ["fraction", "indices", "classes"])
def test_train_exclude_and_unlearn_forget_select_the_same_examples(unlearn_config, tmp_path, form):
    """train.py's oracle (exclude=S) leaves out exactly the examples unlearn.py's forget=S unlearns."""
    if form == "indices":
        (tmp_path / "idx.txt").write_text("# two examples\n3\n4000\n17\n")
        spec = f"indices:{tmp_path / 'idx.txt'}"
    else:
        spec = {"fraction": "fraction:0.01", "classes": "classes:1,7"}[form]
    train_config = unlearn_config.train.copy_and_resolve_references()
    train_config.exclude = spec
    run_data = training.prepare_data(train_config)
    unlearn_config.forget, unlearn_config.guidance_weight = spec, 0.0  # guidance needs forget classes
    plan = plan_run(unlearn_config, tmp_path / "run")
    assert run_data.excluded == plan.forget_record and plan.forget_record["kind"] == form
    assert len(run_data.generative) == len(run_data.train) - plan.forget_idx.size == plan.retain_idx.size
    assert plan.example_forget == (form != "classes")
    if form == "indices":
        assert plan.forget_idx.tolist() == [3, 17, 4000]
    if form == "fraction":
        assert plan.forget_idx.size == round(0.01 * len(run_data.train))
        # Drawn with the data seed: another seed draws another set.
        unlearn_config.train.seed = 1
        assert plan_run(unlearn_config, tmp_path / "run").forget_record != plan.forget_record
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"forget": "indices:/nonexistent/idx.txt"}, "the indices file does not exist"),
        ({"forget": "fraction:0.0001"}, "selects no example"),
        ({"forget": "fraction:0.01", "threshold": "0.1"}, "config.threshold='0.1' is a forget fraction"),
        ({"forget": "fraction:0.01", "guidance_weight": 10.0}, "config.guidance_weight=10.0 needs forget classes"),
    ],
)
def test_example_sets_refused_against_the_data_before_any_work(unlearn_config, tmp_path, overrides, message):
    for key, value in overrides.items():
        setattr(unlearn_config, key, value)
    with pytest.raises(UnlearnConfigError, match=message):
        plan_run(unlearn_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_out_of_range_indices_are_refused(unlearn_config, tmp_path):
    (tmp_path / "idx.txt").write_text("1\n4500\n")
    unlearn_config.forget = f"indices:{tmp_path / 'idx.txt'}"
    with pytest.raises(UnlearnConfigError, match=r"outside \[0, 4500\): 4500"):
        plan_run(unlearn_config, tmp_path / "run")


def test_loss_gap_matches_numpy():
    rng = np.random.default_rng(0)
    forget, heldout = rng.normal(100, 5, size=45), rng.normal(103, 7, size=500)
    gap, se = metrics.loss_gap(forget, heldout)
    assert gap == pytest.approx(forget.mean() - heldout.mean(), rel=1e-12)
    expected_se = np.sqrt(np.var(forget, ddof=1) / 45 + np.var(heldout, ddof=1) / 500)
    assert se == pytest.approx(expected_se, rel=1e-12)
    with pytest.raises(metrics.MetricsError, match="at least 2"):
        metrics.loss_gap([1.0], heldout)


def test_class_matched_loss_gap_matches_a_per_example_reference_and_ignores_class_offsets():
    rng = np.random.default_rng(1)
    forget_labels, heldout_labels = rng.integers(0, 3, 40), np.repeat([0, 1, 2], [50, 60, 70])
    forget, heldout = rng.normal(100, 5, 40), rng.normal(103, 7, 180)
    gap, se = metrics.loss_gap(forget, heldout, forget_labels=forget_labels, heldout_labels=heldout_labels)
    # Reference: each forget example against the held-out examples of its class, one at a time.
    differences = [f - heldout[heldout_labels == c].mean() for f, c in zip(forget, forget_labels, strict=True)]
    variance = np.var(differences, ddof=1) / 40
    for c in range(3):
        share, matched = np.mean(forget_labels == c), heldout[heldout_labels == c]
        variance += share**2 * np.var(matched, ddof=1) / matched.size
    assert gap == pytest.approx(np.mean(differences), rel=1e-12)
    assert se == pytest.approx(np.sqrt(variance), rel=1e-12)
    # A loss offset per class (a 1 is cheaper to reconstruct than an 8) moves both sides alike: no change.
    offsets = np.array([-90.0, 0.0, 60.0])
    shifted = metrics.loss_gap(
        forget + offsets[forget_labels],
        heldout + offsets[heldout_labels],
        forget_labels=forget_labels,
        heldout_labels=heldout_labels,
    )
    assert shifted == pytest.approx((gap, se), rel=1e-9)
    with pytest.raises(metrics.MetricsError, match="class 2 has 1 held-out examples"):
        metrics.loss_gap(forget, heldout[:111], forget_labels=forget_labels, heldout_labels=heldout_labels[:111])
    with pytest.raises(metrics.MetricsError, match="together"):
        metrics.loss_gap(forget, heldout, forget_labels=forget_labels)


def test_loss_gap_band_and_stop_test():
    band = metrics.loss_gap_band(0.5, 0.25)
    assert band == metrics.LossGapBand(0.0, 1.0)
    gaps = [-3.0, -0.5, 1.2, 0.7, 0.1]
    assert [metrics.reached_stop(g, band) for g in gaps] == [False, False, True, True, True]  # 1.2: overshoot
    assert metrics.reached_stop(0.0, band) and not metrics.reached_stop(-1e-9, band)  # from the low bound on
    assert not metrics.reached_stop(float("inf"), band) and not metrics.reached_stop(float("nan"), band)
    assert metrics.reached_stop(0.01, 0.02) and not metrics.reached_stop(0.02, 0.02)  # a fraction: strictly below
