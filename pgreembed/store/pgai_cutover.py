"""The take-over's switch from pgai to pgreembed as one round trip to Postgres.

The transaction holds SHARE ROW EXCLUSIVE on the app's table from its first statement to
its commit, and every app write waits that long: so it is one multi-statement query (the
simple protocol; every value a literal composed by psycopg.sql) plus the commit, not a
dozen round trips. Measured on a 2-core VM at load average ~30: ten statements held the
lock 173 ms; this: see docs/pgai.md (Part 2, Figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.errors import DatabaseError
from pgreembed.store.chunks import dirty_table, parent_target
from pgreembed.store.pgai_queue import key_of, queue_of, source_of
from pgreembed.store.pgai_values import Vectorizer
from pgreembed.store.slots import NOTIFY_CHANNEL, Slot, app_table
from pgreembed.store.takeover import PAUSED_BY_PGAI


@dataclass(frozen=True)
class Switched:
    deleted: int  # pgai queue rows deleted (no pgai batch held them)
    keys: int  # their distinct keys
    marked: int  # ... marked dirty now (a key already dirty is not counted)
    gone: int  # ... whose source row no longer exists
    held: int  # queue rows a pgai batch in flight holds (left for its commit)
    queued: list[str]  # every distinct key queued at the switch (moved or held), as text
    in_flight: list[str]  # the held ones' keys, kept in the registry until marked


def switch_to_pgreembed(conn: psycopg.Connection, target: Target, vec: Vectorizer,
                        pgai_triggers: list[str], ours: list[str], live: Slot) -> Switched:
    """pgai's triggers off and ours on (one ALTER TABLE), the queue's free rows moved to our
    dirty marks, the held ones' keys recorded, a pause an undo made lifted, the scheduler
    woken; in the caller's transaction (run_locked), which commits. Keys are joined on every
    key column and recorded in text form (ParentKey.text)."""
    key = key_of(vec)
    ids = {"source": source_of(vec), "q": queue_of(vec), "key": key.cols(),
           "of_parent": key.equal("p", "keys"), "parent_key": key.cols("p"),
           "marks": key.cols(marks=True), "keys_text": key.text("keys"),
           "held_text": key.text("held"),
           "dirty": dirty_table(target), "parent": app_table(parent_target(target)),
           "target": sql.Literal(target.name), "vid": sql.Literal(vec.id),
           "vname": sql.Literal(vec.name), "slot": sql.Literal(live.id),
           "by": sql.Literal(PAUSED_BY_PGAI), "channel": sql.Literal(NOTIFY_CHANNEL),
           "switch": sql.SQL(", ").join(
               [sql.SQL("DISABLE TRIGGER {}").format(sql.Identifier(t)) for t in pgai_triggers]
               + [sql.SQL("ENABLE TRIGGER {}").format(sql.Identifier(t)) for t in ours])}
    cur = conn.execute(sql.SQL(
        "ALTER TABLE {source} {switch};\n"
        "WITH free AS (SELECT ctid FROM {q} FOR UPDATE SKIP LOCKED),"
        " gone AS (DELETE FROM {q} WHERE ctid IN (SELECT ctid FROM free) RETURNING {key}),"
        " keys AS (SELECT DISTINCT {key} FROM gone),"
        " marked AS (INSERT INTO {dirty} ({marks}) SELECT {parent_key} FROM {parent} p"
        "  JOIN keys ON {of_parent} ON CONFLICT DO NOTHING RETURNING 1)"
        " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM keys),"
        " (SELECT count(*) FROM marked), (SELECT count(*) FROM keys WHERE NOT EXISTS"
        "  (SELECT FROM {parent} p WHERE {of_parent})), ARRAY(SELECT {keys_text} FROM keys);\n"
        "WITH held AS (SELECT {key} FROM {q}),"
        " taken AS (INSERT INTO pgreembed.pgai_takeovers AS t (target, vectorizer_id,"
        "  vectorizer, state, in_flight, taken_at)"
        "  SELECT {target}, {vid}, {vname}, 'taken', ARRAY(SELECT DISTINCT {held_text}"
        "  FROM held), now()"
        "  ON CONFLICT (target) DO UPDATE SET vectorizer_id = EXCLUDED.vectorizer_id,"
        "  vectorizer = EXCLUDED.vectorizer, state = 'taken', taken_at = now(),"
        "  undone_at = NULL, in_flight = ARRAY(SELECT DISTINCT unnest(t.in_flight"
        "  || EXCLUDED.in_flight)) RETURNING 1)"
        " SELECT (SELECT count(*) FROM held), (SELECT count(*) FROM taken),"
        " ARRAY(SELECT DISTINCT {held_text} FROM held);\n"
        "UPDATE pgreembed.slots SET paused = false, paused_by = NULL WHERE id = {slot}"
        " AND paused_by = {by};\n"
        "SELECT pg_notify({channel}, {target})").format(**ids))
    deleted, keys, marked, gone, moved = _row(cur)
    cur.nextset()
    held, _, in_flight = _row(cur)
    return Switched(deleted, keys, marked, gone, held, [*moved, *in_flight], list(in_flight))


def _row(cur: psycopg.Cursor) -> tuple[Any, ...]:
    while cur.description is None:  # ALTER TABLE: no rows
        if not cur.nextset():
            raise DatabaseError("the cut-over query returned fewer results than it has SELECTs")
    row = cur.fetchone()
    assert row is not None
    return tuple(row)
