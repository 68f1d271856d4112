"""Reading rows to embed and writing vectors back, with the no-stale-write guard.

The write path is one `UPDATE ... FROM` over binary arrays of keys, hashes and
vectors (set-based: its COPY-fed predecessor was measured ~4x faster than executemany
for big batches). The
UPDATE only touches rows whose text still hashes to what was embedded
(invariant 2); the rows it skipped changed meanwhile and stay pending. A row
the app's table refuses (a constraint or trigger of the app's) is isolated by
halving the write in savepoints, like a provider's 400 is split in halves.
Rows are locked first, in key order and skipping those another transaction
holds (the app's), so a background write never waits on the app (invariant 10).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pgvector import HalfVector
from psycopg import postgres, sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from pgreembed.config import Target
from pgreembed.errors import NotFoundError
from pgreembed.store.faults import describe, is_row_fault
from pgreembed.store.pool import PREPARE
from pgreembed.store.slots import Slot, app_table, load_slot
from pgreembed.store.table_lock import join_writers
from pgreembed.values import Embedded, Failed, Row

# The write path's arrays travel in binary (`%b`): Postgres reads each element's
# length instead of parsing an array literal (array_in was ~2% of the server's
# instructions per row written; bench.callgrind_write).


def load_pending(conn: psycopg.Connection, slot: Slot, keys: Sequence[str]) -> list[Row]:
    """The rows among `keys` that still need this slot's model (others were done meanwhile),
    with their version (see `guard`) and their text's hash (`Slot.hash_expr`'s value,
    computed here when the text arrives in the database's own bytes: the server's CPU is
    the scarce one)."""
    here = _hashes_here(conn)
    wanted = sql.SQL("%(keys)b::text[]::{}[]").format(slot.pk_cast)  # binary: see above
    query = sql.SQL(
        """
        SELECT a.{pk}, ({text})::text, a.xmin::text::bigint, {hash}
        FROM {rows}
        WHERE a.{pk} = ANY({wanted})
          AND (a.{vector} IS NULL OR s.pgr_model_id IS DISTINCT FROM %(model)s)
        ORDER BY a.{pk}
        """
    ).format(pk=slot.pk, text=slot.text_expr, hash=sql.NULL if here else slot.hash_expr,
             wanted=wanted, rows=slot.rows_with_state(outer=True, keys=wanted),
             vector=slot.vector)
    return [Row(pk, text, text_hash(text) if here else h, version)
            for pk, text, version, h in conn.execute(
                query, {"keys": list(keys), "model": slot.model_id}, prepare=PREPARE)]


def _hashes_here(conn: psycopg.Connection) -> bool:
    """Whether md5 of the decoded text re-encoded is md5 of the server's bytes: UTF8 both
    ways (any other server encoding is hashed by the server)."""
    return (conn.info.parameter_status("server_encoding") == "UTF8"
            and conn.info.encoding == "utf-8")


def text_hash(text: str | None) -> uuid.UUID:
    """`md5(coalesce(text, ''))::uuid`, as `Slot.hash_expr` computes it in UTF8."""
    return uuid.UUID(bytes=hashlib.md5((text or "").encode()).digest())


class _XidDumper(Dumper):
    """A row version (xmin) in a binary array: psycopg has no binary dumper for `xid`."""

    format = Format.BINARY
    oid = postgres.types["xid"].oid

    def dump(self, obj: Any) -> bytes:
        return struct.pack("!I", obj)


class _Xid(int):
    """Registered with `_XidDumper`, so plain ints keep their own dumpers."""


def guard(slot: Slot, row: str = "a", incoming: str = "i") -> sql.Composed:
    """The no-stale-write guard (invariant 2): the row's text still hashes to what was
    embedded. A row still at the version it was read at (same xmin: no update since, by
    anyone) has that text without hashing it again: the md5 of the whole text (its
    detoasting too, for a long one) was ~1/30 of the write's server CPU for 600-byte
    texts (bench.callgrind_write), and grows with the text. Not with `text_sql`: its
    text may read other tables, whose edits leave the row's version as it was."""
    hashed = sql.SQL("{} = {}.pgr_hash").format(slot.hash_expr, sql.Identifier(incoming))
    if slot.target.text_sql:
        return hashed
    return sql.SQL("({}.xmin = {}.pgr_xmin OR {})").format(
        sql.Identifier(row), sql.Identifier(incoming), hashed)


def lock_slot(conn: psycopg.Connection, target: Target, slot_id: int, mode: str
              ) -> Slot | None:
    """The slot as registered now, read after locking the app's table in `mode`.

    A swap renames the columns and updates the registry in one transaction holding ACCESS
    EXCLUSIVE on the table, so once our lock is granted no swap is half done and none can
    commit before we do: the column name read here stays the slot's until our commit.
    Writers take ROW EXCLUSIVE, readers ACCESS SHARE. None if the slot is gone (its
    migration was cancelled or finalized).
    """
    table = app_table(target)
    if mode == "ROW EXCLUSIVE":
        join_writers(conn, table)  # DDL holds writers out before it locks the table
    # Never prepared: behind a pooler that mixes up statement names (docs/operations.md,
    # "Connection poolers") it must not be another statement without parameters.
    conn.execute(sql.SQL("LOCK TABLE {} IN {} MODE").format(table, sql.SQL(mode)))
    try:
        return load_slot(conn, target, slot_id)
    except NotFoundError:
        return None


@dataclass
class Written:
    """What a write did with its vectors: rows written, rows the app's table refused, and
    rows left pending because the app holds them locked now (their vectors are still good
    for their text: the caller keeps them for the next pass, see embedding.paid)."""

    keys: list[Any] = field(default_factory=list)
    refused: list[Failed] = field(default_factory=list)
    busy: list[Embedded] = field(default_factory=list)
    # Rows of a batch written in slices whose slice did not commit (the database failed
    # between slices): their vectors stay kept for the next pass, like `busy` ones.
    left: list[Embedded] = field(default_factory=list)
    # Rows of later slices not written because the column's model changed between
    # slices: their vectors are another model's, the rows stay pending for the new one.
    dropped: list[Embedded] = field(default_factory=list)

    def add(self, other: Written) -> Written:
        return Written(self.keys + other.keys, self.refused + other.refused,
                       self.busy + other.busy, self.left + other.left,
                       self.dropped + other.dropped)


def lock_free_rows(conn: psycopg.Connection, slot: Slot, keys: Sequence[str]
                   ) -> tuple[set[str], set[str]]:
    """Lock, in key order, the rows among `keys` that nobody holds; (keys locked, keys of
    rows that exist but another transaction holds). Deleted rows are in neither.

    A background write must never wait on the app's row locks (invariant 10): `UPDATE ...
    FROM` locks rows in join order, so an app transaction touching the same rows in
    another order deadlocked with it, or was held for deadlock_timeout. Rows locked here
    are ours until commit, so the writes that follow never wait on them; the app may
    wait on us, for the write's duration: milliseconds unindexed, but seconds for 512
    rows through an HNSW index, so workers write a batch in slices of about `[worker]
    max_row_lock_ms` (worker.batch_write). NO KEY UPDATE is the lock our UPDATE of
    a non-key column takes anyway: the app's foreign-key checks on the row (KEY SHARE,
    taken by inserting a row that references it) neither make us skip it nor wait on us.
    """
    if not keys:
        return set(), set()
    locked = {row[0] for row in conn.execute(sql.SQL(
        "SELECT k.pk FROM unnest(%b::text[]) AS k(pk) JOIN {table} a ON a.{pk} = k.pk::{type}"
        " ORDER BY a.{pk} FOR NO KEY UPDATE OF a SKIP LOCKED").format(
            table=slot.table, pk=slot.pk, type=slot.pk_cast), (list(keys),), prepare=PREPARE)}
    rest = [k for k in keys if k not in locked]
    busy = {row[0] for row in conn.execute(sql.SQL(
        "SELECT k.pk FROM unnest(%b::text[]) AS k(pk)"
        " WHERE EXISTS (SELECT FROM {table} a WHERE a.{pk} = k.pk::{type})").format(
            table=slot.table, pk=slot.pk, type=slot.pk_cast), (rest,),
        prepare=PREPARE)} if rest else set()
    return locked, busy


# Rows per UPDATE: a part's vectors travel as one array parameter (2,048 x 1536 dims is
# ~12.6 MB).
WRITE_PART_ROWS = 2048


def write_vectors(conn: psycopg.Connection, slot: Slot, results: Sequence[Embedded]
                  ) -> Written:
    """Write vectors whose row text is unchanged, into rows nobody else holds locked.

    `slot` must come from `lock_slot(..., "ROW EXCLUSIVE")` in the same transaction, and
    the vectors must be of its model (`Slot.holds_vectors_of`): only under that lock is
    its column name sure (a swap may have renamed the columns while the provider was
    embedding; invariant 7). Rows the app holds are skipped (`Written.busy`), never
    waited for (see `lock_free_rows`).
    """
    if not results:
        return Written()
    locked, busy = lock_free_rows(conn, slot, [str(item.row.pk) for item in results])
    skipped = [item for item in results if str(item.row.pk) in busy]
    results = [item for item in results if str(item.row.pk) in locked]
    conn.adapters.register_dumper(_Xid, _XidDumper)
    written: list[Any] = []
    for start in range(0, len(results), WRITE_PART_ROWS):
        written += _write_part(conn, slot, results[start:start + WRITE_PART_ROWS])
    return Written(keys=written, busy=skipped)


def _write_part(conn: psycopg.Connection, slot: Slot, results: Sequence[Embedded]
                ) -> list[Any]:
    """One guarded `UPDATE ... FROM unnest(arrays)` and the state upsert of the rows it
    wrote; their keys."""
    # Binary arrays, not a temporary table filled by COPY (the write until 2026-12-07): its
    # creation check, emptying, COPY round trip and truncation at commit were paid by
    # every write slice (docs/performance.md, sixth pass).
    if not results:
        return []
    half = slot.vector_type == "halfvec"
    keys = [str(item.row.pk) for item in results]
    # Two statements, not one data-modifying WITH: an app's DO ALSO rule on its table
    # refuses an UPDATE inside WITH (RETURNING is allowed). The keys are named on the
    # app's side too, so the planner goes through the pk (an Index Scan of the keys).
    written = {row[0] for row in conn.execute(sql.SQL(
        "UPDATE {table} AS a SET {vector} = i.pgr_vec"
        " FROM unnest(%(keys)b::text[], %(hashes)b::uuid[], %(vectors)b::{vector_type}[],"
        " %(versions)b::xid[])"
        " AS i(pgr_pk, pgr_hash, pgr_vec, pgr_xmin)"
        " WHERE a.{pk} = ANY(%(keys)b::text[]::{pk_type}[]) AND a.{pk} = i.pgr_pk::{pk_type}"
        " AND {guard} RETURNING i.pgr_pk"
    ).format(table=slot.table, vector=slot.vector, vector_type=sql.SQL(slot.vector_type),
             pk=slot.pk, pk_type=slot.pk_cast, guard=guard(slot)),  # a text_sql's %% escaped
        {"keys": keys, "hashes": [item.row.content_hash for item in results],
         "vectors": [HalfVector(item.vector) if half else item.vector for item in results],
         "versions": [None if item.row.version is None else _Xid(item.row.version)
                      for item in results]}, prepare=PREPARE)}
    if not written:
        return []
    done = [(key, item) for key, item in zip(keys, results, strict=True) if key in written]
    conn.execute(sql.SQL(
        """
        INSERT INTO {state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at, pgr_truncated,
                             pgr_failed_hash, pgr_failure, pgr_attempts, pgr_failed_at)
        SELECT w.pk::{pk_type}, %s, w.hash, now(), w.truncated, NULL, NULL, 0, NULL
        FROM unnest(%b::text[], %b::uuid[], %b::boolean[]) AS w(pk, hash, truncated)
        ON CONFLICT (pgr_pk) DO UPDATE SET
            pgr_model_id = excluded.pgr_model_id, pgr_hash = excluded.pgr_hash,
            pgr_embedded_at = excluded.pgr_embedded_at,
            pgr_truncated = excluded.pgr_truncated,
            pgr_failed_hash = NULL, pgr_failure = NULL, pgr_attempts = 0,
            pgr_failed_at = NULL
        """
    ).format(pk_type=slot.pk_cast, state=slot.state_table),
        (slot.model_id, [key for key, _ in done],
         [item.row.content_hash for _, item in done], [item.truncated for _, item in done]),
        prepare=PREPARE)
    return [item.row.pk for _, item in done]  # the row's own type


def write_isolating(conn: psycopg.Connection, slot: Slot, results: Sequence[Embedded]
                    ) -> Written:
    """`write_vectors`, with the rows the app's table refuses isolated (`Written.refused`,
    with the database's message).

    Each try runs in a savepoint; a row-level error (constraint, trigger, data
    exception) splits the write in halves until the refused row stands alone, so its
    neighbours are written. Any other error is nobody's row's fault and propagates.
    """
    if not results:
        return Written()
    try:
        with conn.transaction():  # a savepoint: the caller's transaction is open
            return write_vectors(conn, slot, results)
    except psycopg.Error as exc:
        if not is_row_fault(exc):
            raise
        if len(results) == 1:
            return Written(refused=[Failed(results[0].row, describe(exc))])
    middle = len(results) // 2
    return write_isolating(conn, slot, results[:middle]).add(
        write_isolating(conn, slot, results[middle:]))


def record_usage(conn: psycopg.Connection, slot: Slot, inputs: int, tokens: int,
                 reused: int = 0) -> None:
    """Add to the usage ledger (spend, spend caps, metrics): rows written with a vector
    the provider billed, the tokens it billed, and the model that billed them (priced as
    that model even after the slot's model changes in place). Rows it billed but we could
    not use count too. `reused`: rows given an identical text's vector, at no cost."""
    if inputs or tokens or reused:
        conn.execute("INSERT INTO pgreembed.usage (slot_id, inputs, tokens, model, reused)"
                     " VALUES (%s, %s, %s, %s, %s)",
                     (slot.id, inputs, tokens, slot.model_key, reused), prepare=PREPARE)


def record_failures(conn: psycopg.Connection, slot: Slot, failures: Sequence[Failed]) -> None:
    """Remember why rows failed, for this text: they are skipped until the text changes
    or `pgreembed failures --retry` clears them."""
    if not failures:
        return
    # Like vectors, never wait on the app's row locks: the failure of a row the app holds
    # now is recorded when it is tried again (invariant 10).
    locked, _ = lock_free_rows(conn, slot, [str(f.row.pk) for f in failures])
    failures = [f for f in failures if str(f.row.pk) in locked]
    if not failures:
        return
    with conn.cursor() as cur:
        cur.executemany(sql.SQL(
            """
            INSERT INTO {state} (pgr_pk, pgr_failed_hash, pgr_failure, pgr_attempts,
                                 pgr_failed_at)
            VALUES (%s, %s, %s, 1, now())
            ON CONFLICT (pgr_pk) DO UPDATE SET
                pgr_failed_hash = excluded.pgr_failed_hash, pgr_failure = excluded.pgr_failure,
                pgr_attempts = {state}.pgr_attempts + 1, pgr_failed_at = now()
            """
        ).format(state=slot.state_table),
            [(f.row.pk, f.row.content_hash, f.reason[:2000]) for f in failures])

