"""One output contract: versioned --json documents (checked against their JSON Schema) and
the exit-code table of docs/cli.md, on real services."""

from __future__ import annotations

import dataclasses

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import Stack, counts, json_document, seed


def test_migrate_plan_and_status_documents_and_the_refused_and_timeout_codes(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    assert stack.cli("init").returncode == 0
    seed(stack, 16)
    stack.start_worker(threads=2)
    assert stack.cli("tick", "--wait", "--timeout", "120").returncode == 0

    no_migration = stack.cli("migrate", "status", "--target", "docs", "--json")
    assert no_migration.returncode == 4, no_migration.stderr  # refused: nothing to report
    # A refusal with --json is still a document on stdout: the error document.
    refused = json_document(no_migration.stdout)
    assert set(refused) == {"command", "version", "error"}
    assert (refused["command"], refused["error"]["code"]) == ("migrate-status", 4)
    assert "no migration in progress" in refused["error"]["message"]
    assert "no migration in progress" in no_migration.stderr
    not_open = stack.cli("migrate", "swap", "--target", "docs", "--json")
    assert not_open.returncode == 4, not_open.stderr
    assert json_document(not_open.stdout)["error"]["code"] == 4

    plan = stack.cli("migrate", "plan", "--target", "docs", "--model", "fake-768",
                     "--dimensions", "768", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json_document(plan.stdout)
    assert (planned["command"], planned["version"]) == ("migrate-plan", 1)
    assert planned["rows"] == 16 and planned["blockers"] == []
    blocked = stack.cli("migrate", "plan", "--target", "docs", "--model", "fake-768",
                        "--dimensions", "20000", "--json")
    assert blocked.returncode == 4, blocked.stderr
    assert json_document(blocked.stdout)["blockers"]

    started = stack.cli("migrate", "start", "--target", "docs", "--model", "fake-768",
                        "--dimensions", "768")
    assert started.returncode == 0, started.stderr
    status = json_document(stack.cli("migrate", "status", "--target", "docs", "--json").stdout)
    assert (status["command"], status["done"], status["total"]) == ("migrate-status", 0, 16)
    # No scheduler runs: the new column never catches up, so the swap's wait times out.
    timed_out = stack.cli("migrate", "swap", "--target", "docs", "--timeout", "1",
                          "--max-unsearchable", "0", "--json")
    assert timed_out.returncode == 3, timed_out.stdout + timed_out.stderr
    timeout_doc = json_document(timed_out.stdout)
    assert (timeout_doc["command"], timeout_doc["error"]["code"]) == ("migrate-swap", 3)
    assert counts(r"(\d+) rows still have a vector", timeout_doc["error"]["message"]) == [(16,)]
    again = stack.cli("migrate", "start", "--target", "docs", "--model", "fake-1536",
                      "--dimensions", "1536")
    assert again.returncode == 4 and "already has migration" in again.stderr
    wrong = stack.cli("migrate", "start", "--target", "docs", "--provider", "local",
                      "--model", "m", "--dimensions", "768")
    assert wrong.returncode == 2 and "--dimensions" in wrong.stderr  # a usage error


def test_a_tick_that_saw_nothing_land_says_where_to_look(stack: Stack) -> None:
    """No worker (or one that may not write): the timeout says none landed and names
    doctor and the workers' log, not only the rows left."""
    assert stack.cli("init").returncode == 0
    seed(stack, 4)
    waited = stack.cli("tick", "--wait", "--timeout", "2")
    assert waited.returncode == 3, waited.stdout + waited.stderr
    assert counts(r"timed out with (\d+) rows still in flight", waited.stdout) == [(4,)]
    assert "none landed while it waited" in waited.stdout and "pgreembed doctor" in (
        waited.stdout)


def test_status_failures_and_doctor_documents(stack: Stack) -> None:
    assert stack.cli("init").returncode == 0
    seed(stack, 3)
    status = json_document(stack.cli("status", "--json").stdout)
    assert [(c["role"], c["pending"]) for c in status["columns"]] == [("live", 3)]
    failures = json_document(stack.cli("failures", "--target", "docs", "--json").stdout)
    assert failures == {"command": "failures", "version": 1, "failures": []}
    retried = json_document(stack.cli("failures", "--target", "docs", "--retry",
                                      "--json").stdout)
    assert [r["retried"] for r in retried["retried"]] == [0]
    doctor = stack.cli("doctor", "--json")
    assert doctor.returncode in (0, 1), doctor.stderr
    assert {f["check"] for f in json_document(doctor.stdout)["findings"]}


def test_redis_down_is_one_line_naming_redis_never_its_password(stack: Stack) -> None:
    """Like Postgres's, a Redis that cannot be reached is one redacted line that says so
    (exit 1), and with --json the error document."""
    assert stack.cli("init").returncode == 0
    password = "Redis-Secret-Owl-42"
    down = dataclasses.replace(stack, env={**stack.env,
                                           "REDIS_URL": f"redis://:{password}@127.0.0.1:1/0"})
    tick = down.cli("tick")
    no_redis_needed = down.cli("failures", "--target", "docs", "--json")  # no Redis needed
    assert no_redis_needed.returncode == 0, no_redis_needed.stderr
    # status works without Redis: said once, in flight unknown (null), exit 0.
    status_text = down.cli("status")
    status_json = down.cli("status", "--json")
    for args, out, code in ((("tick",), tick, 1), (("status",), status_text, 0),
                            (("status", "--json"), status_json, 0)):
        lines = [line for line in out.stderr.splitlines() if line.startswith("pgreembed:")]
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("pgreembed: cannot connect to Redis"), \
            (args, out.stderr)
        assert password not in out.stdout + out.stderr and "Traceback" not in out.stderr
    columns = json_document(status_json.stdout)["columns"]
    assert [c["in_flight"] for c in columns] == [None]
