"""`pgreembed import-pgai --take-over | --undo`: the cut-over from pgai's worker to pgreembed's,
and back (pgreembed.operations.pgai_takeover). `import-pgai` (cli/import_pgai.py) hands
these two flags here."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pgreembed.cli.output import emit
from pgreembed.errors import EXIT_OK, ConfigError
from pgreembed.store.table_lock import LockPolicy

if TYPE_CHECKING:
    from pgreembed.operations.pgai_takeover import TakeoverReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--adopt", action="store_true",
                       help="register the stored chunks and vectors as the target's live"
                            " column (no text sent, no row rewritten); pgai stays in charge")
    steps.add_argument("--take-over", action="store_true",
                       help="adopt, then: pgai's triggers off (kept), ours on, its queue"
                            " and failures moved over, the vectorizer disabled")
    steps.add_argument("--undo", action="store_true",
                       help="give an adopted vectorizer back to pgai's worker")


def wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "take_over", False) or getattr(args, "undo", False))


def _print(report: TakeoverReport) -> None:
    r = report
    if r.state == "undone":
        print(f"vectorizer {r.vectorizer}: handed back to pgai ({r.keys_marked} parents queued"
              f" for its worker; target {r.target} paused); lock held {r.locked_ms:.0f} ms")
        return
    print(f"vectorizer {r.vectorizer}: {r.state} by target {r.target}: {r.queued_rows} queue"
          f" rows, {r.keys_marked} parents marked to chunk ({r.keys_gone} deleted meanwhile,"
          f" {r.in_flight} in a pgai batch in flight), {r.failed_recorded} failures recorded"
          f" ({r.failed_superseded} queued again since); lock held {r.locked_ms:.0f} ms")
    for note in r.notes:
        print(f"  {note}")


def cmd_take_over(args: argparse.Namespace, settings: Any) -> int:
    """`settings`: the config's, with the targets import-pgai maps the vectorizers to."""
    if not (args.vectorizer or args.all):
        raise ConfigError("--take-over and --undo need --vectorizer NAME or --all")
    if args.dry_run:
        raise ConfigError("--dry-run plans an import; --take-over and --undo change things")
    from pgreembed.operations import pgai_takeover  # when run, not when the parser is built

    policy = LockPolicy(wait_seconds=args.lock_wait)
    step = pgai_takeover.undo if args.undo else pgai_takeover.take_over
    reports = [step(settings, vec, policy)
               for vec in pgai_takeover.vectorizers(settings, args.vectorizer or None)]
    if args.json:
        emit("import-pgai-undo" if args.undo else "import-pgai-take-over",
             {"vectorizers": [r.as_dict() for r in reports]})
    else:
        for report in reports:
            _print(report)
    return EXIT_OK


def parent_failures_of(conn: Any, target: Any, limit: int) -> tuple[int, list[Any]]:
    """`failures`: a chunked target's parents recorded failed (pgai's failed queue, handed
    over at a take-over); (0, []) for other targets."""
    if target.parent is None:
        return 0, []
    from pgreembed.store.chunks import parent_key
    from pgreembed.store.takeover import parent_failures

    return parent_failures(conn, target, parent_key(conn, target), limit)


def print_parent_failures(target: Any, total: int, parents: list[Any]) -> None:
    if total:
        print(f"{target.name}: {total} parent rows failed (handed over from pgai):")
    for p in parents:
        print(f"  row {p.key}: {p.reason} ({p.failed_at:%Y-%m-%d %H:%M:%S%z})")


def retry_parent_failures_of(conn: Any, target: Any) -> int | None:
    """`failures --retry`: a chunked target's failed parents marked to be chunked again
    and their records dropped, committed; None for other targets."""
    if target.parent is None:
        return None
    from pgreembed.store.chunks import parent_key
    from pgreembed.store.takeover import retry_parent_failures

    retried = retry_parent_failures(conn, target, parent_key(conn, target))
    conn.commit()
    return retried
