"""The take-over from pgai 0.12.1 at the issue's counts (issue 26), printing JSON.

1. counts: N parents filled by pgai's own worker, adopted, Q keys left in pgai's queue
   (3/5 one-sentence edits, 2/5 inserts), `import-pgai --take-over`, pgai's worker started
   after it (it finds its vectorizer disabled), pgreembed's worker and scheduler embed the
   queued keys; then A inserts and A one-sentence edits. Printed: keys moved and lost,
   provider inputs against new chunk texts, the most new chunks one edit made, pgai's rows
   written after the take-over, wrong vectors (each chunk's against the model's vector of
   its text).
2. latency: M parents, pgai's worker and ours running, W app sessions aiming at R writes/s
   (inserts and edits, each its own transaction) for S seconds before and after the
   take-over. Printed: writes/s reached, p99 and max before, the writes overlapping the
   cut-over's lock and the longest, the lock held, and what the app's sessions waited on
   meanwhile (pg_stat_activity wait events sampled every ~5 ms, inside and outside the
   lock window).

    PYTHONPATH=$PWD .venv/bin/python -m bench.pgai_takeover --parents 1000 --queued 500 \
        --after 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from bench.harness import API_KEY, Services, Tuning, pipeline
from pgreembed.testing import pgai_side
from tests.pgai_takeover_side import (
    DIMS,
    MODEL,
    VECTORIZER,
    adopt,
    chunk_sets,
    edit,
    expected,
    insert,
    pending,
    pgai_filled,
    pgai_rows_written,
    settings_for,
    wrong_vectors,
)

APP = "bench-app"


def fresh_database(services: Services) -> str:
    name = f"bench_takeover_{random.randrange(1 << 30):x}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = services.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text)")
    return dsn


def take_over(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pgreembed", "import-pgai", "--vectorizer",
                           VECTORIZER, "--take-over", "--no-embed-check", "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"take-over failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    (report,) = json.loads(done.stdout)["vectorizers"]
    return dict(report)


def settle(dsn: str, settings: Any, timeout: float) -> float:
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not (pending(conn) == 0 and chunk_sets(conn) == expected(conn, settings)):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"not settled after {timeout:.0f} s")
            time.sleep(0.5)
    return round(time.monotonic() - started, 1)


@contextlib.contextmanager
def adopted(services: Services, parents: int) -> Iterator[tuple[Any, Any, Any, float]]:
    """A fresh database: `parents` rows filled by pgai's worker, adopted; our pipeline's
    config written, nothing of ours running. Yields (run, settings, vectorizer, fill s)."""
    dsn = fresh_database(services)
    tuning = Tuning()
    try:
        with pipeline(services, dsn, tuning, init=False) as run:
            settings = settings_for(run.config_path, run.env, tuning.batch_size)
            started = time.monotonic()
            vec = pgai_filled(dsn, services.fake.base_url, API_KEY, parents)
            fill_s = round(time.monotonic() - started, 1)
            adopt(run.env)
            yield run, settings, vec, fill_s
    finally:
        services.drop(dsn)


def counts(services: Services, parents: int, queued: int, after: int, timeout: float
           ) -> dict[str, Any]:
    with adopted(services, parents) as (run, settings, vec, fill_s):
        dsn = run.dsn
        edits = queued * 3 // 5
        with psycopg.connect(dsn, autocommit=True) as conn:
            edit(conn, range(1, edits + 1), "1")
            insert(conn, range(parents + 1, parents + queued - edits + 1), "1")
            keys = conn.execute("SELECT count(DISTINCT id) FROM " + vec.queue_table
                                ).fetchone()
        report = take_over(run.env)
        pgai = pgai_side.start_pgai_worker(dsn, API_KEY, run.logdir / "pgai.log")
        run.processes.append(pgai)
        with psycopg.connect(dsn, autocommit=True) as conn:
            by_pgai = pgai_rows_written(conn)
        run.start_worker()
        run.start_scheduler()
        queued_s = settle(dsn, settings, timeout)
        with psycopg.connect(dsn, autocommit=True) as conn:
            texts_before = {c for chunks in chunk_sets(conn).values() for c in chunks}
            sent_before = dict(services.fake.stats()["text_counts"])
            base = parents + queued
            insert(conn, range(base + 1, base + after + 1), "2")
            edit(conn, range(1, after + 1), "2")
        after_s = settle(dsn, settings, timeout)
        time.sleep(3)  # pgai's worker polls every second: give it the chance to write
        with psycopg.connect(dsn, autocommit=True) as conn:
            register_vector(conn)
            sets = chunk_sets(conn)
            sent = {t: n - sent_before.get(t, 0) for t, n in
                    services.fake.stats()["text_counts"].items()
                    if n > sent_before.get(t, 0)}
            new_texts = {c for chunks in sets.values() for c in chunks} - texts_before
            inserted = {c for k in range(base + 1, base + after + 1) for c in sets[k]}
            per_edit = [len(set(sets[k]) - texts_before) for k in range(1, after + 1)]
            result = {
                "parents": parents, "pgai_fill_s": fill_s,
                "queued_keys": keys[0] if keys else None,
                "keys_marked": report["keys_marked"], "keys_gone": report["keys_gone"],
                "locked_ms": report["locked_ms"], "queued_done_s": queued_s,
                "after_inserts": after, "after_edits": after, "after_done_s": after_s,
                "provider_inputs": sum(sent.values()), "texts_sent_twice": sum(
                    1 for n in sent.values() if n > 1),
                "new_chunk_texts": len(new_texts), "inserted_chunks": len(inserted),
                "edit_inputs": len(new_texts - inserted),
                "max_new_chunks_per_edit": max(per_edit),
                "sent_equals_new_texts": set(sent) == new_texts,
                "pgai_rows_written_after": pgai_rows_written(conn) - by_pgai,
                "wrong_vectors": len(wrong_vectors(conn)),
                "pgai_worker_alive": pgai.poll() is None}
        return result


def writer(dsn: str, session: int, rate: float, writers: int, stop: threading.Event,
           timings: list[tuple[float, float]], parents: int) -> None:
    key = 100000 * (session + 1)
    with psycopg.connect(dsn, autocommit=True, application_name=APP) as conn:
        while not stop.is_set():
            began = time.time()
            if key % 2:
                insert(conn, [key], "w")
            else:
                edit(conn, [1 + key % parents], f"w{key}")
            timings.append((began, time.time() - began))
            key += 1
            stop.wait(max(0.0, writers / rate - (time.time() - began)))


def sampler(dsn: str, stop: threading.Event, samples: list[tuple[float, str]]) -> None:
    """What the active sessions of this database wait on, every ~5 ms: the app's
    ("app ...") and the others' (pgreembed's, pgai's: "other ..."), this one left out."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            now = time.time()
            for who, kind, event in conn.execute(
                    "SELECT CASE WHEN application_name = %s THEN 'app' ELSE 'other' END,"
                    " coalesce(wait_event_type, 'CPU'), coalesce(wait_event, 'running')"
                    " FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'active' AND pid <> pg_backend_pid()", (APP,)):
                samples.append((now, f"{who} {kind}:{event}"))
            stop.wait(0.005)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def latency(services: Services, parents: int, rate: float, writers: int, seconds: float
            ) -> dict[str, Any]:
    with adopted(services, parents) as (run, _, _, _):
        dsn = run.dsn
        run.processes.append(pgai_side.start_pgai_worker(dsn, API_KEY,
                                                         run.logdir / "pgai.log"))
        run.start_worker()
        run.start_scheduler()
        timings: list[tuple[float, float]] = []
        samples: list[tuple[float, str]] = []
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(dsn, i, rate, writers, stop,
                                                         timings, parents))
                   for i in range(writers)]
        threads.append(threading.Thread(target=sampler, args=(dsn, stop, samples)))
        for t in threads:
            t.start()
        try:
            time.sleep(seconds)
            cut_from = time.time()
            report = take_over(run.env)
            time.sleep(seconds)
        finally:
            stop.set()
            for t in threads:
                t.join()
    lock_from = report["locked_at"]
    lock_to = lock_from + report["locked_ms"] / 1000
    before = [s for t, s in timings if t < cut_from]
    across = [s for t, s in timings if t <= lock_to and t + s >= lock_from]
    since = [s for t, s in timings if t >= cut_from]  # the whole take-over, and after it
    inside = Counter(e for t, e in samples if lock_from <= t <= lock_to)
    outside = Counter(e for t, e in samples if t < cut_from)
    return {
        "parents": parents, "writers": writers, "aimed_writes_per_s": rate,
        "writes": len(timings),
        "writes_per_s": round(len(timings) / (timings[-1][0] - timings[0][0]), 1),
        "before_p50_ms": round(1000 * statistics.median(before), 1),
        "before_p99_ms": round(1000 * percentile(before, 0.99), 1),
        "before_max_ms": round(1000 * max(before), 1),
        "writes_across_cut_over": len(across),
        "across_max_ms": round(1000 * max(across, default=0.0), 1),
        "since_take_over_p99_ms": round(1000 * percentile(since, 0.99), 1),
        "since_take_over_max_ms": round(1000 * max(since), 1),
        "writes_over_100ms": sum(1 for _, s in timings if s > 0.1),
        "locked_ms": report["locked_ms"], "lock_attempts": report["lock_attempts"],
        "waited_for_pgai_s": report["waited_for_pgai_s"],
        # samples of the app's active sessions (one row per session per ~5 ms sample)
        "app_waits_inside_lock": dict(inside.most_common(6)),
        "app_waits_before": dict(outside.most_common(6)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parents", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=500)
    parser.add_argument("--after", type=int, default=1000)
    parser.add_argument("--latency-parents", type=int, default=300)
    parser.add_argument("--rate", type=float, default=150)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds")
    parser.add_argument("--skip-counts", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    services = Services(MODEL, DIMS).start()
    out: dict[str, Any] = {"load_average": os.getloadavg()}
    try:
        if not args.skip_counts:
            out["counts"] = counts(services, args.parents, args.queued, args.after,
                                   args.timeout)
            print(json.dumps({"counts": out["counts"]}), flush=True)
        rounds = []
        for r in range(args.rounds):
            rounds.append(latency(services, args.latency_parents, args.rate, args.writers,
                                  args.seconds))
            print(json.dumps({"latency_round": r + 1, **rounds[-1]}), flush=True)
        out["latency_rounds"] = rounds
        if rounds:
            out["latency_medians"] = {k: statistics.median(r[k] for r in rounds) for k in (
                "writes_per_s", "before_p99_ms", "before_max_ms", "across_max_ms",
                "since_take_over_max_ms", "writes_over_100ms",
                "locked_ms")}
    finally:
        services.stop()
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
