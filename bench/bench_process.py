#!/usr/bin/env python3
"""Processing cost in process, without SMTP: the outbound signer and the inbound verifier.

Each cost is printed as a ratio to one RSA-2048 signature (PKCS#1 v1.5 over a SHA-256
digest, OpenSSL through `cryptography`) timed in the same run, in alternation with the
measured work, because these machines drift by 2x from one hour to the next while the ratio
holds. Every DNS answer the verifier needs is in its resolver's cache before timing starts
("DNS answers cached"), so the figures are the CPU work per message and nothing else.

    python bench/bench_process.py                      # 3 KB, 100 KB, 1 MB
    python bench/bench_process.py --sizes 3000 --seconds 2 --rounds 5
    python bench/bench_process.py --profile in --sizes 3000    # cProfile of the verifier

Outbound: `OutboundSigner` from a `dkproxy out` command line with DKIM rsa-sha256 relaxed and
DomainKeys nofws (one RSA-2048 key): "beyond RSA" is its cost minus two RSA signatures.
Inbound: `InboundVerifier` from a `dkproxy in` command line on a message carrying both
signatures, with DKIM, DomainKeys, SPF (pass) and DMARC (pass) evaluated and the
Authentication-Results header written.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import hashlib
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils  # noqa: E402

from dkproxy import config  # noqa: E402
from dkproxy.dnsresolver import DnsAnswer, Resolver  # noqa: E402
from dkproxy.inbound import InboundVerifier  # noqa: E402
from dkproxy.keys import load_signing_key  # noqa: E402
from dkproxy.session import Envelope  # noqa: E402
from dkproxy.signer import OutboundSigner  # noqa: E402

DOMAIN = "example.org"
SELECTOR = "bench"
CLIENT_IP = "192.0.2.7"
#: Cached answers live far longer than any run.
TTL = 86400.0


def make_message(size: int) -> bytes:
    """An unsigned message of about `size` bytes from alice@example.org."""
    head = (
        b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
        b"Subject: processing benchmark\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog 0123456789 \t end.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def write_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@dataclass
class Setup:
    rsa_sign: Callable[[], object]
    sign: Callable[[bytes], object]
    verify: Callable[[bytes], object]
    signed: dict[int, bytes]
    unsigned: dict[int, bytes]


def build(workdir: Path, sizes: list[int]) -> Setup:
    key_path = write_key(workdir / "rsa.key")
    key = load_signing_key(str(key_path))
    private = key.private
    assert isinstance(private, rsa.RSAPrivateKey)
    digest = hashlib.sha256(b"x").digest()

    def rsa_sign() -> object:
        return private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

    out_cfg = config.parse_proxy_command(
        "out",
        [f"--keyfile={key_path}", f"--selector={SELECTOR}", f"--domain={DOMAIN}",
         "--signature=dkim(c=relaxed,a=rsa-sha256)", "--signature=domainkeys(c=nofws)",
         "127.0.0.1:10027", "127.0.0.1:10028"],
    )  # fmt: skip
    signer = OutboundSigner.from_config(out_cfg)  # type: ignore[arg-type]

    def sign(data: bytes) -> object:
        outcome = signer.sign(data)
        assert len(outcome.prepend) == 2, outcome.summary
        return outcome

    in_cfg = config.parse_proxy_command(
        "in", ["--hostname=mx.bench.test", "127.0.0.1:10025", "127.0.0.1:10026"]
    )
    resolver = Resolver(server="127.0.0.1:9")  # never asked: every answer is preloaded
    for name, record in (
        (f"{SELECTOR}._domainkey.{DOMAIN}", key.dns_record),
        (DOMAIN, f"v=spf1 ip4:{CLIENT_IP} -all"),
        (f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject"),
    ):
        resolver.preload(name, "TXT", DnsAnswer("ok", (record.encode("ascii"),)), TTL)
    verifier = InboundVerifier(in_cfg, resolver)  # type: ignore[arg-type]
    envelope = Envelope(peer=CLIENT_IP, helo=f"mail.{DOMAIN}", mail_from=f"alice@{DOMAIN}")
    loop = asyncio.new_event_loop()

    def verify(data: bytes) -> object:
        return loop.run_until_complete(verifier(data, envelope))

    unsigned = {size: make_message(size) for size in sizes}
    signed = {}
    for size, data in unsigned.items():
        outcome = signer.sign(data)
        signed[size] = b"".join([*outcome.prepend, data])
        result = verify(signed[size])
        header = b"".join(result.prepend).decode()  # type: ignore[attr-defined]
        for word in ("dkim=pass", "domainkeys=pass", "spf=pass", "dmarc=pass"):
            if word not in header:
                raise RuntimeError(f"verification of the {size} B message: no {word}:\n{header}")
    return Setup(rsa_sign, sign, verify, signed, unsigned)


def per_call(function: Callable[[], object], seconds: float) -> float:
    """Seconds per call of `function`, run for about `seconds` (at least 3 calls)."""
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        function()
        calls += 1
        now = time.perf_counter()
        if now >= deadline and calls >= 3:
            return (now - started) / calls


def measure(setup: Setup, sizes: list[int], seconds: float, rounds: int) -> None:
    rsa_times: list[float] = []
    ratios: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for size in sizes:
            # RSA right before each measured piece of work: both see the same machine state.
            for name, work, data in (
                ("out", setup.sign, setup.unsigned[size]),
                ("in", setup.verify, setup.signed[size]),
            ):
                rsa_time = per_call(setup.rsa_sign, seconds / 4)
                cost = per_call(functools.partial(work, data), seconds)
                rsa_times.append(rsa_time)
                ratios.setdefault((name, size), []).append(cost / rsa_time)
    rsa_ms = statistics.median(rsa_times) * 1000
    print(
        f"RSA-2048 signature (cryptography, this run): median {rsa_ms:.3f} ms "
        f"(min {min(rsa_times) * 1000:.3f}, max {max(rsa_times) * 1000:.3f})"
    )
    print(f"per message, in RSA-2048 signature times (median of {rounds} rounds):")
    print(f"  {'size':>9}  {'outbound':>9}  {'beyond 2 RSA':>12}  {'inbound':>8}")
    for size in sizes:
        out = statistics.median(ratios[("out", size)])
        inbound = statistics.median(ratios[("in", size)])
        print(f"  {size:>8}B  {out:9.2f}  {out - 2:12.2f}  {inbound:8.2f}")


def profile(setup: Setup, which: str, size: int, seconds: float, limit: int) -> None:
    data = setup.unsigned[size] if which == "out" else setup.signed[size]
    work = setup.sign if which == "out" else setup.verify
    profiler = cProfile.Profile()
    calls = 0
    deadline = time.perf_counter() + seconds
    profiler.enable()
    while time.perf_counter() < deadline:
        work(data)
        calls += 1
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    print(f"cProfile, {which}bound, {size} B, {calls} messages, sorted by own time:")
    print(text.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 100_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measured piece")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--profile", choices=["in", "out"], help="cProfile instead of timing")
    parser.add_argument("--limit", type=int, default=30, help="profile lines shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dkproxy-bench-process-") as tmp:
        setup = build(Path(tmp), args.sizes)
    if args.profile:
        for size in args.sizes:
            profile(setup, args.profile, size, args.seconds * 3, args.limit)
        return 0
    print(
        f"dkproxy processing cost, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        "outbound DKIM rsa-sha256 + DomainKeys nofws, inbound DKIM + DomainKeys + SPF + DMARC"
    )
    measure(setup, args.sizes, args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
