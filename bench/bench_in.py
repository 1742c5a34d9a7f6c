#!/usr/bin/env python3
"""Inbound verification throughput: smtp-source -> dkproxy in -> smtp-sink.

Every message carries a DKIM rsa-sha256 and a DomainKeys signature (3 KB by default) and is
checked for DKIM, DomainKeys, SPF and DMARC; keys and policy records come from NSD on
loopback and, after the warm-up, from dkproxy's DNS cache ("keys cached"). Prints
messages/s through the proxy and, in the same run, smtp-source -> smtp-sink directly.

    .venv/bin/python bench/bench_in.py [--messages 3000] [--sessions 8] [--size 3000] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_out import (  # noqa: E402
    alternate,
    drive,
    free_port,
    show,
    start_sink,
    stop,
    wait_port,
    write_key,
)
from dkproxy.mailauth.keys import load_signing_key  # noqa: E402
from dkproxy.mailauth.message import Message  # noqa: E402
from dkproxy.outbound import OutboundSigner  # noqa: E402
from dkproxy.policy import SignatureSpec  # noqa: E402
from tests.support.dnsserver import DNSServer  # noqa: E402


def signed_message(key_path: Path, size: int) -> bytes:
    """A message signed by dkproxy's own signer (DKIM + DomainKeys) for example.org."""
    key = load_signing_key(str(key_path))
    specs = (
        SignatureSpec("dkim", "example.org", "bench", key, "rsa-sha256", "relaxed/simple",
                      None, None),
        SignatureSpec("domainkeys", "example.org", "bench", key, "rsa-sha1", "nofws", None, None),
    )  # fmt: skip

    class _Fixed:
        def select(self, sender: object, list_id: object, *, no_sender: str = "") -> object:
            from dkproxy.policy import Selection

            return Selection(specs=specs, rule="bench", reason=None)

    head = (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: bench\r\n"
        b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    data = head + body
    outcome = OutboundSigner(_Fixed()).sign(data)  # type: ignore[arg-type]
    assert Message(data) and len(outcome.prepend) == 2, outcome.summary
    return b"".join([*outcome.prepend, data])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dkproxy-bench-in-") as tmp, DNSServer() as dns:
        workdir = Path(tmp)
        key = write_key(workdir / "rsa.key", "rsa")
        dns.publish({
            "bench._domainkey.example.org": [load_signing_key(str(key)).dns_record],
            "example.org": ["v=spf1 ip4:127.0.0.0/8 -all"],
            "_dmarc.example.org": ["v=DMARC1; p=reject"],
        })  # fmt: skip
        message_file = workdir / "message.eml"
        message_file.write_bytes(signed_message(key, args.size).replace(b"\r\n", b"\n"))
        sink_port, proxy_port = free_port(), free_port()
        sink = start_sink(sink_port)
        command = [sys.executable, "-m", "dkproxy", "in", "--hostname=mx.bench.test",
                   f"--dns_server={dns.address}", f"127.0.0.1:{proxy_port}",
                   f"127.0.0.1:{sink_port}"]  # fmt: skip
        if args.workers:
            command.insert(4, f"--workers={args.workers}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log_path = workdir / "dkproxy.log"
        with open(log_path, "wb") as log:
            proxy = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            wait_port(proxy_port)
            load = (args.messages, args.sessions, args.size, False, str(message_file))
            drive(proxy_port, min(500, args.messages), *load[1:])  # warm-up, fills the caches
            verdict = next(
                (
                    line.split(" sender=", 1)[-1]
                    for line in log_path.read_text().splitlines()
                    if "dkim=" in line
                ),
                "no log line",
            )
            if "dkim=pass" not in verdict or "domainkeys=pass" not in verdict:
                raise RuntimeError(f"verification did not pass: {verdict}")  # fmt: skip
            direct, proxied = alternate(sink_port, proxy_port, load, args.runs)
        finally:
            stop(proxy, sink)

    print(f"messages={args.messages} sessions={args.sessions} size={args.size}B "
          f"DKIM rsa-sha256 + DomainKeys + SPF + DMARC, keys cached, "
          f"workers={args.workers or 'default'}")  # fmt: skip
    print(f"  verdict on the test message: {verdict}")
    print(f"  smtp-source -> smtp-sink              {show(direct)}")
    print(f"  smtp-source -> dkproxy in -> smtp-sink {show(proxied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
