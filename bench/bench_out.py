#!/usr/bin/env python3
"""Outbound signing throughput: Postfix smtp-source -> dkproxy out -> Postfix smtp-sink.

Prints messages/s for the proxy path and, in the same run, for smtp-source -> smtp-sink
directly (the ceiling set by the SMTP tools themselves on this machine).

    .venv/bin/python bench/bench_out.py   # 8 sessions, 3 KB, DKIM rsa-sha256 + DomainKeys
    .venv/bin/python bench/bench_out.py --messages 5000 --sessions 8 --size 3000 --workers 2
    .venv/bin/python bench/bench_out.py --signatures dkim dkim-ed25519 domainkeys
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def tool(name: str) -> str:
    for directory in ("/usr/sbin", "/usr/bin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if not found:
        sys.exit(f"bench: {name} not found (Debian package postfix)")
    return found


def write_key(path: Path, kind: str) -> Path:
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
           else ed25519.Ed25519PrivateKey.generate())  # fmt: skip
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    return path


def start_sink(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([tool("smtp-sink"), "-u", "nobody" if os.geteuid() == 0 else
                             os.environ.get("USER", "nobody"), "-m", "512",
                             f"127.0.0.1:{port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(port)
    return proc


def drive(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    keep_open: bool = False,
    message_file: str | None = None,
) -> float:
    """Run smtp-source and return messages per second.

    By default each message is its own SMTP session, as smtp-source does without -d (and as
    in the DKIMproxy figures of this machine); keep_open sends many messages per session.
    """
    length = ["-F", message_file] if message_file else ["-l", str(size)]
    command = [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), *length,
               "-f", "alice@example.org", "-t", "bob@example.net", *(["-d"] if keep_open else []),
               f"127.0.0.1:{port}"]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr or result.stdout}")
    return messages / elapsed


def alternate(
    sink_port: int, proxy_port: int, load: tuple, runs: int
) -> tuple[list[float], list[float]]:
    """Direct and proxied runs in turn, so that drift in the machine's speed hits both."""
    direct, proxied = [], []
    for _ in range(runs):
        direct.append(drive(sink_port, *load))
        proxied.append(drive(proxy_port, *load))
    return direct, proxied


def stop(proxy: subprocess.Popen[bytes], sink: subprocess.Popen[bytes]) -> None:
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(30)
    sink.terminate()
    sink.wait(5)


def show(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2]:7.0f}/s  best {ordered[-1]:7.0f}/s"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=3000, help="message size in bytes")
    parser.add_argument("--workers", type=int, default=0, help="dkproxy workers (0: its default)")
    parser.add_argument("--signatures", nargs="+", default=["dkim", "domainkeys"],
                        choices=["dkim", "dkim-ed25519", "domainkeys"])  # fmt: skip
    parser.add_argument(
        "--keep-open",
        action="store_true",
        help="several messages per SMTP session (smtp-source -d)",
    )
    parser.add_argument("--runs", type=int, default=3, help="measured runs (best and median shown)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dkproxy-bench-") as tmp:
        workdir = Path(tmp)
        rsa_key = write_key(workdir / "rsa.key", "rsa")
        ed_key = write_key(workdir / "ed.key", "ed25519")
        specs = {
            "dkim": "dkim(c=relaxed,a=rsa-sha256)",
            "dkim-ed25519": f"dkim(c=relaxed,a=ed25519-sha256,key={ed_key},s=ed)",
            "domainkeys": "domainkeys(c=nofws)",
        }
        sink_port, proxy_port = free_port(), free_port()
        sink = start_sink(sink_port)
        command = [sys.executable, "-m", "dkproxy", "out", f"--keyfile={rsa_key}",
                   "--selector=bench", "--domain=example.org",
                   *[f"--signature={specs[name]}" for name in args.signatures],
                   f"127.0.0.1:{proxy_port}", f"127.0.0.1:{sink_port}"]  # fmt: skip
        if args.workers:
            command.insert(4, f"--workers={args.workers}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proxy = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_port(proxy_port)
            load = (args.messages, args.sessions, args.size, args.keep_open)
            drive(proxy_port, min(500, args.messages), *load[1:])  # warm-up
            direct, proxied = alternate(sink_port, proxy_port, load, args.runs)
        finally:
            stop(proxy, sink)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    per_session = "many messages per session" if args.keep_open else "one message per session"
    print(f"messages={args.messages} sessions={args.sessions} size={args.size}B "
          f"signatures={'+'.join(args.signatures)} workers={args.workers or 'default'} "
          f"{per_session}")  # fmt: skip
    print(f"  smtp-source -> smtp-sink           {show(direct)}")
    print(f"  smtp-source -> dkproxy -> smtp-sink {show(proxied)}")
    print(f"  peak RSS of a child process: {peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
