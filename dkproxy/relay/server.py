"""`dkproxy relay -c relay.toml`: bind, load, drop privileges, serve until stopped.

One process: applications submit at a modest rate, and the per-client limits (sessions,
connection rate, AUTH failures) are exact only when one process counts them. The event loop
is asyncio's own: aiosmtpd's STARTTLS wraps the connection with asyncio's SSL protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import signal
import socket
import sys

from dkproxy import daemon
from dkproxy.config import ConfigError
from dkproxy.config.relay import RelayConfig, load_relay_config
from dkproxy.relay.listener import RelayListener
from dkproxy.relay.state import RelayService
from dkproxy.smtp.server import bind

log = logging.getLogger("dkproxy.relay")

#: How long sessions may run on after a stop request before they are cut.
GRACE_SECONDS = 30.0


async def serve(service: RelayService, sockets: list[tuple[socket.socket, bool]]) -> None:
    """Accept on every (socket, implicit_tls) pair until SIGTERM/SIGINT; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    servers = []
    for sock, implicit in sockets:
        servers.append(
            await loop.create_server(
                lambda implicit=implicit: RelayListener(service, implicit),  # type: ignore[misc]
                sock=sock,
                ssl=service.tls_context if implicit else None,
            )
        )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    hop = service.state.smarthost
    for sock, implicit in sockets:
        host, port = sock.getsockname()[:2]
        kind = "implicit TLS" if implicit else (
            "STARTTLS" if service.tls_context is not None else "no TLS")  # fmt: skip
        log.info("listening on %s:%s (%s), relaying to smarthost %s (%s) (pid %d)",
                 host, port, kind, hop.target, hop.cfg.tls, os.getpid())  # fmt: skip
    await stopping.wait()
    for server in servers:
        server.close()
    deadline = loop.time() + GRACE_SECONDS
    if service.guard.sessions:
        log.info("stopping: waiting up to %gs for %d sessions", GRACE_SECONDS,
                 service.guard.sessions)  # fmt: skip
    while service.guard.sessions and loop.time() < deadline:
        await asyncio.sleep(0.1)
    await service.pool.close()
    log.info("stopped")


def run(cfg: RelayConfig) -> int:
    """Load everything, bind, drop privileges, serve; the exit status."""
    daemon.setup_logging(
        cfg.log_level,
        use_syslog=cfg.syslog,
        facility=cfg.syslog_facility,
        ident=cfg.syslog_ident,
        log_file=cfg.log_file,
    )
    # aiosmtpd logs each command and DATA line at INFO/DEBUG: content and AUTH exchanges
    # must not reach our log, whatever the level.
    library_log = logging.getLogger("mail.log")
    library_log.setLevel(logging.WARNING)
    # aiosmtpd warns on every successful AUTH that it set its own deprecated attribute.
    library_log.addFilter(lambda record: "login_data is deprecated" not in record.getMessage())
    for warning in cfg.warnings:
        log.warning("%s", warning)
    try:
        service = RelayService(cfg)
    except ConfigError as exc:
        print(f"dkproxy: {exc}", file=sys.stderr)
        return 1
    sockets: list[tuple[socket.socket, bool]] = []
    try:
        for address in cfg.listen:
            sockets.append((bind(address.host, address.port), False))
        for address in cfg.tls_listen:
            sockets.append((bind(address.host, address.port), True))
    except OSError as exc:
        print(f"dkproxy: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if cfg.daemonize:
        daemon.daemonize()
    daemon.drop_privileges(cfg.user, cfg.group)
    if cfg.pidfile:
        daemon.write_pidfile(cfg.pidfile)
        atexit.register(daemon.remove_pidfile, cfg.pidfile)
    asyncio.run(serve(service, sockets))
    return 0


def main(argv: list[str]) -> int:
    """`dkproxy relay -c FILE`; exit status 0 after a clean stop, 1 on a start error, 2 usage."""
    parser = argparse.ArgumentParser(
        prog="dkproxy relay",
        description="Submission relay for applications: TLS + AUTH in, DKIM signing as "
        "`dkproxy out`, relayed to a smarthost over verified TLS.",
    )
    parser.add_argument("-c", "--config", required=True, metavar="FILE", help="relay TOML file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        cfg = load_relay_config(args.config)
    except ConfigError as exc:
        print(f"dkproxy: {exc}", file=sys.stderr)
        return 1
    return run(cfg)
