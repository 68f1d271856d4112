"""What the operator's tools cost as the table grows: `status`, a scheduler scrape,
`migrate plan`, one scheduler pass and, with a migration just started (its new column
empty: the whole table is its backlog), `migrate status`, `status` and a scrape.

    python -m bench.ops_scale [--small 100000] [--large 5000000] [--pending 1000]

Each size gets its own database on an embedded Postgres: a table docs(id, body,
embedding vector(16)) filled with SQL (vectors included: no provider needed), all rows
embedded but `--pending` rows, then `pgreembed init` (which adopts the vectors: one
state row per row, as a real deployment has). Every figure is the median of 3 runs,
in-process, after one warm-up run; `status --exact` is timed for contrast (it scans).
The migration is started with `migrate start` (its pending index is built over every row)
and the table analysed, as autovacuum would after that.
The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from bench.harness import API_KEY, Services
from pgreembed.config import Settings, parse_settings
from pgreembed.migrations import plan
from pgreembed.migrations.lifecycle import start
from pgreembed.migrations.progress import progress
from pgreembed.observability.scheduler_metrics import DatabaseCollector
from pgreembed.operations.status import collect
from pgreembed.store.pool import connect
from pgreembed.store.setup import init_target
from scheduler.dispatch import Dispatcher

DIMS = 16
MODEL = "fake-16"


def build_table(dsn: str, rows: int, pending: int) -> float:
    """The table, filled with SQL; returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL,"
                     f" embedding vector({DIMS}))")
        conn.execute(
            f"""
            INSERT INTO docs (id, body, embedding)
            SELECT g, 'document number ' || g || ' about topic ' || (g %% 997),
                   CASE WHEN g > %s THEN array_fill((g %% 13)::real / 13, ARRAY[{DIMS}])::vector
                   END
            FROM generate_series(1, %s) g
            """, (pending, rows))
        conn.execute("VACUUM ANALYZE docs")
    return time.perf_counter() - started


def settings_for(dsn: str, redis_url: str, base_url: str) -> Settings:
    document = {"target": [{"name": "docs", "table": "public.docs", "text_column": "body",
                            "vector_column": "embedding", "provider": "openai",
                            "model": MODEL, "dimensions": DIMS, "batch_size": 256}],
                "worker": {"max_inflight_rows": 2048}}
    env = {"DATABASE_URL": dsn, "REDIS_URL": redis_url, "OPENAI_API_KEY": API_KEY,
           "OPENAI_BASE_URL": base_url}
    return parse_settings(document, env)


def median_seconds(run: Callable[[], Any], before: Callable[[], Any] | None = None,
                   repeats: int = 3) -> float:
    times = []
    for attempt in range(repeats + 1):  # the first run warms caches and is not counted
        if before is not None:
            before()
        started = time.perf_counter()
        run()
        if attempt:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(services: Services, rows: int, pending: int) -> dict[str, float]:
    dsn = services.dsn(f"ops_{rows}")
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS ops_{rows} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE ops_{rows}")
    fill = build_table(dsn, rows, pending)
    settings = settings_for(dsn, services.redis.url, services.fake.base_url)
    started = time.perf_counter()
    init_target(dsn, settings.target("docs"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE docs")
        conn.execute("VACUUM ANALYZE pgreembed.slot_1")
    init = time.perf_counter() - started
    print(f"  {rows:,} rows: filled in {fill:.0f} s, init (adopting the vectors)"
          f" {init:.0f} s", flush=True)
    client = redis.Redis.from_url(services.redis.url)

    def status(exact: bool = False) -> None:
        with connect(dsn) as conn:
            found = collect(conn, settings, client, exact=exact)
        assert found[0].pending == pending, found

    collector = DatabaseCollector(settings)
    target = settings.target("docs")
    dispatcher = Dispatcher(settings, client, lambda target, slot, keys, backfill=False: None)

    def one_pass() -> None:
        with connect(dsn) as conn:
            report = dispatcher.run_pass(conn)
        assert report.enqueued_rows == pending, report

    result = {
        "status": median_seconds(status),
        "scrape": median_seconds(lambda: list(collector.collect())),
        "plan": median_seconds(lambda: plan.plan(settings, target, "openai",
                                                    "fake-alt-16", DIMS)),
        "pass": median_seconds(one_pass, before=client.flushall),
        "status_exact": median_seconds(lambda: status(exact=True), repeats=1),
    }
    started = time.perf_counter()
    start(settings, target, "openai", "fake-alt-16", DIMS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE docs")
    print(f"  {rows:,} rows: migration started in {time.perf_counter() - started:.0f} s",
          flush=True)

    def migrate_status() -> None:
        found = progress(settings, target)
        assert found.total - found.done - found.failed >= rows * 0.9, found

    result["migrate_status"] = median_seconds(migrate_status)
    result["status_migrating"] = median_seconds(lambda: status())
    result["scrape_migrating"] = median_seconds(lambda: list(collector.collect()))
    services.drop(dsn)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=5_000_000)
    parser.add_argument("--pending", type=int, default=1000)
    args = parser.parse_args()
    services = Services(MODEL, DIMS).start()
    try:
        found = {rows: measure(services, rows, args.pending)
                 for rows in (args.small, args.large)}
    finally:
        services.stop()
    small, large = found[args.small], found[args.large]
    print(f"\n{'':<26}{args.small:>12,}{args.large:>12,}   ratio   (seconds, median of 3;"
          f" {args.pending} rows pending)")
    labels = {"status": "status", "scrape": "scheduler scrape", "plan": "migrate plan",
              "pass": "one scheduler pass", "status_exact": "status --exact (scans)",
              "migrate_status": "migrate status (open)", "status_migrating": "status (migration)",
              "scrape_migrating": "scrape (migration)"}
    for key, label in labels.items():
        print(f"{label:<26}{small[key]:>12.3f}{large[key]:>12.3f}"
              f"{large[key] / max(small[key], 1e-9):>8.1f}x")
    print("result: " + json.dumps({"rows": [args.small, args.large], "pending": args.pending,
                                   "seconds": {str(k): v for k, v in found.items()}}))


if __name__ == "__main__":
    main()
