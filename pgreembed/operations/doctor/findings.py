"""What doctor reports: findings with a level, and the exit code they make."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgreembed.errors import EXIT_ERROR, EXIT_OK

OK, WARN, ERROR = "ok", "warn", "error"


LEVELS = (OK, WARN, ERROR)


@dataclass(frozen=True)
class Finding:
    """One result: `level` is ok, warn or error; `target` is None for server-wide checks.

    `details` carries what a program needs beyond the message (the SQL advised,
    the rows a verification disagrees on); omitted from JSON when there is none."""

    level: str
    target: str | None
    check: str
    message: str
    details: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"level": self.level, "target": self.target,
                                 "check": self.check, "message": self.message}
        if self.details is not None:
            found["details"] = dict(self.details)
        return found


def exit_code(findings: list[Finding]) -> int:
    return EXIT_ERROR if any(f.level == ERROR for f in findings) else EXIT_OK
