"""Where a local Postgres server's CPU goes during a measured window: `perf` samples of
its processes, by function.

`perf record -a` (software clock, so it works in VMs without hardware counters) runs
while the window runs; a thread notes the server's process ids meanwhile (backends come
and go), and the report keeps the samples of those processes only: other sessions on a
shared machine are left out. Needs `perf` and kernel.perf_event_paranoid <= 2 for root
(or a lower setting for other users); `available()` says whether it can run here.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def available() -> bool:
    """Whether `perf record -e cpu-clock` works on this machine."""
    if shutil.which("perf") is None:
        return False
    try:
        result = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", "/dev/null",
                                 "--", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@dataclass
class ServerProfile:
    """Samples per function (symbol, and the file it is in) of the server's processes."""

    samples: int = 0
    by_symbol: list[tuple[float, str, str]] = field(default_factory=list)  # (share, dso, sym)

    def top(self, count: int = 25) -> list[str]:
        return [f"{share:6.2f}%  {dso:<14} {symbol}"
                for share, dso, symbol in self.by_symbol[:count]]


class _Pids(threading.Thread):
    """The postmaster's process and its children, polled until stopped."""

    def __init__(self, postmaster: int) -> None:
        super().__init__(daemon=True)
        self.postmaster = postmaster
        self.pids: set[int] = {postmaster}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(psutil.NoSuchProcess):
                self.pids.update(p.pid for p in psutil.Process(self.postmaster).children())
            self.halt.wait(0.1)


@contextlib.contextmanager
def recorded(data_dir: Path, output: Path, frequency: int = 499
             ) -> Iterator[ServerProfile]:
    """Record while the block runs; the profile is filled in when it ends."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    pids = _Pids(postmaster)
    pids.start()
    perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(frequency), "-a",
                             "-o", str(output)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    profile = ServerProfile()
    try:
        yield profile
    finally:
        perf.send_signal(2)  # SIGINT: perf writes its file and exits
        perf.wait(120)
        pids.halt.set()
        pids.join()
    report = subprocess.run(
        ["perf", "report", "-i", str(output), "--pid", ",".join(map(str, sorted(pids.pids))),
         "--sort", "dso,sym", "--stdio", "--no-children", "-g", "none"],
        capture_output=True, text=True, timeout=600)
    for line in report.stdout.splitlines():
        if line.startswith("# Samples:"):
            # "# Samples: 12K of event 'cpu-clock'"
            text = line.split()[2]
            scale = {"K": 1e3, "M": 1e6}.get(text[-1], 1)
            profile.samples = int(float(text.rstrip("KM")) * scale)
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%"):
            # "  14.82%  vector.so  [.] vector_negative_inner_product"
            profile.by_symbol.append((float(parts[0].rstrip("%")), parts[1],
                                      " ".join(parts[3:])))
    output.unlink(missing_ok=True)
