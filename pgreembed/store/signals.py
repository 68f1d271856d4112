"""The scheduler's signals through Postgres: the leader's advisory lock, and the LISTEN /
NOTIFY that wakes it (the triggers and a batch that left rows pending send it)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgreembed.store.slots import NOTIFY_CHANNEL


def try_leader_lock(conn: psycopg.Connection, key: str) -> bool:
    """Take the session advisory lock named `key` if free (held until `conn` closes)."""
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
    return bool(row and row[0])


def check_alive(conn: psycopg.Connection) -> None:
    """A round trip: raises if the connection (and with it a session lock) is gone."""
    conn.execute("SELECT 1")


def listen(conn: psycopg.Connection) -> None:
    """Receive the wake-ups on `conn` (see `conn.notifies()`)."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))


def wake_scheduler(conn: psycopg.Connection, target: str) -> None:
    """NOTIFY at commit: rows left pending are dispatched again without waiting a poll."""
    conn.execute(sql.SQL("SELECT pg_notify({}, {})").format(
        sql.Literal(NOTIFY_CHANNEL), sql.Literal(target)))
