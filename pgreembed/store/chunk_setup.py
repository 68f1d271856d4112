"""`init` of a chunked target, before the ordinary init of its chunk table.

The parent is the app's table: its triggers change through table_lock (short lock
attempts, retried, blockers named), and only when they are not already as wanted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg

from pgreembed.config import Target
from pgreembed.store.blockers import ACCESS_EXCLUSIVE, SHARE_ROW_EXCLUSIVE
from pgreembed.store.chunk_adopt import allow_pending, record_chunking_current, vector_not_null
from pgreembed.store.chunk_triggers import chunk_triggers_current, install_chunk_triggers
from pgreembed.store.chunks import (
    check_parent,
    chunking_changed,
    ensure_chunk_table,
    ensure_view,
    mark_all_unless_current,
    parent_target,
    share_with_parent_readers,
)
from pgreembed.store.pool import connect
from pgreembed.store.rechunk_sets import rechunk_slot
from pgreembed.store.slots import app_table
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.store.takeover import pgai_in_charge
from pgreembed.store.versions import upgrade

log = logging.getLogger(__name__)


def init_chunking(dsn: str, target: Target, policy: LockPolicy | None,
                  check_rights: Callable[[psycopg.Connection, Target], None],
                  adopt: bool = False) -> None:
    """The chunk and dirty tables, the parent's triggers, and the first marks.

    `adopt` (import-pgai): the chunk table exists, filled by another chunker with these
    settings; its chunks are taken as they are. Its vector column loses NOT NULL (pgai's
    has it; new chunks are pending), no parent is marked dirty, and the parent's triggers
    are left to the take-over (pgai's own still run until then)."""
    with connect(dsn, vector=False) as conn:
        check_rights(conn, parent_target(target))
        upgrade(conn)
        check_parent(conn, target)
        if ensure_chunk_table(conn, target):
            log.info("target %s: created chunk table %s.%s", target.name, target.schema,
                     target.table)
        pgai = not adopt and pgai_in_charge(conn, target)
        if pgai:
            log.info("target %s: pgai's vectorizer keeps %s.%s current; the parent's"
                     " triggers are left to `pgreembed import-pgai --take-over`",
                     target.name, target.schema, target.table)
        current = adopt or pgai or chunk_triggers_current(conn, target)
        not_null = adopt and vector_not_null(conn, target)
        conn.commit()
    if not_null:  # a catalog change only (no rewrite), under the short-attempt policy
        run_locked(dsn, app_table(target), "import (vector column nullable)",
                   lambda conn: allow_pending(conn, target), policy, mode=ACCESS_EXCLUSIVE)
    if not current:
        run_locked(dsn, app_table(parent_target(target)), "init (chunk triggers)",
                   lambda conn: install_chunk_triggers(conn, target), policy,
                   mode=SHARE_ROW_EXCLUSIVE)
    with connect(dsn, vector=False) as conn:
        marked, first = ((record_chunking_current(conn, target), False) if adopt
                         else mark_all_unless_current(conn, target))
        # An open re-chunk migration is the way the settings change: nothing to say.
        made_with = None if rechunk_slot(conn, target) else chunking_changed(conn, target)
        if ensure_view(conn, target):
            log.info("target %s: created view %s.%s", target.name, target.parent.schema,
                     target.parent.view)
        given = share_with_parent_readers(conn, target)
        if given:
            log.info("target %s: SELECT on its chunks granted to %s (who may read %s.%s)",
                     target.name, ", ".join(given), target.parent.schema, target.parent.table)
        conn.commit()
    if made_with is not None:
        log.warning("target %s: [target.chunking] differs from the settings %s.%s was made"
                    " with; nothing is re-chunked in place (search would mix the two):"
                    " `pgreembed migrate plan --target %s --rechunk` estimates the re-chunk,"
                    " `pgreembed migrate start --target %s --rechunk` builds the new chunk"
                    " set side by side (swap, rollback, finalize as for a model)",
                    target.name, target.schema, target.table, target.name, target.name)
    if first:
        log.info("target %s: %d rows of %s.%s to chunk", target.name, marked,
                 target.parent.schema, target.parent.table)
    elif marked:
        log.warning("target %s: the chunking or text settings changed; %d rows of %s.%s are"
                    " chunked again (unchanged chunks keep their vectors)", target.name,
                    marked, target.parent.schema, target.parent.table)
