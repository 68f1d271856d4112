"""Postgres CPU per row of the workers' write path against the raw write, and where it goes.

Two parts, each in rounds that interleave its arms (the arms' order rotates), median:

- `path`: the database side of one worker batch, in this process, one batch after the
  other on one connection: `worker.batch.process_batch` (read the pending rows under
  the slot's lock, probe the known vectors, call the local stand-in provider, then the
  write transaction: lock the slot, lock the free rows, the guarded UPDATE with the
  state upsert, the usage row; by default in slices, `[worker] max_row_lock_ms`, and in
  one transaction a batch, "unsliced"; --budgets adds other budgets) against the raw
  write (binary COPY into a temporary table and `UPDATE ... FROM`, 512-row transactions,
  one connection) and the raw write plus a state row per vector, on the same table.
  With --stats, pg_stat_statements' execution time per statement of each arm (one
  connection, nothing else runs: wall ~ CPU).
  --raw-slice-rows N adds the raw write in N-row transactions (what a transaction of the
  size of our slices costs anyway: on HNSW, each UPDATE statement costs the server
  ~1,700 page faults; docs/performance.md, sixth pass).
  --raw-arrays adds the raw write sent as ours is since the sixth pass (binary array
  parameters, `UPDATE ... FROM unnest(...)` through the pk, no temporary table), alone
  and with a state row per vector: the floor our write is held to.
  --memory-arms adds ours with its pool's sessions not keeping their freed memory between
  statements (`[worker] kept_memory_mb = 0`: as before 2026-12-07) and the raw write
  with its session keeping it.
  --prepared-arms adds ours at each budget with `[worker] prepared_statements` on (the
  write path's statements parsed and planned once per connection, not once a slice);
  --stats then also prints each statement's planning time.
- `pipeline` (--pipeline): the whole pipeline (`pgreembed tick` + `dramatiq worker`, 2
  processes x 4 threads) with `pool_max_size` 4 and 1, against the raw write on 2
  connections, each on a fresh copy of the same rows (bench.sections).

Postgres CPU is every server process's (postmaster tree, /proc), autovacuum off during
the measured windows (the tables are vacuumed between arms, outside the meter), so the
figure is the write's and not a vacuum that happened to run; in the path part each arm
ends with a CHECKPOINT inside its meter (and starts after one outside it), so it pays
for writing the pages it dirtied and for no one else's:

    python -m bench.write_cpu [--rows 50000] [--dims 1536] [--rounds 5] [--hnsw] [--stats]
                              [--budgets 100,200] [--raw-slice-rows 7] [--raw-arrays]
                              [--memory-arms] [--prepared-arms]
                              [--pipeline] [--pipeline-rows 100000] [--pipeline-rounds 3]
                              [--pool-sizes 4,1] [--before CHECKOUT] [--perf] [--no-path]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
from psycopg import sql

from bench import server_profile
from bench.harness import API_KEY, Services, Tuning, pipeline, postgres_cpu
from bench.sections import (
    _precomputed,
    _state_table,
    _vector_type,
    _write_chunk,
    run_ceiling,
    run_ours,
)
from pgreembed.config import KEPT_MEMORY_MB, Settings, parse_settings
from pgreembed.store.pool import close_pools
from pgreembed.store.session import keep_freed_memory

STATS_SQL = """
    SELECT regexp_replace(left(query, 90), '\\s+', ' ', 'g'), calls, rows, total_exec_time,
           total_plan_time
    FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)
      AND query NOT LIKE '%%pg_stat_statements%%'
    ORDER BY total_exec_time DESC
"""
# bench.sections.STATE_ROW_SQL from a key array instead of the temporary table.
STATE_ROW_FROM_KEYS = """
    INSERT INTO pgreembed.{state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)
    SELECT i.id, s.model_id, md5(i.id::text)::uuid, now()
    FROM unnest(%(keys)b::bigint[]) AS i(id), pgreembed.slots s
    WHERE s.role = 'live' AND s.table_name = 'docs'
    ON CONFLICT (pgr_pk) DO UPDATE SET pgr_model_id = excluded.pgr_model_id,
        pgr_hash = excluded.pgr_hash, pgr_embedded_at = excluded.pgr_embedded_at
"""
# The pipeline part: every database (each arm runs on its own copy, dropped by the time
# the statistics are read), aggregated by query text.
PERF_HZ = 499
PIPELINE_STATS_SQL = """
    SELECT regexp_replace(left(query, 120), '\\s+', ' ', 'g') AS q, sum(calls), sum(rows),
           sum(total_exec_time)
    FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat_statements%%'
    GROUP BY q ORDER BY 4 DESC
"""


def _server(services: Services, stats: bool) -> None:
    """Autovacuum off (the meter would count it), pg_stat_statements loaded if asked."""
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        # No checkpoint inside an arm but the one it ends with (it pays for its own pages).
        conn.execute("ALTER SYSTEM SET max_wal_size = '20GB'")
        conn.execute("ALTER SYSTEM SET checkpoint_timeout = '1h'")
        if stats:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            # Planning is where an unprepared statement differs from a prepared one.
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
    services.postgres.restart()
    if stats:
        with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


class PathBench:
    """The path part: one database, the vector column reset between arms."""

    pending_again = "UPDATE docs SET embedding = NULL"  # the reset: every row written

    def __init__(self, services: Services, rows: int, batch: int, hnsw: bool,
                 stats: bool, slice_rows: int = 0, budgets: tuple[float, ...] = (),
                 raw_arrays: bool = False, memory_arms: bool = False,
                 prepared_arms: bool = False) -> None:
        self.services, self.rows, self.batch, self.stats = services, rows, batch, stats
        self.prepared_arms = prepared_arms
        self.slice_rows, self.raw_arrays, self.memory_arms = slice_rows, raw_arrays, memory_arms
        self.dsn = services.fresh_copy(rows, "path")
        self.dbname = str(psycopg.conninfo.conninfo_to_dict(self.dsn)["dbname"])
        with pipeline(services, self.dsn, Tuning(batch_size=batch)) as run:
            # `pgreembed init`: the column, the state table, the pending index; its config
            # file stays (importing `worker` reads it).
            self.config_path = str(run.config_path)
        if hnsw:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops)")
        with psycopg.connect(self.dsn) as conn:
            self.vector_type = _vector_type(conn)
            self.vectors = _precomputed(services, conn, self.vector_type)
            self.state_table = _state_table(conn)
            row = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'live'").fetchone()
            assert row is not None
            self.slot_id = int(row[0])
        # The settings' sources, kept for an arm that runs another checkout's code.
        self.document: dict[str, Any] = {"target": [{
            "name": "docs", "table": "public.docs", "text_column": "body",
            "vector_column": "embedding", "provider": "openai", "model": services.model,
            "dimensions": services.dims, "batch_size": batch}]}
        self.env = {"DATABASE_URL": self.dsn, "REDIS_URL": services.redis.url,
                    "OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": services.fake.base_url}
        self.settings = parse_settings(self.document, self.env)
        # What pgreembed did before write slices: a batch's vectors in one transaction.
        self.unsliced = parse_settings({**self.document, "worker": {"max_row_lock_ms": 1e9}},
                                       self.env)
        # Sessions that return their freed memory to the OS (before 2026-12-07).
        self.unkept = parse_settings({**self.document, "worker": {"kept_memory_mb": 0}},
                                     self.env)
        # Other slice budgets than the default (`[worker] max_row_lock_ms`).
        self.budgeted = {budget: parse_settings(
            {**self.document, "worker": {"max_row_lock_ms": budget}}, self.env)
            for budget in budgets}
        # The same budgets with the write path's statements prepared once per connection
        # (`[worker] prepared_statements`: parsed and planned once, not once a slice).
        self.prepared = {budget: parse_settings(
            {**self.document, "worker": {"max_row_lock_ms": budget,
                                         "prepared_statements": True}}, self.env)
            for budget in (self.settings.max_row_lock_ms, *budgets)}
        self.keys = [str(pk) for pk, _ in self.vectors]
        self.by_statement: dict[str, dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(lambda: [0.0, 0.0, 0.0, 0.0]))

    def arms(self) -> dict[str, Callable[[], None]]:
        arms = {"raw write": lambda: self._raw(False),
                "raw write + state rows": lambda: self._raw(True),
                "ours (process_batch)": lambda: self._ours(self.settings),
                "ours, unsliced": lambda: self._ours(self.unsliced)}
        for budget, settings in self.budgeted.items():
            arms[f"ours, max_row_lock_ms {budget:g}"] = (
                functools.partial(self._ours, settings))
        if self.prepared_arms:
            for budget, settings in self.prepared.items():
                arms[f"ours, max_row_lock_ms {budget:g}, prepared"] = (
                    functools.partial(self._ours, settings))
        if self.slice_rows:
            # What any small transaction costs, ours or not: the raw write in transactions
            # of about the rows of our slices (pg_stat_statements' calls of our UPDATE).
            arms[f"raw write, {self.slice_rows}-row transactions"] = (
                lambda: self._raw(False, size=self.slice_rows))
        if self.memory_arms:
            # Our pool's sessions keep their freed memory (store.session.keep_freed_memory):
            # ours without it (as before 2026-12-07), and the raw write with it.
            arms["ours, freed memory not kept"] = functools.partial(self._ours, self.unkept)
            arms["raw write, freed memory kept"] = (
                lambda: self._raw(False, keep_memory=True))
        if self.raw_arrays:
            arms["raw write, binary arrays"] = self._raw_arrays
            arms["raw + state rows, binary arrays"] = functools.partial(
                self._raw_arrays, state_rows=True)
        return arms

    def _raw_arrays(self, state_rows: bool = False) -> None:
        """The raw write as ours sends it since the sixth pass (docs/performance.md): one
        `UPDATE ... FROM unnest(keys, vectors)` of binary arrays through the pk a batch, no
        temporary table; `state_rows`: and a state row per vector, from the same keys."""
        upsert = sql.SQL(STATE_ROW_FROM_KEYS).format(state=sql.Identifier(self.state_table))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            from pgvector.psycopg import register_vector
            register_vector(conn)
            for i in range(0, self.rows, self.batch):
                chunk = self.vectors[i:i + self.batch]
                keys = [pk for pk, _ in chunk]
                with conn.transaction():
                    conn.execute(sql.SQL(
                        "UPDATE docs d SET embedding = i.vec"
                        " FROM unnest(%(keys)b::bigint[], %(vectors)b::{}[]) AS i(id, vec)"
                        " WHERE d.id = ANY(%(keys)b::bigint[]) AND d.id = i.id").format(
                            sql.SQL(self.vector_type)),
                        {"keys": keys, "vectors": [vector for _, vector in chunk]})
                    if state_rows:
                        conn.execute(upsert, {"keys": keys})

    def _raw(self, state_rows: bool, options: str = "", size: int = 0,
             keep_memory: bool = False) -> None:
        size = size or self.batch
        with psycopg.connect(self.dsn, autocommit=True, options=options) as conn:
            from pgvector.psycopg import register_vector
            register_vector(conn)
            if keep_memory:
                keep_freed_memory(conn, KEPT_MEMORY_MB)
            for i in range(0, self.rows, size):
                _write_chunk(conn, self.vector_type, self.vectors[i:i + size],
                             self.state_table if state_rows else None)

    def _ours(self, settings: Settings) -> None:
        # Importing `worker` builds its broker from the environment's settings.
        with mock.patch.dict(os.environ, {"DATABASE_URL": self.dsn,
                                          "REDIS_URL": self.settings.redis_url,
                                          "PGREEMBED_CONFIG": self.config_path,
                                          "OPENAI_API_KEY": API_KEY}):
            from worker.batch import process_batch
        for i in range(0, self.rows, self.batch):
            report = process_batch(settings, "docs", self.slot_id,
                                   self.keys[i:i + self.batch])
            if report.written != len(self.keys[i:i + self.batch]):
                raise AssertionError(f"process_batch wrote {report.written}: {report}")
        close_pools()

    def reset(self) -> None:
        """Every row pending again, the table vacuumed (outside the meter)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(self.pending_again)
            conn.execute(sql.SQL("TRUNCATE pgreembed.{}, pgreembed.usage").format(
                sql.Identifier(self.state_table)))
            conn.execute("VACUUM docs")
            conn.execute(sql.SQL("VACUUM pgreembed.{}").format(sql.Identifier(self.state_table)))
            conn.execute("CHECKPOINT")  # the reset's pages are written before the meter
        if self.stats:
            with psycopg.connect(self.services.admin_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
        self.services.flush_redis()

    def measure(self, name: str, arm: Callable[[], None]) -> tuple[float, float]:
        """(Postgres CPU s, wall s) of one arm; every row has its vector afterwards."""
        self.reset()
        before = postgres_cpu(self.services.postgres.data_dir)
        started = time.monotonic()
        arm()
        seconds = time.monotonic() - started
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # each arm writes its own dirty pages
        cpu = postgres_cpu(self.services.postgres.data_dir) - before
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL").fetchone()
            if row != (0,):
                raise AssertionError(f"{name}: {row} rows left without a vector")
        if self.stats:
            with psycopg.connect(self.services.admin_dsn, autocommit=True) as conn:
                for query, calls, rows, ms, plan_ms in conn.execute(STATS_SQL, (self.dbname,)):
                    entry = self.by_statement[name][query]
                    entry[0] += calls
                    entry[1] += rows
                    entry[2] += ms
                    entry[3] += plan_ms
        return cpu, seconds


def run_path(services: Services, args: argparse.Namespace) -> None:
    bench = PathBench(services, args.rows, args.batch, args.hnsw, args.stats,
                      args.raw_slice_rows,
                      tuple(float(b) for b in args.budgets.split(",")) if args.budgets else (),
                      args.raw_arrays, args.memory_arms, args.prepared_arms)
    cpu: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    arms = list(bench.arms().items())
    for number in range(args.rounds):
        order = arms[number % len(arms):] + arms[:number % len(arms)]
        for name, arm in order:
            used, seconds = bench.measure(name, arm)
            cpu[name].append(used)
            wall[name].append(seconds)
            print(f"  round {number + 1} {name}: Postgres CPU {used:.2f} s, {seconds:.2f} s",
                  flush=True)
    column = "HNSW-indexed" if args.hnsw else "unindexed"
    print(f"path: {args.rows} rows x {args.dims} dims, {args.batch}-row batches, one"
          f" connection, {column} column; median of {args.rounds} interleaved rounds:")
    raw = statistics.median(cpu["raw write"])
    for name, values in cpu.items():
        median = statistics.median(values)
        print(f"  {name:>24}: Postgres CPU {median:6.2f} s = {1e6 * median / args.rows:6.1f}"
              f" us/row ({median / raw:.2f}x the raw write); {statistics.median(wall[name]):.2f}"
              f" s wall; rounds {', '.join(f'{v:.2f}' for v in values)}")
    if args.stats:
        for name, statements in bench.by_statement.items():
            print(f"  pg_stat_statements, {name} (exec ms and plan ms per 1000 rows, calls,"
                  " rows; all rounds):")
            total = sum(entry[2] for entry in statements.values())
            planning = sum(entry[3] for entry in statements.values())
            per = 1000 / (args.rows * args.rounds)
            print(f"    {total * per:8.2f} {planning * per:8.2f}  total")
            for query, (calls, rows, ms, plan_ms) in sorted(statements.items(),
                                                              key=lambda kv: -kv[1][2]):
                if (ms + plan_ms) * per >= 0.05:
                    print(f"    {ms * per:8.2f} {plan_ms * per:8.2f}  {int(calls):6}"
                          f" {int(rows):8}  {query}")


def run_pipeline(services: Services, args: argparse.Namespace) -> None:
    rows = args.pipeline_rows
    arms: list[tuple[str, Callable[[], Any]]] = [
        ("raw write, 512-row transactions on 2 connections", lambda: run_ceiling(
            services, rows, Tuning(), strategies={"2 connections": (512, 2)})[0]),
        ("ours, pool_max_size 4", lambda: run_ours(services, rows, Tuning(pool_max_size=4))),
        ("ours, pool_max_size 1", lambda: run_ours(services, rows, Tuning(pool_max_size=1))),
    ]
    if args.before:
        # The same pipeline run from another checkout (e.g. main before a change): its
        # `pgreembed` and `dramatiq worker` processes import that code.
        def before() -> Any:
            with mock.patch("bench.harness.ROOT", Path(args.before).resolve()):
                return run_ours(services, rows, Tuning(pool_max_size=4))

        arms.insert(1, (f"ours at {args.before}, pool_max_size 4", before))
    if args.pool_sizes is not None:
        keep = {f"ours, pool_max_size {size}" for size in args.pool_sizes.split(",")}
        arms = [arm for arm in arms if not arm[0].startswith("ours, ") or arm[0] in keep]
    cpu: dict[str, list[float]] = defaultdict(list)
    rate: dict[str, list[float]] = defaultdict(list)
    by_symbol: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_statement: dict[str, dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))
    for number in range(args.pipeline_rounds):
        order = arms[number % len(arms):] + arms[:number % len(arms)]
        for name, arm in order:
            with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
                conn.execute("CHECKPOINT")  # the previous arm's pages, outside the meter
                if args.stats:
                    conn.execute("SELECT pg_stat_statements_reset()")
            with contextlib.ExitStack() as stack:
                if args.perf:
                    profile = stack.enter_context(server_profile.recorded(
                        services.postgres.data_dir, services.workdir / "perf.data",
                        PERF_HZ))
                result = arm()
            if args.perf:
                for share, dso, symbol in profile.by_symbol:
                    by_symbol[name][f"{dso} {symbol}"] += share / 100 * profile.samples
            if args.stats:  # every database: the arm's copy is dropped by now
                with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
                    for query, calls, count, ms in conn.execute(PIPELINE_STATS_SQL):
                        entry = by_statement[name][query]
                        entry[0] += float(calls)
                        entry[1] += float(count)
                        entry[2] += float(ms)
            used = result.cpu_used["postgres"]
            speed = result.rate if hasattr(result, "rate") else result.progress.warm()
            cpu[name].append(used)
            rate[name].append(speed)
            print(f"  round {number + 1} {name}: Postgres CPU {used:.2f} s, {speed:,.0f} rows/s"
                  f" ({result.cpu})", flush=True)
    print(f"pipeline: {rows} rows x {args.dims} dims, median of {args.pipeline_rounds}"
          " interleaved rounds (ours: dramatiq --processes 2 --threads 4, batch_size 512):")
    raw = statistics.median(next(iter(cpu.values())))
    for name, values in cpu.items():
        median = statistics.median(values)
        print(f"  {name:>48}: Postgres CPU {median:6.2f} s ({median / raw:.2f}x the raw"
              f" write), {statistics.median(rate[name]):,.0f} rows/s; rounds"
              f" {', '.join(f'{v:.2f}' for v in values)}")
    if args.stats:
        _print_statements(by_statement, rows * args.pipeline_rounds)
    if args.perf:
        _print_symbols(by_symbol, rows * args.pipeline_rounds)


def _print_symbols(by_symbol: dict[str, dict[str, float]], rows: int) -> None:
    """perf's samples of the server's processes: CPU ms per 1000 rows, per function."""
    per = 1000 / rows * 1000 / PERF_HZ  # ms per 1000 rows for one sample
    for name, counts in by_symbol.items():
        print(f"  perf, Postgres processes, {name} (CPU ms per 1000 rows; all rounds):")
        print(f"    {sum(counts.values()) * per:8.2f}  total")
        for symbol, samples in sorted(counts.items(), key=lambda kv: -kv[1])[:25]:
            print(f"    {samples * per:8.2f}  {symbol}")


def _print_statements(by_statement: dict[str, dict[str, list[float]]], rows: int) -> None:
    """pg_stat_statements' execution time per 1000 rows written, per arm and statement."""
    per = 1000 / rows
    for name, statements in by_statement.items():
        print(f"  pg_stat_statements, {name} (exec ms per 1000 rows, calls, rows; all rounds):")
        print(f"    {sum(entry[2] for entry in statements.values()) * per:8.2f}  total")
        for query, (calls, count, ms) in sorted(statements.items(), key=lambda kv: -kv[1][2]):
            if ms * per >= 0.05:
                print(f"    {ms * per:8.2f}  {int(calls):6} {int(count):8}  {query}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hnsw", action="store_true", help="path: an HNSW-indexed column")
    parser.add_argument("--budgets", metavar="MS,MS",
                        help="path: also ours with these `[worker] max_row_lock_ms`")
    parser.add_argument("--raw-slice-rows", type=int, default=0, metavar="N",
                        help="path: also the raw write in N-row transactions (our slices'"
                             " size: --stats prints it as the calls of our UPDATE)")
    parser.add_argument("--raw-arrays", action="store_true",
                        help="path: also the raw write as binary arrays (how ours sends it),"
                             " alone and with a state row per vector")
    parser.add_argument("--memory-arms", action="store_true",
                        help="path: ours with its sessions not keeping freed memory, and"
                        " the raw write with them keeping it (store.session)")
    parser.add_argument("--prepared-arms", action="store_true",
                        help="path: also ours at each budget with `[worker]"
                        " prepared_statements` on")
    parser.add_argument("--stats", action="store_true",
                        help="pg_stat_statements per statement (path and pipeline)")
    parser.add_argument("--perf", action="store_true",
                        help="pipeline: perf samples of the server's processes per function")
    parser.add_argument("--no-path", action="store_true", help="skip the path part")
    parser.add_argument("--pipeline", action="store_true", help="also the pipeline part")
    parser.add_argument("--pipeline-rows", type=int, default=100_000)
    parser.add_argument("--pipeline-rounds", type=int, default=3)
    parser.add_argument("--before", metavar="CHECKOUT",
                        help="pipeline: also ours as the code in CHECKOUT (another worktree,"
                        " e.g. main) runs it, pool_max_size 4: before/after in one run")
    parser.add_argument("--pool-sizes", help="pipeline: ours with these pool_max_size"
                        " values only, e.g. 4 (default: 4,1)")
    args = parser.parse_args()
    if args.perf and not server_profile.available():
        parser.error("--perf: `perf record -e cpu-clock` does not work on this machine")
    services = Services(f"fake-{args.dims}", args.dims).start()
    try:
        _server(services, args.stats)
        if not args.no_path:
            run_path(services, args)
        if args.pipeline:
            run_pipeline(services, args)
    finally:
        services.stop()


if __name__ == "__main__":
    main()
