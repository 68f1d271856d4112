"""What pgreembed's role may do beyond the minimum, asked of Postgres up front.

Managed Postgres (RDS, Cloud SQL, Azure, Supabase, Neon) gives no superuser. The
minimal role owns the app's table (or is a member of its owner role), may create in
the table's schema (CREATE INDEX checks it), may create schema `pgreembed` (CREATE
on the database, or the schema made for it), and finds pgvector created by the admin.
Each optional grant below enables one thing; without it that thing degrades with one
clear line, never an InsufficientPrivilege error.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg


@dataclass(frozen=True)
class Grant:
    """An optional grant: the role(s) that give it, what it enables, what degrades."""

    name: str
    roles: str
    enables: str
    without: str


READ_ALL_STATS = Grant(
    "read_all_stats", "pg_read_all_stats (or pg_monitor)",
    "the state and transaction age of other roles' sessions: blockers named with them,"
    " no lock attempt while an idle transaction holds the table, --terminate-idle-after,"
    " and the adaptive throttle's count of the app's active queries",
    "other roles' sessions show as 'state hidden': each lock attempt is made (and waits"
    " its lock_timeout) even behind an idle transaction, idle ones cannot be ended, and"
    " the adaptive throttle counts only pgreembed's own active queries")
SIGNAL_AUTOVACUUM = Grant(
    "signal_autovacuum", "pg_signal_autovacuum_worker (Postgres 18) or superuser",
    "cancelling an autovacuum that holds the table while a swap, init or finalize waits"
    " (never one run to prevent wraparound), as Postgres itself does for a lock waiter",
    "the step waits for the autovacuum to finish (minutes on an HNSW-indexed table) and"
    " gives up after --lock-wait, changing nothing")
SIGNAL_BACKEND = Grant(
    "signal_backend", "pg_signal_backend",
    "--terminate-idle-after: ending other roles' sessions idle in a transaction on the"
    " table",
    "--terminate-idle-after ends only sessions of pgreembed's own role(s)")
OPTIONAL_GRANTS = (READ_ALL_STATS, SIGNAL_AUTOVACUUM, SIGNAL_BACKEND)


@dataclass(frozen=True)
class Privileges:
    """The optional grants this session's role has (superuser has them all)."""

    role: str
    superuser: bool
    read_all_stats: bool
    signal_autovacuum: bool
    signal_backend: bool

    def has(self, grant: Grant) -> bool:
        return bool(getattr(self, grant.name))

    @property
    def missing(self) -> list[Grant]:
        return [g for g in OPTIONAL_GRANTS if not self.has(g)]


def _member(role: str) -> str:
    # pg_has_role errors on a role this server does not have (pg_signal_autovacuum_worker
    # is new in Postgres 18); USAGE: the role's rights are usable without SET ROLE.
    return (f"CASE WHEN to_regrole('{role}') IS NULL THEN false"
            f" ELSE pg_has_role('{role}', 'USAGE') END")


def privileges(conn: psycopg.Connection) -> Privileges:
    """The role's optional grants (one catalog query, no lock)."""
    row = conn.execute(
        f"""
        SELECT current_user, r.rolsuper, {_member('pg_read_all_stats')},
               r.rolsuper OR {_member('pg_signal_autovacuum_worker')},
               {_member('pg_signal_backend')}
        FROM pg_roles r WHERE r.rolname = current_user
        """).fetchone()
    assert row is not None
    return Privileges(str(row[0]), bool(row[1]), bool(row[2]), bool(row[3]), bool(row[4]))


@dataclass(frozen=True)
class Required:
    """The minimal role's rights on a target's table and for schema `pgreembed`."""

    owns_table: bool  # owner, or a member of the owner role
    table_owner: str | None
    may_index: bool  # CREATE on the table's schema (CREATE INDEX checks it)
    schema_exists: bool
    may_create_schema: bool  # CREATE on the database
    may_use_schema: bool  # CREATE on schema pgreembed (when it exists)


def required(conn: psycopg.Connection, table: str) -> Required:
    row = conn.execute(
        """
        SELECT pg_has_role(c.relowner, 'USAGE'), pg_get_userbyid(c.relowner),
               has_schema_privilege(c.relnamespace, 'CREATE'), n.oid IS NOT NULL,
               has_database_privilege(current_database(), 'CREATE'),
               n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'CREATE')
        FROM (SELECT 1) one
        LEFT JOIN pg_class c ON c.oid = to_regclass(%s)
        LEFT JOIN pg_namespace n ON n.nspname = 'pgreembed'
        """, (table,)).fetchone()
    assert row is not None
    return Required(bool(row[0]), row[1], bool(row[2]), bool(row[3]), bool(row[4]),
                    bool(row[5]))
