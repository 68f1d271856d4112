"""Where filling a side column beats writing into the indexed live column (small and quick).

    python -m bench.side_fill_crossover [--rows 4000] [--backlog 2000] [--dims 1536]

One table of `--rows` rows whose live column carries an HNSW index (cosine, m 16,
ef_construction 64); `--backlog` of them have no vector yet. Measured on copies of it:
- direct: the backlog written into the indexed column (512-row binary COPY + UPDATE ... FROM
  transactions, what the workers do);
- side: a new column, the vectors already there copied into it (what a same-model side
  fill does instead of buying them again), the backlog written into it, then
  CREATE INDEX CONCURRENTLY over every row.
From the rates it prints the crossover: the backlog, as a share of the table, above which
the side path is faster (time_side = (T-N)/copy + N/fill + T/build + fixed, time_direct =
N/direct). One JSON line (`result: {...}`) carries every figure. Embedding is not part of
it: this is the database's share, the part the index makes slow.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from pgreembed.testing.services import EmbeddedPostgres

BATCH = 512


def _vectors(count: int, dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((count, dims)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def _execute(conn: psycopg.Connection, query: str) -> object:
    return conn.execute(query)


def _write(conn: psycopg.Connection, column: str, keys: list[int], vectors: Any,
           dims: int, update: Callable[[psycopg.Connection, str], object] = _execute
           ) -> float:
    """What the workers' write does, 512 rows per transaction; seconds taken. `update`
    runs the UPDATE (a bench that counts its updates passes its own)."""
    started = time.perf_counter()
    for start in range(0, len(keys), BATCH):
        with conn.transaction():
            conn.execute(f"CREATE TEMP TABLE w (id bigint, v vector({dims})) ON COMMIT DROP")
            with conn.cursor().copy("COPY w (id, v) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["bigint", "vector"])
                for key, vector in zip(keys[start:start + BATCH],
                                       vectors[start:start + BATCH], strict=True):
                    copy.write_row((key, vector))
            update(conn, f"UPDATE t SET {column} = w.v FROM w WHERE t.id = w.id")
    return time.perf_counter() - started


def _table(conn: psycopg.Connection, rows: int, backlog: int, dims: int) -> list[int]:
    conn.execute(f"CREATE TABLE t (id bigint PRIMARY KEY, body text, v vector({dims}))")
    conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, %s) g", (rows,))
    done = list(range(1, rows - backlog + 1))
    _write(conn, "v", done, _vectors(len(done), dims, 1), dims)
    conn.execute("CREATE INDEX t_v ON t USING hnsw (v vector_cosine_ops)"
                 " WITH (m = 16, ef_construction = 64)")
    conn.execute("VACUUM ANALYZE t")
    return list(range(rows - backlog + 1, rows + 1))


def measure(dsn: str, rows: int, backlog: int, dims: int) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute("SET maintenance_work_mem = '256MB'")
        pending = _table(conn, rows, backlog, dims)
        fresh = _vectors(backlog, dims, 2)
        conn.execute("CREATE TABLE t_copy AS SELECT * FROM t")  # the side run's own copy
        direct = _write(conn, "v", pending, fresh, dims)
        conn.execute("DROP TABLE t")
        conn.execute("ALTER TABLE t_copy RENAME TO t")
        conn.execute("ALTER TABLE t ADD PRIMARY KEY (id)")
        conn.execute("CREATE INDEX t_v ON t USING hnsw (v vector_cosine_ops)")
        conn.execute("VACUUM ANALYZE t")
        started = time.perf_counter()
        conn.execute(f"ALTER TABLE t ADD COLUMN side vector({dims})")
        conn.execute("CREATE INDEX CONCURRENTLY t_pending ON t (id) WHERE side IS NULL")
        fixed = time.perf_counter() - started
        started = time.perf_counter()
        conn.execute("UPDATE t SET side = v WHERE v IS NOT NULL")
        copy = time.perf_counter() - started
        fill = _write(conn, "side", pending, fresh, dims)
        started = time.perf_counter()
        conn.execute("CREATE INDEX CONCURRENTLY t_side ON t USING hnsw (side vector_cosine_ops)"
                     " WITH (m = 16, ef_construction = 64)")
        build = time.perf_counter() - started
    existing = rows - backlog
    rates = {"direct": backlog / direct, "fill": backlog / fill,
             "copy": existing / copy if existing else float("inf"), "build": rows / build}
    per_row_direct = 1 / rates["direct"]
    per_row_side = 1 / rates["fill"] - 1 / rates["copy"]  # a backlog row is filled, not copied
    per_table_row = 1 / rates["build"] + 1 / rates["copy"]
    share = per_table_row / (per_row_direct - per_row_side)
    return {"rows": rows, "backlog": backlog, "dims": dims, "direct_s": direct,
            "side_s": fixed + copy + fill + build, "fixed_s": fixed, "copy_s": copy,
            "fill_s": fill, "build_s": build, **{f"{k}_rows_per_s": v for k, v in rates.items()},
            "crossover_share": share,
            "crossover_min_rows": fixed / (per_row_direct - per_row_side)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=1536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgreembed-crossover-") as folder:
        server = EmbeddedPostgres(f"{folder}/pg")
        try:
            result = measure(server.start(), args.rows, args.backlog, args.dims)
        finally:
            server.stop()
    print(f"table {result['rows']} rows x {result['dims']} dims, backlog {result['backlog']}:")
    print(f"  direct into the HNSW-indexed column: {result['direct_s']:.2f} s"
          f" ({result['direct_rows_per_s']:,.0f} rows/s)")
    print(f"  side column: {result['side_s']:.2f} s = set-up {result['fixed_s']:.2f}"
          f" + copy {result['copy_s']:.2f} ({result['copy_rows_per_s']:,.0f} rows/s)"
          f" + fill {result['fill_s']:.2f} ({result['fill_rows_per_s']:,.0f} rows/s)"
          f" + CREATE INDEX CONCURRENTLY {result['build_s']:.2f}"
          f" ({result['build_rows_per_s']:,.0f} rows/s)")
    print(f"  side is faster above a backlog of {result['crossover_share']:.0%} of the table"
          f" (and at least {result['crossover_min_rows']:.0f} rows)")
    print("result: " + json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
