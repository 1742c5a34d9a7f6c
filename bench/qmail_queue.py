"""What dkproxy-qmail-queue adds per message, against plain qmail-queue, in one run.

qmail starts `$QMAILQUEUE` once per message, so the wrapper's cost is a per-process cost:
interpreter start, the hand-over to `dkproxy qmail-service` (or signing in-process), and
running the real qmail-queue. This script injects the same message N times through each
variant, alternating them round by round (A, B, C, then B, C, A, ...) so that the machine's
load hits all of them alike, and reports the per-message wall time, the extra time per
message as the median of the per-round differences, and the peak RSS of the process tree.

Variants: `plain` (qmail-queue itself), `python-exec` (a Python script that only execs
qmail-queue: the floor for any wrapper written in Python), `service` (the console script
dkproxy-qmail-queue, with the service running), `launcher` (the same through the
`dkproxy qmail-launcher` program), `in-process` (the console script, no service); the
wrappers sign with DKIM (rsa-sha256) + DomainKeys and a 2048-bit key. The queue is
/var/qmail/bin/qmail-queue when notqmail is installed (messages it queues are removed
afterwards; run as root, with qmail-send stopped), else a stand-in
that reads fd 0 and fd 1 like it and exits 0. `--inject` goes through qmail-inject instead
(QMAILQUEUE set), as local mail does.

    .venv/bin/python bench/qmail_queue.py --count 100 [--size 3072] [--inject]
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REAL_QUEUE = "/var/qmail/bin/qmail-queue"
INJECT = "/var/qmail/bin/qmail-inject"
QUEUE_DIR = "/var/qmail/queue"
DOMAIN = "bench.example"
STANDIN = "#!/bin/sh\ncat >/dev/null && cat <&1 >/dev/null\n"


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)  # seconds per message
    max_rss_kib: int = 0
    failures: int = 0


def make_message(size: int) -> bytes:
    head = (
        f"From: Bench <bench@{DOMAIN}>\nTo: someone@example.net\nSubject: bench\n"
        f"Date: Mon, 30 Nov 2026 10:00:00 +0000\nMessage-ID: <bench@{DOMAIN}>\n\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghij.\n"
    return head + line * max(1, (size - len(head)) // len(line))


def run_once(argv: list[str], env: dict[str, str], stdin: str, stdout: str) -> tuple[float, int]:
    """(seconds, exit status) of one run with `stdin` on fd 0 and `stdout` on fd 1."""
    started = time.perf_counter()
    pid = os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, stdin, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, stdout, os.O_RDONLY, 0),
        ],
    )
    _, status = os.waitpid(pid, 0)
    return time.perf_counter() - started, os.waitstatus_to_exitcode(status)


def peak_rss_kib(argv: list[str], env: dict[str, str], stdin: str, stdout: str) -> int:
    """Peak RSS (KiB) of the process tree, by /usr/bin/time: a child spawned from this big
    process would report our own RSS (the kernel counts the parent's memory before exec)."""
    with open(stdin, "rb") as fd0, open(stdout, "rb") as fd1:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], stdin=fd0, stdout=fd1,
                              stderr=subprocess.PIPE, env=env, check=False)  # fmt: skip
    return int(proc.stderr.split()[-1])


def queue_files() -> set[str]:
    found = set()
    for directory in ("mess", "todo", "intd", "info", "local", "remote"):
        for path in glob.glob(f"{QUEUE_DIR}/{directory}/**", recursive=True):
            if os.path.isfile(path):
                found.add(path)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--inject", action="store_true", help="through qmail-inject")
    parser.add_argument("--standin", action="store_true", help="never use the real qmail-queue")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="dkproxy-qmail-bench-")
    keys = os.path.join(work, "keys", DOMAIN)
    os.makedirs(keys)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(os.path.join(keys, "default"), "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))  # fmt: skip
    real = os.path.exists(REAL_QUEUE) and not args.standin
    if real:
        queue = REAL_QUEUE
    else:
        queue = os.path.join(work, "qmail-queue")
        with open(queue, "w") as handle:
            handle.write(STANDIN)
        os.chmod(queue, 0o755)
    if args.inject and not os.path.exists(INJECT):
        print(f"--inject needs {INJECT}", file=sys.stderr)
        return 2
    message = os.path.join(work, "message")
    with open(message, "wb") as handle:
        handle.write(make_message(args.size))
    envelope = os.path.join(work, "envelope")
    with open(envelope, "wb") as handle:
        handle.write(f"Fbench@{DOMAIN}\0Tsomeone@example.net\0\0".encode())

    bindir = os.path.dirname(sys.executable)
    wrapper = os.path.join(bindir, "dkproxy-qmail-queue")
    sock = os.path.join(work, "service.sock")
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dkproxy",
            "qmail-service",
            "--socket",
            sock,
            "--allow-dir",
            os.path.join(work, "keys"),
            "--log-level",
            "warning",
        ]
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(sock)
            break
        except OSError:
            if time.monotonic() > deadline:
                service.kill()
                raise
            time.sleep(0.1)

    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    sign_env = {
        "DKQUEUE": queue,
        "DKSIGN": os.path.join(work, "keys", "%", "default"),
        "DKIMSIGN": os.path.join(work, "keys", "%", "default"),
    }
    launcher = os.path.join(work, "launcher")
    subprocess.run([sys.executable, "-m", "dkproxy", "qmail-launcher", launcher], check=True)
    # The floor for any Python wrapper: start the interpreter (with site), exec the queue.
    floor = os.path.join(work, "python-exec")
    with open(floor, "w") as handle:
        handle.write(f"#!{sys.executable}\nimport os\nos.execv({queue!r}, [{queue!r}])\n")
    os.chmod(floor, 0o755)
    programs = {
        "plain": (queue, base_env),
        "python-exec": (floor, base_env),
        "service": (wrapper, {**base_env, **sign_env, "DKPROXY_SOCKET": sock}),
        "launcher": (launcher, {**base_env, **sign_env, "DKPROXY_SOCKET": sock}),
        "in-process": (wrapper, {**base_env, **sign_env, "DKPROXY_SOCKET": sock + ".absent"}),
    }
    variants: dict[str, tuple[list[str], dict[str, str]]] = {}
    for name, (program, env) in programs.items():
        if args.inject:
            inject = [INJECT, "-f", f"bench@{DOMAIN}", "someone@example.net"]
            variants[name] = (inject, {**env, "QMAILQUEUE": program})
        else:
            variants[name] = ([program], env)
    before = queue_files() if real else set()
    samples = {name: Samples() for name in variants}
    names = list(variants)
    try:
        for round_number in range(args.count):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                argv, env = variants[name]
                elapsed, code = run_once(argv, env, message, envelope)
                sample = samples[name]
                sample.times.append(elapsed)
                sample.failures += code != 0
            if real:
                for path in queue_files() - before:
                    os.unlink(path)
        if os.path.exists("/usr/bin/time"):
            for name, (argv, env) in variants.items():
                for _ in range(3):
                    rss = peak_rss_kib(argv, env, message, envelope)
                    samples[name].max_rss_kib = max(samples[name].max_rss_kib, rss)
            if real:
                for path in queue_files() - before:
                    os.unlink(path)
    finally:
        service_rss = _peak_rss_kib(service.pid)
        service.terminate()
        service.wait(10)

    where = "qmail-inject -> " if args.inject else ""
    print(f"{args.count} rounds, {args.size}-byte message, {where}"
          f"{'notqmail qmail-queue' if real else 'stand-in qmail-queue'}, "
          "DKIM rsa-sha256 + DomainKeys, 2048-bit key")  # fmt: skip
    plain = samples["plain"].times
    print(f"{'variant':12} {'median ms':>10} {'mean ms':>8} {'p90 ms':>7} {'extra ms':>9} "
          f"{'ratio':>6} {'peak RSS':>9} {'failed':>6}")  # fmt: skip
    for name, sample in samples.items():
        times = sample.times
        extra = statistics.median(t - p for t, p in zip(times, plain, strict=True)) * 1000
        ratio = statistics.median(times) / statistics.median(plain)
        p90 = sorted(times)[int(len(times) * 0.9) - 1] * 1000
        print(f"{name:12} {statistics.median(times) * 1000:10.1f} "
              f"{statistics.mean(times) * 1000:8.1f} {p90:7.1f} {extra:9.1f} {ratio:6.2f} "
              f"{sample.max_rss_kib / 1024:7.1f}MB {sample.failures:6d}")  # fmt: skip
    if service_rss:
        print(f"service peak RSS {service_rss / 1024:.1f} MB")
    return 0 if all(s.failures == 0 for s in samples.values()) else 1


def _peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a running process, in KiB; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
