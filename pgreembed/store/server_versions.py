"""Which Postgres and pgvector a database runs, and which pgreembed features each allows.

Managed services (RDS, Cloud SQL, Azure, Supabase, Neon) run Postgres 15-17 with
pgvector 0.7-0.8 (2026). pgreembed's own SQL needs Postgres 14 (the app's BEGIN ATOMIC
functions it re-creates across a swap exist from 14) and pgvector 0.5 (HNSW, the index
it builds by default); a few features need more and are named here, so `init`, `doctor`
and the command that uses a feature all say the same thing: what needs it, the version
found and the version needed. Nothing here writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from pgreembed.errors import SetupError

Version = tuple[int, int, int]

MIN_POSTGRES = 14  # refused below: BEGIN ATOMIC bodies (pg_proc.prosqlbody) from 14
SUPPORTED_POSTGRES = 15  # 14 works but is past community support (Nov 2026) and untested
MIN_PGVECTOR: Version = (0, 5, 0)  # HNSW


@dataclass(frozen=True)
class Requirement:
    """A feature and the server versions it needs (None: any supported one)."""

    feature: str
    postgres: int | None = None
    pgvector: Version | None = None


HALFVEC = Requirement("a halfvec column (more than 2000 dimensions, or --derive halfvec)",
                      pgvector=(0, 7, 0))
DERIVE_DIMENSIONS = Requirement("--derive dimensions:D (pgvector's subvector and"
                                " l2_normalize)", pgvector=(0, 7, 0))
L1_INDEX = Requirement("an index for the l1 distance (<+>)", pgvector=(0, 7, 0))
ITERATIVE_SCAN = Requirement("iterative index scans (hnsw.iterative_scan,"
                             " ivfflat.iterative_scan) for filtered queries",
                             pgvector=(0, 8, 0))
PARALLEL_HNSW_BUILD = Requirement("parallel HNSW index builds", pgvector=(0, 6, 0))
CANCEL_AUTOVACUUM_ROLE = Requirement("cancelling a blocking autovacuum without superuser"
                                     " (role pg_signal_autovacuum_worker)", postgres=18)
COMPACT = Requirement("migrate compact (pg_column_toast_chunk_id finds where each vector is"
                      " stored)", postgres=17)
PUBLICATION_COLUMN_LISTS = Requirement("publication column lists (a side column kept off"
                                       " the subscribers)", postgres=15)

# What doctor lists as unavailable on an older server (most useful first).
NOTED = (HALFVEC, ITERATIVE_SCAN, PARALLEL_HNSW_BUILD, CANCEL_AUTOVACUUM_ROLE,
         PUBLICATION_COLUMN_LISTS, COMPACT)


def parse_version(text: str) -> Version:
    """'0.8.0' -> (0, 8, 0); '0.7' -> (0, 7, 0); a suffix ('0.8.1-dev') is ignored."""
    parts = [int(p) for p in re.findall(r"\d+", text.split("-")[0])[:3]] + [0, 0, 0]
    return parts[0], parts[1], parts[2]


def dotted(version: Version) -> str:
    return ".".join(str(p) for p in version)


@dataclass(frozen=True)
class ServerVersions:
    postgres_num: int  # server_version_num, e.g. 150020
    postgres_text: str  # server_version, e.g. '15.20 (Debian 15.20-0+deb12u1)'
    pgvector: str | None  # installed in this database (extversion), None when not
    pgvector_available: str | None  # the server's default_version, None when absent
    pgvector_schema: str | None = None  # the schema it is installed in, None when not

    @property
    def postgres_major(self) -> int:
        return self.postgres_num // 10000

    @property
    def postgres_name(self) -> str:
        return f"PostgreSQL {self.postgres_text.split()[0]}"

    @property
    def pgvector_version(self) -> Version | None:
        return None if self.pgvector is None else parse_version(self.pgvector)

    def missing(self, requirement: Requirement) -> str | None:
        """Why `requirement` cannot be met here (versions found and needed), or None."""
        if requirement.postgres is not None and self.postgres_major < requirement.postgres:
            return (f"{requirement.feature} needs PostgreSQL {requirement.postgres} or"
                    f" newer; this server runs {self.postgres_name}")
        found = self.pgvector_version
        if requirement.pgvector is not None and found is not None and (
                found < requirement.pgvector):
            return (f"{requirement.feature} needs pgvector {dotted(requirement.pgvector)} or"
                    f" newer; this database has pgvector {self.pgvector}"
                    f"{self.update_advice(requirement.pgvector)}")
        return None

    def supports(self, requirement: Requirement) -> bool:
        return self.missing(requirement) is None

    def update_advice(self, needed: Version) -> str:
        """How to get a newer pgvector: ALTER EXTENSION when the server has it already."""
        available = self.pgvector_available
        if available is not None and parse_version(available) >= needed:
            return (f" (the server has {available}: `ALTER EXTENSION vector UPDATE` as its"
                    " owner)")
        return " (upgrade the pgvector package, then `ALTER EXTENSION vector UPDATE`)"

    def unsupported(self) -> str | None:
        """Why pgreembed refuses this server at all, or None."""
        if self.postgres_major < MIN_POSTGRES:
            return (f"pgreembed needs PostgreSQL {MIN_POSTGRES} or newer; this server runs"
                    f" {self.postgres_name}")
        found = self.pgvector_version
        if found is not None and found < MIN_PGVECTOR:
            return (f"pgreembed needs pgvector {dotted(MIN_PGVECTOR)} or newer (HNSW);"
                    f" this database has pgvector {self.pgvector}"
                    f"{self.update_advice(MIN_PGVECTOR)}")
        return None

    def summary(self) -> str:
        vector = (f"pgvector {self.pgvector}" if self.pgvector else
                  "pgvector not installed in this database")
        return f"{self.postgres_name}, {vector}"


def postgres_num(conn: psycopg.Connection) -> int:
    """server_version_num, as psycopg got it at connect time (no round trip): for the
    statements that differ by Postgres version."""
    return conn.info.server_version


def read(conn: psycopg.Connection) -> ServerVersions:
    """The server's and this database's versions (one catalog read, no lock)."""
    row = conn.execute(
        "SELECT current_setting('server_version'), e.extversion, n.nspname,"
        " (SELECT default_version FROM pg_available_extensions WHERE name = 'vector')"
        " FROM (SELECT 1) one LEFT JOIN pg_extension e ON e.extname = 'vector'"
        " LEFT JOIN pg_namespace n ON n.oid = e.extnamespace"
    ).fetchone()
    assert row is not None
    return ServerVersions(postgres_num(conn), str(row[0]), row[1], row[3], row[2])


def require_supported(conn: psycopg.Connection) -> ServerVersions:
    """The versions, or a SetupError when pgreembed cannot run on this server at all."""
    versions = read(conn)
    problem = versions.unsupported()
    if problem is not None:
        raise SetupError(problem)
    return versions


def require(conn: psycopg.Connection, requirement: Requirement,
            error: type[Exception] = SetupError) -> ServerVersions:
    """The versions, or `error` naming the feature, the version found and the one needed."""
    versions = read(conn)
    problem = versions.missing(requirement)
    if problem is not None:
        raise error(problem)
    return versions
