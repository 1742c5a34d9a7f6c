#!/usr/bin/env python3
"""dkproxy against another revision of itself: same sink, same load, runs alternating.

    .venv/bin/python bench/ab.py --baseline b717667
    .venv/bin/python bench/ab.py --baseline main --scenarios signed,unsigned --runs 5

The baseline revision is checked out with `git worktree add` into a temporary directory and
installed (with its own dependencies and uvloop) into its own virtualenv; this tree runs with
the current interpreter. Both are `dkproxy out` with the same options, relaying to one
smtp-sink. Each scenario runs A (baseline) and B (this tree) alternately `--runs` times, and
the ratio B/A of the medians is printed:

* signed:   DKIM rsa-sha256 + DomainKeys, 3 KB, 8 sessions, one message per session (msg/s)
* unsigned: the same messages passed through unsigned (no rule matches the sender) (msg/s)
* 10mb:     10 MB messages, 2 sessions, signed (MB/s)
* memory:   100 sessions x 1 MB at once, peak RSS of all processes summed (MiB, lower is better)

On a loaded machine the CPU time the proxy spends per message (or per MB) is steadier than
its rate: it is printed too (user + system of all its processes during the run).

Before timing, one message through each side must arrive signed (smtp-sink -d dump).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench_out import free_port, start_sink, tool, wait_port
from compare import write_rsa_key
from matrix_cells import loadgen, smtp_source
from memory import MIB, MemorySampler, process_tree

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    """One proxy under test: its interpreter and source tree (PYTHONPATH) if any."""

    name: str
    python: str
    tree: Path | None
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    results: dict[str, list[float]] = field(default_factory=dict)
    #: CPU seconds (user + system, all processes) per unit of work, per scenario
    cpu: dict[str, list[float]] = field(default_factory=dict)


def cpu_seconds(root: int) -> float:
    """User + system CPU time of a process and its children so far (/proc/PID/stat)."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def install_baseline(revision: str, workdir: Path) -> Side:
    """`git worktree add` the revision and pip-install it into its own virtualenv."""
    tree = workdir / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree),
                    revision], check=True)  # fmt: skip
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip_install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                   "--disable-pip-version-check"]  # fmt: skip
    subprocess.run([*pip_install, f"{tree}[fast]"], check=True)
    return Side(f"A {revision}", str(venv / "bin" / "python"), None)


def remove_baseline(workdir: Path) -> None:
    tree = workdir / "baseline"
    if tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False)  # fmt: skip


def start(side: Side, args: list[str], relay: int, log: Path) -> None:
    side.port = free_port()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if side.tree is not None:
        env["PYTHONPATH"] = str(side.tree)
    command = [side.python, "-m", "dkproxy", "out", *args, f"127.0.0.1:{side.port}",
               f"127.0.0.1:{relay}"]  # fmt: skip
    with log.open("wb") as stderr:
        # cwd: neither tree, so that each side imports its own dkproxy
        side.process = subprocess.Popen(command, cwd=log.parent, env=env,
                                        stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    deadline = time.monotonic() + 30
    while b"listening on" not in log.read_bytes():
        if side.process.poll() is not None or time.monotonic() > deadline:
            side.process.kill()
            sys.exit(f"ab: {side.name} did not start:\n{log.read_text()}")
        time.sleep(0.05)
    wait_port(side.port)
    time.sleep(0.5)


def stop(side: Side) -> None:
    if side.process is not None and side.process.poll() is None:
        side.process.terminate()
        try:
            side.process.wait(35)
        except subprocess.TimeoutExpired:
            side.process.kill()
            side.process.wait()


def check_signed(sides: list[Side], args: list[str], workdir: Path) -> None:
    dumps = workdir / "dumps"
    dumps.mkdir(mode=0o777)
    dumps.chmod(0o777)
    port = free_port()
    user = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    sink = subprocess.Popen([tool("smtp-sink"), "-u", user, "-d", f"{dumps}/%H%M%S.",
                             f"127.0.0.1:{port}", "64"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(port)
    try:
        for side in sides:
            start(side, args, port, workdir / f"check-{len(list(workdir.iterdir()))}.log")
            try:
                before = set(dumps.iterdir())
                smtp_source(side.port, 1, 1, 300, False)
                deadline = time.monotonic() + 5
                while not (new := set(dumps.iterdir()) - before) and time.monotonic() < deadline:
                    time.sleep(0.05)
                text = b"".join(path.read_bytes() for path in new).lower()
                if b"dkim-signature:" not in text or b"domainkey-signature:" not in text:
                    sys.exit(f"ab: {side.name} did not sign the test message")
                print(f"{side.name}: signs with DKIM and DomainKeys (checked)")
            finally:
                stop(side)
    finally:
        sink.terminate()
        sink.wait(5)


def rate(port: int, messages: int, sessions: int, size: int) -> float:
    elapsed, _ = smtp_source(port, messages, sessions, size, False)
    return messages / elapsed


def memory(side: Side) -> float:
    assert side.process is not None
    sampler = MemorySampler(side.process.pid)
    with sampler.window() as peak:
        loadgen(side.port, "--rate", "0", "--messages", "100", "--connections", "100",
                "--size", str(1 << 20))  # fmt: skip
    return max(peak.rss, peak.hwm) / MIB


#: name -> (signed?, measure(side) -> figure, unit, higher is better, units of work per run)
SCENARIOS: dict[
    str, tuple[bool, Callable[[Side, argparse.Namespace], float], str, bool, Callable[..., int]]
] = {
    "signed": (True, lambda s, a: rate(s.port, a.messages, 8, 3000), "msg/s", True,
               lambda a: a.messages),
    "unsigned": (False, lambda s, a: rate(s.port, a.messages, 8, 3000), "msg/s", True,
                 lambda a: a.messages),
    "10mb": (True, lambda s, a: rate(s.port, 8, 2, 10 << 20) * 10, "MB/s", True, lambda a: 80),
    "memory": (True, lambda s, a: memory(s), "MiB peak", False, lambda a: 100),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="git revision for side A")
    parser.add_argument("--scenarios", default="signed,unsigned,10mb,memory")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--messages", type=int, default=1500, help="per msg/s run")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {sorted(SCENARIOS)}")

    with tempfile.TemporaryDirectory(prefix="dkproxy-ab-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        try:
            baseline = install_baseline(args.baseline, workdir)
            current = Side("B this tree", sys.executable, ROOT)
            sides = [baseline, current]
            key = write_rsa_key(workdir / "rsa.key")
            common = [f"--keyfile={key}", "--selector=bench", f"--workers={args.workers}"]
            signing = [*common, "--domain=example.org", "--signature=dkim(c=relaxed)",
                       "--signature=domainkeys(c=nofws)"]  # fmt: skip
            # two domains: only senders in them are signed (one domain would sign all mail)
            unsigned = [*common, "--domain=nobody.invalid,other.invalid"]
            check_signed(sides, signing, workdir)
            sink_port = free_port()
            sink = start_sink(sink_port)
            try:
                for name in chosen:
                    signed, measure, unit, _, work = SCENARIOS[name]
                    for side in sides:
                        side.results[name] = []
                        side.cpu[name] = []
                    for run in range(args.runs):
                        for side in sides if run % 2 == 0 else reversed(sides):
                            log = workdir / f"{name}-{run}-{side.name.split()[0]}.log"
                            start(side, signing if signed else unsigned, sink_port, log)
                            assert side.process is not None
                            try:
                                cpu = cpu_seconds(side.process.pid)
                                figure = measure(side, args)
                                cpu = (cpu_seconds(side.process.pid) - cpu) / work(args)
                            finally:
                                stop(side)
                            side.results[name].append(figure)
                            side.cpu[name].append(cpu * 1000)
                            print(f"  {name:9} {side.name:16} {figure:9.1f} {unit:9}"
                                  f" cpu {cpu * 1000:7.3f} ms/unit", flush=True)  # fmt: skip
            finally:
                sink.terminate()
                sink.wait(5)
        finally:
            remove_baseline(workdir)

    print(f"\nmedian of {args.runs} alternating runs, {args.workers} workers:")
    for name in chosen:
        _, _, unit, higher, _ = SCENARIOS[name]
        a = statistics.median(baseline.results[name])
        b = statistics.median(current.results[name])
        better = "higher is better" if higher else "lower is better"
        print(f"  {name:9} A {a:9.1f}  B {b:9.1f} {unit:9} B/A = {b / a:.3f} ({better})")
        a_cpu = statistics.median(baseline.cpu[name])
        b_cpu = statistics.median(current.cpu[name])
        print(f"  {'':9} A {a_cpu:9.3f}  B {b_cpu:9.3f} {'cpu ms':9} B/A = {b_cpu / a_cpu:.3f}"
              " (per message or MB; lower is better)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
