"""The pgai config -> [[target]] mapping of import-pgai (pure: no database, no provider).

Configs as pgai 0.12.1's `ai.create_vectorizer` stores them (the shape the worker-filled
tests/test_pgai_import.py reads from a real catalog)."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

import pytest

from pgreembed.config.target import parse_target
from pgreembed.operations.pgai_mapping import map_vectorizer
from pgreembed.store.pgai_values import CatalogVersion, KeyColumn, Vectorizer, parse_version

CONFIG: dict[str, Any] = {
    "version": "0.12.1",
    "loading": {"implementation": "column", "config_type": "loading", "column_name": "body",
                "retries": 6},
    "parsing": {"implementation": "auto", "config_type": "parsing"},
    "chunking": {"implementation": "recursive_character_text_splitter",
                 "config_type": "chunking", "chunk_size": 800, "chunk_overlap": 400,
                 "separators": ["\n\n", "\n", ".", "?", "!", " ", ""],
                 "is_separator_regex": False},
    "formatting": {"implementation": "python_template", "config_type": "formatting",
                   "template": "$title\n\n$chunk"},
    "embedding": {"implementation": "openai", "config_type": "embedding",
                  "model": "text-embedding-3-small", "dimensions": 768,
                  "api_key_name": "OPENAI_API_KEY"},
    "indexing": {"implementation": "none", "config_type": "indexing"},
    "scheduling": {"implementation": "none", "config_type": "scheduling"},
    "processing": {"implementation": "default", "config_type": "processing"},
    "destination": {"implementation": "table", "config_type": "destination",
                    "target_schema": "public", "target_table": "blog_embedding_store",
                    "view_schema": "public", "view_name": "blog_embedding"},
}


def vectorizer(changes: dict[str, dict[str, Any]] | None = None,
               keys: tuple[str, ...] = ("id",)) -> Vectorizer:
    config = copy.deepcopy(CONFIG)
    for section, values in (changes or {}).items():
        config[section] = values if "implementation" in values and len(values) == 1 \
            else {**config[section], **values}
    return Vectorizer(1, "blog_embedding", "public", "blog",
                      tuple(KeyColumn(k, "bigint", n) for n, k in enumerate(keys, 1)),
                      config, False, "ai", "_vectorizer_q_1", "_vectorizer_q_failed_1",
                      "_vectorizer_src_trg_1")


def kinds(mapping: Any) -> dict[str, str]:
    return {n.what: n.kind for n in mapping.notes}


def test_a_default_table_destination_maps_to_a_chunked_target_whose_toml_loads() -> None:
    mapping = map_vectorizer(vectorizer())
    assert (mapping.kind, mapping.adoptable, mapping.frozen, mapping.notes) == (
        "chunked", True, False, [])
    loaded = tomllib.loads(mapping.toml())["target"][0]
    assert loaded == mapping.target
    target = parse_target(loaded, {})
    assert (target.schema, target.table, target.vector_column, target.model,
            target.dimensions, target.provider) == (
        "public", "blog_embedding_store", "embedding", "text-embedding-3-small", 768, "openai")
    assert target.parent is not None
    chunking = target.parent.chunking
    assert (chunking.splitter, chunking.unit, chunking.size, chunking.overlap,
            chunking.separators, chunking.template) == (
        "recursive", "characters", 800, 400, ("\n\n", "\n", ".", "?", "!", " ", ""),
        "$title\n\n$chunk")
    assert (target.parent.table, target.parent.view, target.parent.text_columns) == (
        "blog", "blog_embedding", ("body",))


def test_character_splitter_hnsw_and_processing() -> None:
    mapping = map_vectorizer(vectorizer({
        "chunking": {"implementation": "character_text_splitter", "config_type": "chunking",
                     "chunk_size": 500, "chunk_overlap": 50, "separator": "\n",
                     "is_separator_regex": False},
        "indexing": {"implementation": "hnsw", "opclass": "vector_ip_ops", "min_rows": 10},
        "processing": {"implementation": "default", "batch_size": 100, "concurrency": 4}}))
    target = parse_target(tomllib.loads(mapping.toml())["target"][0], {})
    assert target.parent is not None
    assert (target.parent.chunking.splitter, target.parent.chunking.separators,
            target.distance, target.batch_size) == ("character", ("\n",), "ip", 100)
    assert kinds(mapping) == {"processing concurrency": "info"}


def test_a_column_destination_maps_to_an_ordinary_target() -> None:
    mapping = map_vectorizer(vectorizer({
        "chunking": {"implementation": "none"},
        "destination": {"implementation": "column", "embedding_column": "emb"}}))
    assert mapping.kind == "ordinary"
    target = parse_target(tomllib.loads(mapping.toml())["target"][0], {})
    assert (target.table, target.vector_column, target.parent) == ("blog", "emb", None)
    assert kinds(mapping) == {"template '$title\\n\\n$chunk'": "info"}


@pytest.mark.parametrize(("changes", "what", "kind"), [
    ({"loading": {"implementation": "uri", "column_name": "url"}}, "loading uri", "frozen"),
    ({"parsing": {"implementation": "pymupdf"}}, "parsing pymupdf", "frozen"),
    ({"embedding": {"implementation": "litellm", "model": "cohere/embed-english-v3.0",
                    "dimensions": 1024}}, "embedding litellm", "refused"),
    ({"embedding": {"implementation": "ollama", "model": "nomic-embed-text", "dimensions": 768,
                    "base_url": "http://ollama:11434"}}, "embedding ollama", "info"),
    ({"embedding": {"implementation": "openai", "model": "text-embedding-3-small",
                    "dimensions": 768, "api_key_name": "MY_KEY"}}, "api_key_name", "info"),
    ({"destination": {"target_schema": "vectors"}}, "destination schema", "refused"),
    ({"scheduling": {"implementation": "timescaledb", "job_id": 1000}},
     "scheduling timescaledb", "info"),
])
def test_what_does_not_map_is_named_with_its_kind(changes: dict[str, dict[str, Any]],
                                                  what: str, kind: str) -> None:
    mapping = map_vectorizer(vectorizer(changes))
    assert kinds(mapping).get(what) == kind, mapping.notes
    assert mapping.adoptable == (kind != "refused")
    assert mapping.frozen == (kind == "frozen")


def test_voyage_and_ollama_map_to_providers_pgreembed_has() -> None:
    voyage = map_vectorizer(vectorizer({"embedding": {
        "implementation": "voyageai", "model": "voyage-3", "dimensions": 1024}}))
    ollama = map_vectorizer(vectorizer({"embedding": {
        "implementation": "ollama", "model": "nomic-embed-text", "dimensions": 768,
        "base_url": "http://ollama:11434/"}}))
    assert (voyage.target["provider"], ollama.target["provider"]) == ("voyage", "openai")
    assert "OPENAI_BASE_URL=http://ollama:11434/v1" in ollama.notes[0].reason


def test_a_composite_key_maps_to_a_chunked_target_keyed_by_every_column() -> None:
    """A table destination keys its chunks by the whole primary key (no primary_key in
    the TOML: the table's own is read); a column destination would be an ordinary target,
    which takes one column, so it is refused with the columns named."""
    mapping = map_vectorizer(vectorizer(keys=("tenant", "id")))
    assert (mapping.kind, mapping.adoptable) == ("chunked", True)
    assert "primary_key" not in tomllib.loads(mapping.toml())["target"][0]
    assert kinds(mapping) == {"composite primary key": "info"}
    assert "(tenant, id)" in mapping.notes[0].reason
    column = map_vectorizer(vectorizer({"destination": {
        "implementation": "column", "embedding_column": "embedding"}}, keys=("tenant", "id")))
    assert not column.adoptable
    assert "(tenant, id)" in column.refusal


@pytest.mark.parametrize(("version", "supported"), [
    (CatalogVersion(True, "0.12.1", None, False), True),
    (CatalogVersion(True, "0.10.0", None, False), True),
    (CatalogVersion(True, "0.9.3", None, False), False),
    (CatalogVersion(True, None, "0.8.0", True), False),
    (CatalogVersion(True, "0.12.1", None, True), False),  # legacy columns still there
    (CatalogVersion(False, None, None, False), False),
])
def test_catalog_versions(version: CatalogVersion, supported: bool) -> None:
    assert version.supported is supported
    assert parse_version("0.10.0-dev") == (0, 10, 0)
