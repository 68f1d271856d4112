"""What a slow app statement waited on (issue 25, test 4's "no app query stalled over
100 ms"), from evidence that does not depend on the machine's load:

- per statement, taken by the app's thread around it: its backend's pid, wall start/end,
  and the Linux scheduler's counters (/proc/<pid>/schedstat: CPU time and time spent
  runnable but not running) of the backend and of the app's own thread;
- a sampler in its own process (not behind the app's GIL) reading pg_stat_activity every
  few ms: each non-idle session's wait event, and for a lock wait whom it waits for
  (pg_blocking_pids) and what they run.

`classify` names, for each slow statement, where its time went: a lock held by pgreembed
(which statement), a lock held by the app, an I/O or LWLock wait, the backend runnable
on a busy CPU, or the app's own side (its thread not running: the time is not the
server's). Same machine only (it reads /proc of the server's backends).

    python -m tests.stall_probe DSN OUT_JSONL INTERVAL_S   # the sampler (a subprocess)
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

SAMPLE = """
SELECT extract(epoch FROM clock_timestamp())::float8, a.pid, a.usename,
       a.application_name, a.backend_type, a.state, a.wait_event_type, a.wait_event,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 90),
       CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid) END
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.state IS DISTINCT FROM 'idle'
  AND a.backend_type NOT IN ('walsender', 'background writer', 'checkpointer',
                             'walwriter', 'autovacuum launcher', 'logical replication launcher',
                             'io worker')
"""


def schedstat(path: str) -> tuple[float, float]:
    """(ms on a CPU, ms runnable but waiting for one) of a task, from its schedstat."""
    try:
        with open(path) as f:
            cpu, delay, _ = f.read().split()
        return int(cpu) / 1e6, int(delay) / 1e6
    except (OSError, ValueError):
        return 0.0, 0.0


@dataclass
class Traced:
    """One app statement: what the app's thread saw around it."""

    kind: str
    pid: int
    start: float  # wall clock (time.time), as the sampler's server clock
    end: float
    ms: float
    backend_cpu_ms: float
    backend_runqueue_ms: float
    client_cpu_ms: float
    client_runqueue_ms: float


@dataclass
class Tracer:
    """Wraps the app's statements (one Tracer for all its threads)."""

    traced: list[Traced] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def statement(self, kind: str, conn: psycopg.Connection) -> Iterator[list[float]]:
        """Yields a list that holds the statement's ms once the block is done (the
        scheduler counters are read outside the timed span)."""
        pid = conn.info.backend_pid
        mine = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        b0, c0 = schedstat(f"/proc/{pid}/schedstat"), schedstat(mine)
        took: list[float] = []
        wall, started = time.time(), time.perf_counter()
        try:
            yield took
        except psycopg.Error as exc:  # a lock timeout is a stall too: classified as well
            kind = f"{kind} ({exc.sqlstate})"
            raise
        finally:
            ms = 1000 * (time.perf_counter() - started)
            took.append(ms)
            self._add(kind, pid, wall, ms, b0, c0, mine)

    def _add(self, kind: str, pid: int, wall: float, ms: float, b0: tuple[float, float],
             c0: tuple[float, float], mine: str) -> None:
        b1, c1 = schedstat(f"/proc/{pid}/schedstat"), schedstat(mine)
        with self.lock:
            self.traced.append(Traced(kind, pid, wall, wall + ms / 1000, ms,
                                      b1[0] - b0[0], b1[1] - b0[1], c1[0] - c0[0],
                                      c1[1] - c0[1]))


@contextlib.contextmanager
def sampler(dsn: str, out: Path, interval: float = 0.005) -> Iterator[Path]:
    """The sampler process for the block; its samples in `out` (JSON lines)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "tests.stall_probe", dsn, str(out),
                                str(interval)], env=env)
    try:
        # Its start (an interpreter, imports, a connection) is CPU the measured app would
        # otherwise compete with: the block starts once it samples.
        deadline = time.monotonic() + 30
        while (not out.exists() or out.read_text().count("\n") < 2) \
                and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        yield out
    finally:
        cpu = schedstat(f"/proc/{process.pid}/schedstat")[0]
        with contextlib.suppress(OSError, ValueError, IndexError):
            backend = json.loads(out.read_text().splitlines()[0])["backend_pid"]
            cpu += schedstat(f"/proc/{backend}/schedstat")[0]
        process.terminate()
        process.wait(10)
        probe_cpu_ms.append(cpu)


probe_cpu_ms: list[float] = []  # the last samplers' CPU (its process and its backend)


def _sample_forever(dsn: str, out: Path, interval: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, out.open("w") as f:
        conn.execute("SET application_name = 'stall_probe'")
        f.write(json.dumps({"backend_pid": conn.info.backend_pid}) + "\n")
        f.flush()
        while True:
            rows = conn.execute(SAMPLE).fetchall()
            f.write(json.dumps([list(r) for r in rows]) + "\n")
            time.sleep(interval)


def read_samples(path: Path) -> list[list[list[Any]]]:
    samples = []
    with path.open() as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):  # the last line, cut by SIGTERM
                sample = json.loads(line)
                if isinstance(sample, list):  # the first line names the sampler's backend
                    samples.append(sample)
    return samples


def classify(traced: list[Traced], samples: list[list[list[Any]]], ours: str,
             over_ms: float = 100.0, near_ms: float = 50.0) -> dict[str, Any]:
    """Each statement over `near_ms`: its time split by cause (ms; sampled waits scaled
    to the statement's time on the server), and its dominant cause. `ours` is
    pgreembed's role. Returns the statements and a count of dominant causes of those
    over `over_ms` and of those over `near_ms`."""
    by_pid: dict[int, list[tuple[float, list[Any]]]] = {}
    for sample in samples:
        for row in sample:
            ts, pid, user, _app, btype, _state, _wtype, _wevent, query, _blockers = row
            by_pid.setdefault(pid, []).append((ts, row))
    slow = []
    for t in sorted(traced, key=lambda t: -t.ms):
        if t.ms <= near_ms:
            break
        rows = [row for ts, row in by_pid.get(t.pid, []) if t.start <= ts <= t.end]
        waits: dict[str, int] = {}
        for row in rows:
            ts, wtype, wevent, blockers = row[0], row[6], row[7], row[9]
            if wtype == "Lock":
                whose = []
                for b in blockers or []:
                    found = _session_at(samples_index(samples), b, ts)
                    if found is None:
                        whose.append("?")
                        continue
                    role, btype, query = found
                    who = ("pgreembed" if role == ours else "autovacuum"
                           if btype.startswith("autovacuum") else "app")
                    whose.append(f"{who}: {query[:60]}")
                label = f"Lock:{wevent} behind " + " | ".join(sorted(set(whose)) or ["?"])
            elif wtype:
                label = f"{wtype}:{wevent}"
            else:
                label = "running (no wait event)"
            waits[label] = waits.get(label, 0) + 1
        seen = sum(waits.values())
        server_ms = max(0.0, t.ms - t.client_runqueue_ms)
        parts: dict[str, float] = {}
        wait_ms = 0.0
        for label, n in waits.items():
            if label == "running (no wait event)":
                continue
            ms = server_ms * n / seen if seen else 0.0
            parts[label] = round(ms, 1)
            wait_ms += ms
        parts["backend runnable, not running (CPU)"] = round(t.backend_runqueue_ms, 1)
        parts["backend on CPU"] = round(t.backend_cpu_ms, 1)
        parts["app thread runnable, not running (CPU)"] = round(t.client_runqueue_ms, 1)
        rest = t.ms - wait_ms - t.backend_runqueue_ms - t.backend_cpu_ms \
            - t.client_runqueue_ms
        parts["app side otherwise (GIL, network)"] = round(max(0.0, rest), 1)
        cause = max(parts, key=lambda k: parts[k])
        slow.append({"kind": t.kind, "ms": round(t.ms, 1), "pid": t.pid,
                     "at": time.strftime("%H:%M:%S", time.gmtime(t.start))
                     + f".{int(t.start * 1000) % 1000:03d}",
                     "samples": seen, "cause": cause, "parts": parts})
    lock_waits = _lock_waits(traced, by_pid, ours)
    totals: dict[str, dict[str, float]] = {}
    for t in traced:
        k = totals.setdefault(t.kind.split(" ")[0], {"count": 0, "ms": 0.0,
                                                     "backend_runqueue_ms": 0.0,
                                                     "app_thread_runqueue_ms": 0.0})
        k["count"] += 1
        k["ms"] += t.ms
        k["backend_runqueue_ms"] += t.backend_runqueue_ms
        k["app_thread_runqueue_ms"] += t.client_runqueue_ms
    return {"totals": {kind: {n: round(v, 1) for n, v in k.items()}
                       for kind, k in totals.items()},
            "lock_waits": lock_waits,
            "slow": slow,
            f"causes_over_{over_ms:g}_ms": _count([s for s in slow if s["ms"] > over_ms]),
            f"causes_over_{near_ms:g}_ms": _count(slow)}


def _lock_waits(traced: list[Traced], by_pid: dict[int, list[tuple[float, list[Any]]]],
                ours: str) -> dict[str, dict[str, float]]:
    """Over every statement (not only the slow ones): the samples it spent waiting on a
    lock, by the holder's kind (pgreembed's row locks: the chunk stage; pgreembed's
    table locks: migration steps; the app; autovacuum), and the most samples one
    statement spent behind each: multiply by the sampling interval for ms."""
    out: dict[str, dict[str, float]] = {}
    for t in traced:
        rows = by_pid.get(t.pid, [])
        first = bisect.bisect_left(rows, t.start, key=lambda r: r[0])
        seen: dict[str, int] = {}
        for ts, row in rows[first:]:
            if ts > t.end:
                break
            if row[6] != "Lock":
                continue
            holders = {b for b in row[9] or []}
            kinds = set()
            for b in holders:
                found = _session_at(samples_index_of(by_pid), b, ts)
                role, btype = (found[0], found[1]) if found else ("?", "")
                kinds.add(("pgreembed row lock" if row[7] in ("transactionid", "tuple")
                           else "pgreembed table lock") if role == ours
                          else "autovacuum" if btype.startswith("autovacuum") else "app")
            for kind in kinds or {"?"}:
                seen[kind] = seen.get(kind, 0) + 1
        for kind, n in seen.items():
            k = out.setdefault(kind, {"samples": 0, "statements": 0, "most_in_one": 0})
            k["samples"] += n
            k["statements"] += 1
            k["most_in_one"] = max(k["most_in_one"], n)
    return out


def samples_index_of(by_pid: dict[int, list[tuple[float, list[Any]]]]
                     ) -> dict[int, list[tuple[float, tuple[str, str, str]]]]:
    """pid -> [(time, (role, backend_type, query))] from the rows by pid, built once."""
    key = id(by_pid)
    if key not in _INDEX:
        _INDEX.clear()
        _INDEX[key] = {pid: [(ts, (row[2] or "", row[4] or "", row[8] or ""))
                             for ts, row in rows] for pid, rows in by_pid.items()}
    return _INDEX[key]


def _count(slow: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in slow:
        out[s["cause"]] = out.get(s["cause"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


_INDEX: dict[int, dict[int, list[tuple[float, tuple[str, str, str]]]]] = {}


def samples_index(samples: list[list[list[Any]]]
                  ) -> dict[int, list[tuple[float, tuple[str, str, str]]]]:
    """pid -> [(time, (role, backend_type, query))], built once per samples list."""
    key = id(samples)
    if key not in _INDEX:
        index: dict[int, list[tuple[float, tuple[str, str, str]]]] = {}
        for sample in samples:
            for row in sample:
                index.setdefault(row[1], []).append(
                    (row[0], (row[2] or "", row[4] or "", row[8] or "")))
        _INDEX.clear()
        _INDEX[key] = index
    return _INDEX[key]


def _session_at(index: dict[int, list[tuple[float, tuple[str, str, str]]]], pid: int,
                ts: float) -> tuple[str, str, str] | None:
    """The blocker's row in the same sample (or the nearest one)."""
    rows = index.get(pid)
    if not rows:
        return None
    return min(rows, key=lambda r: abs(r[0] - ts))[1]


if __name__ == "__main__":
    _sample_forever(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))
