"""A slot is one vector column being kept filled: the unit the data path works on.

A target has one live slot; a migration adds a second one (the new column).
Each slot has a registry row (`pgreembed.slots`), a model (`pgreembed.models`)
and a narrow state table `pgreembed.slot_<id>` with, per row of the app's
table, the model and the content hash of the text its vector came from, and
the recorded failure if the row could not be embedded. Every SQL fragment the
data path needs is composed here, with identifiers quoted by psycopg.sql.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import VECTOR_MAX_INDEXED, Target, default_vector_type
from pgreembed.config.model_keys import is_foreign
from pgreembed.errors import NotFoundError, NotInitializedError, SetupError
from pgreembed.store import catalog
from pgreembed.store.pool import PREPARE
from pgreembed.store.trusted_sql import trusted_sql

SCHEMA = "pgreembed"
NOTIFY_CHANNEL = "pgreembed"


@dataclass(frozen=True)
class Slot:
    """Everything the scheduler and workers need to know about one vector column."""

    id: int
    target: Target
    vector_column: str
    role: str
    model_id: int
    model_key: str
    provider: str
    model: str
    dimensions: int
    primary_key: str
    pk_type: str
    paused: bool = False
    mode: str = "queue"  # or "batch": filled through the Batch API, not the queue
    # Why the provider cannot fill it as configured (every input rejected, wrong
    # dimensions): nothing is dispatched until `pgreembed init` clears it.
    misconfigured: str | None = None
    # The column's storage, as the registry records it: "vector" or "halfvec" (a
    # `migrate --derive halfvec` column holds a model `vector` held before).
    vector_type: str = "vector"

    def holds_vectors_of(self, made_by: Slot) -> bool:
        """Whether vectors made for `made_by` (the slot as read when they were bought or
        copied) belong in this slot's column now: the same registered model (key,
        dimensions) and storage type. `init` changes a live slot's model in place, so the
        same slot id may stand for another model by the time they are written."""
        return (self.id, self.model_id, self.model_key, self.dimensions, self.vector_type) == (
            made_by.id, made_by.model_id, made_by.model_key, made_by.dimensions,
            made_by.vector_type)

    @property
    def frozen(self) -> bool:
        """Marked misconfigured because its provider is not in pgreembed (adopted from
        pgai): served and counted, never embedded with, as meant (not an error)."""
        return self.misconfigured is not None and is_foreign(self.provider)

    # -- identifiers ---------------------------------------------------------------

    @property
    def table(self) -> sql.Identifier:
        return app_table(self.target)

    @property
    def pk(self) -> sql.Identifier:
        return sql.Identifier(self.primary_key)

    @property
    def vector(self) -> sql.Identifier:
        return sql.Identifier(self.vector_column)

    @property
    def state_table(self) -> sql.Identifier:
        return sql.Identifier(SCHEMA, f"slot_{self.id}")

    @property
    def pending_index_name(self) -> str:
        return f"pgreembed_pending_{self.id}"

    @property
    def column_type(self) -> str:
        """The column's SQL type, e.g. `halfvec(3072)`."""
        return f"{self.vector_type}({self.dimensions})"

    @property
    def pk_cast(self) -> sql.Composable:
        """Cast text (how pks travel through Redis) back to the key's own type."""
        return sql.SQL(self.pk_type)

    # -- expressions ---------------------------------------------------------------

    @property
    def text_expr(self) -> sql.Composable:
        """The text to embed, as SQL over the app table's columns (unqualified)."""
        return text_expression(self.target)

    @property
    def hash_expr(self) -> sql.Composable:
        """md5 of the text as uuid: what the no-stale-write guard compares."""
        return sql.SQL("md5(coalesce(({})::text, ''))::uuid").format(self.text_expr)

    # -- the state-table join ------------------------------------------------------
    # An app row and its state row are tied by one equation, and every query spells the
    # join and the "failed on this text" test through these: one definition each.

    def state_key(self, row: str = "a", state: str = "s") -> sql.Composed:
        """`s.pgr_pk = a.<pk>`: the condition tying state row `state` to app row `row`."""
        return sql.SQL("{}.pgr_pk = {}.{}").format(
            sql.Identifier(state), sql.Identifier(row), self.pk)

    def state_join(self, row: str = "a", state: str = "s", *, outer: bool = False,
                   keys: sql.Composable | None = None,
                   after: sql.Composable | None = None) -> sql.Composed:
        """`[LEFT] JOIN <state table> s ON s.pgr_pk = a.<pk>`; outer keeps the rows that
        have no state row yet (never embedded nor failed). `keys`: an array expression
        of the keys the query reads (`a.<pk> = ANY(keys)` in its WHERE), named to the
        state side too; the planner does not carry `= ANY` across the join's equation,
        so without it a batch's 512 rows were joined by scanning the whole state table
        (measured at 100k rows: most of the batch read's Postgres CPU, growing with the
        table). `after`: the same for a keyset page's cursor (`a.<pk> > after` in its
        WHERE): without it the planner's merge join read every state row before the
        cursor, on every page of a sweep."""
        condition = self.state_key(row, state)
        if keys is not None:
            condition = sql.SQL("{} AND {}.pgr_pk = ANY({})").format(
                condition, sql.Identifier(state), keys)
        if after is not None:
            condition = sql.SQL("{} AND {}.pgr_pk > {}").format(
                condition, sql.Identifier(state), after)
        return sql.SQL("{} {} {} ON {}").format(
            sql.SQL("LEFT JOIN" if outer else "JOIN"), self.state_table,
            sql.Identifier(state), condition)

    def rows_with_state(self, row: str = "a", state: str = "s", *, outer: bool = False,
                        keys: sql.Composable | None = None,
                        after: sql.Composable | None = None) -> sql.Composed:
        """`<app table> a [LEFT] JOIN <state table> s ON ...`: starting from the app's
        table, so the state row of a deleted row never counts (see store.orphans).
        `keys`, `after`: see `state_join`."""
        return sql.SQL("{} {} {}").format(self.table, sql.Identifier(row), self.state_join(
            row, state, outer=outer, keys=keys, after=after))

    @staticmethod
    def failed_on(text_hash: sql.Composable, state: str = "s") -> sql.Composed:
        """The row's recorded failure is on the text hashing to `text_hash`. Never NULL
        (for a non-NULL hash), so `NOT` of it is "not failed on this text"."""
        return sql.SQL("({s}.pgr_failed_hash IS NOT NULL AND {s}.pgr_failed_hash = {h})"
                       ).format(s=sql.Identifier(state), h=text_hash)

    def failed(self, state: str = "s") -> sql.Composed:
        """The row failed on its current text (a row edited since is pending again): what
        `status`, `failures` and the swap count as failed."""
        return self.failed_on(self.hash_expr, state)

    def unlocked_rows(self, relation: str, key: str) -> sql.Composed:
        """The app's rows whose key is `relation.key` (a CTE of the same query), as column
        `key`, locked in key order and skipping those another transaction holds: a
        background pass never waits on the app's row locks (`UPDATE ... FROM` alone locks
        in join order, and deadlocked with app transactions; invariant 10)."""
        return sql.SQL("SELECT a.{pk} AS {key} FROM {table} a JOIN {rel} ON a.{pk} = {rel}.{key}"
                       " ORDER BY a.{pk} FOR NO KEY UPDATE OF a SKIP LOCKED").format(
            pk=self.pk, key=sql.Identifier(key), table=self.table,
            rel=sql.Identifier(relation))

    def pending(self, row: str = "a", state: str = "s") -> sql.Composed:
        """A row without a vector that did not fail on its current text: what the scheduler
        sends (over `rows_with_state(outer=True)`; a failure on an older text is retried)."""
        return sql.SQL("{}.{} IS NULL AND NOT {}").format(
            sql.Identifier(row), self.vector, self.failed(state))


def app_table(target: Target) -> sql.Identifier:
    """The app's table of `target`, schema-qualified and quoted: how every query names it."""
    return sql.Identifier(target.schema, target.table)


def vector_type_for(dimensions: int) -> str:
    """The type a new column of `dimensions` gets unless told otherwise."""
    return default_vector_type(dimensions)


def new_column_type(target: Target, live: Slot, dimensions: int) -> str:
    """The type of a migration's new column when `migrate start` is not told one: the
    config's `vector_type`; else `halfvec` when the live column is (a team that chose half
    the bytes keeps them across models: the new column defaulted to `vector` until
    2026-12-07, doubling its size; a halfvec column over 2000 dims was not chosen, it had
    to be); else by dimensions. Never `vector` above the 2000 dims pgvector indexes it
    up to."""
    chosen = live.vector_type == "halfvec" and live.dimensions <= VECTOR_MAX_INDEXED
    asked = target.vector_type or ("halfvec" if chosen else None)
    by_dimensions = vector_type_for(dimensions)  # halfvec where `vector` cannot be indexed
    return by_dimensions if asked is None or by_dimensions != "vector" else asked


def text_expression(target: Target) -> sql.Composable:
    if target.text_sql:
        return trusted_sql(target.text_sql)  # queries holding it pass params: see trusted_sql
    if len(target.text_columns) == 1:
        return sql.Identifier(target.text_columns[0])
    return sql.SQL("concat_ws(E'\\n', {})").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in target.text_columns)
    )


def primary_key_of(conn: psycopg.Connection, target: Target) -> tuple[str, str]:
    """(column, type) of the table's single-column primary key, or the configured one."""
    relation = catalog.regclass(conn, app_table(target))
    if target.primary_key:
        found = catalog.column(conn, relation, target.primary_key)
        if found is None:
            raise SetupError(
                f"target {target.name!r}: primary_key {target.primary_key!r} is not a column"
                f" of {target.schema}.{target.table}"
            )
        if not catalog.identifies_rows(conn, relation, target.primary_key):
            # Rows sharing a key would get each other's vectors (or chunks), and a row
            # without one none, with nothing reported.
            raise SetupError(
                f"target {target.name!r}: primary_key {target.primary_key!r} of"
                f" {target.schema}.{target.table} must identify each row: NOT NULL and a"
                " unique index on it alone (or leave primary_key out to use the table's"
                " primary key)")
        return target.primary_key, found.formatted
    rows = catalog.primary_key(conn, relation)
    if len(rows) != 1:
        raise SetupError(
            f"target {target.name!r}: {target.schema}.{target.table} needs a single-column"
            " primary key (or set primary_key to a unique, non-null column)"
        )
    return rows[0][0], rows[0][1]


def load_slots(conn: psycopg.Connection, target: Target, *, include_paused: bool = True
               ) -> list[Slot]:
    """The target's columns being kept filled (live first): the live one, and during a
    migration the new one ('next') or, after a swap, the previous one ('old', kept
    current so a rollback is instant). Empty until `pgreembed init`."""
    rows = conn.execute(
        """
        SELECT s.id, s.vector_column, s.role, s.model_id, m.key, m.provider, m.name,
               m.dimensions, s.primary_key, s.pk_type, s.paused, s.mode, s.misconfigured,
               s.vector_type, s.table_name
        FROM pgreembed.slots s JOIN pgreembed.models m ON m.id = s.model_id
        WHERE s.target = %s AND s.role IN ('live', 'next', 'old')
          AND (%s OR NOT s.paused)
        ORDER BY s.role = 'live' DESC, s.id
        """,
        (target.name, include_paused), prepare=PREPARE,  # each batch reads it twice
    ).fetchall()
    # A re-chunk migration's new chunk set is another table (migrations.rechunk): its
    # slot works on that table, whatever the configured one.
    return [
        Slot(id=r[0], target=target if r[14] == target.table
             else dataclasses.replace(target, table=r[14]),
             vector_column=r[1], role=r[2], model_id=r[3],
             model_key=r[4], provider=r[5], model=r[6], dimensions=r[7], primary_key=r[8],
             pk_type=r[9], paused=r[10], mode=r[11], misconfigured=r[12],
             vector_type=r[13])
        for r in rows
    ]


def load_slot(conn: psycopg.Connection, target: Target, slot_id: int) -> Slot:
    for slot in load_slots(conn, target):
        if slot.id == slot_id:
            return slot
    raise NotFoundError(f"target {target.name!r}: slot {slot_id} is not active")


def mark_misconfigured(conn: psycopg.Connection, slot: Slot, reason: str) -> None:
    """Stop dispatching for `slot`: its requests fail whatever the rows (see embedding)."""
    conn.execute("UPDATE pgreembed.slots SET misconfigured = %s, misconfigured_at = now()"
                 " WHERE id = %s", (reason[:2000], slot.id))


def clear_misconfigured(conn: psycopg.Connection, target: Target) -> int:
    """Let the target's slots be dispatched again (the operator fixed the config)."""
    return conn.execute("UPDATE pgreembed.slots SET misconfigured = NULL,"
                        " misconfigured_at = NULL WHERE target = %s"
                        " AND misconfigured IS NOT NULL", (target.name,)).rowcount


def slots_created_at(conn: psycopg.Connection) -> dict[int, float]:
    """When each slot was created (epoch seconds): the oldest a pending row can be."""
    return dict(conn.execute(
        "SELECT id, extract(epoch FROM created_at)::float8 FROM pgreembed.slots").fetchall())


def registry_exists(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('pgreembed.slots') IS NOT NULL").fetchone() == (True,)


def require_initialized(conn: psycopg.Connection, targets: Iterable[Target]) -> None:
    """Raise NotInitializedError naming every target without a live slot.

    Commands that read the bookkeeping would otherwise fail with Postgres's raw
    "relation pgreembed.slots does not exist", or silently skip a new target.
    """
    names = [t.name for t in targets]
    if registry_exists(conn):
        ready = {r[0] for r in conn.execute(
            "SELECT target FROM pgreembed.slots WHERE role = 'live' AND target = ANY(%s)",
            (names,)).fetchall()}
        names = [n for n in names if n not in ready]
    if names:
        raise NotInitializedError(f"target(s) {', '.join(names)} not initialised:"
                                  " run `pgreembed init` first")
