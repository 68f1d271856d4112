"""What every doctor check stands on: one read-only connection, findings, guarded runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.observability.redact import redact
from pgreembed.operations.doctor.findings import ERROR, WARN, Finding
from pgreembed.store.slots import load_slots, registry_exists
from pgreembed.store.versions import current_version

VECTOR_TYPE_VERSION = 4  # the bookkeeping version that records each column's storage type

# Connections the scheduler holds: the leader lock, the dispatch pass, LISTEN.
SCHEDULER_CONNECTIONS = 3
ANN_METHODS = ("hnsw", "ivfflat")


@dataclass(frozen=True)
class Extension:
    version: str
    schema: str


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

    def wanted_type(self, target: Target) -> str:
        """The column type the target should have: the config's `vector_type` when set,
        else what the registry records for the live column (a `--derive halfvec` migration
        makes it halfvec), else the type the dimensions give."""
        if target.vector_type is None and registry_exists(self.conn) and (
                current_version(self.conn) >= VECTOR_TYPE_VERSION):
            for slot in load_slots(self.conn, target):
                if (slot.role, slot.vector_column, slot.dimensions) == (
                        "live", target.vector_column, target.dimensions):
                    return slot.vector_type
        return target.storage_type

    def one(self, query: str | sql.SQL | sql.Composed, params: Any = None) -> tuple[Any, ...]:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return tuple(row)
