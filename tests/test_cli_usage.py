"""The command line's own rules, without services: per-step options, help, version, completion."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest

from pgreembed.cli.main import build_parser
from pgreembed.cli.progress import Progress
from tests.helpers import ROOT

STEPS = ["plan", "start", "status", "pause", "resume", "cancel", "index", "compare", "swap",
         "rollback", "finalize", "compact", "batch"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgreembed", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PGREEMBED_CONFIG": "/nonexistent"})


@pytest.mark.parametrize(("step", "foreign"), [
    ("swap", ["--spend-cap", "5"]),
    ("swap", ["--lists", "100"]),
    ("pause", ["--method", "hnsw"]),
    ("status", ["--model", "x"]),
    ("index", ["--timeout", "5"]),
    ("rollback", ["--batch-api"]),
    ("finalize", ["--wait"]),
])
def test_an_option_of_another_step_is_a_usage_error(step: str, foreign: list[str]) -> None:
    result = run("migrate", step, "--target", "docs", *foreign)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"pgreembed migrate {step}: error: unrecognized arguments: {foreign[0]}" in (
        result.stderr), result.stderr


def test_each_step_has_its_own_help_with_an_example() -> None:
    for step in STEPS:  # spelled out: a step lost from the parser must fail here
        result = run("migrate", step, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: pgreembed migrate {step}" in result.stdout
        assert f"example:\n  pgreembed migrate {step} --target docs" in result.stdout
    index_help = run("migrate", "index", "--help").stdout
    assert "--ef-construction" in index_help and "--spend-cap" not in index_help
    pause_help = run("migrate", "pause", "--help").stdout
    assert "--lists" not in pause_help and "--method" not in pause_help


def test_every_command_has_an_example_and_the_top_help_the_exit_codes() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    for name in commands:
        result = run(name, "--help")
        assert result.returncode == 0 and "example:\n  pgreembed " in result.stdout, name
    top = run("--help").stdout
    for line in ("0  ok", "1  service error", "2  usage or configuration error",
                 "3  timeout", "4  refused or blocked"):
        assert line in top


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pgreembed {version('pgreembed')}"


def test_bash_completion_script_is_valid_and_knows_the_steps(tmp_path: Path) -> None:
    result = run("--print-completion", "bash")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "pgreembed.bash"
    script.write_text(result.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Complete `pgreembed migrate sw<TAB>` through bash's own completion machinery.
    probe = (f"source {script}; COMP_WORDS=(pgreembed migrate sw); COMP_CWORD=2;"
             " COMP_LINE='pgreembed migrate sw'; COMP_POINT=${#COMP_LINE};"
             " _shtab_pgreembed; printf '%s\\n' \"${COMPREPLY[@]}\"")
    completed = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
    assert completed.stdout.split() == ["swap"], completed.stdout + completed.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_script_parses(tmp_path: Path) -> None:
    result = run("--print-completion", "zsh")
    script = tmp_path / "_pgreembed"
    script.write_text(result.stdout)
    assert subprocess.run(["zsh", "-n", str(script)]).returncode == 0


def test_every_schema_is_a_valid_versioned_json_schema() -> None:
    schemas = sorted((ROOT / "pgreembed" / "cli" / "schemas").glob("*.json"))
    assert len(schemas) >= 10
    for path in schemas:
        found = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(found)
        assert found["properties"]["command"] == {"const": path.stem}
        assert found["properties"]["version"] == {"const": 1}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_task_that_never_waits_draws_no_bar_and_json_draws_nothing() -> None:
    screen = _Terminal()
    with Progress("swap: catching up", "rows", stream=screen):
        pass
    assert screen.getvalue() == ""
    with Progress("tick", "rows", stream=screen, as_json=True) as quiet:
        quiet.update(5, 10)
    assert screen.getvalue() == ""
    with Progress("tick", "rows", stream=screen) as bar:
        bar.update(5, 10)
    assert "\r" in screen.getvalue()
    assert ("5", "10") in re.findall(r"(\d+)/(\d+)", screen.getvalue()), screen.getvalue()



def test_an_unknown_progress_mode_is_named_and_the_default_drawn(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PGREEMBED_PROGRESS", "bogus")
    screen = _Terminal()
    with (caplog.at_level(logging.WARNING, logger="pgreembed.cli.progress"),
          Progress("tick", "rows", stream=screen) as bar):
        bar.update(5, 10)
    assert "\r" in screen.getvalue()  # a terminal: the bar, as without the variable
    assert [r.getMessage() for r in caplog.records
            if "PGREEMBED_PROGRESS='bogus'" in r.getMessage()], caplog.text


def test_the_rate_counts_the_work_seen_not_what_was_done_before() -> None:
    """An index build found 12,000 tuples in (or a new phase counting from zero) printed
    ~40,000,000 tuples/s: the rate divided everything done by the time since the first
    update. It counts from the first update's count, again at each new phase."""
    log = io.StringIO()  # not a terminal: plain lines
    progress = Progress("index", "tuples", stream=log, interval=0.0)
    progress.update(12_000, 20_000, "loading tuples", "loading")
    progress.started -= 2.0  # two seconds of work since that update
    progress.update(12_100, 20_000, "loading tuples", "loading")
    progress.update(10, 500, "building (blocks)", "building")  # a new phase, from zero
    progress.started -= 1.0
    progress.update(60, 500, "building (blocks)", "building")
    rates = [float(r) for r in re.findall(r"([\d.]+) tuples/s", log.getvalue())]
    assert rates[1] == pytest.approx(50.0, rel=0.05), log.getvalue()  # 100 in 2 s
    assert rates[3] == pytest.approx(50.0, rel=0.05), log.getvalue()  # 50 in 1 s

# What building the parser must not import: every `pgreembed` call builds it (the tests
# make hundreds of calls), and these cost ~0.3 s of CPU a call (numpy, the providers'
# SDKs, the migration machinery, tqdm): a command imports them when it runs.
HEAVY = ["numpy", "openai", "tqdm", "pgreembed.migrations.lifecycle", "pgreembed.cli.migrate_steps",
         "pgreembed.operations.doctor.checks", "pgreembed.operations.tune",
         "pgreembed.operations.pgai_takeover", "pgreembed.embedding.providers"]


def test_building_the_parser_imports_no_command_implementation() -> None:
    probe = ("import json, sys; from pgreembed.cli.main import build_parser; build_parser();"
             f" print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_lazy_parts_of_the_parser_match_what_they_stand_for() -> None:
    from pgreembed.cli import migrate
    from pgreembed.migrations import lifecycle, rechunk, swap

    assert migrate.DEFAULT_MAX_UNSEARCHABLE == swap.DEFAULT_MAX_UNSEARCHABLE
    assert migrate.DEFAULT_MAX_UNSEARCHABLE == rechunk.DEFAULT_MAX_UNSEARCHABLE
    described = run("migrate", "--help").stdout
    assert lifecycle.__doc__ and lifecycle.__doc__.strip() in described
