"""gsu_jax.schema: one value checked against its Field, with the refusal one line naming field, value and rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gsu_jax.schema import REQUIRED, ConfigError, Field, at_least, check_value, validate_config

COUNT = Field(2, int, "an integer >= 1", at_least(1), "run", "a count")
WEIGHT = Field(None, float, "None or a number >= 0", at_least(0), "run", "a weight", nullable=True)
TARGET = Field(REQUIRED, float, "a number (+inf: never)", None, "run", "a target", finite=False)


@pytest.mark.parametrize(
    "value, field, expected",
    [
        (3, COUNT, 3),
        (np.int64(4), COUNT, 4),
        (None, WEIGHT, None),
        (2, WEIGHT, 2.0),
        (np.float32(0.5), WEIGHT, 0.5),
        (math.inf, TARGET, math.inf),
        (-math.inf, TARGET, -math.inf),
    ],
)
def test_accepted_values_come_back_as_their_kind(value, field, expected):
    checked = check_value("x", value, field)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize(
    "value, field, message",
    [
        (0, COUNT, "config.x=0 is invalid: allowed: an integer >= 1"),
        (True, COUNT, "config.x=True is invalid: expected int, got bool"),
        (1.5, COUNT, "expected int, got float"),
        (None, COUNT, "expected int, got NoneType"),
        (-1.0, WEIGHT, "config.x=-1.0 is invalid: allowed: None or a number >= 0"),
        (math.inf, WEIGHT, "not finite"),
        (math.nan, TARGET, "NaN"),
        (REQUIRED, TARGET, "config.x is required and has no default"),
    ],
)
def test_refusals_are_one_line_naming_the_value(value, field, message):
    with pytest.raises(ConfigError) as refused:
        check_value("x", value, field)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_validate_config_checks_every_field_and_names_unknown_ones():
    schema = {"count": COUNT, "weight": WEIGHT}
    assert validate_config({"count": 1, "weight": None}, schema) == {"count": 1, "weight": None}
    with pytest.raises(ConfigError, match=r"config.cuont is not a known field; did you mean 'count'\?"):
        validate_config({"cuont": 1, "weight": None}, schema)
    with pytest.raises(ConfigError, match="config.weight is missing"):
        validate_config({"count": 1}, schema)
