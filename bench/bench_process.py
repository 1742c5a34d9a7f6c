#!/usr/bin/env python3
"""Processing cost in process, without SMTP: the outbound signer and the inbound verifier.

Each cost is printed as a ratio to one RSA-2048 signature (PKCS#1 v1.5 over a SHA-256
digest, OpenSSL through `cryptography`) timed in the same run, in alternation with the
measured work, because these machines drift by 2x from one hour to the next while the ratio
holds. Times are the process's CPU time, so that waiting for a core on a loaded machine
does not count. Every DNS answer the verifier needs is in its resolver's cache before timing starts
("DNS answers cached"), so the figures are the CPU work per message and nothing else.

    .venv/bin/python bench/bench_process.py                      # 3 KB, 100 KB, 1 MB
    .venv/bin/python bench/bench_process.py --sizes 3000 --seconds 2 --rounds 5
    .venv/bin/python bench/bench_process.py --profile in --sizes 3000    # cProfile of the verifier
    .venv/bin/python bench/bench_process.py --tree /tmp/old   # another revision's dkproxy/

Outbound: `OutboundSigner` from a `dkproxy out` command line with DKIM rsa-sha256 relaxed and
DomainKeys nofws (one RSA-2048 key): "beyond RSA" is its cost minus two RSA signatures.
Inbound: `InboundVerifier` from a `dkproxy in` command line on a message carrying both
signatures, with DKIM, DomainKeys, SPF (pass) and DMARC (pass) evaluated and the
Authentication-Results header written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --tree DIR: time the dkproxy/ package found in DIR (e.g. another revision unpacked with
# `git archive REV dkproxy | tar -x -C DIR`), so two revisions can be compared in one session.
_early = argparse.ArgumentParser(add_help=False)
_early.add_argument("--tree", type=Path, default=ROOT)
TREE = _early.parse_known_args()[0].tree.resolve()
sys.path.insert(0, str(TREE))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils  # noqa: E402

from dkproxy import config  # noqa: E402
from dkproxy.inbound import InboundVerifier  # noqa: E402
from dkproxy.mailauth.dnsresolver import DnsAnswer, Resolver  # noqa: E402
from dkproxy.mailauth.keys import load_signing_key  # noqa: E402
from dkproxy.outbound import OutboundSigner  # noqa: E402
from dkproxy.smtp.proxy import Envelope  # noqa: E402

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


class _ConstantRSA:
    """Stands in for the RSA key when the cost around the signatures is measured alone: its
    sign() returns 256 zero octets at once (a signature nobody will verify)."""

    key_size = 2048

    def sign(self, data: bytes, pad: object, algorithm: object) -> bytes:
        return bytes(256)


rsa.RSAPrivateKey.register(_ConstantRSA)  # so the signers take it for an RSA key


class _DomainKeysWithoutRSA:
    """dkproxy.mailauth.domainkeys as the outbound signer sees it, signing with _ConstantRSA."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def sign(self, message: object, **options: object) -> bytes:
        return self._real.sign(message, **{**options, "key": _ConstantRSA()})  # type: ignore[attr-defined]


@contextlib.contextmanager
def rsa_replaced() -> Iterator[bool]:
    """Within: the outbound signer's two RSA signatures cost nothing, so its time is the
    work around them (parsing, selection, canonicalization, hashing, folding) without the
    in-context RSA cost (cold caches after the message's work make an RSA signature inside
    the signer a few percent dearer than the reference one). Yields False, changing nothing,
    for a tree whose signer is laid out differently (--tree with an older revision)."""
    from dkproxy import outbound
    from dkproxy.mailauth import dkim_signer

    real_digest = getattr(dkim_signer, "_sign_digest", None)
    real_dk = getattr(outbound, "domainkeys", None)
    if real_digest is None or real_dk is None:
        yield False
        return
    dkim_signer._sign_digest = lambda key, digest: bytes(256)  # type: ignore[attr-defined]
    outbound.domainkeys = _DomainKeysWithoutRSA(real_dk)  # type: ignore[attr-defined,assignment]
    try:
        yield True
    finally:
        dkim_signer._sign_digest = real_digest  # type: ignore[attr-defined]
        outbound.domainkeys = real_dk  # type: ignore[attr-defined]


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


def sample_ratios(
    rsa_sign: Callable[[], object], work: Callable[[], object], seconds: float
) -> tuple[list[float], list[float]]:
    """(work / RSA ratios, RSA seconds) from many small samples, each an RSA signature timed
    right next to one call of `work`, so both see the same machine state; the median of
    the samples shrugs off the moments the process was preempted."""
    ratios: list[float] = []
    rsa_times: list[float] = []
    # CPU time of this process (all its threads), not wall time: on a loaded machine the
    # moments the process waits for a core would otherwise land on whichever piece ran.
    clock = time.process_time
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(ratios) < 5:
        t0 = clock()
        rsa_sign()
        rsa_sign()
        t1 = clock()
        work()
        t2 = clock()
        rsa_time = (t1 - t0) / 2
        if rsa_time <= 0:
            continue
        rsa_times.append(rsa_time)
        ratios.append((t2 - t1) / rsa_time)
    return ratios, rsa_times


def measure(setup: Setup, sizes: list[int], seconds: float, rounds: int) -> None:
    rsa_times: list[float] = []
    ratios: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for size in sizes:
            for name, work, data in (
                ("out", setup.sign, setup.unsigned[size]),
                ("in", setup.verify, setup.signed[size]),
            ):
                samples, rsa = sample_ratios(setup.rsa_sign, functools.partial(work, data), seconds)
                rsa_times += rsa
                ratios.setdefault((name, size), []).extend(samples)
            with rsa_replaced() as replaced:
                if replaced:
                    work = functools.partial(setup.sign, setup.unsigned[size])
                    samples, rsa = sample_ratios(setup.rsa_sign, work, seconds)
                    rsa_times += rsa
                    ratios.setdefault(("out-rsa", size), []).extend(samples)
    rsa_ms = statistics.median(rsa_times) * 1000
    print(
        f"RSA-2048 signature (cryptography, this run): median {rsa_ms:.3f} ms "
        f"(quartiles {_quartiles(rsa_times, 1000)} ms)"
    )
    print("per message, in RSA-2048 signature times (median and quartiles of the samples):")
    print(
        f"  {'size':>9}  {'outbound':>18}  {'beyond 2 RSA':>12}  {'RSA replaced':>18}"
        f"  {'inbound':>18}"
    )
    for size in sizes:
        out = ratios[("out", size)]
        inbound = ratios[("in", size)]
        alone = ratios.get(("out-rsa", size))
        shown = f"{statistics.median(alone):6.2f} ({_quartiles(alone)})" if alone else "n/a"
        print(
            f"  {size:>8}B  {statistics.median(out):6.2f} ({_quartiles(out)})"
            f"  {statistics.median(out) - 2:12.2f}  {shown:>18}"
            f"  {statistics.median(inbound):6.2f} ({_quartiles(inbound)})"
        )
    print(
        "(beyond 2 RSA: outbound minus two reference signatures; RSA replaced: the outbound\n"
        " signer with both RSA calls answering at once, i.e. the work around the signatures\n"
        " without the dearer in-context RSA: the two bound the cost beyond the signatures)"
    )


def _quartiles(values: list[float], scale: float = 1.0) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0] * scale:.2f}-{q[2] * scale:.2f}"


def profile(setup: Setup, which: str, size: int, seconds: float, limit: int) -> None:
    data = setup.unsigned[size] if which == "out" else setup.signed[size]
    work = setup.sign if which == "out" else setup.verify
    # The thread's CPU time, as the timing above: on a loaded machine wall time would charge
    # the moments the process waits for a core to whichever function was running.
    profiler = cProfile.Profile(time.thread_time)
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every size")
    parser.add_argument("--profile", choices=["in", "out"], help="cProfile instead of timing")
    parser.add_argument("--limit", type=int, default=30, help="profile lines shown")
    parser.add_argument("--tree", type=Path, default=ROOT, help="directory holding dkproxy/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dkproxy-bench-process-") as tmp:
        setup = build(Path(tmp), args.sizes)
    if args.profile:
        for size in args.sizes:
            profile(setup, args.profile, size, args.seconds * 3, args.limit)
        return 0
    print(
        f"dkproxy processing cost ({TREE}), {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}; outbound DKIM rsa-sha256 + DomainKeys nofws, inbound "
        "DKIM + DomainKeys + SPF + DMARC"
    )
    measure(setup, args.sizes, args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
