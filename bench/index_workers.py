"""How many parallel workers an HNSW build should get on this machine (issue 13).

    python -m bench.index_workers [--rows 20000] [--dims 1536] [--workers 0,1,7] [--rounds 3]

One table of `--rows` random unit vectors with no index. Each round builds the HNSW index
(vector_cosine_ops, m 16, ef_construction 64) CONCURRENTLY once per worker count, in an
interleaved order, with the maintenance_work_mem pgreembed picks (the graph in memory):
`max_parallel_maintenance_workers = w` is what `[side_fill] parallel_workers` sets. Printed:
seconds (median of the rounds) and Postgres CPU seconds per worker count, and one JSON line
(`result: {...}`). Whether more processes than cores help is a property of the machine: this
shows what `[side_fill] parallel_workers` (default: the server's own setting) should be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from bench.harness import postgres_cpu
from pgreembed.migrations.index import prepare_build_session
from pgreembed.store.backlog import build_settings
from pgreembed.testing.services import EmbeddedPostgres

BATCH = 2000


def _fill(conn: psycopg.Connection, rows: int, dims: int) -> None:
    conn.execute(f"CREATE TABLE t (id bigint PRIMARY KEY, v vector({dims}))")
    rng = np.random.default_rng(7)
    for start in range(0, rows, BATCH):
        count = min(BATCH, rows - start)
        matrix = rng.standard_normal((count, dims)).astype(np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        with conn.cursor().copy("COPY t (id, v) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["bigint", "vector"])
            for offset, vector in enumerate(matrix):
                copy.write_row((start + offset + 1, vector))
    conn.execute("VACUUM ANALYZE t")


def _build(conn: psycopg.Connection, data_dir: Path, rows: int, dims: int, workers: int
           ) -> tuple[float, float]:
    prepare_build_session(conn, *build_settings(conn, rows, dims, "1GB", workers))
    conn.execute("DROP INDEX IF EXISTS t_v")
    cpu = postgres_cpu(data_dir)
    started = time.perf_counter()
    conn.execute("CREATE INDEX CONCURRENTLY t_v ON t USING hnsw (v vector_cosine_ops)"
                 " WITH (m = 16, ef_construction = 64)")
    return time.perf_counter() - started, postgres_cpu(data_dir) - cpu


def measure(dsn: str, data_dir: Path, rows: int, dims: int, workers: list[int], rounds: int
            ) -> dict[str, dict[str, float]]:
    seconds: dict[int, list[float]] = {w: [] for w in workers}
    cpu: dict[int, list[float]] = {w: [] for w in workers}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        _fill(conn, rows, dims)
        for number in range(rounds):
            order = workers if number % 2 == 0 else list(reversed(workers))
            for count in order:
                took, used = _build(conn, data_dir, rows, dims, count)
                seconds[count].append(took)
                cpu[count].append(used)
                print(f"  round {number + 1}: {count} workers: {took:.1f} s,"
                      f" Postgres CPU {used:.1f} s", flush=True)
    return {str(w): {"seconds": statistics.median(seconds[w]),
                     "postgres_cpu_s": statistics.median(cpu[w]),
                     "rows_per_s": rows / statistics.median(seconds[w])} for w in workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--workers", default="0,1,7",
                        help="comma-separated max_parallel_maintenance_workers to compare")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workers = [int(part) for part in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="pgreembed-index-workers-") as folder:
        server = EmbeddedPostgres(f"{folder}/pg")
        try:
            result = measure(server.start(), server.data_dir, args.rows, args.dims, workers,
                             args.rounds)
        finally:
            server.stop()
    base = result[str(workers[0])]["seconds"]
    for count in workers:
        figures = result[str(count)]
        print(f"{count} workers: {figures['seconds']:.1f} s ({figures['rows_per_s']:.0f} rows/s,"
              f" {base / figures['seconds']:.2f}x of {workers[0]}),"
              f" Postgres CPU {figures['postgres_cpu_s']:.1f} s")
    print("result: " + json.dumps({"rows": args.rows, "dims": args.dims, "rounds": args.rounds,
                                   "by_workers": result}))


if __name__ == "__main__":
    main()
