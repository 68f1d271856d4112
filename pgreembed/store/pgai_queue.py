"""pgai 0.12.1's side of a take-over: its catalog row, its source triggers, its queue and
failed queue, and its `disabled` flag (the SQL; pgreembed.operations.pgai_takeover runs it).

What pgai's worker reads (pgai/vectorizer/vectorizer.py, `_should_continue_processing`):
`SELECT disabled FROM ai.vectorizer WHERE id = ...` before every batch, so setting it stops
the worker between batches; `ai.disable_vectorizer_schedule(id)` is pgai's own function
for it (it also unschedules a timescaledb job). The source triggers
(`_vectorizer_src_trg_<id>` and `..._truncate`) enqueue every insert and update into
`<queue_schema>.<queue_table>` (no unique key: a key may be queued many times); the worker
claims queue rows `FOR UPDATE SKIP LOCKED` and deletes them in the transaction that writes
their chunks. Keys it gave up on are in `<queue_failed_table>` (key, failure_step,
created_at), with the message in `ai._vectorizer_errors` under the same timestamp (both
are written in one transaction, so `recorded = created_at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.errors import NotFoundError, SetupError
from pgreembed.store.trusted_sql import NO_PARAMS


@dataclass(frozen=True)
class PgaiVectorizer:
    """The parts of an `ai.vectorizer` row a take-over touches."""

    id: int
    name: str
    source_schema: str
    source_table: str
    key: str  # the source's primary key column (single-column keys only, for now)
    trigger_name: str
    queue_schema: str
    queue_table: str
    failed_table: str | None
    destination: str  # "table" or "column"
    target_schema: str | None  # table destination: the chunk table
    target_table: str | None
    disabled: bool

    @property
    def source(self) -> sql.Identifier:
        return sql.Identifier(self.source_schema, self.source_table)

    @property
    def queue(self) -> sql.Identifier:
        return sql.Identifier(self.queue_schema, self.queue_table)

    @property
    def triggers(self) -> list[str]:
        """Its two triggers on the source: the row trigger and the TRUNCATE one."""
        return [self.trigger_name, f"{self.trigger_name}_truncate"]


def _from_row(row: tuple[Any, ...]) -> PgaiVectorizer:
    vid, name, schema, table, source_pk, trigger, q_schema, q_table, failed, config, off = row
    if len(source_pk) != 1:
        columns = ", ".join(str(c["attname"]) for c in source_pk)
        raise SetupError(f"pgai vectorizer {name!r}: {schema}.{table} has a composite key"
                         f" ({columns}); a take-over needs a single-column key (not done yet)")
    destination = config.get("destination", {})
    return PgaiVectorizer(
        id=int(vid), name=str(name), source_schema=str(schema), source_table=str(table),
        key=str(source_pk[0]["attname"]), trigger_name=str(trigger),
        queue_schema=str(q_schema), queue_table=str(q_table),
        failed_table=None if failed is None else str(failed),
        destination=str(destination.get("implementation", "table")),
        target_schema=destination.get("target_schema"),
        target_table=destination.get("target_table"), disabled=bool(off))


def read_vectorizers(conn: psycopg.Connection, names: list[str] | None
                     ) -> list[PgaiVectorizer]:
    """The catalog's vectorizers named (all when None), in id order; NotFoundError names
    any missing one. Requires pgai >= 0.10's catalog (a `name` and `disabled` column)."""
    found = conn.execute("SELECT to_regclass('ai.vectorizer')").fetchone()
    if found is None or found[0] is None:
        raise NotFoundError("no pgai catalog in this database (table ai.vectorizer is missing)")
    rows = conn.execute(
        "SELECT id, name, source_schema, source_table, source_pk, trigger_name, queue_schema,"
        " queue_table, queue_failed_table, config, disabled FROM ai.vectorizer"
        " WHERE %s::text[] IS NULL OR name = ANY(%s::text[]) ORDER BY id",
        (names, names)).fetchall()
    missing = sorted(set(names or []) - {str(r[1]) for r in rows})
    if missing:
        raise NotFoundError(f"no pgai vectorizer named {', '.join(missing)}")
    return [_from_row(r) for r in rows]


def triggers_enabled(conn: psycopg.Connection, vec: PgaiVectorizer) -> dict[str, bool]:
    """Its source triggers that exist, and whether each is enabled."""
    return {str(name): state != "D" for name, state in conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(%s)"
        " AND tgname = ANY(%s)", (vec.source.as_string(conn), vec.triggers)).fetchall()}


def set_triggers_enabled(conn: psycopg.Connection, vec: PgaiVectorizer, enabled: bool
                         ) -> None:
    """ENABLE/DISABLE its source triggers in one ALTER TABLE: SHARE ROW EXCLUSIVE on the
    source (reads go on; DROP TRIGGER would need ACCESS EXCLUSIVE). The triggers stay, for
    an undo. The caller holds the table-lock policy."""
    present = list(triggers_enabled(conn, vec))
    if not present:
        raise SetupError(f"pgai vectorizer {vec.name!r}: its triggers {', '.join(vec.triggers)}"
                         f" are not on {vec.source_schema}.{vec.source_table}")
    verb = sql.SQL("ENABLE" if enabled else "DISABLE")
    conn.execute(sql.SQL("ALTER TABLE {} {}").format(vec.source, sql.SQL(", ").join(
        sql.SQL("{} TRIGGER {}").format(verb, sql.Identifier(t)) for t in present)))


@dataclass(frozen=True)
class QueueTaken:
    """What was in pgai's queue: the rows deleted and their distinct keys, and the rows a
    pgai batch in flight holds (claimed before; its commit deletes them) and their keys."""

    deleted: int
    moved: list[Any]
    held: int
    in_flight: list[Any]


def take_queue(conn: psycopg.Connection, vec: PgaiVectorizer) -> QueueTaken:
    """Delete the queue rows no pgai batch holds, and return the distinct keys of both
    kinds (the caller marks them; a key may be queued many times). Never waits on a pgai
    batch: its rows are skipped, as its own claim skips ours."""
    ids = {"q": vec.queue, "key": sql.Identifier(vec.key)}
    moved = conn.execute(sql.SQL(
        "WITH free AS (SELECT ctid FROM {q} FOR UPDATE SKIP LOCKED),"
        " gone AS (DELETE FROM {q} WHERE ctid IN (SELECT ctid FROM free) RETURNING {key})"
        " SELECT {key}, count(*) FROM gone GROUP BY {key} ORDER BY {key}").format(**ids),
        NO_PARAMS).fetchall()
    held = conn.execute(sql.SQL(
        "SELECT {key}, count(*) FROM {q} GROUP BY {key} ORDER BY {key}").format(**ids),
        NO_PARAMS).fetchall()
    return QueueTaken(deleted=sum(int(n) for _, n in moved), moved=[k for k, _ in moved],
                      held=sum(int(n) for _, n in held), in_flight=[k for k, _ in held])


def queue_rows(conn: psycopg.Connection, vec: PgaiVectorizer) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(vec.queue),
                       NO_PARAMS).fetchone()
    return int(row[0]) if row else 0


def hand_back(conn: psycopg.Connection, vec: PgaiVectorizer, keys: list[Any], key_type: str
              ) -> int:
    """Queue `keys` for pgai's worker (an undo): it re-chunks and re-embeds each."""
    if not keys:
        return 0
    return conn.execute(sql.SQL(
        "INSERT INTO {q} ({key}) SELECT DISTINCT k FROM unnest(%s::{type}[]) k").format(
        q=vec.queue, key=sql.Identifier(vec.key), type=sql.SQL(key_type)), (keys,)).rowcount


@dataclass(frozen=True)
class PgaiFailure:
    key: Any
    step: str
    failed_at: datetime
    reason: str


def failures(conn: psycopg.Connection, vec: PgaiVectorizer) -> list[PgaiFailure]:
    """Keys in pgai's failed queue, the latest failure per key, with pgai's message for it
    (`ai._vectorizer_errors` rows of the same vectorizer and timestamp) when there is one."""
    if vec.failed_table is None:
        return []
    failed = sql.Identifier(vec.queue_schema, vec.failed_table)
    errors = conn.execute("SELECT to_regclass('ai._vectorizer_errors') IS NOT NULL").fetchone()
    message = sql.SQL(
        "(SELECT string_agg(DISTINCT e.message || coalesce(': ' || (e.details ->> 'error_reason'),"
        " ''), '; ') FROM ai._vectorizer_errors e WHERE e.id = %s AND e.recorded = f.created_at)"
    ) if errors == (True,) else sql.SQL("NULL::text")
    params = (vec.id,) if errors == (True,) else ()
    rows = conn.execute(sql.SQL(
        "SELECT DISTINCT ON (f.{key}) f.{key}, f.failure_step, f.created_at, {message}"
        " FROM {failed} f ORDER BY f.{key}, f.created_at DESC").format(
        key=sql.Identifier(vec.key), failed=failed, message=message), params).fetchall()
    return [PgaiFailure(k, str(step or ""), at,
                        f"pgai gave up at step {step or 'unknown'!r}"
                        + (f": {text}" if text else " (pgai recorded no message)"))
            for k, step, at, text in rows]


def set_disabled(conn: psycopg.Connection, vec: PgaiVectorizer, disabled: bool) -> None:
    """pgai's own switch: its worker checks `disabled` before every batch."""
    function = "disable_vectorizer_schedule" if disabled else "enable_vectorizer_schedule"
    conn.execute(sql.SQL("SELECT ai.{}(%s::int4)").format(sql.Identifier(function)),
                 (vec.id,))
