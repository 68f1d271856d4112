"""What operators read: `migrate plan` at scale and its blockers, paused ETAs, sub-cent caps,
advice after a migration (issue 14's list of wrong or missing messages)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pgreembed.cli.migrate_steps import usd
from pgreembed.config import LOCAL_MODEL, load_settings
from pgreembed.migrations import plan as plan_module
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    counts,
    docs_config,
    json_document,
    migrate,
    seed,
    start_migration,
    wait_filled,
    write_config,
)


def plan_of(stack: Stack, *args: str) -> tuple[int, str, str]:
    out = stack.cli("migrate", "plan", "--target", "docs", *args)
    return out.returncode, out.stdout, out.stderr


def test_plan_blocks_what_start_refuses_and_notes_rows_without_text(stack: Stack) -> None:
    seed(stack, 10, rows=[("", "   "), (None, None)])
    assert stack.cli("init").returncode == 0
    code, out, _ = plan_of(stack, "--provider", "local", "--model", "x", "--dimensions", "512")
    assert code == 4  # refused/blocked (the exit-code table of docs/cli.md)
    assert "BLOCKER: the local model produces 384 dimensions" in out
    # Rows without text hold no vector in either column: a note, not a blocker (the swap
    # waits only for rows that would stop being searchable).
    code, out, _ = plan_of(stack, "--model", "fake-768", "--dimensions", "768")
    assert code == 0, out
    assert counts(r"note: (\d+) rows have no text", out) == [(2,)] and "BLOCKER" not in out
    assert counts(r"rows: (\d+) \((\d+) without text, ", out) == [(12, 2)], out
    assert "as UTF-8 bytes, an upper bound" in out  # no tiktoken encoding for fake-768
    migrate(stack, "start", "--model", "fake-768", "--dimensions", "768")
    code, out, _ = plan_of(stack, "--model", "fake-1024", "--dimensions", "1024")
    assert code == 4
    assert "BLOCKER: migration 1 of 'docs' is open (filling)" in out


def test_plan_counts_a_sample_of_a_big_table(stack: Stack, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    with stack.connect() as conn:  # every 10th row without text, spread over every page
        conn.execute("INSERT INTO docs (title, body) SELECT CASE WHEN g % 10 = 0 THEN NULL"
                     " ELSE 'doc ' || g END, CASE WHEN g % 10 = 0 THEN NULL ELSE 'body ' || g"
                     " END FROM generate_series(1, 3000) g")
        conn.execute("ANALYZE docs")
    assert stack.cli("init").returncode == 0
    monkeypatch.setattr(plan_module, "EXACT_COUNT_ROWS", 1000)  # 3000 rows is "big" here
    monkeypatch.setattr(plan_module, "SAMPLE_ROWS", 1500)
    settings = load_settings(stack.config_path, stack.env)
    found = plan_module.plan(settings, settings.target("docs"), "openai", "fake-768", 768)
    assert found.rows_estimated and not found.tokens_exact
    assert found.rows == 3000  # the planner's estimate after ANALYZE
    assert 150 <= found.rows_without_text <= 450  # ~10%, from the sampled pages


def test_paused_migration_has_no_eta_and_small_caps_keep_their_digits(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    seed(stack, 40)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    # Slow enough that no batch of the new model lands before `pause` (CLIs on a loaded
    # machine take seconds each: 5 s let the whole fill finish first).
    fake_openai.set_faults(slow_model="text-embedding-3-small", slow_model_latency=30.0)
    migrate(stack, "start", "--model", "text-embedding-3-small", "--dimensions", "384",
            "--spend-cap", "0.0002")
    migrate(stack, "pause")
    status = json.loads(migrate(stack, "status", "--json"))
    assert status["paused"] and status["eta_seconds"] is None, json.dumps(status)
    text = migrate(stack, "status")
    assert "of a $0.0002 cap" in text and "ETA ?" in text
    assert [usd(x) for x in (0.0002, 0.00015, 0.5, 1234.5, 0)] == [
        "$0.0002", "$0.00015", "$0.50", "$1,234.50", "$0.00"]
    fake_openai.set_faults(slow_model=None)  # the batch in flight returns: a quick stop


def test_advice_after_a_migration_names_the_config_to_write(stack: Stack) -> None:
    seed(stack, 12)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    column = start_migration(stack, "--model", "fake-alt-384", "--dimensions", "384")
    wait_filled(stack, column)
    migrate(stack, "swap")
    again = stack.cli("migrate", "start", "--target", "docs", "--model", "fake-768",
                      "--dimensions", "768")
    assert again.returncode == 4  # refused
    assert "(swapped): `migrate finalize` it" in again.stderr
    migrate(stack, "finalize")
    doctor = json.loads(stack.cli("doctor", "--json").stdout)
    findings = doctor["findings"] if isinstance(doctor, dict) else doctor
    models = [f for f in findings if f["check"] == "models"]
    assert any("a migration made it live: set provider = 'openai', model = 'fake-alt-384',"
               " dimensions = 384" in f["message"] for f in models), models


def test_plan_and_start_default_to_the_targets_provider_and_a_missing_key_is_config(
        stack: Stack) -> None:
    """A target on the local provider: plan/start without --provider use it, not openai;
    asking for openai without OPENAI_API_KEY (nor OPENAI_BASE_URL) is a config error,
    exit 2 (docs/cli.md's exit codes), nothing started."""
    keyless = dataclasses.replace(stack, env={k: v for k, v in stack.env.items()
                                              if not k.startswith("OPENAI_")})
    write_config(stack.config_path, docs_config().replace(
        'provider = "openai"\nmodel = "fake-384"', 'provider = "local"'))
    seed(stack, 5)
    assert keyless.cli("init").returncode == 0
    local = keyless.cli("migrate", "plan", "--target", "docs", "--model", LOCAL_MODEL,
                        "--dimensions", "384", "--json")
    assert "OPENAI_API_KEY" not in local.stderr, local.stderr
    assert json_document(local.stdout)["column_type"] == "vector(384)", local.stderr
    for step in ("plan", "start"):
        keyed = keyless.cli("migrate", step, "--target", "docs", "--provider", "openai",
                            "--model", "text-embedding-3-small", "--dimensions", "1536")
        assert keyed.returncode == 2, (step, keyed.returncode, keyed.stderr)
        assert "OPENAI_API_KEY: not set" in keyed.stderr and "Traceback" not in keyed.stderr
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pgreembed.slots").fetchone() == (1,)
