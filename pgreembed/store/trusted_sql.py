"""Operator-written SQL (`text_sql`, `tune --filter`, `[throttle] probe_sql`) in our queries.

psycopg reads every `%` of a query executed with parameters as the start of a
placeholder, and its documented spelling of a literal `%` there is `%%`. Without
parameters it sends the query as it is, so a `%%` would reach Postgres doubled. A
fragment from `trusted_sql` therefore has its `%` doubled, and a query holding one is
always executed with parameters: `NO_PARAMS` (an empty sequence, which still turns on
psycopg's placeholder processing) when it has none of its own. psycopg still sends such a
query over the simple protocol, so a `probe_sql` of several statements keeps working.
A query holding one and executed without parameters runs without an error but on other
SQL (`format('%%s', x)` is the text '%s'): tests/test_percent_sql.py records any.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

NO_PARAMS: Final[tuple[()]] = ()


def trusted_sql(fragment: str) -> sql.SQL:
    """`fragment` (trusted: written by the operator, reviewed like code) as a query part
    that reaches Postgres unchanged through psycopg's placeholder processing."""
    return sql.SQL(fragment.replace("%", "%%"))
