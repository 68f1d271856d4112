"""Doctor's server check: the Postgres and pgvector versions, and what needs newer ones."""

from __future__ import annotations

from pgreembed.operations.doctor.base import DoctorBase
from pgreembed.operations.doctor.findings import ERROR, OK, WARN
from pgreembed.store import server_versions


class VersionChecks(DoctorBase):
    def versions(self) -> None:
        """Refused below the minimums; a warning for a Postgres past community support;
        else OK, naming each feature this server is too old for (found and needed)."""
        found = server_versions.read(self.conn)
        details = {"postgres": found.postgres_text.split()[0], "postgres_num": found.postgres_num,
                   "pgvector": found.pgvector, "pgvector_available": found.pgvector_available,
                   "unavailable": [r.feature for r in server_versions.NOTED
                                   if not found.supports(r)]}
        problem = found.unsupported()
        if problem is not None:
            self.add(ERROR, None, "versions", problem, details)
            return
        unavailable = [m for m in (found.missing(r) for r in server_versions.NOTED) if m]
        extra = f"; not available here: {'; '.join(unavailable)}" if unavailable else ""
        if found.postgres_major < server_versions.SUPPORTED_POSTGRES:
            self.add(WARN, None, "versions", f"{found.summary()}: PostgreSQL"
                     f" {found.postgres_major} is past community support and untested with"
                     f" pgreembed (supported: {server_versions.SUPPORTED_POSTGRES} or newer)"
                     f"{extra}", details)
        else:
            self.add(OK, None, "versions", f"{found.summary()}: supported{extra}", details)
