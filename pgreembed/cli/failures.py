"""`pgreembed failures [--retry]`: the rows that could not be embedded, per column, and a
chunked target's parents recorded failed (pgai's failed queue, handed over at a take-over);
`--retry` makes them pending again (parents: chunked again)."""

from __future__ import annotations

import argparse
from typing import Any

from pgreembed.cli.output import emit
from pgreembed.config import load_settings
from pgreembed.errors import EXIT_OK
from pgreembed.store.pool import connect


def cmd_failures(args: argparse.Namespace) -> int:
    from pgreembed.cli.pgai_takeover import (
        parent_failures_of,
        print_parent_failures,
        retry_parent_failures_of,
    )
    from pgreembed.store.failures import list_failures, retry_failures, select_slots

    settings = load_settings(args.config)
    target = settings.target(args.target)
    with connect(settings.database_url) as conn:
        slots = select_slots(conn, target, args.column)
        if args.retry:
            retried = [(slot, retry_failures(conn, slot)) for slot in slots]
            parents_retried = retry_parent_failures_of(conn, target)
            if args.json:
                retry_doc: dict[str, Any] = {"retried": [
                    {"column": s.vector_column, "model": s.model_key, "role": s.role,
                     "retried": n} for s, n in retried]}
                if parents_retried is not None:
                    retry_doc["parent_retried"] = parents_retried
                emit("failures-retry", retry_doc)
                return EXIT_OK
            if parents_retried is not None:
                print(f"{target.name}: {parents_retried} failed parent rows are chunked"
                      " again")
            for slot, count in retried:
                print(f"{target.name}.{slot.vector_column} ({slot.model_key}, {slot.role}):"
                      f" {count} failed rows are pending again")
            return EXIT_OK
        found = [(slot, *list_failures(conn, slot, args.limit)) for slot in slots]
        parents_total, parents = parent_failures_of(conn, target, args.limit)
        conn.rollback()
    if args.json:
        document: dict[str, Any] = {"failures": [r.as_dict() for _, _, records in found
                                                  for r in records]}
        if target.parent is not None:  # a chunked target: its parents' failures too
            document["parent_failures"] = [p.as_dict() for p in parents]
        emit("failures", document)
        return EXIT_OK
    print_parent_failures(target, parents_total, parents)
    for slot, total, records in found:
        shown = f", the {len(records)} most recent:" if len(records) < total else ":"
        print(f"{target.name}.{slot.vector_column} ({slot.model_key}, {slot.role}):"
              f" {total} failed rows{shown if total else ''}")
        for r in records:
            when = "" if r.failed_at is None else f", last {r.failed_at:%Y-%m-%d %H:%M:%S%z}"
            print(f"  row {r.key}: {r.reason} (attempts: {r.attempts}{when})")
    return EXIT_OK
