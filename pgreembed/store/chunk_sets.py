"""The chunk stage's SQL: read dirty parents, then apply their new chunk sets.

Applying is one short transaction per batch of parents. It locks each parent FOR SHARE
SKIP LOCKED and keeps only those whose text (and template columns) still hash to what
was split: a parent edited since, or held by an app transaction, stays dirty and is done
again later, so a stale chunk set is never written and the stage never waits on the app.
The old chunks stay (searchable) until the new set commits; unchanged texts keep their
row and vector (pgreembed.chunking.matching).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.chunking import CHUNK_KEY, CHUNK_TEXT
from pgreembed.store.chunks import dirty_table, gone_table, parent_of, parent_target
from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.slots import app_table, text_expression
from pgreembed.store.table_lock import join_writers
from pgreembed.store.trusted_sql import NO_PARAMS
from pgreembed.values import Diff, Existing


@dataclass(frozen=True)
class DirtyParent:
    """A parent to chunk: its key (a tuple for a composite key), text, template values
    and the version they hash to."""

    key: Any
    text: str | None
    row: Mapping[str, Any]
    version: str


@dataclass
class Applied:
    parents: int = 0  # chunk sets written
    stale: int = 0  # edited (or locked by the app) since they were read: left dirty
    inserted: int = 0
    deleted: int = 0
    moved: int = 0
    kept: int = 0


def _version(target: Target) -> sql.Composable:
    """md5 over the text and the template columns: what the chunks are made of."""
    columns = [text_expression(parent_target(target)),
               *(sql.Identifier(c) for c in parent_of(target).chunking.template_columns)]
    return sql.SQL("md5(row({})::text)").format(sql.SQL(", ").join(columns))


def chunk_uuid(text: str) -> uuid.UUID:
    """A new chunk's key: 8 bytes of md5(text), then 8 random ones (unique all the same).

    The scheduler sends pending rows in key order, so chunks of one text (boilerplate
    shared by many parents) travel in one batch, where it is bought once for all of them;
    with random keys they spread over batches in flight together, each buying it."""
    return uuid.UUID(bytes=hashlib.md5(text.encode()).digest()[:8] + os.urandom(8))


def read_dirty(conn: psycopg.Connection, target: Target, key: ParentKey, limit: int,
               among: Sequence[str] | None = None) -> list[DirtyParent]:
    """Up to `limit` dirty parents, oldest mark first (a short read; no lock); with
    `among` (keys in their text form, ParentKey.text), only those of them still dirty."""
    template = parent_of(target).chunking.template_columns
    only = sql.SQL("WHERE {}").format(key.among_texts("d", marks=True)) \
        if among is not None else sql.SQL("")
    rows = conn.execute(sql.SQL(
        "SELECT {marks}, ({text})::text, {version}{template} FROM {dirty} d JOIN {parent} p"
        " ON {joined} {only} ORDER BY d.pgr_marked_at, {marks} LIMIT %s").format(
        text=text_expression(parent_target(target)), version=_version(target),
        template=sql.SQL("").join(sql.SQL(", p.{}").format(sql.Identifier(c))
                                  for c in template),
        dirty=dirty_table(target), parent=app_table(parent_target(target)),
        marks=key.cols("d", marks=True), joined=key.equal("p", "d", right_marks=True),
        only=only), (*([list(among)] if among is not None else []), limit)).fetchall()
    n = len(key.columns)
    return [DirtyParent(key.value(r[:n]), r[n], dict(zip(template, r[n + 2:], strict=True)),
                        r[n + 1]) for r in rows]


@dataclass(frozen=True)
class Mark:
    """Where a walk of the dirty marks is: a mark's time, its key columns' values, and
    the key in its text form (what a worker's batch carries)."""

    marked_at: Any
    parts: tuple[Any, ...]
    text: str


def dirty_page(conn: psycopg.Connection, target: Target, key: ParentKey,
               after: Mark | None, limit: int) -> list[Mark]:
    """The next `limit` dirty marks after `after`, oldest first: a keyset walk of the
    marks' own index (no join, no lock), so the scheduler's look stays cheap whatever
    the backlog; the workers read the parents' texts."""
    marks = key.cols("d", marks=True)
    where = sql.SQL("WHERE (d.pgr_marked_at, {}) > ({})").format(
        marks, sql.SQL(", ").join([sql.Placeholder()] * (1 + len(key.columns)))) \
        if after else sql.SQL("")
    rows = conn.execute(sql.SQL(
        "SELECT d.pgr_marked_at, {text} AS pgr_key_text, {marks} FROM {dirty} d {where}"
        " ORDER BY d.pgr_marked_at, {marks} LIMIT %s").format(
        text=key.text("d", marks=True), marks=marks, dirty=dirty_table(target), where=where),
        (*((after.marked_at, *after.parts) if after else ()), limit)).fetchall()
    return [Mark(r[0], tuple(r[2:]), r[1]) for r in rows]


def apply_chunk_sets(conn: psycopg.Connection, target: Target, key: ParentKey,
                     vector: sql.Identifier, planned: Sequence[tuple[DirtyParent, list[str]]],
                     match: Callable[[list[Existing], list[str]], Diff]) -> Applied:
    """Write the new chunk sets of the parents still as they were read, in a transaction
    `enter_as_writer` opened, and commit it (the COMMIT travels in the writes' pipeline:
    see _apply); on a lock timeout, roll it back. `match` turns a parent's stored chunks
    and its new list into a Diff.

    It never waits: the app's edit of a parent this holds FOR SHARE waits for our commit,
    so a wait of ours would be the app's too (measured: edits stalled up to 430 ms behind
    the stage's DELETE, itself waiting on a worker's write of a chunk). Chunk rows to
    delete or move are locked SKIP LOCKED (a parent with one held is left dirty), and any
    other lock wait (its table lock behind a swap's) over STAGE_LOCK_TIMEOUT_MS, which
    enter_as_writer set, gives the whole batch back, dirty, for the next pass."""
    try:
        return _apply(conn, target, key, vector, planned, match)
    except psycopg.errors.LockNotAvailable:
        conn.rollback()
        return Applied(stale=len(planned))


STAGE_LOCK_TIMEOUT_MS = 50


def enter_as_writer(conn: psycopg.Connection, target: Target) -> bool:
    """Open a stage transaction as one of our writers, before it locks anything of the
    chunk set, its lock waits capped at STAGE_LOCK_TIMEOUT_MS: False (rolled back) when a
    swap or rollback holds writers out (measured before: the stage, every pass under 40
    edits/s, kept a rollback's attempts failing for 25 s). Taken after
    the set's table lock instead, the workers' stage transactions (several threads at
    once) held ROW EXCLUSIVE while waiting to join, and a swap's attempts kept failing
    (measured: "could not swap: the table stayed busy for 62 s" at 150 edits/s).

    Its commit does not wait for the WAL flush (synchronous_commit off, this transaction
    only): an app edit of a parent in the batch waits for that commit, and under load the
    flush took 30-60 ms (test 4's probe: edits waiting behind the stage's last
    statements while it synced). Safe to lose in a crash: the transaction holds no paid
    vector (new chunks have none; kept ones keep theirs), and the mark it deletes is lost
    with the chunks it writes, so the parent is simply chunked again. Any later durable
    commit (the app's, a worker's vector write) flushes it first: WAL is sequential."""
    try:
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{STAGE_LOCK_TIMEOUT_MS}ms")))
        conn.execute("SET LOCAL synchronous_commit = off")
        join_writers(conn, app_table(target))
        return True
    except psycopg.errors.LockNotAvailable:
        conn.rollback()
        return False


def _apply(conn: psycopg.Connection, target: Target, key: ParentKey,
           vector: sql.Identifier, planned: Sequence[tuple[DirtyParent, list[str]]],
           match: Callable[[list[Existing], list[str]], Diff]) -> Applied:
    """Lock what no app statement waits on first (the marks, the chunk rows to change),
    read and match (Python work), and only then the parents FOR SHARE, in the first
    statement of one pipeline with the writes: an app edit of a parent in the batch waits
    for our commit, so the parents are held from that pipeline to the commit, not for the
    whole batch (measured: edits waited up to 83 ms, one over 100 ms, behind the stage's
    reads while it held them)."""
    report = Applied()
    ids = {"parent": app_table(parent_target(target)), "key": key.cols(),
           "among": key.among(), "marks": key.cols(marks=True),
           "among_marks": key.among(marks=True), "key_arrays": key.arrays(),
           "chunks": app_table(target), "dirty": dirty_table(target),
           "uuid": sql.Identifier(CHUNK_KEY), "chunk": sql.Identifier(CHUNK_TEXT),
           "vector": vector, "version": _version(target), "of_parent": key.equal("c", "p")}
    wanted = {p.key: (p.version, chunks) for p, chunks in planned}
    # The marks: another stage of the same parent (a lapsed claim) skips it. The app's
    # trigger never waits on them: its INSERT ... ON CONFLICT DO NOTHING passes a row
    # that is only locked.
    locked = [key.value(r) for r in conn.execute(sql.SQL(
        "SELECT {marks} FROM {dirty} WHERE {among_marks} ORDER BY {marks}"
        " FOR UPDATE SKIP LOCKED").format(**ids), key.params(list(wanted))).fetchall()]
    stored: dict[Any, list[Existing]] = {k: [] for k in locked}
    for row in conn.execute(sql.SQL(
            "SELECT {uuid}, chunk_seq, {chunk}, {vector} IS NOT NULL, {key} FROM {chunks}"
            " WHERE {among}").format(**ids), key.params(locked)):
        stored[key.value(row[4:])].append(Existing(row[0], row[1], row[2], row[3]))
    diffs = {owner: match(stored[owner], wanted[owner][1]) for owner in locked}
    changed = [u for d in diffs.values() for u in [*d.delete, *(m for m, _ in d.move)]]
    free = {r[0] for r in conn.execute(sql.SQL(
        "SELECT {uuid} FROM {chunks} WHERE {uuid} = ANY(%s::uuid[]) ORDER BY {uuid}"
        " FOR UPDATE SKIP LOCKED").format(**ids), (changed,))} if changed else set()
    busy = {o for o, d in diffs.items()
            if any(u not in free for u in [*d.delete, *(m for m, _ in d.move)])}
    candidates = [o for o in locked if o not in busy]
    report.stale = len(locked)
    if not candidates:
        conn.commit()
        return report
    delete: list[Any] = []
    move: list[tuple[Any, int]] = []
    insert: list[tuple[Any, int, str]] = []
    for owner in candidates:
        diff = diffs[owner]
        delete += diff.delete
        move += diff.move
        insert += [(owner, seq, text) for seq, text in diff.insert]
    # One pipeline, one round trip: the first statement locks the parents FOR SHARE SKIP
    # LOCKED (never waiting on the app), keeps those whose text still hashes to what was
    # split and whose chunk rows are still the ones matched, and deletes their marks;
    # every write after it is limited to parents whose mark it deleted (ours to delete:
    # we hold every candidate's mark). From the parents' lock to the commit no result
    # comes back to Python, so the app's edit of one waits for the server, not for this
    # process's turn on a CPU (measured at load 12: edits held 107 ms while the lock's
    # result travelled back and the writes were built).
    not_marked = sql.SQL("NOT EXISTS (SELECT FROM {dirty} d WHERE {cond})")
    with conn.pipeline():
        fresh = conn.execute(sql.SQL(
            "DELETE FROM {dirty} d USING (SELECT {p_key} FROM {parent} p JOIN unnest("
            "{key_arrays}, %s::text[], %s::text[]) AS v({key}, pgr_version, pgr_set)"
            " ON {p_is_v} WHERE {version} = v.pgr_version AND coalesce((SELECT"
            " string_agg(c.{uuid}::text, ',' ORDER BY c.{uuid}::text COLLATE \"C\")"
            " FROM {chunks} c WHERE {of_parent}), '') = v.pgr_set ORDER BY {p_key}"
            " FOR SHARE OF p SKIP LOCKED) f WHERE {f_is_d} RETURNING {d_marks}").format(
            p_key=key.cols("p"), p_is_v=key.equal("p", "v"),
            f_is_d=key.equal("f", "d", right_marks=True), d_marks=key.cols("d", marks=True),
            **ids),
            [*key.params(candidates), [wanted[o][0] for o in candidates],
             [",".join(sorted(str(e.uuid) for e in stored[o])) for o in candidates]])
        if delete:
            conn.execute(sql.SQL("DELETE FROM {chunks} c WHERE c.{uuid} = ANY(%s::uuid[])"
                                 " AND {free}").format(free=not_marked.format(
                                     cond=key.equal("c", "d", right_marks=True), **ids),
                                     **ids), (delete,))
        if move:  # through negative seqs: UNIQUE (keys, chunk_seq) is checked row by row
            unmarked = not_marked.format(cond=key.equal("c", "d", right_marks=True), **ids)
            conn.execute(sql.SQL("UPDATE {chunks} c SET chunk_seq = -1 - c.chunk_seq"
                                 " WHERE c.{uuid} = ANY(%s::uuid[]) AND {free}").format(
                free=unmarked, **ids), ([u for u, _ in move],))
            conn.execute(sql.SQL(
                "UPDATE {chunks} c SET chunk_seq = m.seq FROM unnest(%s::uuid[], %s::int[])"
                " AS m(u, seq) WHERE c.{uuid} = m.u AND {free}").format(free=unmarked, **ids),
                ([u for u, _ in move], [s for _, s in move]))
        if insert:
            conn.execute(sql.SQL(
                "INSERT INTO {chunks} ({uuid}, {key}, chunk_seq, {chunk}) SELECT * FROM"
                " unnest(%s::uuid[], {key_arrays}, %s::int[], %s::text[])"
                " AS n({uuid}, {key}, chunk_seq, {chunk}) WHERE {free}").format(
                free=not_marked.format(cond=key.equal("n", "d", right_marks=True), **ids),
                **ids),
                [[chunk_uuid(t) for _, _, t in insert], *key.params([k for k, _, _ in insert]),
                 [s for _, s, _ in insert], [t for _, _, t in insert]])
        conn.commit()  # in the pipeline too: measured, at load 11-15 the round trips
        # after the writes (a savepoint's RELEASE, then COMMIT) held edits 100-107 ms
    done = {key.value(r) for r in fresh.fetchall()}
    report.stale = len(locked) - len(done)
    report.parents = len(done)
    for owner in done:
        diff = diffs[owner]
        report.deleted += len(diff.delete)
        report.moved += len(diff.move)
        report.inserted += len(diff.insert)
        report.kept += diff.kept
    return report


def sweep_gone(conn: psycopg.Connection, target: Target, key: ParentKey,
               limit: int = 10_000) -> int:
    """Remove the chunks (and marks) of parents deleted by transactions whose snapshot
    could not see them all (store.chunks.gone_table); the caller commits. Only chunks
    whose parent is gone now are removed: a key inserted again keeps its new chunks."""
    ids = {"gone": gone_table(target), "chunks": app_table(target),
           "dirty": dirty_table(target), "parent": app_table(parent_target(target)),
           "marks": key.cols(marks=True), "of_chunk": key.equal("p", "c"),
           "of_mark": key.equal("p", "d", right_marks=True)}
    marks = conn.execute(sql.SQL("SELECT id, {marks} FROM {gone} ORDER BY id LIMIT %s"
                                 " FOR UPDATE SKIP LOCKED").format(**ids), (limit,)).fetchall()
    if not marks:
        return 0
    whole = any(m[1] is None for m in marks)  # a TRUNCATE: every chunk is a suspect
    keys = [] if whole else key.params([key.value(m[1:]) for m in marks])

    def among_marks(alias: str, marked: bool) -> sql.Composable:
        return sql.SQL("TRUE") if whole else key.among(alias, marks=marked)
    removed = conn.execute(sql.SQL(
        "DELETE FROM {chunks} c WHERE {marked} AND NOT EXISTS"
        " (SELECT FROM {parent} p WHERE {of_chunk})").format(
        marked=among_marks("c", False), **ids), keys).rowcount
    conn.execute(sql.SQL(
        "DELETE FROM {dirty} d WHERE {marked} AND NOT EXISTS"
        " (SELECT FROM {parent} p WHERE {of_mark})").format(
        marked=among_marks("d", True), **ids), keys)
    conn.execute(sql.SQL("DELETE FROM {gone} WHERE id = ANY(%s)").format(**ids),
                 ([m[0] for m in marks],))
    return removed


def dirty_count(conn: psycopg.Connection, target: Target) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(dirty_table(target)),
                       NO_PARAMS).fetchone()
    return int(row[0]) if row else 0


def parent_version(target: Target) -> sql.Composable:
    """The md5 a parent's chunk set is made of (text and template columns), over the
    parent's unqualified columns: what a failure of the parent is recorded against."""
    return _version(target)


def dirty_exists(conn: psycopg.Connection, target: Target) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                       (dirty_table(target).as_string(conn),)).fetchone()
    return row == (True,)
