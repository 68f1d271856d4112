"""The SQL `migrate plan` prints: what `start`, `index` and `swap` will run.

People paste it into psql, so every statement is composed with psycopg.sql and
rendered with the connection's quoting: a table named `x; drop table y;--` stays
a name. Names that only `start` assigns (the model's id in the new column's name,
the slot's id in index names) are shown as `<id>` / `<slot>` inside the quoted
identifier, so even those lines are valid SQL that cannot run anything else.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgreembed.store.slots import Slot
from pgreembed.store.table_lock import DEFAULT_LOCK_TIMEOUT_MS


def migration_statements(conn: psycopg.Connection, live: Slot, column: str, column_type: str,
                         index_method: str, opclass: str, live_indexes: list[str],
                         swap_column: str) -> list[str]:
    """One line per step: add the column, (fill), its pending index and ANN index, swap."""
    table = live.table
    new = sql.Identifier(column)
    slot_id = "<slot>"
    schema = live.target.schema
    rename = sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {};")
    swap: list[sql.Composable] = [
        sql.SQL("BEGIN; SET LOCAL lock_timeout = {};"
                " LOCK TABLE {} IN ACCESS EXCLUSIVE MODE;").format(
                    sql.Literal(f"{DEFAULT_LOCK_TIMEOUT_MS}ms"), table),
        rename.format(table, live.vector, sql.Identifier(swap_column)),
        rename.format(table, new, live.vector),
        rename.format(table, sql.Identifier(swap_column), new)]
    if len(live_indexes) == 1:  # the swap moves the app's index name onto the new column
        index_rename = sql.SQL("ALTER INDEX {} RENAME TO {};")
        ann = f"pgreembed_ann_{slot_id}"
        swap += [index_rename.format(sql.Identifier(schema, live_indexes[0]),
                                     sql.Identifier(swap_column)),
                 index_rename.format(sql.Identifier(schema, ann),
                                     sql.Identifier(live_indexes[0])),
                 index_rename.format(sql.Identifier(schema, swap_column), sql.Identifier(ann))]
    swap.append(sql.SQL("COMMIT; -- swap: exchange the columns' (and indexes') names"))
    statements = [
        sql.SQL("ALTER TABLE {} ADD COLUMN {} {};").format(table, new, sql.SQL(column_type)),
        sql.SQL("-- filling: the scheduler and workers embed every row into the new column"
                " (no index on it yet: its updates can be HOT)"),
        sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} ({}) WHERE {} IS NULL;"
                " -- `migrate index`: the rows still pending, for the swap").format(
            sql.Identifier(f"pgreembed_pending_{slot_id}"), table, live.pk, new),
        sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING {} ({} {});"
                " -- `migrate index`: method and distance of the live column's index").format(
            sql.Identifier(f"pgreembed_ann_{slot_id}"), table, sql.Identifier(index_method),
            new, sql.Identifier(opclass)),
        sql.SQL(" ").join(swap),
    ]
    return [statement.as_string(conn) for statement in statements]
