"""`migrate plan|start --derive dimensions:D|halfvec`: a migration made in SQL from the live
vectors."""

from __future__ import annotations

import argparse

from pgreembed.cli.formatting import human_bytes as _human_bytes
from pgreembed.cli.output import emit
from pgreembed.config import Settings, Target
from pgreembed.errors import EXIT_OK, EXIT_REFUSED, ConfigError
from pgreembed.migrations import app_objects, derive, disk, lifecycle, plan
from pgreembed.store.table_lock import LockPolicy


def derive_step(settings: Settings, target: Target, args: argparse.Namespace, step: str,
                policy: LockPolicy | None) -> int:
    """plan: $0 and the storage saved; start: the new column filled, no provider call."""
    if (args.model or args.dimensions or getattr(args, "batch_api", False)
            or getattr(args, "spend_cap", None) is not None):
        raise ConfigError("migrate --derive: the model and size come from the live column"
                          " and the spec (no --model, --dimensions, --batch-api, --spend-cap)")
    live = derive.live_slot(settings, target)
    dimensions, kind = derive.new_column(live, derive.parse(args.derive))
    if step == "plan":
        budget = getattr(args, "disk_budget", None)
        p = plan.plan(settings, target, live.provider, live.model, dimensions, vector_type=kind,
                      disk_budget=None if budget is None else disk.parse_size(budget))
        saved = derive.storage_saved(p.rows, live, dimensions, kind)
        live_bytes = (4 if live.vector_type == "vector" else 2) * live.dimensions + 8
        share = saved / max(1, p.rows) / live_bytes  # of each vector's bytes
        index_saved = round(derive.index_bytes(settings, live) * share)
        if getattr(args, "json", False):
            emit("migrate-plan", {
                "rows": p.rows, "rows_without_text": p.rows_without_text, "tokens": 0,
                "tokens_exact": True, "cost_usd": 0.0, "minutes_at_rate_limit": None,
                "requests_per_minute": None, "tokens_per_minute": None,
                "storage_bytes": p.storage_bytes, "column": p.column,
                "column_type": p.column_type, "statements": p.statements,
                "blockers": p.blockers, "notes": p.notes,
                "app_objects": [d.as_dict() for d in p.app_objects],
                "derived_from": live.model_key, "provider_inputs": 0,
                "storage_saved_bytes": saved, "index_saved_bytes_estimate": index_saved})
            return EXIT_REFUSED if p.blockers else EXIT_OK
        print(f"rows: {p.rows}; derived in SQL from {live.model_key}: no provider call,"
              " estimated cost: $0.00 (rows written meanwhile without a live vector are"
              " embedded by the provider at the new size)")
        print(f"new column: {p.column} {p.column_type}, ~{_human_bytes(p.storage_bytes)};"
              f" saves ~{_human_bytes(saved)} over the live column"
              + (f" and ~{_human_bytes(index_saved)} of its ANN index" if index_saved else ""))
        # As for any migration: the SQL, and what the swap will do with each app object.
        print("SQL:")
        for statement in p.statements:
            print(f"  {statement}")
        _print_app_objects(p.app_objects, p.notes)
        for blocker in p.blockers:
            print(f"BLOCKER: {blocker}")
        return EXIT_REFUSED if p.blockers else EXIT_OK
    slot, report = derive.start(settings, target, args.derive, policy=policy)
    print(f"derived migration: column {slot.vector_column} ({slot.model_key}) filled from"
          f" {live.model_key}: {report.derived} rows derived in {report.passes} passes,"
          f" {report.left_to_provider} left to the provider; next: migrate index, swap")
    _print_app_objects(*lifecycle.app_objects_report(settings, target))
    return EXIT_OK


def _print_app_objects(decisions: list[app_objects.Decision], notes: list[str]) -> None:
    for decision in decisions:
        print(f"app object: {decision.line()}")
    for note in notes:
        print(f"note: {note}")
