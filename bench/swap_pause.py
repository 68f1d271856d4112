"""Longest pause concurrent queries see during `migrate swap` and `rollback`, next to
the baseline query latency measured in the same run.

    python -m bench.swap_pause [--rows 200000] [--readers 4] [--seconds 5]

A table of N rows with an IVFFlat (L2) index on its live column gets a second,
filled and indexed column (the state right before a swap; `migrate index` mirrors
the live index's method and distance). Reader threads run kNN
queries the way the app-side helper does (ACCESS SHARE lock, read the live
model, query with a vector of that size) and a writer updates rows, for a
baseline window, then across the swap, then across the rollback. Vectors are
random (the pause does not depend on their values), so no provider is needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from pgreembed.config import Settings, parse_settings
from pgreembed.migrations import index, lifecycle, swap
from pgreembed.store.setup import init_target
from pgreembed.testing.services import EmbeddedPostgres

OLD_DIMS, NEW_DIMS = 64, 128


@dataclass
class Window:
    """Query latencies (start, seconds) and failures observed by the load threads."""

    latencies: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, started: float, seconds: float) -> None:
        with self.lock:
            self.latencies.append((started, seconds))

    def between(self, start: float, end: float) -> list[float]:
        return [s for t, s in self.latencies if start <= t <= end]


def build_table(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE TABLE docs (id bigint PRIMARY KEY, body text, views int DEFAULT 0,"
                     f" embedding vector({OLD_DIMS}))")
        rng = np.random.default_rng(1)
        register_vector(conn)
        with conn.cursor().copy("COPY docs (id, body, embedding) FROM STDIN (FORMAT BINARY)"
                                ) as copy:
            copy.set_types(["int8", "text", "vector"])
            for start in range(0, rows, 10_000):
                block = rng.standard_normal((min(10_000, rows - start), OLD_DIMS),
                                            dtype=np.float32)
                for i, vector in enumerate(block, start + 1):
                    copy.write_row((i, f"document {i}", vector))
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING ivfflat"
                     " (embedding vector_l2_ops) WITH (lists = 100)")
        conn.execute("ANALYZE docs")


def prepare_migration(settings: Settings, dsn: str) -> None:
    """init + migrate start + fill the new column with SQL + its index: ready to swap."""
    target = settings.target("docs")
    init_target(dsn, target)
    slot = lifecycle.start(settings, target, "openai", f"fake-{NEW_DIMS}", NEW_DIMS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"""UPDATE docs SET "{slot.vector_column}" =
            (SELECT array_agg(random()::real) FROM generate_series(1, {NEW_DIMS}) g
             WHERE g > 0 * docs.id)::vector""")
        conn.execute("VACUUM ANALYZE docs")
    index.build_index(settings, target, method="ivfflat", lists=100)


def reader(dsn: str, window: Window, stop: threading.Event) -> None:
    rng = np.random.default_rng()
    queries = {d: rng.standard_normal((64, d), dtype=np.float32) for d in (OLD_DIMS, NEW_DIMS)}
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        register_vector(conn)
        i = 0
        while not stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                with conn.transaction():
                    conn.execute("LOCK TABLE docs IN ACCESS SHARE MODE")
                    row = conn.execute("SELECT vector_column, dimensions FROM"
                                       " pgreembed.active_models WHERE target = 'docs'"
                                       ).fetchone()
                    assert row is not None
                    column, dims = row
                    conn.execute(f'SELECT id FROM docs ORDER BY "{column}" <-> %s LIMIT 5',
                                 (queries[dims][i % 64],)).fetchall()
                window.record(started, time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                window.failures.append(repr(exc))


def writer(dsn: str, rows: int, window: Window, stop: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        i = 0
        while not stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s",
                             (i * 7919 % rows + 1,))
                window.record(started, time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001
                window.failures.append(repr(exc))
            time.sleep(0.002)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 2 else max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="baseline window")
    args = parser.parse_args()

    postgres = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgreembed-bench-")) / "pgdata")
    dsn = postgres.start()
    try:
        settings = parse_settings({"target": [{
            "name": "docs", "table": "public.docs", "text_column": "body",
            "vector_column": "embedding", "provider": "openai", "model": f"fake-{OLD_DIMS}",
            "dimensions": OLD_DIMS}]}, {"DATABASE_URL": dsn, "OPENAI_BASE_URL": "http://unused"})
        t0 = time.monotonic()
        build_table(dsn, args.rows)
        prepare_migration(settings, dsn)
        print(f"table of {args.rows} rows with both columns filled and indexed"
              f" in {time.monotonic() - t0:.0f}s")

        window, stop = Window(), threading.Event()
        threads = [threading.Thread(target=reader, args=(dsn, window, stop))
                   for _ in range(args.readers)]
        threads.append(threading.Thread(target=writer, args=(dsn, args.rows, window, stop)))
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # warm up
        base_start = time.monotonic()
        time.sleep(args.seconds)
        base_end = time.monotonic()
        results = {}
        for step in ("swap", "rollback"):
            started = time.monotonic()
            outcome = swap.swap(settings, settings.target("docs"), rollback=step == "rollback")
            ended = time.monotonic()
            time.sleep(1.0)  # queries that waited on the lock finish; the new column in use
            during = window.between(started, ended)
            # A new column its queries cannot use an index on would show here, not above.
            after = window.between(ended, ended + 1.0)
            results[step] = (outcome.pause_seconds, max(during) if during else 0.0, len(during),
                             percentile(after, 99))
        stop.set()
        for thread in threads:
            thread.join()

        baseline = window.between(base_start, base_end)
        p50, p99, worst = percentile(baseline, 50), percentile(baseline, 99), max(baseline)
        print(f"baseline ({len(baseline)} queries in {args.seconds:.0f}s, {args.readers} readers"
              f" + 1 writer): p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
              f" max {worst * 1000:.1f} ms")
        for step, (lock_held, longest, count, p99_after) in results.items():
            print(f"{step}: lock held {lock_held * 1000:.0f} ms; longest query across it"
                  f" {longest * 1000:.1f} ms ({count} queries started during it) ="
                  f" {longest / p99:.1f}x baseline p99; p99 in the second after"
                  f" {p99_after * 1000:.1f} ms")
        print(f"failed queries: {len(window.failures)}"
              + (f" (first: {window.failures[0]})" if window.failures else ""))
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
