"""Loaded (as `sitecustomize`) by every process of tests/test_percent_sql.py: records each
statement executed WITHOUT parameters that still holds a `%%`.

A query composed with `trusted_sql` must be executed with parameters: without any,
psycopg sends it unprocessed and Postgres gets `%%` where the operator wrote `%`. That
runs without an error (`format('%%s', x)` is the text '%s'; `LIKE '%%x%%'` matches other
rows), so only a record of what is sent shows it.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import psycopg

LOG = os.environ.get("PGREEMBED_TEST_PERCENT_LOG")
_execute = psycopg.Cursor.execute


def _recording_execute(self: psycopg.Cursor[Any], query: Any, params: Any = None,
                       **options: Any) -> Any:
    if params is None and LOG:
        text = query.as_bytes(self) if hasattr(query, "as_bytes") else query
        if isinstance(text, str):
            text = text.encode()
        if b"%%" in text:
            with open(LOG, "a") as log:
                log.write(f"{text[:400]!r}\n{''.join(traceback.format_stack(limit=6))}\n")
    return _execute(self, query, params, **options)


psycopg.Cursor.execute = _recording_execute  # type: ignore[method-assign]
