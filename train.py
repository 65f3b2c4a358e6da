"""Trains the generative model, the evaluator and the guidance classifier of a config (Flax-examples style).

Usage::

    python train.py --config configs/mnist_vae.py --workdir runs/mnist_vae [--config.latent_dim=16 ...]
                    [--overwrite] [--debug]

Re-running with the same workdir resumes each role from its latest checkpoint (or only re-evaluates a finished
one). A workdir holding checkpoints of another config or data is refused unless ``--overwrite``.

Exit status: 0 on success; 2 for usage errors -- a bad flag or config value (unknown fields get a "did you mean"
hint), data that cannot be loaded, an unwritable or full workdir, a workdir of another config or one another run
is using -- printed as one line without a traceback; 1 for runtime failures (a corrupt checkpoint, diverged
training, a disk that filled up mid-run: one line as well; anything unexpected: with its traceback); 130 / 143 after
SIGINT / SIGTERM, which stop the run once the epoch in flight is checkpointed (one line saying what was saved; a
second signal ends it at once). ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from gsu_jax import cli, interrupts, io, parallel, training
from gsu_jax.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    WorkdirError,
)
from gsu_jax.config_validation import TRAIN_SCHEMA
from gsu_jax.schema import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: one checkpoint directory per role, metrics, PNGs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard the workdir's checkpoints of the roles being trained.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show Python tracebacks of expected errors too.")
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py); override fields with --config.<field>=<value>."
)
flags.mark_flags_as_required(["config", "workdir"])

# Refusals of what the user asked for: exit 2. Failures found while running: exit 1. Both print one line.
USAGE_ERRORS = (ConfigError, CheckpointMismatchError, CheckpointNotFoundError, WorkdirError)
RUNTIME_ERRORS = (CheckpointCorruptError, training.TrainingDivergedError, io.WriteError)
_PROGRAM = "train.py"


def _parse_flags(argv: list[str]) -> list[str]:
    return cli.parse_flags(argv, program=_PROGRAM, schemas={"": TRAIN_SCHEMA})


def _saved_checkpoints(workdir: pathlib.Path) -> str:
    """What an interrupted run leaves to resume from: each role's newest checkpoint step, read from the disk."""
    steps = {
        role.name: max(int(step.name) for step in (role / "checkpoints").iterdir() if step.name.isdigit())
        for role in sorted(workdir.iterdir())
        if (role / "checkpoints").is_dir() and any(step.name.isdigit() for step in (role / "checkpoints").iterdir())
    }
    if not steps:
        return f"no checkpoint saved yet in {str(workdir)!r}"
    return f"checkpoints saved in {str(workdir)!r} ({', '.join(f'{role} at step {s}' for role, s in steps.items())})"


def main(argv: list[str]) -> None:
    debug = _DEBUG.value
    if len(argv) > 1:
        cli.fail(
            _PROGRAM, cli.USAGE_ERROR, f"unexpected arguments {argv[1:]}; use --config.<field>=<value>", debug=debug
        )
    # orbax logs every save at INFO; the progress bar and the summary below are the run's output.
    cli.quiet_orbax_logs(debug=debug, verbosity=None if flags.FLAGS["verbosity"].present else logging.WARNING)
    try:
        config = cli.load_config_flag(example="configs/mnist_vae.py")
    except ValueError as err:
        cli.fail(_PROGRAM, cli.USAGE_ERROR, err, debug=debug)
    try:
        with interrupts.stop_at_safe_points():
            results = training.train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except interrupts.Interrupted as err:
        cli.interrupted(_PROGRAM, err, _saved_checkpoints(pathlib.Path(_WORKDIR.value)))
    except USAGE_ERRORS as err:
        cli.fail(_PROGRAM, cli.USAGE_ERROR, err, debug=debug)
    except RUNTIME_ERRORS as err:
        cli.fail(_PROGRAM, cli.RUNTIME_ERROR, err, debug=debug)
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
