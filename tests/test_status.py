"""`pgreembed status`: cheap counts that never scan the app's table, exact ones on request,
and a `--watch` that handles bad intervals, Ctrl-C and a closed pipe without tracebacks."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.helpers import ROOT, Stack, json_document, seed, wait_for

ROWS, PENDING = 20_000, 10


def seq_scans(stack: Stack) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'docs'"
                           ).fetchone()
    assert row is not None
    return int(row[0])


def test_status_counts_without_scanning_the_table_and_exactly_on_request(stack: Stack
                                                                        ) -> None:
    seed(stack, ROWS, body="body", numbered_body=False)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:  # vectors filled with SQL, all but PENDING rows
        conn.execute("UPDATE docs SET embedding = array_fill(0.1, ARRAY[384])::vector"
                     " WHERE id > %s", (PENDING,))
        conn.execute("VACUUM ANALYZE docs")
    before = seq_scans(stack)
    cheap = stack.cli("status", "--json")
    assert cheap.returncode == 0, cheap.stderr
    [live] = json_document(cheap.stdout)["columns"]
    assert seq_scans(stack) == before, "status scanned the app's table"
    assert live["estimated"] is True and live["truncated"] is None
    assert (live["total"], live["embedded"], live["pending"]) == (ROWS, ROWS - PENDING, PENDING)
    assert live["coverage"] == round((ROWS - PENDING) / ROWS, 6)

    exact = stack.cli("status", "--json", "--exact")
    [counted] = json_document(exact.stdout)["columns"]
    assert counted["estimated"] is False and counted["truncated"] == 0
    assert (counted["total"], counted["embedded"], counted["pending"]) == (
        ROWS, ROWS - PENDING, PENDING)
    wait_for(lambda: seq_scans(stack) > before, timeout=10, message="the exact count's scan")
    text = stack.cli("status", "--exact").stdout
    assert "exact counts of every row took" in text
    assert "estimated from the table's row count" in stack.cli("status").stdout


def test_watch_refuses_bad_intervals(stack: Stack) -> None:
    for bad in ("-1", "0", "nan", "soon"):
        result = stack.cli("status", "--watch", bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "--watch: must be" in result.stderr and "Traceback" not in result.stderr


def _watch(stack: Stack) -> subprocess.Popen[str]:
    assert stack.cli("init").returncode == 0
    return subprocess.Popen([sys.executable, "-m", "pgreembed", "status", "--watch", "0.2"],
                            env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, preexec_fn=_interruptible)


def _interruptible() -> None:
    """A shell runs background jobs with SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_watch_stops_quietly_on_ctrl_c(stack: Stack) -> None:
    process = _watch(stack)
    assert process.stdout is not None
    assert process.stdout.readline().startswith("target")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err, err


def test_watch_stops_quietly_when_the_reader_goes_away(stack: Stack) -> None:
    process = _watch(stack)
    assert process.stdout is not None
    assert process.stdout.readline().startswith("target")
    process.stdout.close()  # like `| head -1`
    assert process.wait(timeout=30) != 0
    assert process.stderr is not None
    err = process.stderr.read()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
