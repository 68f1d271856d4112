"""LISTEN for the table triggers' NOTIFY so fresh rows are scheduled in about a second.

Polling stays on as the fallback: a missed notification (listener reconnecting,
Postgres restarting) delays a row by one poll interval, never longer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from pgreembed.errors import DatabaseError
from pgreembed.store.pool import connect
from pgreembed.store.signals import listen

log = logging.getLogger(__name__)


class Listener(threading.Thread):
    """Calls `on_change(target)` for every notification, reconnecting forever."""

    def __init__(self, dsn: str, on_change: Callable[[str], None]) -> None:
        super().__init__(name="pgreembed-listen", daemon=True)
        self.dsn = dsn
        self.on_change = on_change
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with connect(self.dsn, autocommit=True, vector=False) as conn:
                    listen(conn)
                    backoff = 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.on_change(note.payload)
            except (psycopg.Error, DatabaseError) as exc:
                log.warning("notification listener: %s; reconnecting", type(exc).__name__)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
