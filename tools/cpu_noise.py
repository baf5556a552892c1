"""CPU time that other processes took while a benchmark ran (the machines here are shared)."""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK


def _children(pid: int) -> list[int]:
    # Every thread's children: a process started from a worker thread is listed under it.
    kids = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return kids


def _tree_cpu_s(root: int, seen: set[int]) -> float:
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime (the last two: reaped children of this process)
        total += sum(int(x) for x in parts[11:15]) / _TICK
        stack.extend(_children(pid))
    return total


class CpuNoise:
    """Context manager: `.other_cpu_s` is the CPU time used by processes outside ours."""

    def __init__(self, extra_pids: tuple[int, ...] = ()) -> None:
        self.roots = (os.getpid(), *extra_pids)
        self.other_cpu_s = 0.0
        self.wall_s = 0.0

    def _ours(self) -> float:
        seen: set[int] = set()
        return sum(_tree_cpu_s(p, seen) for p in self.roots)

    def __enter__(self) -> CpuNoise:
        self._t0, self._busy0, self._ours0 = time.monotonic(), _machine_busy_s(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.monotonic() - self._t0
        busy = _machine_busy_s() - self._busy0
        ours = self._ours() - self._ours0
        self.other_cpu_s = max(0.0, busy - ours)

    def summary(self) -> str:
        cores = os.cpu_count() or 1
        pct = 100.0 * self.other_cpu_s / max(1e-9, self.wall_s * cores)
        return f"other processes used {self.other_cpu_s:.2f} CPU-s ({pct:.1f}% of the machine) during {self.wall_s:.1f} s"
