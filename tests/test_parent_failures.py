"""`pgreembed failures` and `failures --retry` of a chunked target's parent failures (what
import-pgai --take-over records from pgai's failed queue): listed with their reasons,
retried by marking the parents to be chunked again (issue 26)."""

from __future__ import annotations

from datetime import UTC, datetime

from pgreembed.config import load_settings
from pgreembed.store import takeover
from pgreembed.store.chunks import parent_key
from pgreembed.testing import pgai_side
from tests.helpers import Stack, json_document

TARGET = "docs_v"


def test_failures_lists_and_retries_parent_failures(stack: Stack) -> None:
    stack.config_path.write_text(pgai_side.adopted_target_toml(
        TARGET, "text-embedding-3-small", 64, "posts_chunks").format(batch_size=16)
        .replace('"public.docs"', '"public.posts"'))
    with stack.connect() as conn:
        conn.execute("CREATE TABLE posts (id bigint PRIMARY KEY, body text)")
        conn.execute("INSERT INTO posts SELECT g, 'doc ' || g FROM generate_series(1, 5) g")
    done = stack.cli("init")
    assert done.returncode == 0, done.stderr
    target = load_settings(stack.config_path, stack.env).target(TARGET)
    with stack.connect() as conn:
        conn.execute("TRUNCATE pgreembed.chunk_dirty_docs_v")  # as if chunked already
        key = parent_key(conn, target)
        takeover.ensure_tables(conn, target, key)
        at = datetime(2026, 12, 1, tzinfo=UTC)
        assert takeover.record_failures(conn, target, key, [
            (2, at, "pgai gave up at step 'loading': unreadable row 2"),
            (4, at, "pgai gave up at step 'embedding': input rejected"),
            (99, at, "a row deleted since: not recorded")]) == 2

    listed = stack.cli("failures", "--target", TARGET, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {p["key"]: p["reason"] for p in json_document(listed.stdout)["parent_failures"]} \
        == {"2": "pgai gave up at step 'loading': unreadable row 2",
            "4": "pgai gave up at step 'embedding': input rejected"}
    text = stack.cli("failures", "--target", TARGET)
    assert "2 parent rows failed" in text.stdout and "unreadable row 2" in text.stdout

    retried = stack.cli("failures", "--target", TARGET, "--retry", "--json")
    assert retried.returncode == 0, retried.stderr
    assert json_document(retried.stdout)["parent_retried"] == 2
    with stack.connect() as conn:
        dirty = {r[0] for r in conn.execute("SELECT pgr_pk FROM pgreembed.chunk_dirty_docs_v")}
        assert dirty == {2, 4}  # chunked again by the chunk stage
    again = stack.cli("failures", "--target", TARGET, "--json")
    assert json_document(again.stdout)["parent_failures"] == []
    assert json_document(stack.cli("failures", "--target", TARGET, "--retry", "--json"
                                   ).stdout)["parent_retried"] == 0
