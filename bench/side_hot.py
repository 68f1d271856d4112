"""Why a side column's writes cost what they cost: HOT updates or not (issue 13).

    python -m bench.side_hot [--rows 3000] [--dims 1536]

One table of `--rows` rows with an HNSW index (cosine, m 16, ef_construction 64) and the
pending index (`WHERE v IS NULL`) on its live column `v`; a side column is added and
every row's side vector written (512-row binary COPY + UPDATE ... FROM transactions,
what the workers do). Cases, each on a fresh table:
- model change: `v` filled (every row has a live vector), with / without the side
  column's pending index (whose predicate names the side column, so no update is HOT),
  and with fillfactor 70 (room on each page for a HOT update);
- backlog: `v` NULL everywhere (nothing to re-insert into the HNSW index);
- direct: the backlog written into `v` itself, through the HNSW index.
Prints one JSON line per case: seconds, rows/s, updates and HOT updates of the table
(pg_stat_user_tables).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from bench.harness import texts
from bench.side_fill_crossover import _vectors, _write
from pgreembed.testing.services import EmbeddedPostgres


def _updates(conn: psycopg.Connection) -> tuple[int, int]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                       " WHERE relname = 't'").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _table(conn: psycopg.Connection, rows: int, dims: int, filled: bool,
           fillfactor: int | None) -> list[int]:
    conn.execute("DROP TABLE IF EXISTS t")
    options = f" WITH (fillfactor = {fillfactor})" if fillfactor else ""
    conn.execute(f"CREATE TABLE t (id bigint PRIMARY KEY, body text, v vector({dims})){options}")
    with conn.cursor().copy("COPY t (id, body) FROM STDIN") as copy:
        for key, text in enumerate(texts(1, rows), 1):
            copy.write_row((key, text))
    keys = list(range(1, rows + 1))
    if filled:
        _write(conn, "v", keys, _vectors(rows, dims, 1), dims)
    conn.execute("CREATE INDEX t_v ON t USING hnsw (v vector_cosine_ops)"
                 " WITH (m = 16, ef_construction = 64)")
    conn.execute("CREATE INDEX t_v_pending ON t (id) WHERE v IS NULL")
    conn.execute("VACUUM ANALYZE t")
    return keys


def case(conn: psycopg.Connection, rows: int, dims: int, label: str, filled: bool,
         side_pending: bool = True, fillfactor: int | None = None, direct: bool = False
         ) -> dict[str, Any]:
    keys = _table(conn, rows, dims, filled, fillfactor)
    column = "v" if direct else "side"
    if not direct:
        conn.execute(f"ALTER TABLE t ADD COLUMN side vector({dims})")
        if side_pending:
            conn.execute("CREATE INDEX t_side_pending ON t (id) WHERE side IS NULL")
    before = _updates(conn)
    seconds = _write(conn, column, keys, _vectors(rows, dims, 2), dims)
    after = _updates(conn)
    return {"case": label, "rows": rows, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "updates": after[0] - before[0],
            "hot_updates": after[1] - before[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--dims", type=int, default=1536)
    args = parser.parse_args()
    rows, dims = args.rows, args.dims
    with tempfile.TemporaryDirectory(prefix="pgreembed-side-hot-") as folder:
        server = EmbeddedPostgres(f"{folder}/pg")
        try:
            with psycopg.connect(server.start(), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                register_vector(conn)
                conn.execute("SET maintenance_work_mem = '512MB'")
                for result in (
                    case(conn, rows, dims, "model change, side pending index", True),
                    case(conn, rows, dims, "model change, no side pending index", True,
                         side_pending=False),
                    case(conn, rows, dims, "model change, no side pending index,"
                         " fillfactor 70", True, side_pending=False, fillfactor=70),
                    case(conn, rows, dims, "backlog, side pending index", False),
                    case(conn, rows, dims, "backlog, no side pending index", False,
                         side_pending=False),
                    case(conn, rows, dims, "direct: backlog into the HNSW column", False,
                         direct=True),
                ):
                    print(json.dumps(result), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
