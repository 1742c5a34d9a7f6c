#!/usr/bin/env python3
"""The whole dkproxy benchmark in one command: throughput, added latency and memory.

    .venv/bin/python bench/matrix.py            # full matrix, 5-7 minutes on a 2-core machine
    .venv/bin/python bench/matrix.py --quick    # ~1 minute smoke version

One smtp-sink and three `dkproxy out` instances (DKIM rsa-sha256; DKIM + DomainKeys; DKIM
rsa-sha256 + ed25519-sha256) run for the whole matrix; each cell drives one of them, or the sink
directly (the baseline), so every figure in a row comes from the same run and the same load.

* Throughput: Postfix smtp-source, one message per SMTP session by default (as in DKIMproxy's
  measured figures), for every message size x session count; a second table keeps sessions
  open (smtp-source -d). Messages/s = messages / wall time of smtp-source. A short probe run
  (also the warm-up) sizes each cell to take about --seconds.
* Latency: bench/loadgen.py offers --latency-rate messages/s (open loop) over persistent
  connections and times each message from MAIL FROM to the 250 after DATA; the added latency
  is the proxy's p50/p99 minus the direct p50/p99 measured in the same run.
* Memory: the summed RSS of the proxy's process tree (parent + workers), sampled from /proc
  during every cell. A dedicated cell sends 100 x 1 MB at once through a fresh proxy.

Writes bench/results/matrix.md (also printed), matrix.json and, when matplotlib is installed,
matrix.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_out import free_port, start_sink, tool, wait_port, write_key

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1_000_000  # message sizes and MB/s are decimal; memory is reported in MiB
MIB = 1 << 20

SIZES: dict[str, int] = {
    "1 KB": 1_000,
    "3 KB": 3_000,
    "100 KB": 100_000,
    "1 MB": 1_000_000,
    "10 MB": 10_000_000,
}
SESSIONS = (1, 8, 32)
#: Column name -> --signature options (ED_KEY is replaced by the Ed25519 key file).
SIGNATURE_SETS: dict[str, list[str]] = {
    "DKIM": ["dkim(c=relaxed,a=rsa-sha256)"],
    "DKIM + DK": ["dkim(c=relaxed,a=rsa-sha256)", "domainkeys(c=nofws)"],
    "RSA + Ed25519": [
        "dkim(c=relaxed,a=rsa-sha256)",
        "dkim(c=relaxed,a=ed25519-sha256,key=ED_KEY,s=ed)",
    ],
}
DIRECT = "direct"
TARGET_SET = "DKIM + DK"


# --- memory -----------------------------------------------------------------------------


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


def _status_kib(pid: int, key: bytes) -> int:
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
            peak.hwm = sum(_status_kib(pid, b"VmHWM:") * 1024 for pid in pids)
            peak.hwm = max(peak.hwm, peak.rss)


# --- processes --------------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    sampler: MemorySampler


def start_proxy(
    name: str,
    signatures: list[str],
    keys: dict[str, Path],
    relay_port: int,
    workers: int,
    logdir: Path,
    tree: Path = ROOT,
    pss: bool = False,
) -> Proxy:
    """Start `dkproxy out` from the source tree `tree`; returns once it logged "listening on"."""
    port = free_port()
    log = logdir / f"proxy-{name.replace(' ', '').replace('+', '-').lower()}-{port}.log"
    command = [
        sys.executable,
        "-m",
        "dkproxy",
        "out",
        f"--keyfile={keys['rsa']}",
        "--selector=bench",
        "--domain=example.org",
        *[f"--signature={spec.replace('ED_KEY', str(keys['ed25519']))}" for spec in signatures],
        *([f"--workers={workers}"] if workers else []),
        f"127.0.0.1:{port}",
        f"127.0.0.1:{relay_port}",
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.monotonic() + 20
    while b"listening on" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"matrix: dkproxy ({name}) did not start:\n{log.read_text()}")
        time.sleep(0.05)
    wait_port(port)
    time.sleep(0.3)  # let every worker reach accept()
    return Proxy(name, port, process, log, MemorySampler(process.pid, pss=pss))


def stop_proxy(proxy: Proxy) -> None:
    if proxy.process.poll() is None:
        proxy.process.send_signal(signal.SIGTERM)
        try:
            proxy.process.wait(35)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait()


# --- cells ------------------------------------------------------------------------------


@dataclass
class Throughput:
    target: str
    size: int
    sessions: int
    keep_open: bool
    messages: int
    seconds: float  # of the best run
    rate: float  # messages/s, best run
    mbytes_per_s: float  # best run
    peak_rss_mib: float | None  # None for the direct baseline; highest over the runs
    warnings: int = 0
    error: str = ""  # why the cell failed (then rate is 0)
    runs: list[float] = field(default_factory=list)  # messages/s of every measured run


def smtp_source(
    port: int, messages: int, sessions: int, size: int, keep_open: bool
) -> tuple[float, int]:
    """Run smtp-source; returns (wall seconds, warning lines it printed)."""
    options = f"-s {sessions} -m {messages} -l {size} -f alice@example.org -t bob@example.net"
    command = [tool("smtp-source"), *options.split(), *(["-d"] * keep_open), f"127.0.0.1:{port}"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source {' '.join(command[1:])} failed: {result.stderr}")
    return elapsed, sum(1 for line in result.stderr.splitlines() if line.strip())


def cell_size(sessions: int, size: int, seconds: float, rate: float | None) -> tuple[int, int]:
    """(probe messages, measured messages): the probe warms up and estimates the rate."""
    probe = max(2, min(200, 20 * MB // size))
    if rate is None:
        return probe, 0
    floor = max(sessions, 4 if size >= 10 * MB else 16)
    ceiling = 40 if size >= 10 * MB else 20_000  # 10 MB x 40 = 400 MB per run is plenty
    return probe, max(floor, min(ceiling, round(rate * seconds)))


def _probe(port: int, size: int, sessions: int, keep_open: bool, seconds: float) -> int:
    """Warm up and size the measured run: returns how many messages take about `seconds`."""
    probe, _ = cell_size(sessions, size, seconds, None)
    probe_sessions = min(sessions, probe)
    elapsed, _ = smtp_source(port, probe, probe_sessions, size, keep_open)
    # A probe with fewer sessions underestimates the rate; scale it by the session ratio,
    # capped, so that the measured run stays short.
    estimate = probe / elapsed * min(4.0, sessions / probe_sessions)
    return cell_size(sessions, size, seconds, estimate)[1]


def throughput_row(
    targets: dict[str, tuple[int, Proxy | None]],
    size: int,
    sessions: int,
    keep_open: bool,
    seconds: float,
    repeat: int,
) -> list[Throughput]:
    """One cell per target (name -> port, proxy) for the same load.

    The runs are interleaved (direct, proxy 1, proxy 2, ..., then again) so that a burst of
    load from elsewhere on the machine hits every column alike; the best run is reported,
    as outside load can only ever slow a run down. A failure (the proxy dropping connections,
    say) is recorded in the cell, not raised.
    """
    cells: dict[str, Throughput] = {}
    for name, (port, _) in targets.items():
        cells[name] = Throughput(name, size, sessions, keep_open, 0, 0, 0, 0, None)
        try:
            cells[name].messages = _probe(port, size, sessions, keep_open, seconds)
        except RuntimeError as exc:
            cells[name].error = str(exc).strip().splitlines()[-1]
    for _ in range(repeat):
        for name, (port, proxy) in targets.items():
            cell = cells[name]
            if cell.error:
                continue
            memory = (
                contextlib.nullcontext(MemoryPeak()) if proxy is None else proxy.sampler.window()
            )
            try:
                with memory as peak:
                    elapsed, warnings = smtp_source(port, cell.messages, sessions, size, keep_open)
            except RuntimeError as exc:
                cell.error = str(exc).strip().splitlines()[-1]
                continue
            rate = cell.messages / elapsed
            cell.runs.append(round(rate, 1))
            cell.warnings += warnings
            if proxy is not None:
                cell.peak_rss_mib = max(cell.peak_rss_mib or 0.0, peak.rss / MIB)
            if rate > cell.rate:
                cell.rate, cell.seconds = rate, elapsed
                cell.mbytes_per_s = cell.messages * size / elapsed / MB
    for cell in cells.values():
        if cell.error:
            cell.rate = cell.mbytes_per_s = 0.0
    return list(cells.values())


@dataclass
class Latency:
    target: str
    offered: float
    achieved: float
    delivered: int
    messages: int
    p50_ms: float
    p99_ms: float
    queue_p99_ms: float
    peak_rss_mib: float | None
    errors: dict[str, int] = field(default_factory=dict)
    error: str = ""  # why the cell failed


def loadgen(port: int, *options: str) -> dict[str, object]:
    command = [sys.executable, str(BENCH / "loadgen.py"), f"127.0.0.1:{port}", "--json", *options]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):  # 1: some messages failed, reported in the result
        raise RuntimeError(f"loadgen failed: {result.stderr}")
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _number(data: dict[str, object], *path: str) -> float:
    value: object = data
    for key in path:
        assert isinstance(value, dict)
        value = value[key]
    assert isinstance(value, int | float)
    return float(value)


def latency(
    target: str, port: int, proxy: Proxy | None, rate: float, seconds: float, connections: int
) -> Latency:
    load = ["--rate", str(rate), "--connections", str(connections)]
    try:
        loadgen(port, *load, "--messages", str(int(rate / 2)))  # warm-up
        memory = contextlib.nullcontext(MemoryPeak()) if proxy is None else proxy.sampler.window()
        with memory as peak:
            data = loadgen(port, *load, "--messages", str(int(rate * seconds)))
    except RuntimeError as exc:
        error = str(exc).strip().splitlines()[-1]
        return Latency(target, rate, 0, 0, int(rate * seconds), 0, 0, 0, None, {}, error)
    errors = data.get("errors")
    return Latency(
        target=target,
        offered=rate,
        achieved=_number(data, "achieved_rate"),
        delivered=int(_number(data, "delivered")),
        messages=int(_number(data, "messages")),
        p50_ms=_number(data, "latency_ms", "p50"),
        p99_ms=_number(data, "latency_ms", "p99"),
        queue_p99_ms=_number(data, "queue_ms", "p99"),
        peak_rss_mib=None if proxy is None else peak.rss / MIB,
        errors={str(k): int(v) for k, v in errors.items()} if isinstance(errors, dict) else {},
    )


@dataclass
class MemoryCell:
    sessions: int
    size: int
    bursts: int
    delivered: int
    messages: int
    rss_mib: float
    hwm_mib: float
    pss_mib: float
    idle_rss_mib: float
    processes: int


def memory_cell(proxy: Proxy, sessions: int, size: int, bursts: int) -> MemoryCell:
    idle = sum(_status_kib(pid, b"VmRSS:") for pid in process_tree(proxy.process.pid)) * 1024
    delivered = 0
    with proxy.sampler.window() as peak:
        for _ in range(bursts):
            data = loadgen(
                proxy.port,
                "--rate",
                "0",
                "--messages",
                str(sessions),
                "--connections",
                str(sessions),
                "--size",
                str(size),
            )
            delivered += int(_number(data, "delivered"))
    return MemoryCell(
        sessions,
        size,
        bursts,
        delivered,
        sessions * bursts,
        peak.rss / MIB,
        peak.hwm / MIB,
        peak.pss / MIB,
        idle / MIB,
        peak.processes,
    )


# --- report -----------------------------------------------------------------------------


@dataclass
class Run:
    started: str
    quick: bool
    host: str
    python: str
    revision: str
    workers: str
    load_before: str
    load_after: str = ""
    minutes: float = 0.0
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    memory: list[MemoryCell] = field(default_factory=list)


def _size_name(size: int) -> str:
    return next((name for name, value in SIZES.items() if value == size), f"{size} B")


def _cell(cell: Throughput | None, with_mbps: bool) -> str:
    if cell is None:
        return "-"
    if cell.error:
        return "failed"
    text = f"{cell.rate:,.0f}" if cell.rate >= 10 else f"{cell.rate:.1f}"
    if with_mbps:
        text += f" · {cell.mbytes_per_s:.0f} MB/s"
    return text + (" ⚠" if cell.warnings else "")


def _find(run: Run, target: str, size: int, sessions: int, keep_open: bool) -> Throughput | None:
    return next(
        (
            c
            for c in run.throughput
            if (c.target, c.size, c.sessions, c.keep_open) == (target, size, sessions, keep_open)
        ),
        None,
    )


def targets(run: Run) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (what, measured, met?); None when the quick run skipped it."""
    rows: list[tuple[str, str, bool | None]] = []
    cell = _find(run, TARGET_SET, SIZES["3 KB"], 8, False)
    rows.append(
        (
            "≥ 800 messages/s: DKIM rsa-sha256 + DomainKeys, 3 KB, 8 sessions",
            f"{cell.rate:,.0f} messages/s" if cell else "not run",
            cell.rate >= 800 if cell else None,
        )
    )
    direct = next((c for c in run.latency if c.target == DIRECT), None)
    proxied = next((c for c in run.latency if c.target == TARGET_SET), None)
    if direct and proxied and proxied.error:
        rows.append(("p99 added latency ≤ 20 ms", f"failed: {proxied.error}", False))
    elif direct and proxied:
        added = proxied.p99_ms - direct.p99_ms
        rows.append(
            (
                f"p99 added latency ≤ 20 ms at {proxied.offered:.0f} messages/s offered "
                "(DKIM + DK, 3 KB)",
                f"{added:.1f} ms (p99 {proxied.p99_ms:.1f} ms vs {direct.p99_ms:.1f} ms "
                f"direct; {proxied.achieved:.0f}/s achieved)",
                added <= 20 and proxied.achieved >= 0.97 * proxied.offered,
            )
        )
    else:
        rows.append(("p99 added latency ≤ 20 ms at 400 messages/s offered", "not run", None))
    cell = _find(run, TARGET_SET, SIZES["10 MB"], 8, False)
    best = max(
        (c for c in run.throughput if c.target == TARGET_SET and c.size == SIZES["10 MB"]),
        key=lambda c: c.mbytes_per_s,
        default=None,
    )
    measured = f"{cell.mbytes_per_s:.1f} MB/s at 8 sessions" if cell else "not run"
    if cell and best and best is not cell:
        measured += f" (best {best.mbytes_per_s:.1f} MB/s at {best.sessions})"
    rows.append(
        (
            "≥ 40 MB/s of message data, 10 MB messages (DKIM + DK)",
            measured,
            cell.mbytes_per_s >= 40 if cell else None,
        )
    )
    memory = run.memory[0] if run.memory else None
    rows.append(
        (
            f"peak memory ≤ 200 MB in total, {memory.sessions if memory else 100} sessions "
            "sending 1 MB at once (DKIM + DK)",
            f"{memory.rss_mib:.0f} MiB RSS sum sampled, ≤ {memory.hwm_mib:.0f} MiB sum of "
            f"per-process peaks, {memory.pss_mib:.0f} MiB PSS"
            if memory
            else "not run",
            memory.hwm_mib * MIB <= 200 * MB if memory else None,
        )
    )
    return rows


def markdown(run: Run) -> str:
    sets = [DIRECT, *SIGNATURE_SETS]
    out = [
        "# dkproxy benchmark",
        "",
        f"{run.started}, {run.host}, Python {run.python}, dkproxy {run.revision}, "
        f"workers: {run.workers}; load average before {run.load_before}, after "
        f"{run.load_after}; {run.minutes:.1f} min{' (--quick)' if run.quick else ''}. "
        "smtp-source, smtp-sink, loadgen and dkproxy share the machine.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for what, measured, met in targets(run):
        out.append(f"| {what} | {measured} | {'-' if met is None else 'yes' if met else 'NO'} |")

    for keep_open, title in (
        (False, "one message per SMTP session"),
        (True, "many messages per SMTP session (smtp-source -d)"),
    ):
        cells = [c for c in run.throughput if c.keep_open == keep_open]
        if not cells:
            continue
        rows = sorted({(c.size, c.sessions) for c in cells})
        out += [
            "",
            f"## Throughput, messages/s: {title}",
            "",
            "| size | sessions | " + " | ".join(sets) + " |",
            "|---|--:|" + "--:|" * len(sets),
        ]
        for size, sessions in rows:
            values = [
                _cell(_find(run, name, size, sessions, keep_open), size >= MB) for name in sets
            ]
            out.append(f"| {_size_name(size)} | {sessions} | " + " | ".join(values) + " |")

    cells = [c for c in run.throughput if c.peak_rss_mib is not None and not c.keep_open]
    if cells:
        out += [
            "",
            "## Peak RSS of dkproxy (parent + workers, summed), MiB",
            "",
            "| size | sessions | " + " | ".join(SIGNATURE_SETS) + " |",
            "|---|--:|" + "--:|" * len(SIGNATURE_SETS),
        ]
        for size, sessions in sorted({(c.size, c.sessions) for c in cells}):
            values = []
            for name in SIGNATURE_SETS:
                found = _find(run, name, size, sessions, False)
                values.append(f"{found.peak_rss_mib:.0f}" if found and found.peak_rss_mib else "-")
            out.append(f"| {_size_name(size)} | {sessions} | " + " | ".join(values) + " |")

    if run.latency:
        direct = next((c for c in run.latency if c.target == DIRECT), None)
        first = run.latency[0]
        out += [
            "",
            f"## Latency at {first.offered:.0f} messages/s offered, 3 KB "
            "(loadgen, persistent connections), ms",
            "",
            "| path | achieved/s | p50 | p99 | added p50 | added p99 | queue p99 | peak RSS MiB |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for cell in run.latency:
            if cell.error:
                out.append(f"| {cell.target} | failed: {cell.error} |" + " - |" * 6)
                continue
            added = (
                f"{cell.p50_ms - direct.p50_ms:.2f} | {cell.p99_ms - direct.p99_ms:.2f}"
                if direct and cell is not direct
                else "- | -"
            )
            rss = f"{cell.peak_rss_mib:.0f}" if cell.peak_rss_mib else "-"
            failed = f" ({cell.messages - cell.delivered} failed)" if cell.errors else ""
            out.append(
                f"| {cell.target} | {cell.achieved:.0f}{failed} | {cell.p50_ms:.2f} | "
                f"{cell.p99_ms:.2f} | {added} | {cell.queue_p99_ms:.2f} | {rss} |"
            )

    for cell in run.memory:
        out += [
            "",
            f"## Memory: {cell.sessions} sessions each sending one "
            f"{_size_name(cell.size)} message at once ({cell.bursts} bursts, fresh "
            "DKIM + DK proxy)",
            "",
            "| processes | idle RSS | peak RSS sum (sampled) | sum of per-process peaks "
            "(VmHWM) | peak PSS sum | delivered |",
            "|--:|--:|--:|--:|--:|--:|",
            f"| {cell.processes} | {cell.idle_rss_mib:.0f} MiB | {cell.rss_mib:.0f} MiB | "
            f"{cell.hwm_mib:.0f} MiB | {cell.pss_mib:.0f} MiB | "
            f"{cell.delivered}/{cell.messages} |",
        ]

    out += [
        "",
        "Sizes are smtp-source -l body bytes (decimal: 1 MB = 10^6 bytes); MB/s counts "
        "body bytes. ⚠: smtp-source printed warnings (failed or refused messages). "
        "See bench/README.md for what each column means.",
        "",
    ]
    return "\n".join(out)


def plot(run: Run, path: Path) -> bool:
    """Throughput by size and by sessions, latency and memory; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    sets = [DIRECT, *SIGNATURE_SETS]
    per_conn = [c for c in run.throughput if not c.keep_open]
    sessions = 8 if any(c.sessions == 8 for c in per_conn) else max(c.sessions for c in per_conn)
    ax = axes[0][0]
    for name in sets:
        cells = sorted(
            (c for c in per_conn if c.target == name and c.sessions == sessions),
            key=lambda c: c.size,
        )
        ax.plot([c.size for c in cells], [c.rate for c in cells], marker="o", label=name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="message size, bytes",
        ylabel="messages/s",
        title=f"Throughput by message size ({sessions} sessions, one message per session)",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[0][1]
    three_kb = [c for c in per_conn if c.size == SIZES["3 KB"]]
    for name in sets:
        cells = sorted((c for c in three_kb if c.target == name), key=lambda c: c.sessions)
        ax.plot([c.sessions for c in cells], [c.rate for c in cells], marker="o", label=name)
    ax.axhline(800, color="grey", linestyle="--", linewidth=1, label="target 800/s")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions",
        ylabel="messages/s",
        title="Throughput by sessions (3 KB)",
    )
    counts = sorted({c.sessions for c in three_kb})
    ax.set_xticks(counts, [str(count) for count in counts])
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1][0]
    if run.latency:
        names = [c.target for c in run.latency]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [c.p50_ms for c in run.latency], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [c.p99_ms for c in run.latency], 0.4, label="p99")
        ax.set_xticks(list(xs), names)
        ax.set(
            ylabel="ms, MAIL FROM -> 250 after DATA",
            title=f"Latency at {run.latency[0].offered:.0f} messages/s offered (3 KB)",
        )
        ax.legend()
    ax = axes[1][1]
    for name in SIGNATURE_SETS:
        cells = sorted(
            (c for c in per_conn if c.target == name and c.sessions == sessions),
            key=lambda c: c.size,
        )
        ax.plot(
            [c.size for c in cells], [c.peak_rss_mib or 0 for c in cells], marker="o", label=name
        )
    ax.axhline(200 * MB / MIB, color="grey", linestyle="--", linewidth=1, label="200 MB")
    for cell in run.memory:
        ax.scatter(
            [cell.size],
            [cell.rss_mib],
            marker="*",
            s=150,
            color="black",
            label=f"{cell.sessions} x {_size_name(cell.size)} at once",
        )
    ax.set(
        xscale="log",
        xlabel="message size, bytes",
        ylabel="MiB",
        title=f"Peak RSS of dkproxy, parent + workers ({sessions} sessions)",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"dkproxy benchmark {run.started} ({run.revision})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _revision(tree: Path) -> str:
    if tree.resolve() != ROOT:
        return f"from {tree}"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "dkproxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke version")
    parser.add_argument("--workers", type=int, default=0, help="dkproxy workers (0: its default)")
    parser.add_argument("--seconds", type=float, help="target length of a throughput run")
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per throughput cell, the best is shown (default 2; quick 1)",
    )
    parser.add_argument("--latency-rate", type=float, default=400.0, help="messages/s offered")
    parser.add_argument("--latency-seconds", type=float, help="length of a latency cell")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="output directory")
    parser.add_argument("--no-plot", action="store_true", help="skip matrix.png")
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="directory holding the dkproxy package to run"
    )
    args = parser.parse_args(argv)

    if args.quick:
        sizes = [SIZES["3 KB"], SIZES["100 KB"], SIZES["10 MB"]]
        sessions, keep_open_sessions = (1, 8), (8,)
        seconds, latency_seconds, bursts = args.seconds or 0.6, args.latency_seconds or 2, 1
        args.repeat = args.repeat or 1
    else:
        sizes, sessions, keep_open_sessions = list(SIZES.values()), SESSIONS, SESSIONS
        seconds, latency_seconds, bursts = args.seconds or 2.0, args.latency_seconds or 5, 3
        args.repeat = args.repeat or 2
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    run = Run(
        started=time.strftime("%Y-%m-%d %H:%M %Z"),
        quick=args.quick,
        host=f"{platform.node()} ({os.cpu_count()} CPUs)",
        python=platform.python_version(),
        revision=_revision(args.tree),
        workers=str(args.workers or f"default ({os.cpu_count()})"),
        load_before=_loadavg(),
    )

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="dkproxy-matrix-") as tmp:
        keys = {kind: write_key(Path(tmp) / f"{kind}.key", kind) for kind in ("rsa", "ed25519")}
        sink_port = free_port()
        sink = start_sink(sink_port)
        proxies: dict[str, Proxy] = {}
        try:
            for name, specs in SIGNATURE_SETS.items():
                proxies[name] = start_proxy(
                    name, specs, keys, sink_port, args.workers, args.out, args.tree
                )

            def port_of(name: str) -> int:
                return sink_port if name == DIRECT else proxies[name].port

            columns = [DIRECT, *SIGNATURE_SETS]
            for name in columns:
                cell = latency(
                    name,
                    port_of(name),
                    proxies.get(name),
                    args.latency_rate,
                    latency_seconds,
                    connections=8,
                )
                run.latency.append(cell)
                progress(
                    f"latency {name}: p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, "
                    f"{cell.achieved:.0f}/s"
                )

            plan = [(size, count, False) for size in sizes for count in sessions]
            plan += [(SIZES["3 KB"], count, True) for count in keep_open_sessions]
            row_targets = {name: (port_of(name), proxies.get(name)) for name in columns}
            for size, count, keep_open in plan:
                row = throughput_row(row_targets, size, count, keep_open, seconds, args.repeat)
                run.throughput += row
                for cell in row:
                    rss = f", {cell.peak_rss_mib:.0f} MiB" if cell.peak_rss_mib else ""
                    rss += f", FAILED: {cell.error}" if cell.error else ""
                    progress(
                        f"{_size_name(size)} x{count}{' -d' if keep_open else ''} {cell.target}: "
                        f"{cell.rate:,.0f}/s (best of {cell.runs}, {cell.messages} messages"
                        f"{rss})"
                    )
            for proxy in proxies.values():
                stop_proxy(proxy)

            fresh = start_proxy(
                TARGET_SET,
                SIGNATURE_SETS[TARGET_SET],
                keys,
                sink_port,
                args.workers,
                args.out,
                args.tree,
                pss=True,
            )
            proxies["memory"] = fresh
            cell = memory_cell(fresh, 100, SIZES["1 MB"], bursts)
            run.memory.append(cell)
            progress(
                f"memory 100 x 1 MB: {cell.rss_mib:.0f} MiB RSS sum, "
                f"{cell.hwm_mib:.0f} MiB VmHWM sum, {cell.pss_mib:.0f} MiB PSS"
            )
        finally:
            for proxy in proxies.values():
                stop_proxy(proxy)
            sink.terminate()
            sink.wait(5)

    run.load_after = _loadavg()
    run.minutes = (time.monotonic() - began) / 60
    table = markdown(run)
    (args.out / "matrix.md").write_text(table)
    (args.out / "matrix.json").write_text(json.dumps(asdict(run), indent=1))
    print(table)
    if not args.no_plot:
        if plot(run, args.out / "matrix.png"):
            print(f"plot: {args.out / 'matrix.png'}")
        else:
            print("plot: skipped (.venv/bin/pip install matplotlib for matrix.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
