"""The cells of the benchmark matrix (bench/matrix.py): what is measured, the dkproxy
instances it runs, and one runner per kind of cell (throughput with smtp-source, latency
with loadgen.py, memory under a burst of large messages)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_out import free_port, tool, wait_port
from memory import MIB, MemoryPeak, MemorySampler, process_tree, status_kib

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MB = 1_000_000  # message sizes and MB/s are decimal; memory is reported in MiB

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


# --- processes ------------------------------------------------------------------------


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
    idle = sum(status_kib(pid, b"VmRSS:") for pid in process_tree(proxy.process.pid)) * 1024
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
