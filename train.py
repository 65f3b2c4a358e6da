"""Trains the generative model, the evaluator and the guidance classifier of a config (Flax-examples style).

Usage::

    python train.py --config configs/mnist_vae.py --workdir runs/mnist_vae [--config.latent_dim=16 ...]
                    [--overwrite] [--debug]

Re-running with the same workdir resumes each role from its latest checkpoint (or only re-evaluates a finished
one). A workdir holding checkpoints of another config or data is refused unless ``--overwrite``.

Exit status: 0 on success; 2 for usage errors -- a bad flag or config value (unknown fields get a "did you mean"
hint), data that cannot be loaded, an unwritable or full workdir, a workdir of another config -- printed as one
line without a traceback; 1 for runtime failures (a corrupt checkpoint, diverged training: one line as well;
anything unexpected: with its traceback). ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import re
import sys
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from gsu_jax import parallel, training
from gsu_jax.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    WorkdirError,
)
from gsu_jax.config_validation import TRAIN_SCHEMA, ConfigError, unknown_key_message

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: one checkpoint directory per role, metrics, PNGs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard the workdir's checkpoints of the roles being trained.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show Python tracebacks of expected errors too.")
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py); override fields with --config.<field>=<value>."
)
flags.mark_flags_as_required(["config", "workdir"])

# Refusals of what the user asked for: exit 2. Failures found while running: exit 1. Both print one line.
USAGE_ERRORS = (ConfigError, CheckpointMismatchError, CheckpointNotFoundError, WorkdirError)
RUNTIME_ERRORS = (CheckpointCorruptError, training.TrainingDivergedError)
_OVERRIDE = re.compile(r"^--config\.([^=.\s]+)")


def _fail(message: str, status: int, *, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"train.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def _not_from_orbax(record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every refusal as ONE line and exit status 2 (absl alone exits 1)."""
    debug = any(arg == "--debug" or arg.lower() in ("--debug=true", "--debug=1") for arg in argv)
    for arg in argv[1:]:
        match = _OVERRIDE.match(arg)
        if match and match.group(1) not in TRAIN_SCHEMA:
            _fail(unknown_key_message(match.group(1), TRAIN_SCHEMA), 2, debug=debug)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _fail(str(err), 2, debug=debug)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # config_flags reports a bad nested override (--config.model_kwargs.hiden=3) with ml_collections' own
        # KeyError, wrapped: unwrap it to its text ("'hiden' Did you mean "hidden" instead of "hiden"?").
        unknown = isinstance(err, (AttributeError, KeyError))
        while err.args and isinstance(err.args[0], BaseException):
            err = err.args[0]
        text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        _fail(
            f"bad override among {', '.join(overrides) or '--config'}: {'unknown field ' if unknown else ''}{text}",
            2,
            debug=debug,
        )
    except Exception as err:  # the config file itself failed to load (syntax error, import error, ...)
        _fail(f"--config cannot be loaded: {type(err).__name__}: {err}", 2, debug=debug)
    raise AssertionError("unreachable")


def _load_config() -> ml_collections.ConfigDict:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(path):
        raise ConfigError(f"--config={path}: no such file; allowed: a config file such as configs/mnist_vae.py")
    config = flags.FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
        # config_flags keeps a failure to load the file (syntax error, missing get_config) for the first access.
        try:
            config.to_dict()
        except Exception as err:  # whatever the config file raised while loading
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise ConfigError(f"--config={path} cannot be loaded: {lines[-1] if lines else err}") from err
        raise ConfigError(f"--config={path} did not give an ml_collections.ConfigDict")
    return config


def main(argv: list[str]) -> None:
    debug = _DEBUG.value
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> for overrides", 2, debug=debug)
    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save at INFO; the progress bar and the summary below are the run's output.
        logging.set_verbosity(logging.WARNING)
    if not debug:
        # orbax logs what it cannot read while listing steps (e.g. a damaged _CHECKPOINT_METADATA) on its own; the
        # verification here reports the same damage in its one line, naming the file.
        logging.get_absl_handler().addFilter(_not_from_orbax)
    try:
        config = _load_config()
        results = training.train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except USAGE_ERRORS as err:
        _fail(str(err), 2, debug=debug)
    except RUNTIME_ERRORS as err:
        _fail(str(err), 1, debug=debug)
    if not parallel.is_main_process():
        return
    for role, metrics in results.items():
        if "heldout_neg_elbo" in metrics:
            headline = (
                f"held-out -ELBO {metrics['heldout_neg_elbo']:.2f} (reconstruction "
                f"{metrics['heldout_reconstruction']:.2f} + KL {metrics['heldout_kl']:.2f}); "
                f"samples: {metrics['samples_png']}"
            )
        elif "heldout_eps_loss" in metrics:
            headline = (
                f"held-out epsilon MSE {metrics['heldout_eps_loss']:.4f} (one random timestep per "
                f"example); samples: {metrics['samples_png']}"
            )
        else:
            headline = f"held-out accuracy {metrics['heldout_accuracy']:.4f}"
        resumed = "" if metrics["resumed_from_step"] is None else f", resumed from step {metrics['resumed_from_step']}"
        if metrics["skipped_checkpoints"]:
            resumed += (
                f" (skipped corrupt step {', '.join(str(item['step']) for item in metrics['skipped_checkpoints'])}"
                f", moved to {pathlib.Path(metrics['skipped_checkpoints'][0]['moved_to']).parent})"
            )
        print(
            f"{role}: {headline} [{metrics['num_train']} train / {metrics['num_heldout']} held-out "
            f"({metrics['heldout_data']}), {metrics['steps']} steps{resumed}, {metrics['seconds']:.1f} s]"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
