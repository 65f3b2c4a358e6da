"""What ``train.py`` and ``unlearn.py`` share as programs: one-line errors with fixed exit statuses, flag parsing
whose every refusal is one line, loading ``--config``, and keeping orbax's own log lines off stderr.

Exit statuses: :data:`USAGE_ERROR` (2) for a request the program refuses before any work (a bad flag, config
value, workdir, checkpoint of another config), :data:`RUNTIME_ERROR` (1) for a failure while running. Either way
the program prints ONE line ``<program>: error: <message>`` (``--debug`` adds the traceback above it), so a
script's log stays greppable.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import flags, logging

from gsu_jax.schema import Field, unknown_key_message

__all__ = [
    "RUNTIME_ERROR",
    "USAGE_ERROR",
    "debug_requested",
    "fail",
    "load_config_flag",
    "one_line",
    "parse_flags",
    "quiet_orbax_logs",
    "unknown_field_refusal",
]

USAGE_ERROR = 2
RUNTIME_ERROR = 1


def one_line(error: BaseException | str) -> str:
    """``error``'s message on one line; a KeyError's quotes (and ml_collections' wrapping of one) removed."""
    text = (error if isinstance(error, str) else str(error)).strip() or type(error).__name__
    for _ in range(2):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
    return " ".join(text.split())


def fail(program: str, status: int, message: BaseException | str, *, debug: bool = False) -> NoReturn:
    """Prints ``<program>: error: <message>`` on one line (the traceback above it under ``debug``) and exits."""
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"{program}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def interrupted(program: str, error: BaseException, saved: str) -> NoReturn:
    """Prints ``<program>: <error>: <saved>; rerun the same command to resume`` on one line and exits with the
    interrupt's status (``error.exit_status``: 130 for SIGINT, 143 for SIGTERM)."""
    print(f"{program}: {error}: {saved}; rerun the same command to resume", file=sys.stderr)
    sys.exit(error.exit_status)


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether ``--debug`` is on the command line (read before absl has parsed it)."""
    return any(arg == "--debug" or arg.lower() in ("--debug=true", "--debug=1") for arg in argv)


# ml_collections' refusal of a key its locked ConfigDict lacks: ``KeyError("'name'\nDid you mean "x" instead of
# "name"?")`` (the second line only when a field is spelt alike).
_LOCKED_KEY_REFUSAL = re.compile(r"""^'(?P<key>[^'\n]+)'(?:\nDid you mean "(?P<suggestion>[^"]+)")?""")


def unknown_field_refusal(
    error: BaseException, argv: Sequence[str], schemas: Mapping[str, Mapping[str, Field]]
) -> str | None:
    """The one-line refusal of an override that ml_collections' locked ConfigDict refused as an unknown key, else
    None (``error`` is something else).

    ml_collections finds the unknown key and its "did you mean"; this only names the dotted field the user wrote
    and, where no field is spelt alike, lists the known ones from ``schemas`` (dotted prefix below ``config.`` ->
    the schema of the fields under it, ``""`` the config itself, e.g. ``{"": UNLEARN_SCHEMA, "train.":
    TRAIN_SCHEMA}``).
    """
    if not isinstance(error, (KeyError, AttributeError)) or not error.args:
        return None
    match = _LOCKED_KEY_REFUSAL.match(str(error.args[0]))
    if match is None:
        return None
    key = match["key"]
    for arg in argv[1:]:
        parts = arg.removeprefix("--config.").split("=", 1)[0].split(".")
        if arg.startswith("--config.") and key in parts:
            path = ".".join(parts[: parts.index(key)])
            prefix = f"{path}." if path else ""
            break
    else:
        return None
    if match["suggestion"]:
        return f"config.{prefix}{key} is not a known field; did you mean {match['suggestion']!r}?"
    if prefix not in schemas:  # a model's own kwargs (model_kwargs.*): no schema here lists them
        return f"config.{prefix}{key} is not a known field"
    return unknown_key_message(key, schemas[prefix], prefix=f"config.{prefix}")


def parse_flags(argv: list[str], *, program: str, schemas: Mapping[str, Mapping[str, Field]]) -> list[str]:
    """absl's flag parsing for ``app.run(flags_parser=...)``, every refusal one line with exit status 2.

    absl alone exits 1 with a multi-line message; an override of an unknown field, which ml_collections' locked
    ConfigDict refuses, is reported by :func:`unknown_field_refusal` as the dotted field with the hint.
    """
    debug = debug_requested(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(program, USAGE_ERROR, error, debug=debug)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # config_flags wraps a bad nested override's ml_collections error: unwrap it to its own text.
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        refusal = unknown_field_refusal(error, argv, schemas)
        if refusal is not None:
            fail(program, USAGE_ERROR, refusal, debug=debug)
        overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        fail(
            program,
            USAGE_ERROR,
            f"bad override among {', '.join(overrides) or '--config'}: {one_line(error)}",
            debug=debug,
        )
    except Exception as error:  # the config file itself failed to load (a syntax error, an import error, ...)
        fail(program, USAGE_ERROR, f"--config cannot be loaded: {type(error).__name__}: {error}", debug=debug)


def load_config_flag(*, example: str, flag_name: str = "config") -> ml_collections.ConfigDict:
    """The ConfigDict that ``config_flags.DEFINE_config_file(flag_name)`` loaded, or a one-line usage refusal.

    config_flags keeps a failure to load the file (a syntax error, a missing ``get_config``) for the first access
    of the value; this access turns it into a ``ValueError`` naming the file and the cause.
    """
    from ml_collections import config_flags

    holder = flags.FLAGS[flag_name]
    if not holder.present:
        raise ValueError(f"--{flag_name} is required (e.g. --{flag_name} {example})")
    path = config_flags.get_config_filename(holder)
    if not os.path.isfile(path):
        raise ValueError(f"--{flag_name}={path}: no such file; allowed: a config file such as {example}")
    config = holder.value
    if isinstance(config, ml_collections.ConfigDict):
        return config
    try:
        config.to_dict()
    except Exception as error:  # whatever the user's config file raised while loading
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"--{flag_name}={path} cannot be loaded: {lines[-1] if lines else error}") from error
    raise ValueError(f"--{flag_name}={path} did not give an ml_collections.ConfigDict")


def _not_from_orbax(record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs(*, debug: bool, verbosity: Any = None) -> None:
    """Keeps orbax's per-save INFO lines and its own complaints off stderr unless ``debug``.

    orbax logs what it cannot read while listing steps (e.g. a damaged ``_CHECKPOINT_METADATA``); the programs'
    checkpoint verification reports the same damage in their one error line, naming the file.
    """
    if verbosity is not None:
        logging.set_verbosity(verbosity)
    if not debug:
        logging.get_absl_handler().addFilter(_not_from_orbax)
