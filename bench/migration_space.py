"""What a model change costs the app's table on disk, and how fast its fill is (issue 24).

    python -m bench.migration_space [--rows 2000] [--dims 1536] [--cycles 3] [--rounds 1]
        [--cases today,clear,spread,spread_ff,side,side_ff,in_place]

The database's share of a migration, in SQL, on one table of `--rows` rows x `--dims`
(TOASTed) vectors with an HNSW index (cosine, m 16, ef_construction 64) and the pending
index (`WHERE v IS NULL`) on its live column `v`, while an app thread edits 50 rows/s.
Each case runs `--cycles` migrations back to back: add a side column, write every row's
side vector (512-row binary COPY + UPDATE ... FROM, what the workers do), CREATE INDEX
on it, swap (renames), finalize, plain VACUUM. Cases (each its own database, interleaved
per round):
- today: the side column's pending index (its predicate names the side column: no HOT),
  finalize = DROP COLUMN (every replaced vector stays until its row is rewritten);
- clear: the same fill; finalize drops the old column's indexes, sets it to NULL in
  500-row transactions (each row's TOASTed vector is freed), then DROP COLUMN;
- spread: what finalize does (migrations.clear): the old column's indexes dropped, then
  one row per heap page per round (a transaction each, SPREAD_PAGES pages at a time), so
  each round finds the room the previous round's pruned versions left: HOT;
- spread_ff: spread, plus no side pending index and fillfactor 70 set at the first start
  (only new pages get it: the first fill moves rows there, later fills can be HOT);
- side: what the side path does since branch side-hot: spread, and the side column has
  no pending index during the fill (it is built CONCURRENTLY just before the ANN index,
  as `migrate index` does); the table's fillfactor untouched;
- side_ff: side, plus fillfactor 70 set at the first start;
- in_place: the new model's vectors written into `v` itself, through its HNSW index.
Per cycle: seconds, Postgres CPU of the writing backend (/proc), WAL bytes, HOT share,
live index growth during the fill, sizes (heap, TOAST, indexes) after VACUUM and live
bytes (pgstattuple of heap + TOAST); one JSON line per cycle, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from bench.harness import texts
from bench.side_fill_crossover import _vectors
from bench.side_fill_crossover import _write as crossover_write
from pgreembed.testing.services import EmbeddedPostgres

CLEAR_CHUNK = 500
SPREAD_PAGES = 256
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the backend `pid` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _wal(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0]) if row else 0


COUNTED = [0, 0]  # updates, HOT updates of this bench's own transactions (not the app's)


def _xact(conn: psycopg.Connection) -> tuple[int, int]:
    """This backend's not yet reported updates of t (the app's backend keeps its own)."""
    row = conn.execute("SELECT pg_stat_get_xact_tuples_updated('t'::regclass),"
                       " pg_stat_get_xact_tuples_hot_updated('t'::regclass)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _counted(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> int:
    """Run `query` in the open transaction; add its updates and HOT updates to COUNTED
    (read before and after it, in the same transaction: nothing is reported between)."""
    before = _xact(conn)
    done = conn.execute(query, params).rowcount
    after = _xact(conn)
    COUNTED[0] += after[0] - before[0]
    COUNTED[1] += after[1] - before[1]
    return done


def _updates(conn: psycopg.Connection) -> tuple[int, int]:
    return COUNTED[0], COUNTED[1]


def _write(conn: psycopg.Connection, column: str, keys: list[int], vectors: Any,
           dims: int) -> float:
    """The workers' write (bench.side_fill_crossover), its updates counted."""
    return crossover_write(conn, column, keys, vectors, dims, update=_counted)


def _update(conn: psycopg.Connection, query: str, params: tuple[Any, ...]) -> int:
    """One short transaction of the clearing; rows it updated."""
    with conn.transaction():
        return _counted(conn, query, params)


def _sizes(conn: psycopg.Connection) -> dict[str, int]:
    row = conn.execute(
        "SELECT pg_relation_size('t'), pg_total_relation_size(reltoastrelid),"
        " pg_indexes_size('t'), pg_total_relation_size('t'),"
        " (SELECT tuple_len FROM pgstattuple('t')),"
        " (SELECT tuple_len FROM pgstattuple(reltoastrelid)),"
        " (SELECT free_space FROM pgstattuple(reltoastrelid))"
        " FROM pg_class WHERE oid = 't'::regclass").fetchone()
    assert row is not None
    return {"heap": row[0], "toast": row[1], "indexes": row[2], "total": row[3],
            "live_bytes": row[4] + row[5], "toast_free": row[6]}


def _index_size(conn: psycopg.Connection, name: str) -> int:
    row = conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()
    return int(row[0]) if row else 0


class App:
    """Edits `rate` rows/s (their text) on its own connection; records each latency."""

    def __init__(self, dsn: str, rows: int, rate: float = 50.0) -> None:
        self.dsn, self.rows, self.rate = dsn, rows, rate
        self.latencies: list[float] = []
        self.phase = "setup"  # what the bench is doing meanwhile
        self.by_phase: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(7)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                key = rng.randint(1, self.rows)
                started = time.perf_counter()
                conn.execute("UPDATE t SET body = %s WHERE id = %s",
                             (texts(key + rng.randint(1, 10**6), 1)[0], key))
                took = time.perf_counter() - started
                self.latencies.append(took)
                self.by_phase.setdefault(self.phase, []).append(took)
                self.stop.wait(max(0.0, 1 / self.rate - took))

    def __enter__(self) -> App:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def p99_ms(self, phase: str | None = None) -> float:
        ordered = sorted(self.latencies if phase is None else self.by_phase.get(phase, []))
        return round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1) if ordered else 0.0


def _setup(conn: psycopg.Connection, rows: int, dims: int) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    register_vector(conn)
    conn.execute(f"CREATE TABLE t (id bigint PRIMARY KEY, body text, v vector({dims}))")
    with conn.cursor().copy("COPY t (id, body) FROM STDIN") as copy:
        for key, text in enumerate(texts(1, rows), 1):
            copy.write_row((key, text))
    _write(conn, "v", list(range(1, rows + 1)), _vectors(rows, dims, 1), dims)
    conn.execute("CREATE INDEX t_v ON t USING hnsw (v vector_cosine_ops)"
                 " WITH (m = 16, ef_construction = 64)")
    conn.execute("CREATE INDEX t_v_pending ON t (id) WHERE v IS NULL")
    conn.execute("VACUUM ANALYZE t")


def _clear(conn: psycopg.Connection, column: str, rows: int) -> None:
    """finalize's clearing: the old column NULL in short transactions, in key order."""
    for start in range(1, rows + 1, CLEAR_CHUNK):
        _update(conn, f"UPDATE t SET {column} = NULL WHERE id >= %s AND id < %s"
                f" AND {column} IS NOT NULL", (start, start + CLEAR_CHUNK))


def _clear_spread(conn: psycopg.Connection, column: str, rows: int) -> None:
    """finalize's clearing, HOT-friendly: per range of SPREAD_PAGES pages, rounds of one
    row per page, each its own transaction, so that the room the previous round's
    committed versions leave (pruned when the page is next read) takes the next one."""
    pages_row = conn.execute("SELECT pg_relation_size('t') / current_setting('block_size')::int"
                             ).fetchone()
    pages = int(pages_row[0]) if pages_row else 0
    for first in range(0, pages, SPREAD_PAGES):
        while _update(conn,
            f"""
            WITH c AS (SELECT id, ctid AS tid FROM t
                       WHERE ctid >= ('(' || %s::bigint || ',0)')::tid
                         AND ctid < ('(' || %s::bigint || ',0)')::tid
                         AND {column} IS NOT NULL),
            r AS (SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY
                    (tid::text::point)[0] ORDER BY tid) n FROM c) x WHERE n = 1)
            UPDATE t SET {column} = NULL FROM r WHERE t.id = r.id
            """, (first, first + SPREAD_PAGES)):
            pass
    _clear(conn, column, rows)  # rows moved behind the walk


def cycle(conn: psycopg.Connection, case: str, number: int, rows: int, dims: int,
          app: App) -> dict[str, Any]:
    pid = conn.info.backend_pid
    side = "v" if case == "in_place" else "side"
    if case != "in_place":
        conn.execute(f"ALTER TABLE t ADD COLUMN side vector({dims})")
        if case in ("spread_ff", "side_ff"):
            conn.execute("ALTER TABLE t SET (fillfactor = 70)")
        if case not in ("spread_ff", "side", "side_ff"):
            conn.execute("CREATE INDEX CONCURRENTLY t_side_pending ON t (id) WHERE side IS NULL")
    live_before = _index_size(conn, "t_v")
    app.phase = "fill"
    updates, cpu, wal = _updates(conn), _cpu(pid), _wal(conn)
    all_cpu, all_wal = cpu, wal
    fill_s = _write(conn, side, list(range(1, rows + 1)), _vectors(rows, dims, 10 + number),
                    dims)
    after = _updates(conn)
    out: dict[str, Any] = {
        "case": case, "cycle": number, "fill_s": round(fill_s, 2),
        "fill_cpu_ms_per_row": round(1000 * (_cpu(pid) - cpu) / rows, 2),
        "fill_wal_bytes_per_row": round((_wal(conn) - wal) / rows),
        "fill_hot": f"{after[1] - updates[1]}/{after[0] - updates[0]}",
        "live_index_growth": round(_index_size(conn, "t_v") / live_before, 3)}
    if case == "in_place":
        out["total_s"] = out["fill_s"]
    else:
        started, cpu = time.perf_counter(), _cpu(pid)
        app.phase = "build"
        if case in ("side", "side_ff"):
            conn.execute("CREATE INDEX CONCURRENTLY t_side_pending ON t (id) WHERE side IS NULL")
        conn.execute("CREATE INDEX CONCURRENTLY t_side ON t USING hnsw (side vector_cosine_ops)"
                     " WITH (m = 16, ef_construction = 64)")
        out["build_s"] = round(time.perf_counter() - started, 2)
        out["total_s"] = round(fill_s + out["build_s"], 2)
        out["side_cpu_ms_per_row"] = round(
            out["fill_cpu_ms_per_row"] + 1000 * (_cpu(pid) - cpu) / rows, 2)
        with conn.transaction():  # the swap
            conn.execute("ALTER TABLE t RENAME COLUMN v TO old")
            conn.execute("ALTER TABLE t RENAME COLUMN side TO v")
            conn.execute("ALTER INDEX t_v RENAME TO t_old")
            conn.execute("ALTER INDEX t_side RENAME TO t_v")
            conn.execute("ALTER INDEX t_v_pending RENAME TO t_old_pending")
            conn.execute("ALTER INDEX IF EXISTS t_side_pending RENAME TO t_v_pending")
        if case == "spread_ff":
            conn.execute("CREATE INDEX CONCURRENTLY t_v_pending ON t (id) WHERE v IS NULL")
        app.phase = "finalize"
        started, cpu, wal, updates = time.perf_counter(), _cpu(pid), _wal(conn), _updates(conn)
        if case != "today":
            conn.execute("DROP INDEX CONCURRENTLY t_old")
            conn.execute("DROP INDEX CONCURRENTLY t_old_pending")
            if case == "clear":
                _clear(conn, "old", rows)
            else:
                _clear_spread(conn, "old", rows)
        conn.execute("ALTER TABLE t DROP COLUMN old")
        after = _updates(conn)
        out |= {"finalize_s": round(time.perf_counter() - started, 2),
                "finalize_cpu_ms_per_row": round(1000 * (_cpu(pid) - cpu) / rows, 2),
                "finalize_wal_bytes_per_row": round((_wal(conn) - wal) / rows),
                "finalize_hot": f"{after[1] - updates[1]}/{after[0] - updates[0]}"}
    out["end_to_end_s"] = round(out["total_s"] + out.get("finalize_s", 0.0), 2)
    out["end_to_end_cpu_ms_per_row"] = round(1000 * (_cpu(pid) - all_cpu) / rows, 2)
    out["end_to_end_wal_bytes_per_row"] = round((_wal(conn) - all_wal) / rows)
    app.phase = "vacuum"
    conn.execute("VACUUM t")
    return out | _sizes(conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", default="today,clear,spread,spread_ff,side,side_ff,in_place")
    args = parser.parse_args()
    cases = args.cases.split(",")
    results: dict[str, list[list[dict[str, Any]]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="pgreembed-migration-space-") as folder:
        server = EmbeddedPostgres(f"{folder}/pg")
        try:
            dsn = server.start()
            with psycopg.connect(dsn, autocommit=True) as admin:
                for round_ in range(args.rounds):
                    for case in cases:
                        name = f"b_{case}_{round_}"
                        admin.execute(f"CREATE DATABASE {name}")
                        db = psycopg.conninfo.make_conninfo(dsn, dbname=name)
                        with psycopg.connect(db, autocommit=True) as conn:
                            _setup(conn, args.rows, args.dims)
                            conn.execute("SET maintenance_work_mem = '512MB'")
                            # every CPU second in this backend (what /proc measures)
                            conn.execute("SET max_parallel_maintenance_workers = 0")
                            conn.execute("VACUUM t")
                            before = _sizes(conn)
                            print(json.dumps({"case": case, "before": before}), flush=True)
                            runs = []
                            with App(db, args.rows) as app:
                                for number in range(1, args.cycles + 1):
                                    out = cycle(conn, case, number, args.rows, args.dims, app)
                                    out["total_ratio"] = round(out["total"] / before["total"], 3)
                                    out["live_bytes_ratio"] = round(
                                        out["live_bytes"] / before["live_bytes"], 3)
                                    if case == "in_place":
                                        break
                                    runs.append(out)
                                    print(json.dumps(out), flush=True)
                            if case == "in_place":
                                runs.append(out)
                                print(json.dumps(out), flush=True)
                            runs[-1]["app_p99_ms"] = app.p99_ms()
                            runs[-1]["app_p99_ms_finalize"] = app.p99_ms("finalize")
                            runs[-1]["app_p99_ms_fill"] = app.p99_ms("fill")
                            print(json.dumps({"case": case, "app_p99_ms": {
                                phase: app.p99_ms(phase) for phase in app.by_phase}}),
                                  flush=True)
                            results[case].append(runs)
                        admin.execute(f"DROP DATABASE {name}")
        finally:
            server.stop()
    summary: dict[str, Any] = {}
    for case, rounds in results.items():
        if not rounds:
            continue
        every = [cycle for r in rounds for cycle in r]
        summary[case] = {
            "end_to_end_s": statistics.median(c["end_to_end_s"] for c in every),
            "cpu_ms_per_row": statistics.median(c["end_to_end_cpu_ms_per_row"] for c in every),
            "wal_bytes_per_row": statistics.median(c["end_to_end_wal_bytes_per_row"]
                                                   for c in every),
            "live_index_growth": max(c["live_index_growth"] for c in every),
            "app_p99_ms": statistics.median(r[-1]["app_p99_ms"] for r in rounds),
            "app_p99_ms_fill": statistics.median(r[-1]["app_p99_ms_fill"] for r in rounds),
            "app_p99_ms_finalize": statistics.median(r[-1]["app_p99_ms_finalize"]
                                                     for r in rounds),
            "total_s_first": statistics.median(r[0]["total_s"] for r in rounds),
            "total_s_last": statistics.median(r[-1]["total_s"] for r in rounds),
            "total_ratio_per_cycle": [statistics.median(r[i]["total_ratio"] for r in rounds)
                                      for i in range(len(rounds[0]))],
            "live_bytes_ratio_per_cycle": [
                statistics.median(r[i]["live_bytes_ratio"] for r in rounds)
                for i in range(len(rounds[0]))]}
    if "in_place" in summary:
        base = summary["in_place"]["end_to_end_s"]
        for case in summary:
            summary[case]["speedup_vs_in_place"] = round(base / summary[case]["end_to_end_s"], 2)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
