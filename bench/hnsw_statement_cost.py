"""What a small UPDATE statement through an HNSW index costs the server, whoever sends it:
the raw write (binary COPY into a temporary table, `UPDATE ... FROM`) of the same rows in
512-row transactions, in N-row transactions, and in N-row statements inside 512-row
transactions; Postgres CPU of every server process, and the writing backend's minor page
faults, user and system CPU (/proc).

Why: a worker's write slices (`[worker] max_row_lock_ms`) are transactions of a few rows
on an HNSW table, and their extra CPU was not our statements' (bench.write_cpu
--raw-slice-rows: the raw write in transactions of the slices' size costs as much).
Each UPDATE statement's HNSW inserts touch a few MB of fresh memory that the server's
malloc hands back to the OS when the statement ends: --malloc-env starts the server with
glibc's trim and mmap thresholds pinned (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_),
to show it; a setting of the server's environment. What a client can do: raise glibc's
dynamic thresholds from its own session, by one big value allocated and freed
(store.session.keep_freed_memory, on pgreembed's pooled connections since 2026-12-07):
the N-row transactions again with it, at --kept-mb sizes.

    python -m bench.hnsw_statement_cost [--rows 3000] [--dims 1536] [--rows-per 6]
                                        [--rounds 2] [--malloc-env] [--kept-mb 2,8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from bench.harness import Services, postgres_cpu
from pgreembed.config import KEPT_MEMORY_MB
from pgreembed.store.session import keep_freed_memory

MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
TRANSACTION_ROWS = 512


def _write(conn: psycopg.Connection, rows: list[tuple[int, Any]]) -> None:
    """One raw write statement: the rows into the temporary table, then the UPDATE."""
    conn.execute("DELETE FROM incoming")
    with conn.cursor() as cur:
        with cur.copy("COPY incoming (id, vec) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "vector"])
            for row in rows:
                copy.write_row(row)
        cur.execute("UPDATE docs d SET embedding = i.vec FROM incoming i WHERE d.id = i.id")


def _backend(pid: int) -> tuple[int, float, float]:
    """(minor page faults, user s, system s) of one server process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / ticks, int(fields[12]) / ticks


def run_arm(services: Services, dsn: str, vectors: list[tuple[int, Any]], per_statement: int,
            per_transaction: int, kept_mb: int = 0) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE docs SET embedding = NULL")
        conn.execute("VACUUM docs")
        conn.execute("CHECKPOINT")
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("CREATE TEMP TABLE incoming (id bigint, vec vector) ON COMMIT DELETE ROWS")
        if kept_mb:
            keep_freed_memory(conn, kept_mb)
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        faults, user, system = _backend(row[0])
        cpu = postgres_cpu(services.postgres.data_dir)
        for start in range(0, len(vectors), per_transaction):
            block = vectors[start:start + per_transaction]
            with conn.transaction():
                for first in range(0, len(block), per_statement):
                    _write(conn, block[first:first + per_statement])
        cpu = postgres_cpu(services.postgres.data_dir) - cpu
        after = _backend(row[0])
    statements = -(-len(vectors) // per_statement)
    return {"postgres_cpu_s": cpu, "backend_user_s": after[1] - user,
            "backend_system_s": after[2] - system,
            "page_faults_per_statement": (after[0] - faults) / statements}


@contextlib.contextmanager
def started(malloc_env: bool, dims: int) -> Iterator[Services]:
    with mock.patch.dict(os.environ, MALLOC_ENV if malloc_env else {}):
        services = Services(f"fake-{dims}", dims).start()  # the server inherits the env
    try:
        yield services
    finally:
        services.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--rows-per", type=int, default=6, metavar="N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--malloc-env", action="store_true",
                        help="start the server with glibc's trim/mmap thresholds pinned")
    parser.add_argument("--kept-mb", type=lambda v: [int(x) for x in v.split(",")],
                        default=[KEPT_MEMORY_MB], metavar="MB,MB",
                        help="the N-row transactions again, their session keeping its freed"
                        f" memory (store.session.keep_freed_memory; default {KEPT_MEMORY_MB})")
    args = parser.parse_args()
    small = (args.rows_per, args.rows_per)
    arms: dict[str, tuple[int, ...]] = {
        f"{TRANSACTION_ROWS}-row transactions": (TRANSACTION_ROWS, TRANSACTION_ROWS),
        f"{args.rows_per}-row transactions": small,
        f"{args.rows_per}-row statements in {TRANSACTION_ROWS}-row transactions":
            (args.rows_per, TRANSACTION_ROWS),
        **{f"{args.rows_per}-row transactions, freed memory kept ({mb} MB)": (*small, mb)
           for mb in args.kept_mb}}
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with started(args.malloc_env, args.dims) as services:
        dsn = services.dsn("postgres")
        with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET autovacuum = off")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(f"CREATE TABLE docs (id bigint PRIMARY KEY, body text,"
                         f" embedding vector({args.dims}))")
            conn.execute("INSERT INTO docs SELECT g, repeat('x', 400)"
                         " FROM generate_series(1, %s) g", (args.rows,))
            conn.execute("CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops)")
        rng = np.random.default_rng(1)
        vectors = [(key, rng.standard_normal(args.dims).astype(np.float32))
                   for key in range(1, args.rows + 1)]
        names = list(arms)
        for number in range(args.rounds):
            for name in names[number % len(names):] + names[:number % len(names)]:
                result = run_arm(services, dsn, vectors, *arms[name])
                print(json.dumps({"round": number + 1, "arm": name, **result}), flush=True)
                for key, value in result.items():
                    figures[name][key].append(value)
    base = statistics.median(figures[names[0]]["postgres_cpu_s"])
    print(f"{args.rows} rows x {args.dims} dims, HNSW, malloc env"
          f" {'pinned' if args.malloc_env else 'as is'}; medians of {args.rounds} rounds:")
    for name in names:
        median = {key: statistics.median(values) for key, values in figures[name].items()}
        print(f"  {name:>45}: Postgres CPU {median['postgres_cpu_s']:6.2f} s"
              f" ({median['postgres_cpu_s'] / base:.2f}x), backend user"
              f" {median['backend_user_s']:.2f} s, system {median['backend_system_s']:.2f} s,"
              f" {median['page_faults_per_statement']:,.0f} page faults per statement")


if __name__ == "__main__":
    main()
