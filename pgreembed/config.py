"""Configuration: 12-factor environment plus a TOML file that declares targets.

The environment carries where things are and the secrets (DATABASE_URL,
REDIS_URL, OPENAI_API_KEY, OPENAI_BASE_URL); the TOML file carries what to
embed (tables, columns, models), which is reviewed like code. Every
validation error names the field and what is wrong with it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgreembed.config_fields import env_int, non_negative_seconds, reject_unknown
from pgreembed.config_fields import optional_positive as _optional_positive
from pgreembed.config_fields import positive as _positive
from pgreembed.config_fields import require as _require
from pgreembed.config_fields import typed as _typed
from pgreembed.distances import canonical_distance
from pgreembed.errors import ConfigError
from pgreembed.model_keys import model_key
from pgreembed.redact import register_configured_secrets
from pgreembed.side_fill_config import SIDE_FILL_KEYS, SideFillSettings, parse_side_fill
from pgreembed.throttle_settings import ThrottleSettings, parse_throttle

# Names we turn into SQL identifiers of our own (state tables, channels, keys).
_TARGET_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
LOCAL_MODEL = "all-MiniLM-L6-v2-onnx-int8"
PROVIDERS = ("local", "openai")
VECTOR_TYPES = ("vector", "halfvec")
VECTOR_MAX_INDEXED = 2000  # pgvector indexes `vector` up to 2000 dims, `halfvec` up to 4000


def default_vector_type(dimensions: int) -> str:
    """The column type when the config does not name one: `vector`, or `halfvec` above
    the 2000 dims pgvector can index as `vector`."""
    return "vector" if dimensions <= VECTOR_MAX_INDEXED else "halfvec"


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


@dataclass(frozen=True)
class Target:
    """One table column to keep embedded."""

    name: str
    table: str
    schema: str
    text_columns: tuple[str, ...]
    vector_column: str
    provider: str
    model: str
    dimensions: int
    primary_key: str | None = None
    text_sql: str | None = None
    batch_size: int = 64
    trigger: bool = True
    # Bad input over the per-input token limit: cut it (and record a flag) or fail the row.
    truncate: bool = True
    # Identical texts share one vector per model (looked up before the provider is called);
    # off for tables whose rows must not share vectors.
    dedupe: bool = True
    # Shared budgets of this model across every worker (openai provider; None: unlimited).
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # The distance the app queries with (a pgvector opclass suffix, see pgreembed.distances).
    distance: str = "cosine"
    # The column's storage: "vector" (4 bytes a component) or "halfvec" (2); None: by
    # dimensions. After `migrate --derive halfvec` the registry says halfvec.
    vector_type: str | None = None
    parent: Any = None  # chunked: this is the chunk table (pgreembed.chunking.config.Parent)

    @property
    def storage_type(self) -> str:
        """The column type this target's config asks for (explicit, or by dimensions)."""
        return self.vector_type or default_vector_type(self.dimensions)

    @property
    def model_key(self) -> str:
        """What identifies "the same model" for invariant 4 (provider, name, size)."""
        return model_key(self.provider, self.model, self.dimensions)


@dataclass(frozen=True)
class Settings:
    """Everything a process needs; built once at start-up."""

    database_url: str
    redis_url: str
    targets: Mapping[str, Target]
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    poll_interval: float = 1.0
    # After a NOTIFY wakes the scheduler it waits this long for more rows before a pass:
    # a steady stream of inserts then goes out in batches, not one request per row.
    linger_seconds: float = 0.25
    lease_seconds: int = 3600
    max_inflight_rows: int = 2048
    request_timeout: float = 60.0
    pool_max_size: int = 4
    # How long one batch retries a failing provider in-process before the message is
    # handed to Dramatiq's retries (which free the worker thread meanwhile).
    provider_retry_seconds: float = 300.0
    # How long one batch retries its write through a database-wide fault (disk full,
    # read-only, connection lost) in-process before keeping its vectors in Redis and
    # handing the message to Dramatiq's retries.
    write_retry_seconds: float = 120.0
    # Dramatiq's back-off before a failed message's first retry; each later retry doubles
    # it (4 retries, at most 120 s apart). Short in tests, where the provider is local.
    retry_backoff_seconds: float = 2.0
    # Dramatiq's Redis broker: how soon a killed worker's messages come back
    # ($PGREEMBED_HEARTBEAT_MS) and how often commands run its maintenance pass.
    heartbeat_ms: int = 10_000
    maintenance_chance: int = 100_000
    config_path: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # `[rate_limits."<model>"]`: budgets of openai models, whichever column they fill.
    rate_limits: Mapping[str, Budget] = field(default_factory=dict)
    side_fill: SideFillSettings = field(default_factory=SideFillSettings)  # [side_fill]
    # `[throttle]`: rows/s cap and adaptive back-off of the writes (pgreembed.throttle_settings).
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
TARGET_KEYS = (
    "name", "table", "text_columns", "text_column", "text_sql", "vector_column",
    "provider", "model", "dimensions", "primary_key", "batch_size", "trigger", "truncate",
    "dedupe", "requests_per_minute", "tokens_per_minute", "distance", "schema",
    "vector_type", "chunking", "destination",
)
WORKER_KEYS = ("poll_interval", "linger_seconds", "max_inflight_rows", "lease_seconds",
               "request_timeout", "provider_retry_seconds", "pool_max_size", "write_retry_seconds",
               "retry_backoff_seconds")


# One identifier of a qualified name: "double quoted" ("" is a quote), or bare: no dot,
# not starting with a quote (a quote inside is part of the name, as before quoting existed).
_NAME_PART = r'"(?:[^"]|"")+"|[^."][^.]*'
_QUALIFIED_NAME = re.compile(rf"(?P<first>{_NAME_PART})(?:\.(?P<second>{_NAME_PART}))?")


def _unquote(part: str) -> str:
    return part[1:-1].replace('""', '"') if part.startswith('"') else part


def split_table_name(table: str, schema: str | None, where: str) -> tuple[str, str]:
    """(schema, table) from `table` and an optional separate `schema`.

    With `schema` given, `table` is the table's name as is (dots included). Without
    it, `table` is `name`, `schema.name`, or double-quoted parts as in SQL
    (`"my.schema"."my.table"`), so names containing a dot can be written.
    """
    if schema is not None:
        return schema, table
    match = _QUALIFIED_NAME.fullmatch(table)
    if match is None:
        raise ConfigError(f"{where}.table: cannot read {table!r} as [schema.]table: quote a"
                          ' name that holds a dot ("my.table"), or set schema separately')
    if match["second"] is None:
        return "public", _unquote(match["first"])
    return _unquote(match["first"]), _unquote(match["second"])


def parse_target(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> Target:
    """Validate one `[[target]]` table (missing keys fall back to `[defaults]`)."""
    merged = {**defaults, **raw}
    name = _require(merged, "name", str, "target")
    where = f"target {name!r}"
    if not _TARGET_NAME.match(name):
        raise ConfigError(
            f"{where}: name must match {_TARGET_NAME.pattern} (it names our own tables)"
        )
    reject_unknown(raw, TARGET_KEYS, where)
    if "text_column" in raw and "text_columns" in raw:
        raise ConfigError(f"{where}: both text_column and text_columns are set; keep one"
                          " (text_columns = [...] for several columns)")

    schema_field = merged.get("schema")
    if schema_field is not None:
        _typed(schema_field, str, f"{where}.schema")
    schema, bare = split_table_name(_require(merged, "table", str, where), schema_field, where)
    if "text_columns" in merged:
        columns = merged["text_columns"]
        if not isinstance(columns, list) or not columns:
            raise ConfigError(f"{where}.text_columns: must be a non-empty list of column names")
        text_columns = tuple(_typed(c, str, f"{where}.text_columns") for c in columns)
    else:
        text_columns = (_require(merged, "text_column", str, where),)

    provider = merged.get("provider", "local")
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}.provider: must be one of {PROVIDERS}, got {provider!r}")
    model = _typed(merged.get("model", LOCAL_MODEL if provider == "local" else ""), str,
                   f"{where}.model")
    if provider == "local" and model != LOCAL_MODEL:
        raise ConfigError(f"{where}.model: the local provider has only {LOCAL_MODEL!r}")
    dimensions = _positive(_require(merged, "dimensions", int, where), f"{where}.dimensions",
                           maximum=16000)
    if provider == "local" and dimensions != 384:
        raise ConfigError(f"{where}.dimensions: {LOCAL_MODEL} produces 384, got {dimensions}")
    batch_size = _positive(_typed(merged.get("batch_size", 64), int, f"{where}.batch_size"),
                           f"{where}.batch_size", maximum=2048)
    text_sql = merged.get("text_sql")
    if text_sql is not None:
        _typed(text_sql, str, f"{where}.text_sql")
    primary_key = merged.get("primary_key")
    if primary_key is not None:
        _typed(primary_key, str, f"{where}.primary_key")
    rpm, tpm = (_optional_positive(merged, key, where)
                for key in ("requests_per_minute", "tokens_per_minute"))
    vector_type = merged.get("vector_type")
    if vector_type is not None:
        if _typed(vector_type, str, f"{where}.vector_type") not in VECTOR_TYPES:
            raise ConfigError(f"{where}.vector_type: must be one of {VECTOR_TYPES}, got"
                              f" {vector_type!r}")
        if vector_type == "vector" and dimensions > VECTOR_MAX_INDEXED:
            raise ConfigError(f"{where}.vector_type: pgvector indexes `vector` only up to"
                              f" {VECTOR_MAX_INDEXED} dimensions; {dimensions} needs halfvec")
    target = Target(
        name=name,
        table=bare,
        schema=schema,
        text_columns=text_columns,
        vector_column=_require(merged, "vector_column", str, where),
        provider=provider,
        model=model,
        dimensions=dimensions,
        primary_key=primary_key,
        text_sql=text_sql,
        batch_size=batch_size,
        trigger=_typed(merged.get("trigger", True), bool, f"{where}.trigger"),
        truncate=_typed(merged.get("truncate", True), bool, f"{where}.truncate"),
        dedupe=_typed(merged.get("dedupe", True), bool, f"{where}.dedupe"),
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        distance=canonical_distance(_typed(merged.get("distance", "cosine"), str,
                                           f"{where}.distance"), f"{where}.distance"),
        vector_type=vector_type,
    )
    if "chunking" in merged or "destination" in merged:
        from pgreembed.chunking.config import as_chunk_target
        return as_chunk_target(target, merged, where)
    return target


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
        targets[target.name] = target

    worker = document.get("worker", {})
    if not isinstance(worker, Mapping):
        raise ConfigError("worker: must be a table ([worker])")
    reject_unknown(worker, WORKER_KEYS, "worker")
    if not isinstance(side_fill := document.get("side_fill", {}), Mapping):
        raise ConfigError("side_fill: must be a table ([side_fill])")
    reject_unknown(side_fill, SIDE_FILL_KEYS, "side_fill")
    database_url = env.get("DATABASE_URL") or document.get("database_url")
    if not database_url:
        raise ConfigError("DATABASE_URL: not set (environment variable or database_url in config)")
    _check_dsn_at_signs(database_url)
    redis_url = env.get("REDIS_URL") or document.get("redis_url") or "redis://127.0.0.1:6379/0"
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        targets=targets,
        openai_api_key=env.get("OPENAI_API_KEY"),
        openai_base_url=env.get("OPENAI_BASE_URL"),
        poll_interval=float(_positive(
            _typed(worker.get("poll_interval", 1.0), float, "worker.poll_interval"),
            "worker.poll_interval")),
        linger_seconds=non_negative_seconds(worker.get("linger_seconds", 0.25),
                                            "worker.linger_seconds"),
        lease_seconds=_positive(_typed(worker.get("lease_seconds", 3600), int,
                                       "worker.lease_seconds"), "worker.lease_seconds"),
        max_inflight_rows=_positive(_typed(worker.get("max_inflight_rows", 2048), int,
                                           "worker.max_inflight_rows"), "worker.max_inflight_rows"),
        request_timeout=float(_positive(
            _typed(worker.get("request_timeout", 60.0), float, "worker.request_timeout"),
            "worker.request_timeout")),
        pool_max_size=_positive(_typed(worker.get("pool_max_size", 4), int,
                                       "worker.pool_max_size"), "worker.pool_max_size"),
        provider_retry_seconds=float(_positive(
            _typed(worker.get("provider_retry_seconds", 300.0), float,
                   "worker.provider_retry_seconds"), "worker.provider_retry_seconds")),
        write_retry_seconds=float(_positive(
            _typed(worker.get("write_retry_seconds", 120.0), float,
                   "worker.write_retry_seconds"), "worker.write_retry_seconds")),
        retry_backoff_seconds=float(_positive(
            _typed(worker.get("retry_backoff_seconds", 2.0), float,
                   "worker.retry_backoff_seconds"), "worker.retry_backoff_seconds")),
        heartbeat_ms=env_int(env, "PGREEMBED_HEARTBEAT_MS", 10_000),
        maintenance_chance=env_int(env, "PGREEMBED_MAINTENANCE_CHANCE", 100_000),
        config_path=config_path,
        rate_limits=parse_rate_limits(document.get("rate_limits", {})),
        side_fill=parse_side_fill(side_fill),
        throttle=parse_throttle(document.get("throttle", {})),
    )


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
    env = os.environ if env is None else env
    resolved = Path(path or env.get("PGREEMBED_CONFIG") or "pgreembed.toml")
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
                                [settings.openai_api_key])
    return settings
