"""Progress of a CREATE INDEX [CONCURRENTLY], read from pg_stat_progress_create_index.

The build blocks its own connection, so a second connection polls the view for the
building backend's pid in a thread until the build returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from pgreembed.store.pool import connect

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class IndexBuild:
    """Where a build is: its phase and done of total (tuples when counted, else blocks)."""

    phase: str
    done: int
    total: int
    unit: str


def read_build(conn: psycopg.Connection, pid: int) -> IndexBuild | None:
    row = conn.execute(
        "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total"
        " FROM pg_stat_progress_create_index WHERE pid = %s", (pid,)).fetchone()
    if row is None:
        return None
    phase, blocks_done, blocks_total, tuples_done, tuples_total = row
    if tuples_total:
        return IndexBuild(str(phase), int(tuples_done), int(tuples_total), "tuples")
    return IndexBuild(str(phase), int(blocks_done or 0), int(blocks_total or 0), "blocks")


class BuildWatcher:
    """Calls `on_progress` every POLL_SECONDS while the backend `pid` builds an index."""

    def __init__(self, dsn: str, pid: int, on_progress: Callable[[IndexBuild], None]) -> None:
        self.dsn, self.pid, self.on_progress = dsn, pid, on_progress
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="index-progress", daemon=True)

    def _run(self) -> None:
        try:
            with connect(self.dsn, autocommit=True) as conn:
                while not self.stopped.wait(POLL_SECONDS):
                    build = read_build(conn, self.pid)
                    if build is not None:
                        self.on_progress(build)
        except psycopg.Error as exc:  # progress is a nicety: never fail the build for it
            log.warning("index progress unavailable: %s", type(exc).__name__)

    def __enter__(self) -> BuildWatcher:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
