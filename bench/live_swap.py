"""Swap and rollback on a live table: a writer, searching clients and an idle transaction.

    python -m bench.live_swap [--rows 500000] [--updates 150] [--inserts 30]

What the app has: N rows with an ANN index (IVFFlat cosine by default, `--index hnsw`)
on the live column; the pipeline (scheduler + a dramatiq worker + the local
OpenAI-compatible server) keeps both columns of a same-dimension migration filled while
a writer edits row texts (each edit clears both vectors) and inserts rows. Clients:
- `helper`: pgreembed.operations.search.search on an autocommit connection;
- `snippet`: the snippet of docs/search.md, verbatim (pgreembed.store.pool.connect, not autocommit);
- `prepared`: the app's own kNN SQL on the live column name, server-side prepared;
- `writer`: the text updates and inserts;
- `idle`: a session that reads the table then sits idle in its transaction (like a
  leaked connection), reconnecting 1 s after it is ended.
After a baseline window, `migrate swap` and then `migrate rollback` run in-process with
`--terminate-idle-after` (the only way past a transaction that never ends). Printed per
step: time from the call to the commit, lock attempts and hold, and per client the
longest query latency against the same client's baseline p99, queries over 100 ms and
failed queries. One JSON line (`result: {...}`) carries every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from bench.harness import Services, Tuning, pipeline
from pgreembed.config import Settings, load_settings
from pgreembed.embedding.providers import make_provider
from pgreembed.migrations import index as ann
from pgreembed.migrations import lifecycle, swap
from pgreembed.operations.search import search
from pgreembed.store.pool import connect
from pgreembed.store.slots import load_slots
from pgreembed.store.table_lock import LockPolicy

OLD, NEW = "fake-64", "fake-alt-64"
DIMS = 64
STALL = 0.1  # seconds: what the issue allows one lock attempt to cost a client


@dataclass
class Recorder:
    """Latencies (start, seconds) and failures per client, shared by the load threads."""

    latencies: dict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: defaultdict(list))
    failures: dict[str, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, client: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        started = time.monotonic()
        try:
            call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            with self.lock:
                self.failures[client].append((started, repr(exc)[:200]))
            return
        with self.lock:
            self.latencies[client].append((started, time.monotonic() - started))

    def window(self, client: str, start: float, end: float) -> list[float]:
        with self.lock:
            return [s for t, s in self.latencies[client] if start <= t <= end]

    def failed(self, client: str, start: float, end: float) -> list[str]:
        with self.lock:
            return [e for t, e in self.failures[client] if start <= t <= end]


def build(dsn: str, rows: int, index: str) -> None:
    """docs(id, body, views) with random unit vectors in `embedding` and its ANN index."""
    rng = np.random.default_rng(1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"ALTER TABLE docs ADD COLUMN views int NOT NULL DEFAULT 0,"
                     f" ADD COLUMN embedding vector({DIMS})")
        conn.execute("CREATE TEMP TABLE v (id bigint, e vector)")
        with conn.cursor().copy("COPY v (id, e) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "vector"])
            for start in range(0, rows, 50_000):
                block = rng.standard_normal((min(50_000, rows - start), DIMS), dtype=np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                for i, vector in enumerate(block, start + 1):
                    copy.write_row((i, vector))
        conn.execute("UPDATE docs SET embedding = v.e FROM v WHERE v.id = docs.id")
        conn.execute("VACUUM ANALYZE docs")


def index_live_column(dsn: str, rows: int, index: str) -> None:
    """The app's ANN index, built after both columns are filled: an UPDATE of every row
    of a table with an HNSW index inserts every row into it again (~90x slower)."""
    using = ("hnsw (embedding vector_cosine_ops)" if index == "hnsw" else
             f"ivfflat (embedding vector_cosine_ops) WITH (lists = {max(10, rows // 1000)})")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute(f"CREATE INDEX docs_embedding_idx ON docs USING {using}")


def fill_new_column(settings: Settings, dsn: str, rows: int, index: str) -> None:
    """migrate start, the new column filled in SQL (as if the workers had), the app's
    index on the live column, then `migrate index` (which mirrors it) on the new one."""
    target = settings.target("docs")
    slot = lifecycle.start(settings, target, "openai", NEW, DIMS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE docs SET {} = embedding").format(slot.vector))
        conn.execute(sql.SQL(
            "INSERT INTO {state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)"
            " SELECT id, %s, {hash}, now() FROM docs ON CONFLICT (pgr_pk) DO NOTHING"
        ).format(state=slot.state_table, hash=slot.hash_expr), (slot.model_id,))
        conn.execute("VACUUM ANALYZE docs")
    index_live_column(dsn, rows, index)
    ann.build_index(settings, target, maintenance_work_mem="1GB")


def loads(settings: Settings, dsn: str, rows: int, args: argparse.Namespace,
          recorder: Recorder, stop: threading.Event) -> tuple[list[threading.Thread], dict]:
    """Start the clients; returns their threads and a dict of counters."""
    counters: dict[str, int] = defaultdict(int)
    queries = ["compress a file", "lock timeout", "vector index", "schema migration"]

    def helper() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                recorder.timed("helper", search, conn, settings, "docs", queries[i % 4],
                               limit=5)
                stop.wait(0.01)

    def snippet_once(conn: psycopg.Connection, query: str) -> None:
        for hit in search(conn, settings, "docs", query, limit=5):
            (hit.distance, hit.key, hit.text[:80])  # what the snippet prints

    def snippet() -> None:
        with connect(settings.database_url) as conn:  # the snippet of docs/search.md, verbatim
            i = 0
            while not stop.is_set():
                i += 1
                recorder.timed("snippet", snippet_once, conn, queries[i % 4])
                stop.wait(0.01)

    def fetch(conn: psycopg.Connection, query: str, params: tuple[Any, ...]) -> None:
        conn.execute(query, params).fetchall()

    def prepared() -> None:
        rng = np.random.default_rng(2)
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            register_vector(conn)
            while not stop.is_set():
                vector = rng.standard_normal(DIMS, dtype=np.float32)
                recorder.timed("prepared", fetch, conn,
                               "SELECT id FROM docs ORDER BY embedding <=> %s LIMIT 5",
                               (vector,))
                stop.wait(0.01)

    def writer() -> None:
        rng = np.random.default_rng(3)
        period = 1.0 / (args.updates + args.inserts)
        share = args.updates / (args.updates + args.inserts)
        with psycopg.connect(dsn, autocommit=True) as conn:
            next_at = time.monotonic()
            while not stop.is_set():
                if rng.random() < share:
                    key = int(rng.integers(1, rows + 1))
                    recorder.timed("writer", conn.execute,
                                   "UPDATE docs SET body = %s WHERE id = %s",
                                   (f"Document {key}, edited at {time.time():.3f}.", key))
                    counters["updates"] += 1
                else:
                    recorder.timed("writer", conn.execute,
                                   "INSERT INTO docs (id, body) VALUES (nextval('docs_ids'), %s)",
                                   (f"Inserted at {time.time():.3f}.",))
                    counters["inserts"] += 1
                next_at += period
                stop.wait(max(0.0, next_at - time.monotonic()))

    def idle() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(dsn, application_name="bench-idle-app") as conn:
                    conn.execute("SELECT body FROM docs WHERE id = 1").fetchone()
                    counters["idle_sessions"] += 1
                    while not stop.is_set():  # idle in transaction until ended
                        stop.wait(0.5)
                        conn.execute("SELECT 1")  # raises once the session is terminated
            except psycopg.OperationalError:
                counters["idle_terminated"] += 1
                stop.wait(1.0)  # the app's pool reconnects a second later

    threads = [threading.Thread(target=f, daemon=True, name=f.__name__)
               for f in (helper, snippet, prepared, writer, idle)]
    for thread in threads:
        thread.start()
    return threads, counters


def percentile(values: list[float], q: int) -> float:
    if len(values) < 3:
        return max(values, default=0.0)
    return statistics.quantiles(values, n=100)[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--index", choices=["ivfflat", "hnsw"], default="ivfflat")
    parser.add_argument("--updates", type=float, default=150.0, help="text updates per second")
    parser.add_argument("--inserts", type=float, default=30.0, help="inserts per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="baseline window")
    parser.add_argument("--terminate-idle-after", type=float, default=5.0)
    args = parser.parse_args()

    services = Services(OLD, DIMS).start()
    try:
        t0 = time.monotonic()
        dsn = services.fresh_copy(args.rows, "live_swap")
        build(dsn, args.rows, args.index)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SEQUENCE docs_ids START {args.rows + 1}")
        tuning = Tuning(batch_size=64, processes=1, threads=8, max_inflight_rows=2048)
        with pipeline(services, dsn, tuning) as run:
            settings = load_settings(str(run.config_path), env=run.env)
            fill_new_column(settings, dsn, args.rows, args.index)
            run.start_worker()
            run.start_scheduler()
            print(f"{args.rows} rows, both columns filled, {args.index} indexes:"
                  f" {time.monotonic() - t0:.0f} s to build", flush=True)
            # The app has used both models before (else the first search after the swap
            # also builds the new model's HTTP client, ~0.15 s once per process): what is
            # measured below is the swap, not a client's construction.
            for model in (OLD, NEW):
                make_provider(settings, "openai", model, DIMS)
            recorder, stop = Recorder(), threading.Event()
            threads, counters = loads(settings, dsn, args.rows, args, recorder, stop)
            time.sleep(3.0)  # warm up: connections, first embeddings
            base = (time.monotonic(), time.monotonic() + args.seconds)
            time.sleep(args.seconds)
            policy = LockPolicy(terminate_idle_after=args.terminate_idle_after)
            steps = {}
            for step in ("swap", "rollback"):
                asked = time.monotonic()
                outcome = swap.swap(settings, settings.target("docs"),
                                       rollback=step == "rollback", policy=policy)
                done = time.monotonic()
                steps[step] = (asked, done, outcome)
                time.sleep(3.0)  # after the step: queries that waited finish
            stop.set()
            for thread in threads:
                thread.join(10)
            with connect(dsn) as conn:
                live = next(s for s in load_slots(conn, settings.target("docs"))
                            if s.role == "live")
        result = report(args, recorder, counters, base, steps, live.model)
        print("result: " + json.dumps(result), flush=True)
    finally:
        services.stop()


def report(args: argparse.Namespace, recorder: Recorder, counters: dict[str, int],
           base: tuple[float, float], steps: dict, live_model: str) -> dict:
    clients = ("helper", "snippet", "prepared", "writer")
    baseline = {c: recorder.window(c, *base) for c in clients}
    seconds = base[1] - base[0]
    print(f"baseline {seconds:.0f} s: writer {counters['updates']} updates +"
          f" {counters['inserts']} inserts in all;" + "".join(
              f" {c} {len(v)} queries, p99 {percentile(v, 99) * 1000:.1f} ms,"
              f" max {max(v, default=0) * 1000:.1f} ms;" for c, v in baseline.items()))
    result: dict = {"rows": args.rows, "index": args.index,
                    "baseline_p99_ms": {c: round(percentile(v, 99) * 1000, 1)
                                        for c, v in baseline.items()},
                    "baseline_max_ms": {c: round(max(v, default=0) * 1000, 1)
                                        for c, v in baseline.items()},
                    "idle_sessions_terminated": counters["idle_terminated"],
                    "live_model_after": live_model}
    for step, (asked, done, outcome) in steps.items():
        per_client = {}
        for client in clients:
            during = recorder.window(client, asked, done)
            longest = max(during, default=0.0)
            p99 = percentile(baseline[client], 99)
            per_client[client] = {
                "queries": len(during), "longest_ms": round(longest * 1000, 1),
                "x_baseline_p99": round(longest / p99, 1) if p99 else None,
                "over_100ms": sum(1 for s in during if s > STALL),
                "failed": len(recorder.failed(client, asked, done + 3.0))}
        result[step] = {"seconds": round(done - asked, 2), "attempts": outcome.attempts,
                        "lock_held_ms": round(outcome.pause_seconds * 1000, 1),
                        "unsearchable_at_swap": outcome.unsearchable, "clients": per_client}
        worst = max(float(v["longest_ms"] or 0) for v in per_client.values())
        print(f"{step}: done {done - asked:.1f} s after asked, {outcome.attempts} lock attempts,"
              f" lock held {outcome.pause_seconds * 1000:.0f} ms,"
              f" {outcome.unsearchable} rows left to embed; longest query"
              f" {worst:.0f} ms; " + "; ".join(
                  f"{c}: max {v['longest_ms']:.0f} ms ({v['x_baseline_p99']}x p99),"
                  f" {v['over_100ms']} > 100 ms, {v['failed']} failed"
                  for c, v in per_client.items()), flush=True)
    result["failed_queries"] = sum(len(v) for c, v in recorder.failures.items()
                                   if c in clients)
    return result


if __name__ == "__main__":
    main()
