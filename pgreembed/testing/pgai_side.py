"""pgai 0.12.1's side of an import, for tests and benchmarks: its catalog, its
vectorizers and its own worker, filling real chunk tables through a fake provider.

Nothing here imitates pgai: the catalog is pgai's bundled SQL (`pgai.install`), the
vectorizers are made by `ai.create_vectorizer`, and the rows are written by pgai's
worker process (`python -m pgai vectorizer worker`), whose OpenAI embedder is pointed at
a fake OpenAI server with `ai.embedding_openai(base_url => ...)`. pgai 0.12.1 imports
ijson, filetype and langchain-text-splitters without declaring them, and its OpenAI
embedder needs tiktoken's cl100k_base, which its wheel bundles (`TIKTOKEN_CACHE_DIR`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import environment

PGAI_VERSION = "0.12.1"


def adopted_target_toml(vectorizer: str, model: str, dimensions: int, chunk_table: str,
                        view: str | None = None) -> str:
    """The `[[target]]` a recursive 800/400 pgai vectorizer of `docs(body)` maps to, its
    `batch_size` left as a `{batch_size}` placeholder for str.format."""
    return f"""
[[target]]
name = "{vectorizer}"
table = "public.docs"
text_column = "body"
vector_column = "embedding"
provider = "openai"
model = "{model}"
dimensions = {dimensions}
batch_size = {{batch_size}}

[target.chunking]
size = 800
overlap = 400

[target.destination]
table = "{chunk_table}"
""" + (f'view = "{view}"\n' if view else "")


def tiktoken_cache_dir() -> str:
    """The folder holding the tiktoken files pgai's wheel bundles (no network needed)."""
    import pgai.vectorizer

    return str(Path(pgai.vectorizer.__file__).resolve().parent / "tiktoken_cache")


def install_pgai(dsn: str) -> str:
    """Install pgai's catalog (the `ai` schema) into the database; returns its version."""
    import pgai

    pgai.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT version FROM ai.pgai_lib_version WHERE name = 'ai'").fetchone()
    assert row is not None, "pgai.install left no ai.pgai_lib_version row"
    return str(row[0])


@dataclass(frozen=True)
class VectorizerSpec:
    """What `ai.create_vectorizer` is given; each field maps to one of pgai's builders.

    destination "table" makes a chunk table (`<name>_store`) and a view (`<name>`);
    "column" adds a vector column to the source (chunking must be "none").
    chunking: "recursive" | "character" | "none"; `chunking_args` go to the builder as
    named arguments (chunk_size, chunk_overlap, separator(s), is_separator_regex).
    """

    source: str  # [schema.]table
    name: str
    text_column: str = "body"
    destination: str = "table"
    destination_name: str | None = None  # table destination: the view's name
    embedding_column: str = "embedding"  # column destination
    chunking: str = "recursive"
    chunking_args: Mapping[str, Any] = field(default_factory=dict)
    template: str = "$chunk"
    model: str = "text-embedding-3-small"
    dimensions: int = 64
    base_url: str | None = None
    api_key_name: str = "OPENAI_API_KEY"
    embedder: str = "openai"  # or "voyageai", "ollama", "litellm" (not runnable here:
    # catalog only)
    batch_size: int | None = None
    enqueue_existing: bool = True


def _named_call(function: str, args: Mapping[str, Any]) -> sql.Composed:
    """`ai.<function>(name => value, ...)` with every value a literal."""
    parts = [sql.SQL("{} => {}").format(sql.Identifier(k), sql.Literal(v))
             for k, v in args.items() if v is not None]
    return sql.SQL("ai.{}({})").format(sql.Identifier(function), sql.SQL(", ").join(parts))


def _chunking_call(spec: VectorizerSpec) -> sql.Composed:
    function = {"recursive": "chunking_recursive_character_text_splitter",
                "character": "chunking_character_text_splitter",
                "none": "chunking_none"}[spec.chunking]
    return _named_call(function, dict(spec.chunking_args))


def _embedding_call(spec: VectorizerSpec) -> sql.Composed:
    if spec.embedder == "openai":
        return _named_call("embedding_openai", {
            "model": spec.model, "dimensions": spec.dimensions,
            "api_key_name": spec.api_key_name, "base_url": spec.base_url})
    if spec.embedder == "voyageai":
        return _named_call("embedding_voyageai", {
            "model": spec.model, "dimensions": spec.dimensions})
    if spec.embedder == "ollama":
        return _named_call("embedding_ollama", {
            "model": spec.model, "dimensions": spec.dimensions, "base_url": spec.base_url})
    if spec.embedder == "litellm":
        return _named_call("embedding_litellm", {
            "model": spec.model, "dimensions": spec.dimensions})
    raise ValueError(f"embedder {spec.embedder!r} is not one of openai, voyageai, ollama,"
                     " litellm")


def create_vectorizer(conn: psycopg.Connection[Any], spec: VectorizerSpec) -> int:
    """`ai.create_vectorizer(...)` for `spec`; returns the vectorizer's id."""
    if spec.destination == "table":
        destination = _named_call("destination_table",
                                  {"destination": spec.destination_name or spec.name})
    else:
        destination = _named_call("destination_column",
                                  {"embedding_column": spec.embedding_column})
    processing = _named_call("processing_default", {"batch_size": spec.batch_size})
    query = sql.SQL(
        "SELECT ai.create_vectorizer({source}::regclass, name => {name},"
        " destination => {destination},"
        " loading => ai.loading_column({column}),"
        " embedding => {embedding}, chunking => {chunking},"
        " formatting => ai.formatting_python_template({template}),"
        " processing => {processing}, enqueue_existing => {enqueue})").format(
        source=sql.Literal(spec.source), name=sql.Literal(spec.name),
        destination=destination, column=sql.Literal(spec.text_column),
        embedding=_embedding_call(spec), chunking=_chunking_call(spec),
        template=sql.Literal(spec.template), processing=processing,
        enqueue=sql.Literal(spec.enqueue_existing))
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def worker_env(api_key: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment pgai's worker needs here: the key its embedder reads by name,
    tiktoken offline, and no proxy between it and the loopback fake server."""
    env = environment.child_environment() if base is None else dict(base)
    env["OPENAI_API_KEY"] = api_key
    env["TIKTOKEN_CACHE_DIR"] = tiktoken_cache_dir()
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def worker_command(dsn: str, *, once: bool, vectorizer_ids: Sequence[int] = (),
                   poll_interval_s: int = 1) -> list[str]:
    command = [sys.executable, "-m", "pgai", "vectorizer", "worker", "--db-url", dsn,
               "--poll-interval", str(poll_interval_s), "--log-level", "WARN"]
    for vid in vectorizer_ids:
        command += ["--vectorizer-id", str(vid)]
    if once:
        command.append("--once")
    return command


def run_pgai_worker_once(dsn: str, api_key: str, *, vectorizer_ids: Sequence[int] = (),
                         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """pgai's own worker, `--once`: processes every queued row, then exits (rc 0)."""
    done = subprocess.run(worker_command(dsn, once=True, vectorizer_ids=vectorizer_ids),
                          env=worker_env(api_key), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"pgai worker failed (rc {done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def start_pgai_worker(dsn: str, api_key: str, log_path: Path, *,
                      vectorizer_ids: Sequence[int] = (),
                      poll_interval_s: int = 1) -> subprocess.Popen[bytes]:
    """pgai's worker running continuously (stop it with terminate(): SIGTERM is graceful)."""
    log = log_path.open("ab")
    return subprocess.Popen(
        worker_command(dsn, once=False, vectorizer_ids=vectorizer_ids,
                       poll_interval_s=poll_interval_s),
        env=worker_env(api_key), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)


@dataclass(frozen=True)
class VectorizerRow:
    """The catalog's row, as a test needs it."""

    id: int
    name: str
    queue_table: str
    queue_failed_table: str
    trigger_name: str
    config: dict[str, Any]

    @property
    def target(self) -> str | None:
        """schema.table of the chunk table (table destination), else None."""
        dest = self.config["destination"]
        if dest["implementation"] != "table":
            return None
        return f"{dest['target_schema']}.{dest['target_table']}"


def vectorizer_row(conn: psycopg.Connection[Any], name: str) -> VectorizerRow:
    row = conn.execute(
        "SELECT id, name, queue_schema || '.' || queue_table,"
        " queue_schema || '.' || queue_failed_table, trigger_name, config"
        " FROM ai.vectorizer WHERE name = %s", (name,)).fetchone()
    assert row is not None, f"no pgai vectorizer {name!r}"
    return VectorizerRow(int(row[0]), row[1], row[2], row[3], row[4], row[5])


def queue_count(conn: psycopg.Connection[Any], name: str) -> int:
    """Rows in the vectorizer's queue (0 once pgai's worker is done)."""
    q = vectorizer_row(conn, name).queue_table.split(".")
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(*q))).fetchone()
    return int(row[0]) if row else 0


def chunk_checksum(conn: psycopg.Connection[Any], table: str) -> tuple[int, str]:
    """(rows, md5 over every (embedding_uuid, chunk, embedding) in uuid order) of a
    chunk table: equal before and after means no chunk row's content changed."""
    row = conn.execute(sql.SQL(
        "SELECT count(*), md5(coalesce(string_agg("
        "embedding_uuid::text || chr(1) || chunk || chr(1) || coalesce(embedding::text, ''),"
        " chr(2) ORDER BY embedding_uuid), ''))"
        " FROM {}").format(sql.Identifier(*table.split(".")))).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def chunk_row_versions(conn: psycopg.Connection[Any], table: str) -> str:
    """md5 over every row's ctid in uuid order: changes when any row is rewritten
    (an UPDATE that wrote the same values still moves the row)."""
    row = conn.execute(sql.SQL(
        "SELECT md5(coalesce(string_agg(embedding_uuid::text || ctid::text, ','"
        " ORDER BY embedding_uuid), '')) FROM {}").format(
        sql.Identifier(*table.split(".")))).fetchone()
    assert row is not None
    return str(row[0])


def make_pre_010_catalog(conn: psycopg.Connection[Any], source: str, name: str) -> None:
    """A catalog as the `ai` extension before 0.10 left it (no pgai install can make
    one): `ai.vectorizer` with the target/view columns that migration 028 folded into
    `config.destination`, chunking naming the column (`chunk_column`, before 022), no
    `loading`, no `ai.pgai_lib_version`. Only for the importer's refusal test."""
    conn.execute("CREATE SCHEMA ai")
    conn.execute(
        "CREATE TABLE ai.vectorizer (id int PRIMARY KEY, source_schema name, source_table name,"
        " source_pk jsonb, target_schema name, target_table name, view_schema name,"
        " view_name name, trigger_name name, queue_schema name, queue_table name,"
        " config jsonb, disabled bool NOT NULL DEFAULT false)")
    schema, table = source.split(".") if "." in source else ("public", source)
    config = {
        "version": "0.9.0",
        "chunking": {"implementation": "recursive_character_text_splitter",
                     "config_type": "chunking", "chunk_column": "body", "chunk_size": 800,
                     "chunk_overlap": 400, "separators": ["\n\n", "\n", ".", "?", "!", " ", ""],
                     "is_separator_regex": False},
        "embedding": {"implementation": "openai", "config_type": "embedding",
                      "model": "text-embedding-3-small", "dimensions": 64,
                      "api_key_name": "OPENAI_API_KEY"},
        "formatting": {"implementation": "python_template", "config_type": "formatting",
                       "template": "$chunk"},
    }
    conn.execute(
        "INSERT INTO ai.vectorizer VALUES (1, %s, %s, %s, %s, %s, %s, %s,"
        " '_vectorizer_src_trg_1', 'ai', '_vectorizer_q_1', %s)",
        (schema, table, psycopg.types.json.Jsonb(
            [{"attnum": 1, "pknum": 1, "attname": "id", "typname": "bigint"}]),
         schema, f"{name}_store", schema, name, psycopg.types.json.Jsonb(config)))
