"""Doctor's view of pgreembed's role: the minimal rights it needs (an error when one is
missing, with the statement that grants it) and the optional grants, each with what
degrades without it (store.privileges)."""

from __future__ import annotations

from psycopg import sql

from pgreembed.config import Target
from pgreembed.operations.doctor.base import DoctorBase
from pgreembed.operations.doctor.findings import ERROR, OK, WARN
from pgreembed.store.privileges import OPTIONAL_GRANTS, privileges, required
from pgreembed.store.slots import app_table


class PrivilegeChecks(DoctorBase):
    def optional_grants(self) -> None:
        found = privileges(self.conn)
        details = {"role": found.role, "superuser": found.superuser,
                   "grants": {g.roles: found.has(g) for g in OPTIONAL_GRANTS}}
        if not found.missing:
            self.add(OK, None, "privileges", f"role {found.role} has every optional grant"
                     f" ({', '.join(g.roles for g in OPTIONAL_GRANTS)})", details)
            return
        lines = [f"without {g.roles}: {g.without}" for g in found.missing]
        self.add(WARN, None, "privileges", f"role {found.role} works, with less: "
                 + "; ".join(lines), details)

    def role_rights(self, target: Target) -> None:
        """The minimal role: owner (or member of the owner role) of the table, and schema
        pgreembed usable (or creatable)."""
        table = app_table(target)
        rights = required(self.conn, table.as_string(self.conn))
        role = sql.Identifier(privileges(self.conn).role)
        problems = []
        if rights.table_owner is not None and not rights.owns_table:
            problems.append(self.statement(sql.SQL("GRANT {} TO {};").format(
                sql.Identifier(rights.table_owner), role)) + " (pgreembed adds columns,"
                " indexes and triggers to the table: it must own it, or be a member of"
                " its owner role)")
        if rights.table_owner is not None and not rights.may_index:
            problems.append(self.statement(sql.SQL("GRANT CREATE ON SCHEMA {} TO {};").format(
                sql.Identifier(target.schema), role)) + " (as the schema's owner: indexes"
                " are created next to the table)")
        if rights.schema_exists and not rights.may_use_schema:
            problems.append(self.statement(sql.SQL(
                "GRANT USAGE, CREATE ON SCHEMA pgreembed TO {};").format(role)))
        if not rights.schema_exists and not rights.may_create_schema:
            problems.append(self.statement(sql.SQL(
                "CREATE SCHEMA pgreembed AUTHORIZATION {};").format(role)) + " (as an admin)")
        if problems:
            self.add(ERROR, target.name, "role", "pgreembed's role lacks what it needs: run "
                     + "; ".join(problems))
        else:
            self.add(OK, target.name, "role", f"pgreembed's role may change"
                     f" {target.schema}.{target.table} and use schema pgreembed")
