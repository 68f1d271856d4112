"""Settings: one object for every process, from a TOML file and the environment.

The environment carries where things are and the secrets (DATABASE_URL,
REDIS_URL, OPENAI_API_KEY, OPENAI_BASE_URL; see config/environment.py); the TOML file
carries what to embed (tables, columns, models), which is reviewed like code. Every
validation error names the field and what is wrong with it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgreembed.config import environment
from pgreembed.config.fields import (
    non_negative,
    positive_number,
    read_declared,
    reject_unknown,
    setting,
    table_keys,
    within,
)
from pgreembed.config.fields import optional_positive as _optional_positive
from pgreembed.config.providers import secrets as provider_secrets
from pgreembed.config.side_fill import SIDE_FILL_KEYS, SideFillSettings, parse_side_fill
from pgreembed.config.target import TARGET_KEYS, Target, parse_target
from pgreembed.config.throttle import ThrottleSettings, parse_throttle
from pgreembed.errors import ConfigError
from pgreembed.observability.redact import register_configured_secrets


@dataclass(frozen=True)
class Budget:
    """Requests and tokens per minute one model may be sent (None: not limited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __bool__(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def tighter(self, other: Budget) -> Budget:
        """Both budgets at once: the smaller value of each limit."""
        def smaller(a: int | None, b: int | None) -> int | None:
            return min(a, b) if a and b else a or b

        return Budget(smaller(self.requests_per_minute, other.requests_per_minute),
                      smaller(self.tokens_per_minute, other.tokens_per_minute))


# `[worker] kept_memory_mb`'s default: 16 (docs/performance.md, eighth pass: ~7.5 MB a
# statement through HNSW at 1536 dims, m 16, ef_construction 64; room for wider graphs).
KEPT_MEMORY_MB = 16
# Its bound: glibc raises no threshold for a block of 32 MB or more (store.session).
KEPT_MEMORY_MAX_MB = 31


@dataclass(frozen=True)
class Settings:
    """Everything a process needs; built once at start-up."""

    database_url: str
    redis_url: str
    targets: Mapping[str, Target]
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    # `[worker]`: one table for the scheduler and the workers (WORKER_KEYS, in this order).
    poll_interval: float = setting(1.0, check=positive_number)
    # After a NOTIFY wakes the scheduler it waits this long for more rows before a pass:
    # a steady stream of inserts then goes out in batches, not one request per row.
    linger_seconds: float = setting(0.25, check=non_negative)
    max_inflight_rows: int = setting(2048, check=positive_number)
    lease_seconds: int = setting(3600, check=positive_number)
    request_timeout: float = setting(60.0, check=positive_number)
    # How long one batch retries a failing provider in-process before the message is
    # handed to Dramatiq's retries (which free the worker thread meanwhile).
    provider_retry_seconds: float = setting(300.0, check=positive_number)
    pool_max_size: int = setting(4, check=positive_number)
    # Server-side prepared statements for the write path's statements (store.pool). Off
    # by default: behind a pooler in transaction mode that does not carry them (PgBouncer
    # without max_prepared_statements, Supavisor's transaction mode) a statement name can
    # stand for another of pgreembed's statements on another server connection.
    prepared_statements: bool = setting(False)
    # MB each pooled connection (and `migrate batch`'s) allocates and frees once when it
    # opens, so its backend keeps a statement's freed memory for the next one instead of
    # returning it to the OS (store.session.keep_freed_memory): small write slices
    # through an HNSW index stop faulting their few MB in again. The backend may hold
    # about twice this much it freed; 0 turns it off.
    kept_memory_mb: int = setting(KEPT_MEMORY_MB, check=within(0, KEPT_MEMORY_MAX_MB))
    # How long one batch retries its write through a database-wide fault (disk full,
    # read-only, connection lost) in-process before keeping its vectors in Redis and
    # handing the message to Dramatiq's retries.
    write_retry_seconds: float = setting(120.0, check=positive_number)
    # How long a batch's write may hold the app's rows: it commits in slices sized by the
    # time per row measured on the column (store.write_slices). Through an HNSW index a
    # non-HOT row costs 1-5 ms, and a 512-row batch held its rows for seconds.
    max_row_lock_ms: float = setting(50.0, check=positive_number)
    # Dramatiq's back-off before a failed message's first retry; each later retry doubles
    # it (4 retries, at most 120 s apart). Short in tests, where the provider is local.
    retry_backoff_seconds: float = setting(2.0, check=positive_number)
    # Dramatiq's Redis broker: how soon a killed worker's messages come back
    # ($PGREEMBED_HEARTBEAT_MS) and how often commands run its maintenance pass.
    heartbeat_ms: int = setting(10_000, env=environment.HEARTBEAT_MS)
    maintenance_chance: int = setting(100_000, env=environment.MAINTENANCE_CHANCE)
    config_path: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # `[rate_limits."<model>"]`: budgets of openai models, whichever column they fill.
    rate_limits: Mapping[str, Budget] = field(default_factory=dict)
    side_fill: SideFillSettings = field(default_factory=SideFillSettings)  # [side_fill]
    # `[throttle]`: rows/s cap and adaptive back-off of the writes (config/throttle.py).
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)

    def target(self, name: str) -> Target:
        try:
            return self.targets[name]
        except KeyError:
            known = ", ".join(sorted(self.targets)) or "none"
            raise ConfigError(f"unknown target {name!r} (configured: {known})") from None


# Every key a section may hold: anything else is a typo, refused with the nearest name.
TOP_LEVEL_KEYS = ("target", "defaults", "worker", "rate_limits", "throttle", "database_url",
                  "redis_url", "side_fill")
WORKER_KEYS = table_keys(Settings)


def parse_rate_limits(raw: Any) -> dict[str, Budget]:
    """Validate `[rate_limits."<model>"]` tables: requests/tokens per minute per model."""
    if not isinstance(raw, Mapping):
        raise ConfigError("rate_limits: must be a table of models, e.g."
                          ' [rate_limits."text-embedding-3-large"]')
    budgets: dict[str, Budget] = {}
    for model, limits in raw.items():
        where = f"rate_limits.{model!r}"
        if not isinstance(limits, Mapping):
            raise ConfigError(f"{where}: must be a table with requests_per_minute and/or"
                              " tokens_per_minute")
        unknown = sorted(set(limits) - {"requests_per_minute", "tokens_per_minute"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        budget = Budget(*(_optional_positive(limits, key, where)
                          for key in ("requests_per_minute", "tokens_per_minute")))
        if not budget:
            raise ConfigError(f"{where}: set requests_per_minute and/or tokens_per_minute")
        budgets[model] = budget
    return budgets


def parse_settings(document: Mapping[str, Any], env: Mapping[str, str],
                   config_path: str | None = None) -> Settings:
    """Build Settings from a parsed TOML document and an environment mapping."""
    reject_unknown(document, TOP_LEVEL_KEYS, "config", "section or key")
    defaults = document.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError("defaults: must be a table ([defaults])")
    reject_unknown(defaults, tuple(k for k in TARGET_KEYS if k != "name"), "defaults")
    raw_targets = document.get("target", [])
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ConfigError("config: declare at least one [[target]] table")
    targets: dict[str, Target] = {}
    for raw in raw_targets:
        target = parse_target(raw, defaults)
        if target.name in targets:
            raise ConfigError(f"target {target.name!r}: declared twice")
        _refuse_shared_destination(targets.values(), target)
        targets[target.name] = target

    worker = document.get("worker", {})
    if not isinstance(worker, Mapping):
        raise ConfigError("worker: must be a table ([worker])")
    reject_unknown(worker, WORKER_KEYS, "worker")
    if not isinstance(side_fill := document.get("side_fill", {}), Mapping):
        raise ConfigError("side_fill: must be a table ([side_fill])")
    reject_unknown(side_fill, SIDE_FILL_KEYS, "side_fill")
    database_url = environment.DATABASE_URL.get(env) or document.get("database_url")
    if not database_url:
        raise ConfigError("DATABASE_URL: not set (environment variable or database_url in config)")
    _check_dsn_at_signs(database_url)
    redis_url = environment.REDIS_URL.get(env) or document.get("redis_url") or "redis://127.0.0.1:6379/0"
    _check_redis_url(redis_url)
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        targets=targets,
        openai_api_key=environment.OPENAI_API_KEY.get(env),
        openai_base_url=environment.OPENAI_BASE_URL.get(env),
        **read_declared(Settings, worker, "worker", env),
        config_path=config_path,
        rate_limits=parse_rate_limits(document.get("rate_limits", {})),
        side_fill=parse_side_fill(side_fill),
        throttle=parse_throttle(document.get("throttle", {})),
    )


def _refuse_shared_destination(earlier: Iterable[Target], target: Target) -> None:
    """Two targets writing one vector column, or one chunk table (its rows are one
    target's chunk sets: another's pass deletes them as stale), would undo each other."""
    for other in earlier:
        if (other.schema, other.table) != (target.schema, target.table):
            continue
        if other.parent is not None or target.parent is not None:
            raise ConfigError(
                f"targets {other.name!r} and {target.name!r}: both keep their chunks in"
                f" {target.schema}.{target.table}; give one its own chunk table"
                " ([target.destination] table = \"...\")")
        if other.vector_column == target.vector_column:
            raise ConfigError(
                f"targets {other.name!r} and {target.name!r}: both write"
                f" {target.schema}.{target.table}.{target.vector_column}; give one its own"
                " vector_column")


def _check_redis_url(redis_url: str) -> None:
    """redis-py's from_url raises a bare ValueError, deep in whichever process first
    connects; the value is not echoed (it may hold a password)."""
    if not isinstance(redis_url, str) or redis_url.partition("://")[0].lower() not in (
            "redis", "rediss", "unix"):
        raise ConfigError("REDIS_URL: must be a redis://, rediss:// or unix:// URL, e.g."
                          " redis://127.0.0.1:6379/0 (or redis_url in the config)")


def _check_dsn_at_signs(database_url: str) -> None:
    """libpq ends the user info at the first '@': `user:Pa@ss@host` means host "ss@host",
    which fails with part of the password in the error. Refuse it (without echoing it)."""
    match = re.match(r"^postgres(?:ql)?://(?P<authority>[^/?#]*)", database_url, re.IGNORECASE)
    if match and match["authority"].count("@") > 1:
        raise ConfigError("DATABASE_URL: the user name or password holds an '@', which must be"
                          " written %40 in a URL (libpq would take the rest for the host)")


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file named by `path` or $PGREEMBED_CONFIG (default ./pgreembed.toml)."""
    env = environment.process_environment() if env is None else env
    resolved = Path(path or environment.CONFIG.get(env) or "pgreembed.toml")
    try:
        with resolved.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(resolved)!r} not found (set PGREEMBED_CONFIG or pass --config)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(resolved)!r}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 by definition; a Latin-1 file would otherwise be a raw traceback.
        byte = exc.object[exc.start]
        raise ConfigError(f"config file {str(resolved)!r}: not UTF-8 (byte 0x{byte:02x} at"
                          f" offset {exc.start}); save it as UTF-8") from None
    settings = parse_settings(document, env, config_path=str(resolved))
    # Every process reads its settings at start-up: from then on its configured secrets
    # are masked in logs and errors, whatever their shape, provider built or not.
    register_configured_secrets([settings.database_url, settings.redis_url],
                                [settings.openai_api_key, *provider_secrets(env)])
    return settings
