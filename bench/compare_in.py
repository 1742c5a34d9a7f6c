#!/usr/bin/env python3
"""DKIMproxy 1.4 and dkproxy side by side, inbound (and outbound), with the SMTP-only rate.

    .venv/bin/python bench/compare_in.py --dkimproxy-in /tmp/dkimproxy/scripts/dkimproxy.in \\
        --perl5lib /tmp/dkimproxy/lib [--dkimproxy-out /tmp/dkimproxy/scripts/dkimproxy.out]

Everything runs in a private network and mount namespace (`unshare --net --mount`, as root):
Mail::DKIM asks the resolver of /etc/resolv.conf only, so there NSD (tests/support/
dnsserver.py) serves the keys, the SPF and the DMARC records on 127.0.0.1:53 and a
resolv.conf bind-mounted over /etc/resolv.conf points at it; `dkproxy in` reads the same
file, so both verifiers ask the same server. The host's resolv.conf and port 53 are never
touched.

Inbound, both proxies read one dkimproxy_in.conf (listen, relay, hostname) and relay to one
smtp-sink; the message is 3 KB with a DKIM rsa-sha256 and a DomainKeys signature (made by
dkproxy's signer, key in DNS). DKIMproxy verifies DKIM and DomainKeys; dkproxy also SPF and
DMARC. Before timing, one message through each is checked: both must say dkim=pass and
domainkeys=pass. With --dkimproxy-out the outbound pair of bench/compare.py runs in the same
rounds. "dkproxy pass-through" is `dkproxy out` for a domain the message is not from: the
message passes unsigned, so its rate is the SMTP path alone, the ceiling for both modes.
Rounds interleave every target (direct smtp-source -> smtp-sink first), and the ratios of
the medians are printed. Exit status 0 when dkproxy in reaches --ratio-in times DKIMproxy
(and dkproxy out --ratio-out times, when measured).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_out import drive, free_port, start_sink, tool, write_key
from compare import Daemon, check_signing, dumping_sink, new_dumps, start_both, write_rsa_key
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_in import signed_message  # noqa: E402
from dkproxy.mailauth.keys import load_signing_key  # noqa: E402
from tests.support.dnsserver import DNSServer  # noqa: E402

NETNS_MARK = "DKPROXY_COMPARE_NETNS"
HOSTNAME = "mx.bench.test"


def in_namespace(argv: Sequence[str]) -> int:
    """Run this script again in a private network + mount namespace; return its status."""
    if os.geteuid() != 0:
        sys.exit("compare_in: needs root (unshare --net --mount, a bind mount, port 53)")
    command = [tool("unshare"), "--net", "--mount", sys.executable, __file__, *argv]
    return subprocess.run(command, env={**os.environ, NETNS_MARK: "1"}, check=False).returncode


def set_up_namespace(workdir: Path) -> None:
    """Loopback up, /etc/resolv.conf (in this mount namespace only) -> 127.0.0.1."""
    subprocess.run([tool("ip"), "link", "set", "lo", "up"], check=True)
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    resolv.chmod(0o644)
    subprocess.run([tool("mount"), "--bind", str(resolv), "/etc/resolv.conf"], check=True)


def write_in_config(path: Path, listen: int, relay: int, perl: bool) -> Path:
    lines = [
        f"listen    127.0.0.1:{listen}",
        f"relay     127.0.0.1:{relay}",
        f"hostname  {HOSTNAME}",
    ]
    # Net::Server switches to nobody when started as root. dkproxy stays as it was started:
    # its Python may live where nobody cannot read (a pyenv under /root), and the verifier
    # imports some modules (the public suffix list's IDNA codec) on first use.
    if perl and os.geteuid() == 0:
        lines += ["user      nobody", "group     nogroup"]
    path.write_text("\n".join([*lines, ""]))
    path.chmod(0o644)
    return path


def start_inbound(args: argparse.Namespace, workdir: Path, relay: int, tag: str) -> list[Daemon]:
    perl_env = dict(os.environ)
    if args.perl5lib:
        perl_env["PERL5LIB"] = ":".join(filter(None, [args.perl5lib, perl_env.get("PERL5LIB")]))
    dk_env = {**os.environ, "PYTHONPATH": str(args.tree)}
    commands = {
        "DKIMproxy.in": (["perl", str(args.dkimproxy_in)], perl_env),
        "dkproxy in": ([sys.executable, "-m", "dkproxy", "in"], dk_env),
    }
    daemons = []
    for name, (command, env) in commands.items():
        port = free_port()
        conf = write_in_config(
            workdir / f"{name.replace(' ', '-')}-{tag}.conf", port, relay, name.endswith(".in")
        )
        log = workdir / f"{name.replace(' ', '-')}-{tag}.log"
        daemons.append(Daemon(name, [*command, f"--conf_file={conf}"], port, log, env))
    return daemons


def start_pass_through(args: argparse.Namespace, workdir: Path, relay: int, key: Path) -> Daemon:
    """`dkproxy out` that signs only elsewhere.test: alice@example.org passes unsigned."""
    port = free_port()
    command = [sys.executable, "-m", "dkproxy", "out", f"--keyfile={key}", "--selector=bench",
               "--domain=elsewhere.test", f"127.0.0.1:{port}", f"127.0.0.1:{relay}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(args.tree)}
    return Daemon("dkproxy pass-through", command, port, workdir / "pass-through.log", env)


def check_verifying(args: argparse.Namespace, workdir: Path, message_file: Path) -> None:
    """One signed message through each inbound proxy into a dumping sink: both must pass it."""
    dumps = workdir / "dumps-in"
    with dumping_sink(dumps) as port:
        daemons = start_inbound(args, workdir, port, "check")
        try:
            for daemon in daemons:
                before = set(dumps.iterdir())
                try:
                    drive(daemon.port, 1, 1, 0, False, str(message_file))
                except RuntimeError as exc:
                    log = daemon.log.read_text()[-3000:]
                    sys.exit(f"compare_in: {daemon.name}: {exc}\n{log}")
                new = new_dumps(dumps, before)
                text = b"".join(path.read_bytes() for path in new).lower()
                head = text.split(b"\r\n\r\n" if b"\r\n\r\n" in text else b"\n\n", 1)[0]
                missing = [w for w in ("dkim=pass", "domainkeys=pass") if w.encode() not in head]
                if not new or missing:
                    sys.exit(
                        f"compare_in: {daemon.name} did not report {missing}; see {daemon.log}"
                    )
                print(f"{daemon.name}: dkim=pass domainkeys=pass (checked)")
        finally:
            for daemon in daemons:
                daemon.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dkimproxy-in", type=Path, required=True, help="DKIMproxy 1.4's dkimproxy.in"
    )
    parser.add_argument("--dkimproxy-out", type=Path, help="also compare dkimproxy.out")
    parser.add_argument("--perl5lib", help="PERL5LIB for DKIMproxy (its lib/ directory)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="directory holding dkproxy/")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=3000, help="message bytes")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per target")
    parser.add_argument("--ratio-in", type=float, default=7.0, help="dkproxy in / DKIMproxy.in")
    parser.add_argument("--ratio-out", type=float, default=6.0, help="dkproxy out / .out")
    args = parser.parse_args(argv)
    for program in filter(None, (args.dkimproxy_in, args.dkimproxy_out)):
        if not program.is_file():
            parser.error(f"{program} is not a file")
    if os.environ.get(NETNS_MARK) != "1":
        return in_namespace(sys.argv[1:] if argv is None else list(argv))
    # compare.py's helpers read these attributes.
    args.conf_line = []

    with tempfile.TemporaryDirectory(prefix="dkproxy-compare-in-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        set_up_namespace(workdir)
        dns = DNSServer().start(port=53)
        daemons: list[Daemon] = []
        sink = None
        try:
            key = write_key(workdir / "in.key", "rsa")
            key.chmod(0o644)
            dns.publish({
                "bench._domainkey.example.org": [load_signing_key(str(key)).dns_record],
                "example.org": ["v=spf1 ip4:127.0.0.0/8 -all"],
                "_dmarc.example.org": ["v=DMARC1; p=reject"],
            })  # fmt: skip
            message_file = workdir / "signed.eml"
            message_file.write_bytes(signed_message(key, args.size).replace(b"\r\n", b"\n"))
            message_file.chmod(0o644)
            check_verifying(args, workdir, message_file)
            out_key = write_rsa_key(workdir / "out.key")
            if args.dkimproxy_out:
                check_signing(args, workdir, out_key)
            sink_port = free_port()
            sink = start_sink(sink_port)
            daemons = start_inbound(args, workdir, sink_port, "bench")
            daemons.append(start_pass_through(args, workdir, sink_port, out_key))
            if args.dkimproxy_out:
                for daemon in start_both(args, workdir, sink_port, out_key, "bench"):
                    daemon.name = {"DKIMproxy": "DKIMproxy.out"}.get(daemon.name, "dkproxy out")
                    daemons.append(daemon)
            rates = run_rounds(args, sink_port, daemons, message_file)
        finally:
            for daemon in daemons:
                daemon.stop()
            if sink is not None:
                sink.terminate()
                sink.wait(5)
            dns.stop()
            if shutil.which("uptime"):
                print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return report(args, rates)


def run_rounds(
    args: argparse.Namespace, sink_port: int, daemons: list[Daemon], message_file: Path
) -> dict[str, list[float]]:
    """Interleaved smtp-source runs against every target, each sized to about --seconds."""
    signed = str(message_file)
    targets = [("direct", sink_port, None)] + [
        (d.name, d.port, signed if d.name.endswith(" in") or d.name.endswith(".in") else None)
        for d in daemons
    ]
    counts: dict[str, int] = {}
    for name, port, file in targets:  # warm-up (fills dkproxy's caches), and sizing
        warm = 50 if name.startswith("DKIMproxy") else 200
        rate = drive(port, warm, args.sessions, args.size, False, file)
        counts[name] = max(args.sessions, min(50_000, round(rate * args.seconds)))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    rates[RSA] = []
    for _ in range(args.runs):
        rates[RSA].append(rsa_signature_seconds())
        for name, port, file in targets:
            rate = drive(port, counts[name], args.sessions, args.size, False, file)
            rates[name].append(rate)
            print(f"  {name:22} {rate:9.0f} messages/s", flush=True)
    rates[RSA].append(rsa_signature_seconds())
    return rates


RSA = "RSA-2048 signature"


def rsa_signature_seconds(seconds: float = 0.5) -> float:
    """One RSA-2048 PKCS#1 v1.5 signature with `cryptography` (OpenSSL), on this machine now."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    digest = hashlib.sha256(b"ceiling").digest()
    algorithm = utils.Prehashed(hashes.SHA256())
    count = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or count < 10:
        key.sign(digest, padding.PKCS1v15(), algorithm)
        count += 1
    return elapsed / count


def report(args: argparse.Namespace, rates: dict[str, list[float]]) -> int:
    rsa_time = statistics.median(rates.pop(RSA))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"\n{args.sessions} sessions, {args.size} B, one message per session, median of "
        f"{args.runs} interleaved runs (same run, same sink, same DNS):"
    )
    for name, value in median.items():
        print(f"  {name:22} {value:9.0f} messages/s")
    ok = True
    pairs = [("dkproxy in", "DKIMproxy.in", args.ratio_in)]
    if "dkproxy out" in median:
        pairs.append(("dkproxy out", "DKIMproxy.out", args.ratio_out))
    passthrough = median["dkproxy pass-through"]
    print(f"dkproxy pass-through (SMTP path only) = {passthrough / median['direct']:.2f}x direct")
    # Two signatures a message (DKIM + DomainKeys), every core signing and doing nothing else.
    ceiling = (os.cpu_count() or 1) / (2 * rsa_time)
    print(
        f"RSA-2048 signature here: {rsa_time * 1000:.2f} ms, so the RSA ceiling for DKIM + "
        f"DomainKeys on {os.cpu_count()} cores is {ceiling:.0f} messages/s"
        + (
            f"; dkproxy out is at {median['dkproxy out'] / ceiling:.0%} of it"
            if "dkproxy out" in median
            else ""
        )
    )
    for ours, theirs, wanted in pairs:
        ratio = median[ours] / median[theirs]
        ok = ok and ratio >= wanted
        verdict = "meets" if ratio >= wanted else "DOES NOT meet"
        print(
            f"{ours} / {theirs} = {ratio:.1f}x ({verdict} the required {wanted:g}x); "
            f"{ours} = {median[ours] / passthrough:.2f}x the pass-through rate"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
