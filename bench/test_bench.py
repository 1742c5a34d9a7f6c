"""Tests of the benchmark tools themselves: a wrong load generator makes every figure wrong.

They run with the default suite (pyproject.toml lists bench/ among the testpaths).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from loadgen import LoadConfig, LoadResult, Percentiles, make_body, make_message, run_load
from matrix_cells import DIRECT, SIZES, Latency, MemoryCell, Throughput
from matrix_report import Run, markdown, targets
from memory import MIB, MemorySampler, process_tree


@dataclass
class FakeServer:
    """An SMTP server that records what it received and refuses some recipients."""

    pipelining: bool = True
    refuse: str = "refused@"
    delay: float = 0.0
    messages: list[bytes] = field(default_factory=list)
    sessions: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        writer.write(b"220 fake ESMTP\r\n")
        rcpt_ok = False
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                extensions = b"250-fake\r\n250-PIPELINING\r\n" if self.pipelining else b""
                writer.write(extensions + b"250 8BITMIME\r\n")
            elif verb == b"MAIL":
                rcpt_ok = False
                writer.write(b"250 ok\r\n")
            elif verb == b"RCPT":
                rcpt_ok = self.refuse.encode() not in line
                writer.write(b"250 ok\r\n" if rcpt_ok else b"550 no such user\r\n")
            elif verb == b"DATA":
                if not rcpt_ok:
                    writer.write(b"554 no valid recipients\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                await asyncio.sleep(self.delay)
                self.messages.append(data[:-3])
                writer.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, limit=1 << 24)
        async with server:
            yield int(server.sockets[0].getsockname()[1])


def test_body_has_exact_size_and_needs_no_dot_stuffing() -> None:
    for size in (2, 3, 80, 81, 82, 999, 1000, 3000, 100_000):
        body = make_body(size)
        assert len(body) == size
        assert all(not line.startswith(b".") for line in body.split(b"\r\n"))
    assert make_body(3000).endswith(b"\r\n")
    message = make_message(7, make_body(100), "a@example.org", "b@example.net")
    assert message.startswith(b"From: Load Generator <a@example.org>\r\n")
    assert b"\r\n\r\n" in message
    assert message.endswith(make_body(100))


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    result = Percentiles.of(values)
    assert (result.p50, result.p90, result.p99, result.max) == (50.0, 90.0, 99.0, 100.0)
    assert result.mean == pytest.approx(50.5)
    assert Percentiles.of([]).p99 == 0.0


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("per_message", [False, True])
def test_offers_at_the_fixed_rate_and_delivers_everything(
    pipelining: bool, per_message: bool
) -> None:
    server = FakeServer(pipelining=pipelining)

    async def scenario() -> tuple[float, LoadResult]:
        async with server.running() as port:
            config = LoadConfig(
                "127.0.0.1",
                port,
                rate=200,
                messages=60,
                connections=4,
                size=500,
                per_message=per_message,
            )
            started = time.perf_counter()
            result = await run_load(config)
            return time.perf_counter() - started, result

    wall, result = asyncio.run(scenario())
    assert result.delivered == 60 and result.failed == 0
    assert len(server.messages) == 60
    assert all(message.endswith(make_body(500)) for message in server.messages)
    assert len({m.split(b"Message-ID: ")[1][:40] for m in server.messages}) == 60
    # Open loop: message 59 is not offered before 59/200 s, however fast the server is.
    assert wall >= 59 / 200
    assert result.achieved_rate == pytest.approx(200, rel=0.25)
    assert server.sessions == (60 if per_message else 4)


def test_latency_is_the_servers_transaction_time() -> None:
    server = FakeServer(delay=0.02)

    async def scenario() -> LoadResult:
        async with server.running() as port:
            return await run_load(
                LoadConfig("127.0.0.1", port, rate=100, messages=20, connections=4)
            )

    result = asyncio.run(scenario())
    assert result.latency_ms.p50 >= 20
    assert result.latency_ms.p50 < 200


def test_refusals_are_counted_not_hidden() -> None:
    server = FakeServer()

    async def scenario() -> LoadResult:
        async with server.running() as port:
            return await run_load(
                LoadConfig(
                    "127.0.0.1",
                    port,
                    rate=0,
                    messages=5,
                    connections=2,
                    recipient="refused@example.net",
                )
            )

    result = asyncio.run(scenario())
    assert result.delivered == 0 and result.failed == 5
    assert result.errors == {"RCPT 550": 5}
    assert server.messages == []


def test_burst_sends_on_every_connection_at_once() -> None:
    server = FakeServer(delay=0.2)

    async def scenario() -> tuple[float, LoadResult]:
        async with server.running() as port:
            started = time.perf_counter()
            result = await run_load(
                LoadConfig("127.0.0.1", port, rate=0, messages=20, connections=20, size=10_000)
            )
            return time.perf_counter() - started, result

    wall, result = asyncio.run(scenario())
    assert result.delivered == 20
    assert wall < 20 * 0.2 / 2  # concurrent, not one after another


def test_memory_sampler_sees_a_child_allocation() -> None:
    code = (
        "import sys, time; b = bytearray(80 * 1024 * 1024); print('ok', flush=True); time.sleep(2)"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        deadline = time.monotonic() + 10
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with MemorySampler(parent.pid, interval=0.01, pss=True).window() as peak:
            assert parent.stdout.readline() == b"ok\n"
            time.sleep(0.1)
        assert peak.processes == 2
        assert peak.rss >= 80 * MIB
        assert peak.pss >= 80 * MIB
        assert peak.hwm >= peak.rss
    finally:
        parent.kill()
        parent.wait()


def _run_with(rate: float, p99_added: float, mbps: float, rss_mib: float) -> Run:
    run = Run("now", False, "host", "3.11", "rev", "2", "0.1")
    size = SIZES["3 KB"]
    run.throughput.append(Throughput("DKIM + DK", size, 8, False, 100, 1, rate, 0, 130))
    big = SIZES["10 MB"]
    run.throughput.append(Throughput("DKIM + DK", big, 8, False, 8, 1, mbps / 10, mbps, 200))
    run.latency.append(Latency(DIRECT, 400, 400, 2000, 2000, 0.1, 0.5, 1, None))
    run.latency.append(Latency("DKIM + DK", 400, 400, 2000, 2000, 2, 0.5 + p99_added, 1, 130))
    run.memory.append(MemoryCell(100, SIZES["1 MB"], 3, 300, 300, rss_mib, rss_mib, 150, 90, 3))
    return run


def test_targets_pass_and_fail_on_the_issue_thresholds() -> None:
    assert [met for _, _, met in targets(_run_with(900, 5, 60, 150))] == [True] * 4
    assert [met for _, _, met in targets(_run_with(700, 25, 30, 250))] == [False] * 4
    table = markdown(_run_with(700, 25, 30, 250))
    assert "| 3 KB | 8 | - | - | 700 | - |" in table
    assert "| NO |" in table


def test_bench_process_runs_and_checks_its_verdicts() -> None:
    """bench_process.py times real work: its messages verify (DKIM, DomainKeys, SPF, DMARC
    pass) and it prints a ratio per size and direction."""
    result = subprocess.run(
        [sys.executable, "bench_process.py", "--sizes", "3000", "--seconds", "0.05",
         "--rounds", "1"],
        cwd=__file__.rpartition("/")[0], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RSA-2048 signature" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("3000B"))
    outbound, inbound = float(row.split()[1]), float(row.split()[-2])
    assert outbound > 1 and inbound > 0  # outbound includes two RSA signatures (noisy: > 1)


def test_ab_counts_the_cpu_of_a_process_tree_and_refuses_unknown_scenarios() -> None:
    import os

    from ab import cpu_seconds
    from ab import main as ab_main

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = cpu_seconds(os.getpid())
        deadline = time.monotonic() + 20  # the machine may be busy: wait for the child's share
        while (spent := cpu_seconds(os.getpid()) - before) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.1)  # this process sleeps: what is counted is the busy child's time
    finally:
        child.kill()
        child.wait()
    assert spent >= 0.2
    with pytest.raises(SystemExit) as exc:
        ab_main(["--baseline", "HEAD", "--scenarios", "signed,nonsense"])
    assert exc.value.code == 2
