"""Command line: `dkproxy out|in|demo|keygen|dnscheck|check-config|qmail-*`.

`dkproxy out` takes DKIMproxy's own command line (`dkimproxy.out [options] LISTEN RELAY`), so
an init script written for DKIMproxy keeps working once the program name is changed; the same
holds for `dkproxy in` and dkimproxy.in. Installed as `dkimproxy.out`/`dkimproxy.in` too.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from typing import Literal

USAGE = """\
usage: dkproxy COMMAND [options]

commands:
  out           outbound proxy: sign mail (DKIMproxy's dkimproxy.out command line)
  in            inbound proxy: verify mail, add Authentication-Results (dkimproxy.in)
  demo          start a proxy with a built-in key and show a message being signed
  keygen        generate a key pair and the DNS records to publish
  dnscheck      check that DNS publishes the keys a configuration signs with
  check-config  load a configuration, its keys and maps, and print the signing rules
  qmail-queue   QMAILQUEUE wrapper: sign or verify, then run the real qmail-queue
  qmail-service serve dkproxy-qmail-queue over a Unix socket (keys and DNS kept loaded)
  qmail-launcher write a faster-starting dkproxy-qmail-queue to a given path
  relay         submission relay for applications: TLS + AUTH, signing, smarthost
  passwd        add or change a login in a relay credentials file

Run `dkproxy COMMAND --help` for the options of a command.
"""


def _fail(message: str, status: int = 2) -> int:
    print(f"dkproxy: {message}", file=sys.stderr)
    return status


def run_proxy(mode: Literal["out", "in"], argv: list[str]) -> int:
    """Parse the configuration, bind, load keys and maps, drop privileges, then serve."""
    from dkproxy import config, daemon
    from dkproxy.smtp import server
    from dkproxy.smtp.proxy import Processor
    from dkproxy.smtp.settings import SessionSettings

    try:
        cfg = config.parse_proxy_command(mode, argv)
    except config.ConfigError as exc:
        return _fail(str(exc))
    except config.HelpRequested as exc:
        print(exc.text)
        return 0
    daemon.setup_logging(
        cfg.log_level,
        use_syslog=cfg.syslog,
        facility=cfg.syslog_facility,
        ident=cfg.syslog_ident,
        log_file=cfg.log_file,
    )
    log = logging.getLogger("dkproxy")
    for warning in cfg.warnings:
        log.warning("%s", warning)
    settings = SessionSettings(
        hostname=cfg.hostname or socket.getfqdn() or "localhost",
        relay_host=cfg.relay.host,
        relay_port=cfg.relay.port,
        relay_timeout=cfg.relay_timeout,
        max_message_size=cfg.max_message_size,
        debugtrace=cfg.debugtrace,
        max_command_line=cfg.max_command_line,
        max_recipients=cfg.max_recipients,
        max_messages_per_session=cfg.max_messages_per_session,
        max_sessions=cfg.max_sessions,
        max_header_size=cfg.max_header_size,
        max_header_fields=cfg.max_header_fields,
        command_timeout=cfg.command_timeout,
        data_timeout=cfg.data_timeout,
        xforward_hosts=tuple(cfg.xforward_hosts),
    )
    try:
        sock = server.bind(cfg.listen.host, cfg.listen.port)
    except OSError as exc:
        return _fail(str(exc.strerror or exc), 1)
    workers = cfg.workers or os.cpu_count() or 1
    prefork = ("min_servers", "max_servers", "min_spare_servers", "max_spare_servers")
    if any(getattr(cfg, name) is not None for name in prefork):
        log.info("%s size Net::Server's pool of one-client processes; each dkproxy worker "
                 "serves many clients at once, so dkproxy runs %d workers (option workers)",
                 "/".join(prefork), workers)  # fmt: skip
    access = daemon.AccessList.build(cfg.allow, cfg.deny, cfg.cidr_allow, cfg.cidr_deny)
    metrics_server = None
    if cfg.metrics is not None:
        from dkproxy import metrics

        metrics.enable(mode, owner=daemon.user_ids(cfg.user, cfg.group))
        try:
            metrics_server = metrics.bind(cfg.metrics.host, cfg.metrics.port)
        except OSError as exc:
            return _fail(str(exc.strerror or exc), 1)

    def after_load() -> None:
        if cfg.daemonize:
            daemon.daemonize()
        if cfg.user or cfg.group or cfg.chroot:
            # Nothing the mail path loads on first use may be left for after the drop.
            from dkproxy.preload import preload

            preload()
        daemon.drop_privileges(cfg.user, cfg.group, cfg.chroot)
        if metrics_server is not None:
            metrics.start(metrics_server)  # a thread: after daemonize's forks, not before
        if cfg.pidfile:
            daemon.write_pidfile(cfg.pidfile)
            atexit.register(daemon.remove_pidfile, cfg.pidfile)

    if mode == "out":
        from dkproxy.outbound import OutboundSigner, assemble

        build, assembler = OutboundSigner.from_config, assemble
    else:
        from dkproxy.inbound import InboundVerifier, assemble_inbound

        build, assembler = InboundVerifier, assemble_inbound
    pending = [cfg]

    def factory() -> Processor:
        """The processor from `cfg` at start; on reload, from the re-read command line."""
        current = pending.pop() if pending else config.parse_proxy_command(mode, argv)
        return build(current)  # type: ignore[arg-type]

    try:
        return server.run(
            sock,
            settings,
            factory,
            assembler,
            workers=workers,
            access=access,
            after_load=after_load,
            max_connections=(cfg.max_requests or 0) if workers > 1 else 0,
        )
    except config.ConfigError as exc:
        return _fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    program = os.path.basename(sys.argv[0]) if argv is None else "dkproxy"
    if program in ("dkimproxy.out", "dkimproxy.in"):
        args.insert(0, program.rsplit(".", 1)[1])
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("out", "in"):
        return run_proxy(command, rest)
    if command == "demo":
        from dkproxy.tools.demo import main as demo_main

        return demo_main(rest)
    if command == "relay":
        from dkproxy.relay.server import main as relay_main

        return relay_main(rest)
    if command == "passwd":
        from dkproxy.relay.passwd import main as passwd_main

        return passwd_main(rest)
    if command in ("keygen", "dnscheck", "check-config"):
        from dkproxy.tools import keytools

        return keytools.main(command, rest)
    if command == "qmail-queue":
        from dkproxy.qmail_client import main as qmail_queue_main

        return qmail_queue_main()
    if command == "qmail-service":
        from dkproxy.qmail_service import main as qmail_service_main

        return qmail_service_main(rest)
    if command == "qmail-launcher":
        from dkproxy.qmail_service import write_launcher

        return write_launcher(rest)
    if command in ("--version", "version"):
        from dkproxy import __version__

        print(f"dkproxy {__version__}")
        return 0
    return _fail(f"unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    sys.exit(main())
