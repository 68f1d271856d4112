"""Removing state rows of rows the app deleted while our DELETE trigger could not see it.

The DELETE/TRUNCATE triggers (`schema.install_forget_triggers`) keep the state
tables clean as rows go. This sweep is the backstop for the rest: rows deleted
while the triggers were off (`trigger = false`, `DISABLE TRIGGER`, a replica
session), before this version installed them, or by truncating one partition.
No query of pending work trusts a state row alone (they all join the app's
table), so an orphan only costs space: the sweep may be slow, but must be
bounded. It walks the state table in keyset pages, at most one page per slot
every `EVERY_SECONDS` whatever the number of schedulers and ticks (a Redis key
with an expiry is the clock), and never scans the app's table: one primary-key
probe per state row of the page. The cursor lives in Redis next to it; if Redis
loses it, the walk restarts from the first key, which is harmless.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis
from psycopg import sql

from pgreembed.store.slots import Slot

PAGE_ROWS = 5000
EVERY_SECONDS = 10
CURSOR_TTL_SECONDS = 7 * 24 * 3600


def forget_deleted_page(conn: psycopg.Connection, slot: Slot, after: str | None,
                        limit: int = PAGE_ROWS) -> tuple[str | None, int]:
    """Delete the state rows of deleted app rows among the `limit` state rows after `after`.

    Returns (the page's last key as text, or None when the page reached the end;
    rows deleted).
    """
    condition: sql.Composable = sql.SQL("TRUE")
    params: tuple[Any, ...] = ()
    if after is not None:
        condition = sql.SQL("pgr_pk > %s::{}").format(slot.pk_cast)
        params = (after,)
    row = conn.execute(sql.SQL(
        """
        WITH page AS (
            SELECT pgr_pk FROM {state} WHERE {condition} ORDER BY pgr_pk LIMIT %s
        ), gone AS (
            DELETE FROM {state} s USING page p
            WHERE s.pgr_pk = p.pgr_pk
              AND NOT EXISTS (SELECT 1 FROM {table} a WHERE {key})
            RETURNING 1
        )
        SELECT (SELECT pgr_pk::text FROM page ORDER BY pgr_pk DESC LIMIT 1),
               (SELECT count(*) FROM page), (SELECT count(*) FROM gone)
        """
    ).format(state=slot.state_table, condition=condition, table=slot.table,
             key=slot.state_key(state="p")),
        (*params, limit)).fetchone()
    assert row is not None
    last, seen, removed = row
    return (last if seen == limit else None), int(removed)


class OrphanSweep:
    """One bounded step of the walk per slot when it is due; shared through Redis."""

    def __init__(self, client: redis.Redis, namespace: str = "pgreembed",
                 every_seconds: int = EVERY_SECONDS, page_rows: int = PAGE_ROWS) -> None:
        self.redis = client
        self.namespace = namespace
        self.every_seconds = every_seconds
        self.page_rows = page_rows

    def _key(self, slot: Slot, what: str) -> str:
        return f"{self.namespace}:orphans:{slot.id}:{what}"

    def step(self, conn: psycopg.Connection, slot: Slot) -> int:
        """Sweep one page of `slot` if no one did in the last `every_seconds`; commits.

        Returns the number of state rows deleted.
        """
        if not self.redis.set(self._key(slot, "due"), 1, nx=True, ex=self.every_seconds):
            return 0
        cursor_key = self._key(slot, "after")
        raw = self.redis.get(cursor_key)
        after = raw.decode() if isinstance(raw, bytes) else raw
        last, removed = forget_deleted_page(conn, slot, after, self.page_rows)
        conn.commit()
        if last is None:
            self.redis.delete(cursor_key)  # past the end: the next walk starts over
        else:
            self.redis.set(cursor_key, last, ex=CURSOR_TTL_SECONDS)
        return removed
