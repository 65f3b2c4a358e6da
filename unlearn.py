"""Unlearn forget classes from a trained generative model and write an honest, reproducible report.

Usage (the README's main job; trains what is missing through the same code as ``train.py``, then unlearns digit 1
from the protocol VAE by every default method and prints the table):

  python unlearn.py --config configs/unlearn_mnist.py --workdir runs/unlearn

Overrides use the config's field names, a contract that user scripts rely on, e.g.
``--config.forget_classes=1,7 --config.methods=sa,s,uno --config.seeds=10 --config.threshold=auto
--config.monitor_samples=1024 --config.max_steps=50 --config.checkpoint=runs/mnist_vae``
(see ``configs/unlearn_mnist.py`` for every field).

Exit status: 0 on success; 2 for a usage or configuration error, an unwritable or full workdir included (one
line on stderr, nothing written);
1 for a failure while running, including a checkpoint found corrupt on disk (one line on stderr). ``--debug``
prints the traceback above that line; the status stays the same.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an unlearning config file (configs/unlearn_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the report, logs, grids and unlearned checkpoints.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")

_PROG = "unlearn.py"
_OVERRIDE = re.compile(r"^--config\.([^=.\s]+)")
_TRAIN_OVERRIDE = re.compile(r"^--config\.train\.([^=.\s]+)")
USAGE_ERROR = 2
RUNTIME_ERROR = 1


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    # KeyError (and ml_collections' AttributeError wrapping one) print their message quoted: unquote once.
    for _ in range(2):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
    # One line keeps scripts' logs greppable.
    return " ".join(text.split())


def _fail(code: int, message: str, *, debug: bool = False) -> None:
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _corrupt_checkpoint_cause(error: BaseException) -> BaseException | None:
    """The ``CheckpointCorruptError`` behind a refusal, if any: damage on disk is a runtime failure, not usage."""
    from gsu_jax.checkpointing import CheckpointCorruptError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CheckpointCorruptError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; any bad flag or config override is a usage error (exit 2, one line)."""
    overrides = [m.group(1) for m in map(_OVERRIDE.match, argv[1:]) if m]
    if overrides:
        from gsu_jax.config_validation import unknown_key_message
        from gsu_jax.unlearning import UNLEARN_SCHEMA

        for name in overrides:
            if name not in UNLEARN_SCHEMA:
                _fail(USAGE_ERROR, unknown_key_message(name, UNLEARN_SCHEMA))
        # --config.train.<field>: the nested train.py config, checked against its own schema for the same hint.
        from gsu_jax.config_validation import TRAIN_SCHEMA

        for name in (m.group(1) for m in map(_TRAIN_OVERRIDE.match, argv[1:]) if m):
            if name not in TRAIN_SCHEMA:
                _fail(USAGE_ERROR, unknown_key_message(name, TRAIN_SCHEMA, prefix="config.train."))
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        # absl's messages for config overrides can span lines; the first one names the flag and the problem.
        _fail(USAGE_ERROR, _one_line(error), debug=any(arg in ("--debug", "--debug=true") for arg in argv))
    raise AssertionError("unreachable")


def main(argv: list[str]) -> None:
    """Validates everything (exit 2 on a bad request, nothing written), then runs (exit 1 on a failure)."""
    if len(argv) > 1:
        _fail(USAGE_ERROR, f"unexpected positional arguments {argv[1:]}; use --config, --workdir, --config.<field>=")
    config = _CONFIG.value
    if not isinstance(config, config_dict.ConfigDict):
        try:
            config.to_dict()  # an unloadable --config holds an object that raises its loading error on any access
        except Exception as error:  # noqa: BLE001 - whatever the config file raised, it is the user's file
            _fail(USAGE_ERROR, f"--config could not be loaded: {_one_line(error)}", debug=_DEBUG.value)
        _fail(USAGE_ERROR, "--config is required (e.g. --config configs/unlearn_mnist.py)")
    if not _WORKDIR.value:
        _fail(USAGE_ERROR, "--workdir is required (e.g. --workdir runs/unlearn)")

    from gsu_jax import unlearning
    from gsu_jax.checkpointing import CheckpointError, WorkdirError

    # orbax logs every checkpoint operation (and read-only opens as warnings); the run prints its own progress.
    logging.set_verbosity(logging.INFO if _DEBUG.value else logging.ERROR)
    if not _DEBUG.value:
        # orbax logs what it cannot read while listing steps (e.g. a damaged _CHECKPOINT_METADATA) on its own; the
        # checkpoint verification reports the same damage in the one error line, naming the file.
        logging.get_absl_handler().addFilter(lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)

    command = " ".join([f"python {_PROG}"] + sys.argv[1:])
    debug = _DEBUG.value
    try:
        plan = unlearning.plan_run(config, _WORKDIR.value, command=command)
    except (ValueError, TypeError, CheckpointError) as error:  # refusals of the request (workdir, checkpoints too)
        corrupt = _corrupt_checkpoint_cause(error)
        if corrupt is not None:
            _fail(RUNTIME_ERROR, f"{type(corrupt).__name__}: {_one_line(error)}", debug=debug)
        _fail(USAGE_ERROR, _one_line(error), debug=debug)
    try:
        report = unlearning.execute(plan)
    except WorkdirError as error:  # an unwritable or full workdir is refused like train.py does: a usage error
        _fail(USAGE_ERROR, _one_line(error), debug=debug)
    except Exception as error:  # noqa: BLE001 - the CLI turns any runtime failure into one line and exit 1
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _fail(RUNTIME_ERROR, f"{type(error).__name__}: {_one_line(error)}{hint}", debug=debug)
    from gsu_jax import parallel

    if parallel.is_main_process():
        print(unlearning.format_summary(report))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
