"""Whose fault is a failed write: one row's, or the database's (invariant 8)?

- A row's: the app's table refuses that row's new value (a CHECK or other
  constraint, a trigger that raises, a data exception). The write is split until
  the row stands alone, and the row is recorded failed with the database's message.
- The database's: disk full, read-only, connection lost, shutdown, too many
  connections, deadlock, lock or statement timeout. No row is at fault; the write
  is paused and retried, and the vectors already bought are kept.
Anything else (say, a column dropped by hand) is not a row's fault either: the
vectors are kept and the batch is retried later, no row is marked failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from pgreembed.observability.redact import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATE classes raised for one row's values: data exception, integrity constraint
# violation, triggered data change violation, WITH CHECK OPTION violation, PL/pgSQL
# RAISE (P0001 is a trigger's plain `RAISE EXCEPTION`).
ROW_CLASSES = ("22", "23", "27", "44", "P0")
# Raised whatever the rows: connection exception, read-only transaction, transaction
# rollback (deadlock, serialization), insufficient resources (disk full 53100, out of
# memory, too many connections), lock not available, operator intervention (shutdown,
# statement timeout), system error (I/O).
DATABASE_CLASSES = ("08", "40", "53", "57", "58")
DATABASE_CODES = ("25006", "55P03")


# A statement this session prepared is not there (26000), or its name is another
# statement's (42P05): the session is not one server connection, as behind a pooler in
# transaction mode that does not carry prepared statements. The config's fault.
PREPARED_STATEMENT_CODES = ("26000", "42P05")
PREPARED_STATEMENTS_HINT = (
    "the database session lost a prepared statement: a connection pooler in transaction"
    " mode (PgBouncer without max_prepared_statements, Supavisor) sits between the"
    " workers and Postgres. Set `prepared_statements = false` under [worker] in the"
    " config, or connect the workers to Postgres directly or in session mode")


# A grant revoked while running (42501): the role's fault, never a row's.
LOST_RIGHT_HINT = ("pgreembed's role lost a right it needs; `pgreembed doctor` names the"
                   " grant; no row is marked failed, the work is retried")


def is_lost_right(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.InsufficientPrivilege)


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def is_row_fault(exc: BaseException) -> bool:
    """The database refused the rows' values (one of them may be alone at fault)."""
    code = sqlstate(exc)
    return isinstance(exc, psycopg.Error) and code is not None and code[:2] in ROW_CLASSES


def is_database_fault(exc: BaseException) -> bool:
    """The database cannot take any write now: worth pausing and retrying."""
    if not isinstance(exc, psycopg.Error):
        return False
    code = sqlstate(exc)
    if code is None:  # no answer from the server: connection lost, pool timed out
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return code[:2] in DATABASE_CLASSES or code in DATABASE_CODES


def is_prepared_statement_fault(exc: BaseException) -> bool:
    """A prepared statement went missing from the session (see PREPARED_STATEMENT_CODES)."""
    return isinstance(exc, psycopg.Error) and sqlstate(exc) in PREPARED_STATEMENT_CODES


def describe(exc: BaseException) -> str:
    """The database's message for a row's record: primary message and SQLSTATE only.

    Not DETAIL: for a constraint it is "Failing row contains (...)", the whole row
    with its text and vector."""
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None else None) or str(exc)
    code = sqlstate(exc)
    return redact(f"database rejected the write: {message}"
                  + (f" (SQLSTATE {code})" if code else ""))


def retry_database_faults(attempt: Callable[[], T], seconds: float, what: str) -> T:
    """`attempt()`, run again after database-wide faults for up to `seconds`
    (jittered back-off, 0.2 s doubling to 5 s); other errors propagate at once."""

    def announce(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: the database cannot take the write (%s: %s); retry %d in %.1fs,"
                    " vectors kept", what, type(exc).__name__,
                    redact(str(exc)).strip().splitlines()[0] if exc else "?",
                    state.attempt_number, delay)

    retrying = Retrying(retry=retry_if_exception(is_database_fault),
                        wait=wait_exponential_jitter(initial=0.2, max=5.0),
                        stop=stop_after_delay(seconds), reraise=True, before_sleep=announce)
    return retrying(attempt)
