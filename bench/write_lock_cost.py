"""What locking a batch's rows first (key order, SKIP LOCKED) costs the write.

The workers' write (store.rows.write_vectors: `UPDATE ... FROM unnest(...)` over binary
arrays) locks the batch's rows with `SELECT ... ORDER BY pk FOR NO KEY UPDATE SKIP LOCKED`
before it, so it never waits on the app's row locks. This times the same write with and without that
step, on the unindexed column (where the write is fastest, so the extra statement shows
most) or, with --hnsw, on an HNSW-indexed one (the table users have), in rounds that
alternate between the two, one database, one connection:

    python -m bench.write_lock_cost [--rows 20000] [--batch 512] [--dims 1536] [--rounds 6]
                                    [--hnsw]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import psycopg

from pgreembed.config import parse_settings
from pgreembed.store import rows as store_rows
from pgreembed.store.pool import connect
from pgreembed.store.rows import load_pending, lock_slot, write_vectors
from pgreembed.store.setup import init_target
from pgreembed.testing.fake_vectors import fake_vectors
from pgreembed.testing.services import EmbeddedPostgres
from pgreembed.values import Embedded, Row

MODEL = "fake-384"


@contextmanager
def without_row_locks() -> Iterator[None]:
    """The write as it was before: every row taken as locked, no statement run for it."""
    def all_free(conn: psycopg.Connection, slot: object, keys: list[str]
                 ) -> tuple[set[str], set[str]]:
        return set(keys), set()
    with mock.patch.object(store_rows, "lock_free_rows", all_free):
        yield


def write_all(dsn: str, target: object, slot_id: int, batches: list[list[Embedded]]) -> float:
    """Seconds to write every batch, one transaction each (as a worker's _commit)."""
    started = time.perf_counter()
    with connect(dsn) as conn:
        for batch in batches:
            slot = lock_slot(conn, target, slot_id, "ROW EXCLUSIVE")  # type: ignore[arg-type]
            assert slot is not None
            written = write_vectors(conn, slot, batch)
            assert len(written.keys) == len(batch)
            conn.commit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--hnsw", action="store_true", help="index the column (cosine)")
    args = parser.parse_args()
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgreembed-bench-")) / "pgdata")
    dsn = server.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
            conn.execute("INSERT INTO docs (body) SELECT 'text ' || g"
                         " FROM generate_series(1, %s) g", (args.rows,))
        target = parse_settings({"target": [{
            "name": "docs", "table": "public.docs", "text_column": "body",
            "vector_column": "embedding", "provider": "openai", "model": MODEL,
            "dimensions": args.dims}]}, {"DATABASE_URL": dsn}).target("docs")
        slot = init_target(dsn, target)
        if args.hnsw:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops)")
        with connect(dsn) as conn:
            keys = [str(k) for (k,) in conn.execute("SELECT id FROM docs ORDER BY id")]
            pending: list[Row] = load_pending(conn, slot, keys)
        vectors = fake_vectors(MODEL, [row.text or "" for row in pending], args.dims)
        items = [Embedded(row, vector) for row, vector in zip(pending, vectors, strict=True)]
        batches = [items[i:i + args.batch] for i in range(0, len(items), args.batch)]
        rates: dict[str, list[float]] = {"without the lock step": [], "with it": []}
        for round_no in range(args.rounds):
            label = "without the lock step" if round_no % 2 == 0 else "with it"
            if label == "with it":
                seconds = write_all(dsn, target, slot.id, batches)
            else:
                with without_row_locks():
                    seconds = write_all(dsn, target, slot.id, batches)
            rates[label].append(len(items) / seconds)
            with psycopg.connect(dsn, autocommit=True) as conn:  # the next round starts empty
                conn.execute("UPDATE docs SET embedding = NULL")
                conn.execute(f"TRUNCATE pgreembed.slot_{slot.id}")
                conn.execute("VACUUM docs")
        before = statistics.median(rates["without the lock step"])
        after = statistics.median(rates["with it"])
        column = "HNSW-indexed" if args.hnsw else "unindexed"
        print(f"{args.rows} rows x {args.dims} dims, {args.batch}-row transactions, {column}"
              f" column, {args.rounds} alternating rounds (median rows/s):")
        for label, values in rates.items():
            print(f"  {label:>22}: {statistics.median(values):8.0f}"
                  f"  ({', '.join(f'{v:.0f}' for v in values)})")
        print(f"  with/without: {after / before:.3f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
