"""`migrate compact`: after finalize, the freed TOAST space given back to the OS (opt-in,
PostgreSQL 17+; pgreembed.migrations.compact)."""

from __future__ import annotations

import argparse
import time

from pgreembed.cli.formatting import human_bytes as _human_bytes
from pgreembed.cli.migrate_steps import lock_policy, target_of
from pgreembed.cli.output import emit
from pgreembed.cli.progress import Progress
from pgreembed.errors import EXIT_OK
from pgreembed.migrations import compact, disk


def cmd_compact(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    started = time.monotonic()
    with Progress("compact", "heap pages", as_json=args.json) as bar:
        done = compact.compact_target(settings, target, lock_policy(args),
                                      progress=lambda d, t: bar.update(d, t, "read"))
    seconds = time.monotonic() - started
    if args.json:
        emit("migrate-compact", {
            "step": "compact", "moved": done.moved, "held": done.held,
            "stopped_full": done.stopped_full,
            "toast_bytes_before": done.toast_pages_before * disk.PAGE,
            "toast_bytes_after": done.toast_pages_after * disk.PAGE,
            "table_bytes_before": done.table_bytes_before,
            "table_bytes_after": done.table_bytes_after, "seconds": round(seconds, 3)})
        return EXIT_OK
    print(f"compact: {done.moved} vectors moved out of the TOAST file's tail in {seconds:.0f} s;"
          f" the table is {_human_bytes(done.table_bytes_after)} on disk (was"
          f" {_human_bytes(done.table_bytes_before)})")
    if done.held:
        print(f"{done.held} rows stayed locked by the app; their vectors stay in the tail"
              " (run compact again later)")
    if done.stopped_full:
        print("stopped: no free room left before the tail (the table's free space was"
              " smaller than its tail)")
    return EXIT_OK
