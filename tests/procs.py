"""Process lookups the tests share: children by parent pid, and liveness that sees zombies."""

import os


def child_pids(pid: int) -> list[int]:
    """Every live process whose parent is `pid`, whichever of its threads started it.

    Reads the parent pid from /proc/*/stat rather than /proc/pid/task/*/children, which
    misses children of a thread that exits mid-scan and can vanish while it is read."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(name))
    return kids


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
