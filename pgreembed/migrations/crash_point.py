"""A TEST HOOK: die by SIGKILL right after a migration step's commit.

`PGREEMBED_CRASH_AT=<step>` in the environment makes the process SIGKILL itself at
`crash_point(<step>)`, which the migration steps call right after their transaction
commits (start, copy, index, swap, cancel, finalize): tests/test_crash_safety.py proves with it
that a real kill -9 at every step boundary leaves a state the next run completes.
Unset (always, outside those tests), it does nothing.
"""

from __future__ import annotations

import os
import signal

from pgreembed.config import environment

CRASH_AT = environment.CRASH_AT.name


def crash_point(step: str) -> None:
    if environment.CRASH_AT.get() == step:
        os.kill(os.getpid(), signal.SIGKILL)
