"""Progress of long commands: a tqdm bar on a terminal, plain lines in a pipe, nothing for --json.

tqdm does the rate, ETA and terminal handling; when stderr is not a terminal the same
figures are printed as one plain line every few seconds (no carriage returns, no escape
codes), so a cronjob's log stays readable. With --json stdout is the document alone and
nothing is printed about progress.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

from pgreembed.config import environment

log = logging.getLogger(__name__)

BAR = "bar"
LINES = "lines"
QUIET = "quiet"
LINE_INTERVAL_SECONDS = 2.0
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, ETA {remaining}"


def choose_mode(as_json: bool, stream: TextIO) -> str:
    """quiet for --json, a bar on a terminal, plain lines otherwise ($PGREEMBED_PROGRESS wins)."""
    if as_json:
        return QUIET
    forced = environment.PROGRESS.get().lower()
    if forced in (BAR, LINES, QUIET):
        return forced
    chosen = BAR if stream.isatty() else LINES
    if forced:
        log.warning("%s=%r is not one of %s, %s, %s: drawing %s", environment.PROGRESS.name,
                    forced, BAR, LINES, QUIET, chosen)
    return chosen


class Progress:
    """One task's progress, reported as absolute counts (done of total)."""

    def __init__(self, label: str, unit: str, *, as_json: bool = False,
                 stream: TextIO | None = None,
                 interval: float = LINE_INTERVAL_SECONDS) -> None:
        self.stream = stream or sys.stderr
        self.mode = choose_mode(as_json, self.stream)
        self.label, self.unit, self.interval = label, unit, interval
        self.started = time.monotonic()
        self.last_line = 0.0
        self.done, self.total, self.detail = 0, 0, ""
        self.base = 0  # `done` when the rate's clock started (a task may start part done)
        self.phase: str | None = None
        self.updated = False
        self.bar: tqdm | None = None  # drawn at the first update: a task that never
        #                                 waits (a swap already caught up) shows no bar

    def update(self, done: int, total: int | None = None, detail: str = "",
               phase: str | None = None) -> None:
        """Now `done` of `total` (a total may grow, e.g. rows edited while in flight); a
        new `phase` counts from zero (an index build's tuples, then its blocks)."""
        self.total = max(total if total is not None else self.total, done)
        self.detail = detail
        if not self.updated or phase != self.phase:
            # Rates count from the work seen, not from the command's start-up or from what
            # was done before it (an index build found half done), and start again with
            # each phase.
            self.updated, self.started, self.base = True, time.monotonic(), done
            self.phase = phase
        self.base = min(self.base, done)  # a count that dips (rows edited meanwhile)
        if self.mode == BAR and self.bar is None:
            self.bar = tqdm(desc=self.label, unit=f" {self.unit}", total=None,
                            file=self.stream, dynamic_ncols=True, mininterval=0.2, leave=True)
        if self.bar is not None:
            if self.bar.total != self.total:
                self.bar.total = self.total
            self.bar.set_postfix_str(detail, refresh=False)
            self.bar.update(done - self.done)
        self.done = done
        if self.mode == LINES:
            now = time.monotonic()
            if now - self.last_line >= self.interval:
                self.last_line = now
                self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.base) / elapsed if elapsed > 0.5 else 0.0
        line = f"{self.label}: {self.done}"
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else None
            eta = "?" if left is None else tqdm.format_interval(left)
            line += (f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%),"
                     f" {rate:.1f} {self.unit}/s, ETA {eta}")
        else:
            line += f" {self.unit}, {rate:.1f} {self.unit}/s"
        print(line + (f", {self.detail}" if self.detail else ""), file=self.stream, flush=True)

    def close(self) -> None:
        """Leave the final bar (or a final line) on the screen."""
        if self.bar is not None:
            self.bar.close()
        elif self.mode == LINES and self.done:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
