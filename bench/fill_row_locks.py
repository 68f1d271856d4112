"""The app's edits during a migration's fill of an HNSW table: a batch's write in slices
(`[worker] max_row_lock_ms`, 50 ms by default) against the whole batch in one transaction.

Each round runs bench.scale_cycle up to its fill twice, interleaved (the machine's speed
drifts), on the same data: once with the default slices, once with `max_row_lock_ms` so
large that a batch commits at once after its probe slice (what pgreembed did before).
The first model change of a bulk-loaded table is the case: its side writes are non-HOT
(full pages) and file each row's live vector in the HNSW graph again, 1-5 ms a row.
Prints one JSON line per run, then the medians and their ratios (unsliced / sliced).
`--budgets 50,200` runs an arm per `max_row_lock_ms` (the first is "sliced" in the
ratios) besides the unsliced one.

    python -m bench.fill_row_locks --rows 30000 --rounds 3 [--budgets 50]
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


def fill_step(rows: int, max_row_lock_ms: float, edits: float) -> dict[str, Any]:
    """The fill step's JSON line of one bench.scale_cycle run."""
    command = [sys.executable, "-m", "bench.scale_cycle", "--rows", str(rows), "--until",
               "fill", "--baseline", "5", "--edits", str(edits), "--timeout", "1500"]
    command += ["--max-row-lock-ms", str(max_row_lock_ms)]
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--edits", type=float, default=50.0, help="app edits per second")
    parser.add_argument("--budgets", default="50",
                        help="max_row_lock_ms of the sliced arms, comma-separated")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    arms = {"sliced" if i == 0 else f"sliced {b:g} ms": b for i, b in enumerate(budgets)}
    arms["unsliced"] = UNSLICED
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
        for arm in order:
            step = fill_step(args.rows, arms[arm], args.edits)
            runs[arm].append(step)
            print(json.dumps({"round": round_ + 1, "arm": arm}
                             | {k: step.get(k) for k in (*FIGURES, "load_average")}),
                  flush=True)
    medians = {arm: {k: statistics.median(float(r[k]) for r in done if r.get(k) is not None)
                     for k in FIGURES} for arm, done in runs.items()}
    ratios = {k: round(medians["unsliced"][k] / medians["sliced"][k], 2)
              for k in FIGURES if medians["sliced"][k]}
    print(json.dumps({"rows": args.rows, "rounds": args.rounds, "median": medians,
                      "unsliced_over_sliced": ratios}), flush=True)


if __name__ == "__main__":
    main()
