#!/usr/bin/env python3
"""The whole dkproxy benchmark in one command: throughput, added latency and memory.

    .venv/bin/python bench/matrix.py            # full matrix, 5-7 minutes on a 2-core machine
    .venv/bin/python bench/matrix.py --quick    # ~1 minute smoke version

One smtp-sink and three `dkproxy out` instances (DKIM rsa-sha256; DKIM + DomainKeys; DKIM
rsa-sha256 + ed25519-sha256) run for the whole matrix; each cell drives one of them, or the sink
directly (the baseline), so every figure in a row comes from the same run and the same load.

* Throughput: Postfix smtp-source, one message per SMTP session by default (as in DKIMproxy's
  measured figures), for every message size x session count; a second table keeps sessions
  open (smtp-source -d). Messages/s = messages / wall time of smtp-source. A short probe run
  (also the warm-up) sizes each cell to take about --seconds.
* Latency: bench/loadgen.py offers --latency-rate messages/s (open loop) over persistent
  connections and times each message from MAIL FROM to the 250 after DATA; the added latency
  is the proxy's p50/p99 minus the direct p50/p99 measured in the same run.
* Memory: the summed RSS of the proxy's process tree (parent + workers), sampled from /proc
  during every cell. A dedicated cell sends 100 x 1 MB at once through a fresh proxy.

Writes bench/results/matrix.md (also printed), matrix.json and, when matplotlib is installed,
matrix.png.
"""

# The cells and their runners are in matrix_cells.py, the Markdown and plot in matrix_report.py,
# the process-tree memory sampling in memory.py.

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench_out import free_port, start_sink, write_key
from matrix_cells import (
    BENCH,
    DIRECT,
    ROOT,
    SESSIONS,
    SIGNATURE_SETS,
    SIZES,
    TARGET_SET,
    Proxy,
    latency,
    memory_cell,
    start_proxy,
    stop_proxy,
    throughput_row,
)
from matrix_report import Run, markdown, plot, size_name


def _revision(tree: Path) -> str:
    if tree.resolve() != ROOT:
        return f"from {tree}"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "dkproxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke version")
    parser.add_argument("--workers", type=int, default=0, help="dkproxy workers (0: its default)")
    parser.add_argument("--seconds", type=float, help="target length of a throughput run")
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per throughput cell, the best is shown (default 2; quick 1)",
    )
    parser.add_argument("--latency-rate", type=float, default=400.0, help="messages/s offered")
    parser.add_argument("--latency-seconds", type=float, help="length of a latency cell")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="output directory")
    parser.add_argument("--no-plot", action="store_true", help="skip matrix.png")
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="directory holding the dkproxy package to run"
    )
    args = parser.parse_args(argv)

    if args.quick:
        sizes = [SIZES["3 KB"], SIZES["100 KB"], SIZES["10 MB"]]
        sessions, keep_open_sessions = (1, 8), (8,)
        seconds, latency_seconds, bursts = args.seconds or 0.6, args.latency_seconds or 2, 1
        args.repeat = args.repeat or 1
    else:
        sizes, sessions, keep_open_sessions = list(SIZES.values()), SESSIONS, SESSIONS
        seconds, latency_seconds, bursts = args.seconds or 2.0, args.latency_seconds or 5, 3
        args.repeat = args.repeat or 2
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    run = Run(
        started=time.strftime("%Y-%m-%d %H:%M %Z"),
        quick=args.quick,
        host=f"{platform.node()} ({os.cpu_count()} CPUs)",
        python=platform.python_version(),
        revision=_revision(args.tree),
        workers=str(args.workers or f"default ({os.cpu_count()})"),
        load_before=_loadavg(),
    )

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="dkproxy-matrix-") as tmp:
        keys = {kind: write_key(Path(tmp) / f"{kind}.key", kind) for kind in ("rsa", "ed25519")}
        sink_port = free_port()
        sink = start_sink(sink_port)
        proxies: dict[str, Proxy] = {}
        try:
            for name, specs in SIGNATURE_SETS.items():
                proxies[name] = start_proxy(
                    name, specs, keys, sink_port, args.workers, args.out, args.tree
                )

            def port_of(name: str) -> int:
                return sink_port if name == DIRECT else proxies[name].port

            columns = [DIRECT, *SIGNATURE_SETS]
            for name in columns:
                cell = latency(
                    name,
                    port_of(name),
                    proxies.get(name),
                    args.latency_rate,
                    latency_seconds,
                    connections=8,
                )
                run.latency.append(cell)
                progress(
                    f"latency {name}: p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, "
                    f"{cell.achieved:.0f}/s"
                )

            plan = [(size, count, False) for size in sizes for count in sessions]
            plan += [(SIZES["3 KB"], count, True) for count in keep_open_sessions]
            row_targets = {name: (port_of(name), proxies.get(name)) for name in columns}
            for size, count, keep_open in plan:
                row = throughput_row(row_targets, size, count, keep_open, seconds, args.repeat)
                run.throughput += row
                for cell in row:
                    rss = f", {cell.peak_rss_mib:.0f} MiB" if cell.peak_rss_mib else ""
                    rss += f", FAILED: {cell.error}" if cell.error else ""
                    progress(
                        f"{size_name(size)} x{count}{' -d' if keep_open else ''} {cell.target}: "
                        f"{cell.rate:,.0f}/s (best of {cell.runs}, {cell.messages} messages"
                        f"{rss})"
                    )
            for proxy in proxies.values():
                stop_proxy(proxy)

            fresh = start_proxy(
                TARGET_SET,
                SIGNATURE_SETS[TARGET_SET],
                keys,
                sink_port,
                args.workers,
                args.out,
                args.tree,
                pss=True,
            )
            proxies["memory"] = fresh
            cell = memory_cell(fresh, 100, SIZES["1 MB"], bursts)
            run.memory.append(cell)
            progress(
                f"memory 100 x 1 MB: {cell.rss_mib:.0f} MiB RSS sum, "
                f"{cell.hwm_mib:.0f} MiB VmHWM sum, {cell.pss_mib:.0f} MiB PSS"
            )
        finally:
            for proxy in proxies.values():
                stop_proxy(proxy)
            sink.terminate()
            sink.wait(5)

    run.load_after = _loadavg()
    run.minutes = (time.monotonic() - began) / 60
    table = markdown(run)
    (args.out / "matrix.md").write_text(table)
    (args.out / "matrix.json").write_text(json.dumps(asdict(run), indent=1))
    print(table)
    if not args.no_plot:
        if plot(run, args.out / "matrix.png"):
            print(f"plot: {args.out / 'matrix.png'}")
        else:
            print("plot: skipped (.venv/bin/pip install matplotlib for matrix.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
