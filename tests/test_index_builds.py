"""store.index_builds: a builder waits for the build in progress, but not forever."""

from __future__ import annotations

import psycopg
import pytest

from pgreembed.errors import WaitTimeoutError
from pgreembed.store.index_builds import sole_builder
from pgreembed.store.pool import connect


def test_a_hung_builder_ends_the_wait_with_a_line_naming_its_session(
        database_url: str) -> None:
    """A session holds the build's advisory lock and never lets go (a hung build): the
    waiter gives up at its deadline with the holder's pid and application_name."""
    with psycopg.connect(database_url, autocommit=True,
                         application_name="hung-builder") as hung, \
            connect(database_url, autocommit=True) as waiter:
        hung.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                     ("pgreembed.index_build:public.some_index",))
        with pytest.raises(WaitTimeoutError) as raised, \
                sole_builder(waiter, "public", "some_index", wait_seconds=1.0):
            pass
        message = str(raised.value)
        assert "\n" not in message
        assert f"session pid {hung.info.backend_pid}, application_name 'hung-builder'" \
            in message, message
        hung.execute("SELECT pg_advisory_unlock_all()")
        with sole_builder(waiter, "public", "some_index", wait_seconds=1.0):
            pass  # once it let go, the build is ours at once
