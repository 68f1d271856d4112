"""Derived migrations: a new column made from the live vectors in SQL, no provider call.

`migrate start --derive dimensions:D` keeps the first D components of each live vector
and L2-normalises them: for models trained to be shortened (text-embedding-3-*, and the
test server's fake-* models) that is exactly the vector the API returns with
`dimensions=D`, so the registry records the provider's own model at D dimensions and
rows written later are embedded by the provider at D, like any row.

`migrate start --derive halfvec` casts each live vector to `halfvec(N)` (2 bytes a
component instead of 4; pgvector indexes halfvec up to 4000 dims): the same model, so
the registry records the same model key, and the slot's `vector_type` says halfvec
(the migration's `derived` column: `halfvec of <model key>`). Rows written later are
embedded by the provider and stored as halfvec.

The new column goes through the usual side column / index / swap / rollback. Its slot is
registered in "derive" mode, which the scheduler skips; the fill walks the table by
primary key in chunks, each its own short transaction under a short lock_timeout (the
app keeps writing), and derives only rows whose live vector is the live model's vector
for the row's current text (its state row's hash). Rows edited meanwhile are derived
from their fresh live vector by a later pass; what is left when a pass derives nothing
(rows without a live vector yet) goes back to the scheduler ("queue" mode) and is
embedded by the provider at D.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.config.model_keys import is_shortenable
from pgreembed.errors import MigrationError
from pgreembed.migrations.state import open_migration
from pgreembed.store import server_versions
from pgreembed.store.pool import connect
from pgreembed.store.rows import lock_slot
from pgreembed.store.slots import Slot, app_table, load_slots, vector_type_for
from pgreembed.store.table_lock import LockPolicy, run_locked

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000
MAX_PASSES = 5  # then the few rows edited meanwhile go to the provider


@dataclass(frozen=True)
class FillReport:
    derived: int
    passes: int
    left_to_provider: int


@dataclass(frozen=True)
class Derivation:
    """What `--derive` asked for: 'dimensions' (shortened to `dimensions`) or 'halfvec'."""

    kind: str
    spec: str
    dimensions: int | None = None


def parse(spec: str) -> Derivation:
    """`dimensions:D` or `halfvec`; anything else is refused with the reason."""
    kind, _, value = spec.partition(":")
    if spec == "halfvec":
        return Derivation("halfvec", spec)
    if kind == "binary":
        raise MigrationError(f"--derive {spec!r}: binary (bit) columns are not implemented;"
                             " supported: dimensions:D, halfvec")
    if kind != "dimensions":
        raise MigrationError(f"--derive {spec!r}: supported are dimensions:D and halfvec")
    if not value.isdigit() or int(value) <= 0:
        raise MigrationError(f"--derive {spec!r}: D must be a positive integer")
    return Derivation("dimensions", spec, int(value))


def new_column(live: Slot, derivation: Derivation) -> tuple[int, str]:
    """(dimensions, vector type) of the derived column; refuses what cannot be derived."""
    if derivation.kind == "halfvec":
        if live.vector_type == "halfvec":
            raise MigrationError(f"--derive halfvec: the live column is already"
                                 f" {live.column_type}")
        return live.dimensions, "halfvec"
    assert derivation.dimensions is not None
    check_shortenable(live, derivation.dimensions)
    return derivation.dimensions, vector_type_for(derivation.dimensions)


def check_shortenable(live: Slot, dimensions: int) -> None:
    """Refuse what the provider would not return: a model not trained to be shortened."""
    if live.provider != "openai" or not is_shortenable(live.model):
        raise MigrationError(
            f"--derive dimensions:{dimensions}: {live.model_key} is not known to support"
            " shortening (only text-embedding-3-* models are trained so that the first D"
            " components, renormalised, are the model's D-dimension vector); re-embed"
            " instead: migrate start --model ... --dimensions ...")
    if dimensions >= live.dimensions:
        raise MigrationError(f"--derive dimensions:{dimensions}: must be below the live"
                             f" column's {live.dimensions} dimensions")


def derives_from(new: Slot, live: Slot) -> bool:
    """Whether what `_chunk` makes from `live`'s vectors is `new`'s model's vector: the same
    provider and model, at the same size (halfvec) or shortened (a model trained for it).
    Read under the chunk's lock: a model changed in place must not be derived from
    (invariant 7)."""
    if (new.provider, new.model) != (live.provider, live.model):
        return False
    if new.dimensions == live.dimensions:
        return True
    return new.dimensions < live.dimensions and is_shortenable(live.model)


def live_slot(settings: Settings, target: Target) -> Slot:
    with connect(settings.database_url) as conn:
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
    if live is None:
        raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
    return live


def start(settings: Settings, target: Target, spec: str, policy: LockPolicy | None = None,
          progress: Callable[[int], None] | None = None) -> tuple[Slot, FillReport]:
    """Add the derived column (or find it, when re-run) and fill it; no provider call."""
    from pgreembed.migrations import lifecycle

    live = live_slot(settings, target)
    derivation = parse(spec)
    dimensions, kind = new_column(live, derivation)
    with connect(settings.database_url) as conn:  # refused before anything changes
        server_versions.require(conn, server_versions.HALFVEC if derivation.kind == "halfvec"
                                else server_versions.DERIVE_DIMENSIONS, MigrationError)
    slot = lifecycle.start(settings, target, live.provider, live.model, dimensions,
                           policy=policy, derive=spec, vector_type=kind)
    return slot, fill(settings, target, slot.id, policy, progress=progress)


def fill(settings: Settings, target: Target, slot_id: int, policy: LockPolicy | None = None,
         chunk_rows: int = CHUNK_ROWS, progress: Callable[[int], None] | None = None
         ) -> FillReport:
    """Derive every row that can be, in chunks; then hand the rest to the scheduler."""
    derived = passes = 0
    while passes < MAX_PASSES:
        passes += 1
        this_pass, after = 0, None
        # A pass ends at the last key it started with: rows the app inserts meanwhile are
        # the next pass's (chasing them, a pass never ended while the app kept inserting).
        upper = _last_key(settings, target)
        while upper is not None:
            done, after = run_locked(settings.database_url, app_table(target), "derive fill",
                                     functools.partial(_chunk, target=target, slot_id=slot_id,
                                                       after=after, upper=upper,
                                                       rows=chunk_rows), policy)
            this_pass += done
            if progress is not None:
                progress(derived + this_pass)
            if after is None:
                break
        derived += this_pass
        if this_pass == 0:
            break
    with connect(settings.database_url) as conn:
        conn.execute("UPDATE pgreembed.slots SET mode = 'queue' WHERE id = %s"
                     " AND mode = 'derive'", (slot_id,))
        slot = next((s for s in load_slots(conn, target) if s.id == slot_id), None)
        left = 0 if slot is None else int(conn.execute(sql.SQL(
            "SELECT count(*) FROM {} WHERE {} IS NULL").format(slot.table, slot.vector)
        ).fetchone()[0])  # type: ignore[index]
        conn.commit()
    log.info("derived %d rows of %s in %d passes; %d left to the provider", derived,
             target.name, passes, left)
    return FillReport(derived, passes, left)


def _last_key(settings: Settings, target: Target) -> str | None:
    """The table's greatest key now (as text, how keys travel), None when it is empty."""
    live = live_slot(settings, target)
    with connect(settings.database_url) as conn:
        # Not max(): it has no uuid version (a chunk table's key). Ordered by the qualified
        # column: a bare name would order by the text output (lexically: '99' > '100').
        row = conn.execute(sql.SQL(
            "SELECT a.{pk}::text FROM {table} a ORDER BY a.{pk} DESC LIMIT 1"
        ).format(pk=live.pk, table=live.table)).fetchone()
    return None if row is None else row[0]


def _chunk(conn: psycopg.Connection, target: Target, slot_id: int, after: Any, upper: str,
           rows: int) -> tuple[int, Any]:
    """One short transaction: derive the next `rows` rows by key; (derived, last key or
    None at the end). Under `lock_slot`, both column names are the slots' until commit."""
    new = lock_slot(conn, target, slot_id, "ROW EXCLUSIVE")
    if new is None:
        raise MigrationError(f"target {target.name!r}: the derived column was dropped")
    live = next(s for s in load_slots(conn, target) if s.role == "live")
    migration = open_migration(conn, target)
    if migration is None or migration.from_slot != live.id:
        raise MigrationError(f"target {target.name!r}: the migration is no longer filling")
    if not derives_from(new, live):
        raise MigrationError(f"target {target.name!r}: column {new.vector_column} holds"
                             f" {new.model_key}, which cannot be derived from the live"
                             f" {live.model_key}; nothing derived")
    cast = sql.SQL("{}({})").format(sql.SQL(new.vector_type), sql.Literal(new.dimensions))
    if new.dimensions == live.dimensions:  # --derive halfvec: the same vector, 2-byte floats
        value = sql.SQL("a.{}::{}").format(live.vector, cast)
    else:  # --derive dimensions:D: what the model returns at D
        value = sql.SQL("l2_normalize(subvector(a.{}, 1, {}))::{}").format(
            live.vector, sql.Literal(new.dimensions), cast)
    found = conn.execute(sql.SQL(
        """
        WITH chunk AS (
            SELECT {pk} AS pk FROM {table}
            WHERE (%(after)s::{pk_type} IS NULL OR {pk} > %(after)s::{pk_type})
              AND {pk} <= %(upper)s::{pk_type}
            ORDER BY {pk} LIMIT %(rows)s
        ), free AS (
            -- Rows the app or a worker is writing now are left to a later pass (or to the
            -- provider): waiting for them under the short lock_timeout would fail the chunk.
            {free}
        ), derived AS (
            UPDATE {table} AS a
            SET {new} = {value}
            FROM free c, {live_state} s
            WHERE a.{pk} = c.pk AND {key} AND s.pgr_model_id = %(live_model)s
              AND s.pgr_hash = {hash} AND a.{live} IS NOT NULL AND a.{new} IS NULL
            RETURNING a.{pk} AS pk, s.pgr_hash AS h, s.pgr_truncated AS t
        ), recorded AS (
            INSERT INTO {new_state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at,
                                     pgr_truncated, pgr_failed_hash, pgr_failure,
                                     pgr_attempts, pgr_failed_at)
            SELECT pk, %(new_model)s, h, now(), t, NULL, NULL, 0, NULL FROM derived
            ON CONFLICT (pgr_pk) DO UPDATE SET
                pgr_model_id = excluded.pgr_model_id, pgr_hash = excluded.pgr_hash,
                pgr_embedded_at = excluded.pgr_embedded_at,
                pgr_truncated = excluded.pgr_truncated, pgr_failed_hash = NULL,
                pgr_failure = NULL, pgr_attempts = 0, pgr_failed_at = NULL
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM recorded),
               (SELECT c.pk::text FROM chunk c ORDER BY c.pk DESC LIMIT 1)
        """).format(free=live.unlocked_rows("chunk", "pk"),
                    pk=live.pk, table=live.table, pk_type=live.pk_cast, new=new.vector,
                    live=live.vector, value=value, live_state=live.state_table,
                    hash=live.hash_expr, new_state=new.state_table, key=live.state_key()),
        {"after": after, "upper": upper, "rows": rows, "live_model": live.model_id,
         "new_model": new.model_id}).fetchone()
    assert found is not None
    return int(found[0]), found[1]


def storage_saved(rows: int, live: Slot, dimensions: int, vector_type: str) -> int:
    """Bytes the new column saves over the live one (vector: 4 bytes a component, halfvec:
    2, plus an 8-byte header); an index over it shrinks about as much."""
    def size(kind: str, dims: int) -> int:
        return (2 if kind == "halfvec" else 4) * dims + 8
    return rows * (size(live.vector_type, live.dimensions) - size(vector_type, dimensions))


def index_bytes(settings: Settings, live: Slot) -> int:
    """Bytes of the live column's indexes (an HNSW index is mostly its vectors' copies)."""
    from pgreembed.migrations.index import column_indexes

    with connect(settings.database_url) as conn:
        names = [i.name for i in column_indexes(conn, live) if i.distance]
        row = conn.execute("SELECT coalesce(sum(pg_relation_size(format('%%I.%%I', %s::text, n)"
                           "::regclass)), 0) FROM unnest(%s::text[]) n",
                           (live.target.schema, names)).fetchone()
    return int(row[0]) if row else 0
