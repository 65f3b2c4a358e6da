"""The shared command-line helpers: the refusal of an unknown override, and one-line messages."""

from __future__ import annotations

import pathlib

import pytest

from gsu_jax import cli
from gsu_jax.config_validation import TRAIN_SCHEMA
from gsu_jax.unlearning import UNLEARN_SCHEMA

SCHEMAS = {"": UNLEARN_SCHEMA, "train.": TRAIN_SCHEMA}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _locked_refusal(argv):
    """What ml_collections raises for the overrides in ``argv`` on the unlearn config (None: accepted)."""
    from gsu_jax.config_validation import load_config_file

    config = load_config_file(ROOT / "configs" / "unlearn_mnist.py")
    config.lock()
    for arg in argv[1:]:
        if arg.startswith("--config."):
            *parents, last = arg.removeprefix("--config.").split("=", 1)[0].split(".")
            node = config
            try:
                for name in parents:
                    node = node[name]
                node[last] = node[last]
            except (KeyError, AttributeError) as error:
                return error
    return None


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["p", "--config.methdos=sa"], "config.methdos is not a known field; did you mean 'methods'?"),
        (
            ["p", "--config.train.latnt_dim=3"],
            "config.train.latnt_dim is not a known field; did you mean 'latent_dim'?",
        ),
        (["p", "--config.qqqqzz=3"], "config.qqqqzz is not a known field; known fields: batch_size, checkpoint,"),
        (["p", "--config.train.model_kwargs.hiden=3"], "config.train.model_kwargs.hiden is not a known field; did"),
    ],
)
def test_an_unknown_override_is_refused_by_ml_collections_and_named_in_one_line(argv, expected):
    error = _locked_refusal(argv)
    assert error is not None, "ml_collections' locked ConfigDict accepted an unknown key"
    assert cli.unknown_field_refusal(error, argv, SCHEMAS).startswith(expected)


def test_other_errors_are_not_taken_for_unknown_fields():
    assert cli.unknown_field_refusal(ValueError("'x'"), ["p", "--config.x=1"], SCHEMAS) is None
    assert cli.unknown_field_refusal(KeyError("no quotes"), ["p", "--config.x=1"], SCHEMAS) is None


def test_one_line_unquotes_key_errors_and_joins_lines():
    assert cli.one_line(KeyError("'hiden' Did you mean 'hidden'?")) == "'hiden' Did you mean 'hidden'?"
    assert cli.one_line(ValueError("a\nb")) == "a b"
    assert cli.one_line(RuntimeError()) == "RuntimeError"


def test_fail_prints_one_line_and_exits_with_the_status(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.fail("prog.py", cli.USAGE_ERROR, ValueError("bad\nvalue"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "prog.py: error: bad value\n"
