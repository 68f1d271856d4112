"""The app's edits during a migration's fill of an HNSW table: a batch's write in slices
(`[worker] max_row_lock_ms`, 50 ms by default) against the whole batch in one transaction.

Each round runs bench.scale_cycle up to its fill twice, interleaved (the machine's speed
drifts), on the same data: once with the default slices, once with `max_row_lock_ms` so
large that a batch commits at once after its probe slice (what pgreembed did before).
The first model change of a bulk-loaded table is the case: its side writes are non-HOT
(full pages) and file each row's live vector in the HNSW graph again, 1-5 ms a row.
Prints one JSON line per run, then the medians and their ratios (unsliced / sliced).
`--budgets 50,200` runs an arm per `max_row_lock_ms` (the first is "sliced" in the
ratios) besides the unsliced one. `--memory-arms` adds the first budget with `[worker]
kept_memory_mb = 0` (the workers' sessions hand their freed memory back to the OS after
each statement, as before 2026-12-07: store.session.keep_freed_memory).

    python -m bench.fill_row_locks --rows 30000 --rounds 3 [--dims 384] [--budgets 50]
                                   [--memory-arms] [--stats]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

UNSLICED = 1e9  # max_row_lock_ms: a batch commits at once after its probe slice
FIGURES = ("seconds", "postgres_cpu_s", "edits_per_s", "edit_p50_ms", "edit_p99_ms",
           "edit_max_ms", "search_p99_ms")


def fill_step(rows: int, dims: int, max_row_lock_ms: float, edits: float,
              kept_memory_mb: int | None = None, stats: bool = False) -> dict[str, Any]:
    """The fill step's JSON line of one bench.scale_cycle run."""
    command = [sys.executable, "-m", "bench.scale_cycle", "--rows", str(rows), "--dims",
               str(dims), "--until", "fill", "--baseline", "5", "--edits", str(edits),
               "--timeout", "1500"]
    command += ["--max-row-lock-ms", str(max_row_lock_ms)]
    if kept_memory_mb is not None:
        command += ["--kept-memory-mb", str(kept_memory_mb)]
    if stats:
        command.append("--stats")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("step") == "fill":
                return dict(doc)
    raise RuntimeError(f"no fill step in bench.scale_cycle's output:\n{out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--edits", type=float, default=50.0, help="app edits per second")
    parser.add_argument("--budgets", default="50",
                        help="max_row_lock_ms of the sliced arms, comma-separated")
    parser.add_argument("--memory-arms", action="store_true",
                        help="also the first budget with [worker] kept_memory_mb = 0")
    parser.add_argument("--stats", action="store_true",
                        help="each run's top statements of the fill (pg_stat_statements)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    arms: dict[str, tuple[float, int | None]] = {
        "sliced" if i == 0 else f"sliced {b:g} ms": (b, None) for i, b in enumerate(budgets)}
    if args.memory_arms:
        arms["sliced, freed memory not kept"] = (budgets[0], 0)
    arms["unsliced"] = (UNSLICED, None)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
        for arm in order:
            budget, kept_memory_mb = arms[arm]
            step = fill_step(args.rows, args.dims, budget, args.edits, kept_memory_mb,
                             args.stats)
            runs[arm].append(step)
            shown = (*FIGURES, "load_average", "cpu_by_backend", "statements")
            print(json.dumps({"round": round_ + 1, "arm": arm}
                             | {k: step[k] for k in shown if k in step}), flush=True)
    medians = {arm: {k: statistics.median(float(r[k]) for r in done if r.get(k) is not None)
                     for k in FIGURES} for arm, done in runs.items()}
    ratios = {k: round(medians["unsliced"][k] / medians["sliced"][k], 2)
              for k in FIGURES if medians["sliced"][k]}
    print(json.dumps({"rows": args.rows, "dims": args.dims, "rounds": args.rounds,
                      "median": medians,
                      "unsliced_over_sliced": ratios}), flush=True)


if __name__ == "__main__":
    main()
