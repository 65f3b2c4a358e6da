"""Unlearn forget classes (or any set of training examples, ``--config.forget=``) from a trained generative model and write an honest, reproducible report.

Usage (the README's main job; trains what is missing through the same code as ``train.py``, then unlearns digit 1
from the protocol VAE by every default method and prints the table):

  python unlearn.py --config configs/unlearn_mnist.py --workdir runs/unlearn

Overrides use the config's field names, a contract that user scripts rely on, e.g.
``--config.forget_classes=1,7`` (or ``--config.forget=fraction:0.01`` / ``indices:<file>``) ``--config.methods=sa,s,uno --config.seeds=10 --config.threshold=auto
--config.monitor_samples=1024 --config.max_steps=50 --config.checkpoint=runs/mnist_vae``
(see ``configs/unlearn_mnist.py`` for every field).

Exit status: 0 on success; 2 for a usage or configuration error, an unwritable or full workdir or one another run
is using included (one line on stderr, nothing written); 1 for a failure while running, including a checkpoint
found corrupt on disk or a disk that filled up mid-run (one line on stderr); 130 / 143 after SIGINT / SIGTERM,
which abandon the (method, seed) run in flight, or save it with ``checkpoint_every_steps`` (one line saying what
was saved; a second signal ends the process at once). ``--debug`` prints the traceback above that line; the
status stays the same.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gsu_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an unlearning config file (configs/unlearn_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the report, logs, grids and unlearned checkpoints.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")

_PROGRAM = "unlearn.py"


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
    # Imported here so `--help` and flag errors do not wait for JAX.
    from gsu_jax.config_validation import TRAIN_SCHEMA
    from gsu_jax.unlearning import UNLEARN_SCHEMA

    # --config.train.<field>: the nested train.py config, checked against its own schema for the same hint.
    return cli.parse_flags(argv, program=_PROGRAM, schemas={"": UNLEARN_SCHEMA, "train.": TRAIN_SCHEMA})


def main(argv: list[str]) -> None:
    """Validates everything (exit 2 on a bad request, nothing written), then runs (exit 1 on a failure)."""
    debug = _DEBUG.value
    if len(argv) > 1:
        cli.fail(_PROGRAM, cli.USAGE_ERROR, f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    try:
        config = cli.load_config_flag(example="configs/unlearn_mnist.py")
    except ValueError as error:
        cli.fail(_PROGRAM, cli.USAGE_ERROR, error, debug=debug)
    if not _WORKDIR.value:
        cli.fail(_PROGRAM, cli.USAGE_ERROR, "--workdir is required (e.g. --workdir runs/unlearn)")

    from gsu_jax import interrupts, io, unlearning
    from gsu_jax.checkpointing import CheckpointError, WorkdirError

    # orbax logs every checkpoint operation (and read-only opens as warnings); the run prints its own progress.
    cli.quiet_orbax_logs(debug=debug, verbosity=logging.INFO if debug else logging.ERROR)

    command = " ".join([f"python {_PROGRAM}"] + sys.argv[1:])
    try:
        plan = unlearning.plan_run(config, _WORKDIR.value, command=command)
    except (ValueError, TypeError, CheckpointError) as error:  # refusals of the request (workdir, checkpoints too)
        corrupt = _corrupt_checkpoint_cause(error)
        if corrupt is not None:
            cli.fail(_PROGRAM, cli.RUNTIME_ERROR, f"{type(corrupt).__name__}: {cli.one_line(error)}", debug=debug)
        cli.fail(_PROGRAM, cli.USAGE_ERROR, error, debug=debug)
    try:
        with interrupts.stop_at_safe_points():
            report = unlearning.execute(plan)
    except interrupts.Interrupted as error:
        saved = sorted(plan.workdir.glob("results/*/seed_*.json"))
        in_flight = "saved to resume from" if any(plan.workdir.glob("inflight/*/seed_*/*")) else "abandoned"
        cli.interrupted(
            _PROGRAM,
            error,
            f"{len(saved)} finished (method, seed) run(s) saved in {str(plan.workdir / 'results')!r}, the run in "
            f"flight {in_flight}",
        )
    except WorkdirError as error:  # an unwritable or full workdir is refused like train.py does: a usage error
        cli.fail(_PROGRAM, cli.USAGE_ERROR, error, debug=debug)
    except io.WriteError as error:  # the disk filled up mid-run: what was saved stays; free space and re-run
        cli.fail(_PROGRAM, cli.RUNTIME_ERROR, f"{error}; free space and rerun the same command to resume", debug=debug)
    except Exception as error:  # noqa: BLE001 - the CLI turns any runtime failure into one line and exit 1
        hint = "" if debug else " (rerun with --debug for the traceback)"
        cli.fail(_PROGRAM, cli.RUNTIME_ERROR, f"{type(error).__name__}: {cli.one_line(error)}{hint}", debug=debug)
    from gsu_jax import parallel

    if parallel.is_main_process():
        print(unlearning.format_summary(report))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
