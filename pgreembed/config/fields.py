"""Config fields declared once; every error names the field and what is wrong with it.

A setting is a field of a settings dataclass (`Settings`, `Target`, `ThrottleSettings`,
`SideFillSettings`) declared with `setting(default, check=..., env=...)`: its name is the
TOML key, its annotation the type, and `read_declared` reads a TOML table by those
declarations (type, then check; a missing key gives the default). The checks below are
shared by every section, so each section's module holds only its own rules.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


Check = Callable[[Any, str], Any]  # (value, "section.key") -> the value, or ConfigError
SETTING = "pgreembed.setting"  # the dataclass field metadata key `setting` writes
_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class Spec:
    """How one setting is read: its check, and the environment variable that sets it."""

    check: Check | None = None
    env: Any = None  # a pgreembed.config.environment.EnvVar
    typed: bool = True  # False: `check` types the value itself


def setting(default: Any, *, check: Check | None = None, env: Any = None,
            typed: bool = True) -> Any:
    """Declare a settings dataclass field as a config key: its name is the TOML key, its
    annotation the type, `default` the default (a missing key gives it unchecked), `check`
    what else it must satisfy, `env` the environment variable that gives it instead."""
    return dataclasses.field(default=default, metadata={SETTING: Spec(check, env, typed)})


@dataclass(frozen=True)
class Field:
    """One declared setting, as read from a table: see `setting`."""

    key: str
    kind: type | None
    default: Any
    spec: Spec

    def read(self, table: Mapping[str, Any], where: str) -> Any:
        value = table.get(self.key)
        if value is None:  # TOML has no null: the key is missing
            return self.default
        path = f"{where}.{self.key}"
        if self.kind is not None and self.spec.typed:
            value = typed(value, self.kind, path)
        if self.spec.check is not None:
            value = self.spec.check(value, path)
        return float(value) if self.kind is float else value


def _kind(annotation: str) -> type | None:
    """int for "int" or "int | None"; None for anything else (a tuple, a mapping)."""
    names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
    return _KINDS.get(names[0]) if len(names) == 1 else None


def declared(cls: type) -> dict[str, Field]:
    """The settings `cls` (a dataclass) declares with `setting`, in declaration order."""
    return {f.name: Field(f.name, _kind(str(f.type)), f.default, f.metadata[SETTING])
            for f in dataclasses.fields(cls) if SETTING in f.metadata}


def read_declared(cls: type, table: Mapping[str, Any], where: str,
                  env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{name: value} of every setting `cls` declares: from the environment variable when
    it has one (`env`), else from `table`."""
    found = {}
    for name, spec in declared(cls).items():
        if spec.spec.env is not None:
            if env is not None:
                found[name] = spec.spec.env.positive_int(env, spec.default)
        else:
            found[name] = spec.read(table, where)
    return found


def table_keys(cls: type) -> tuple[str, ...]:
    """The TOML keys `cls` declares (environment-only settings excluded), in order."""
    return tuple(name for name, spec in declared(cls).items() if spec.spec.env is None)


def positive_number(value: Any, where: str) -> Any:
    """Check: > 0 (the value's type already checked)."""
    return positive(value, where)


def at_most(maximum: int) -> Check:
    """Check: > 0 and <= `maximum`."""
    return lambda value, where: positive(value, where, maximum=maximum)


def within(low: int, high: int) -> Check:
    """Check: `low` <= value <= `high`."""
    def check(value: Any, where: str) -> Any:
        if not low <= value <= high:
            raise ConfigError(f"{where}: must be between {low} and {high}, got {value!r}")
        return value
    return check


def non_negative(value: Any, where: str) -> float:
    """Check: >= 0 (a number of seconds, say)."""
    return non_negative_seconds(value, where)


def one_of(choices: tuple[str, ...]) -> Check:
    """Check: one of `choices`."""
    def check(value: Any, where: str) -> Any:
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    return check
