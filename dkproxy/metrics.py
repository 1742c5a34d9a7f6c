"""Prometheus metrics: what the proxy did, summed over every worker process.

Off unless the configuration says `metrics HOST:PORT` (loopback by default). Then, before any
worker is forked, `enable` makes a private directory for prometheus-client's multi-process
mode (each worker writes its counters to memory-mapped files there, named by its pid), and
`serve` answers `GET /metrics` in the Prometheus text format from the parent process, which
adds up the files of every worker, living or dead. The directory is removed at exit.

The recording functions below are the hooks the SMTP layer and the processors call, one line
each; while metrics are off they return at once, so the hot path pays one global look-up.
Label values come from small fixed sets (outcome, reason, method, result, kind), except the
signing domain (d=) and algorithm of signatures, which are the configured ones.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


# Metrics sit below the SMTP layer and mail authentication (which call them), so they name
# what they read of their objects instead of importing their classes.
class Outcome(Protocol):
    """What metrics read of a processor's decision (dkproxy.smtp.proxy.Outcome)."""

    @property
    def prepend(self) -> list[bytes]: ...


class Reply(Protocol):
    """What metrics read of an SMTP reply (dkproxy.smtp.downstream.Reply)."""

    @property
    def code(self) -> int: ...


class CacheStats(Protocol):
    """What metrics read of the resolver's counters (dkproxy.mailauth.dnsresolver.CacheStats)."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...


log = logging.getLogger("dkproxy.metrics")

#: Processing time buckets (seconds, end of DATA to the reply): signing takes ~1 ms, DNS
#: lookups and a slow downstream up to seconds.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Message size buckets (bytes): 1 KiB .. 64 MiB.
SIZE_BUCKETS = tuple(float(1 << shift) for shift in range(10, 27, 2))

#: Reasons a message passes unsigned (label `reason` of dkproxy_unsigned_total).
UNSIGNED_REASONS = ("format_error", "no_from", "not_configured", "excluded", "skipped",
                    "signing_error")  # fmt: skip


@dataclass
class _Metrics:
    """The metric objects, created once multi-process mode is set up."""

    direction: str
    messages: Any
    unsigned: Any
    signatures: Any
    verify_results: Any
    downstream_errors: Any
    dns_lookups: Any
    dns_cache_hits: Any
    sessions_open: Any
    sessions: Any
    processing_seconds: Any
    message_bytes: Any


_metrics: _Metrics | None = None
_directory: str | None = None
#: Resolver counters already added to the metrics, per resolver (id -> (hits, misses)).
_dns_seen: dict[int, tuple[int, int]] = {}


def enable(direction: str, owner: tuple[int, int] | None = None) -> str:
    """Switch multi-process metrics on in this process and the workers it forks later.

    direction: "out" or "in" (which outcome a relayed message counts as). owner: (uid, gid)
    that will own the directory, for a daemon that drops privileges after start-up. Returns
    the directory (a new private one under $TMPDIR, mode 0700, removed at exit). Must run
    before prometheus_client is imported anywhere: it picks its storage at import time.
    """
    global _metrics, _directory
    directory = tempfile.mkdtemp(prefix="dkproxy-metrics-")
    if owner is not None and os.geteuid() == 0:
        os.chown(directory, *owner)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _directory = directory
    # Workers leave through os._exit and skip this; the parent (or the single process) runs it.
    atexit.register(shutil.rmtree, directory, ignore_errors=True)

    from prometheus_client import Counter, Gauge, Histogram, values

    if values.ValueClass is values.MutexValue:
        # Imported before the variable was set: switch to file-backed values explicitly.
        values.ValueClass = values.MultiProcessValue()

    def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
        return Counter(name, doc, list(labels), registry=None)

    _metrics = _Metrics(
        direction=direction,
        messages=counter(
            "dkproxy_messages",
            "Messages by what the client was told: signed, unsigned, verified (relayed), "
            "rejected (5xx), tempfailed (4xx)",
            ["outcome"],
        ),
        unsigned=counter(
            "dkproxy_unsigned", "Outbound messages left unsigned, by reason", ["reason"]
        ),
        signatures=counter(
            "dkproxy_signatures", "Signatures made, by d= and algorithm", ["domain", "algorithm"]
        ),
        verify_results=counter(
            "dkproxy_verify_results",
            "Inbound verdicts per method (dkim, domainkeys, spf, dmarc) and result",
            ["method", "result"],
        ),
        downstream_errors=counter(
            "dkproxy_downstream_errors",
            "Downstream failures by kind: connect (no connection), timeout, closed (connection "
            "lost), refused (no 220 greeting, or 421), protocol (not an SMTP answer)",
            ["kind"],
        ),
        dns_lookups=counter("dkproxy_dns_lookups", "DNS queries sent (cache misses)"),
        dns_cache_hits=counter("dkproxy_dns_cache_hits", "DNS answers taken from the cache"),
        sessions_open=Gauge(
            "dkproxy_sessions_open",
            "Upstream SMTP sessions open now",
            registry=None,
            multiprocess_mode="livesum",
        ),
        sessions=counter("dkproxy_sessions", "Upstream SMTP sessions accepted"),
        processing_seconds=Histogram(
            "dkproxy_processing_seconds",
            "Seconds from the end of DATA to the reply (processing and relaying)",
            registry=None,
            buckets=TIME_BUCKETS,
        ),
        message_bytes=Histogram(
            "dkproxy_message_size_bytes",
            "Size of the messages received, in bytes",
            registry=None,
            buckets=SIZE_BUCKETS,
        ),
    )
    # Every label value shows in the scrape from the start, at 0, so that rate() and alerts
    # work before the first occurrence.
    outcomes = ("signed", "unsigned") if direction == "out" else ("verified",)
    for outcome in (*outcomes, "rejected", "tempfailed"):
        _metrics.messages.labels(outcome)
    for kind in ("connect", "timeout", "closed", "refused", "protocol"):
        _metrics.downstream_errors.labels(kind)
    if direction == "out":
        for reason in UNSIGNED_REASONS:
            _metrics.unsigned.labels(reason)
    return directory


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the mail log."""


def bind(host: str, port: int) -> WSGIServer:
    """Bind the scrape endpoint HOST:PORT (answering `/metrics` from every worker's files).

    Raises OSError naming the address when it cannot be bound. Call after `enable`; then
    `start` once the process is the one that will stay (after daemonizing).
    """
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, _directory)
    server_class = type("_Server", (_ThreadingWSGIServer,), {})
    if ":" in host:
        server_class.address_family = socket.AF_INET6
    try:
        return make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc


def start(httpd: WSGIServer) -> None:
    """Answer scrapes from a daemon thread of this (the parent) process."""
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in str(host) else host, port)


def worker_exited(pid: int) -> None:
    """A worker is gone: its share of the live gauges (sessions open) must stop counting."""
    if _metrics is None or _directory is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, _directory)


# -- hooks: one call each from the SMTP layer and the processors --------------------------------


def session_opened() -> None:
    if _metrics is not None:
        _metrics.sessions.inc()
        _metrics.sessions_open.inc()


def session_closed() -> None:
    if _metrics is not None:
        _metrics.sessions_open.dec()


def downstream_error(kind: str) -> None:
    """kind: "connect", "timeout", "closed", "refused" or "protocol" (see the metric's help)."""
    if _metrics is not None:
        _metrics.downstream_errors.labels(kind).inc()


def message_received(size: int) -> None:
    """A complete message was read (size in bytes, after undoing dot-stuffing)."""
    if _metrics is not None:
        _metrics.message_bytes.observe(size)


def message_done(outcome: Outcome | None, reply: Reply | int, seconds: float) -> None:
    """The client got its answer for one message: count it by outcome, time it.

    reply: the reply sent (or its code); outcome: what the processor decided (None when the
    message was refused before processing, e.g. too big). 5xx counts as rejected, 4xx as
    tempfailed; a relayed message as verified (inbound), signed or unsigned (outbound).
    """
    if _metrics is None:
        return
    code = reply if isinstance(reply, int) else reply.code
    if code >= 500:
        kind = "rejected"
    elif code >= 400:
        kind = "tempfailed"
    elif _metrics.direction == "in":
        kind = "verified"
    else:
        kind = "signed" if outcome is not None and outcome.prepend else "unsigned"
    _metrics.messages.labels(kind).inc()
    _metrics.processing_seconds.observe(seconds)


def unsigned(reason: str) -> None:
    """The signer left a message unsigned; reason: one of UNSIGNED_REASONS."""
    if _metrics is not None:
        _metrics.unsigned.labels(reason).inc()


def signature(domain: str, algorithm: str) -> None:
    """One signature was made (d= and a= as written in it)."""
    if _metrics is not None:
        _metrics.signatures.labels(domain, algorithm).inc()


def verified(results: dict[str, str], dns: CacheStats | None = None) -> None:
    """One message's verdict per method ({"dkim": "pass", "spf": "none", ...}) and the
    resolver's counters (what changed since the last call is added)."""
    if _metrics is None:
        return
    for method, result in results.items():
        _metrics.verify_results.labels(method, result).inc()
    if dns is not None:
        hits, misses = _dns_seen.get(id(dns), (0, 0))
        _metrics.dns_cache_hits.inc(max(0, dns.hits - hits))
        _metrics.dns_lookups.inc(max(0, dns.misses - misses))
        _dns_seen[id(dns)] = (dns.hits, dns.misses)
