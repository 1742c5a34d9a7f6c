"""Listening socket, worker processes and signals.

The socket is bound once, in the parent, before anything else happens: a port in use stops
the start with a clear error. With `workers > 1` the parent forks that many children which
all accept on the inherited socket (keys are loaded before the fork and shared copy-on-write)
and restarts any child that dies. SIGTERM/SIGINT stop accepting and let sessions finish;
SIGHUP rebuilds the processor from the configuration (a broken new configuration is logged
and the old one kept). Under systemd the main process says STOPPING=1 when a stop begins and
RELOADING=1 ... READY=1 around a reload (sd_notify(3)); with several workers the supervisor
says READY=1 once every worker has reported its reload done on a pipe. Each worker serves
its connections with the aiosmtpd listener (`loop.create_server` on the inherited socket,
one `Listener` per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from dkproxy import metrics
from dkproxy.daemon import (
    AccessList,
    notify_reloaded,
    notify_reloading,
    notify_stopping,
    sd_notify,
)
from dkproxy.smtp.downstream import DownstreamPool, PoolPressure
from dkproxy.smtp.listener import Listener
from dkproxy.smtp.proxy import Assembler, Processor, Proxy
from dkproxy.smtp.settings import SessionSettings

log = logging.getLogger("dkproxy.server")

#: How long sessions may run on after a stop request before they are cut.
GRACE_SECONDS = 30.0

#: How long the supervisor waits for its workers to report a reload done before it tells
#: systemd READY=1 anyway (a worker that died meanwhile never reports; it is restarted).
RELOAD_REPORT_SECONDS = 30.0

ProcessorFactory = Callable[[], Processor]


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind the listening socket; OSError names the address on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc


class ProxyServer:
    """One worker: accepts upstream connections on a bound socket, a `Listener` for each.

    It is also what the sessions share (settings, proxy logic, downstream pool) and the one
    place where sessions open and close and downstream failures are counted.
    """

    def __init__(
        self,
        sock: socket.socket,
        settings: SessionSettings,
        processor: Processor,
        processor_factory: ProcessorFactory,
        assembler: Assembler,
        access: AccessList | None = None,
        pressure: PoolPressure | None = None,
    ) -> None:
        self.sock = sock
        self.access = access or AccessList()
        self.settings = settings
        self.logic = Proxy(processor, assembler, settings.max_message_size)
        self.processor_factory = processor_factory
        self.sessions: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None
        self.max_connections = 0
        self.connections = 0
        self.pool = DownstreamPool(settings.downstream(), pressure=pressure)
        #: This process is the one systemd watches (a single worker, no supervisor): it
        #: tells systemd itself when a stop or a reload begins and when a reload is done.
        self.notifies_systemd = False
        #: In a worker of several: tells the supervisor this worker's reload is done (with
        #: whether the new configuration was taken).
        self.reload_reported: Callable[[bool], None] | None = None

    @property
    def processor(self) -> Processor:
        return self.logic.processor

    def session_opened(self, listener: Listener) -> str | None:
        """A connection starts; the reply refusing it, or None to serve it."""
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        metrics.session_opened()
        self.connections += 1
        if self.max_connections and self.connections >= self.max_connections:
            assert self._stopping is not None
            self._stopping.set()  # retire after this session; the supervisor starts a new one
        if len(self.sessions) > self.settings.max_sessions:
            log.warning("client=%s refused: %d sessions in this worker (max_sessions)",
                        listener.peer, len(self.sessions) - 1)  # fmt: skip
            return "421 4.7.0 Error: too many sessions, try again later"
        if self.access.active and not self.access.permits(listener.peer):
            # Net::Server's allow/deny: a refused client gets 554 and the connection is closed.
            log.warning("client=%s refused by the access list", listener.peer)
            return "554 5.7.1 Access denied"
        return None

    def session_closed(self, listener: Listener) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.sessions.discard(task)
        metrics.session_closed()

    def downstream_failed(self, kind: str) -> None:
        """A downstream session failed: kind is "connect", "timeout", "closed", "refused" or
        "protocol" (the session has logged the details)."""
        metrics.downstream_error(kind)

    def _listener(self) -> Listener:
        return Listener(self)

    async def _expire_idle(self) -> None:
        while True:
            # Often: another worker may be waiting for the sessions this one holds.
            await asyncio.sleep(0.1)
            self.pool.expire()

    def reload(self) -> None:
        if self.notifies_systemd:
            notify_reloading()
        try:
            self.logic.processor = self.processor_factory()
        except Exception as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            taken, status = False, f"reload failed, running configuration kept: {exc}"
        else:
            log.info("configuration reloaded")
            taken, status = True, "configuration reloaded"
        if self.notifies_systemd:
            notify_reloaded(f"accepting mail; {status}")
        if self.reload_reported is not None:
            self.reload_reported(taken)

    def _stop(self) -> None:
        """SIGTERM/SIGINT: stop accepting; sessions in flight finish (see serve)."""
        assert self._stopping is not None
        if self.notifies_systemd and not self._stopping.is_set():
            notify_stopping()
        self._stopping.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        # aiosmtpd logs every command line at INFO on "mail.log": only with debugtrace.
        logging.getLogger("mail.log").setLevel(
            logging.INFO if self.settings.debugtrace else logging.WARNING
        )
        server = await loop.create_server(self._listener, sock=self.sock)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        address = self.sock.getsockname()
        log.info("listening on %s:%s, relaying to %s:%s (pid %d)",
                 address[0], address[1], self.settings.relay_host, self.settings.relay_port,
                 os.getpid())  # fmt: skip
        reaper = asyncio.create_task(self._expire_idle())
        await self._stopping.wait()
        reaper.cancel()
        server.close()
        if self.sessions:
            log.info("stopping: waiting up to %gs for %d sessions", GRACE_SECONDS,
                     len(self.sessions))  # fmt: skip
            _done, pending = await asyncio.wait(set(self.sessions), timeout=GRACE_SECONDS)
            for task in pending:
                task.cancel()
        await self.pool.close()
        log.info("stopped")


Runner = Callable[[Coroutine[Any, Any, None]], None]


def _event_loop_runner() -> Runner:
    """uvloop when installed (less CPU per message), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def run(
    sock: socket.socket,
    settings: SessionSettings,
    processor_factory: ProcessorFactory,
    assembler: Assembler,
    workers: int = 1,
    access: AccessList | None = None,
    after_load: Callable[[], None] | None = None,
    max_connections: int = 0,
) -> int:
    """Serve until stopped; returns the exit status.

    The processor is built here, before any fork, so that a bad key or map file stops the
    start in the foreground with its error instead of killing workers one by one; then
    `after_load` runs (daemonize, drop privileges, pid file). `max_connections` makes a
    worker retire after that many connections (Net::Server's max_requests); 0: never.
    """
    processor = processor_factory()
    runner = _event_loop_runner()  # before the privilege drop: uvloop may be unreadable after
    if after_load is not None:
        after_load()
    # The socket is bound and listening and the keys are loaded: connections queue in the
    # backlog until the workers accept them, so systemd may start Postfix now.
    status = f"accepting mail, {max(workers, 1)} worker(s)"
    sd_notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
    pressure = PoolPressure()  # shared by the workers forked below

    def serve_here(reload_reported: Callable[[bool], None] | None = None) -> None:
        server = ProxyServer(
            sock, settings, processor, processor_factory, assembler, access, pressure
        )
        server.max_connections = max_connections
        server.notifies_systemd = workers <= 1
        server.reload_reported = reload_reported
        runner(server.serve())

    if workers <= 1:
        serve_here()
        return 0
    return _supervise(serve_here, workers, sock)


def _supervise(
    serve_here: Callable[[Callable[[bool], None]], None], workers: int, sock: socket.socket
) -> int:
    children: dict[int, float] = {}
    stopping = False
    reloading = False
    # Workers write "PID 1" (reloaded) or "PID 0" (failed, old configuration kept) on this
    # pipe when a reload is done (a write under PIPE_BUF is atomic), so that the supervisor,
    # the process systemd listens to, can say READY=1 once all are done.
    reports, report_end = os.pipe()
    os.set_blocking(reports, False)

    def report_reload(taken: bool) -> None:
        os.write(report_end, f"{os.getpid()} {int(taken)}\n".encode("ascii"))

    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}

    def spawn() -> None:
        # Signals wait while a worker is made: one reaching the child before its handlers
        # are reset would run the supervisor's handler there and be lost, and one reaching
        # the supervisor before the child is in `children` would not be forwarded to it.
        # Either way a worker would miss SIGTERM and outlive the daemon, holding the port.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        pid = os.fork()
        if pid == 0:
            for signum in handled:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(reports)
            code = 0
            try:
                serve_here(report_reload)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = time.monotonic()
        if stopping:  # asked to stop while starting workers: this one stops too
            os.kill(pid, signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def forward(signum: int) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            notify_stopping()
        stopping = True
        # Our copy of the listening socket would keep the port open once the workers close
        # theirs: new clients would be accepted by the kernel and never greeted, instead of
        # refused at once (which an MTA retries right away elsewhere or later).
        sock.close()
        forward(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    def on_reload(_signum: int, _frame: object) -> None:
        nonlocal reloading
        if reloading or stopping:  # again during a reload (one READY=1), or while stopping
            forward(signal.SIGHUP)
            return
        reloading = True
        try:
            notify_reloading()
            with contextlib.suppress(BlockingIOError):
                while os.read(reports, 4096):  # reports of an earlier reload that came late
                    pass
            waiting = set(children)
            forward(signal.SIGHUP)
            failed = _await_reload_reports(reports, waiting)
        finally:
            reloading = False
        status = (
            f"reload failed in {failed} worker(s), running configuration kept"
            if failed
            else "configuration reloaded"
        )
        notify_reloaded(f"accepting mail, {len(children)} worker(s); {status}")

    signal.signal(signal.SIGHUP, on_reload)
    for _ in range(workers):
        if stopping:
            break
        spawn()
    log.info("started %d workers", workers)
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        started = children.pop(pid, None)
        metrics.worker_exited(pid)
        if started is None or stopping:
            continue
        log.error("worker %d exited (status %d); restarting", pid, status)
        if time.monotonic() - started < 1:
            time.sleep(1)  # do not spin when a worker dies at once
        spawn()
    sys.stdout.flush()
    os.close(reports)
    os.close(report_end)
    return 0


def _await_reload_reports(reports: int, waiting: set[int]) -> int:
    """Read "PID TAKEN" lines from the `reports` pipe until every pid of `waiting` has
    reported or exited (left unreaped for the supervisor's loop: WNOWAIT), or
    RELOAD_REPORT_SECONDS pass. Returns how many workers reported a failed reload."""
    deadline = time.monotonic() + RELOAD_REPORT_SECONDS
    pending = b""
    failed = 0
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select([reports], [], [], 0.1)
        if ready:
            with contextlib.suppress(BlockingIOError):
                pending += os.read(reports, 4096)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                pid, _, taken = line.partition(b" ")
                if pid.isdigit() and int(pid) in waiting:
                    waiting.discard(int(pid))
                    failed += taken != b"1"
        for pid in list(waiting):
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    waiting.discard(pid)
            except ChildProcessError:
                waiting.discard(pid)
    return failed
