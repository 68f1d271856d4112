"""What Postgres's catalog says about the app's table: column types, its primary key, its
indexes. One place reads pg_attribute / pg_index / pg_class / pg_am, so `init`, `doctor`,
`migrate` and `tune` agree on what a column's type is and which index is valid.

A relation is passed as regclass text: a quoted name (`regclass(conn, identifier)`) or
an OID as a string, which `::regclass` accepts alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql


def regclass(conn: psycopg.Connection, table: sql.Identifier) -> str:
    """`table` as regclass input, quoted with the connection's rules."""
    return table.as_string(conn)


@dataclass(frozen=True)
class CatalogColumn:
    """A column of a table: its number, its type's name and modifier, and the type as SQL
    spells it (`format_type`, e.g. `vector(384)`)."""

    attnum: int
    type_name: str
    typmod: int
    formatted: str


def column(conn: psycopg.Connection, relation: str, name: str) -> CatalogColumn | None:
    """The live (not dropped, not system) column `name` of `relation`, or None."""
    row = conn.execute(
        "SELECT a.attnum, t.typname, a.atttypmod, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = %s::regclass AND a.attname = %s AND a.attnum > 0"
        " AND NOT a.attisdropped", (relation, name)).fetchone()
    return None if row is None else CatalogColumn(int(row[0]), str(row[1]), int(row[2]),
                                                  str(row[3]))


def identifies_rows(conn: psycopg.Connection, relation: str, name: str) -> bool:
    """Column `name` alone identifies a row: NOT NULL, and a valid, non-partial unique
    index (or constraint) on it alone."""
    row = conn.execute(
        """
        SELECT a.attnotnull AND EXISTS (
            SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique
              AND i.indisvalid AND i.indpred IS NULL AND i.indnkeyatts = 1
              AND i.indkey[0] = a.attnum)
        FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attname = %s
        """, (relation, name)).fetchone()
    return bool(row and row[0])


def primary_key(conn: psycopg.Connection, relation: str) -> list[tuple[str, str]]:
    """(column, formatted type) of each column of the table's primary key, in the key's
    order (empty: none)."""
    return [(str(r[0]), str(r[1])) for r in conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
        JOIN pg_attribute a ON a.attnum = k.attnum
        WHERE a.attrelid = i.indrelid AND i.indrelid = %s::regclass AND i.indisprimary
        ORDER BY k.position
        """, (relation,))]


@dataclass(frozen=True)
class CatalogIndex:
    """An index of a table as the catalog has it."""

    name: str
    method: str  # pg_am.amname: btree, hnsw, ivfflat, ...
    valid: bool  # indisvalid AND indisready: usable by queries and kept up to date
    columns: list[str | None]  # key columns by position; None for an expression
    opclasses: list[str]  # operator class of each key column, by position
    options: dict[str, str] = field(default_factory=dict)  # reloptions: m, lists, ...
    uses: frozenset[str] = frozenset()  # every column it depends on (keys, expressions,
    #                                     predicate), from pg_depend
    building: bool = False  # a CREATE INDEX (CONCURRENTLY) on the table is in progress

    def opclass_of(self, column_name: str) -> str | None:
        """The operator class the index uses for key column `column_name`, if a key."""
        for position, name in enumerate(self.columns):
            if name == column_name and position < len(self.opclasses):
                return self.opclasses[position]
        return None


def indexes(conn: psycopg.Connection, relation: str) -> list[CatalogIndex]:
    """Every index of `relation`, by name."""
    rows = conn.execute(
        """
        SELECT c.relname, am.amname, i.indisvalid AND i.indisready,
               ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, p)
                     LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                     ORDER BY k.p),
               ARRAY(SELECT o.opcname FROM unnest(i.indclass::oid[]) WITH ORDINALITY k(o, p)
                     JOIN pg_opclass o ON o.oid = k.o ORDER BY k.p),
               coalesce(c.reloptions, '{}'),
               ARRAY(SELECT a.attname FROM pg_depend d
                     JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                     WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                       AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid),
               EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                       WHERE p.relid = i.indrelid AND p.index_relid IN (0, i.indexrelid))
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        WHERE i.indrelid = %s::regclass
        ORDER BY c.relname
        """, (relation,)).fetchall()
    return [CatalogIndex(str(name), str(method), bool(valid), list(keys), list(opclasses),
                         dict(str(o).split("=", 1) for o in options), frozenset(uses),
                         bool(building))
            for name, method, valid, keys, opclasses, options, uses, building in rows]


def index_valid(conn: psycopg.Connection, schema: str, name: str) -> bool | None:
    """Whether index `schema.name` is valid (indisvalid); None if there is no such index."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name)).fetchone()
    return None if row is None else bool(row[0])


def estimated_rows(conn: psycopg.Connection, relation: str) -> int | None:
    """Table `relation`'s live row count from Postgres's statistics: the cumulative stats
    counter (`n_live_tup`, which follows inserts and deletes within a second), else the
    estimate of the last ANALYZE or vacuum (after a crash reset the counters); None if
    neither exists yet. Not pages times rows per page: the embedding UPDATEs leave dead
    tuples behind that would count as rows until a vacuum."""
    row = conn.execute(
        """
        SELECT CASE WHEN pg_stat_get_live_tuples(oid) > 0 THEN pg_stat_get_live_tuples(oid)
                    WHEN reltuples >= 0 THEN reltuples END
        FROM pg_class WHERE oid = %s::regclass
        """, (relation,)).fetchone()
    return None if row is None or row[0] is None else round(row[0])


def row_estimate(conn: psycopg.Connection, relation: str) -> float:
    """The planner's row count of table `relation` (a name): pg_class.reltuples, -1 if
    never analysed or if there is no such table."""
    row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
                       (relation,)).fetchone()
    return float(row[0]) if row else -1.0


def fillfactor(conn: psycopg.Connection, relation: str) -> int:
    """The table's fillfactor storage parameter (100, Postgres's default, when unset)."""
    row = conn.execute(
        "SELECT (SELECT split_part(o, '=', 2)::int FROM unnest(c.reloptions) o"
        " WHERE o LIKE 'fillfactor=%%') FROM pg_class c WHERE c.oid = %s::regclass",
        (relation,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 100
