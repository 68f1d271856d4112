"""`pgreembed failures` covers every column being filled, on real services (issue 10).

Rows failed in a migration's new column were invisible and `--retry` did not
touch them; records of deleted rows were listed and "retried".
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from tests.helpers import Stack, counts, json_document, seed, start_migration, wait_for

LIVE_MODEL = "openai:fake-384@384"
NEW_MODEL = "openai:fake-768@768"


def failures_json(stack: Stack, *args: str) -> Any:
    result = stack.cli("failures", "--target", "docs", "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json_document(result.stdout)["retried" if "--retry" in args else "failures"]


def by_role(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for record in records:
        found.setdefault(record["role"], set()).add(record["key"])
    return found


def embedded_count(stack: Stack, column: str) -> int:
    with stack.connect() as conn:
        return int(conn.execute(f'SELECT count("{column}") FROM docs').fetchone()[0])


def test_failures_of_every_column_listed_and_retried_per_column(stack: Stack, fake_openai
                                                                ) -> None:
    # 9: empty text (fails in every column); 10-12 fail only in the migration's column.
    seed(stack, 8, rows=[("", ""), ("m", "MIGBAD a"), ("m", "MIGBAD b"), ("m", "MIGBAD c")])
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_for(lambda: embedded_count(stack, "embedding") == 11, timeout=60,
             message="live column filled")
    wait_for(lambda: by_role(failures_json(stack)) == {"live": {"9"}}, timeout=30)

    fake_openai.set_faults(bad_input_marker="MIGBAD")
    incoming = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    wait_for(lambda: by_role(failures_json(stack)).get("next") == {"9", "10", "11", "12"},
             timeout=60, message="the new column's failures recorded")
    with stack.connect() as conn:  # deleted while the triggers were off: a stale record
        conn.execute("ALTER TABLE docs DISABLE TRIGGER USER")
        conn.execute("DELETE FROM docs WHERE id = 12")
        conn.execute("ALTER TABLE docs ENABLE TRIGGER USER")

    records = failures_json(stack)
    assert by_role(records) == {"live": {"9"}, "next": {"9", "10", "11"}}
    for record in records:
        assert set(record) == {"column", "model", "role", "key", "reason", "attempts",
                               "failed_at"}
        expected = ("embedding", LIVE_MODEL) if record["role"] == "live" else (
            incoming, NEW_MODEL)
        assert (record["column"], record["model"]) == expected
        assert record["attempts"] >= 1 and record["reason"]
        datetime.fromisoformat(record["failed_at"])
    assert all("provider rejected" in r["reason"] for r in records if r["key"] in {"10", "11"})
    assert by_role(failures_json(stack, "--column", incoming)) == {"next": {"9", "10", "11"}}
    text = stack.cli("failures", "--target", "docs").stdout
    assert counts(re.escape(f"docs.{incoming} ({NEW_MODEL}, next): ") + r"(\d+) failed rows:",
                  text) == [(3,)], text

    refused = stack.cli("migrate", "swap", "--target", "docs", "--timeout", "1")
    assert refused.returncode == 4  # refused: rows failed in the incoming column
    assert f"`pgreembed failures --target docs --column {incoming}`" in refused.stderr

    fake_openai.set_faults(bad_input_marker=None)
    retried = failures_json(stack, "--column", incoming, "--retry")
    assert retried == [{"column": incoming, "model": NEW_MODEL, "role": "next",
                        "retried": 3}]
    wait_for(lambda: embedded_count(stack, incoming) == 10, timeout=60,
             message="rows 10 and 11 embedded in the new column after the retry")
    after = failures_json(stack)
    assert by_role(after) == {"live": {"9"}, "next": {"9"}}
    wait_for(lambda: next(r["attempts"] for r in failures_json(stack)
                          if r["role"] == "next") == 2, timeout=30,
             message="row 9 failed again in the new column only")
    assert next(r["attempts"] for r in failures_json(stack) if r["role"] == "live") == 1

    # After a swap, the old column is still kept filled: its failures are listed too.
    with stack.connect() as conn:
        conn.execute("DELETE FROM docs WHERE id = 9")
    swapped = stack.cli("migrate", "swap", "--target", "docs", "--timeout", "60")
    assert swapped.returncode == 0, swapped.stderr
    fake_openai.set_faults(bad_input_marker="OLDBAD")
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) VALUES (100, 'x', 'OLDBAD')")
    wait_for(lambda: by_role(failures_json(stack)) == {"live": {"100"}, "old": {"100"}},
             timeout=60, message="row 100 failed in both columns")
    old = next(r for r in failures_json(stack) if r["role"] == "old")
    assert (old["column"], old["model"]) == (incoming, LIVE_MODEL)  # names were exchanged
    fake_openai.set_faults(bad_input_marker=None)
    assert failures_json(stack, "--column", incoming, "--retry") == [
        {"column": incoming, "model": LIVE_MODEL, "role": "old", "retried": 1}]
    wait_for(lambda: by_role(failures_json(stack)) == {"live": {"100"}}, timeout=60,
             message="row 100 embedded in the old column after its retry")

    unknown = stack.cli("failures", "--target", "docs", "--column", "nope")
    assert unknown.returncode == 2  # a wrong option value
    assert "no column 'nope'" in unknown.stderr and incoming in unknown.stderr


def test_a_failed_row_edited_since_counts_as_pending_not_failed(stack: Stack, fake_openai
                                                                ) -> None:
    """Status, `failures` and the scheduler agree: a failure is on a text, and once the
    text changes the row is pending again (status said "failed" until it was re-sent)."""
    seed(stack, rows=[("a", "fine"), ("b", "BAD text")])
    fake_openai.set_faults(bad_input_marker="BAD")
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)  # no scheduler: each pass is a `tick`, as from cron
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    assert [r["key"] for r in failures_json(stack)] == ["2"]

    def counts() -> tuple[int, int]:
        result = stack.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        [live] = json_document(result.stdout)["columns"]
        assert live["estimated"] is True  # the cheap counts, not the --exact scan
        return live["pending"], live["failed"]

    with stack.connect() as conn:  # statistics: `status` takes its cheap path
        conn.execute("ANALYZE docs")
    assert counts() == (0, 1)
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'good text now' WHERE id = 2")
    assert counts() == (1, 0)
    exact = json_document(stack.cli("status", "--json", "--exact").stdout)["columns"][0]
    assert (exact["pending"], exact["failed"]) == (1, 0)
    assert failures_json(stack) == []
    assert failures_json(stack, "--retry") == [  # nothing failed on its current text
        {"column": "embedding", "model": LIVE_MODEL, "role": "live", "retried": 0}]
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    assert counts() == (0, 0) and embedded_count(stack, "embedding") == 2
