"""Command line: `dkproxy out|in|demo|keygen|dnscheck|check-config ...`.

`dkproxy out` takes DKIMproxy's own command line (`dkimproxy.out [options] LISTEN RELAY`), so
an init script written for DKIMproxy keeps working once the program name is changed; the same
holds for `dkproxy in` and dkimproxy.in. Installed as `dkimproxy.out`/`dkimproxy.in` too.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Callable

USAGE = """\
usage: dkproxy COMMAND [options]

commands:
  out           outbound proxy: sign mail (DKIMproxy's dkimproxy.out command line)
  in            inbound proxy: verify mail, add Authentication-Results (dkimproxy.in)
  demo          start a proxy with a built-in key and show a message being signed
  keygen        generate a key pair and the DNS records to publish
  dnscheck      check that DNS publishes the keys a configuration signs with
  check-config  load a configuration, its keys and maps, and print the signing rules

Run `dkproxy COMMAND --help` for the options of a command.
"""


def setup_logging(level: str = "info", use_syslog: bool = False) -> None:
    """One line per event on stderr (journald adds the time), or to syslog's mail facility."""
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if use_syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(logging.Formatter(f"dkproxy[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s dkproxy[%(process)d] %(levelname)s %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def _fail(message: str, status: int = 2) -> int:
    print(f"dkproxy: {message}", file=sys.stderr)
    return status


def run_proxy(mode: str, argv: list[str]) -> int:
    """Parse the configuration, load keys and maps, bind, then serve."""
    from dkproxy import config, server
    from dkproxy.session import SessionSettings

    try:
        cfg = config.parse_proxy_command(mode, argv)  # type: ignore[arg-type]
    except config.ConfigError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    setup_logging(cfg.log_level, cfg.syslog)
    processor_factory, assembler = _mode_parts(mode, cfg, argv)
    settings = SessionSettings(
        hostname=cfg.hostname or _default_hostname(),
        relay_host=cfg.relay.host,
        relay_port=cfg.relay.port,
        relay_timeout=cfg.relay_timeout,
        max_message_size=cfg.max_message_size,
    )
    try:
        sock = server.bind(cfg.listen.host, cfg.listen.port)
    except OSError as exc:
        return _fail(str(exc.strerror or exc), 1)
    try:
        return server.run(sock, settings, processor_factory, assembler, cfg.workers or 1)
    except config.ConfigError as exc:
        return _fail(str(exc))


def _mode_parts(mode: str, cfg: object, argv: list[str]) -> tuple[Callable[[], object], object]:
    """The processor factory (re-reading the configuration on reload) and the assembler."""
    from dkproxy import config

    if mode == "out":
        from dkproxy.policy import SigningPolicy
        from dkproxy.signer import OutboundSigner, assemble

        first = [True]

        def make_signer() -> OutboundSigner:
            current = cfg if first[0] else config.parse_proxy_command("out", argv)
            first[0] = False
            policy = SigningPolicy.from_config(current)  # type: ignore[arg-type]
            return OutboundSigner(policy, current.reject_error)  # type: ignore[attr-defined]

        return make_signer, assemble
    from dkproxy.inbound import make_inbound_parts

    return make_inbound_parts(cfg, argv)


def _default_hostname() -> str:
    import socket

    return socket.getfqdn() or "localhost"


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
        from dkproxy.demo import main as demo_main

        return demo_main(rest)
    if command in ("keygen", "dnscheck", "check-config"):
        from dkproxy import keytools

        return keytools.main(command, rest)
    if command in ("--version", "version"):
        from dkproxy import __version__

        print(f"dkproxy {__version__}")
        return 0
    return _fail(f"unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    sys.exit(main())
