"""What counts as "no text": one definition, in SQL and in Python, so that `migrate plan`,
`doctor`, `migrate compare` and the worker agree on every row (a row of tabs included).

Whitespace is the ASCII set POSIX calls [[:space:]]; Python's str.strip() alone would
also strip Unicode spaces, btrim() only the space character.
"""

from __future__ import annotations

from psycopg import sql

WHITESPACE = " \t\n\r\v\f"


def no_text(expr: sql.Composable) -> sql.Composed:
    """SQL true when `expr` (a row's text) is NULL, empty or only whitespace."""
    return sql.SQL("coalesce(({})::text, '') ~ '^[ \\t\\n\\r\\v\\f]*$'").format(expr)


def is_no_text(text: str | None) -> bool:
    """The same test in Python, for texts already read."""
    return text is None or not text.strip(WHITESPACE)
