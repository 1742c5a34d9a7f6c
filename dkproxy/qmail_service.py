"""`dkproxy qmail-service`: signs and verifies for `dkproxy-qmail-queue` over a Unix socket.

qmail starts the wrapper once per message; importing dkimpy, cryptography and pydantic there
would cost ~0.2 s each time. This long-running process has them loaded, keeps private keys,
configurations and DNS answers cached, and answers each request in a few milliseconds. The
wrapper falls back to doing the work itself when the service does not answer, so stopping
the service slows mail down but never loses or delays it.

The service reads key and configuration files named by the requester's environment (the
qmail-dk conventions), with its own permissions: like a setuid qmail-dk, it lets whoever can
reach the socket sign with those keys. So it only opens files below `--allow-dir`
directories (refusing others; the wrapper then works with its own permissions), and the
socket's mode and group say who may use it.

Protocol (dkproxy.qmail_client): one request per connection, `DKPQ1 <meta> <size>\\n`, the
NUL-separated environment, the message; the answer `DKPQ1 <code> <fields> <log> <ranges>\\n`,
the header fields to add, the log line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from dkproxy.qmail import QmailProcessor, Refused
from dkproxy.qmail_client import (
    DEFAULT_SOCKET,
    EXIT_INTERNAL_BUG,
    MAGIC,
    REFUSED,
    decode_meta,
    encode_reply,
)

log = logging.getLogger("dkproxy.qmail")

DEFAULT_ALLOWED = ("/var/qmail/control", "/etc/dkimproxy", "/etc/dkproxy")
#: Larger requests are refused: the wrapper then signs such a message itself.
MAX_REQUEST = 256 * 1024 * 1024


async def handle(
    processor: QmailProcessor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer one request; a malformed one is answered REFUSED (the client works alone)."""
    try:
        head = await reader.readline()
        if not head:
            return  # a connection probe
        parts = head.split()
        if len(parts) != 3 or parts[0] != MAGIC:
            raise ValueError(f"bad request line {head[:40]!r}")
        meta_size, message_size = int(parts[1]), int(parts[2])
        if meta_size < 0 or message_size < 0 or meta_size + message_size > MAX_REQUEST:
            raise ValueError("request too large")
        meta = await reader.readexactly(meta_size)
        message = await reader.readexactly(message_size)
        env, sender = decode_meta(meta)
        try:
            answer = await processor.process(env, sender, message)
        except Refused as exc:
            log.info("refused: %s", exc)
            reply = encode_reply(REFUSED, b"", [], str(exc))
        else:
            log.info("exit=%d %s", answer.code, answer.log)
            reply = encode_reply(answer.code, answer.fields, list(answer.remove), answer.log)
        writer.write(reply)
        await writer.drain()
    except (ValueError, asyncio.IncompleteReadError, ConnectionError) as exc:
        log.warning("bad request: %s", exc)
        with contextlib.suppress(ConnectionError):
            writer.write(encode_reply(REFUSED, b"", [], "bad request"))
    except Exception:  # one broken request must not stop the service
        log.exception("internal error")
        with contextlib.suppress(ConnectionError):
            writer.write(encode_reply(EXIT_INTERNAL_BUG, b"", [], "internal error"))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def bind(path: str, mode: int, group: str | None) -> socket.socket:
    """A listening Unix socket at `path` (a stale one is replaced), with `mode` and `group`."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    if group:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(128)
    return sock


async def serve(sock: socket.socket, processor: QmailProcessor) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    server = await asyncio.start_unix_server(
        lambda r, w: handle(processor, r, w), sock=sock, limit=1 << 16
    )
    async with server:
        await stop


LAUNCHER = """\
#!{python} -IS
# dkproxy-qmail-queue, written by `dkproxy qmail-launcher`. -I -S skip the interpreter's
# site processing (10-25 ms per message); the directory holding dkproxy is added instead.
import sys
sys.path.append({directory!r})
from dkproxy.qmail_client import main
sys.exit(main())
"""


def write_launcher(argv: list[str]) -> int:
    """`dkproxy qmail-launcher PATH`: write the lean QMAILQUEUE program to PATH (0755).

    The console script `dkproxy-qmail-queue` works too, but its interpreter imports the
    site machinery and the `re` module before our first line runs.
    """
    import dkproxy

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: dkproxy qmail-launcher PATH", file=sys.stderr)
        return 2
    directory = os.path.dirname(os.path.dirname(os.path.abspath(dkproxy.__file__)))
    text = LAUNCHER.format(python=sys.executable, directory=directory)
    try:
        with open(argv[0], "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(argv[0], 0o755)
    except OSError as exc:
        print(f"dkproxy: {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """`dkproxy qmail-service [options]`; returns the exit status."""
    from dkproxy import daemon

    parser = argparse.ArgumentParser(
        prog="dkproxy qmail-service", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"(default {DEFAULT_SOCKET})")
    parser.add_argument("--mode", default="0666", help="socket permissions (default 0666)")
    parser.add_argument("--allow-dir", action="append", dest="allow_dirs", metavar="DIR",
                        help="key/configuration files must be below DIR (repeatable; default "
                        + ", ".join(DEFAULT_ALLOWED) + ")")  # fmt: skip
    parser.add_argument("--dns-server", help="HOST:PORT for DNS (default: /etc/resolv.conf)")
    parser.add_argument("--dns-timeout", type=float, default=5.0)
    parser.add_argument("--user", help="run as this user once the socket is bound")
    parser.add_argument("--group", help="socket group, and the group to run as")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    daemon.setup_logging(args.log_level)
    try:
        mode = int(args.mode, 8)
    except ValueError:
        print(f"dkproxy: --mode {args.mode!r} is not an octal mode", file=sys.stderr)
        return 2
    try:
        sock = bind(args.socket, mode, args.group)
        if args.user:
            import pwd

            os.chown(args.socket, pwd.getpwnam(args.user).pw_uid, -1)
    except (OSError, KeyError) as exc:
        print(f"dkproxy: {args.socket}: {exc}", file=sys.stderr)
        return 1
    daemon.drop_privileges(args.user, args.group)
    processor = QmailProcessor(
        allowed_dirs=tuple(args.allow_dirs or DEFAULT_ALLOWED),
        dns_server=args.dns_server,
        dns_timeout=args.dns_timeout,
    )
    log.info("qmail service on %s (files below %s)", args.socket,
             ", ".join(processor.allowed_dirs or ()))  # fmt: skip
    try:
        asyncio.run(serve(sock, processor))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    return 0
