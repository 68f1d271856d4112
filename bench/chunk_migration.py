"""Issue 25, test 4 at the issue's rate: a model migration of a chunk table (start, fill,
index, swap, rollback) under 150 parent edits/s, as users' databases are (the scenario of
tests/chunk_load.py: ordinary roles, REPEATABLE READ default, the app's view and SQL
function on the chunk vector column, app transactions holding parents and chunks, a
slowed provider). Prints the app statements' latencies and lock waits, the swap's and
the rollback's wall time, and the wrong-model chunk counts (each must be 0).

    PYTHONPATH=$PWD .venv/bin/python -m bench.chunk_migration --rate 150 --parents 400
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from bench.harness import API_KEY, ROOT, Services

# The scenario is the test's (tests/chunk_load.py), run at the rate; imported by
# name so that mypy, which checks bench/, does not take on the test modules' typing.
chunk_load: Any = importlib.import_module("tests.chunk_load")
helpers: Any = importlib.import_module("tests.helpers")
chunked_targets: Any = importlib.import_module("tests.test_chunked_targets")

T = TypeVar("T")
VIEW = '[target.destination]\nview = "docs_view"\n'


@contextlib.contextmanager
def chunked_database(services: Services, batch_size: int
                     ) -> Iterator[tuple[Any, Any, Any]]:
    """A fresh database with the docs parent, the chunked config (pgai's view), the
    ordinary roles and `init` run: (stack, roles, target); processes stopped at the end."""
    name = f"bench_chunkmig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = services.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, title text, body text,"
                     " views integer NOT NULL DEFAULT 0)")
    folder = Path(tempfile.mkdtemp(prefix="chunkmig-", dir=services.workdir))
    config = helpers.write_config(folder / "pgreembed.toml", chunked_targets.CHUNKED.format(
        batch_size=batch_size, destination=VIEW))
    roles = helpers.create_ordinary_roles(dsn)
    env = {**os.environ, "DATABASE_URL": roles.pgreembed_dsn,
           "REDIS_URL": services.redis.url, "PGREEMBED_CONFIG": str(config),
           "OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": services.fake.base_url,
           "PGREEMBED_HEARTBEAT_MS": "5000", "PYTHONPATH": str(ROOT)}
    (folder / "logs").mkdir()
    stack = helpers.Stack(dsn, services.redis.url, config, env, folder / "logs", [])
    from pgreembed.config import load_settings

    target = load_settings(config, env).target("docs")
    try:
        out = stack.cli("init")
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        yield stack, roles, target
    finally:
        for process in stack.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in stack.processes:
            process.wait(30)
        helpers.drop_ordinary_roles(dsn, roles)
        services.drop(dsn)


WAL_SEGMENT_MB = 16


def warm_wal(services: Services, megabytes: int) -> int:
    """Make the fresh server's WAL as a server's that has been running: `megabytes` of
    segments created, then recycled by checkpoints into the next segments' names (kept
    up to min_wal_size). A fresh initdb has none, so each new 16 MB segment is created
    (zero-filled) by the session whose write crosses into it, a committing app edit
    included (measured: the slow edits' wait events were WalInitWrite and WALWrite
    behind it). Returns the segments ready ahead of the insert position."""
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET min_wal_size = {}").format(
            sql.Literal(f"{megabytes}MB")))
        conn.execute(sql.SQL("ALTER SYSTEM SET max_wal_size = {}").format(
            sql.Literal(f"{max(1024, 2 * megabytes)}MB")))
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE TEMP TABLE pgr_warm (x int)")
        for _ in range(megabytes // WAL_SEGMENT_MB + 1):
            conn.execute("INSERT INTO pgr_warm VALUES (1)")
            conn.execute("SELECT pg_switch_wal()")
        for _ in range(2):
            conn.execute("CHECKPOINT")
            conn.execute("INSERT INTO pgr_warm VALUES (1)")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        row = conn.execute(
            "SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'"
            " AND name > pg_walfile_name(pg_current_wal_lsn())").fetchone()
    return int(row[0]) if row else 0


def on_services(run: Callable[[Services, argparse.Namespace], T], args: argparse.Namespace
                ) -> T:
    """`run` on freshly started services (the fake provider's 384-dim model), stopped after."""
    services = Services("fake-384", 384).start()
    try:
        with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
            # Who writes the WAL (pg_stat_statements' wal_bytes by role) and how long the
            # server spent creating and syncing WAL segments (pg_stat_io).
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            conn.execute("ALTER SYSTEM SET track_wal_io_timing = on")
        services.postgres.restart()
        args.wal_segments_ready = warm_wal(services, args.warm_wal_mb) \
            if args.warm_wal_mb else 0
        return run(services, args)
    finally:
        services.stop()


WAL_IO = ("SELECT context, sum(writes)::bigint, round(sum(write_time)::numeric, 1)::float8,"
          " sum(fsyncs)::bigint, round(sum(fsync_time)::numeric, 1)::float8 FROM pg_stat_io"
          " WHERE object = 'wal' GROUP BY context")


def wal_io(conn: psycopg.Connection) -> dict[str, dict[str, float]]:
    return {r[0]: {"writes": r[1] or 0, "write_ms": r[2] or 0, "fsyncs": r[3] or 0,
                   "fsync_ms": r[4] or 0} for r in conn.execute(WAL_IO)}


def wal_figures(conn: psycopg.Connection, roles: Any, before: dict[str, Any]
                ) -> dict[str, Any]:
    """The WAL written during the run: MB by role (statements), and the server's WAL
    segment creation ('init') and WAL writes ('normal'): count and ms, from pg_stat_io."""
    io = {c: {k: round(v - before["io"].get(c, {}).get(k, 0), 1) for k, v in d.items()}
          for c, d in wal_io(conn).items()}
    names = {roles.pgreembed: "pgreembed", roles.app: "app"}
    by_role = {names.get(r[0], "admin/bench"): round(float(r[1]) / 1e6, 1)
               for r in conn.execute(
                   "SELECT r.rolname, sum(s.wal_bytes) FROM pg_stat_statements s JOIN pg_roles"
                   " r ON r.oid = s.userid GROUP BY r.rolname")}
    row = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (before["lsn"],)
                       ).fetchone()
    top = [(round(float(r[0]) / 1e6, 1), r[1]) for r in conn.execute(
        "SELECT s.wal_bytes, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 70)"
        " FROM pg_stat_statements s WHERE s.userid = to_regrole(%s)"
        " ORDER BY s.wal_bytes DESC LIMIT 6", (roles.pgreembed,))]
    return {"total_mb": round(float(row[0]) / 1e6, 1) if row else None,
            "statements_mb_by_role": by_role, "pgreembed_top_mb": top, "io": io}


def run(services: Services, args: argparse.Namespace) -> dict[str, Any]:
    with chunked_database(services, args.batch_size) as (stack, roles, target):
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            before = {"lsn": row[0] if row else "0/0", "io": wal_io(conn)}
        figures: dict[str, Any] = chunk_load.run_migration_under_load(
            stack, roles, services.fake, parents=args.parents, rate=args.rate,
            seconds=args.seconds, provider_latency=args.provider_latency,
            expected=lambda conn: chunked_targets.expected(conn, target),
            chunk_sets=chunked_targets.chunk_sets, worker_nice=args.worker_nice)
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            figures["wal"] = wal_figures(conn, roles, before)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=150.0, help="parent edits a second")
    parser.add_argument("--parents", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=24.0,
                        help="load time around the steps (a quarter before start, between"
                             " index and swap, after swap, after rollback)")
    parser.add_argument("--provider-latency", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--worker-nice", type=int, default=0,
                        help="run the worker process under nice -n N (0: as deployed)")
    parser.add_argument("--warm-wal-mb", type=int, default=0,
                        help="create and recycle this much WAL before the run (a server that"
                             " has been running; 0: a fresh initdb's WAL)")
    args = parser.parse_args()
    figures = on_services(run, args)
    app = figures["app"]
    print(f"{args.rate:g} parent edits/s asked, {app['edits_per_second']} done;"
          f" {figures['parents']} parents, {figures['chunks']} chunks; provider"
          f" +{args.provider_latency} s a request")
    for kind in ("edit", "search_app_view", "search_pgai_view"):
        k = app[kind]
        print(f"{kind}: {k['count']} statements, p50 {k['p50_ms']} ms, p99 {k['p99_ms']} ms,"
              f" max {k['max_ms']} ms, {k['over_100_ms']} over 100 ms")
    print(f"app lock timeouts (100 ms): {app['lock_timeouts']} {app['lock_timeouts_where']};"
          f" longest lock wait seen behind pgreembed {app['longest_lock_wait_ms']}")
    print(f"swap {figures['swap']['seconds']} s ({figures['swap']['report']}); rollback"
          f" {figures['rollback']['seconds']} s ({figures['rollback']['report']})")
    stalls = figures["stalls"]
    for name in ("causes_over_100_ms", "causes_over_50_ms"):
        print(f"app statements {name.replace('_', ' ')}: {stalls[name]}")
    print(f"app statements' time runnable but not running (CPU), by kind: {stalls['totals']};"
          f" the probe's own CPU {figures['stall_probe_cpu_s']} s")
    print(f"app lock waits by holder (5 ms samples): {stalls['lock_waits']}")
    print(f"phases (UTC): {figures['phases']}")
    for slow in stalls["slow"][:10]:
        print(f"  {slow['kind']} {slow['ms']} ms at {slow['at']}: {slow['cause']}"
              f" {slow['parts']}")
    print(f"WAL: {figures['wal']} ({args.wal_segments_ready} segments ready ahead)")
    print(f"wrong-model chunks: after swap {figures['wrong_after_swap']}, after rollback"
          f" {figures['wrong_after_rollback']}, settled {figures['wrong_settled']}")
    print("result: " + json.dumps({**vars(args), **figures}))


if __name__ == "__main__":
    main()
