"""A `[[target]]` table: one table column to keep embedded, and how it is validated.

The target's simple keys are declared once on `Target` with `setting` (type, default,
check); the keys that depend on each other (name, table and schema, text columns,
provider, model, dimensions, the vector type's size limit) are checked in `parse_target`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgreembed.config import providers as provider_tables
from pgreembed.config.distances import canonical_distance
from pgreembed.config.fields import (
    at_most,
    declared,
    one_of,
    positive_number,
    reject_unknown,
    setting,
)
from pgreembed.config.fields import positive as _positive
from pgreembed.config.fields import require as _require
from pgreembed.config.fields import typed as _typed
from pgreembed.config.model_keys import is_foreign, model_key
from pgreembed.config.providers import PROVIDER_TABLES, ProviderSettings
from pgreembed.errors import ConfigError

# Names we turn into SQL identifiers of our own (state tables, channels, keys).
_TARGET_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
LOCAL_MODEL = "all-MiniLM-L6-v2-onnx-int8"
PROVIDERS = ("local", "openai", *PROVIDER_TABLES)
VECTOR_TYPES = ("vector", "halfvec")
VECTOR_MAX_INDEXED = 2000  # pgvector indexes `vector` up to 2000 dims, `halfvec` up to 4000


def default_vector_type(dimensions: int) -> str:
    """The column type when the config does not name one: `vector`, or `halfvec` above
    the 2000 dims pgvector can index as `vector`."""
    return "vector" if dimensions <= VECTOR_MAX_INDEXED else "halfvec"



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
    primary_key: str | None = setting(None)
    text_sql: str | None = setting(None)
    batch_size: int = setting(64, check=at_most(2048))
    trigger: bool = setting(True)
    # Bad input over the per-input token limit: cut it (and record a flag) or fail the row.
    truncate: bool = setting(True)
    # Identical texts share one vector per model (looked up before the provider is called);
    # off for tables whose rows must not share vectors.
    dedupe: bool = setting(True)
    # Shared budgets of this model across every worker (openai provider; None: unlimited).
    requests_per_minute: int | None = setting(None, check=positive_number)
    tokens_per_minute: int | None = setting(None, check=positive_number)
    # The distance the app queries with (a pgvector opclass suffix, see config/distances.py).
    distance: str = setting("cosine", check=canonical_distance)
    # The column's storage: "vector" (4 bytes a component) or "halfvec" (2); None: by
    # dimensions. After `migrate --derive halfvec` the registry says halfvec.
    vector_type: str | None = setting(None, check=one_of(VECTOR_TYPES))
    # `[target.azure]`, `[target.cohere]`, ...: each provider's own settings (providers.py).
    providers: ProviderSettings = field(default_factory=ProviderSettings)
    parent: Any = None  # chunked: this is the chunk table (pgreembed.config.chunking.Parent)

    @property
    def storage_type(self) -> str:
        """The column type this target's config asks for (explicit, or by dimensions)."""
        return self.vector_type or default_vector_type(self.dimensions)

    @property
    def model_key(self) -> str:
        """What identifies "the same model" for invariant 4 (provider, name, size)."""
        return model_key(self.provider, self.model, self.dimensions)



# Every key a target (or [defaults]) may hold: anything else is a typo, refused with the
# nearest name. `text_column` is the one-column spelling of `text_columns`.
TARGET_KEYS = (
    "name", "table", "text_columns", "text_column", "text_sql", "vector_column",
    "provider", "model", "dimensions", "primary_key", "batch_size", "trigger", "truncate",
    "dedupe", "requests_per_minute", "tokens_per_minute", "distance", "schema",
    "vector_type", "chunking", "destination", *PROVIDER_TABLES,
)


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

    schema_field = merged.get("schema")  # the one setting Target stores resolved
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
    if provider not in PROVIDERS and not is_foreign(str(provider)):
        raise ConfigError(f"{where}.provider: must be one of {PROVIDERS}, got {provider!r}")
    model = _typed(merged.get("model", LOCAL_MODEL if provider == "local" else ""), str,
                   f"{where}.model")
    if provider == "local" and model != LOCAL_MODEL:
        raise ConfigError(f"{where}.model: the local provider has only {LOCAL_MODEL!r}")
    dimensions = _positive(_require(merged, "dimensions", int, where), f"{where}.dimensions",
                           maximum=16000)
    if provider == "local" and dimensions != 384:
        raise ConfigError(f"{where}.dimensions: {LOCAL_MODEL} produces 384, got {dimensions}")
    simple = declared(Target)
    batch_size = simple["batch_size"].read(merged, where)
    text_sql = simple["text_sql"].read(merged, where)
    primary_key = simple["primary_key"].read(merged, where)
    rpm, tpm = (simple[key].read(merged, where)
                for key in ("requests_per_minute", "tokens_per_minute"))
    vector_type = simple["vector_type"].read(merged, where)
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
        **{key: simple[key].read(merged, where) for key in ("trigger", "truncate", "dedupe")},
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        distance=simple["distance"].read(merged, where),
        vector_type=vector_type,
        providers=provider_tables.parse_provider_settings(merged, where),
    )
    if "chunking" in merged or "destination" in merged:
        from pgreembed.config.chunking import as_chunk_target
        return as_chunk_target(target, merged, where)
    return target
