"""How `status` and `migrate status` show an open migration: its bar or its phase.

Apart from migrate_steps (which imports the whole migration machinery) because `status`,
run often, needs only these lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgreembed.migrations import progress


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(pr: progress.Progress) -> str:
    eta = "?" if pr.eta_seconds is None else f"{pr.eta_seconds:.0f}s"
    about = "~" if pr.estimated else ""  # from the row estimate (see `status`)
    return (f"{_bar(pr.done, pr.total)} {about}{pr.done}/{about}{pr.total} rows,"
            f" {pr.failed} failed,"
            f" {pr.rate_per_second:.1f} rows/s, ETA {eta}{' (paused)' if pr.paused else ''}")


# What each column is to a migration, as `status` labels it (slots.role: live/next/old).
ROLE_LABELS = {"live": "live", "next": "incoming", "old": "old"}


def migration_line(pr: progress.Progress) -> str:
    """`status`'s line for an open migration: its bar while the new column fills; after a
    swap (or a rollback) the phase and what comes next, as a bar would say nothing."""
    phase = pr.migration.phase
    if phase == "filling":
        return progress_line(pr)
    about = "~" if pr.estimated else ""
    kept = (f"{pr.column} ({pr.model}) kept current: {about}{pr.done}/{about}{pr.total} rows,"
            f" {pr.failed} failed")
    step = ("`migrate finalize` drops it, `migrate rollback` makes it live again"
            if phase == "swapped" else
            "`migrate swap` makes it live again, `migrate finalize` drops it")
    if pr.paused and pr.done < pr.total:  # a backlog side fill's previous column
        kept = (f"{pr.column} ({pr.model}) paused, not kept current: {about}{pr.done}/"
                f"{about}{pr.total} rows")
        step = "`migrate finalize` drops it (a side fill's scheduler does after its grace)"
    return f"{phase.replace('_', ' ')}; {kept}; {step}"


def pgai_line(target: str) -> str:
    """`status`'s word on a live column pgai's worker keeps current."""
    return (f"pgai's worker keeps it current (adopted from pgai); `pgreembed import-pgai"
            f" --vectorizer {target} --take-over` hands it to pgreembed")


def paused_line(paused_by: str) -> str:
    """`status`'s word on a live column nothing is dispatched for, by why it was paused
    (`pgreembed.slots.paused_by`)."""
    if paused_by == "side_fill":
        return ("held back while a side fill copies the paid backlog into the side column"
                " (its path line); the swap makes that column live")
    return f"paused ({paused_by}): nothing is dispatched for it"
