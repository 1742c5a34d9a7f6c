"""The report of the benchmark matrix (bench/matrix.py): one run's figures as Markdown
(with the targets met or not) and, when matplotlib is installed, as a plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matrix_cells import (
    DIRECT,
    MB,
    SIGNATURE_SETS,
    SIZES,
    TARGET_SET,
    Latency,
    MemoryCell,
    Throughput,
)
from memory import MIB


@dataclass
class Run:
    started: str
    quick: bool
    host: str
    python: str
    revision: str
    workers: str
    load_before: str
    load_after: str = ""
    minutes: float = 0.0
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    memory: list[MemoryCell] = field(default_factory=list)


def size_name(size: int) -> str:
    """The row label of a message size ("3 KB"), or its bytes when it is not in SIZES."""
    return next((name for name, value in SIZES.items() if value == size), f"{size} B")


def _cell(cell: Throughput | None, with_mbps: bool) -> str:
    if cell is None:
        return "-"
    if cell.error:
        return "failed"
    text = f"{cell.rate:,.0f}" if cell.rate >= 10 else f"{cell.rate:.1f}"
    if with_mbps:
        text += f" · {cell.mbytes_per_s:.0f} MB/s"
    return text + (" ⚠" if cell.warnings else "")


def _find(run: Run, target: str, size: int, sessions: int, keep_open: bool) -> Throughput | None:
    return next(
        (
            c
            for c in run.throughput
            if (c.target, c.size, c.sessions, c.keep_open) == (target, size, sessions, keep_open)
        ),
        None,
    )


def targets(run: Run) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (what, measured, met?); None when the quick run skipped it."""
    rows: list[tuple[str, str, bool | None]] = []
    cell = _find(run, TARGET_SET, SIZES["3 KB"], 8, False)
    rows.append(
        (
            "≥ 800 messages/s: DKIM rsa-sha256 + DomainKeys, 3 KB, 8 sessions",
            f"{cell.rate:,.0f} messages/s" if cell else "not run",
            cell.rate >= 800 if cell else None,
        )
    )
    direct = next((c for c in run.latency if c.target == DIRECT), None)
    proxied = next((c for c in run.latency if c.target == TARGET_SET), None)
    if direct and proxied and proxied.error:
        rows.append(("p99 added latency ≤ 20 ms", f"failed: {proxied.error}", False))
    elif direct and proxied:
        added = proxied.p99_ms - direct.p99_ms
        rows.append(
            (
                f"p99 added latency ≤ 20 ms at {proxied.offered:.0f} messages/s offered "
                "(DKIM + DK, 3 KB)",
                f"{added:.1f} ms (p99 {proxied.p99_ms:.1f} ms vs {direct.p99_ms:.1f} ms "
                f"direct; {proxied.achieved:.0f}/s achieved)",
                added <= 20 and proxied.achieved >= 0.97 * proxied.offered,
            )
        )
    else:
        rows.append(("p99 added latency ≤ 20 ms at 400 messages/s offered", "not run", None))
    cell = _find(run, TARGET_SET, SIZES["10 MB"], 8, False)
    best = max(
        (c for c in run.throughput if c.target == TARGET_SET and c.size == SIZES["10 MB"]),
        key=lambda c: c.mbytes_per_s,
        default=None,
    )
    measured = f"{cell.mbytes_per_s:.1f} MB/s at 8 sessions" if cell else "not run"
    if cell and best and best is not cell:
        measured += f" (best {best.mbytes_per_s:.1f} MB/s at {best.sessions})"
    rows.append(
        (
            "≥ 40 MB/s of message data, 10 MB messages (DKIM + DK)",
            measured,
            cell.mbytes_per_s >= 40 if cell else None,
        )
    )
    memory = run.memory[0] if run.memory else None
    rows.append(
        (
            f"peak memory ≤ 200 MB in total, {memory.sessions if memory else 100} sessions "
            "sending 1 MB at once (DKIM + DK)",
            f"{memory.rss_mib:.0f} MiB RSS sum sampled, ≤ {memory.hwm_mib:.0f} MiB sum of "
            f"per-process peaks, {memory.pss_mib:.0f} MiB PSS"
            if memory
            else "not run",
            memory.hwm_mib * MIB <= 200 * MB if memory else None,
        )
    )
    return rows


def markdown(run: Run) -> str:
    sets = [DIRECT, *SIGNATURE_SETS]
    out = [
        "# dkproxy benchmark",
        "",
        f"{run.started}, {run.host}, Python {run.python}, dkproxy {run.revision}, "
        f"workers: {run.workers}; load average before {run.load_before}, after "
        f"{run.load_after}; {run.minutes:.1f} min{' (--quick)' if run.quick else ''}. "
        "smtp-source, smtp-sink, loadgen and dkproxy share the machine.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for what, measured, met in targets(run):
        out.append(f"| {what} | {measured} | {'-' if met is None else 'yes' if met else 'NO'} |")

    for keep_open, title in (
        (False, "one message per SMTP session"),
        (True, "many messages per SMTP session (smtp-source -d)"),
    ):
        cells = [c for c in run.throughput if c.keep_open == keep_open]
        if not cells:
            continue
        rows = sorted({(c.size, c.sessions) for c in cells})
        out += [
            "",
            f"## Throughput, messages/s: {title}",
            "",
            "| size | sessions | " + " | ".join(sets) + " |",
            "|---|--:|" + "--:|" * len(sets),
        ]
        for size, sessions in rows:
            values = [
                _cell(_find(run, name, size, sessions, keep_open), size >= MB) for name in sets
            ]
            out.append(f"| {size_name(size)} | {sessions} | " + " | ".join(values) + " |")

    cells = [c for c in run.throughput if c.peak_rss_mib is not None and not c.keep_open]
    if cells:
        out += [
            "",
            "## Peak RSS of dkproxy (parent + workers, summed), MiB",
            "",
            "| size | sessions | " + " | ".join(SIGNATURE_SETS) + " |",
            "|---|--:|" + "--:|" * len(SIGNATURE_SETS),
        ]
        for size, sessions in sorted({(c.size, c.sessions) for c in cells}):
            values = []
            for name in SIGNATURE_SETS:
                found = _find(run, name, size, sessions, False)
                values.append(f"{found.peak_rss_mib:.0f}" if found and found.peak_rss_mib else "-")
            out.append(f"| {size_name(size)} | {sessions} | " + " | ".join(values) + " |")

    if run.latency:
        direct = next((c for c in run.latency if c.target == DIRECT), None)
        first = run.latency[0]
        out += [
            "",
            f"## Latency at {first.offered:.0f} messages/s offered, 3 KB "
            "(loadgen, persistent connections), ms",
            "",
            "| path | achieved/s | p50 | p99 | added p50 | added p99 | queue p99 | peak RSS MiB |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for cell in run.latency:
            if cell.error:
                out.append(f"| {cell.target} | failed: {cell.error} |" + " - |" * 6)
                continue
            added = (
                f"{cell.p50_ms - direct.p50_ms:.2f} | {cell.p99_ms - direct.p99_ms:.2f}"
                if direct and cell is not direct
                else "- | -"
            )
            rss = f"{cell.peak_rss_mib:.0f}" if cell.peak_rss_mib else "-"
            failed = f" ({cell.messages - cell.delivered} failed)" if cell.errors else ""
            out.append(
                f"| {cell.target} | {cell.achieved:.0f}{failed} | {cell.p50_ms:.2f} | "
                f"{cell.p99_ms:.2f} | {added} | {cell.queue_p99_ms:.2f} | {rss} |"
            )

    for cell in run.memory:
        out += [
            "",
            f"## Memory: {cell.sessions} sessions each sending one "
            f"{size_name(cell.size)} message at once ({cell.bursts} bursts, fresh "
            "DKIM + DK proxy)",
            "",
            "| processes | idle RSS | peak RSS sum (sampled) | sum of per-process peaks "
            "(VmHWM) | peak PSS sum | delivered |",
            "|--:|--:|--:|--:|--:|--:|",
            f"| {cell.processes} | {cell.idle_rss_mib:.0f} MiB | {cell.rss_mib:.0f} MiB | "
            f"{cell.hwm_mib:.0f} MiB | {cell.pss_mib:.0f} MiB | "
            f"{cell.delivered}/{cell.messages} |",
        ]

    out += [
        "",
        "Sizes are smtp-source -l body bytes (decimal: 1 MB = 10^6 bytes); MB/s counts "
        "body bytes. ⚠: smtp-source printed warnings (failed or refused messages). "
        "See bench/README.md for what each column means.",
        "",
    ]
    return "\n".join(out)


def plot(run: Run, path: Path) -> bool:
    """Throughput by size and by sessions, latency and memory; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    sets = [DIRECT, *SIGNATURE_SETS]
    per_conn = [c for c in run.throughput if not c.keep_open]
    sessions = 8 if any(c.sessions == 8 for c in per_conn) else max(c.sessions for c in per_conn)
    ax = axes[0][0]
    for name in sets:
        cells = sorted(
            (c for c in per_conn if c.target == name and c.sessions == sessions),
            key=lambda c: c.size,
        )
        ax.plot([c.size for c in cells], [c.rate for c in cells], marker="o", label=name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="message size, bytes",
        ylabel="messages/s",
        title=f"Throughput by message size ({sessions} sessions, one message per session)",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[0][1]
    three_kb = [c for c in per_conn if c.size == SIZES["3 KB"]]
    for name in sets:
        cells = sorted((c for c in three_kb if c.target == name), key=lambda c: c.sessions)
        ax.plot([c.sessions for c in cells], [c.rate for c in cells], marker="o", label=name)
    ax.axhline(800, color="grey", linestyle="--", linewidth=1, label="target 800/s")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions",
        ylabel="messages/s",
        title="Throughput by sessions (3 KB)",
    )
    counts = sorted({c.sessions for c in three_kb})
    ax.set_xticks(counts, [str(count) for count in counts])
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1][0]
    if run.latency:
        names = [c.target for c in run.latency]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [c.p50_ms for c in run.latency], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [c.p99_ms for c in run.latency], 0.4, label="p99")
        ax.set_xticks(list(xs), names)
        ax.set(
            ylabel="ms, MAIL FROM -> 250 after DATA",
            title=f"Latency at {run.latency[0].offered:.0f} messages/s offered (3 KB)",
        )
        ax.legend()
    ax = axes[1][1]
    for name in SIGNATURE_SETS:
        cells = sorted(
            (c for c in per_conn if c.target == name and c.sessions == sessions),
            key=lambda c: c.size,
        )
        ax.plot(
            [c.size for c in cells], [c.peak_rss_mib or 0 for c in cells], marker="o", label=name
        )
    ax.axhline(200 * MB / MIB, color="grey", linestyle="--", linewidth=1, label="200 MB")
    for cell in run.memory:
        ax.scatter(
            [cell.size],
            [cell.rss_mib],
            marker="*",
            s=150,
            color="black",
            label=f"{cell.sessions} x {size_name(cell.size)} at once",
        )
    ax.set(
        xscale="log",
        xlabel="message size, bytes",
        ylabel="MiB",
        title=f"Peak RSS of dkproxy, parent + workers ({sessions} sessions)",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"dkproxy benchmark {run.started} ({run.revision})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
