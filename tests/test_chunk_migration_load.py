"""Issue 25, test 4: a model migration of the chunk table under parent edits, as users'
databases are (tests/chunk_load.py has the scenario). The suite runs it at a lighter
edit rate; `python -m bench.chunk_migration` runs the issue's 150 edits/s."""

from __future__ import annotations

import json

import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.chunk_load import run_migration_under_load
from tests.helpers import OrdinaryRoles, Stack
from tests.test_chunked_targets import chunk_sets, chunked_stack, expected

EDITS_PER_SECOND = 20.0  # the bench: 150
SECONDS = 8.0  # of load around the steps, besides the steps' own time


@pytest.mark.timeout(600)
def test_migration_of_the_chunk_table_under_parent_edits(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    settings = chunked_stack(stack, batch_size=32,
                             destination='[target.destination]\nview = "docs_view"\n')
    target = settings.target("docs")
    out = stack.cli("init")
    assert out.returncode == 0, out.stderr
    figures = run_migration_under_load(
        stack, roles, fake_openai, parents=100, rate=EDITS_PER_SECOND, seconds=SECONDS,
        provider_latency=0.05, expected=lambda conn: expected(conn, target),
        chunk_sets=chunk_sets)
    print(json.dumps(figures))
    app = figures["app"]
    # 0 wrong-model chunks after the swap and after the rollback, under the load and once
    # settled (the settled check also compared every chunk set with its parent's text).
    assert figures["wrong_after_swap"] == {"embedding": 0, figures["column"]: 0}
    assert figures["wrong_after_rollback"] == {"embedding": 0, figures["column"]: 0}
    assert figures["wrong_settled"] == {"embedding": 0, figures["column"]: 0}
    assert figures["swap"]["seconds"] < 60 and figures["rollback"]["seconds"] < 60
    # pgreembed's sessions never waited on a row lock (the chunk stage included: it holds
    # parents FOR SHARE, so its waits were the app's edits' too).
    assert app["pgreembed_row_lock_waits"] == {}
    # The app's statements failed only by their own lock_timeout (reported: the stall bar
    # of the issue, see docs/chunking.md), its transactions never.
    assert app["errors"] == app["lock_timeouts"], figures["app_error_samples"]
    assert figures["row_holders"]["errors"] == [] and figures["chunk_holder_errors"] == []
    assert app["edit"]["count"] > 0.5 * EDITS_PER_SECOND * SECONDS
    assert app["search_app_view"]["count"] > 50 and app["search_pgai_view"]["count"] > 50
