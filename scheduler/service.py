"""The continuous scheduler process: APScheduler polls, LISTEN/NOTIFY wakes it early.

Every replica runs this; only the leader (advisory lock) dispatches. A pass
that fails (Postgres or Redis restarting) is logged and retried at the next
tick with a fresh connection: nothing is lost because Postgres holds the state.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType

import psycopg
import redis
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.blocking import BlockingScheduler

from pgreembed.config import Settings
from pgreembed.errors import DatabaseError, PgreembedError
from pgreembed.migrations.side_fill import advance
from pgreembed.observability.redact import redact
from pgreembed.observability.scheduler_metrics import serve_scheduler_metrics
from pgreembed.queue.contract import Sender
from pgreembed.store import pooling
from pgreembed.store.faults import LOST_RIGHT_HINT, is_lost_right
from pgreembed.store.pool import connect
from scheduler.dispatch import Dispatcher, dramatiq_senders
from scheduler.leader import Leadership
from scheduler.notify import Listener

log = logging.getLogger(__name__)

JOB_ID = "pgreembed-dispatch"


class _BusyPassFilter(logging.Filter):
    """Drop APScheduler's warning that the interval found a pass still running: passes
    never overlap by design (max_instances=1), and the next interval or early run comes
    right after; under load it would otherwise warn every poll interval."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


logging.getLogger("apscheduler.scheduler").addFilter(_BusyPassFilter())
SIDE_FILL_JOB_ID = "pgreembed-side-fill"


class SchedulerService:
    """Owns the APScheduler instance, the leader lock, the listener and the dispatcher."""

    def __init__(self, settings: Settings, send: Sender | None = None) -> None:
        self.settings = settings
        # The workers split chunked targets' parents; a caller's own `send` (embed batches
        # only) gets the chunk stage run in the pass instead.
        send, send_chunks = (send, None) if send else dramatiq_senders(settings)
        self.dispatcher = Dispatcher(settings, redis.Redis.from_url(settings.redis_url),
                                     send, send_chunks=send_chunks)
        self.leadership = Leadership(settings.database_url)
        self.scheduler = BlockingScheduler(timezone=UTC)
        self._conn: psycopg.Connection | None = None
        # Wake-ups are coalesced: a NOTIFY during a pass only asks for one more pass, and
        # at most one early run is ever scheduled. Rescheduling the job on every NOTIFY
        # made APScheduler log "skipped: maximum number of running instances" for each.
        self._wake_lock = threading.Lock()
        self._woken = False  # a change arrived since the current pass started
        self._running = False  # dispatch() is between its first pass and its return
        self._wake_scheduled = False  # an early run is scheduled and has not started
        self._last_pass_ended = 0.0  # time.monotonic() at the end of the last pass
        self.listener = Listener(settings.database_url, self._on_change)

    def _on_change(self, target: str) -> None:
        with self._wake_lock:
            self._woken = True
            if self._running or self._wake_scheduled:
                return  # the running pass loops again, or the scheduled one will see it
            self._wake_scheduled = True
        # The job is gone while the scheduler shuts down: nothing to wake then.
        with contextlib.suppress(JobLookupError):
            self.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(UTC))

    def dispatch(self) -> None:
        """The job: one pass, repeated while notifications arrive during it."""
        with self._wake_lock:
            self._running, self._wake_scheduled = True, False
        try:
            if not self.leadership.ensure():
                return
            while True:
                self._linger()
                with self._wake_lock:
                    self._woken = False
                passed = self._pass()
                self._last_pass_ended = time.monotonic()
                if not passed:
                    return
                with self._wake_lock:
                    if not self._woken:
                        # Decided under the lock: a NOTIFY after this schedules a run.
                        self._running = False
                        return
        finally:
            with self._wake_lock:
                self._running = False

    def _linger(self) -> None:
        """Passes start at least `linger_seconds` apart: under a steady stream of inserts
        (a NOTIFY each) the rows of that moment go out as one batch, not one request per
        row; a row arriving after a quiet spell is dispatched at once."""
        wait = self._last_pass_ended + self.settings.linger_seconds - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _pass(self) -> bool:
        """One dispatch pass; False if it failed (logged; the next tick retries)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.settings.database_url)
            report = self.dispatcher.run_pass(self._conn)
        except (psycopg.Error, DatabaseError, redis.RedisError) as exc:
            log.warning("dispatch pass failed (%s: %s); retrying next tick%s",
                        type(exc).__name__, exc,
                        f": {LOST_RIGHT_HINT}" if is_lost_right(exc) else "")
            self._drop_connection()
            return False
        if report.enqueued_rows:
            log.info("enqueued %d rows in %d batches", report.enqueued_rows, report.batches)
        return True

    def side_fills(self) -> None:
        """The leader's other job (its own thread: an index build takes minutes while
        dispatch goes on): start, or take one step further, each target's side fill."""
        if not self.leadership.is_leader:
            return
        for target in self.settings.targets.values():
            try:
                advance(self.settings, target)
            except (psycopg.Error, PgreembedError, redis.RedisError) as exc:
                log.warning("side fill of %s: %s: %s; retrying next tick", target.name,
                            type(exc).__name__, exc)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def run(self) -> None:
        """Block until SIGTERM/SIGINT (ConfigError at once behind a transaction pooler)."""
        try:
            with connect(self.settings.database_url, autocommit=True, vector=False) as conn:
                pooling.require_one_session(conn, "the scheduler (its leader lock and"
                                                  " LISTEN)")
        except (psycopg.Error, DatabaseError) as exc:  # Postgres down: the jobs retry
            log.warning("could not check for a connection pooler at start: %s: %s",
                        type(exc).__name__, redact(str(exc)).strip())
        self.scheduler.add_job(self.dispatch, "interval", id=JOB_ID,
                               seconds=self.settings.poll_interval, max_instances=1,
                               coalesce=True, next_run_time=datetime.now(UTC))
        self.scheduler.add_job(self.side_fills, "interval", id=SIDE_FILL_JOB_ID,
                               seconds=max(1.0, self.settings.poll_interval), max_instances=1,
                               coalesce=True)
        self.listener.start()
        serve_scheduler_metrics(self.settings)

        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping the scheduler", signum)
            self.scheduler.shutdown(wait=False)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("scheduler running: poll every %.1fs, listening for changes",
                 self.settings.poll_interval)
        try:
            self.scheduler.start()
        finally:
            self.listener.stop()
            self.leadership.release()
            self._drop_connection()
