#!/usr/bin/env python3
"""Open-loop SMTP load generator: offers messages at a fixed rate and times every one.

smtp-source can only send as fast as the server answers (closed loop) and reports no per-message
times, so it cannot say what latency a proxy adds at a given load. This client schedules message
i at start + i/rate whatever the server does (open loop), hands it to an idle connection of a
fixed pool, and records for each message:

* latency: from writing MAIL FROM to reading the final reply to the message data (the
  server's whole transaction time, which is what a proxy lengthens);
* queue delay: from its scheduled time to MAIL FROM. It stays near zero while the pool keeps
  up; when it grows, the server (or this client) no longer sustains the offered rate, and
  the achieved rate shows by how much.

Connections are persistent by default, one transaction after another, as Postfix's smtp client
does with connection caching; --per-message opens a new session (connect, EHLO ... QUIT) for
each message. PIPELINING is used when the server offers it (MAIL, RCPT and DATA in one write),
as Postfix does. --rate 0 offers all messages at once (a burst: with --connections equal to
--messages every session sends its message at the same moment).

    .venv/bin/python bench/loadgen.py 127.0.0.1:10027 --rate 400 --messages 2000 --connections 8
    .venv/bin/python bench/loadgen.py 127.0.0.1:10027 --rate 0 --messages 100 --connections 100 \\
        --size 1000000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
_LINE = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"


class SmtpFailure(Exception):
    """The server refused a step of the transaction or dropped the connection."""

    def __init__(self, stage: str, code: int, text: str = "") -> None:
        super().__init__(f"{stage}: {code} {text}".strip())
        self.stage = stage
        self.code = code


def make_body(size: int) -> bytes:
    """`size` bytes (at least 2) of CRLF-terminated text lines; none starts with a dot."""
    if size <= 2:
        return b"\r\n" if size > 0 else b""
    body = _LINE * (size // len(_LINE) + 1)
    body = body[:size]
    if not body.endswith(b"\r\n"):
        body = body[: max(0, size - 2)] + b"\r\n"
    return body


def make_message(index: int, body: bytes, sender: str, recipient: str) -> bytes:
    """A small RFC 5322 header (unique Message-ID) in front of the shared body."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    header = (
        f"From: Load Generator <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: dkproxy load test {index}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{index}.{os.getpid()}.{time.time_ns()}@loadgen.example.org>\r\n"
        "\r\n"
    ).encode()
    return header + body


class SmtpConnection:
    """A minimal SMTP client session: just what a load test needs, nothing buffered twice."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pipelining = False

    async def open(self, pipelining: bool) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 16), self.timeout
        )
        code, _ = await self._reply()
        if code != 220:
            raise SmtpFailure("greeting", code)
        self.writer.write(b"EHLO loadgen.example.org\r\n")
        code, lines = await self._reply()
        if code != 250:
            raise SmtpFailure("EHLO", code)
        self.pipelining = pipelining and any(
            line[4:].strip().upper() == b"PIPELINING" for line in lines
        )

    async def _reply(self) -> tuple[int, list[bytes]]:
        assert self.reader is not None
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise SmtpFailure("read", 421, "connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                try:
                    return int(line[:3]), lines
                except ValueError:
                    raise SmtpFailure("read", 500, "malformed reply") from None

    async def transaction(self, message: bytes, sender: str, recipient: str) -> None:
        """MAIL, RCPT, DATA and the message; raises SmtpFailure on any refusal."""
        assert self.writer is not None
        commands = (f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{recipient}>\r\n".encode())
        if self.pipelining:
            self.writer.write(b"".join((*commands, b"DATA\r\n")))
            mail, _ = await self._reply()
            rcpt, _ = await self._reply()
            data, _ = await self._reply()
        else:
            self.writer.write(commands[0])
            mail, _ = await self._reply()
            if mail != 250:
                raise SmtpFailure("MAIL", mail)
            self.writer.write(commands[1])
            rcpt, _ = await self._reply()
            if rcpt // 100 != 2:
                await self.reset()
                raise SmtpFailure("RCPT", rcpt)
            self.writer.write(b"DATA\r\n")
            data, _ = await self._reply()
        for stage, code, wanted in (("MAIL", mail, 2), ("RCPT", rcpt, 2), ("DATA", data, 3)):
            if code // 100 != wanted:
                if data == 354:  # should not happen, but never leave the server in DATA
                    self.writer.write(b".\r\n")
                    await self._reply()
                await self.reset()
                raise SmtpFailure(stage, code)
        self.writer.write(message)
        self.writer.write(b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n")
        await self.writer.drain()
        final, lines = await self._reply()
        if final != 250:
            raise SmtpFailure("end of DATA", final, lines[-1][4:].decode(errors="replace").strip())

    async def reset(self) -> None:
        assert self.writer is not None
        self.writer.write(b"RSET\r\n")
        await self._reply()

    async def close(self) -> None:
        if self.writer is None:
            return
        with contextlib.suppress(OSError, SmtpFailure, TimeoutError):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self._reply(), 2.0)
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        self.writer = None


@dataclass
class LoadConfig:
    host: str
    port: int
    rate: float = 400.0  # messages/s offered; 0 = all at once
    messages: int = 2000
    connections: int = 8
    size: int = 3000  # body bytes, like smtp-source -l
    per_message: bool = False  # a new SMTP session for every message
    pipelining: bool = True
    timeout: float = 60.0
    sender: str = SENDER
    recipient: str = RECIPIENT


@dataclass
class Percentiles:
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    mean: float = 0.0

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Percentiles:
        if not values_ms:
            return cls()
        ordered = sorted(values_ms)

        def rank(fraction: float) -> float:  # nearest-rank percentile
            index = max(0, min(len(ordered) - 1, int(fraction * len(ordered) + 0.999999) - 1))
            return ordered[index]

        return cls(rank(0.50), rank(0.90), rank(0.99), ordered[-1], sum(ordered) / len(ordered))


@dataclass
class LoadResult:
    offered_rate: float
    messages: int
    delivered: int
    failed: int
    elapsed: float  # first scheduled message to last completion, seconds
    achieved_rate: float  # delivered / elapsed
    mbytes_per_s: float
    latency_ms: Percentiles
    queue_ms: Percentiles
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lat, que = self.latency_ms, self.queue_ms
        offered = f"{self.offered_rate:.0f}/s" if self.offered_rate else "burst"
        text = (
            f"offered {offered}  delivered {self.delivered}/{self.messages} "
            f"in {self.elapsed:.2f} s = {self.achieved_rate:.0f}/s ({self.mbytes_per_s:.1f} MB/s)\n"
            f"  latency ms (MAIL FROM -> 250 after DATA): p50 {lat.p50:.2f}  p90 {lat.p90:.2f}  "
            f"p99 {lat.p99:.2f}  max {lat.max:.2f}\n"
            f"  queue delay ms (scheduled -> MAIL FROM):   p50 {que.p50:.2f}  p99 {que.p99:.2f}  "
            f"max {que.max:.2f}"
        )
        if self.errors:
            text += "\n  errors: " + ", ".join(f"{k} x{v}" for k, v in self.errors.items())
        return text


async def run_load(config: LoadConfig) -> LoadResult:
    """Offer `config.messages` messages at `config.rate` and return what happened.

    Persistent connections are opened (and EHLO'd) before the clock starts, so a burst really
    has every session sending at the same moment.
    """
    body = make_body(config.size)
    jobs: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    queued: list[float] = []
    errors: Counter[str] = Counter()
    finished: list[float] = []
    message_bytes = 0

    async def connect() -> SmtpConnection:
        connection = SmtpConnection(config.host, config.port, config.timeout)
        await connection.open(config.pipelining)
        return connection

    async def send(connection: SmtpConnection, index: int, due: float) -> None:
        nonlocal message_bytes
        message = make_message(index, body, config.sender, config.recipient)
        started = time.perf_counter()
        await connection.transaction(message, config.sender, config.recipient)
        done = time.perf_counter()
        latencies.append((done - started) * 1000)
        queued.append((started - due) * 1000)
        finished.append(done)
        message_bytes += len(message)

    async def worker(connection: SmtpConnection | None) -> None:
        while (job := await jobs.get()) is not None:
            index, due = job
            try:
                if connection is None:
                    connection = await connect()
                await send(connection, index, due)
            except SmtpFailure as exc:
                errors[f"{exc.stage} {exc.code}"] += 1
                if exc.code == 421 or exc.stage == "read":
                    connection = None
            except (OSError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                connection = None
            if config.per_message and connection is not None:
                await connection.close()
                connection = None

    pool: list[SmtpConnection | None] = [None] * config.connections
    if not config.per_message:
        pool = list(await asyncio.gather(*(connect() for _ in range(config.connections))))
    workers = [asyncio.create_task(worker(connection)) for connection in pool]

    start = time.perf_counter() + 0.01
    for index in range(config.messages):
        due = start + index / config.rate if config.rate > 0 else start
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        jobs.put_nowait((index, due))
    for _ in workers:
        jobs.put_nowait(None)
    await asyncio.gather(*workers)
    # The worker tasks closed per-message sessions; close the persistent ones here.
    for connection in pool:
        if connection is not None:
            await connection.close()

    elapsed = (max(finished) - start) if finished else 0.0
    delivered = len(latencies)
    return LoadResult(
        offered_rate=config.rate,
        messages=config.messages,
        delivered=delivered,
        failed=config.messages - delivered,
        elapsed=elapsed,
        achieved_rate=delivered / elapsed if elapsed > 0 else 0.0,
        mbytes_per_s=message_bytes / elapsed / 1e6 if elapsed > 0 else 0.0,
        latency_ms=Percentiles.of(latencies),
        queue_ms=Percentiles.of(queued),
        errors=dict(errors),
    )


def run_sync(config: LoadConfig) -> LoadResult:
    """run_load on uvloop when installed: it leaves more of the shared CPU to the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_load(config))
    return uvloop.run(run_load(config))


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("server", type=parse_address, help="HOST:PORT of the SMTP server")
    parser.add_argument("--rate", type=float, default=400.0, help="messages/s offered (0: burst)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8, help="concurrent SMTP sessions")
    parser.add_argument("--size", type=int, default=3000, help="body bytes (smtp-source -l)")
    parser.add_argument("--per-message", action="store_true", help="new session per message")
    parser.add_argument("--no-pipelining", action="store_true", help="one command per write")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per reply")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.connections < 1 or args.rate < 0:
        parser.error("--messages and --connections must be >= 1, --rate >= 0")
    host, port = args.server
    config = LoadConfig(
        host=host,
        port=port,
        rate=args.rate,
        messages=args.messages,
        connections=args.connections,
        size=args.size,
        per_message=args.per_message,
        pipelining=not args.no_pipelining,
        timeout=args.timeout,
    )
    try:
        result = run_sync(config)
    except (OSError, SmtpFailure, TimeoutError) as exc:
        print(f"loadgen: {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)) if args.json else result.summary())
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
