"""`[target.chunking]` and `[target.destination]`: how a parent's text becomes chunks.

The names and defaults are pgai 0.12.1's (ai.chunking_recursive_character_text_splitter:
800/400, separators ["\\n\\n", "\\n", ".", "?", "!", " ", ""]; ai.chunking_character_text_splitter:
one separator "\\n\\n"; ai.formatting_python_template: "$chunk"), so a pgai vectorizer's
settings carry over as they are. A chunk is never truncated: a size that cannot fit the
model's input limit is refused here, and a chunk table's target never truncates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from string import Template
from typing import Any

from pgreembed.config.fields import positive, reject_unknown, typed
from pgreembed.errors import ConfigError

SPLITTERS = ("recursive", "character", "none")
UNITS = ("characters", "tokens")
RECURSIVE_SEPARATORS = ("\n\n", "\n", ".", "?", "!", " ", "")
CHARACTER_SEPARATORS = ("\n\n",)
CHUNKING_KEYS = ("splitter", "unit", "size", "overlap", "separators", "is_separator_regex",
                 "template")
DESTINATION_KEYS = ("table", "view")
# Per-input token limits of the providers (embedding/providers: local.MAX_TOKENS less its
# two special tokens, openai_provider max_input_tokens, Azure's OpenAI models);
# tests/test_chunking_splits checks they agree. The other providers' limits are per model
# (Cohere v3 512, embed-v4.0 128k) in the catalog above this floor: not checked at load.
INPUT_LIMITS = {"local": 256 - 2, "openai": 8192, "azure": 8192}


@dataclass(frozen=True)
class Chunking:
    """How one parent text is split and each chunk formatted (pgai's semantics)."""

    splitter: str = "recursive"
    unit: str = "characters"
    size: int = 800
    overlap: int = 400
    separators: tuple[str, ...] = RECURSIVE_SEPARATORS
    is_separator_regex: bool = False
    template: str = "$chunk"

    @property
    def template_columns(self) -> tuple[str, ...]:
        """The parent's columns the template names (besides `$chunk`), in order."""
        return tuple(n for n in Template(self.template).get_identifiers() if n != "chunk")

    @property
    def template_overhead(self) -> str:
        """The template's own text: what every chunk carries besides chunk and columns."""
        names = {n: "" for n in Template(self.template).get_identifiers()}
        return Template(self.template).substitute(names)

    @property
    def key(self) -> str:
        """Identifies the chunk set these settings make (a change is a re-chunk)."""
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Parent:
    """The app's table whose rows are chunked, as the chunk table's target sees it."""

    schema: str
    table: str
    text_columns: tuple[str, ...]
    text_sql: str | None
    primary_key: str | None
    chunking: Chunking
    view: str | None = None


def _separators(raw: Mapping[str, Any], splitter: str, where: str) -> tuple[str, ...]:
    if "separators" not in raw:
        return CHARACTER_SEPARATORS if splitter == "character" else RECURSIVE_SEPARATORS
    given = raw["separators"]
    if not isinstance(given, list) or not given:
        raise ConfigError(f"{where}.separators: must be a non-empty list of strings")
    if not all(isinstance(s, str) for s in given):  # "" is a separator (characters)
        raise ConfigError(f"{where}.separators: must be a list of strings")
    separators = tuple(given)
    if splitter == "character" and len(separators) != 1:
        raise ConfigError(f"{where}.separators: the character splitter takes exactly one"
                          f" separator (pgai's `separator`), got {len(separators)}")
    return separators


def _template(raw: Mapping[str, Any], where: str) -> str:
    template = typed(raw.get("template", "$chunk"), str, f"{where}.template")
    parsed = Template(template)
    if not parsed.is_valid():
        raise ConfigError(f"{where}.template: not a valid template ($name or ${{name}}; $$"
                          " for a dollar sign)")
    if "chunk" not in parsed.get_identifiers():
        raise ConfigError(f"{where}.template: must contain $chunk (where the chunk goes)")
    return template


def parse_chunking(raw: Any, provider: str, where: str) -> Chunking:
    """Validate `[target.chunking]`; refuse settings whose chunks could exceed the model."""
    where = f"{where}.chunking"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table ([target.chunking])")
    reject_unknown(raw, CHUNKING_KEYS, where)
    splitter = typed(raw.get("splitter", "recursive"), str, f"{where}.splitter")
    if splitter not in SPLITTERS:
        raise ConfigError(f"{where}.splitter: must be one of {SPLITTERS}, got {splitter!r}")
    unit = typed(raw.get("unit", "characters"), str, f"{where}.unit")
    if unit not in UNITS:
        raise ConfigError(f"{where}.unit: must be one of {UNITS}, got {unit!r}")
    size = positive(typed(raw.get("size", 800), int, f"{where}.size"), f"{where}.size")
    overlap = typed(raw.get("overlap", min(400, size // 2)), int, f"{where}.overlap")
    if not 0 <= overlap < size:
        raise ConfigError(f"{where}.overlap: must be at least 0 and less than size ({size}),"
                          f" got {overlap}")
    chunking = Chunking(
        splitter=splitter, unit=unit, size=size, overlap=overlap,
        separators=_separators(raw, splitter, where),
        is_separator_regex=typed(raw.get("is_separator_regex", False), bool,
                                 f"{where}.is_separator_regex"),
        template=_template(raw, where))
    check_fits(chunking, provider, where)
    return chunking


def check_fits(chunking: Chunking, provider: str, where: str) -> None:
    """Refuse a size that, with the template's own text, can exceed the model's limit.

    A character is counted as one token (WordPiece and byte-level BPE rarely make more
    of one; a chunk that still does fails with a recorded reason, never truncated). The
    template's column values vary per row and are checked per chunk when embedded.
    """
    if chunking.splitter == "none":
        return  # one chunk per row, as long as the row: the provider's limit applies
    limit = INPUT_LIMITS.get(provider)
    if limit is None:
        return  # checked per chunk when embedded (embed.prepare: a failure, not a cut)
    overhead = len(chunking.template_overhead)
    if chunking.size + overhead > limit:
        raise ConfigError(
            f"{where}.size: {chunking.size} {chunking.unit} plus the template's"
            f" {overhead} characters can exceed the {provider} model's input limit of"
            f" {limit} tokens; chunks are never truncated, so use size <="
            f" {max(limit - overhead, 1)}")


def parse_destination(raw: Any, parent_schema: str, parent_table: str, where: str
                      ) -> tuple[str, str, str | None]:
    """(schema, table, view) of `[target.destination]`: `<table>_chunks` beside the parent
    by default; the optional view (chunk columns and the parent's, as pgai's) beside them.
    The names are used as given (quoted), like the parent's."""
    where = f"{where}.destination"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table ([target.destination])")
    reject_unknown(raw, DESTINATION_KEYS, where)
    table = typed(raw.get("table", f"{parent_table}_chunks"), str, f"{where}.table")
    view = raw.get("view")
    if view is not None:
        typed(view, str, f"{where}.view")
    if table == parent_table or view in (table, parent_table):
        raise ConfigError(f"{where}: the chunk table, the view and the parent table need"
                          " three different names")
    return parent_schema, table, view


CHUNK_KEY = "embedding_uuid"
CHUNK_TEXT = "chunk"


def as_chunk_target(target: Any, raw: Mapping[str, Any], where: str) -> Any:
    """The chunk table as an ordinary target (key embedding_uuid, text `chunk`, never
    truncated), carrying its parent: everything that embeds, migrates and reports on a
    target works on it unchanged. `target` is the [[target]] as parsed (a config.Target)."""
    chunking = parse_chunking(raw.get("chunking", {}), target.provider, where)
    schema, table, view = parse_destination(raw.get("destination", {}), target.schema,
                                            target.table, where)
    if CHUNK_TEXT in chunking.template_columns or CHUNK_KEY in chunking.template_columns:
        raise ConfigError(f"{where}.chunking.template: ${CHUNK_TEXT} is the chunk;"
                          f" {CHUNK_KEY} is not a parent column")
    parent = Parent(schema=target.schema, table=target.table,
                    text_columns=target.text_columns, text_sql=target.text_sql,
                    primary_key=target.primary_key, chunking=chunking, view=view)
    return dataclasses.replace(target, schema=schema, table=table, text_columns=(CHUNK_TEXT,),
                               text_sql=None, primary_key=CHUNK_KEY, truncate=False,
                               parent=parent)
