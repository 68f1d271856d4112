"""Issue 25, test 4's stall bar: what the app's statements wait on under 150 parent edits/s
of a chunked target, with and without this branch's two fixes, rounds interleaved.

Variants (the same database, workers, app load and app transactions; only these differ):
- notify: "every" (each mark NOTIFYs: main's trigger) or "lone" (only a new mark with no
  older one waiting: this branch's);
- stage: "scheduler" (the scheduler splits and applies in its pass, 100 parents a
  transaction: main's) or "workers" (the scheduler sends batches of 10 to the workers).
Each round restarts the scheduler in its variant's mode and swaps the trigger functions'
bodies; the app (tests/chunk_load.py: ordinary role, REPEATABLE READ default, pgai's and
the app's views, HNSW index, app transactions holding parents and chunks, lock_timeout
100 ms) runs the same load. Prints, per variant, the medians over rounds of the edits'
p50/p99/max, statements over 100 ms, lock timeouts, NOTIFYs a second, the scheduler's
CPU seconds, and the blockers sampled (what dominates).

    PYTHONPATH=$PWD .venv/bin/python -m bench.chunk_edits --rate 150 --parents 400 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import signal
import statistics
import sys
import threading
import time
from typing import Any

import psutil
import psycopg

from bench.chunk_migration import chunked_database, on_services
from bench.harness import Services

chunk_load: Any = importlib.import_module("tests.chunk_load")
helpers: Any = importlib.import_module("tests.helpers")
app_side: Any = importlib.import_module("tests.app_side")
chunked_targets: Any = importlib.import_module("tests.test_chunked_targets")

VARIANTS = {"before": ("every", "scheduler"), "lone notify": ("lone", "scheduler"),
            "stage in workers": ("every", "workers"), "after": ("lone", "workers")}
TRIGGER_FUNCTIONS = ("pgreembed.chunk_new_docs", "pgreembed.chunk_edit_docs")
LONE = re.compile(r"IF FOUND AND NOT EXISTS \(SELECT FROM .*? < now\(\)\) THEN"
                  r" (PERFORM pg_notify\(.*?\);) END IF;")


def scheduler_main(stage_mode: str) -> None:
    """The scheduler process of a round: main's placement (the stage in the pass, 100
    parents a transaction) or this branch's (batches to the workers)."""
    from pgreembed.chunking import stage
    from pgreembed.config import load_settings
    from pgreembed.observability.logs import setup_logging
    from scheduler.dispatch import dramatiq_sender
    from scheduler.service import SchedulerService

    setup_logging()
    settings = load_settings()
    if stage_mode == "scheduler":
        stage.PARENTS_PER_READ = stage.PARENTS_PER_TRANSACTION = 100
        SchedulerService(settings, send=dramatiq_sender(settings)).run()
    else:
        SchedulerService(settings).run()


def trigger_bodies(admin_dsn: str) -> dict[str, list[str]]:
    """The parent's trigger functions as installed ("lone") and with a NOTIFY per mark."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        lone = [str(row[0]) for f in TRIGGER_FUNCTIONS if (row := conn.execute(
            "SELECT pg_get_functiondef(%s::regproc)", (f,)).fetchone())]
    every = [LONE.sub(r"\1", d) for d in lone]
    assert all(a != b for a, b in zip(lone, every, strict=True)), "no lone NOTIFY found"
    return {"lone": lone, "every": every}


class NotifyCounter(threading.Thread):
    """Counts the NOTIFYs the scheduler receives (one LISTEN session)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.count, self.stop = dsn, 0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("LISTEN pgreembed")
            while not self.stop.is_set():
                self.count += sum(1 for _ in conn.notifies(timeout=0.5))


def parents_applied(stack: Any) -> int:
    """Marks deleted so far (each one a parent's chunk set applied), from the statistics."""
    with stack.connect() as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute("SELECT n_tup_del FROM pg_stat_all_tables WHERE relid ="
                           " 'pgreembed.chunk_dirty_docs'::regclass").fetchone()
    return int(row[0]) if row else 0


def one_round(stack: Any, roles: Any, variant: str, bodies: dict[str, list[str]],
              keys: list[int], stable: list[Any], args: argparse.Namespace
              ) -> dict[str, Any]:
    notify, stage_mode = VARIANTS[variant]
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        for definition in bodies[notify]:
            conn.execute(definition)
    scheduler = stack.spawn(f"scheduler-{stage_mode}", [
        sys.executable, "-m", "bench.chunk_edits", "--scheduler", stage_mode])
    counter = NotifyCounter(stack.dsn)
    counter.start()
    try:
        log = stack.logs / f"scheduler-{stage_mode}.log"
        seen = log.read_text().count("now the leader")
        helpers.wait_for(lambda: log.read_text().count("now the leader") > seen, timeout=60,
                         message="the round's scheduler to lead")
        time.sleep(args.warm)
        applied = parents_applied(stack)
        cpu_start = sum(psutil.Process(scheduler.pid).cpu_times()[:2])
        notified = counter.count
        with chunk_load.app_load(stack.dsn, roles, keys, stable, args.rate) as load:
            time.sleep(args.seconds)
        cpu = sum(psutil.Process(scheduler.pid).cpu_times()[:2]) - cpu_start
        notifies = (counter.count - notified) / load.edit_seconds
    finally:
        counter.stop.set()
        with contextlib.suppress(ProcessLookupError):
            scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(30)
    applied = parents_applied(stack) - applied
    with stack.connect() as conn:
        backlog = conn.execute("SELECT count(*) FROM pgreembed.chunk_dirty_docs").fetchone()[0]
    figures = load.figures()
    edit = figures["edit"]
    return {"variant": variant, "edits_per_second": figures["edits_per_second"],
            "edit_p50_ms": edit["p50_ms"], "edit_p99_ms": edit["p99_ms"],
            "edit_max_ms": edit["max_ms"],
            "over_100_ms": sum(figures[k]["over_100_ms"] for k in figures
                               if isinstance(figures[k], dict) and "over_100_ms" in figures[k]),
            "search_p99_ms": max(figures[k]["p99_ms"] for k in
                                 ("search_app_view", "search_pgai_view") if k in figures),
            "lock_timeouts": figures["lock_timeouts"], "notifies_per_s": round(notifies, 1),
            "scheduler_cpu_s": round(cpu, 2), "dirty_at_end": backlog,
            "parents_applied_per_s": round(applied / load.edit_seconds, 1),
            "blocked_by": figures["blocked_by"]}


def run(services: Services, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with chunked_database(services, args.batch_size) as (stack, roles, target):
        app_side.repeatable_read_by_default(stack)
        with stack.connect() as conn:
            conn.execute("INSERT INTO docs (id, title, body) SELECT g, 't' || g, b FROM"
                         " unnest(%s::text[]) WITH ORDINALITY AS u(b, g)",
                         ([chunk_load.body(k, 0) for k in range(1, args.parents + 1)],))
        services.fake.set_faults(latency=args.provider_latency)
        stack.start_worker(threads=4)
        first = stack.spawn("scheduler-first", [sys.executable, "-m", "pgreembed", "scheduler"])

        def settled() -> bool:
            with stack.connect() as conn:
                return chunk_load.pending(conn, ["embedding"]) == 0
        helpers.wait_for(settled, timeout=300, interval=0.5, message="first chunk sets")
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        chunk_load.create_chunk_app_objects(stack, roles)
        bodies = trigger_bodies(stack.dsn)
        held = range(1, args.parents // 4 + 1)
        keys = list(range(args.parents // 4 + 1, args.parents + 1))
        with stack.connect() as conn:
            stable = [r[0] for r in conn.execute("SELECT embedding_uuid FROM docs_chunks"
                                                 " WHERE id <= %s", (held[-1],))]
        with app_side.app_transactions(roles.app_dsn, held), \
                chunk_load.chunk_holder(roles.app_dsn, keys):
            for number in range(args.rounds):
                order = list(VARIANTS) if number % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    result = one_round(stack, roles, variant, bodies, keys, stable, args)
                    result["round"] = number
                    print("round: " + json.dumps(result), flush=True)
                    results.append(result)
    return results


def summary(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [r for r in results if r["variant"] == variant]
        out[variant] = {k: statistics.median(r[k] for r in mine) for k in (
            "edits_per_second", "edit_p50_ms", "edit_p99_ms", "edit_max_ms", "over_100_ms",
            "search_p99_ms", "lock_timeouts", "notifies_per_s", "scheduler_cpu_s",
            "dirty_at_end", "parents_applied_per_s")}
        blockers: dict[str, int] = {}
        for r in mine:
            for label, n in r["blocked_by"].items():
                blockers[label] = blockers.get(label, 0) + n
        out[variant]["blocked_by"] = dict(sorted(blockers.items(), key=lambda kv: -kv[1])[:5])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=150.0, help="parent edits a second")
    parser.add_argument("--parents", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured, a round")
    parser.add_argument("--warm", type=float, default=3.0, help="before each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider-latency", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scheduler", choices=("scheduler", "workers"),
                        help=argparse.SUPPRESS)  # a round's scheduler process
    args = parser.parse_args()
    if args.scheduler:
        scheduler_main(args.scheduler)
        return
    load_before = psutil.getloadavg()
    results = on_services(run, args)
    figures = summary(results)
    for variant, f in figures.items():
        print(f"{variant:17} edits/s {f['edits_per_second']}, edit p50 {f['edit_p50_ms']} /"
              f" p99 {f['edit_p99_ms']} / max {f['edit_max_ms']} ms, {f['over_100_ms']} over"
              f" 100 ms, {f['lock_timeouts']} lock timeouts, search p99"
              f" {f['search_p99_ms']} ms, {f['notifies_per_s']} NOTIFY/s, scheduler CPU"
              f" {f['scheduler_cpu_s']} s, dirty at end {f['dirty_at_end']}, parents"
              f" applied/s {f['parents_applied_per_s']}")
    print(f"load average before {load_before}, after {psutil.getloadavg()}")
    print("result: " + json.dumps({**vars(args), "variants": figures, "rounds": results}))


if __name__ == "__main__":
    main()
