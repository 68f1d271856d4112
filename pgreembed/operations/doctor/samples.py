"""The opt-in checks that cost something: `--verify` (re-embeds a sample) and
`--recall` (one sequential scan per sample query)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from pgreembed.config import Target
from pgreembed.operations.doctor.base import (
    DoctorBase,
)
from pgreembed.operations.doctor.findings import ERROR, OK, WARN
from pgreembed.operations.verify import ColumnVerification, verify_slots
from pgreembed.store.slots import (
    Slot,
    load_slots,
    registry_exists,
)


class SampleChecks(DoctorBase):
    """--verify and --recall, on top of the read-only checks."""

    def verify(self, target: Target, rows: int, tolerance: float,
               announce: Callable[[str], None]) -> None:
        """Re-embed a sample of every column being kept filled and compare (error if off)."""
        if not registry_exists(self.conn):
            self.add(WARN, target.name, "verify", "pgreembed bookkeeping not found: nothing"
                     " to verify (run `pgreembed init`)")
            return
        slots = load_slots(self.conn, target)
        if not slots:
            self.add(WARN, target.name, "verify", f"target {target.name} is not initialised:"
                     " nothing to verify")
            return
        for result in verify_slots(self.conn, self.settings, slots, rows, tolerance, announce):
            self._verified(target, result)

    def _verified(self, target: Target, result: ColumnVerification) -> None:
        where = f"{target.schema}.{target.table}.{result.column} ({result.role}, {result.model})"
        details = result.as_dict()
        if result.error is not None:
            self.add(ERROR, target.name, "verify", f"{where}: could not re-embed the sample:"
                     f" {result.error}", details)
            return
        if result.disagreements:
            shown = ", ".join(f"{d.key} ({d.cosine:.4f})" for d in result.disagreements[:20])
            more = len(result.disagreements) - 20
            self.add(ERROR, target.name, "verify", f"{where}: {len(result.disagreements)} of"
                     f" {result.sampled} sampled rows hold a vector that is not their text's"
                     f" under this model (cosine similarity below {result.tolerance}): rows"
                     f" {shown}{f' and {more} more' if more > 0 else ''}; clear their vectors"
                     f" to have them re-embedded ({result.tokens_billed:,} tokens billed)",
                     details)
        else:
            self.add(OK, target.name, "verify", f"{where}: all {result.sampled} sampled rows"
                     f" match a fresh embedding (cosine similarity >= {result.tolerance};"
                     f" {result.tokens_billed:,} tokens billed)", details)
        if result.not_embeddable:
            self.add(WARN, target.name, "verify", f"{where}: {len(result.not_embeddable)}"
                     " sampled rows could not be embedded again: " + "; ".join(
                         f"row {key}: {reason}" for key, reason in result.not_embeddable[:5]),
                     details)

    def recall(self, target: Target, queries: int, k: int, recall_target: float | None
               ) -> None:
        """Measure each column's index at the settings search applies (see recall_check)."""
        if not registry_exists(self.conn):
            self.add(WARN, target.name, "recall", "pgreembed bookkeeping not found: run"
                     " `pgreembed init`")
            return
        for slot in load_slots(self.conn, target):
            self.guarded(target.name, "recall", functools.partial(
                self._recall_of, target, slot, queries, k, recall_target))

    def _recall_of(self, target: Target, slot: Slot, queries: int, k: int,
                   recall_target: float | None) -> None:
        from pgreembed.operations.recall_check import measure_slot

        result = measure_slot(self.conn, slot, queries, k, recall_target)
        where = f"{target.schema}.{target.table}.{slot.vector_column} ({slot.role})"
        if result is None:
            return  # no ANN index: the `index` check already says so
        settings = ", ".join(f"{n} = {v}" for n, v in result.settings.items()) or (
            "the server's settings (nothing recorded by `pgreembed tune`)")
        message = (f"{where}: index {result.index.name} ({result.index.method}) has recall@{k}"
                   f" {result.measurement.recall:.3f} at {settings} over"
                   f" {result.measurement.queries} sample queries, p50"
                   f" {result.measurement.p50_ms:.2f} ms, p99 {result.measurement.p99_ms:.2f} ms")
        if result.measurement.recall < result.target_recall:
            self.add(WARN, target.name, "recall", f"{message}: below the target"
                     f" {result.target_recall}; run `pgreembed tune --target {target.name}"
                     f" --column {'live' if slot.role == 'live' else 'incoming'}"
                     f" --recall {result.target_recall}`", result.as_dict())
        else:
            self.add(OK, target.name, "recall", f"{message} (target {result.target_recall})",
                     result.as_dict())
