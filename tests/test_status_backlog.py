"""A backlog too big to count at every scrape (a migration's new column is the whole
table when it starts): `status`, the scrape and `migrate status` count a sample of the
table's pages instead of probing the state table once per row without a vector, and
say that the counts are estimates."""

from __future__ import annotations

import re

import pytest
import redis

from pgreembed.config import load_settings
from pgreembed.migrations.progress import progress
from pgreembed.operations.status import collect
from pgreembed.store import counts
from pgreembed.store.pool import connect
from tests.helpers import Stack, json_document, migrate, seed

ROWS, PENDING = 20_000, 8_000


def state_probes(stack: Stack) -> int:
    """Index scans of the state tables: one per state-row probe."""
    with stack.connect() as conn:
        row = conn.execute("SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_tables"
                           " WHERE schemaname = 'pgreembed' AND relname LIKE 'slot\\_%'"
                           ).fetchone()
    assert row is not None
    return int(row[0])


def test_big_backlogs_are_sampled_and_labelled(stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The thresholds scaled down with the table (in production: 50,000 and 30,000 rows).
    monkeypatch.setattr(counts, "BACKLOG_EXACT_ROWS", 1_000)
    monkeypatch.setattr(counts, "SAMPLE_ROWS", 8_000)
    # A sample of pages is only as good as the number of pages the backlog spans: with
    # short texts the 8,000 pending rows sat in ~60 of ~2,500 pages (the filled rows hold
    # their 384-dim vectors inline) and a 20% sample was off by up to 35%. Texts of
    # ~1.5 kB spread them over ~1,800 pages, as a production backlog spans thousands.
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT 'doc ' || g, 'body ' || g || ' '"
                     " || (SELECT string_agg(md5(g::text || '.' || i), ' ')"
                     "     FROM generate_series(1, 45) i)"
                     " FROM generate_series(1, %s) g", (ROWS,))
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:  # vectors filled with SQL: the backlog at one end
        conn.execute("UPDATE docs SET embedding = array_fill(0.1, ARRAY[384])::vector"
                     " WHERE id > %s", (PENDING,))
    migrate(stack, "start", "--model", "fake-768", "--dimensions", "768")
    with stack.connect() as conn:
        conn.execute("VACUUM ANALYZE docs")
    monkeypatch.setenv("PGREEMBED_CONFIG", stack.env["PGREEMBED_CONFIG"])
    for name in ("DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.setenv(name, stack.env[name])
    settings = load_settings(None)

    before = state_probes(stack)
    with connect(settings.database_url) as conn:
        live, incoming = collect(conn, settings, redis.Redis.from_url(stack.redis_url))
    probes = state_probes(stack) - before
    # Counted row by row, that is one probe per row without a vector: 8,000 + 20,000.
    assert probes < (PENDING + ROWS) / 2, probes
    assert (live.role, incoming.role) == ("live", "next")
    for found, expected in ((live, PENDING), (incoming, ROWS)):
        assert found.backlog_estimated and found.estimated
        assert abs(found.pending - expected) <= 0.05 * ROWS, (found, expected)
        assert found.total == ROWS and found.failed == 0 and found.stale == 0

    fill = progress(settings, settings.target("docs"))
    assert fill.estimated and fill.total == ROWS and abs(fill.done) <= 0.05 * ROWS, fill

    from pgreembed.cli.main import main
    assert main(["status", "--json"]) == 0
    doc = json_document(capsys.readouterr().out)
    flags = [(c["role"], c["backlog_estimated"]) for c in doc["columns"]]
    assert flags == [("live", True), ("next", True)]
    assert doc["columns"][1]["migration"]["estimated"] is True
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert re.search(r" ~\d+ ", text.split("\n")[1]), text  # the live column's pending
    assert "from a sample of its pages" in text
    assert main(["migrate", "status", "--target", "docs", "--json"]) == 0
    assert json_document(capsys.readouterr().out)["estimated"] is True
    assert main(["migrate", "status", "--target", "docs"]) == 0
    assert f"/~{ROWS} rows" in capsys.readouterr().out


def test_a_small_backlog_is_counted_exactly(stack: Stack) -> None:
    seed(stack, 3000)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET embedding = array_fill(0.1, ARRAY[384])::vector"
                     " WHERE id > 7")
        conn.execute("VACUUM ANALYZE docs")
    [live] = json_document(stack.cli("status", "--json").stdout)["columns"]
    assert (live["pending"], live["backlog_estimated"], live["estimated"]) == (7, False, True)
