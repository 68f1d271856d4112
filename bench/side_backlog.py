"""A backlog on an HNSW-indexed column: direct writes vs the automatic side path (issue 13).

    python -m bench.side_backlog [--rows 100000] [--dims 1536] [--rounds 1]

The table users have before a backfill (or after a bulk import): N rows, a vector column
with an HNSW index (vector_cosine_ops, m 16, ef_construction 64) and no vector yet, so
all N rows are pending. On fresh copies of the same rows, with the same workers:
- direct: `[side_fill]` kept out of the way (min_rows above the table), `init`, then
  `tick --wait`: the workers write every vector through the HNSW index;
- side: pgreembed's defaults, `init`, then `tick --wait`, which starts the side fill
  (the live column paused), copies nothing (no vector yet), lets the workers fill the
  unindexed side column, builds its index CONCURRENTLY with the maintenance_work_mem
  and parallel workers pgreembed picks, and swaps it in: end to end.
Both end with every row's vector in `embedding` (spot-checked against the provider) and,
for the side path, a valid HNSW index on it. Printed: seconds, the side path's steps
(from pgreembed.migrations.auto_step and pg_stat_progress_create_index, polled), Postgres
CPU, the app table's updates and how many were HOT, and side/direct. `bench.run --only
sidepath` runs this and the model-change case (bench.indexed.measure_side_path).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field

import psycopg

from bench.harness import (
    CpuMeter,
    Services,
    Tuning,
    count_pending,
    pipeline,
    rows_in_usage_ledger,
    verify_vectors,
)

# The direct path: no automatic side fill (neither `tick`'s backlog rule nor `init`'s
# model-change rule, which does not look at `enabled`) on a table of any bench size.
NO_SIDE_FILL = "\n[side_fill]\nmin_rows = 1000000000\n"
TICK_TIMEOUT = 4 * 3600.0


def side_config(rows: int) -> str:
    """The defaults, except below their `min_rows` (1000), where a table this small
    would stay on the direct path: then the threshold is lowered to half the table."""
    return "" if rows > 1000 else f"\n[side_fill]\nmin_rows = {max(1, rows // 2)}\n"


def table_updates(dsn: str) -> tuple[int, int]:
    """(updates, HOT updates) of the app's table so far (cumulative statistics)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                           " WHERE relname = 'docs'").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


class StepWatcher(threading.Thread):
    """When each side-fill step and each index-build phase was first seen (polled every
    0.25 s on its own connection; at most that late)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="step-watcher", daemon=True)
        self.dsn = dsn
        self.seen: dict[str, float] = {}
        self.build_settings: tuple[str, str] | None = None
        self._stop_event = threading.Event()

    def _poll(self, conn: psycopg.Connection) -> None:
        now = time.monotonic()
        step = conn.execute(
            "SELECT CASE WHEN to_regclass('pgreembed.migrations') IS NOT NULL THEN 1 END"
        ).fetchone()
        if step and step[0]:
            row = conn.execute("SELECT coalesce(auto_step, phase) FROM pgreembed.migrations"
                               " ORDER BY id DESC LIMIT 1").fetchone()
            if row and row[0]:
                self.seen.setdefault(str(row[0]), now)
        build = conn.execute(
            "SELECT am.amname, p.phase FROM pg_stat_progress_create_index p"
            " JOIN pg_class c ON c.oid = p.index_relid JOIN pg_am am ON am.oid = c.relam"
            " WHERE p.datname = current_database() AND p.relid = 'docs'::regclass").fetchone()
        if build:
            self.seen.setdefault(f"{build[0]} build: {build[1]}", now)

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop_event.is_set():
                with contextlib.suppress(psycopg.Error):  # schema being made: next time
                    self._poll(conn)
                self._stop_event.wait(0.25)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


@dataclass
class PathRun:
    label: str
    rows: int
    seconds: float  # from `init` to the end of `tick --wait`
    postgres_cpu: float
    cpu: str
    updates: int
    hot_updates: int
    steps: dict[str, float] = field(default_factory=dict)  # name -> seconds from init
    done: int | None = None  # rows written when stopped at the time budget (None: finished)

    @property
    def finished(self) -> bool:
        return self.done is None

    def line(self) -> str:
        if not self.finished:
            return (f"{self.label}: STOPPED at the time budget after {self.seconds:.1f} s with"
                    f" {self.done:,} of {self.rows:,} rows written"
                    f" ({(self.done or 0) / self.seconds:,.0f} rows/s); Postgres CPU"
                    f" {self.postgres_cpu:.1f} s; {self.cpu}")
        return (f"{self.label}: {self.seconds:.1f} s = {self.rows / self.seconds:,.0f} rows/s;"
                f" Postgres CPU {self.postgres_cpu:.1f} s; docs updates {self.updates:,}"
                f" ({self.hot_updates:,} HOT); {self.cpu}")

    def step_line(self) -> str:
        marks = sorted(self.steps.items(), key=lambda item: item[1])
        return ", ".join(f"{name} at {at:.1f} s" for name, at in marks)


def run_path(services: Services, rows: int, tuning: Tuning, side: bool,
             budget: float | None = None) -> PathRun:
    """One backlog of `rows` on a fresh copy of the HNSW-indexed table, direct or side.
    `budget`: stop after this many seconds (a lower bound then: `done` rows written)."""
    dsn = services.fresh_copy(rows, "side" if side else "direct", "hnsw")
    services.fake.reset()
    try:
        config = side_config(rows) if side else NO_SIDE_FILL
        with pipeline(services, dsn, tuning, init=False, extra_config=config) as run:
            worker = run.start_worker()
            watcher = StepWatcher(dsn)
            watcher.start()
            before = table_updates(dsn)
            meter = CpuMeter(services, worker.pid)
            started = time.monotonic()
            run.cli("init")
            tick = run.start_tick(TICK_TIMEOUT)
            done: int | None = None
            while tick.poll() is None:
                if not run.alive():
                    raise RuntimeError(f"the worker exited: {run.log_text('worker')[-2000:]}")
                if budget is not None and time.monotonic() - started > budget:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        done = rows_in_usage_ledger(conn)
                    break
                time.sleep(0.2)
            seconds = time.monotonic() - started
            meter.stop()
            watcher.stop()
            if done is not None:
                return PathRun("direct (workers write through the HNSW index)", rows, seconds,
                               meter.used["postgres"], meter.describe(), 0, 0, {}, done)
            if tick.returncode != 0:
                raise RuntimeError(f"tick exited {tick.returncode}: {run.log_text('tick')[-2000:]}")
        after = table_updates(dsn)
        _check(dsn, side, rows)
        verify_vectors(dsn, services.model, services.dims, rows)
        label = ("side column (automatic: fill, CREATE INDEX CONCURRENTLY, swap)" if side
                 else "direct (workers write through the HNSW index)")
        return PathRun(label, rows, seconds, meter.used["postgres"], meter.describe(),
                       after[0] - before[0], after[1] - before[1],
                       {k: v - started for k, v in watcher.seen.items()})
    finally:
        services.drop(dsn)


def _check(dsn: str, side: bool, rows: int) -> None:
    """Every row has its vector, and the path taken is the one measured."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if count_pending(conn):
            raise AssertionError(f"{count_pending(conn)} of {rows} rows have no vector")
        migrations = conn.execute("SELECT phase, auto_reason FROM pgreembed.migrations"
                                  ).fetchall()
        index = conn.execute(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_am am ON am.oid = c.relam JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'docs'::regclass"
            " AND a.attname = 'embedding' AND am.amname = 'hnsw' AND i.indisvalid").fetchone()
    if side and migrations != [("swapped", "backlog")]:
        raise AssertionError(f"expected one swapped backlog side fill, got {migrations}")
    if not side and migrations:
        raise AssertionError(f"the direct run went side by side: {migrations}")
    if not index or index[0] != 1:
        raise AssertionError("embedding has no valid HNSW index at the end")


@dataclass
class BacklogResult:
    rows: int
    direct: list[PathRun]
    side: list[PathRun]

    def ratio(self) -> float:
        """Median direct seconds / median side seconds (> 1: the side path is faster); a
        lower bound when a direct run was stopped at its time budget."""
        return (statistics.median(r.seconds for r in self.direct)
                / statistics.median(r.seconds for r in self.side))

    def summary(self) -> str:
        direct = statistics.median(r.seconds for r in self.direct)
        side = statistics.median(r.seconds for r in self.side)
        bound = "" if all(r.finished for r in self.direct) else ">= "
        return (f"backlog of {self.rows} rows under HNSW (all pending): direct {bound}{direct:.0f}"
                f" s, side column {side:.0f} s = {bound}{self.ratio():.2f}x faster (target"
                f" >= 3; median of {len(self.side)} round(s))")


def measure_backlog(services: Services, rows: int, tuning: Tuning, rounds: int = 1,
                    direct_budget: float | None = None) -> BacklogResult:
    """Rounds of (side, then direct): the side path first so its figures come early.
    `direct_budget`: stop a direct run after this many seconds (the ratio is then a
    lower bound)."""
    result = BacklogResult(rows, [], [])
    for number in range(1, rounds + 1):
        if rounds > 1:
            print(f"    -- round {number} of {rounds}", flush=True)
        for side in (True, False):
            run = run_path(services, rows, tuning, side, None if side else direct_budget)
            (result.side if side else result.direct).append(run)
            print(f"    {run.line()}", flush=True)
            if side:
                print(f"      steps: {run.step_line()}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--direct-budget", type=float, default=None,
                        help="stop a direct run after this many seconds (ratio: a lower bound)")
    args = parser.parse_args()
    services = Services(f"fake-{args.dims}", args.dims).start()
    try:
        tuning = Tuning()
        print(f"ours: {tuning.describe()}", flush=True)
        result = measure_backlog(services, args.rows, tuning, args.rounds, args.direct_budget)
        print(result.summary())
    finally:
        services.stop()


if __name__ == "__main__":
    main()
