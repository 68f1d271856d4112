"""Doctor's view of the app's objects over the vector columns and of the publications.

Views, BEGIN ATOMIC functions, materialized views, policies... bind a column by attribute
number: doctor lists each with what the next swap would do (migrations.app_objects), warns
about those a swap would refuse or that read a column that is not live, and about
publications that send (or would send) a side column to subscribers that lack it.
"""

from __future__ import annotations

from pgreembed.config import Target
from pgreembed.migrations.app_objects import REFUSE, report
from pgreembed.operations.doctor.base import DoctorBase
from pgreembed.operations.doctor.findings import OK, WARN
from pgreembed.store.slots import load_slots, registry_exists


class AppObjectChecks(DoctorBase):
    def app_objects(self, target: Target) -> None:
        if not registry_exists(self.conn):
            return  # `models` says to run init
        decisions, notes = report(self.conn, target)
        live = {s.vector_column for s in load_slots(self.conn, target) if s.role == "live"}
        stale = [d for d in decisions if d.obj.column not in live]
        refused = [d for d in decisions if d.action == REFUSE]
        details = {"objects": [d.as_dict() for d in decisions]}
        if not decisions:
            self.add(OK, target.name, "app_objects", "no app object (view, function, policy,"
                     " ...) reads the vector columns by attribute number", details)
        elif stale or refused:
            self.add(WARN, target.name, "app_objects", "; ".join(
                [f"{d.obj.kind} {d.obj.name} reads {d.obj.column}, a column that is not"
                 " live: it serves another model's vectors (re-create it over the live"
                 " column; `migrate finalize` refuses while it does)" for d in stale]
                + [f"a swap would refuse: {d.line()}" for d in refused]), details)
        else:
            self.add(OK, target.name, "app_objects", f"{len(decisions)} app object(s) read"
                     " the vector column; a swap keeps each on its column: "
                     + "; ".join(d.line() for d in decisions), details)
        if notes:
            self.add(WARN, target.name, "publications", "; ".join(notes))
        else:
            self.add(OK, target.name, "publications", "no publication sends a side column")
