"""Property tests of gsu_jax.config_validation: random values and keys through the validators.

Whatever is thrown at a validator -- any field with a value of any type, unknown keys of any spelling, random
model hyperparameters -- it either accepts the value (and then the value has the field's type and passes its
rule) or raises :class:`ConfigError` in one line naming the field. Never another exception type, never a hang.
(The hand-picked refusals and their exact wording are in tests/test_training.py.)
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import ml_collections
import pytest

from gsu_jax import config_validation
from gsu_jax.config_validation import TRAIN_SCHEMA, default_train_config, validate_train_config
from gsu_jax.schema import ConfigError, validate_config
from gsu_jax.unlearning import UNLEARN_SCHEMA, default_unlearn_config

BOUNDED = hypothesis.settings(max_examples=150, deadline=None)

# Any value a config file or a mapping could hold.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers(), st.integers()),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
# Values near the edges of the typical rules (>= 0, >= 1, fractions, booleans, data specs, class lists).
EDGE_VALUE = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            -1,
            8,
            9,
            400,
            401,
            0.0,
            0.5,
            1.0,
            -0.0,
            1e-300,
            1e300,
            float("nan"),
            float("inf"),
            True,
            False,
            "",
            ",",
            "1,1",
            "0,7",
            "embedded",
            "idx:",
            "idx:/d",
            "idx::x",
            "tfds:mnist:test",
            "generative",
            "evaluator,guidance",
            "mlp_vae",
            "conv_vae",
            "mlp_classifier",
        ]
    ),
    ANY_VALUE,
)


def _train_values() -> dict:
    return dict(default_train_config().items())


def _assert_one_line_naming(error: ConfigError, name: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"config.{name}"), message


@BOUNDED
@hypothesis.given(name=st.sampled_from(sorted(TRAIN_SCHEMA)), value=EDGE_VALUE)
def test_any_value_of_any_train_field_is_accepted_by_its_rule_or_refused_naming_it(name, value):
    values = _train_values()
    values[name] = value
    field = TRAIN_SCHEMA[name]
    try:
        validated = validate_train_config(values)
    except ConfigError as err:
        _assert_one_line_naming(err, name)
        return
    accepted = validated[name]
    if field.kind is float:
        assert isinstance(accepted, float) and math.isfinite(accepted)
    elif field.kind is int:
        assert isinstance(accepted, int) and not isinstance(accepted, bool)
    else:
        assert isinstance(accepted, field.kind)
    assert field.check is None or field.check(accepted)


@BOUNDED
@hypothesis.given(
    name=st.one_of(st.text(min_size=1, max_size=24), st.integers(), st.none(), st.booleans()), value=ANY_VALUE
)
def test_any_unknown_key_is_refused_naming_it(name, value):
    hypothesis.assume(name not in TRAIN_SCHEMA)
    values = _train_values()
    values[name] = value
    with pytest.raises(ConfigError) as excinfo:
        validate_train_config(values)
    shown = f"config.{name}" if isinstance(name, str) and name.isidentifier() else f"config[{name!r}]"
    assert str(excinfo.value).startswith(f"{shown} is not a known field"), str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert "did you mean" in str(excinfo.value) or "known fields:" in str(excinfo.value)


@BOUNDED
@hypothesis.given(
    name=st.sampled_from(sorted(TRAIN_SCHEMA)),
    edit=st.sampled_from(["drop", "swap", "double"]),
    position=st.integers(0, 40),
)
def test_a_one_letter_typo_of_a_field_gets_a_did_you_mean_hint(name, edit, position):
    index = position % len(name)
    if edit == "drop":
        typo = name[:index] + name[index + 1 :]
    elif edit == "swap" and index + 1 < len(name):
        typo = name[:index] + name[index + 1] + name[index] + name[index + 2 :]
    else:
        typo = name[:index] + name[index] + name[index:]
    hypothesis.assume(typo and typo not in TRAIN_SCHEMA)
    values = _train_values()
    values[typo] = values.pop(name)
    with pytest.raises(ConfigError, match=r"did you mean '[a-z_]+'\?") as excinfo:
        validate_train_config(values)
    assert f"config.{typo} is not a known field" in str(excinfo.value)


@BOUNDED
@hypothesis.given(
    field=st.sampled_from(["model_kwargs", "classifier_kwargs"]),
    kwargs=st.dictionaries(
        st.one_of(
            st.sampled_from(
                ["hidden", "channels", "num_groups", "image_shape", "latent_dim", "num_classes", "layer_norm"]
            ),
            st.text(max_size=8),
            st.integers(),
        ),
        ANY_VALUE,
        max_size=3,
    ),
)
def test_random_model_hyperparameters_are_accepted_or_refused_naming_the_key(field, kwargs):
    values = _train_values()
    values[field] = kwargs
    try:
        validated = validate_train_config(values)
    except ConfigError as err:
        _assert_one_line_naming(err, field)
        return
    assert validated[field] == kwargs


@BOUNDED
@hypothesis.given(name=st.sampled_from(sorted(UNLEARN_SCHEMA)), value=EDGE_VALUE)
def test_any_value_of_any_unlearn_field_is_accepted_by_its_rule_or_refused_naming_it(name, value):
    """The unlearning schema goes through the same field checks (its cross-field rules are gsu_jax.unlearning.plan's)."""
    values = dict(default_unlearn_config().items())
    values[name] = value
    try:
        validated = validate_config(values, UNLEARN_SCHEMA)
    except ConfigError as err:
        _assert_one_line_naming(err, name)
        return
    field = UNLEARN_SCHEMA[name]
    assert field.check is None or field.check(validated[name])


@BOUNDED
@hypothesis.given(text=st.text(max_size=16))
def test_class_lists_and_role_lists_parse_or_are_refused(text):
    try:
        classes = config_validation.parse_class_list(text)
    except ConfigError as err:
        _assert_one_line_naming(err, "exclude_classes")
    else:
        assert all(isinstance(c, int) and c >= 0 for c in classes) and len(set(classes)) == len(classes)
    try:
        roles = config_validation.parse_roles(text)
    except ConfigError as err:
        _assert_one_line_naming(err, "roles")
    else:
        assert roles and set(roles) <= set(config_validation.ROLES)


def test_a_config_that_is_not_a_mapping_is_refused():
    for config in (None, [("seed", 0)], "seed=0", 3):
        with pytest.raises(ConfigError, match="config must be an ml_collections.ConfigDict or a mapping"):
            validate_train_config(config)
    assert validate_train_config(ml_collections.ConfigDict(_train_values()))["seed"] == 0
