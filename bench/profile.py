"""Profile the worker's hot path with py-spy (sampling, all worker processes, CPU only).

py-spy starts `dramatiq worker` as its child and follows its forked processes;
only samples of threads running Python code or in C calls count (idle threads
waiting on sockets are left out), so the table is where the CPU time goes.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_OURS = ("/pgreembed/", "/worker/", "/scheduler/")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else None


def wrapper(output: Path, rate: int = 100) -> list[str]:
    """The command prefix that records the wrapped command and its subprocesses."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return [binary, "record", "--subprocesses", "--format", "raw", "--nonblocking",
            "--rate", str(rate), "--output", str(output), "--"]


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


# Frames of one-off start-up work (imports, building the provider client and tokenizer).
_STARTUP = ("<module>", "make_provider (")


@dataclass
class Profile:
    """Sample counts of the steady state; start-up samples are counted apart."""

    samples: int
    startup_samples: int
    self_time: Counter[str]
    inclusive: Counter[str]

    def table(self, counter: Counter[str], top: int, only_ours: bool = False) -> list[str]:
        lines = []
        for name, count in counter.most_common():
            if only_ours and not any(m.strip("/") + "/" in name for m in _OURS):
                continue
            lines.append(f"  {100 * count / self.samples:5.1f}%  {name}")
            if len(lines) == top:
                break
        return lines


def parse(path: Path) -> Profile:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = startup = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        count = int(match.group("count"))
        frames = [_short(f) for f in match.group("stack").split(";")
                  if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(f.startswith(_STARTUP) for f in frames):
            startup += count
            continue
        samples += count
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return Profile(samples, startup, self_time, inclusive)
