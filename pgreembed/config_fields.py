"""Validation of config fields: every error names the field and what is wrong with it.

Shared by the sections of the config (targets, worker, throttle), so each section's
parser stays in the module of its concern.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pgreembed.errors import ConfigError


def reject_unknown(given: Mapping[str, Any], known: tuple[str, ...], where: str,
                   what: str = "field") -> None:
    """Refuse keys that are not in `known`, naming the closest valid one (a typo that
    is silently ignored runs with the default the user meant to change)."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hints.append(f"{key} (did you mean {near[0]!r}?)" if near else key)
    raise ConfigError(f"{where}: unknown {what}(s) {', '.join(hints)};"
                      f" valid: {', '.join(known)}")


def require(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return typed(table[key], kind, f"{where}.{key}")


def typed(value: Any, kind: type, where: str) -> Any:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{where}: must be a number, got {value!r}")
    if kind in (str, bool) and not isinstance(value, kind):
        raise ConfigError(f"{where}: must be a {kind.__name__}, got {value!r}")
    if kind is str and not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    return value


def non_negative_seconds(value: Any, where: str) -> float:
    seconds = float(typed(value, float, where))
    if seconds < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value!r}")
    return seconds


def positive(value: int, where: str, maximum: int | None = None) -> int:
    if value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: must be <= {maximum}, got {value}")
    return value


def optional_positive(table: Mapping[str, Any], key: str, where: str) -> int | None:
    if table.get(key) is None:
        return None
    return positive(typed(table[key], int, f"{where}.{key}"), f"{where}.{key}")


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer from the environment (`name` unset or empty: `default`)."""
    try:
        return positive(int(env.get(name) or default), name)
    except ValueError:
        raise ConfigError(f"{name}: must be a positive integer, got {env[name]!r}") from None
