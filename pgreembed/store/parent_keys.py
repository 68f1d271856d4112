"""A chunked target's parent key: one column or several (pgai allows composite keys).

Every statement that ties a chunk, a dirty mark or a gone mark to its parent spells the
key through this one type, so a single-column key keeps its SQL exactly as before (the
dirty and gone tables' `pgr_pk`, `= ANY(%s::type[])`, the triggers' text) and a composite
key gets one column per key column everywhere:

- the chunk table carries every key column (same names and types, pgai's layout);
- the dirty and gone tables name theirs `pgr_pk_<column>` (a single-column key keeps
  `pgr_pk`, so existing deployments keep working);
- a key value in Python is the column's value for a single-column key (no change for
  current users of `search_parents`) and a tuple in the key's order for a composite one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

MARK = "pgr_pk"


@dataclass(frozen=True)
class ParentKey:
    """The parent's key columns and their formatted types, in the primary key's order."""

    columns: tuple[str, ...]
    types: tuple[str, ...]

    @property
    def composite(self) -> bool:
        return len(self.columns) > 1

    @property
    def marks(self) -> tuple[str, ...]:
        """The dirty and gone tables' key columns."""
        if not self.composite:
            return (MARK,)
        return tuple(f"{MARK}_{c}" for c in self.columns)

    @property
    def name(self) -> str:
        """The key as a word for messages and fingerprints (`a` or `a,b`)."""
        return ",".join(self.columns)

    # -- SQL -----------------------------------------------------------------------

    def cols(self, alias: str | None = None, *, marks: bool = False) -> sql.Composable:
        """`a.k1, a.k2` (or the mark columns)."""
        names = self.marks if marks else self.columns
        return sql.SQL(", ").join(
            sql.Identifier(alias, n) if alias else sql.Identifier(n) for n in names)

    def row(self, alias: str | None = None, *, marks: bool = False) -> sql.Composable:
        """`a.k` for one column, `(a.k1, a.k2)` for several (comparable as a row)."""
        columns = self.cols(alias, marks=marks)
        return sql.SQL("({})").format(columns) if self.composite else columns

    def equal(self, left: str, right: str, *, left_marks: bool = False,
              right_marks: bool = False) -> sql.Composable:
        """`l.k1 = r.k1 AND l.k2 = r.k2` (either side may be the mark columns)."""
        lefts = self.marks if left_marks else self.columns
        rights = self.marks if right_marks else self.columns
        return sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(left, a), sql.Identifier(right, b))
            for a, b in zip(lefts, rights, strict=True))

    def among(self, alias: str | None = None, *, marks: bool = False) -> sql.Composable:
        """The key is one of the keys passed as `params(keys)`: `k = ANY(%s::t[])` for
        one column, `(k1, k2) IN (SELECT * FROM unnest(%s::t1[], %s::t2[]))` for several."""
        if not self.composite:
            return sql.SQL("{} = ANY({})").format(self.cols(alias, marks=marks), self.arrays())
        return sql.SQL("{} IN (SELECT * FROM unnest({}))").format(
            self.row(alias, marks=marks), self.arrays())

    def arrays(self) -> sql.Composable:
        """`%s::t1[], %s::t2[]`: one array parameter per key column (for unnest)."""
        return sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in self.types)

    # -- keys as text (the take-over's registry and pgai's failures) -----------------
    # One key, one text: the value's own text for a single column (as before), a JSON
    # array of the values for several (`["t1", 1]`), read back column by column.

    def text(self, alias: str | None = None, *, marks: bool = False) -> sql.Composable:
        """The key as text: `a.k::text`, or `jsonb_build_array(a.k1, a.k2)::text`."""
        columns = self.cols(alias, marks=marks)
        if not self.composite:
            return sql.SQL("{}::text").format(columns)
        return sql.SQL("jsonb_build_array({})::text").format(columns)

    def from_text(self, text: sql.Composable) -> sql.Composable:
        """The key columns' values of a key in its text form (`text`: an SQL expression)."""
        if not self.composite:
            return sql.SQL("({})::{}").format(text, sql.SQL(self.types[0]))
        return sql.SQL(", ").join(
            sql.SQL("(({})::jsonb ->> {})::{}").format(text, sql.Literal(i), sql.SQL(t))
            for i, t in enumerate(self.types))

    def among_texts(self, alias: str | None = None, *, marks: bool = False
                    ) -> sql.Composable:
        """The key is one of the keys passed in text form as one `%s::text[]`."""
        if not self.composite:
            return sql.SQL("{} = ANY(%s::text[]::{}[])").format(
                self.cols(alias, marks=marks), sql.SQL(self.types[0]))
        return sql.SQL("{} IN (SELECT {} FROM unnest(%s::text[]) AS pgr_t(k))").format(
            self.row(alias, marks=marks), self.from_text(sql.SQL("pgr_t.k")))

    # -- values --------------------------------------------------------------------

    def value(self, row: Sequence[Any]) -> Any:
        """A key read as the key columns `row` (a scalar for a single-column key)."""
        return tuple(row) if self.composite else row[0]

    def parts(self, key: Any) -> tuple[Any, ...]:
        return tuple(key) if self.composite else (key,)

    def params(self, keys: Sequence[Any]) -> list[list[Any]]:
        """One list per key column, for `among` and `arrays`."""
        return [list(c) for c in zip(*(self.parts(k) for k in keys), strict=True)] if keys \
            else [[] for _ in self.columns]
