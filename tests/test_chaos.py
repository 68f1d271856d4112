"""Chaos on real processes: nothing is lost, nothing is stale, little is wasted.

A real fleet (`python -m dramatiq --processes 2`, restarted by a small
supervisor like systemd or Kubernetes would) and the continuous scheduler
embed a table while the test SIGKILLs worker processes and the scheduler,
restarts Redis (empty) and Postgres, makes the provider answer 429 and 500
bursts, edits rows' text, makes the app's table refuse the vector of some rows
(a CHECK constraint) and fills the disk for a few seconds (SQLSTATE 53100 from
every write). At the end every row must carry the vector of its *current* text
(the refused ones none, and a failure record with the database's message), and
the provider inputs beyond the minimum are reported and bounded: texts embedded
more than once at most DUPLICATES_BOUND of the rows, texts superseded by an edit at
most one per edit.

These tests own their Postgres and Redis servers (they restart them).
$PGREEMBED_CHAOS_ROWS scales the big test (default 20000).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from pgreembed.testing.services import EmbeddedPostgres, LocalRedis
from tests.helpers import (
    API_KEY,
    OUTAGE_TRIGGER,
    ROOT,
    Stack,
    docs_config,
    json_document,
    pg_outage,
    seed,
    wait_for,
)

# One xdist worker for the file: its module fixture is a Postgres of its own.
pytestmark = [pytest.mark.chaos, pytest.mark.xdist_group("chaos")]

MODEL = "fake-384"
ROWS = int(os.environ.get("PGREEMBED_CHAOS_ROWS", "20000"))
REFUSED_EVERY = 500  # the app's CHECK refuses a vector for every 500th row
DUPLICATES_BOUND = 0.13  # texts embedded more than once, as a share of ROWS (see below)


@dataclass
class OwnPostgres:
    """A Postgres server of this module only, so restarting it disturbs no other test."""

    server: EmbeddedPostgres
    dsn: str

    def outage(self, seconds: float) -> None:
        pg_outage(self.server, seconds)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgreembed-chaos-")) / "pgdata")
    dsn = server.start()
    yield OwnPostgres(server, dsn)
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    server = LocalRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def chaos_stack(own_postgres: OwnPostgres, own_redis: LocalRedis,
                fake_openai: FakeOpenAIServer, tmp_path: Path) -> Iterator[Stack]:
    """A fresh database on our own server, a docs table, config and environment."""
    name = f"chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(own_postgres.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(own_postgres.dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, title text, body text,"
                     " views integer NOT NULL DEFAULT 0)")
    config = tmp_path / "pgreembed.toml"
    config.write_text(docs_config(
        batch_size=100, max_inflight_rows=2000, worker_extra="pool_max_size = 2",
        # never binding: exercises the shared limiter under chaos
        target_extra="requests_per_minute = 1000000"))
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": own_redis.url,
        "PGREEMBED_CONFIG": str(config),
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": fake_openai.base_url,
        # A killed worker's messages come back in seconds, not minutes.
        "PGREEMBED_HEARTBEAT_MS": "3000",
        "PGREEMBED_MAINTENANCE_CHANCE": "500000",
        "PYTHONPATH": str(ROOT),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(dsn, own_redis.url, config, env, logs, [])
    yield stack
    for process in stack.processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in stack.processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    with contextlib.suppress(psycopg.Error), \
            psycopg.connect(own_postgres.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Fleet(threading.Thread):
    """`dramatiq --processes N worker`, restarted whenever it exits (as a supervisor would):
    SIGKILL of one worker process makes the whole command exit."""

    def __init__(self, stack: Stack, processes: int = 2, threads: int = 4) -> None:
        super().__init__(name="fleet-supervisor", daemon=True)
        self.stack = stack
        self.args = [sys.executable, "-m", "dramatiq", "--processes", str(processes),
                     "--threads", str(threads), "worker"]
        self.processes = processes
        self.current: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.current = self.stack.spawn("worker", self.args)
            self.starts += 1
            self.current.wait()
            time.sleep(0.2)  # the supervisor's restart delay

    def workers(self) -> list[psutil.Process]:
        """The worker processes of the running command (forked: same command line)."""
        if self.current is None:
            return []
        try:
            main = psutil.Process(self.current.pid)
            return [c for c in main.children() if c.cmdline() == main.cmdline()]
        except psutil.Error:
            return []

    def kill_one_worker(self) -> None:
        """SIGKILL one worker process that is up and consuming."""
        def ready() -> list[psutil.Process]:
            found = self.workers()
            # Up for 3 s: imported and consuming, so the kill interrupts real work.
            old = [p for p in found if time.time() - p.create_time() > 3]
            return old if len(old) == self.processes else []

        # After a kill, Dramatiq stops the sibling gracefully: it finishes its messages
        # first (possibly sleeping in provider back-off), so the restart can take a while.
        victim = random.choice(wait_for(ready, timeout=150, interval=0.2,
                                        message="the fleet's worker processes"))
        with contextlib.suppress(psutil.Error):
            victim.send_signal(signal.SIGKILL)
            self.kills += 1

    def stop(self) -> None:
        self._stop.set()


def spawn_scheduler(stack: Stack) -> subprocess.Popen[bytes]:
    return stack.spawn("scheduler", [sys.executable, "-m", "pgreembed", "scheduler"])


def query(stack: Stack, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run a query, waiting out a Postgres restart."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(stack.dsn, autocommit=True) as conn:
                register_vector(conn)
                return conn.execute(sql.encode(), params).fetchall()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # retried until Postgres is back (a poll of the connection)


def embedded_count(stack: Stack) -> int:
    return int(query(stack, "SELECT count(*) FROM docs WHERE embedding IS NOT NULL")[0][0])


def edit_rows(stack: Stack, count: int, rng: random.Random, tag: str) -> int:
    """Change the text of `count` random rows (embedded, in flight or still pending)."""
    total = int(query(stack, "SELECT max(id) FROM docs")[0][0])
    ids = rng.sample(range(1, total + 1), count)
    query(stack, "UPDATE docs SET body = body || ' ' || %s WHERE id = ANY(%s) RETURNING 1",
          (tag, ids))
    return count


def assert_every_row_current(stack: Stack, refused: set[int] | None = None) -> set[str]:
    """Every row has the vector of its current text (those of `refused` none);
    returns the final texts."""
    rows = query(stack, "SELECT id, concat_ws(E'\\n', title, body), embedding FROM docs")
    texts = set()
    wrong = []
    for key, text, vector in rows:
        texts.add(str(text))
        if refused and key in refused:
            assert vector is None, f"row {key} has a vector its table refuses"
            continue
        assert vector is not None, f"row {key} has no vector"
        expected = fake_vector(MODEL, str(text), 384)
        if not np.allclose(vector.to_numpy(), expected, atol=1e-6):
            wrong.append(key)
    assert not wrong, f"{len(wrong)} rows carry the vector of another text: {wrong[:10]}"
    return texts


def refuse_some_writes(stack: Stack) -> set[int]:
    """The app's rules: a CHECK that refuses a vector for every REFUSED_EVERY-th row, and a
    trigger that fails every write with SQLSTATE 53100 while `write_outage` says so."""
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE docs ADD CONSTRAINT chaos_refused CHECK"
                     f" (embedding IS NULL OR id % {REFUSED_EVERY} <> 0)".encode())
        conn.execute(OUTAGE_TRIGGER.encode())
    return {int(r[0]) for r in query(stack, f"SELECT id FROM docs WHERE id %% {REFUSED_EVERY}"
                                            " = 0")}


def disk_full(stack: Stack, seconds: float) -> None:
    query(stack, "UPDATE write_outage SET disk_full = true RETURNING 1")
    time.sleep(seconds)  # the scenario: the disk stays full this long
    query(stack, "UPDATE write_outage SET disk_full = false RETURNING 1")


def wait_until_done(stack: Stack, timeout: float, refused: int = 0) -> None:
    def done() -> bool:
        return int(query(stack, "SELECT count(*) FROM docs WHERE embedding IS NULL")[0][0]
                   ) == refused

    try:
        wait_for(done, timeout=timeout, interval=0.5, message="every row to be embedded")
    except BaseException:
        print(diagnose(stack), flush=True)
        raise


def diagnose(stack: Stack) -> str:
    """Where the rows that never got a vector are: claimed in Redis? queued? dead-lettered?"""
    import redis

    client: Any = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    missing = [str(r[0]) for r in query(stack, "SELECT id FROM docs WHERE embedding IS NULL"
                                               " ORDER BY id")]
    lines = [f"{len(missing)} rows without a vector, e.g. {missing[:10]}"]
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        size = {"zset": client.zcard, "list": client.llen, "hash": client.hlen,
                "set": client.scard}.get(kind, lambda k: "?")(key)
        lines.append(f"redis {key} ({kind}): {size}")
    for key in client.keys("pgreembed:inflight:*"):
        claimed = client.zmscore(key, missing) if missing else []
        scores = sorted(s for s in claimed if s is not None)
        lines.append(f"{key}: {len(scores)} of the missing rows claimed; claim times"
                     f" {time.time() - scores[0] if scores else 0:.0f}s ..."
                     f" {time.time() - scores[-1] if scores else 0:.0f}s ago")
    return "\n".join(lines)


@pytest.mark.timeout(600)
def test_chaos_fleet_loses_nothing_and_wastes_little(chaos_stack: Stack, own_redis: LocalRedis,
                                                     own_postgres: OwnPostgres,
                                                     fake_openai: FakeOpenAIServer) -> None:
    stack = chaos_stack
    rng = random.Random(4)
    seed(stack, ROWS, body="body of doc ")
    assert stack.cli("init").returncode == 0
    refused = refuse_some_writes(stack)
    start = time.monotonic()
    fleet = Fleet(stack)
    fleet.start()
    schedulers = [spawn_scheduler(stack)]
    edited = 0
    events: list[str] = []

    def at(fraction: float, action: Callable[[], object], label: str) -> None:
        """Run `action` once the given fraction of the rows is embedded."""
        wait_for(lambda: embedded_count(stack) >= fraction * ROWS, timeout=240, interval=0.2,
                 message=f"{fraction:.0%} embedded before {label}")
        action()
        note(label)

    def note(label: str) -> None:
        events.append(f"{time.monotonic() - start:6.1f}s {label}")
        print(f"chaos: {events[-1]}", flush=True)

    try:
        at(0.03, lambda: fake_openai.set_faults(rate_limit_count=16, rate_limit_retry_after=0.5,
                                                error_500_count=10), "429 + 500 burst")
        at(0.08, fleet.kill_one_worker, "SIGKILL worker 1")
        edited += edit_rows(stack, 300, rng, "edit1")
        note("edited 300 rows")
        at(0.20, own_redis.restart, "Redis restarted empty")
        at(0.30, fleet.kill_one_worker, "SIGKILL worker 2")

        def replace_scheduler() -> None:
            os.killpg(schedulers[-1].pid, signal.SIGKILL)
            schedulers[-1].wait(10)
            schedulers.append(spawn_scheduler(stack))

        at(0.35, replace_scheduler, "SIGKILL scheduler, start a new one")
        at(0.45, lambda: own_postgres.outage(2.0), "Postgres down 2 s")
        at(0.50, lambda: disk_full(stack, 4.0), "disk full for 4 s (53100 on every write)")
        at(0.55, lambda: fake_openai.set_faults(rate_limit_count=16, rate_limit_retry_after=0.5,
                                                error_500_count=10), "429 + 500 burst")
        edited += edit_rows(stack, 300, rng, "edit2")
        note("edited 300 rows")
        at(0.65, fleet.kill_one_worker, "SIGKILL worker 3")
        at(0.80, fleet.kill_one_worker, "SIGKILL worker 4")
        edited += edit_rows(stack, 300, rng, "edit3")
        note("edited 300 rows")
        wait_until_done(stack, timeout=90, refused=len(refused))
        elapsed = time.monotonic() - start
    finally:
        fleet.stop()

    final_texts = assert_every_row_current(stack, refused)
    assert len(final_texts) == ROWS
    stats = fake_openai.stats()
    counts: dict[str, int] = stats["text_counts"]
    duplicates = sum(n - 1 for n in counts.values())  # same text embedded again: pure waste
    superseded = sum(1 for t in counts if t not in final_texts)  # text edited after embedding
    missing = final_texts - set(counts)
    extra = stats["inputs_embedded"] - len(final_texts)
    distinct = len(set(counts) | final_texts)  # every text a row had and was sent
    print(f"\nchaos: {ROWS} rows, {edited} edits, {elapsed:.1f}s, fleet started {fleet.starts}x,"
          f" {fleet.kills} worker kills; statuses {stats['status_counts']}")
    print("\n".join(events))
    print(f"provider inputs {stats['inputs_embedded']} for {len(final_texts)} final texts:"
          f" {extra} extra ({extra / ROWS:.1%}) = {duplicates} re-embedded texts"
          f" + {superseded} texts edited after they were embedded; successful requests"
          f" {stats['status_counts'].get('200', 0)} (at least {-(-ROWS // 100)});"
          f" {stats['inputs_embedded'] / distinct - 1:.1%} over the {distinct} distinct texts")
    assert not missing
    assert fleet.kills == 4
    assert stats["status_counts"].get("429", 0) >= 32 and stats["status_counts"].get("500", 0)
    # Pure waste: the same text embedded again (batches redone after a SIGKILL, the Redis
    # restart or the outages). Measured 5.5%, 6.4% and 3.0% of ROWS (2026-11-30, three
    # runs, 20k rows, a loaded 2-core machine); the bound is about twice the worst. Neither the
    # refused rows nor the full disk cost re-embedding (invariant 8).
    assert duplicates <= DUPLICATES_BOUND * ROWS, f"{duplicates} texts embedded again"
    # Not waste: a text edited after it was embedded; an edit supersedes one text at most
    # (measured 468, 463 and 468 of 900 edits).
    assert superseded <= edited

    def settled() -> bool:  # a refused row edited late is refused again with its new text
        status = stack.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        return [(s["failed"], s["pending"], s["misconfigured"])
                for s in json_document(status.stdout)["columns"]] == [(len(refused), 0, None)]

    wait_for(settled, timeout=60, interval=1.0, message="every refused row recorded failed")
    failures = stack.cli("failures", "--target", "docs", "--json", "--limit", "1000")
    reasons = {int(f["key"]): f["reason"] for f in json_document(failures.stdout)["failures"]}
    assert set(reasons) == refused
    assert set(reasons.values()) == {'database rejected the write: new row for relation "docs"'
                                     ' violates check constraint "chaos_refused"'
                                     ' (SQLSTATE 23514)'}
    assert API_KEY not in stack.log_text()


# A scheduler that dies exactly between claiming rows in Redis and enqueueing them.
DIE_BEFORE_ENQUEUE = """
import os, signal, redis
from pgreembed.config import load_settings
from pgreembed.store.pool import connect
from scheduler.dispatch import Dispatcher

def send(target, slot_id, keys, backfill=False):
    os.kill(os.getpid(), signal.SIGKILL)

settings = load_settings()
with connect(settings.database_url) as conn:
    Dispatcher(settings, redis.Redis.from_url(settings.redis_url), send).run_pass(conn)
"""


def in_flight(stack: Stack) -> int:
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    return sum(int(client.zcard(k)) for k in client.keys("pgreembed:inflight:*"))


def test_scheduler_sigkilled_then_a_new_one_continues(chaos_stack: Stack,
                                                      fake_openai: FakeOpenAIServer) -> None:
    stack = chaos_stack
    seed(stack, 6000, body="body of doc ")
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(latency=0.05)
    worker = stack.start_worker(processes=1, threads=4)
    # 1. Killed after claiming a page of rows, before enqueueing any of them.
    died = subprocess.run([sys.executable, "-c", DIE_BEFORE_ENQUEUE], env=stack.env, cwd=ROOT,
                          timeout=60)
    assert died.returncode == -signal.SIGKILL
    assert in_flight(stack) > 0  # claimed, but no message will ever release them
    # 2. Real schedulers SIGKILLed while they work; each time a new one takes over.
    scheduler = spawn_scheduler(stack)
    start = time.monotonic()
    for kill in range(3):
        done_before = embedded_count(stack)
        wait_for(lambda done_before=done_before: embedded_count(stack) > done_before + 300,
                 timeout=40, interval=0.2, message=f"progress before scheduler kill {kill + 1}")
        os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait(10)
        scheduler = spawn_scheduler(stack)
    wait_until_done(stack, timeout=60)
    print(f"\nscheduler kills: done in {time.monotonic() - start:.1f}s")
    assert worker.poll() is None
    assert_every_row_current(stack)
    counts = fake_openai.stats()["text_counts"]
    assert len(counts) == 6000 and sum(counts.values()) < 6000 * 1.05


def test_postgres_restart_mid_run_leaves_no_stuck_worker(chaos_stack: Stack,
                                                         own_postgres: OwnPostgres,
                                                         fake_openai: FakeOpenAIServer) -> None:
    """The worker command is not restarted: its pools must recover by themselves."""
    stack = chaos_stack
    seed(stack, 4000, body="body of doc ")
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(latency=0.2)  # batches are in flight when Postgres goes away
    worker = stack.start_worker(processes=2, threads=4)
    spawn_scheduler(stack)
    wait_for(lambda: embedded_count(stack) >= 800, timeout=60, interval=0.2,
             message="20% embedded")
    own_postgres.outage(3.0)
    wait_for(lambda: embedded_count(stack) >= 2400, timeout=60, interval=0.2,
             message="60% embedded")
    own_postgres.server.restart()  # an immediate restart as well
    wait_until_done(stack, timeout=90)
    assert worker.poll() is None, "the worker command died"
    # Not stuck: fresh rows are embedded within seconds by the same processes.
    fake_openai.set_faults(latency=0.0)
    seed(stack, 20, title="fresh", body="body of fresh ")
    wait_until_done(stack, timeout=15)
    assert worker.poll() is None
    assert_every_row_current(stack)
    stuck = query(stack, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE"
                         " 'pgreembed%%' AND state = 'idle in transaction'")[0][0]
    assert stuck == 0
