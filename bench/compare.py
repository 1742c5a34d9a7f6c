#!/usr/bin/env python3
"""DKIMproxy 1.4 and dkproxy side by side: same configuration file, same sink, same load.

    .venv/bin/python bench/compare.py --dkimproxy-out /usr/local/dkimproxy/bin/dkimproxy.out

One dkimproxy.out configuration (DKIM rsa-sha256 relaxed + DomainKeys nofws, one RSA-2048 key)
is written twice, differing only in the `listen` port; `dkimproxy.out --conf_file=A` and
`.venv/bin/python -m dkproxy out --conf_file=B` both relay to one smtp-sink. Before timing,
one message through each proxy is captured (smtp-sink -d) and checked for a DKIM-Signature and a
DomainKey-Signature, so that a proxy passing mail unsigned cannot look fast. Then smtp-source
runs are interleaved (direct, DKIMproxy, dkproxy, and again) and the ratio of the median
messages/s is reported. Exit status 0 when dkproxy reaches --ratio times DKIMproxy's rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench_out import free_port, start_sink, tool, wait_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from loadgen import LoadConfig, run_sync
from matrix_cells import smtp_source
from memory import MIB, MemorySampler

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, listen: int, relay: int, key: Path, extra: Sequence[str]) -> Path:
    """A dkimproxy_out.conf both proxies read; only `listen` differs between the two copies."""
    lines = [
        f"listen    127.0.0.1:{listen}",
        f"relay     127.0.0.1:{relay}",
        "domain    example.org",
        f"keyfile   {key}",
        "selector  bench",
        "signature dkim(c=relaxed)",
        "signature domainkeys(c=nofws)",
    ]
    if os.geteuid() == 0:  # Net::Server would switch to nobody anyway; make both do it
        lines += ["user      nobody", "group     nogroup"]
    path.write_text("\n".join([*lines, *extra, ""]))
    return path


def write_rsa_key(path: Path) -> Path:
    """PKCS#1 PEM ("BEGIN RSA PRIVATE KEY"): the form Mail::DKIM reads; readable by nobody."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o644)
    return path


class Daemon:
    """A proxy started from a command line, its port and a log file."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict[str, str]):
        self.name = name
        self.port = port
        self.log = log
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=stderr, stderr=stderr
            )
        try:
            wait_port(port, timeout=30)
        except RuntimeError:
            self.stop()
            sys.exit(f"compare: {name} did not start:\n{log.read_text()}")
        time.sleep(1.0)  # prefork children and workers reach accept()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(35)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_both(
    args: argparse.Namespace, workdir: Path, relay: int, key: Path, tag: str
) -> list[Daemon]:
    """DKIMproxy and dkproxy on the same configuration, relaying to `relay`."""
    daemons = []
    perl_env = dict(os.environ)
    if args.perl5lib:
        perl_env["PERL5LIB"] = ":".join(filter(None, [args.perl5lib, perl_env.get("PERL5LIB")]))
    dk_env = {**os.environ, "PYTHONPATH": str(args.tree)}
    commands = {
        "DKIMproxy": ([str(args.dkimproxy_out)], perl_env),
        "dkproxy": ([sys.executable, "-m", "dkproxy", "out"], dk_env),
    }
    for name, (command, env) in commands.items():
        port = free_port()
        conf = write_config(workdir / f"{name}-{tag}.conf", port, relay, key, args.conf_line)
        log = workdir / f"{name}-{tag}.log"
        daemons.append(Daemon(name, [*command, f"--conf_file={conf}"], port, log, env))
    return daemons


@contextlib.contextmanager
def dumping_sink(dumps: Path) -> Iterator[int]:
    """An smtp-sink (made here, stopped on leaving) that writes every message it takes into a
    file of the new directory `dumps`; yields its port."""
    dumps.mkdir(mode=0o777)
    dumps.chmod(0o777)  # smtp-sink drops its privileges to `user` before writing
    port = free_port()
    user = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    sink = subprocess.Popen(
        [tool("smtp-sink"), "-u", user, "-d", f"{dumps}/%H%M%S.", f"127.0.0.1:{port}", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        sink.terminate()
        sink.wait(5)


def new_dumps(dumps: Path, before: set[Path], timeout: float = 5.0) -> set[Path]:
    """The files the dumping sink wrote since `before` (waiting up to `timeout` s for one)."""
    deadline = time.monotonic() + timeout
    while not (new := set(dumps.iterdir()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new


def check_signing(args: argparse.Namespace, workdir: Path, key: Path) -> None:
    """One message through each proxy into a dumping smtp-sink: both must sign it."""
    dumps = workdir / "dumps"
    with dumping_sink(dumps) as port:
        daemons = start_both(args, workdir, port, key, "check")
        try:
            for daemon in daemons:
                before = set(dumps.iterdir())
                result = run_sync(
                    LoadConfig("127.0.0.1", daemon.port, rate=0, messages=1, connections=1)
                )
                new = new_dumps(dumps, before)
                if result.delivered != 1 or not new:
                    sys.exit(
                        f"compare: {daemon.name} did not deliver a test message "
                        f"({result.errors}); see {daemon.log}"
                    )
                text = b"".join(path.read_bytes() for path in new).lower()
                missing = [
                    h for h in ("dkim-signature:", "domainkey-signature:") if h.encode() not in text
                ]
                if missing:
                    sys.exit(f"compare: {daemon.name} relayed the message without {missing}")
                print(f"{daemon.name}: signs with DKIM and DomainKeys (checked)")
        finally:
            for daemon in daemons:
                daemon.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dkimproxy-out",
        type=Path,
        required=True,
        help="the dkimproxy.out program of DKIMproxy 1.4",
    )
    parser.add_argument("--perl5lib", help="PERL5LIB for DKIMproxy (its lib/ directory)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="directory holding dkproxy/")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=3000, help="body bytes (smtp-source -l)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per proxy")
    parser.add_argument("--ratio", type=float, default=6.0, help="dkproxy/DKIMproxy required")
    parser.add_argument("--keep-open", action="store_true", help="smtp-source -d")
    parser.add_argument(
        "--conf-line",
        action="append",
        default=[],
        help="extra configuration line for both, e.g. 'max_servers 10'",
    )
    args = parser.parse_args(argv)
    if not os.access(args.dkimproxy_out, os.X_OK):
        parser.error(f"{args.dkimproxy_out} is not an executable file")

    with tempfile.TemporaryDirectory(prefix="dkproxy-compare-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        key = write_rsa_key(workdir / "rsa.key")
        check_signing(args, workdir, key)
        sink_port = free_port()
        sink = start_sink(sink_port)
        daemons = start_both(args, workdir, sink_port, key, "bench")
        rates: dict[str, list[float]] = {"direct": [], **{d.name: [] for d in daemons}}
        peaks: dict[str, float] = {}
        try:
            targets = [("direct", sink_port, None)] + [
                (d.name, d.port, MemorySampler(d.process.pid)) for d in daemons
            ]
            counts: dict[str, int] = {}
            for name, port, _ in targets:  # warm-up, and size each run to ~--seconds
                warm = 50 if name == "DKIMproxy" else 200
                elapsed, _ = smtp_source(port, warm, args.sessions, args.size, args.keep_open)
                counts[name] = max(args.sessions, min(50_000, round(warm / elapsed * args.seconds)))
            for _ in range(args.runs):
                for name, port, sampler in targets:
                    if sampler is None:
                        elapsed, _ = smtp_source(
                            port, counts[name], args.sessions, args.size, args.keep_open
                        )
                    else:
                        with sampler.window() as peak:
                            elapsed, _ = smtp_source(
                                port, counts[name], args.sessions, args.size, args.keep_open
                            )
                        peaks[name] = max(peaks.get(name, 0.0), peak.rss / MIB)
                    rates[name].append(counts[name] / elapsed)
                    print(f"  {name:10} {counts[name] / elapsed:9.0f} messages/s", flush=True)
        finally:
            for daemon in daemons:
                daemon.stop()
            sink.terminate()
            sink.wait(5)
            if shutil.which("uptime"):
                print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    median = {name: statistics.median(values) for name, values in rates.items()}
    mode = "many messages per session" if args.keep_open else "one message per session"
    print(
        f"\n{args.sessions} sessions, {args.size} B, DKIM rsa-sha256 + DomainKeys, {mode}, "
        f"median of {args.runs} interleaved runs:"
    )
    for name, value in median.items():
        rss = f"   peak RSS {peaks[name]:.0f} MiB" if name in peaks else ""
        print(f"  {name:10} {value:9.0f} messages/s{rss}")
    ratio = median["dkproxy"] / median["DKIMproxy"]
    verdict = "meets" if ratio >= args.ratio else "DOES NOT meet"
    print(f"dkproxy / DKIMproxy = {ratio:.1f}x ({verdict} the required {args.ratio:g}x)")
    return 0 if ratio >= args.ratio else 1


if __name__ == "__main__":
    sys.exit(main())
