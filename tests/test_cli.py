"""The shared command-line helpers: which override a schema refuses, and one-line messages."""

from __future__ import annotations

import pytest

from gsu_jax import cli
from gsu_jax.config_validation import TRAIN_SCHEMA
from gsu_jax.unlearning import UNLEARN_SCHEMA

SCHEMAS = {"": UNLEARN_SCHEMA, "train.": TRAIN_SCHEMA}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["p", "--config.methods=sa", "--config.train.latent_dim=3"], None),
        (["p", "--config.methdos=sa"], "config.methdos is not a known field; did you mean 'methods'?"),
        (
            ["p", "--config.train.latnt_dim=3"],
            "config.train.latnt_dim is not a known field; did you mean 'latent_dim'?",
        ),
        # The nested config itself is a field of the outer schema; deeper paths are the field's own business.
        (["p", "--config.train=x", "--config.train.model_kwargs.hidden=3"], None),
        (["p", "--workdir=/tmp/x", "--debug"], None),
    ],
)
def test_unknown_override_names_the_first_unknown_field(argv, expected):
    assert cli.unknown_override(argv, SCHEMAS) == expected


def test_one_line_unquotes_key_errors_and_joins_lines():
    assert cli.one_line(KeyError("'hiden' Did you mean 'hidden'?")) == "'hiden' Did you mean 'hidden'?"
    assert cli.one_line(ValueError("a\nb")) == "a b"
    assert cli.one_line(RuntimeError()) == "RuntimeError"


def test_fail_prints_one_line_and_exits_with_the_status(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.fail("prog.py", cli.USAGE_ERROR, ValueError("bad\nvalue"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "prog.py: error: bad value\n"
