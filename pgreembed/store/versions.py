"""Versioned bookkeeping: `pgreembed.schema_version` and the ordered steps that reach the latest.

`init` (and the commands that need a table a later step added) run `upgrade`: under
the same advisory lock as `init`, in the caller's transaction, every step above the
database's version is applied and recorded, so an upgrade either completes or leaves
nothing half done. A database newer than this code is refused rather than guessed at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from pgreembed.errors import SetupError
from pgreembed.store.ddl import (
    REPEATABLE,
    V1_ADOPT_UNVERSIONED,
    V1_TABLES,
    V2_SIDE_FILL,
    V3_REUSE,
    V4_VECTOR_TYPE,
    V5_BATCH_ASKED,
    V6_BATCH_COLLECTOR,
    VERSION_TABLE,
)
from pgreembed.store.privileges import ensure_schema

log = logging.getLogger(__name__)

INIT_LOCK = "SELECT pg_advisory_xact_lock(hashtext('pgreembed.init'))"


@dataclass(frozen=True)
class Step:
    version: int
    description: str
    ddl: str


# Append only: a released step never changes (databases already ran it).
STEPS: tuple[Step, ...] = (
    Step(1, "registry, migrations, usage ledger, spend reservations, Batch API jobs and"
            " quality gate (the layout before versioning, adopted in place)",
         V1_TABLES + V1_ADOPT_UNVERSIONED),
    Step(2, "side fills: migrations pgreembed starts and finishes by itself", V2_SIDE_FILL),
    Step(3, "pay once per text: an index on each state table's text hash per model, and"
            " rows given a copied vector counted in the usage ledger; how a derived migration"
            " made its vectors", V3_REUSE),
    Step(4, "each slot's column storage type (vector or halfvec) in the registry, for"
            " migrate --derive halfvec; existing slots get the type their dimensions gave",
         V4_VECTOR_TYPE),
    Step(5, "Batch API jobs record the model and dimensions their requests asked for, so"
            " collecting a job no longer downloads its input file", V5_BATCH_ASKED),
    Step(6, "a Batch API job being written records until when its step has it to itself,"
            " so two steps never write the same job", V6_BATCH_COLLECTOR),
)
LATEST = STEPS[-1].version


def current_version(conn: psycopg.Connection) -> int:
    """The database's bookkeeping version; 0 when it has none (new, or made before versions)."""
    if conn.execute("SELECT to_regclass('pgreembed.schema_version')").fetchone() == (None,):
        return 0
    row = conn.execute("SELECT max(version) FROM pgreembed.schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def upgrade(conn: psycopg.Connection, *, repeatable: bool = True) -> list[int]:
    """Apply the missing steps in `conn`'s transaction; return the versions applied."""
    conn.execute(INIT_LOCK)  # one initialiser at a time (pods starting together)
    ensure_schema(conn)
    conn.execute(VERSION_TABLE)
    version = current_version(conn)
    if version > LATEST:
        raise SetupError(f"the bookkeeping in schema pgreembed is version {version}; this"
                         f" pgreembed knows up to {LATEST}: upgrade pgreembed")
    applied = []
    for step in STEPS:
        if step.version <= version:
            continue
        conn.execute(step.ddl)
        conn.execute("INSERT INTO pgreembed.schema_version (version, description)"
                     " VALUES (%s, %s)", (step.version, step.description))
        log.info("bookkeeping upgraded to version %d: %s", step.version, step.description)
        applied.append(step.version)
    if repeatable:
        conn.execute(REPEATABLE)
    return applied
