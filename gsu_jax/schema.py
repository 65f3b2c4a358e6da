"""The one config schema: typed fields with their allowed values, and one-line refusals of anything else.

A schema maps a field name to a :class:`Field`: its default, its type, what values are allowed (a predicate plus
the sentence that says it), whether ``None`` is allowed, and its *scope* (which trained roles its value influences,
how a checkpoint decides whether a workdir may be resumed under a new config). The same :class:`Field` describes
``train.py``'s fields (:mod:`gsu_jax.config_validation`), ``unlearn.py``'s (:mod:`gsu_jax.unlearning`) and every
method hyperparameter (:mod:`gsu_jax.methods`), and :func:`check_value` validates each value, once, at the entry.

Every refusal is ONE line naming the field, the value and what is allowed, e.g.::

    config.latent_dim=0 is invalid: allowed: an integer >= 1
    config.latnt_dim is not a known field; did you mean 'latent_dim'?

Example:
    >>> schema = {"latent_dim": Field(2, int, "an integer >= 1", at_least(1), "generative", "latent size")}
    >>> validate_config({"latent_dim": 16}, schema)
    {'latent_dim': 16}
    >>> validate_config({"latent_dim": 0}, schema)
    Traceback (most recent call last):
    ...
    gsu_jax.schema.ConfigError: config.latent_dim=0 is invalid: allowed: an integer >= 1
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "REQUIRED",
    "SCOPES",
    "ConfigError",
    "Field",
    "as_mapping",
    "at_least",
    "check_value",
    "did_you_mean",
    "dotted_name",
    "greater_than",
    "one_of",
    "unknown_key_message",
    "validate_config",
    "within",
]

# Which roles a field's value influences:
#   all        -- every role's parameters (e.g. the seed);
#   generative -- the generative model only; classifier -- the evaluator and the guidance classifier only;
#   data       -- which examples a role trains on: compared through the fingerprint of those examples, so moving
#                 the same files elsewhere keeps a workdir resumable while different digits are refused;
#   run        -- how the run is carried out, never its result (checkpoint interval, progress bar, roles).
SCOPES: tuple[str, ...] = ("all", "generative", "classifier", "data", "run")


class _Required:
    """The default of a field that has none: the caller must give a value."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()

_MAX_LISTED = 12


class ConfigError(ValueError):
    """A config field (or command-line override) is unknown, of the wrong type or out of range.

    The message is one line naming the field, the value and what is allowed; ``train.py`` prints it and exits
    with status 2.
    """


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field of a schema.

    Attributes:
        default: the value a config starts from (its type fixes the type ``--config.x=...`` overrides are parsed
            as); :data:`REQUIRED` when the caller must give one.
        kind: the accepted Python type: ``int`` (any integer but ``bool``, converted to ``int``), ``float`` (any
            real number but ``bool``, converted to ``float``), ``str``, ``bool`` or ``dict`` (a nested mapping of
            keyword arguments, checked elsewhere).
        allowed: the sentence a refusal prints after "allowed:", e.g. ``"an integer >= 1"``.
        check: predicate on the type-checked value; ``None`` accepts every value of the right type.
        scope: one of :data:`SCOPES`.
        help: what the field means.
        optional: a config without the field takes its default instead of being refused as incomplete: for
            fields added after checkpoints were written (their saved configs lack them) that never change results.
        nullable: ``None`` is a value of its own (e.g. "no annealing"), accepted without ``check``.
        finite: for ``float`` fields, NaN and infinities are refused (a method's "+inf: never" turns it off).
    """

    default: Any
    kind: type
    allowed: str
    check: Callable[[Any], bool] | None
    scope: str
    help: str
    optional: bool = False
    nullable: bool = False
    finite: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (int, float, str, bool, dict):
            raise TypeError(f"Field.kind must be int, float, str, bool or dict, got {self.kind!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"Field.scope must be one of {SCOPES}, got {self.scope!r}")


# ------------------------------------------------------------------------------------------- predicates


def at_least(low: float) -> Callable[[Any], bool]:
    """Predicate ``value >= low``."""
    return lambda value: value >= low


def greater_than(low: float) -> Callable[[Any], bool]:
    """Predicate ``value > low``."""
    return lambda value: value > low


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """Predicate ``low <= value <= high``; ``low_open``/``high_open`` make the ends strict."""

    def check(value: Any) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return check


def one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    """Predicate ``value in choices``."""
    return lambda value: value in choices


HOST_PORT_ALLOWED = "'host:port' with a port in 1..65535, e.g. '10.0.0.1:1234'"


def is_host_port(value: Any) -> bool:
    """Predicate: ``value`` is ``'host:port'`` (IPv6 hosts in brackets) with a port in 1..65535 (the one rule for a
    coordinator address, used by the config schema and by :func:`gsu_jax.parallel.initialize_distributed`)."""
    if not isinstance(value, str):
        return False
    host, _, port = value.rpartition(":")
    return bool(re.fullmatch(r"\[?[A-Za-z0-9_.:-]+\]?", host)) and port.isdigit() and 0 < int(port) < 65536


# ------------------------------------------------------------------------------------------- validation


def did_you_mean(name: Any, known: Any) -> str:
    if not isinstance(name, str):  # a plain mapping may hold keys of any type; no field is spelt like them
        return ""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def dotted_name(prefix: str, name: Any) -> str:
    """``prefix + name`` for a plain name; ``prefix[repr(name)]`` for any other key (one that could span lines or
    is not a string), so that a refusal stays one line."""
    if isinstance(name, str) and name.isidentifier():
        return f"{prefix}{name}"
    return f"{prefix.rstrip('.')}[{name!r}]"


def unknown_key_message(name: str, known: Any, *, prefix: str = "config.") -> str:
    """The one-line refusal of an unknown field, with a "did you mean" hint (or the known names)."""
    hint = did_you_mean(name, known)
    if hint:
        return f"{dotted_name(prefix, name)} is not a known field{hint}"
    listed = sorted(known)
    shown = ", ".join(listed[:_MAX_LISTED]) + (f", ... ({len(listed)} in all)" if len(listed) > _MAX_LISTED else "")
    return f"{dotted_name(prefix, name)} is not a known field; known fields: {shown}"


def _is_config_dict(value: Any) -> bool:
    """Whether ``value`` is an ``ml_collections.ConfigDict``, without importing ml_collections: the method registry
    uses this module on the GPU image, which lacks it (a ConfigDict exists only where it was imported)."""
    module = sys.modules.get("ml_collections")
    return module is not None and isinstance(value, module.ConfigDict)


def as_mapping(config: Any) -> dict[str, Any]:
    """A plain dict of a ConfigDict's or mapping's top-level fields."""
    if _is_config_dict(config):
        return dict(config.items())
    if isinstance(config, Mapping):
        return dict(config)
    raise ConfigError(f"config must be an ml_collections.ConfigDict or a mapping, got {type(config).__name__}")


def _typed(name: str, value: Any, field: Field, prefix: str) -> Any:
    """``value`` converted to ``field.kind``, or the one-line refusal of its type."""

    def refuse() -> ConfigError:
        return ConfigError(
            f"{prefix}{name}={value!r} is invalid: expected {field.kind.__name__}, got "
            f"{type(value).__name__}; allowed: {field.allowed}"
        )

    if field.kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise refuse()
        return bool(value)
    if field.kind is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise refuse()
        return int(value)
    if field.kind is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise refuse()
        if field.finite and not math.isfinite(value):
            raise ConfigError(f"{prefix}{name}={value!r} is invalid: not finite; allowed: {field.allowed}")
        if math.isnan(value):
            raise ConfigError(f"{prefix}{name}={value!r} is invalid: NaN; allowed: {field.allowed}")
        return float(value)
    if field.kind is str:
        if not isinstance(value, str):
            raise refuse()
        return value
    # dict
    if _is_config_dict(value):
        return value.to_dict()
    if not isinstance(value, Mapping):
        raise refuse()
    return dict(value)


def check_value(name: str, value: Any, field: Field, *, prefix: str = "config.") -> Any:
    """The validated value of one field (converted to its kind), or a one-line :class:`ConfigError`.

    Args:
        name: the field's name, as messages print it after ``prefix``.
        value: the candidate value.
        field: the field's :class:`Field`.
        prefix: how the field is named in messages (``"config."`` matches the ``--config.x`` flags).
    """
    if value is None and field.nullable:
        return None
    if value is REQUIRED:
        raise ConfigError(f"{prefix}{name} is required and has no default; allowed: {field.allowed}")
    value = _typed(name, value, field, prefix)
    if field.check is not None and not field.check(value):
        raise ConfigError(f"{prefix}{name}={value!r} is invalid: allowed: {field.allowed}")
    return value


def validate_config(config: Any, schema: Mapping[str, Field], *, prefix: str = "config.") -> dict[str, Any]:
    """Checks ``config`` against ``schema`` field by field, before any work.

    Args:
        config: a ConfigDict or mapping.
        schema: field name -> :class:`Field`.
        prefix: how fields are named in messages (``"config."`` matches the ``--config.x`` flags).

    Returns:
        A plain dict of the validated values (ints as int, floats as float, nested mappings as dicts).

    Raises:
        ConfigError: an unknown field (with a "did you mean" hint), a missing field (an ``optional`` one takes its
            default), a value of the wrong type,
            or a value outside what the field allows. One line each.
    """
    values = as_mapping(config)
    for name in values:
        if name not in schema:
            raise ConfigError(unknown_key_message(name, schema, prefix=prefix))
    values.update({name: field.default for name, field in schema.items() if field.optional and name not in values})
    missing = [name for name in schema if name not in values]
    if missing:
        raise ConfigError(
            f"{prefix}{missing[0]} is missing; every field of the schema must be set "
            f"(start from gsu_jax.config_validation.default_train_config())"
        )
    return {name: check_value(name, values[name], field, prefix=prefix) for name, field in schema.items()}
