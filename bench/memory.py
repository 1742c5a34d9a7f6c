"""Memory of a process tree, for the benchmarks: the summed RSS (and VmHWM, PSS) of a
parent and its workers, sampled from /proc while a load runs. Used by matrix.py, ab.py,
compare.py and soak.py."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def process_tree(root: int) -> list[int]:
    """root and all its descendants (the proxy parent and its forked workers)."""
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(_children(pid))
    return tree


def status_kib(pid: int, key: bytes) -> int:
    """A /proc/PID/status value in KiB (key e.g. b"VmRSS:"); 0 when the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


@dataclass
class MemoryPeak:
    rss: int = 0  # highest sampled sum of RSS over the tree, bytes
    pss: int = 0  # highest sampled sum of PSS (shared pages split between sharers), bytes
    hwm: int = 0  # sum of each process's own VmHWM over the window (an upper bound), bytes
    processes: int = 0


class MemorySampler:
    """Samples the summed RSS of a process tree in a thread while a cell runs.

    The sum counts pages shared copy-on-write between the parent and its workers once per
    process, so it overstates the real total a little; PSS (optional, costlier to read) splits
    them. Sampling can miss a spike shorter than the interval, so each process's peak
    (VmHWM, reset at the start of the window through clear_refs) is summed as well: the true
    peak of the total lies between `rss` and `hwm`.
    """

    def __init__(self, root: int, interval: float = 0.02, pss: bool = False) -> None:
        self.root = root
        self.interval = interval
        self.pss = pss

    @contextlib.contextmanager
    def window(self) -> Iterator[MemoryPeak]:
        peak = MemoryPeak()
        pids = process_tree(self.root)
        peak.processes = len(pids)
        for pid in pids:  # "5" resets the peak RSS (VmHWM) to the current RSS
            with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")
        stop = threading.Event()

        def sample() -> None:
            while True:
                rss = pss = 0
                for pid in pids:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        with open(f"/proc/{pid}/statm", "rb") as statm:
                            rss += int(statm.read().split()[1]) * PAGE
                        if self.pss:
                            with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
                                for line in rollup:
                                    if line.startswith(b"Pss:"):
                                        pss += int(line.split()[1]) * 1024
                                        break
                peak.rss = max(peak.rss, rss)
                peak.pss = max(peak.pss, pss)
                if stop.wait(self.interval):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield peak
        finally:
            stop.set()
            thread.join()
            peak.hwm = sum(status_kib(pid, b"VmHWM:") * 1024 for pid in pids)
            peak.hwm = max(peak.hwm, peak.rss)
