#!/usr/bin/env python3
"""Soak: many messages through `dkproxy out` into a downstream that is killed at random.

The proxy's promise is that it is never the reason a message is lost: it answers 250 only
after the downstream's 250, and 4xx whenever the downstream is down, closes or fails, so the
client's queue keeps the message and retries. This tool checks the promise under abuse:

* the downstream is Postfix's smtp-sink, dumping every transaction to a file; a chaos task
  kills it with SIGKILL at random moments (mid-DATA, between the end of data and its reply,
  while pooled sessions sit idle) and restarts it after a random pause;
* N concurrent clients send every message, each with a unique Message-ID, and retry on any
  4xx or dropped connection after a short back-off, as an MTA retries from its queue (a 5xx
  is a permanent refusal and is counted, never retried);
* at the end it compares what clients were told with what the downstream stored:
  acknowledged (the client got 250), delivered (a complete copy is in a dump file),
  delivered twice (the downstream stored it but died before its 250 reached us, so the
  client retried: duplicates are what SMTP's at-least-once delivery permits), and lost
  (acknowledged but never delivered: must be 0);
* every second it samples each worker's RSS: the peak per worker and its growth from the
  end of the warm-up to the end of the run (the bound is --rss-growth-limit).

Not part of the default test suite (it takes minutes). Run from the repository root:

    .venv/bin/python bench/soak.py --messages 100000 --clients 16
    .venv/bin/python bench/soak.py --messages 2000 --json soak.json     # a quick shake-out

Exit status: 0 when nothing was lost, nothing refused permanently and RSS stayed in bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from loadgen import SmtpConnection, SmtpFailure, make_body  # noqa: E402
from memory import process_tree  # noqa: E402

from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.sink import SmtpSink, parse_sink_dump  # noqa: E402
from tests.support.testkeys import make_rsa_key  # noqa: E402

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
MIB = 1 << 20


@dataclass
class WorkerMemory:
    """RSS of one worker process, bytes."""

    pid: int
    first: int = 0  # first sample after the warm-up
    last: int = 0
    peak: int = 0

    @property
    def growth(self) -> int:
        return self.last - self.first if self.first else 0


@dataclass
class SoakResult:
    messages: int
    acknowledged: int = 0
    delivered: int = 0
    delivered_twice: int = 0
    lost: int = 0
    refused: int = 0  # 5xx answers: a permanent refusal, never expected here
    unacknowledged: int = 0  # given up after --max-attempts (never expected)
    attempts: int = 0
    temporary_failures: dict[str, int] = field(default_factory=dict)
    downstream_kills: int = 0
    elapsed: float = 0.0
    workers: list[WorkerMemory] = field(default_factory=list)
    worker_restarts: int = 0

    def summary(self, rss_limit: int) -> str:
        lines = [
            f"messages {self.messages} in {self.elapsed:.0f} s "
            f"({self.messages / self.elapsed if self.elapsed else 0:.0f}/s), "
            f"{self.attempts} attempts, downstream killed {self.downstream_kills} times",
            f"acknowledged     {self.acknowledged}",
            f"delivered        {self.delivered}",
            f"delivered twice  {self.delivered_twice}",
            f"lost             {self.lost}",
            f"refused (5xx)    {self.refused}",
            f"unacknowledged   {self.unacknowledged}",
        ]
        for worker in self.workers:
            lines.append(
                f"worker {worker.pid}: peak RSS {worker.peak / MIB:.1f} MiB, "
                f"{worker.first / MIB:.1f} -> {worker.last / MIB:.1f} MiB after warm-up "
                f"(growth {worker.growth / MIB:+.1f} MiB, limit {rss_limit / MIB:.0f} MiB)"
            )
        if self.worker_restarts:
            lines.append(f"worker processes replaced: {self.worker_restarts}")
        top = sorted(self.temporary_failures.items(), key=lambda item: -item[1])[:8]
        if top:
            lines.append("temporary failures: " + ", ".join(f"{k} x{v}" for k, v in top))
        return "\n".join(lines)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssWatch:
    """Samples every worker's RSS once a second in a thread."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.workers: dict[int, WorkerMemory] = {}
        self.warm = False
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> list[int]:
        tree = process_tree(self.root)
        children = [pid for pid in tree if pid != self.root]
        return children or [self.root]  # one worker: the daemon itself serves

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for pid in self._pids():
                self.seen.add(pid)
                try:
                    rss = _rss(pid)
                except (OSError, ValueError, IndexError):
                    continue
                memory = self.workers.setdefault(pid, WorkerMemory(pid))
                memory.peak = max(memory.peak, rss)
                memory.last = rss
                if self.warm and not memory.first:
                    memory.first = rss

    def __enter__(self) -> RssWatch:
        self.initial = set(self._pids())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def chaos(
    sink: SmtpSink,
    rng: random.Random,
    stop: asyncio.Event,
    result: SoakResult,
    args: argparse.Namespace,
) -> None:
    """Kill the downstream with SIGKILL at random moments and bring it back."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(args.kill_min, args.kill_max))
        if stop.is_set():
            break
        sink.crash()
        result.downstream_kills += 1
        await asyncio.sleep(rng.uniform(0.0, args.down_max))
        await loop.run_in_executor(None, sink.restart)


async def clients(
    args: argparse.Namespace, port: int, result: SoakResult, rss: RssWatch
) -> set[str]:
    """Send every message until the proxy acknowledges it; returns the acknowledged IDs."""
    body = make_body(args.size)
    pending: asyncio.Queue[int] = asyncio.Queue()
    for index in range(args.messages):
        pending.put_nowait(index)
    acknowledged: set[str] = set()
    failures: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    warm_up = max(1, args.messages // 20)
    rng = random.Random(args.seed + 1)

    def message(index: int) -> tuple[str, bytes]:
        msgid = f"soak-{index}@example.org"
        header = (
            f"From: Soak <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: soak {index}\r\n"
            f"Message-ID: <{msgid}>\r\n\r\n"
        ).encode()
        return msgid, header + body + f"END {msgid}\r\n".encode()

    async def client() -> None:
        connection: SmtpConnection | None = None
        budget = 0  # messages left in this session
        while True:
            try:
                index = pending.get_nowait()
            except asyncio.QueueEmpty:
                break
            msgid, data = message(index)
            attempts[index] += 1
            result.attempts += 1
            try:
                if connection is None:
                    connection = SmtpConnection("127.0.0.1", port, args.timeout)
                    await connection.open(pipelining=True)
                    budget = rng.randint(1, args.session_messages)
                await connection.transaction(data, SENDER, RECIPIENT)
            except SmtpFailure as exc:
                if exc.code >= 500:
                    result.refused += 1
                    print(f"permanent refusal of {msgid}: {exc}", file=sys.stderr)
                    continue
                failures[f"{exc.stage} {exc.code}"] += 1
                await _drop(connection)
                connection = None
                await _retry_later(pending, index, attempts[index], args, rng, result)
                continue
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                failures[type(exc).__name__] += 1
                await _drop(connection)
                connection = None
                await _retry_later(pending, index, attempts[index], args, rng, result)
                continue
            acknowledged.add(msgid)
            if len(acknowledged) == warm_up:
                rss.warm = True
            if len(acknowledged) % 10000 == 0:
                print(f"  {len(acknowledged)} acknowledged", file=sys.stderr, flush=True)
            budget -= 1
            if budget <= 0:
                await connection.close()
                connection = None
        if connection is not None:
            await connection.close()

    workers = [asyncio.create_task(client()) for _ in range(args.clients)]
    while any(not w.done() for w in workers):
        await asyncio.wait(workers, timeout=1.0)
        if pending.empty() and all(w.done() for w in workers):
            break
        # a client may have finished while others still re-queue messages: keep N running
        running = sum(not w.done() for w in workers)
        if not pending.empty() and running < args.clients:
            workers += [asyncio.create_task(client()) for _ in range(args.clients - running)]
    result.temporary_failures = dict(failures)
    return acknowledged


async def _drop(connection: SmtpConnection | None) -> None:
    if connection is not None and connection.writer is not None:
        connection.writer.close()
        connection.writer = None


async def _retry_later(
    pending: asyncio.Queue[int],
    index: int,
    attempt: int,
    args: argparse.Namespace,
    rng: random.Random,
    result: SoakResult,
) -> None:
    if attempt >= args.max_attempts:
        result.unacknowledged += 1
        return
    # An MTA backs off for minutes; a short, growing, jittered pause keeps the run short.
    await asyncio.sleep(min(2.0, 0.05 * attempt) * rng.uniform(0.5, 1.5))
    pending.put_nowait(index)


async def soak(
    args: argparse.Namespace, port: int, sink: SmtpSink, rss: RssWatch
) -> tuple[SoakResult, set[str]]:
    result = SoakResult(messages=args.messages)
    stop = asyncio.Event()
    chaos_task = asyncio.create_task(chaos(sink, random.Random(args.seed), stop, result, args))
    started = time.monotonic()
    try:
        acknowledged = await clients(args, port, result, rss)
    finally:
        stop.set()
        await chaos_task
    result.elapsed = time.monotonic() - started
    return result, acknowledged


def delivered_ids(sink: SmtpSink) -> Counter[str]:
    """Message-IDs of every complete message in the dump files (the END line proves it).

    Read one file at a time and kept as IDs only: 100,000 parsed messages would not fit.
    """
    found: Counter[str] = Counter()
    dump = Path(sink.dir) / "dump"
    for path in dump.iterdir():
        try:
            message = parse_sink_dump(path.read_bytes(), str(path))
        except (OSError, ValueError):
            continue  # cut short by a kill: smtp-sink never acknowledged it
        msgid = (message.header("Message-ID") or "").strip("<>")
        if msgid and message.data.endswith(f"END {msgid}\r\n".encode()):
            found[msgid] += 1
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=16, help="concurrent SMTP clients")
    parser.add_argument("--session-messages", type=int, default=5,
                        help="up to this many messages per client session (random)")  # fmt: skip
    parser.add_argument("--size", type=int, default=1500, help="body bytes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-min", type=float, default=0.5, help="seconds between kills, min")
    parser.add_argument("--kill-max", type=float, default=5.0, help="seconds between kills, max")
    parser.add_argument("--down-max", type=float, default=1.0, help="longest downtime, seconds")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout, seconds")
    parser.add_argument("--relay-timeout", type=float, default=30.0)
    parser.add_argument("--max-attempts", type=int, default=1000)
    parser.add_argument("--rss-growth-limit", type=float, default=32.0, help="MiB per worker")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dkproxy-soak-"))
    key = make_rsa_key(str(work / "example.org.key"), 2048)
    sink = SmtpSink().start()
    proxy = ProxyProcess(
        "out",
        [f"--keyfile={key}", "--selector=soak", "--domain=example.org",
         "--signature=dkim(c=relaxed)", "--signature=domainkeys(c=nofws)",
         f"--workers={args.workers}", f"--relay_timeout={args.relay_timeout}"],
        sink.address,
        env={"TMPDIR": str(work)},
    )  # fmt: skip
    proxy.start()
    assert proxy.proc is not None
    try:
        with RssWatch(proxy.proc.pid) as rss:
            result, acknowledged = asyncio.run(soak(args, proxy.port, sink, rss))
        result.workers = sorted(rss.workers.values(), key=lambda w: w.pid)
        result.worker_restarts = len(rss.seen - rss.initial)
        proxy.stop()
        time.sleep(1.0)  # let smtp-sink close the last dump files
        delivered = delivered_ids(sink)
        return report(args, result, acknowledged, delivered, proxy.log, work)
    finally:
        proxy.stop()
        sink.stop()  # removing 100,000 dump files takes a while
        shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    result: SoakResult,
    acknowledged: set[str],
    delivered: Counter[str],
    log: str,
    work: Path,
) -> int:
    """Print (and write as JSON) the figures; 0 when the run kept every promise."""
    result.acknowledged = len(acknowledged)
    result.delivered = len(delivered)
    result.delivered_twice = sum(1 for count in delivered.values() if count > 1)
    result.lost = len(acknowledged - set(delivered))
    limit = int(args.rss_growth_limit * MIB)
    print(result.summary(limit), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    leftovers = [p.name for p in work.iterdir() if p.suffix == ".msg"]
    if leftovers:
        print(f"spool files left in {work}: {leftovers[:5]}")
    if "Traceback" in log:
        print("dkproxy logged a traceback:\n" + log[-3000:])
    ok = (
        result.lost == 0
        and result.refused == 0
        and result.unacknowledged == 0
        and not leftovers
        and "Traceback" not in log
        and all(w.growth <= limit for w in result.workers)
    )
    print("OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
