"""Doctor's view of pgreembed's role: the minimal rights it needs (an error when one is
missing, with the statement that grants it) and the optional grants, each with what
degrades without it (store.privileges)."""

from __future__ import annotations

from pgreembed.config import Target
from pgreembed.operations.doctor.base import DoctorBase
from pgreembed.operations.doctor.findings import ERROR, OK, WARN
from pgreembed.store.privileges import OPTIONAL_GRANTS, lacking, privileges, required
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
        """The minimal role: owner (or member of the owner role) of the table, CREATE in
        its schema, and schema pgreembed usable (or creatable); init says the same."""
        rights = required(self.conn, app_table(target).as_string(self.conn))
        problem = lacking(self.conn, rights)
        if problem is not None:
            self.add(ERROR, target.name, "role", problem)
        else:
            self.add(OK, target.name, "role", f"pgreembed's role may change"
                     f" {target.schema}.{target.table} and use schema pgreembed")
