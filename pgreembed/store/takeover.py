"""pgreembed's side of a take-over from pgai: which vectorizer a target took over and
whether it was undone, pgai's failures recorded as the parents', the live slot's pause
while pgai is in charge, and the marks that move work between the two.

`pgreembed.pgai_takeovers` has one row per chunked target taken over (state `taken` or
`undone`); `in_flight` holds the keys a pgai batch was writing at the take-over (as
text), marked dirty once that batch is over, so a crash between the two loses none: the
next `--take-over` finishes it. `pgreembed.chunk_failed_<target>` records a parent
pgreembed was handed as failed, with the md5 of its text and template columns then:
like a chunk's failure, it stands while the parent's text is unchanged (an edit marks
the parent dirty and the chunk stage chunks it again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.store.chunk_sets import parent_version
from pgreembed.store.chunks import dirty_table, parent_target
from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.slots import NOTIFY_CHANNEL, SCHEMA, Slot, app_table
from pgreembed.store.trusted_sql import NO_PARAMS

PAUSED_BY_PGAI = "pgai"


def failed_table(target: Target) -> sql.Identifier:
    return sql.Identifier(SCHEMA, f"chunk_failed_{target.name}")


def ensure_registry(conn: psycopg.Connection) -> None:
    """The registry of take-overs, if missing."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS pgreembed.pgai_takeovers (target text PRIMARY KEY,"
        " vectorizer_id int NOT NULL, vectorizer text NOT NULL, state text NOT NULL,"
        " in_flight text[] NOT NULL DEFAULT '{}', taken_at timestamptz,"
        " undone_at timestamptz)")


def ensure_tables(conn: psycopg.Connection, target: Target, key: ParentKey) -> None:
    """The registry and the chunked target's parent-failure table (one column per key
    column, named as the dirty table's), if missing."""
    ensure_registry(conn)
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {failed} ({columns}, PRIMARY KEY ({marks}),"
        " pgr_version text NOT NULL, pgr_failure text NOT NULL,"
        " pgr_failed_at timestamptz NOT NULL, pgr_recorded_at timestamptz NOT NULL"
        " DEFAULT now())").format(
        failed=failed_table(target), marks=key.cols(marks=True),
        columns=sql.SQL(", ").join(sql.SQL("{} {} NOT NULL").format(sql.Identifier(m),
                                                                     sql.SQL(t))
                                   for m, t in zip(key.marks, key.types, strict=True))))


@dataclass(frozen=True)
class Takeover:
    target: str
    vectorizer_id: int
    vectorizer: str
    state: str
    in_flight: list[str]
    taken_at: datetime | None
    undone_at: datetime | None


def read_takeover(conn: psycopg.Connection, target: Target) -> Takeover | None:
    found = conn.execute("SELECT to_regclass('pgreembed.pgai_takeovers')").fetchone()
    if found is None or found[0] is None:
        return None
    row = conn.execute("SELECT target, vectorizer_id, vectorizer, state, in_flight, taken_at,"
                       " undone_at FROM pgreembed.pgai_takeovers WHERE target = %s",
                       (target.name,)).fetchone()
    return None if row is None else Takeover(row[0], row[1], row[2], row[3], list(row[4]),
                                             row[5], row[6])


def record_undone(conn: psycopg.Connection, target: Target) -> None:
    conn.execute("UPDATE pgreembed.pgai_takeovers SET state = 'undone', undone_at = now(),"
                 " in_flight = '{}' WHERE target = %s", (target.name,))


def mark_dirty(conn: psycopg.Connection, target: Target, key: ParentKey,
               keys: Sequence[Any]) -> tuple[int, int]:
    """Mark `keys` (in text form, ParentKey.text) for the chunk stage; a key whose parent
    is gone needs nothing (pgai's trigger, or ours, removed its chunks). Returns
    (marked now, parents gone)."""
    if not keys:
        return 0, 0
    ids = {"dirty": dirty_table(target), "parent": app_table(parent_target(target)),
           "key": key.cols("p"), "marks": key.cols(marks=True),
           "among": key.among_texts("p")}
    texts = [str(k) for k in keys]
    existing = conn.execute(sql.SQL(
        "SELECT count(*) FROM {parent} p WHERE {among}").format(**ids), (texts,)).fetchone()
    marked = conn.execute(sql.SQL(
        "INSERT INTO {dirty} ({marks}) SELECT {key} FROM {parent} p"
        " WHERE {among} ON CONFLICT DO NOTHING").format(**ids), (texts,)).rowcount
    return marked, len(set(texts)) - (int(existing[0]) if existing else 0)


def clear_in_flight(conn: psycopg.Connection, target: Target) -> None:
    conn.execute("UPDATE pgreembed.pgai_takeovers SET in_flight = '{}' WHERE target = %s",
                 (target.name,))


def record_failures(conn: psycopg.Connection, target: Target, key: ParentKey,
                    failed: Sequence[tuple[Any, datetime, str]]) -> int:
    """Record (key in text form, failed_at, reason) as failures of the parents, against
    their current text; a parent gone is skipped. Returns how many were recorded."""
    if not failed:
        return 0
    ids = {"failed": failed_table(target), "parent": app_table(parent_target(target)),
           "key": key.cols("p"), "row": key.row("p"), "marks": key.cols(marks=True),
           "values": key.from_text(sql.SQL("f.pgr_k")), "version": parent_version(target)}
    return conn.execute(sql.SQL(
        "INSERT INTO {failed} ({marks}, pgr_version, pgr_failure, pgr_failed_at)"
        " SELECT {key}, {version}, f.pgr_reason, f.pgr_at FROM unnest(%s::text[],"
        " %s::timestamptz[], %s::text[]) AS f(pgr_k, pgr_at, pgr_reason)"
        " JOIN {parent} p ON {row} = ({values})"
        " ON CONFLICT ({marks}) DO UPDATE SET pgr_version = EXCLUDED.pgr_version,"
        " pgr_failure = EXCLUDED.pgr_failure, pgr_failed_at = EXCLUDED.pgr_failed_at,"
        " pgr_recorded_at = now()").format(**ids),
        failure_arrays(failed)).rowcount


def failure_arrays(failed: Sequence[tuple[Any, datetime, str]]
                   ) -> tuple[list[str], list[datetime], list[str]]:
    """(keys as text, when, reasons): the three arrays a failure recording unnests."""
    return ([str(k) for k, _, _ in failed], [at for _, at, _ in failed],
            [reason for _, _, reason in failed])


@dataclass(frozen=True)
class ParentFailure:
    key: str
    reason: str
    failed_at: datetime

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "reason": self.reason, "failed_at": self.failed_at.isoformat()}


def parent_failures(conn: psycopg.Connection, target: Target, key: ParentKey, limit: int
                    ) -> tuple[int, list[ParentFailure]]:
    """(parents failed on their current text, the `limit` most recent). A parent edited
    since it failed is not listed: the edit marked it to be chunked again."""
    found = conn.execute("SELECT to_regclass(%s)", (failed_table(target).as_string(conn),)
                         ).fetchone()
    if found is None or found[0] is None:
        return 0, []
    rows = conn.execute(sql.SQL(
        "SELECT {text}, f.pgr_failure, f.pgr_failed_at, count(*) OVER ()"
        " FROM {failed} f JOIN {parent} p ON {joined}"
        " WHERE f.pgr_version = {version} ORDER BY f.pgr_failed_at DESC, {marks} LIMIT %s"
    ).format(failed=failed_table(target), parent=app_table(parent_target(target)),
             text=key.text("f", marks=True), joined=key.equal("p", "f", right_marks=True),
             marks=key.cols("f", marks=True), version=parent_version(target)),
        (limit,)).fetchall()
    total = int(rows[0][3]) if rows else 0
    return total, [ParentFailure(k, reason, at) for k, reason, at, _ in rows]


def retry_parent_failures(conn: psycopg.Connection, target: Target, key: ParentKey) -> int:
    """Mark the failed parents dirty (the chunk stage tries them again) and forget the
    records; the caller commits. Returns how many."""
    found = conn.execute("SELECT to_regclass(%s)", (failed_table(target).as_string(conn),)
                         ).fetchone()
    if found is None or found[0] is None:
        return 0
    keys = [r[0] for r in conn.execute(sql.SQL(
        "DELETE FROM {failed} RETURNING {text}").format(
        failed=failed_table(target), text=key.text(marks=True)), NO_PARAMS).fetchall()]
    if keys:
        conn.execute(sql.SQL(
            "INSERT INTO {dirty} ({marks}) SELECT {key} FROM {parent} p"
            " WHERE {among} ON CONFLICT DO NOTHING").format(
            dirty=dirty_table(target), parent=app_table(parent_target(target)),
            marks=key.cols(marks=True), key=key.cols("p"), among=key.among_texts("p")),
            (keys,))
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, target.name))
    return len(keys)


def take_dirty(conn: psycopg.Connection, target: Target, key: ParentKey) -> list[str]:
    """Delete every dirty mark and return the keys in text form (an undo hands them to
    pgai). Waits on a chunk stage applying some (its transaction is short); the caller's
    lock_timeout bounds it."""
    return [r[0] for r in conn.execute(sql.SQL(
        "DELETE FROM {dirty} RETURNING {text}").format(
        dirty=dirty_table(target), text=key.text(marks=True)), NO_PARAMS).fetchall()]


def parents_with_pending_chunks(conn: psycopg.Connection, target: Target, key: ParentKey,
                                vector: sql.Identifier) -> list[str]:
    """Parents (text form) with a chunk whose live vector is NULL (pending or failed):
    pgai's worker writes every chunk of a parent again, so an undo hands these back whole."""
    return [r[0] for r in conn.execute(sql.SQL(
        "SELECT DISTINCT {text} FROM {chunks} WHERE {vector} IS NULL").format(
        text=key.text(), chunks=app_table(target), vector=vector),
        NO_PARAMS).fetchall()]


def pause_live(conn: psycopg.Connection, slot: Slot, paused: bool) -> None:
    """While pgai is in charge (after an undo) the live slot is paused, so the scheduler
    sends nothing of the chunk table; a take-over lifts only a pause it made."""
    if paused:
        conn.execute("UPDATE pgreembed.slots SET paused = true, paused_by = %s"
                     " WHERE id = %s AND NOT paused", (PAUSED_BY_PGAI, slot.id))
    else:
        conn.execute("UPDATE pgreembed.slots SET paused = false, paused_by = NULL"
                     " WHERE id = %s AND paused_by = %s", (slot.id, PAUSED_BY_PGAI))


def notify(conn: psycopg.Connection, target: Target) -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, target.name))



def pgai_keeps_current(conn: psycopg.Connection, target: Target) -> bool:
    """Whether pgai's worker, not pgreembed, keeps the target's live vectors current: a
    chunk table by `pgai_in_charge`, a column by its live slot paused for pgai (adopted
    while pgai's vectorizer was enabled and not taken over, or handed back by --undo).
    What `status` and the import-pgai plan say."""
    if target.parent is not None:
        return pgai_in_charge(conn, target)
    row = conn.execute("SELECT paused_by = %s FROM pgreembed.slots WHERE target = %s"
                       " AND role = 'live' AND paused", (PAUSED_BY_PGAI, target.name)
                       ).fetchone()
    return bool(row and row[0])


def pgai_in_charge(conn: psycopg.Connection, target: Target) -> bool:
    """Whether pgai's worker, not pgreembed, keeps this chunk table current: an enabled
    pgai vectorizer writes it and no take-over happened, or the take-over was undone.
    `init` then leaves the parent's triggers to the take-over (both sides' triggers on
    at once would chunk and embed every write twice)."""
    found = conn.execute("SELECT to_regclass('pgreembed.pgai_takeovers') IS NOT NULL,"
                         " to_regclass('ai.vectorizer') IS NOT NULL").fetchone()
    if found is None:
        return False
    registry, pgai = found
    if registry:
        row = conn.execute("SELECT state FROM pgreembed.pgai_takeovers WHERE target = %s",
                           (target.name,)).fetchone()
        if row is not None:
            return bool(row[0] == "undone")
    if not pgai:
        return False
    return conn.execute(
        "SELECT EXISTS (SELECT FROM ai.vectorizer WHERE NOT disabled"
        " AND config -> 'destination' ->> 'implementation' = 'table'"
        " AND config -> 'destination' ->> 'target_schema' = %s"
        " AND config -> 'destination' ->> 'target_table' = %s)",
        (target.schema, target.table)).fetchone() == (True,)
