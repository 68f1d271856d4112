"""Doctor's checks of a chunked target: the chunk stage's backlog and its age, deletes
still to sweep, and chunks whose parent is gone (pgreembed.store.chunk_counts)."""

from __future__ import annotations

from pgreembed.config import Target
from pgreembed.operations.doctor.base import DoctorBase
from pgreembed.operations.doctor.findings import OK, WARN
from pgreembed.store.chunk_counts import chunk_counts, delete_orphans_sql, orphan_chunks

# A parent marked longer ago than this is not being chunked: the stage runs every pass.
STALE_MARK_SECONDS = 600.0
ORPHANS_COUNTED = 1000


class ChunkChecks(DoctorBase):
    def chunk_backlog(self, target: Target) -> None:
        counts = chunk_counts(self.conn, target)
        about = "~" if counts.parents_estimated else ""
        details = {"parents": counts.parents, "parents_to_chunk": counts.parents_to_chunk,
                   "oldest_mark_seconds": counts.oldest_mark_seconds,
                   "gone_marks": counts.gone_marks, "chunks": counts.chunks,
                   "chunks_pending": counts.chunks_pending}
        line = (f"{about}{counts.parents} parents, {counts.parents_to_chunk} to chunk,"
                f" {counts.chunks} chunks ({counts.chunks_pending} without a vector)")
        age = counts.oldest_mark_seconds
        if age is not None and age > STALE_MARK_SECONDS:
            self.add(WARN, target.name, "chunk_backlog",
                     f"{line}: the oldest parent to chunk was marked {age:.0f} s ago; the"
                     " chunk stage runs in the scheduler's pass (and `pgreembed tick`): is a"
                     " scheduler running, and does its log show the stage failing?", details)
        else:
            self.add(OK, target.name, "chunk_backlog", line, details)

    def chunk_orphans(self, target: Target) -> None:
        found = orphan_chunks(self.conn, target, ORPHANS_COUNTED)
        counted = f"{found}{'+' if found >= ORPHANS_COUNTED else ''}"
        if not found:
            self.add(OK, target.name, "chunk_orphans", "no chunk without its parent row")
            return
        gone = chunk_counts(self.conn, target).gone_marks
        if gone:
            self.add(OK, target.name, "chunk_orphans",
                     f"{counted} chunks of deleted parents, {gone} deletes marked for the"
                     " next chunk stage pass to sweep", {"orphans": found, "gone_marks": gone})
            return
        advice = self.statement(delete_orphans_sql(self.conn, target))
        self.add(WARN, target.name, "chunk_orphans",
                 f"{counted} chunks whose parent row is gone and no delete marked for the"
                 " stage (parents deleted while the triggers were off?): search_parents"
                 f" can return them as parents that no longer exist; remove them: {advice}",
                 {"orphans": found, "sql": advice})
