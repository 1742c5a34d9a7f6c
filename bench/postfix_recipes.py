#!/usr/bin/env python3
"""End-to-end signing throughput through one Postfix: which outbound recipe costs what.

One private Postfix instance (tests/support/postfix.py: its own directories, loopback ports,
never port 25 or /etc/postfix) offers four submission services side by side, all relaying to
one smtp-sink, and smtp-source loads each in turn, in alternating order, in the same run:

    plain        Postfix without signing (the ceiling)
    milter       OpenDKIM 2.11 as a milter on a unix socket (smtpd_milters)
    after-queue  dkproxy as the content_filter (conf/postfix-master-out.cf)
    before-queue dkproxy as the smtpd_proxy_filter (conf/postfix-master-out-proxy.cf)

Both signers make one DKIM rsa-sha256 relaxed/simple signature with the same 2048-bit key
over the same header fields (OpenDKIM is given dkproxy's default SignHeaders and
OversignHeaders), and no DomainKeys signature (OpenDKIM has none); a first message through
each arrangement checks that, or the run stops. `--breakdown` shows Postfix's CPU by service
(which smtpd, cleanup, qmgr, ...), `--keep-log FILE` keeps Postfix's log.
A figure is messages/s from the first message offered to the last one delivered to the sink
(the queue empty again), so the queue passes are counted. Needs root (Postfix), postfix,
opendkim; prints the rates and the ratios to the milter measured in this run.

    .venv/bin/python bench/postfix_recipes.py                  # 500 messages x 3 rounds
    .venv/bin/python bench/postfix_recipes.py --messages 200 --rounds 2 --sessions 8
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dkproxy.mailauth.dkim_signer import DEFAULT_SIGNED_HEADERS, OVERSIGNED_HEADERS  # noqa: E402
from tests.support.postfix import PostfixInstance  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.sink import SmtpSink  # noqa: E402
from tests.support.testkeys import make_rsa_key  # noqa: E402
from tests.support.tools import free_port, require_tool, wait_for_port  # noqa: E402
from tests.test_postfix import outbound_services  # noqa: E402

ARRANGEMENTS = ("plain", "milter", "after-queue", "before-queue")
SENDER, RCPT = "alice@example.org", "bob@example.net"


def services(ports: dict[str, int], socket_path: str) -> str:
    """The four submission services (and what the shipped snippets need behind them): the
    snippets as the tests run them (tests/test_postfix.py: open to mynetworks, no TLS/SASL)."""
    after = outbound_services(ports["after-queue"], ports["cf-filter"], ports["cf-reinject"])
    before = outbound_services(ports["before-queue"], ports["bq-filter"], ports["bq-reinject"],
                               "postfix-master-out-proxy.cf")  # fmt: skip
    plain = f"127.0.0.1:{ports['plain']} inet n - n - 50 smtpd\n"
    milter = (
        f"127.0.0.1:{ports['milter']} inet n - n - 50 smtpd\n"
        f"  -o smtpd_milters=unix:{socket_path}\n"
        "  -o milter_default_action=tempfail\n"
    )
    return plain + milter + after + before


def start_opendkim(work: str, key: str) -> tuple[subprocess.Popen[bytes], str]:
    """OpenDKIM in signing mode on a unix socket Postfix's smtpd (user postfix) can use."""
    opendkim = require_tool("opendkim")
    socket_path = os.path.join(work, "opendkim.sock")
    conf = os.path.join(work, "opendkim.conf")
    with open(conf, "w", encoding="utf-8") as handle:
        handle.write(
            f"Syslog no\nUMask 000\nSocket local:{socket_path}\nMode s\n"
            f"Domain example.org\nSelector bench\nKeyFile {key}\n"
            "Canonicalization relaxed/simple\nSignatureAlgorithm rsa-sha256\n"
            # The header fields dkproxy signs and oversigns by default, so that both signers
            # hash the same fields (OpenDKIM's own default list is shorter).
            f"SignHeaders {','.join(DEFAULT_SIGNED_HEADERS)}\n"
            f"OversignHeaders {','.join(OVERSIGNED_HEADERS)}\n"
            f"PidFile {os.path.join(work, 'opendkim.pid')}\n"
        )
    proc = subprocess.Popen([opendkim, "-f", "-x", conf], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, "opendkim.log"), "wb"))  # noqa: SIM115  # fmt: skip
    deadline = time.monotonic() + 15
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"opendkim did not start: {Path(work, 'opendkim.log').read_text()}")
        time.sleep(0.05)
    return proc, socket_path


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (dkproxy's workers), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    except OSError:
        pass
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def postfix_cpu_by_process(mta: PostfixInstance) -> dict[tuple[int, str], float]:
    """CPU seconds of the Postfix master and of each daemon it runs now, keyed by (pid,
    "program service"), e.g. "smtpd 127.0.0.1:10028"; daemons that exited are in the
    master's children time, under "exited daemons" (so nothing is lost from the total)."""
    ticks = os.sysconf("SC_CLK_TCK")
    master = int(Path(mta.queue_dir, "pid", "master.pid").read_text().strip())
    found: dict[tuple[int, str], float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm, rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)
            fields = rest.split()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(entry) == master:
            found[(0, "master")] = (int(fields[11]) + int(fields[12])) / ticks
            found[(0, "exited daemons")] = (int(fields[13]) + int(fields[14])) / ticks
        elif int(fields[1]) == master:  # fields[1]: the parent's pid
            # The master starts each daemon as "PROGRAM -n SERVICE -t TYPE ...".
            service = argv[argv.index(b"-n") + 1].decode() if b"-n" in argv else ""
            name = f"{comm.split('(', 1)[1]} {service}".strip()
            found[(int(entry), name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def cpu_used_by_service(
    before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]
) -> dict[str, float]:
    """CPU seconds used between two `postfix_cpu_by_process` snapshots, by service. A daemon
    that exited meanwhile has its whole life's CPU in the master's children time: what it
    had used before the first snapshot is taken off again there."""
    used: dict[str, float] = {}
    for key, seconds in after.items():
        used[key[1]] = used.get(key[1], 0.0) + seconds - before.get(key, 0.0)
    for key, seconds in before.items():
        if key not in after:
            used["exited daemons"] = used.get("exited daemons", 0.0) - seconds
    return used


def postfix_cpu_seconds(mta: PostfixInstance) -> float:
    """CPU of the Postfix master and every daemon it ran (exited ones are in its cutime)."""
    return sum(postfix_cpu_by_process(mta).values())


def delivered(mta: PostfixInstance, sink_port: int) -> int:
    pattern = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink_port}, .*status=sent"
    return len(re.findall(pattern, mta.maillog()))


def run_once(mta: PostfixInstance, sink: SmtpSink, port: int, args: argparse.Namespace) -> float:
    """Messages/s from smtp-source's start until the sink has received them all.

    The sink's dump directory (one file per message, written as the message completes) is
    counted every 20 ms: cheaper than asking Postfix, so the measuring costs the machine
    little and the same for every arrangement. Then the queue must be empty and the maillog
    must show every message sent to the sink.
    """
    dump = os.path.join(sink.dir, "dump")
    before, logged = len(os.listdir(dump)), delivered(mta, sink.port)
    command = [require_tool("smtp-source"), "-s", str(args.sessions), "-m", str(args.messages),
               "-l", str(args.size), "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]  # fmt: skip
    started = time.monotonic()
    source = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = started + 600
    while len(os.listdir(dump)) - before < args.messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(os.listdir(dump)) - before} messages arrived")
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    output = source.communicate(timeout=60)[0]
    if source.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {output.decode()}")
    deadline = time.monotonic() + 30  # postlogd writes the last lines a moment later
    while delivered(mta, sink.port) - logged < args.messages or mta.queue():
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue not empty or not all delivered:\n{mta.maillog()[-3000:]}")
        time.sleep(0.1)
    deferred = re.findall(r"status=deferred \((.*)\)", mta.maillog())
    if deferred:
        print(f"  note: {len(deferred)} deliveries deferred so far, e.g. {deferred[-1]}")
    return args.messages / elapsed


def check_signed(mta: PostfixInstance, sink: SmtpSink, ports: dict[str, int]) -> None:
    """One message per arrangement first: signed by the expected signer (or not at all)."""
    for name in ARRANGEMENTS:
        data = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: check-{name}\r\n"
                f"Date: {formatdate()}\r\nMessage-ID: <check-{name}@example.org>\r\n"
                "\r\nHello.\r\n")  # fmt: skip
        with smtplib.SMTP("127.0.0.1", ports[name], timeout=60) as client:
            client.sendmail(SENDER, [RCPT], data)
    found = {m.header("Subject"): m.data for m in sink.wait_for(len(ARRANGEMENTS), 60)}
    signatures: dict[str, dict[str, str]] = {}
    for name in ARRANGEMENTS:
        data = found[f"check-{name}"]
        signed = data.count(b"DKIM-Signature:")
        assert signed == (0 if name == "plain" else 1), (name, data[:600])
        assert b"DomainKey-Signature:" not in data, (name, data[:600])  # DKIM only, as OpenDKIM
        if signed:
            tags = signature_tags(data)
            assert tags["d"] == "example.org" and tags["s"] == "bench", (name, tags)
            signatures[name] = tags
    # Like with like: the same algorithm, canonicalization, key (size) and header fields
    # (in either order), or the comparison is void.
    reference = signatures["milter"]
    for name, tags in signatures.items():
        fields = sorted(tags["h"].lower().split(":"))
        shown = f"a={tags['a']} c={tags['c']} h={':'.join(fields)}, b= {len(tags['b'])} chars"
        print(f"{name:<13} signs {shown}")
        assert tags["a"] == reference["a"] and tags["c"] == reference["c"], (name, tags)
        assert len(tags["b"]) == len(reference["b"]), (name, "key size differs")
        assert fields == sorted(reference["h"].lower().split(":")), (name, tags, reference)
    sink.clear()


def signature_tags(data: bytes) -> dict[str, str]:
    """The tags of the message's DKIM-Signature field (white space removed), e.g. {"a": ...}."""
    match = re.search(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", data, re.MULTILINE | re.DOTALL)
    assert match is not None
    value = re.sub(rb"\s+", b"", match.group(1)).decode("ascii")
    tags = dict(part.split("=", 1) for part in value.split(";") if "=" in part)
    tags.setdefault("c", "simple/simple")
    if "/" not in tags["c"]:
        tags["c"] += "/simple"  # RFC 6376 3.5: a lone algorithm is the header's; body simple
    return tags


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=500, help="per run (500)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per arrangement (3)")
    parser.add_argument("--sessions", type=int, default=8, help="smtp-source sessions (8)")
    parser.add_argument("--size", type=int, default=3000, help="message size in bytes (3000)")
    parser.add_argument("--workers", type=int, default=0, help="dkproxy workers (one per CPU)")
    parser.add_argument("--keep-log", metavar="FILE", help="write Postfix's log to FILE")
    parser.add_argument(
        "--breakdown", action="store_true", help="also show Postfix's CPU by service"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ARRANGEMENTS,
        default=list(ARRANGEMENTS),
        help="measure only these (the milter always runs, as the reference)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: a private Postfix instance must be started as root")

    # Not under /tmp: OpenDKIM refuses a configuration or key file in a directory other users
    # may write to. bench/results/ is git-ignored; Postfix's smtpd (user postfix) must reach
    # the milter socket there.
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="recipes-", dir=results)
    os.chmod(work, 0o755)
    processes: list[ProxyProcess] = []
    opendkim = None
    mta = None
    sink = SmtpSink().start()
    try:
        key = make_rsa_key(os.path.join(work, "key.pem"))
        names = ("plain", "milter", "after-queue", "before-queue", "cf-filter", "cf-reinject",
                 "bq-filter", "bq-reinject")  # fmt: skip
        ports = {name: free_port() for name in names}
        opendkim, socket_path = start_opendkim(work, key)
        signer = ["--keyfile", key, "--selector=bench", "--domain=example.org",
                  "--signature=dkim(c=relaxed)"]  # fmt: skip
        if args.workers:
            signer.append(f"--workers={args.workers}")
        for filter_port, reinject in (("cf-filter", "cf-reinject"), ("bq-filter", "bq-reinject")):
            proxy = ProxyProcess("out", signer, relay=f"127.0.0.1:{ports[reinject]}",
                                 port=ports[filter_port])  # fmt: skip
            processes.append(proxy)
            proxy.start()
        mta = PostfixInstance(
            services=services(ports, socket_path),
            relayhost=f"[127.0.0.1]:{sink.port}",
            main={"milter_protocol": "6", "default_process_limit": "100"},
        ).start()
        for name in ARRANGEMENTS:
            wait_for_port("127.0.0.1", ports[name])
        check_signed(mta, sink, ports)
        # Warm up every path (Postfix starts its smtpd/smtp/cleanup processes on demand,
        # dkproxy fills its downstream session pool): one uncounted run each.
        for name in ARRANGEMENTS:
            run_once(mta, sink, ports[name], args)
            sink.clear()

        measured = [name for name in ARRANGEMENTS if name in args.only or name == "milter"]
        rates: dict[str, list[float]] = {name: [] for name in measured}
        cpu_ms: dict[str, list[float]] = {name: [] for name in measured}
        postfix_ms: dict[str, list[float]] = {name: [] for name in measured}
        breakdown: dict[str, dict[str, list[float]]] = {name: {} for name in measured}
        signer_pids = {
            "milter": opendkim.pid,
            "after-queue": processes[0].proc.pid,  # type: ignore[union-attr]
            "before-queue": processes[1].proc.pid,  # type: ignore[union-attr]
        }
        for round_number in range(args.rounds):
            order = ARRANGEMENTS[round_number % 4 :] + ARRANGEMENTS[: round_number % 4]
            for name in order:
                if name not in args.only and name != "milter":
                    continue
                signer_pid = signer_pids.get(name)
                cpu = cpu_seconds(signer_pid) if signer_pid else 0.0
                postfix_cpu = postfix_cpu_by_process(mta)
                rates[name].append(run_once(mta, sink, ports[name], args))
                by_service = cpu_used_by_service(postfix_cpu, postfix_cpu_by_process(mta))
                postfix_ms[name].append(sum(by_service.values()) * 1000 / args.messages)
                for service, used in by_service.items():
                    breakdown[name].setdefault(service, []).append(used * 1000 / args.messages)
                if signer_pid:
                    used = cpu_seconds(signer_pid) - cpu
                    cpu_ms[name].append(used * 1000 / args.messages)
                sink.clear()
            shown = ", ".join(f"{name} {rates[name][-1]:.0f}/s" for name in measured)
            print(f"round {round_number + 1}: {shown}", flush=True)
    finally:
        if mta is not None:
            if args.keep_log:
                Path(args.keep_log).write_text(mta.maillog(), encoding="utf-8")
            mta.cleanup()
        for proxy in processes:
            proxy.stop()
        if opendkim is not None:
            opendkim.terminate()
            opendkim.wait(10)
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{args.messages} messages x {args.rounds} rounds, {args.sessions} sessions, "
          f"{args.size} bytes; median messages/s, end to end through one Postfix:")  # fmt: skip
    for name in measured:
        ratio = medians[name] / medians["milter"]
        cpu = f", signer {statistics.median(cpu_ms[name]):.2f}" if cpu_ms[name] else ""
        postfix = statistics.median(postfix_ms[name])
        print(f"  {name:<13} {medians[name]:7.0f}/s   {ratio:4.2f}x the OpenDKIM milter"
              f"   CPU ms/message: Postfix {postfix:.2f}{cpu}")  # fmt: skip
    if args.breakdown:
        print("\nPostfix CPU ms/message by service (median; smtpd 127.0.0.1:P is the service")
        print("on port P; exited daemons: those that ended during the run):")
        for name in measured:
            parts = {service: statistics.median(values) for service, values in
                     breakdown[name].items()}  # fmt: skip
            ranked = sorted(parts.items(), key=lambda item: -item[1])
            shown = ", ".join(f"{service} {ms:.2f}" for service, ms in ranked if ms >= 0.01)
            print(f"  {name:<13} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
