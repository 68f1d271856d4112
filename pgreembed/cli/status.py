"""`pgreembed status`: counts per target and column, who keeps each current, the paths,
open migrations, chunk sets and the throttle; once, or every --watch seconds."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from pgreembed.cli.output import emit
from pgreembed.config import Settings, load_settings
from pgreembed.errors import EXIT_OK
from pgreembed.observability.redact import redact
from pgreembed.store.counts import BACKLOG_EXACT_ROWS
from pgreembed.store.pool import connect
from pgreembed.store.slots import require_initialized


def print_status(settings: Settings, as_json: bool, exact: bool = False) -> None:
    import redis

    from pgreembed.embedding.throttle import observe
    from pgreembed.operations.chunk_status import chunking_status
    from pgreembed.operations.status import collect

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    throttle = observe(settings.throttle, client)
    reachable: redis.Redis | None = client
    try:  # status works without Redis: only what lives there (in flight) is unknown
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        print(f"pgreembed: cannot connect to Redis: {redact(str(exc))} (REDIS_URL):"
              " rows in flight unknown", file=sys.stderr)
        reachable = None
    from pgreembed.cli.migration_lines import (
        ROLE_LABELS,
        migration_line,
        paused_line,
        pgai_line,
    )
    from pgreembed.migrations.progress import progress
    from pgreembed.migrations.side_fill import current

    with connect(settings.database_url) as conn:
        require_initialized(conn, settings.targets.values())
        rows = collect(conn, settings, reachable, exact=exact)
        fills = {name: current(conn, settings.target(name)) for name in {r.target for r in rows}}
        chunked = chunking_status(conn, settings)
        conn.rollback()
    # A second column ('next' while filling, 'old' after a swap) means an open migration.
    migrations = {name: progress(settings, settings.target(name))
                  for name in {r.target for r in rows if r.role != "live"}}
    if as_json:
        out: list[dict[str, object]] = [r.as_dict() for r in rows]
        for item in out:
            fill = fills.get(str(item["target"]))
            item["path"] = "side" if fill else "direct"
            item["side_fill"] = None if fill is None else {
                "migration": fill.migration_id, "reason": fill.reason, "step": fill.step,
                "column": fill.column}
            found = migrations.get(str(item["target"]))
            if found and item["role"] != "live":
                item["migration"] = {"id": found.migration.id, "phase": found.migration.phase,
                                     "done": found.done, "total": found.total,
                                     "rate_per_second": round(found.rate_per_second, 1),
                                     "eta_seconds": found.eta_seconds, "paused": found.paused,
                                     "estimated": found.estimated}
        emit("status", {"columns": out, "throttle": throttle.as_dict(),
                        "chunking": [c.as_dict() for c in chunked]})
        return
    header = (f"{'target':<16} {'column':<18} {'role':<8} {'model':<36} {'total':>9}"
              f" {'embedded':>9}"
              f" {'pending':>8} {'stale':>6} {'outdated':>8} {'failed':>6} {'in flight':>9}")
    print(header)
    for r in rows:
        flight = "?" if r.in_flight is None else str(r.in_flight)
        about = "~" if r.estimated else ""
        sampled = "~" if r.backlog_estimated else ""
        print(f"{r.target:<16} {r.column:<18} {ROLE_LABELS.get(r.role, r.role):<8}"
              f" {r.model:<36} {about + str(r.total):>9}"
              f" {about + str(r.embedded):>9} {sampled + str(r.pending):>8}"
              f" {sampled + str(r.stale):>6} {r.outdated:>8}"
              f" {r.failed:>6} {flight:>9}")
    for r in rows:
        if r.reused:
            print(f"{r.target}.{r.column}: {r.provider_inputs} rows embedded by the provider,"
                  f" {r.reused} given an identical text's vector (no provider call)")
    seconds = sum(r.seconds for r in rows)
    if any(r.backlog_estimated for r in rows):
        print(f"~ estimated from the table's row count, and pending and stale of a backlog"
              f" over {BACKLOG_EXACT_ROWS:,} rows from a sample of its pages; outdated and"
              f" failed are exact"
              f" (counted in {seconds:.2f} s; --exact counts every row)")
    elif any(r.estimated for r in rows):
        print(f"~ estimated from the table's row count; pending, stale, outdated and failed"
              f" are exact (counted in {seconds:.2f} s; --exact counts every row)")
    elif exact:
        print(f"exact counts of every row took {seconds:.2f} s")
    for r in rows:
        if r.frozen:  # adopted from pgai, as meant: no config to fix
            print(f"FROZEN {r.target}.{r.column} ({r.model}): {r.misconfigured}")
        elif r.misconfigured:
            print(f"MISCONFIGURED {r.target}.{r.column} ({r.model}): {r.misconfigured}."
                  " Nothing is sent for it; fix the config, then run `pgreembed init`")
        elif r.pgai_in_charge:
            print(f"{r.target}.{r.column}: {pgai_line(r.target)}")
        elif r.paused_by and r.role == "live":  # a migration's columns: its own line
            print(f"{r.target}.{r.column}: {paused_line(r.paused_by)}")
    for name, fill in sorted(fills.items()):
        print(f"path of {name}: " + ("direct" if fill is None else
              f"side column {fill.column} ({fill.reason}: {fill.step})"))
    for name, found in migrations.items():
        print(f"migration of {name}: {migration_line(found)}")
    for each in chunked:
        print(each.line())
    print(throttle.line())


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.watch is None:
        print_status(settings, args.json, args.exact)
        return EXIT_OK
    with _ctrl_c_remembered() as interrupted:
        while True:
            print_status(settings, args.json, args.exact)
            sys.stdout.flush()
            _stop_if_set(interrupted)
            time.sleep(args.watch)
            _stop_if_set(interrupted)
            print()


def _stop_if_set(interrupted: threading.Event) -> None:
    if interrupted.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def _ctrl_c_remembered() -> Iterator[threading.Event]:
    """Ctrl-C ends a watch even when it lands in a finalizer (a connection's __del__),
    where Python reports the KeyboardInterrupt as "Exception ignored" and goes on: the
    handler also sets a flag the loop checks, and that report is silenced."""
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    def unraisable(report: Any) -> None:
        if not isinstance(report.exc_value, KeyboardInterrupt):
            sys.__unraisablehook__(report)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook


def watch_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0.1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be at least 0.1 seconds, got {text}")
    return value
