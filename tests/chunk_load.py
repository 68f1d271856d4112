"""Issue 25, test 4, shared by the test (a lighter rate) and bench/chunk_migration.py (the
issue's 150 parent edits/s): a model migration of a chunk table while the app edits
parents, searches the chunks through its own view and SQL function, and holds parents and
chunks in open transactions; pgreembed runs as an ordinary role under a REPEATABLE READ
default with a slowed provider.

What it measures: the latency of each app statement (edits and searches; the app's
sessions run with lock_timeout = 100 ms, so a statement stalled on a lock over 100 ms is an
error counted apart), the wall time of `migrate swap` and `migrate rollback`, and every
chunk's vectors in both columns against each model's vector of the chunk's text (under the
load, right after swap and rollback, and once settled).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vectors
from tests.app_side import app_transactions, repeatable_read_by_default
from tests.helpers import OrdinaryRoles, Stack, in_background, migrate, new_column, wait_for
from tests.stall_probe import Tracer, classify, probe_cpu_ms, read_samples, sampler

STALL_MS = 100.0  # the bar: no app statement stalled longer than this

# The app's own objects on the chunk table's vector column (bound by attribute number:
# the swap must rebind them), owned by the app's owner role, as in tests/app_side.py.
CHUNK_APP_OBJECTS = """
CREATE VIEW chunk_search AS SELECT embedding_uuid, id, chunk_seq, chunk, embedding
FROM docs_chunks;
CREATE FUNCTION chunk_embedding(u uuid) RETURNS vector LANGUAGE sql STABLE
BEGIN ATOMIC SELECT embedding FROM docs_chunks WHERE embedding_uuid = u; END;
"""


def body(key: int, version: int) -> str:
    """~2 kB of paragraphs unique to the parent (5-6 chunks at 800/400); the version lands
    in the middle paragraph, as a one-sentence edit would (1-2 new chunks an edit)."""
    rng = random.Random(key)
    paragraphs = [" ".join(f"parent {key} paragraph {p} word{rng.randint(0, 99)}"
                           for _ in range(rng.randint(8, 14))) + "." for p in range(6)]
    paragraphs[3] += f" Edited to version {version}."
    return "\n\n".join(paragraphs)


def create_chunk_app_objects(stack: Stack, roles: OrdinaryRoles) -> None:
    """The app's view and function on the chunk column, its HNSW index on it, and the
    app role's right to search (the DBA's grants)."""
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_chunks_embedding_idx ON docs_chunks"
                     " USING hnsw (embedding vector_cosine_ops)")
        owner, app = sql.Identifier(roles.owner), sql.Identifier(roles.app)
        conn.execute(sql.SQL("GRANT SELECT ON docs_chunks TO {}").format(owner))
        # An app that locks chunks (SELECT ... FOR SHARE needs UPDATE) as tests' holder does.
        conn.execute(sql.SQL("GRANT UPDATE ON docs_chunks TO {}").format(app))
        conn.execute(CHUNK_APP_OBJECTS)
        conn.execute(sql.SQL("ALTER VIEW chunk_search OWNER TO {}").format(owner))
        conn.execute(sql.SQL("ALTER FUNCTION chunk_embedding(uuid) OWNER TO {}").format(owner))
        for relation in ("docs_chunks", "chunk_search", "docs_view"):
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
                sql.Identifier(relation), app))


@dataclasses.dataclass
class AppLoad:
    """What the app's sessions saw: per statement kind, latencies in ms; errors."""

    latencies: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    lock_timeouts: dict[str, int] = dataclasses.field(default_factory=dict)
    phase: str = "before"  # set by the scenario: errors are counted per phase
    phases: dict[str, str] = dataclasses.field(default_factory=dict)  # phase -> UTC start
    blockers: dict[str, int] = dataclasses.field(default_factory=dict)
    longest_wait: dict[str, float] = dataclasses.field(default_factory=dict)  # ms, by whose
    # pgreembed's sessions seen waiting on a row lock (invariant 10: never), by statement
    ours_waiting: dict[str, int] = dataclasses.field(default_factory=dict)
    edit_seconds: float = 0.0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    tracer: Tracer = dataclasses.field(default_factory=Tracer)  # per statement: stall_probe

    def enter(self, phase: str) -> None:
        """The scenario's next phase, its start time kept (to place slow statements)."""
        now = time.time()
        self.phases[phase] = time.strftime("%H:%M:%S", time.gmtime(now)) \
            + f".{int(now * 1000) % 1000:03d}"
        self.phase = phase

    def record(self, kind: str, ms: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(ms)

    def failed(self, kind: str, exc: psycopg.Error) -> None:
        with self.lock:
            if exc.sqlstate == "55P03":  # lock_not_available: stalled over lock_timeout
                where = f"{kind} in {self.phase}"
                self.lock_timeouts[where] = self.lock_timeouts.get(where, 0) + 1
            self.errors.append(f"{kind} in {self.phase}: {exc.sqlstate}:"
                               f" {str(exc).splitlines()[0]}")

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lock_timeouts": sum(self.lock_timeouts.values()),
                               "lock_timeouts_where": self.lock_timeouts,
                               "errors": len(self.errors),
                               "longest_lock_wait_ms": self.longest_wait,
                               "pgreembed_row_lock_waits": self.ours_waiting,
                               "blocked_by": dict(sorted(self.blockers.items(),
                                                         key=lambda kv: -kv[1])[:8])}
        for kind, values in sorted(self.latencies.items()):
            ordered = sorted(values)
            out[kind] = {"count": len(values), "p50_ms": round(statistics.median(values), 1),
                         "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 1),
                         "max_ms": round(ordered[-1], 1),
                         f"over_{STALL_MS:g}_ms": sum(1 for v in values if v > STALL_MS)}
        edits = len(self.latencies.get("edit", []))
        out["edits_per_second"] = round(edits / self.edit_seconds, 1) if self.edit_seconds else 0
        return out


def _app_session(dsn: str) -> psycopg.Connection:
    """An app connection as the issue's app runs: autocommit statements, no prepared plans
    (a swap that changes the column's type would break them), lock waits capped at the
    stall bar so that a statement stalled on a lock is an error, not a slow sample."""
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None,
                           application_name="measured")
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{STALL_MS:g}ms")))
    return conn


@contextmanager
def app_load(admin_dsn: str, roles: OrdinaryRoles, edit_keys: list[int], search_uuids: list[Any],
             rate: float, editors: int = 2) -> Iterator[AppLoad]:
    """`rate` parent edits a second (paced, `editors` sessions) on `edit_keys`, and a
    searcher alternating the app's view + function and pgai's view, until the block ends."""
    load = AppLoad()
    version = iter(range(1, 10**9))
    # The sessions connect first, then all start: measured, threads starting and
    # connecting together in this process held its first statements 120-250 ms on the
    # app's side (its thread runnable or waiting for the GIL, the server idle).
    ready = threading.Barrier(editors + 1, timeout=60)

    def edit(share: int, stop: threading.Event) -> None:
        rng = random.Random(share)
        mine = edit_keys[share::editors]
        interval = editors / rate
        with _app_session(roles.app_dsn) as conn:
            ready.wait()
            due = time.perf_counter()
            while not stop.is_set():
                key = rng.choice(mine)
                try:
                    text = body(key, next(version))
                    with load.tracer.statement("edit", conn) as took:
                        conn.execute("UPDATE docs SET body = %s WHERE id = %s", (text, key))
                    load.record("edit", took[0])
                except psycopg.Error as exc:
                    load.failed("edit", exc)
                due += interval
                stop.wait(max(0.0, due - time.perf_counter()))  # the pace: `rate` a second

    def search(stop: threading.Event) -> None:
        rng = random.Random(99)
        statements = [
            ("search_app_view", "SELECT id, chunk_seq FROM chunk_search ORDER BY embedding"
             " <=> chunk_embedding(%s) LIMIT 10"),
            ("search_pgai_view", "SELECT id, chunk_seq FROM docs_view ORDER BY embedding"
             " <=> (SELECT embedding FROM docs_chunks WHERE embedding_uuid = %s) LIMIT 10")]
        with _app_session(roles.app_dsn) as conn:
            ready.wait()
            while not stop.is_set():
                for kind, statement in statements:
                    try:
                        with load.tracer.statement(kind, conn) as took:
                            conn.execute(statement, (rng.choice(search_uuids),)).fetchall()
                        load.record(kind, took[0])
                    except psycopg.Error as exc:
                        load.failed(kind, exc)
                stop.wait(0.02)  # ~40 searches a second next to the edits

    def watch(stop: threading.Event) -> None:
        """Sampled every 20 ms: whom the app's measured statements wait for (the longest
        lock wait behind one of pgreembed's sessions, by its role, and behind the app's
        own, e.g. a commit holding NOTIFY's lock; the blockers' statements as the
        diagnosis), and pgreembed's sessions waiting on a row lock."""
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            while not stop.is_set():
                for whose, query, waited in conn.execute(
                        "SELECT CASE WHEN b.usename = %s THEN 'pgreembed' ELSE 'app' END,"
                        " a.wait_event || ' behind '"
                        " || left(regexp_replace(b.query, '\\s+', ' ', 'g'), 80),"
                        " 1000 * extract(epoch FROM clock_timestamp() - a.query_start)"
                        " FROM pg_stat_activity a, unnest(pg_blocking_pids(a.pid)) bp"
                        " JOIN pg_stat_activity b ON b.pid = bp WHERE a.application_name"
                        " = 'measured' AND a.wait_event_type = 'Lock'", (roles.pgreembed,)):
                    with load.lock:
                        label = f"{whose}: {query}"
                        load.blockers[label] = load.blockers.get(label, 0) + 1
                        load.longest_wait[whose] = max(load.longest_wait.get(whose, 0.0),
                                                       round(float(waited), 1))
                for (query,) in conn.execute(
                        "SELECT a.wait_event || ': ' || left(regexp_replace(a.query, '\\s+',"
                        " ' ', 'g'), 80) FROM pg_stat_activity a WHERE a.usename = %s"
                        " AND a.wait_event IN ('transactionid', 'tuple')", (roles.pgreembed,)):
                    with load.lock:
                        load.ours_waiting[query] = load.ours_waiting.get(query, 0) + 1
                stop.wait(0.02)

    started = time.perf_counter()
    load.enter("before")
    with in_background(*[functools.partial(edit, share) for share in range(editors)], search,
                       watch):
        yield load
    load.enter("end")
    load.edit_seconds = time.perf_counter() - started


@contextmanager
def chunk_holder(dsn: str, keys: list[int]) -> Iterator[list[str]]:
    """An app transaction that reads a parent's chunks FOR SHARE and works 0.3 s, again and
    again (on parents that are also being edited): background work must not wait on it."""
    errors: list[str] = []

    def run(stop: threading.Event) -> None:
        rng = random.Random(5)
        with psycopg.connect(dsn) as conn:
            while not stop.is_set():
                try:
                    with conn.transaction():
                        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        conn.execute("SELECT chunk_seq FROM docs_chunks WHERE id = %s"
                                     " FOR SHARE", (rng.choice(keys),)).fetchall()
                        time.sleep(0.3)  # the scenario: the app holds those chunks
                except psycopg.Error as exc:
                    errors.append(f"{exc.sqlstate}: {exc}")
                stop.wait(1.0)  # and then works without them a while

    with in_background(run):
        yield errors


def wrong_vectors(conn: psycopg.Connection, columns: dict[str, tuple[str, int]]
                  ) -> dict[str, int]:
    """Per column, chunks whose vector (where not NULL) is not its model's vector of the
    chunk's text, read in one statement (one snapshot) while the load runs."""
    names = list(columns)
    rows = conn.execute(sql.SQL("SELECT chunk, {} FROM docs_chunks").format(
        sql.SQL(", ").join(sql.Identifier(n) for n in names))).fetchall()
    wrong = {}
    for i, name in enumerate(names, start=1):
        model, dims = columns[name]
        have = [(r[0], r[i]) for r in rows if r[i] is not None]
        if not have:
            wrong[name] = 0
            continue
        want = fake_vectors(model, [t for t, _ in have], dims)
        got = np.stack([v.to_numpy() for _, v in have])
        wrong[name] = int((np.abs(got - want).max(axis=1) > 1e-5).sum())
    return wrong


def pending(conn: psycopg.Connection, columns: list[str]) -> int:
    missing = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c))
                                   for c in columns)
    row = conn.execute(sql.SQL("SELECT (SELECT count(*) FROM pgreembed.chunk_dirty_docs)"
                               " + (SELECT count(*) FROM docs_chunks WHERE {})").format(
        missing)).fetchone()
    return int(row[0]) if row else -1


def step(stack: Stack, name: str) -> dict[str, Any]:
    """`migrate swap|rollback` with 50 ms lock attempts (the app's statements queue behind
    an attempt: half the stall bar); its wall time (the command's start included), its
    report and the busy attempts it logged."""
    started = time.perf_counter()
    out = stack.cli("migrate", name, "--target", "docs", "--lock-timeout-ms", "50",
                    timeout=300)
    seconds = time.perf_counter() - started
    assert out.returncode == 0 and f"{name} done" in out.stdout, out.stdout + out.stderr
    return {"seconds": round(seconds, 2), "report": out.stdout.splitlines()[0],
            "busy": [line[-300:] for line in out.stderr.splitlines() if "busy" in line][-3:]}


def run_migration_under_load(stack: Stack, roles: OrdinaryRoles, fake: FakeOpenAIServer,
                             *, parents: int, rate: float, seconds: float,
                             provider_latency: float,
                             expected: Callable[[psycopg.Connection], dict[int, list[str]]],
                             chunk_sets: Callable[[psycopg.Connection], dict[int, list[str]]],
                             worker_nice: int = 0) -> dict[str, Any]:
    """The scenario; returns its figures (the caller asserts). `stack` is the ordinary-role
    stack with the chunked config written and `init` run; no process started yet."""
    repeatable_read_by_default(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) SELECT g, 't' || g, b FROM"
                     " unnest(%s::text[]) WITH ORDINALITY AS u(b, g)",
                     ([body(k, 0) for k in range(1, parents + 1)],))
    fake.set_faults(latency=provider_latency)  # slowed: writes race the edits
    if worker_nice:  # measured: does the app gain if our worker yields the CPU?
        stack.spawn("worker", ["nice", "-n", str(worker_nice), sys.executable, "-m",
                               "dramatiq", "--processes", "1", "--threads", "4", "worker"])
    else:
        stack.start_worker(threads=4)
    stack.start_scheduler()

    def settled(columns: list[str]) -> Callable[[], bool]:
        def check() -> bool:
            with stack.connect() as conn:
                return pending(conn, columns) == 0 and chunk_sets(conn) == expected(conn)
        return check
    wait_for(settled(["embedding"]), timeout=180, interval=0.5, message="first chunk sets")
    create_chunk_app_objects(stack, roles)
    # Keys: the app's row-holding transactions take the first quarter (their `views`, never
    # the text; their chunks are the searches' queries); the editors and the chunk holder
    # the rest.
    held = range(1, parents // 4 + 1)
    edited = list(range(parents // 4 + 1, parents + 1))
    with stack.connect() as conn:
        stable = [r[0] for r in conn.execute("SELECT embedding_uuid FROM docs_chunks"
                                             " WHERE id <= %s", (held[-1],))]
    figures: dict[str, Any] = {"parents": parents, "rate_asked": rate,
                               "provider_latency_s": provider_latency}
    old = ("fake-384", 384)
    new = ("fake-768", 768)
    with sampler(stack.dsn, stack.logs / "stall_samples.jsonl") as samples, \
            app_transactions(roles.app_dsn, held) as holders, \
            chunk_holder(roles.app_dsn, edited) as held_chunks, \
            app_load(stack.dsn, roles, edited, stable, rate) as load:
        time.sleep(seconds / 4)  # the scenario: the load runs before the migration starts
        load.enter("fill")
        # As swap and rollback below: an app statement queued behind an attempt waits
        # at most 50 ms plus the step's hold (docs/migrations.md, "Never stalling").
        migrate(stack, "start", "--model", "fake-768", "--dimensions", "768",
                "--lock-timeout-ms", "50")
        column = new_column(stack)

        def filled() -> bool:  # the incoming column caught up with the chunks there are
            with stack.connect() as conn:
                row = conn.execute(sql.SQL("SELECT count(*) FROM docs_chunks WHERE"
                                           " embedding IS NOT NULL AND {} IS NULL").format(
                    sql.Identifier(column))).fetchone()
            return row is not None and row[0] < 50
        wait_for(filled, timeout=180, interval=0.5, message="the incoming column filled")
        migrate(stack, "index")
        time.sleep(seconds / 4)  # the scenario: edits go on between the steps
        load.enter("swap")
        figures["swap"] = step(stack, "swap")
        load.enter("swapped")
        with stack.connect() as conn:
            figures["wrong_after_swap"] = wrong_vectors(conn, {"embedding": new,
                                                               column: old})
        time.sleep(seconds / 4)  # the scenario: the swapped column serves the load
        load.enter("rollback")
        figures["rollback"] = step(stack, "rollback")
        load.enter("rolled back")
        with stack.connect() as conn:
            figures["wrong_after_rollback"] = wrong_vectors(conn, {"embedding": old,
                                                                   column: new})
        time.sleep(seconds / 4)  # the scenario: the rolled-back column serves the load
    figures["app"] = load.figures()
    figures["phases"] = load.phases
    figures["stall_probe_cpu_s"] = round(probe_cpu_ms[-1] / 1000, 2) if probe_cpu_ms else None
    figures["stalls"] = classify(load.tracer.traced, read_samples(samples), roles.pgreembed,
                                 over_ms=STALL_MS, near_ms=STALL_MS / 2)
    figures["app_error_samples"] = load.errors[:5]
    figures["row_holders"] = {"done": holders.done, "held_over_200ms": holders.held,
                              "errors": holders.errors[:5]}
    figures["chunk_holder_errors"] = held_chunks[:5]
    fake.set_faults(latency=0.0)
    wait_for(settled(["embedding", column]), timeout=180, interval=0.5,
             message="every chunk set current, both columns filled")
    with stack.connect() as conn:
        figures["wrong_settled"] = wrong_vectors(conn, {"embedding": old, column: new})
        row = conn.execute("SELECT count(*) FROM docs_chunks").fetchone()
        figures["chunks"] = row[0] if row else 0
    figures["column"] = column
    return figures


def chunk_app_objects_off_live(conn: psycopg.Connection) -> dict[str, int]:
    """Chunks for which the app's view or function (CHUNK_APP_OBJECTS) gives another
    vector than the live column (0 and 0: both serve the live column)."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE v.embedding::text IS DISTINCT FROM c.embedding::text),"
        " count(*) FILTER (WHERE chunk_embedding(c.embedding_uuid)::text"
        " IS DISTINCT FROM c.embedding::text), count(*)"
        " FROM docs_chunks c JOIN chunk_search v USING (embedding_uuid)").fetchone()
    assert row is not None and row[2] > 0, "no chunks to compare"
    return {"view": int(row[0]), "function": int(row[1])}
