"""An adopted chunk table (import-pgai): its chunks taken as made with the current settings,
and its NOT NULL vector column (pgai's) opened for pending chunks."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.store import chunk_settings
from pgreembed.store.chunks import chunking_key, dirty_table, parent_of
from pgreembed.store.slots import app_table


def record_chunking_current(conn: psycopg.Connection, target: Target) -> int:
    """Say the chunk sets were made with the current settings, marking nothing (an adopted
    pgai table: its chunks are pgai's, made with the settings they map to). Returns 0."""
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
        dirty_table(target), sql.Literal(chunk_settings.comment(
            chunking_key(target), parent_of(target).chunking))))
    return 0


def vector_not_null(conn: psycopg.Connection, target: Target) -> bool:
    """Whether the chunk table's vector column is NOT NULL (pgai's is)."""
    found = conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attname = %s AND NOT attisdropped",
        (app_table(target).as_string(conn), target.vector_column)).fetchone()
    return bool(found and found[0])


def allow_pending(conn: psycopg.Connection, target: Target) -> None:
    """DROP NOT NULL on the vector column (catalog only: no row is rewritten), so new
    chunks can wait for their vector. In the caller's transaction (run_locked)."""
    conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(
        app_table(target), sql.Identifier(target.vector_column)))
