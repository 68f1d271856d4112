"""A model change or a migration step that lands between two write slices of one batch
(worker.batch_write).

A batch's vectors commit in slices, each in a transaction of its own, and every later
slice locks the table and reads the slot again. If the column's model changed in place
meanwhile (`init` with another model), the rest must be dropped (`Slot.holds_vectors_of`),
or the old model's vectors would be recorded as the new model's and never embedded again;
if a rollback (or swap) renamed the columns meanwhile, the rest must follow the slot's
column. The races of tests/test_model_change_race.py and tests/test_live_migration.py use
batches that fit one slice, so nothing showed either.

Deterministic, not timed: an app trigger stops the batch's second slice at a gate (an
advisory lock this test holds) once its first slice has committed; the step is started
and seen waiting for that slice (the writers' lock, store.table_lock); the gate opens; the
slice commits, the step commits, and the batch's next slice waits for the step.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psycopg

from pgreembed.store.write_slices import PROBE_ROWS
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.app_side import repeatable_read_by_default
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    advisory_waiters,
    assert_column_current,
    counts,
    docs_config,
    json_document,
    rows_in_flight,
    seed,
    slice_gate,
    start_migration,
    vectors_in,
    wait_for,
    write_config,
)

OLD, NEW, DIMS = "fake-384", "fake-alt-384", 384  # same size: a mix-up fits silently
ROWS = 64  # one batch: the probe slice (8 rows), the gated one, then 40 rows or more
GATE = 7_305_001  # the gate's advisory lock key



@dataclass(frozen=True)
class Labelled:
    """A row of docs: its text, its `embedding` and the model its state row (slot 1's)
    says made that (None: no state row)."""

    key: int
    text: str
    vector: np.ndarray | None
    model: str | None

    def made_by(self, model: str) -> bool:
        return self.vector is not None and bool(
            np.allclose(self.vector, fake_vector(model, self.text, DIMS), atol=2e-3))


def _labelled(stack: Stack) -> list[Labelled]:
    with stack.connect() as conn:
        rows = conn.execute(
            "SELECT d.id, concat_ws(E'\\n', d.title, d.body), d.embedding::text, m.name"
            " FROM docs d LEFT JOIN pgreembed.slot_1 s ON s.pgr_pk = d.id"
            " LEFT JOIN pgreembed.models m ON m.id = s.pgr_model_id ORDER BY d.id").fetchall()
    return [Labelled(key, text, None if vector is None else np.array(
        [float(x) for x in vector.strip("[]").split(",")], dtype=np.float32), model)
        for key, text, vector, model in rows]


def _mislabelled(rows: list[Labelled]) -> list[str]:
    """Rows with a vector that is not their recorded model's for their text."""
    return [f"{row.key}: labelled {row.model}, holds"
            f" {next((m for m in (OLD, NEW) if row.made_by(m)), 'no known model')}'s vector"
            for row in rows if row.vector is not None and not (
                row.model is not None and row.made_by(row.model))]


@contextmanager
def gate_closed(stack: Stack) -> Iterator[psycopg.Connection]:
    """The gate installed and closed; it opens when the connection yielded unlocks it or
    closes (a session's advisory locks end with it)."""
    with stack.connect() as gate:
        gate.execute(slice_gate("embedding", GATE))
        gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        yield gate


def wait_at_the_gate(stack: Stack) -> None:
    wait_for(lambda: advisory_waiters(stack, "ShareLock") == 1, timeout=30,
             message="the batch's second slice waiting at the gate")
    assert vectors_in(stack, "embedding") == PROBE_ROWS, "the first slice committed, no more"


def step_past_the_gate(stack: Stack, gate: psycopg.Connection, *args: str
                       ) -> subprocess.CompletedProcess[str]:
    """`pgreembed <args>` started while a slice waits at the gate, seen waiting for that
    slice, then the gate opened: the step lands between that slice and the next."""
    with ThreadPoolExecutor(1) as pool:
        step = pool.submit(stack.cli, *args)
        wait_for(lambda: advisory_waiters(stack, "ExclusiveLock") == 1 or step.done(), timeout=30,
                 message=f"`{' '.join(args)}` waiting for the slice in flight to commit")
        gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
        result = step.result()
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: rows_in_flight(stack) == 0, timeout=30, message="the batch done")
    return result


def test_a_model_change_between_two_slices_drops_the_batchs_later_slices(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, _ = ordinary_roles
    repeatable_read_by_default(stack)  # each slice must still read the slot as committed
    config = docs_config(batch_size=ROWS, max_inflight_rows=ROWS)
    write_config(stack.config_path, config)
    seed(stack, ROWS)
    assert stack.cli("init").returncode == 0
    with gate_closed(stack) as gate:
        stack.start_worker(threads=2)
        assert stack.cli("tick").returncode == 0  # the one batch, of OLD
        wait_at_the_gate(stack)
        write_config(stack.config_path, config.replace(f'"{OLD}"', f'"{NEW}"'))
        step_past_the_gate(stack, gate, "init")

    # The gated slice committed OLD's vectors before the change: labelled OLD's (outdated
    # now). The slices after it wrote nothing.
    between = _labelled(stack)
    wrong = _mislabelled(between)
    assert wrong == [], "a slice after the change wrote the old model's vectors as the" \
        f" new model's: {len(wrong)} rows, e.g. {wrong[:3]}"
    written = [r for r in between if r.vector is not None]
    assert {r.model for r in written} == {OLD}
    assert PROBE_ROWS < len(written) < ROWS
    dropped = counts(rf"column embedding: (\d+) vectors of openai:{OLD}@{DIMS} dropped",
                     stack.log_text())
    assert dropped == [(ROWS - len(written),)], dropped
    # The batch's summary says so too: dropped, not "changed meanwhile" (their texts did not
    # change; the metric of rows changed in flight is counted from the same figure).
    summary = counts(r"(\d+) changed meanwhile, .* (\d+) dropped \(the column's model changed\)",
                     stack.log_text())
    assert summary == [(0, ROWS - len(written))], summary

    # Every row embedded again, by NEW, for its current text; each text bought once a model.
    tick = stack.cli("tick", "--wait", "--timeout", "60")
    assert tick.returncode == 0, tick.stdout + tick.stderr
    settled = _labelled(stack)
    assert _mislabelled(settled) == [] and {r.model for r in settled} == {NEW}
    assert_column_current(stack, "embedding", NEW, DIMS)
    assert fake_openai.stats()["inputs_embedded"] == 2 * ROWS


def test_a_rollback_between_two_slices_sends_the_later_slices_to_the_renamed_column(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, _ = ordinary_roles
    repeatable_read_by_default(stack)
    write_config(stack.config_path, docs_config(batch_size=ROWS, max_inflight_rows=2 * ROWS))
    seed(stack, ROWS)
    assert stack.cli("init").returncode == 0
    # One batch at a time: OLD's batch, before or after the gated one of NEW, never holds
    # rows NEW's slices then skip (kept for a later pass, they would blur the count).
    stack.start_worker(threads=1)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    column = start_migration(stack, "--model", NEW, "--dimensions", str(DIMS))
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    swapped = stack.cli("migrate", "swap", "--target", "docs", "--json")
    assert json_document(swapped.stdout)["step"] == "swap", swapped.stdout + swapped.stderr
    # Now NEW's column is `embedding` (its slicer's first slice there: the probe) and
    # OLD's is `column`. Every text edited: a batch for each.
    with gate_closed(stack) as gate:
        with stack.connect() as conn:
            conn.execute("UPDATE docs SET body = 'edited ' || id")
        assert stack.cli("tick").returncode == 0
        wait_at_the_gate(stack)
        rolled = step_past_the_gate(stack, gate, "migrate", "rollback", "--target", "docs",
                                    "--json")
    assert json_document(rolled.stdout)["step"] == "rollback"

    # NEW's later slices went to NEW's column, renamed `column` by the rollback: nothing
    # dropped (the slot's model is the same), nothing into OLD's column, now `embedding`.
    assert counts(r"(\d+) vectors of \S+ dropped", stack.log_text()) == []
    assert vectors_in(stack, column) == ROWS, "NEW's later slices missed its renamed column"
    assert_column_current(stack, "embedding", OLD, DIMS)
    assert_column_current(stack, column, NEW, DIMS)
    assert fake_openai.stats()["inputs_embedded"] == 4 * ROWS  # two fills, two re-embeds
