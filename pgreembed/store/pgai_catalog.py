"""Reads of pgai's catalog and of the tables its vectorizers fill (import-pgai).

Read-only: nothing here changes pgai's objects. Every name comes from the catalog and
goes into SQL through psycopg.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.pgai_values import (
    CatalogVersion,
    Counts,
    KeyColumn,
    StoredChunk,
    StoredParent,
    Vectorizer,
)


def _exists(conn: psycopg.Connection, relation: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()
    return bool(row and row[0])


def catalog_version(conn: psycopg.Connection) -> CatalogVersion:
    """Which pgai (if any) the database holds; reads only the catalog."""
    installed = _exists(conn, "ai.vectorizer")
    lib = None
    if _exists(conn, "ai.pgai_lib_version"):
        row = conn.execute(
            "SELECT version FROM ai.pgai_lib_version WHERE name = 'ai'").fetchone()
        lib = None if row is None else str(row[0])
    ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'ai'").fetchone()
    legacy = installed and conn.execute(
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'ai.vectorizer'::regclass"
        " AND attname = 'target_table' AND NOT attisdropped)").fetchone() == (True,)
    return CatalogVersion(installed, lib, None if ext is None else str(ext[0]), legacy)


def vectorizers(conn: psycopg.Connection, names: Sequence[str] | None = None
                ) -> list[Vectorizer]:
    """The catalog's vectorizers (all, or those named), by id."""
    rows = conn.execute(
        "SELECT id, name, source_schema, source_table, source_pk, config, disabled,"
        " queue_schema, queue_table, queue_failed_table, trigger_name"
        " FROM ai.vectorizer WHERE %s::text[] IS NULL OR name = ANY(%s::text[])"
        " ORDER BY id", (None if names is None else list(names),
                         None if names is None else list(names))).fetchall()
    found = []
    for (vid, name, schema, table, pk, config, disabled, q_schema, q_table, q_failed,
         trigger) in rows:
        keys = tuple(sorted((KeyColumn(str(c["attname"]), str(c["typname"]), int(c["pknum"]))
                             for c in pk), key=lambda c: c.pknum))
        found.append(Vectorizer(int(vid), str(name), str(schema), str(table), keys,
                                dict(config), bool(disabled), str(q_schema), str(q_table),
                                None if q_failed is None else str(q_failed), str(trigger)))
    return found


def _count(conn: psycopg.Connection, query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def counts(conn: psycopg.Connection, v: Vectorizer) -> Counts:
    """Exact counts (each a scan of its table: seconds per million rows)."""
    source = sql.Identifier(v.source_schema, v.source_table)
    keys = sql.SQL(", ").join(sql.Identifier(k.name) for k in v.source_pk)
    if v.chunk_table is not None:
        chunks = _count(conn, sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(*v.chunk_table)))
    else:
        column = str(v.section("destination").get("embedding_column"))
        chunks = _count(conn, sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(
            source, sql.Identifier(column)))
    queue = sql.Identifier(v.queue_schema, v.queue_table)
    queued = _count(conn, sql.SQL("SELECT count(*) FROM (SELECT DISTINCT {} FROM {}) q").format(
        keys, queue)) if _exists(conn, queue.as_string(conn)) else 0
    failed = 0
    if v.queue_failed_table is not None:
        table = sql.Identifier(v.queue_schema, v.queue_failed_table)
        if _exists(conn, table.as_string(conn)):
            failed = _count(conn, sql.SQL("SELECT count(*) FROM {}").format(table))
    return Counts(rows=_count(conn, sql.SQL("SELECT count(*) FROM {}").format(source)),
                  chunks=chunks, queued=queued, failed=failed)


def sample_parents(conn: psycopg.Connection, v: Vectorizer, text_column: str, size: int
                   ) -> list[StoredParent]:
    """Up to `size` random source rows that pgai has chunked and that are not queued (a
    queued row's chunks may be of an older text), each with its stored chunks. A parent's
    key is a tuple when the source's key has several columns."""
    assert v.chunk_table is not None
    key = ParentKey(tuple(k.name for k in v.source_pk), tuple(k.type for k in v.source_pk))
    ids = {"source": sql.Identifier(v.source_schema, v.source_table), "key": key.cols(),
           "chunks": sql.Identifier(*v.chunk_table), "among": key.among(),
           "queue": sql.Identifier(v.queue_schema, v.queue_table),
           "chunked": key.equal("c", "s"), "queued": key.equal("q", "s")}
    with conn.cursor(row_factory=dict_row) as cur:
        parents = cur.execute(sql.SQL(
            "SELECT s.* FROM {source} s WHERE EXISTS (SELECT FROM {chunks} c"
            " WHERE {chunked}) AND NOT EXISTS (SELECT FROM {queue} q"
            " WHERE {queued}) ORDER BY random() LIMIT %s").format(**ids),
            (size,)).fetchall()
    if not parents:
        return []
    keys = [key.value([p[c] for c in key.columns]) for p in parents]
    stored: dict[Any, list[str]] = {}
    for row in conn.execute(sql.SQL(
            "SELECT {key}, chunk FROM {chunks} WHERE {among} ORDER BY {key}, chunk_seq"
    ).format(**ids), key.params(keys)).fetchall():
        stored.setdefault(key.value(row[:-1]), []).append(row[-1])
    return [StoredParent(k, p.get(text_column), dict(p), stored.get(k, []))
            for k, p in zip(keys, parents, strict=True)]


def sample_chunks(conn: psycopg.Connection, table: tuple[str, str], key: str, text: sql.Composable,
                  vector: str, size: int) -> list[StoredChunk]:
    """Up to `size` random (key, embedded text, stored vector) of a filled table."""
    rows = conn.execute(sql.SQL(
        "SELECT {key}, ({text})::text, {vector}::real[] FROM {table}"
        " WHERE {vector} IS NOT NULL ORDER BY random() LIMIT %s").format(
        key=sql.Identifier(key), text=text, vector=sql.Identifier(vector),
        table=sql.Identifier(*table)), (size,)).fetchall()
    return [StoredChunk(k, t or "", list(vec)) for k, t, vec in rows]


def state_rows(conn: psycopg.Connection, state_table: sql.Identifier, model_id: int) -> int:
    """State rows recorded as embedded by `model_id` (what an adoption wrote)."""
    return _count(conn, sql.SQL("SELECT count(*) FROM {} WHERE pgr_model_id = {}").format(
        state_table, sql.Literal(model_id)))
