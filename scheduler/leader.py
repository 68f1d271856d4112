"""One scheduling leader among replicas: a session advisory lock on a dedicated connection.

APScheduler 3.x job stores cannot be shared by replicas, so every replica runs
its own APScheduler and only the lock holder does the work. The lock lives
exactly as long as its connection: if the leader dies or Postgres restarts,
another replica (or the same one, reconnected) takes over.
"""

from __future__ import annotations

import contextlib
import logging

import psycopg

from pgreembed.errors import DatabaseError
from pgreembed.store.pool import connect
from pgreembed.store.signals import check_alive, try_leader_lock

log = logging.getLogger(__name__)

LOCK_KEY = "pgreembed.scheduler"


class Leadership:
    """Try to become, and check that we still are, the leader."""

    def __init__(self, dsn: str, key: str = LOCK_KEY) -> None:
        self.dsn = dsn
        self.key = key
        self._conn: psycopg.Connection | None = None
        self.is_leader = False

    def ensure(self) -> bool:
        """True while we hold the lock; tries to (re)acquire it otherwise. Never raises."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.dsn, autocommit=True, vector=False)
                self.is_leader = False
            if self.is_leader:
                check_alive(self._conn)
                return True
            self.is_leader = try_leader_lock(self._conn, self.key)
            if self.is_leader:
                log.info("this scheduler is now the leader")
            return self.is_leader
        except (psycopg.Error, DatabaseError) as exc:
            if self.is_leader:
                log.warning("lost the leader lock (%s)", type(exc).__name__)
            self.release()
            return False

    def release(self) -> None:
        self.is_leader = False
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
