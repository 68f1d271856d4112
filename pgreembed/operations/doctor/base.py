"""What every doctor check stands on: one read-only connection, findings, guarded runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Settings
from pgreembed.operations.doctor.findings import ERROR, WARN, Finding
from pgreembed.redact import redact

# Connections the scheduler holds: the leader lock, the dispatch pass, LISTEN.
SCHEDULER_CONNECTIONS = 3
ANN_METHODS = ("hnsw", "ivfflat")


@dataclass(frozen=True)
class Extension:
    version: str
    schema: str

    @property
    def at_least_0_8(self) -> bool:
        try:
            major, minor = (int(p) for p in self.version.split(".")[:2])
        except ValueError:
            return False
        return (major, minor) >= (0, 8)


@dataclass(frozen=True)
class Column:
    attnum: int
    type_name: str
    typmod: int

    @property
    def declared(self) -> str:
        return self.type_name if self.typmod < 0 else f"{self.type_name}({self.typmod})"



class DoctorBase:
    """Runs the checks on one read-only connection and collects findings."""

    def __init__(self, conn: psycopg.Connection, settings: Settings, sample_rows: int,
                 worker_processes: int) -> None:
        self.conn = conn
        self.settings = settings
        self.sample_rows = sample_rows
        self.worker_processes = worker_processes
        self.findings: list[Finding] = []

    def add(self, level: str, target: str | None, check: str, message: str,
            details: Mapping[str, Any] | None = None) -> None:
        self.findings.append(Finding(level, target, check, message, details))

    def statement(self, query: sql.Composable) -> str:
        """SQL to print as advice, quoted by this connection: safe to paste as is."""
        return query.as_string(self.conn)

    def guarded(self, target: str | None, check: str, run: Callable[[], None]) -> None:
        """Run one check; a failure or timeout becomes a finding, the others still run."""
        try:
            run()
        except psycopg.errors.QueryCanceled:
            self.add(WARN, target, check, f"check {check} skipped: it took longer than the"
                     " statement timeout (--statement-timeout)")
        except psycopg.errors.LockNotAvailable:
            self.add(WARN, target, check, f"check {check} skipped: a lock is held by DDL"
                     " (a migration or index build?)")
        except psycopg.Error as exc:
            self.add(ERROR, target, check, f"check {check} could not run:"
                     f" {type(exc).__name__}: {redact(str(exc))}")

    def one(self, query: str | sql.SQL | sql.Composed, params: Any = None) -> tuple[Any, ...]:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return tuple(row)
