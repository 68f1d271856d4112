"""A pgai vectorizer's config -> the pgreembed [[target]] it implies, and what does not map.

Pure: no SQL, no provider. The mapping (docs/pgai.md, "The mapping"):
- loading column -> text_columns; loading uri, parsing pymupdf/docling -> adopted frozen
  (vectors and search keep working; source changes are not re-chunked: no loader yet);
- chunking recursive/character -> [target.chunking] with unit "characters" (pgai's
  lengths); none + column destination -> an ordinary target on that column;
- formatting python_template -> template; chunk_value -> "$chunk";
- embedding openai -> provider openai (base_url -> OPENAI_BASE_URL); ollama -> openai
  against <base_url>/v1, only if the vector check agrees; voyageai -> voyage;
  litellm -> not adoptable yet (no such provider here);
- indexing hnsw opclass -> distance; destination table/view -> [target.destination].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pgreembed.store.pgai_values import Vectorizer

# The checks' default sample sizes (the CLI's defaults; this module is light to import).
DEFAULT_VERIFY_CHUNKS = 200
DEFAULT_VERIFY_VECTORS = 20
OPCLASS_DISTANCE = {"vector_cosine_ops": "cosine", "vector_ip_ops": "ip",
                    "vector_l1_ops": "l1", "vector_l2_ops": "l2"}
SPLITTERS = {"recursive_character_text_splitter": "recursive",
             "character_text_splitter": "character", "none": "none"}


@dataclass(frozen=True)
class Note:
    """Something that does not map one to one. kind: "frozen" (adopted, not re-chunked),
    "foreign" (adopted, cannot embed new texts), "refused" (not adoptable), "info"."""

    kind: str
    what: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "what": self.what, "reason": self.reason}


@dataclass
class Mapping:
    """What a vectorizer becomes: kind "chunked" or "ordinary", the [[target]] as a dict."""

    vectorizer: str
    kind: str
    target: dict[str, Any]
    notes: list[Note] = field(default_factory=list)

    @property
    def adoptable(self) -> bool:
        return not any(n.kind == "refused" for n in self.notes)

    @property
    def refusal(self) -> str:
        """Why it cannot be adopted ("" when it can)."""
        return "; ".join(f"{n.what}: {n.reason}" for n in self.notes if n.kind == "refused")

    @property
    def frozen(self) -> bool:
        return any(n.kind == "frozen" for n in self.notes)

    @property
    def text_column(self) -> str:
        return str(self.target["text_columns"][0])

    def toml(self) -> str:
        return target_toml(self.target)


def map_vectorizer(v: Vectorizer) -> Mapping:
    notes: list[Note] = []
    loading = v.section("loading")
    column = str(loading.get("column_name", ""))
    if loading.get("implementation") == "uri":
        notes.append(Note("frozen", "loading uri", "pgreembed has no document loader yet:"
                          " stored chunks and vectors are adopted and searchable; source"
                          " changes are not re-chunked"))
    parsing = str(v.section("parsing").get("implementation", "auto"))
    if parsing not in ("auto", "none"):
        notes.append(Note("frozen", f"parsing {parsing}", "pgreembed parses no documents yet:"
                          " adopted frozen (source changes are not re-chunked)"))
    target: dict[str, Any] = {"name": v.name, "table": f"{v.source_schema}.{v.source_table}",
                              "text_columns": [column]}
    columns = ", ".join(k.name for k in v.source_pk)
    if len(v.source_pk) == 1:
        target["primary_key"] = v.source_pk[0].name
    elif v.destination_kind == "column":
        notes.append(Note("refused", "composite primary key", "an ordinary target (a column"
                          f" destination) takes a single-column key ({columns})"))
    else:  # a chunked target keys its chunks by every column of the primary key
        notes.append(Note("info", "composite primary key", f"the chunk table keeps ({columns}):"
                          " chunks, marks and search are keyed by every column"))
    _map_embedding(v, target, notes)
    _map_processing_indexing(v, target, notes)
    if v.destination_kind == "column":
        kind = "ordinary"
        target["vector_column"] = str(v.section("destination")["embedding_column"])
        template = str(v.section("formatting").get("template", "$chunk"))
        if template != "$chunk":
            notes.append(Note("info", f"template {template!r}", "a column destination's"
                              " template is not mapped: rows edited after the take-over are"
                              " embedded from the column's text alone"))
    else:
        kind = "chunked"
        target["vector_column"] = "embedding"
        target["chunking"] = _map_chunking(v, notes)
        dest = v.section("destination")
        if dest.get("target_schema") != v.source_schema:
            notes.append(Note("refused", "destination schema", "the chunk table is in"
                              f" {dest.get('target_schema')!r}, the source in"
                              f" {v.source_schema!r}: chunked targets keep both in one schema"))
        target["destination"] = {"table": str(dest.get("target_table"))}
        if dest.get("view_name"):
            if dest.get("view_schema", v.source_schema) == v.source_schema:
                target["destination"]["view"] = str(dest["view_name"])
            else:
                notes.append(Note("info", "view", f"view {dest.get('view_schema')}."
                                  f"{dest.get('view_name')} is kept but not owned (another"
                                  " schema than the source's)"))
    if v.section("scheduling").get("implementation") == "timescaledb":
        notes.append(Note("info", "scheduling timescaledb", "pgai's job is disabled at"
                          " take-over (pgreembed's scheduler does the work)"))
    return Mapping(v.name, kind, target, notes)


def _map_embedding(v: Vectorizer, target: dict[str, Any], notes: list[Note]) -> None:
    embedding = v.section("embedding")
    impl = str(embedding.get("implementation"))
    target["model"] = str(embedding.get("model"))
    target["dimensions"] = int(embedding.get("dimensions", 0))
    if impl == "openai":
        target["provider"] = "openai"
        if embedding.get("base_url"):
            notes.append(Note("info", "base_url", "set OPENAI_BASE_URL="
                              f"{embedding['base_url']} for pgreembed's workers"))
        key = embedding.get("api_key_name") or "OPENAI_API_KEY"
        if key != "OPENAI_API_KEY":
            notes.append(Note("info", "api_key_name", f"pgreembed reads OPENAI_API_KEY: give"
                              f" it the value pgai read from {key}"))
    elif impl == "ollama":
        target["provider"] = "openai"
        base = str(embedding.get("base_url") or "http://localhost:11434").rstrip("/")
        notes.append(Note("info", "embedding ollama", "mapped to Ollama's OpenAI-compatible"
                          f" API: OPENAI_BASE_URL={base}/v1; adopt only after the vector"
                          " check agrees (do not use --no-embed-check)"))
    elif impl == "voyageai":
        target["provider"] = "voyage"
    else:
        target["provider"] = impl
        notes.append(Note("refused", f"embedding {impl}", f"pgreembed has no {impl} provider"
                          " yet: the vectors cannot be adopted as a model it can embed new"
                          " texts with; migrate the vectorizer to a supported model, or wait"
                          " for the provider"))


def _map_processing_indexing(v: Vectorizer, target: dict[str, Any], notes: list[Note]) -> None:
    batch = v.section("processing").get("batch_size")
    if batch:
        target["batch_size"] = min(int(batch), 2048)
    if v.section("processing").get("concurrency"):
        notes.append(Note("info", "processing concurrency", "a worker setting in pgreembed"
                          " ([worker] / the number of worker processes), not per target"))
    indexing = v.section("indexing")
    impl = indexing.get("implementation")
    if impl == "hnsw":
        target["distance"] = OPCLASS_DISTANCE.get(str(indexing.get("opclass")), "cosine")
    elif impl == "diskann":
        notes.append(Note("info", "indexing diskann", "an existing diskann index is kept;"
                          " pgreembed does not rebuild it on a migration"))


def _map_chunking(v: Vectorizer, notes: list[Note]) -> dict[str, Any]:
    chunking = v.section("chunking")
    splitter = SPLITTERS.get(str(chunking.get("implementation")))
    out: dict[str, Any] = {}
    if splitter is None:
        notes.append(Note("refused", f"chunking {chunking.get('implementation')}",
                          "no pgreembed splitter of that name"))
        return out
    out["splitter"] = splitter
    if splitter != "none":
        out["unit"] = "characters"
        out["size"] = int(chunking.get("chunk_size", 800))
        out["overlap"] = int(chunking.get("chunk_overlap", 400))
        if splitter == "character":
            out["separators"] = [str(chunking.get("separator", "\n\n"))]
        else:
            out["separators"] = [str(s) for s in chunking.get("separators", [])]
        out["is_separator_regex"] = bool(chunking.get("is_separator_regex", False))
    formatting = v.section("formatting")
    if formatting.get("implementation") == "python_template":
        out["template"] = str(formatting.get("template", "$chunk"))
    else:
        out["template"] = "$chunk"
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON's escapes are TOML basic-string escapes


def target_toml(target: dict[str, Any]) -> str:
    """The [[target]] table as TOML (its sub-tables after it)."""
    lines = ["[[target]]"]
    tables = {k: v for k, v in target.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in target.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[target.{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
