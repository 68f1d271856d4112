"""The chunk stage: dirty parents -> split -> matched -> applied in one short transaction.

The scheduler finds dirty parents (a keyset walk of the marks, `dirty_page`) and sends
them to the workers in small batches (`stage_parents`, the chunk_parents actor), so
splitting (CPU, tokenizers) scales with the workers and the scheduler's pass stays short;
a cronjob's `tick` runs it inline (`run_chunk_stage`). Splitting happens outside any
transaction; applying re-checks each parent (pgreembed.store.chunk_sets), so a parent
edited meanwhile is left dirty and done again with its new text. The new chunks are rows
with a NULL vector in the chunk table, which the ordinary machinery then embeds like any
pending row of a target table (dedupe gives a text already embedded its vector for free).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.chunking.matching import match
from pgreembed.chunking.splitter import chunker
from pgreembed.config import Settings, Target
from pgreembed.config.chunking import Chunking
from pgreembed.errors import PgreembedError
from pgreembed.store.chunk_sets import (
    Applied,
    apply_chunk_sets,
    enter_as_writer,
    read_dirty,
    sweep_gone,
)
from pgreembed.store.chunks import parent_key
from pgreembed.store.rechunk_sets import ChunkSet, copy_known, same_settings, sets_of

log = logging.getLogger(__name__)

# Each batch is one transaction holding its parents FOR SHARE until it commits, and an app
# edit of one of them waits for that commit: 100 parents a transaction made edits wait up
# to ~100 ms under load (docs/chunking.md, "Under load"); 10 keep that wait short.
PARENTS_PER_TRANSACTION = 10
# Read and split together, sent to a worker as one message: the per-batch round trips
# (the set's slots and settings, the key's type) are paid once for this many parents.
PARENTS_PER_READ = 50
PARENTS_PER_PASS = 2000  # then the dispatch pass runs; the rest is done next pass


@dataclass
class StageReport:
    parents: int = 0
    stale: int = 0
    inserted: int = 0
    deleted: int = 0
    kept: int = 0
    removed: int = 0  # chunks of parents deleted under an older snapshot (sweep_gone)
    copied: int = 0  # vectors a re-chunk's new set took from the live set (same text)

    def add(self, applied: Applied) -> None:
        self.parents += applied.parents
        self.stale += applied.stale
        self.inserted += applied.inserted
        self.deleted += applied.deleted
        self.kept += applied.kept


@functools.lru_cache(maxsize=32)
def _chunker(chunking: Chunking, provider: str, model: str
             ) -> Callable[[str, Mapping[str, Any]], list[str]]:
    return chunker(chunking, provider, model)


def rechunk(conn: psycopg.Connection, target: Target, limit: int | None = None,
            among: Sequence[str] | None = None) -> Applied:
    """Up to `limit` (PARENTS_PER_READ) of `target`'s dirty parents (with `among`: of
    those keys, as text), read and split at once, applied PARENTS_PER_TRANSACTION a
    transaction; commits. Applied.parents == 0 and Applied.stale == 0: nothing was dirty.
    `target` names one chunk set (chunk_sets.sets_of): its table, dirty table and the
    settings the set was made with."""
    key = parent_key(conn, target)
    limit = PARENTS_PER_READ if limit is None else limit
    parents = read_dirty(conn, target, key, limit, among)
    conn.commit()
    chunking = target.parent.chunking
    chunks_of = _chunker(chunking, target.provider, target.model)
    planned = [(p, chunks_of(p.text or "", p.row)) for p in parents]
    total = Applied()
    step = PARENTS_PER_TRANSACTION  # read now: bench.chunk_edits sets main's 100
    for start in range(0, len(planned), step):
        try:
            # Joined as a writer, then the set's table: a re-chunk swap (which renames the
            # sets) cannot commit until this does, and the settings read under it are the
            # ones this set has. Held out, or swapped meanwhile: split again next time.
            if not enter_as_writer(conn, target) or not same_settings(conn, target, chunking):
                conn.rollback()
                total.stale += len(planned) - start
                break
            applied = apply_chunk_sets(conn, target, key,
                                       sql.Identifier(target.vector_column),
                                       planned[start:start + step], match)
            conn.commit()
        except psycopg.errors.LockNotAvailable:  # a swap's table lock queued: give it way
            conn.rollback()
            total.stale += len(planned) - start
            break
        except BaseException:
            conn.rollback()
            raise
        for name in ("parents", "stale", "inserted", "deleted", "moved", "kept"):
            setattr(total, name, getattr(total, name) + getattr(applied, name))
    if total.stale:
        log.info("target %s: %d parents changed while being chunked; done again next",
                 target.name, total.stale)
    return total


def chunk_sets(conn: psycopg.Connection, settings: Settings,
               report: StageReport | None = None) -> Iterator[ChunkSet]:
    """Every chunk set of every chunked target, each after removing the chunks of parents
    deleted under an older snapshot (sweep_gone). A failure is logged and skips that
    target or set: its marks stay in Postgres for the next pass."""
    for configured in settings.targets.values():
        if configured.parent is None:
            continue
        try:
            sets = sets_of(conn, configured)
            conn.commit()
        except (psycopg.Error, PgreembedError) as exc:
            conn.rollback()
            log.warning("chunk stage of %s: %s: %s", configured.name, type(exc).__name__, exc)
            continue
        for chunk_set in sets:
            def sweep(target: Target = chunk_set.target) -> None:
                removed = sweep_gone(conn, target, parent_key(conn, target))
                conn.commit()
                if report is not None:
                    report.removed += removed
            if _guarded(conn, chunk_set.target, sweep):
                yield chunk_set


def copy_vectors(conn: psycopg.Connection, chunk_set: ChunkSet) -> int:
    """A re-chunk's new set: give its new chunks the vectors the live set has for their
    texts (after each batch, before the dispatcher would buy them); 0 for a live set."""
    return copy_known(conn, chunk_set) if chunk_set.copy_from is not None else 0


def _guarded(conn: psycopg.Connection, target: Target, step: Callable[[], object]) -> bool:
    """Run `step`; False (logged, rolled back) if it failed: the marks stay dirty."""
    try:
        step()
        return True
    except (psycopg.Error, PgreembedError) as exc:
        conn.rollback()
        log.warning("chunk stage of %s: %s: %s", target.name, type(exc).__name__, exc)
    except Exception:  # noqa: BLE001 - a splitter's bug must not stop every target's pass
        conn.rollback()
        log.exception("chunk stage of %s failed; its parents stay dirty", target.name)
    return False


def run_chunk_stage(conn: psycopg.Connection, settings: Settings,
                    max_parents: int = PARENTS_PER_PASS) -> StageReport:
    """Re-chunk dirty parents of every chunked target here, in batches (bounded per pass):
    the one-pass cronjob's way, and the tests'. A failure is logged and left for the
    next pass: the marks stay in Postgres."""
    report = StageReport()
    for chunk_set in chunk_sets(conn, settings, report):
        def batches(chunk_set: ChunkSet = chunk_set) -> None:
            done = 0
            while done < max_parents:
                applied = rechunk(conn, chunk_set.target)
                report.add(applied)
                done += applied.parents + applied.stale
                if applied.parents == 0:
                    break  # nothing dirty, or all of it busy: next pass
            report.copied += copy_vectors(conn, chunk_set)
        _guarded(conn, chunk_set.target, batches)
    return report


def stage_parents(conn: psycopg.Connection, settings: Settings, set_name: str,
                  keys: Sequence[str]) -> Applied:
    """A worker's batch: chunk the parents `keys` (as text) of the chunk set `set_name`
    (a ChunkSet's target name) that are still dirty, in one transaction. A parent edited
    or held meanwhile stays dirty (Applied.stale) for a later batch; so does every one
    if the set is gone (a swap or finalize renamed it meanwhile)."""
    for configured in settings.targets.values():
        if configured.parent is None or not set_name.startswith(configured.name):
            continue
        sets = sets_of(conn, configured)
        conn.commit()
        for chunk_set in sets:
            if chunk_set.target.name == set_name:
                applied = rechunk(conn, chunk_set.target, len(keys), keys)
                copy_vectors(conn, chunk_set)
                return applied
    return Applied(stale=len(keys))
