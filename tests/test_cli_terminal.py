"""The long commands as an operator sees them: in a real pseudo-terminal (pexpect), a bar
that moves and a final summary; in a pipe, plain lines without a control character."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pexpect

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    ROOT,
    Stack,
    counts,
    end_transaction_after,
    seed,
    start_migration,
    wait_for,
)

ROWS = 120  # 15 batches of 8
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def in_terminal(stack: Stack, *args: str, timeout: float = 180) -> tuple[int, str]:
    """(exit status, everything the terminal received) of `pgreembed args` in a pty."""
    child = pexpect.spawn(sys.executable, ["-m", "pgreembed", *args], env=stack.env,
                          cwd=str(ROOT), dimensions=(24, 140), encoding="utf-8",
                          timeout=timeout)
    child.expect(pexpect.EOF)
    screen = child.before
    child.close()
    assert child.exitstatus is not None, f"killed by a signal: {screen}"
    return child.exitstatus, screen


def piped(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgreembed", *args], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def bar_frames(screen: str, label: str) -> list[tuple[int, int]]:
    """(done, total) of every redraw of the tqdm bar labelled `label`."""
    frames = re.findall(rf"{re.escape(label)}:\s+\d+%\|[^|\r\n]*\| (\d+)/(\d+) \[", screen)
    return [(int(done), int(total)) for done, total in frames]


def slow_backlog(stack: Stack, fake_openai: FakeOpenAIServer, latency: float) -> None:
    """ROWS pending rows and one single-threaded worker behind a slow provider."""
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(latency=latency)
    stack.start_worker(threads=1)
    seed(stack, ROWS)


def test_tick_wait_draws_a_moving_bar_with_rate_and_eta_in_a_terminal(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    slow_backlog(stack, fake_openai, latency=0.3)
    code, screen = in_terminal(stack, "tick", "--wait", "--timeout", "150")
    assert code == 0, screen
    frames = bar_frames(screen, "tick")
    done = [d for d, _ in frames]
    assert len(set(done)) >= 3, screen  # the bar moved through several counts
    assert done == sorted(done) and frames[-1] == (ROWS, ROWS), frames
    assert "\r" in screen  # redrawn in place, not scrolled
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+ rows/s", screen), screen  # rate, ETA
    summary = re.search(r"tick: done, (\d+) rows processed in [\d.]+ s", screen)
    assert summary and int(summary.group(1)) == ROWS, screen


def test_tick_wait_in_a_pipe_prints_plain_lines_only(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    slow_backlog(stack, fake_openai, latency=0.4)
    result = piped(stack, "tick", "--wait", "--timeout", "150")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not CONTROL.search(result.stdout + result.stderr), repr(result.stderr)
    lines = re.findall(r"^tick: (\d+)/(\d+) rows \(\d+%\), [\d.?]+ rows/s, ETA \S+",
                       result.stderr, re.M)
    assert len(lines) >= 2, result.stderr  # periodic lines, and a final one
    assert (int(lines[-1][0]), int(lines[-1][1])) == (ROWS, ROWS), result.stderr
    assert re.search(rf"^tick: done, {ROWS} rows processed", result.stdout, re.M), result.stdout


def migrating(stack: Stack, fake_openai: FakeOpenAIServer) -> str:
    """The live column filled, a migration to fake-768 started (no worker yet): its column."""
    assert stack.cli("init").returncode == 0
    seed(stack, 64)
    stack.start_worker(threads=1)
    assert stack.cli("tick", "--wait", "--timeout", "120").returncode == 0
    return start_migration(stack, "--model", "fake-768", "--dimensions", "768")


def test_swap_shows_its_catch_up_as_a_bar_then_its_result(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    migrating(stack, fake_openai)
    fake_openai.set_faults(slow_model="fake-768", slow_model_latency=0.4)
    stack.start_scheduler()  # fills the new column, 8 rows per 0.4 s
    code, screen = in_terminal(stack, "migrate", "swap", "--target", "docs",
                               "--max-unsearchable", "0", "--timeout", "150")
    assert code == 0, screen
    frames = bar_frames(screen, "swap: catching up")
    assert len({d for d, _ in frames}) >= 3, screen
    assert re.search(r"\d+ left, 0 allowed", screen), screen
    assert re.search(r"swap done in \d+ ms of table lock", screen), screen


def test_index_build_shows_its_phase_in_a_terminal_and_nothing_with_json_in_a_pipe(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    column = migrating(stack, fake_openai)
    stack.start_scheduler()
    wait_for(lambda: stack.connect().execute(
        f'SELECT count(*) FROM docs WHERE "{column}" IS NULL').fetchone()[0] == 0,
        timeout=120, message="the new column filled")
    # A writer's open transaction holds CREATE INDEX CONCURRENTLY in its first waiting
    # phase for 2.5 s: the bar must name that phase while it lasts.
    writer = stack.connect()
    writer.autocommit = False
    writer.execute("UPDATE docs SET views = views + 1 WHERE id = 1")
    end_transaction_after(writer, 2.5)
    started = time.monotonic()
    code, screen = in_terminal(stack, "migrate", "index", "--target", "docs")
    assert code == 0, screen
    assert time.monotonic() - started >= 2.0
    assert re.search(r"index:.*waiting for writers before build", screen), screen
    assert re.search(r"index pgreembed_ann_\d+ is valid", screen), screen
    writer.close()

    status = piped(stack, "migrate", "status", "--target", "docs", "--json")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    assert status.stdout.lstrip().startswith("{") and not CONTROL.search(status.stdout)


def test_demo_shows_its_embedding_bar_in_a_terminal() -> None:
    """The demo's own services (embedded Postgres, Redis, the offline model)."""
    child = pexpect.spawn(sys.executable, ["-m", "pgreembed", "demo", "--rows", "40",
                                           "--workers", "1"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
                          dimensions=(24, 140), encoding="utf-8", timeout=300)
    child.expect(pexpect.EOF)
    screen = child.before
    child.close()
    assert child.exitstatus == 0, screen
    frames = bar_frames(screen, "demo: embedding")
    assert frames and frames[-1] == (40, 40), screen
    assert counts(r"all (\d+) rows embedded in", screen) == [(40,)] and "\r" in screen
