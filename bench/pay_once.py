"""Pay once per text: provider inputs and wall time, same data, one run.

    python -m bench.pay_once [--rows 100000] [--rounds 2]

backfill  a table where 30% of the rows repeat another row's text, embedded from scratch
          with `dedupe = true` vs `dedupe = false` (rounds interleaved, each on a fresh
          copy of the same rows)
migrate   the live column (fake-384) filled first, then a new column: a full re-embed
          through the provider (`migrate start --dimensions 128`) vs derived migrations
          (`--derive dimensions:128`, and `--derive halfvec`: halfvec(384), the same
          model), rounds interleaved
Wall time is from the command to every row of the column written. Inputs are what the
local OpenAI-compatible server received. The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import psycopg

from bench.harness import Services, Tuning, pipeline

MODEL, DIMS, SHORT = "fake-384", 384, 128
TUNING = Tuning(batch_size=256, processes=1, threads=4, max_inflight_rows=4096)


def add_duplicates(dsn: str, rows: int, share: float = 0.3) -> int:
    """The last `share` of the rows take the text of one of the others; distinct texts."""
    keep = rows - int(rows * share)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE docs d SET body = s.body FROM docs s"
                     " WHERE d.id > %s AND s.id = 1 + (d.id * 7919) %% %s", (keep, keep))
        conn.execute("VACUUM ANALYZE docs")
        distinct = conn.execute("SELECT count(DISTINCT body) FROM docs").fetchone()
    assert distinct is not None
    return int(distinct[0])


def wait_filled(dsn: str, column: str, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    query = f"SELECT count(*) FROM docs WHERE {column} IS NULL"  # column: ours, fixed
    while True:
        with psycopg.connect(dsn) as conn:
            left = conn.execute(query).fetchone()
        if left == (0,):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{column}: {left} rows still empty after {timeout} s")
        time.sleep(0.2)


def new_column(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT vector_column FROM pgreembed.slots WHERE role = 'next'"
                           ).fetchone()
    assert row is not None
    return str(row[0])


def backfill(services: Services, rows: int, dedupe: bool) -> dict[str, Any]:
    dsn = services.fresh_copy(rows, "dedupe")
    distinct = add_duplicates(dsn, rows)
    extra: dict[str, Any] = {"dedupe": "true" if dedupe else "false"}
    try:
        with pipeline(services, dsn, TUNING, extra) as run:
            run.start_worker()
            services.fake.reset()
            started = time.perf_counter()
            run.start_scheduler()
            wait_filled(dsn, "embedding")
            seconds = time.perf_counter() - started
    finally:
        services.drop(dsn)
    return {"dedupe": dedupe, "seconds": seconds, "distinct_texts": distinct,
            "inputs": services.fake.stats()["inputs_embedded"]}


ARMS = ("derived", "halfvec", "reembed")  # how the new column is made


def migration(services: Services, rows: int, arm: str) -> dict[str, Any]:
    dsn = services.fresh_copy(rows, "derive")
    try:
        with pipeline(services, dsn, TUNING) as run:
            run.start_worker()
            run.start_scheduler()
            wait_filled(dsn, "embedding")
            services.fake.reset()
            started = time.perf_counter()
            if arm == "derived":
                run.cli("migrate", "start", "--target", "docs", "--derive", f"dimensions:{SHORT}")
            elif arm == "halfvec":
                run.cli("migrate", "start", "--target", "docs", "--derive", "halfvec")
            else:
                run.cli("migrate", "start", "--target", "docs", "--model", MODEL,
                        "--dimensions", str(SHORT))
            wait_filled(dsn, new_column(dsn))
            seconds = time.perf_counter() - started
    finally:
        services.drop(dsn)
    return {"arm": arm, "seconds": seconds,
            "inputs": services.fake.stats()["inputs_embedded"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["backfill", "migrate"],
                        help="run one section's arms only")
    args = parser.parse_args()
    services = Services(MODEL, DIMS).start()
    results: dict[str, list[dict[str, Any]]] = {"backfill": [], "migrate": []}
    try:
        services.template(args.rows)
        for _ in range(args.rounds):  # interleaved: both arms see the same machine load
            for dedupe in (True, False) if args.only != "migrate" else ():
                results["backfill"].append(backfill(services, args.rows, dedupe))
            for arm in ARMS if args.only != "backfill" else ():
                results["migrate"].append(migration(services, args.rows, arm))
    finally:
        services.stop()
    print(f"{args.rows:,} rows, {TUNING.describe()}; median of {args.rounds} interleaved"
          " rounds")
    print(f"{'':38} {'provider inputs':>16} {'seconds':>9}")
    labels = [("backfill, 30% duplicates: dedupe on", "backfill", "dedupe", True),
              ("backfill, 30% duplicates: dedupe off", "backfill", "dedupe", False),
              ("new 128-dim column: derived (SQL)", "migrate", "arm", "derived"),
              ("new 128-dim column: full re-embed", "migrate", "arm", "reembed"),
              ("halfvec(384) column: derived (SQL)", "migrate", "arm", "halfvec")]
    for label, section, key, value in labels:
        mine = [r for r in results[section] if r[key] == value]
        if not mine:
            continue
        inputs = statistics.median(r["inputs"] for r in mine)
        seconds = statistics.median(r["seconds"] for r in mine)
        print(f"{label:38} {inputs:>16,.0f} {seconds:>9.2f}")
    print(json.dumps({"rows": args.rows, "tuning": TUNING.describe(), **results}))


if __name__ == "__main__":
    main()
