"""What pgreembed's role may do beyond the minimum, asked of Postgres up front.

Managed Postgres (RDS, Cloud SQL, Azure, Supabase, Neon) gives no superuser. The
minimal role owns the app's table (or is a member of its owner role), may create in
the table's schema (CREATE INDEX checks it), may create schema `pgreembed` (CREATE
on the database, or the schema made for it), and finds pgvector created by the admin.
Each optional grant below enables one thing; without it that thing degrades with one
clear line, never an InsufficientPrivilege error. A missing minimal right is one
advice (`lacking`), the same from init, doctor and `ensure_schema`.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.errors import SetupError


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
    "Postgres cancels it for us: the step requests the autovacuum's own lock for"
    " deadlock_timeout + 500 ms first (~1.5 s per autovacuum met, nothing for the app)")
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

    role: str  # current_user: the role the advice grants to
    database: str
    owns_table: bool  # owner, or a member of the owner role
    table_owner: str | None  # None: no such table (or none asked about)
    table_schema: str | None
    may_index: bool  # CREATE on the table's schema (CREATE INDEX checks it)
    schema_exists: bool
    may_create_schema: bool  # CREATE on the database
    may_use_schema: bool  # USAGE and CREATE on schema pgreembed (when it exists)
    member_of_owner: bool = False  # a member of the owner role, inheriting its rights or not


def required(conn: psycopg.Connection, table: str | None = None) -> Required:
    """The rights, in one catalog query (no lock); `table` as to_regclass reads it."""
    row = conn.execute(
        """
        SELECT current_user, current_database(),
               pg_has_role(c.relowner, 'USAGE'), pg_get_userbyid(c.relowner), tn.nspname,
               has_schema_privilege(c.relnamespace, 'CREATE'), n.oid IS NOT NULL,
               has_database_privilege(current_database(), 'CREATE'),
               n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'USAGE')
                   AND has_schema_privilege(n.oid, 'CREATE'),
               coalesce(pg_has_role(c.relowner, 'MEMBER'), false)
        FROM (SELECT 1) one
        LEFT JOIN pg_class c ON c.oid = to_regclass(%s::text)
        LEFT JOIN pg_namespace tn ON tn.oid = c.relnamespace
        LEFT JOIN pg_namespace n ON n.nspname = 'pgreembed'
        """, (table,)).fetchone()
    assert row is not None
    return Required(str(row[0]), str(row[1]), bool(row[2]), row[3], row[4], bool(row[5]),
                    bool(row[6]), bool(row[7]), bool(row[8]), bool(row[9]))


def missing_rights(conn: psycopg.Connection, rights: Required) -> list[str]:
    """Each right the role lacks, as the statement that grants it (identifiers quoted by
    psycopg.sql: safe to paste), who runs it and why. init, doctor and the bookkeeping's
    schema check all print these: one advice, wherever it is found missing."""
    role = sql.Identifier(rights.role)

    def statement(query: sql.Composable) -> str:
        return f"`{query.as_string(conn)}`"

    found = []
    if rights.table_owner is not None and not rights.owns_table and rights.member_of_owner:
        # A member that does not inherit (NOINHERIT, or GRANT ... WITH INHERIT FALSE):
        # granting the membership again only prints "already been granted".
        inherit = (sql.SQL("GRANT {} TO {} WITH INHERIT TRUE;").format(
            sql.Identifier(rights.table_owner), role) if conn.info.server_version >= 160000
            else sql.SQL("ALTER ROLE {} INHERIT;").format(role))
        found.append("let it use the rights of the table's owner role, which it is a member"
                     " of without inheriting them: " + statement(inherit)
                     + " (it adds columns, indexes and triggers to the table)")
    elif rights.table_owner is not None and not rights.owns_table:
        found.append("make it a member of the table's owner role, " + statement(
            sql.SQL("GRANT {} TO {};").format(sql.Identifier(rights.table_owner), role))
            + " (it adds columns, indexes and triggers to the table)")
    if rights.table_schema is not None and not rights.may_index:
        # CREATE INDEX checks CREATE on the table's schema for the role that runs it (with
        # the rights it inherits), not for the table's owner: on Postgres 18 a grant to
        # pgreembed's role alone lets it index a table of its owner role, and so does one
        # to that owner role. The grant to pgreembed's role is the narrower one (a grant
        # to the owner role goes to every other member of it too), and it is what
        # `may_index` reads (has_schema_privilege of current_user).
        found.append("as the schema's owner, " + statement(sql.SQL(
            "GRANT CREATE ON SCHEMA {} TO {};").format(
                sql.Identifier(rights.table_schema), role))
            + " (it creates indexes next to the table)")
    if rights.schema_exists and not rights.may_use_schema:
        found.append("as schema pgreembed's owner, " + statement(sql.SQL(
            "GRANT USAGE, CREATE ON SCHEMA pgreembed TO {};").format(role))
            + " (its bookkeeping lives there)")
    if not rights.schema_exists and not rights.may_create_schema:
        found.append("as an admin, " + statement(sql.SQL(
            "CREATE SCHEMA pgreembed AUTHORIZATION {};").format(role)) + " (or " + statement(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {};").format(
                sql.Identifier(rights.database), role)) + ")")
    return found


def lacking(conn: psycopg.Connection, rights: Required) -> str | None:
    """init's error and doctor's finding, word for word; None when nothing is missing."""
    found = missing_rights(conn, rights)
    if not found:
        return None
    return f"pgreembed's role {rights.role} lacks what it needs: " + "; ".join(found)


def ensure_schema(conn: psycopg.Connection) -> None:
    """Schema pgreembed, made here if this role may (CREATE on the database), else by an
    admin beforehand (managed Postgres): `CREATE SCHEMA IF NOT EXISTS` needs CREATE on
    the database even when the schema exists, so it is only run when it does not."""
    rights = required(conn)
    if not rights.schema_exists and rights.may_create_schema:
        conn.execute("CREATE SCHEMA IF NOT EXISTS pgreembed")
        return
    problem = lacking(conn, rights)
    if problem is not None:
        raise SetupError(problem)
