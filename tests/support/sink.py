"""Downstream SMTP servers for tests: Postfix's real smtp-sink, and a byte-exact capture server.

`SmtpSink` runs /usr/sbin/smtp-sink with `-d` dump files. What the dump preserves (checked on
Postfix 3.x by experiment, see tests/test_support.py):

* byte-exact: header and body bytes including 8bit bytes, trailing whitespace, lines of any
  length (50,000 bytes tested), blank lines, an empty body ("Subject: x CRLF CRLF") versus no
  body at all ("Subject: x CRLF"); dot-stuffing is undone (a body line "." or "..x" is dumped as
  sent by the author, not as stuffed on the wire).
* NOT byte-exact: line endings. CRLF and a bare LF both become LF in the dump and `data` turns
  every LF back into CRLF, so a bare LF reads back as CRLF; a bare CR is dropped by smtp-sink.
  The final CRLF before "." is part of the protocol, so `data` always ends in CRLF.

Use `CaptureServer` when a test must see the exact DATA bytes, per-recipient replies or
XFORWARD, which smtp-sink cannot show.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from .tools import die_with_parent, free_port, require_tool, wait_for_port

_ANGLE = re.compile(r"<([^>]*)>")


def _address(args: str) -> str:
    """The address inside <...> of a MAIL/RCPT argument string ('' for <>)."""
    m = _ANGLE.search(args)
    return m.group(1) if m else args.split()[0] if args.split() else ""


@dataclass
class SinkMessage:
    """One transaction dumped by smtp-sink."""

    path: str
    client_addr: str
    proto: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str]
    data: bytes
    received: str
    raw: bytes = field(repr=False)

    @property
    def mail_from(self) -> str:
        """Envelope sender without angle brackets ('' for the null sender)."""
        return _address(self.mail_args)

    @property
    def rcpts(self) -> list[str]:
        """Envelope recipients without angle brackets or parameters."""
        return [_address(a) for a in self.rcpt_args]

    @property
    def mail_params(self) -> list[str]:
        """ESMTP parameters of MAIL FROM (e.g. ['SIZE=10', 'BODY=8BITMIME'])."""
        return _ANGLE.sub("", self.mail_args, count=1).split()

    def header(self, name: str) -> str | None:
        """First header field `name` of the message, unfolded and stripped (None if absent)."""
        return header_value(self.data, name)


def header_value(message: bytes, name: str) -> str | None:
    """First header field `name` of a CRLF message, unfolded and stripped."""
    head = message.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", head)
    prefix = name.lower().encode("ascii") + b":"
    for line in unfolded.split(b"\r\n"):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip().decode("utf-8", "surrogateescape")
    return None


def parse_sink_dump(raw: bytes, path: str = "") -> SinkMessage:
    """Parse one smtp-sink `-d` dump file (format in smtp-sink(1), DUMP FILE FORMAT)."""
    lines = raw.split(b"\n")
    pos = 0
    fields: dict[str, list[str]] = {}
    while pos < len(lines) and lines[pos].startswith(b"X-"):
        name, _, value = lines[pos].decode("utf-8", "surrogateescape").partition(": ")
        fields.setdefault(name, []).append(value)
        pos += 1
    if pos + 2 >= len(lines) or not lines[pos].startswith(b"Received: "):
        raise ValueError(f"{path}: no smtp-sink Received header where expected")
    received = b"\n".join(lines[pos : pos + 3]).decode("utf-8", "surrogateescape")
    pos += 3
    body = b"\n".join(lines[pos:])
    # smtp-sink appends one empty line after the message; every message line ended in LF.
    if not body.endswith(b"\n\n"):
        raise ValueError(f"{path}: dump does not end with the extra empty line (incomplete?)")
    body = body[:-1]
    return SinkMessage(
        path=path,
        client_addr=fields.get("X-Client-Addr", [""])[0],
        proto=fields.get("X-Client-Proto", [""])[0],
        helo=fields["X-Helo-Args"][0] if "X-Helo-Args" in fields else None,
        mail_args=fields.get("X-Mail-Args", [""])[0],
        rcpt_args=fields.get("X-Rcpt-Args", []),
        data=body.replace(b"\n", b"\r\n"),
        received=received,
        raw=raw,
    )


def _commands(value: str | Sequence[str]) -> str:
    return value if isinstance(value, str) else ",".join(value)


class SmtpSink:
    """Postfix smtp-sink on 127.0.0.1:<free port>, dumping each message to a file.

    Options (all default off): hard_reject / soft_reject / disconnect / reply_421 take command
    names (MAIL, RCPT, DATA, ".", EHLO, ...) for -f / -r / -q / -Q; no_pipelining (-p),
    no_8bitmime (-8), no_xforward (-F), no_dsn (-N), no_ehlo (-e, no ESMTP at all),
    no_enhanced_status (-E), no_xclient (-C), hostname (-h), hard_reply / soft_reply (-B / -b),
    data_delay (-w seconds before answering DATA), delays ({"RCPT": 2} -> -W RCPT:2),
    abort_after_data (-A seconds, then 550 and stop reading), lmtp (-L), extra_args.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        hard_reject: str | Sequence[str] = (),
        soft_reject: str | Sequence[str] = (),
        disconnect: str | Sequence[str] = (),
        reply_421: str | Sequence[str] = (),
        no_pipelining: bool = False,
        no_8bitmime: bool = False,
        no_xforward: bool = False,
        no_dsn: bool = False,
        no_ehlo: bool = False,
        no_enhanced_status: bool = False,
        no_xclient: bool = False,
        hostname: str | None = None,
        hard_reply: str | None = None,
        soft_reply: str | None = None,
        data_delay: float | None = None,
        delays: Mapping[str, float] | None = None,
        abort_after_data: float | None = None,
        lmtp: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        args: list[str] = []
        for flag, value in (
            ("-f", hard_reject),
            ("-r", soft_reject),
            ("-q", disconnect),
            ("-Q", reply_421),
        ):
            if value:
                args += [flag, _commands(value)]
        for flag, on in (
            ("-p", no_pipelining),
            ("-8", no_8bitmime),
            ("-F", no_xforward),
            ("-N", no_dsn),
            ("-e", no_ehlo),
            ("-E", no_enhanced_status),
            ("-C", no_xclient),
            ("-L", lmtp),
        ):
            if on:
                args.append(flag)
        if hostname:
            args += ["-h", hostname]
        if hard_reply:
            args += ["-B", hard_reply]
        if soft_reply:
            args += ["-b", soft_reply]
        if data_delay is not None:
            args += ["-w", str(int(data_delay))]
        for command, delay in (delays or {}).items():
            args += ["-W", f"{command}:{int(delay)}"]
        if abort_after_data is not None:
            args += ["-A", str(int(abort_after_data))]
        self._options = args + list(extra_args)
        self.port = 0
        self.dir = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._argv: list[str] = []
        self._cache: dict[str, SinkMessage] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> SmtpSink:
        binary = require_tool("smtp-sink")
        self.dir = tempfile.mkdtemp(prefix="dkproxy-sink-")
        self._dump = os.path.join(self.dir, "dump")
        os.mkdir(self._dump)
        # smtp-sink refuses to run as root without -u; root keeps the dump dir writable.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        last = ""
        for _ in range(3):
            self.port = free_port()
            argv = [
                binary,
                *user,
                *self._options,
                "-d",
                os.path.join(self._dump, "%Y%m%d%H%M%S."),
                f"{self.host}:{self.port}",
                "256",
            ]
            self._argv = argv
            self._spawn()
            try:
                wait_for_port(self.host, self.port, timeout=5)
                if self._proc is not None and self._proc.poll() is None:
                    return self
            except TimeoutError as exc:
                last = str(exc)
            self._kill()
        raise RuntimeError(f"smtp-sink did not start: {last}\n{self.log()}")

    def _spawn(self) -> None:
        log = open(os.path.join(self.dir, "smtp-sink.log"), "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            self._argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        log.close()

    def crash(self) -> None:
        """SIGKILL smtp-sink, as a downstream crash: whatever it dumped so far stays."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self, timeout: float = 10.0) -> None:
        """Start smtp-sink again after crash(): same port, same dump directory."""
        self._spawn()
        wait_for_port(self.host, self.port, timeout=timeout)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "smtp-sink.log"), "rb") as fh:
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def stop(self) -> None:
        self._kill()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _open_files(self) -> set[str]:
        """Dump files smtp-sink still holds open (transactions still in progress)."""
        if self._proc is None:
            return set()
        fd_dir = f"/proc/{self._proc.pid}/fd"
        found = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    found.add(os.readlink(os.path.join(fd_dir, fd)))
        return found

    def messages(self) -> list[SinkMessage]:
        """Completed transactions, in completion order as far as file timestamps tell.

        Timestamps tick coarsely (about a millisecond or more), and ties are broken by inode
        number, which is only usually creation order: when a test sends several messages
        quickly and cares which is which, match them by content (`header("Subject")`).
        """
        if not self.dir:
            return []
        busy = self._open_files()
        done: list[tuple[int, int, str]] = []
        for name in os.listdir(self._dump):
            path = os.path.join(self._dump, name)
            if path in busy:
                continue
            try:
                st = os.stat(path)
                # mtime ticks are coarse (jiffies): ties are broken by inode number, which
                # follows creation (DATA) order on the filesystems tests use.
                done.append((st.st_mtime_ns, st.st_ino, path))
            except FileNotFoundError:  # an aborted transaction being removed
                continue
        out = []
        for _, _, path in sorted(done):
            msg = self._cache.get(path)
            if msg is None:
                try:
                    with open(path, "rb") as fh:
                        raw = fh.read()
                    msg = parse_sink_dump(raw, path)
                except (OSError, ValueError):
                    continue
                self._cache[path] = msg
            out.append(msg)
        return out

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until at least `count` messages are complete; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if len(msgs) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if len(msgs) < count:
            raise TimeoutError(f"smtp-sink got {len(msgs)} of {count} messages in {timeout}s")
        return msgs

    def clear(self) -> None:
        """Forget completed messages (delete their dump files)."""
        for msg in self.messages():
            with contextlib.suppress(OSError):
                os.unlink(msg.path)
        self._cache.clear()


# --------------------------------------------------------------------------------------------
# CaptureServer


@dataclass
class RcptRecord:
    line: str  # the full command line as received, without CRLF
    address: str
    params: list[str]
    reply: str


@dataclass
class CapturedTransaction:
    """One MAIL..DATA (or MAIL..RSET/QUIT) transaction as the capture server saw it."""

    session: int
    ehlo: str | None  # "EHLO name" / "HELO name" line that preceded it
    xforward: list[str]  # XFORWARD lines sent in the session before MAIL (since last RSET)
    mail_line: str
    mail_from: str
    mail_params: list[str]
    rcpts: list[RcptRecord] = field(default_factory=list)
    data: bytes | None = None  # DATA content, dot-stuffing undone, CRLF as sent
    raw_data: bytes | None = None  # DATA content as on the wire (still dot-stuffed)
    data_reply: str | None = None

    @property
    def accepted_rcpts(self) -> list[str]:
        return [r.address for r in self.rcpts if r.reply.startswith("2")]


#: Reply for a command: a fixed line (may be multi-line with "\r\n"), or a callable deciding.
Reply = str | Callable[[str], str]


class CaptureServer:
    """A small SMTP server (asyncio, own thread) that records everything byte-exact.

    ehlo_capabilities: the EHLO keyword lines after the greeting line (default: PIPELINING,
    8BITMIME, SIZE, ENHANCEDSTATUSCODES, DSN, XFORWARD ...). rcpt_replies: address (lower-case,
    no brackets) -> reply line. mail_reply / data_command_reply (answer to DATA itself) /
    data_reply (answer after the final ".") override the defaults; each may be a callable given
    the command line (for data_reply: the address list joined by ","). delays: command verb
    (or ".") -> seconds to sleep before answering. disconnect_on: verbs after which the
    connection is dropped without a reply. close_in_data: drop the connection (TCP reset)
    once that many bytes of message data have arrived, mid-DATA.
    """

    host = "127.0.0.1"

    DEFAULT_CAPS = (
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "SMTPUTF8",
        "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
    )

    def __init__(
        self,
        *,
        hostname: str = "capture.test",
        ehlo_capabilities: Sequence[str] | None = None,
        greeting: str | None = None,
        mail_reply: Reply = "250 2.1.0 Ok",
        rcpt_replies: Mapping[str, str] | None = None,
        rcpt_default: str = "250 2.1.5 Ok",
        data_command_reply: Reply | None = None,
        data_reply: Reply = "250 2.0.0 Ok: queued",
        delays: Mapping[str, float] | None = None,
        disconnect_on: Sequence[str] = (),
        close_in_data: int | None = None,
    ) -> None:
        self.hostname = hostname
        self.close_in_data = close_in_data
        self.caps = list(self.DEFAULT_CAPS if ehlo_capabilities is None else ehlo_capabilities)
        self.greeting = greeting or f"220 {hostname} ESMTP capture"
        self.mail_reply = mail_reply
        self.rcpt_replies = {k.lower().strip("<>"): v for k, v in (rcpt_replies or {}).items()}
        self.rcpt_default = rcpt_default
        self.data_command_reply = data_command_reply
        self.data_reply = data_reply
        self.delays = {k.upper(): v for k, v in (delays or {}).items()}
        self.disconnect_on = {v.upper() for v in disconnect_on}
        self.port = 0
        #: every completed or abandoned transaction, in order
        self.transactions: list[CapturedTransaction] = []
        #: every command line received (all sessions), as text without CRLF
        self.commands: list[str] = []
        self.sessions = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def messages(self) -> list[CapturedTransaction]:
        """Transactions whose DATA was received (whatever the reply)."""
        with self._cond:
            return [t for t in self.transactions if t.data is not None]

    def start(self) -> CaptureServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._session, self.host, 0, limit=1 << 24)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="capture-smtp", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("CaptureServer did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            loop = self._loop

            def shutdown() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.stop()

            loop.call_soon_threadsafe(shutdown)
            self._thread.join(10)
            self._loop = None
            self._thread = None

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[CapturedTransaction]:
        """Block until `count` messages (DATA received) exist; returns them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                msgs = [t for t in self.transactions if t.data is not None]
                remaining = deadline - time.monotonic()
                if len(msgs) >= count or remaining <= 0:
                    break
                self._cond.wait(remaining)
        if len(msgs) < count:
            raise TimeoutError(f"capture server got {len(msgs)} of {count} messages")
        return msgs

    @staticmethod
    def _resolve(reply: Reply, arg: str) -> str:
        return reply(arg) if callable(reply) else reply

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._cond:
            self.sessions += 1
            session = self.sessions
        ehlo: str | None = None
        xforward: list[str] = []
        txn: CapturedTransaction | None = None

        async def send(verb: str, reply: str) -> None:
            delay = self.delays.get(verb)
            if delay:
                await asyncio.sleep(delay)
            text = reply.replace("\r\n", "\n").rstrip("\n").split("\n")
            writer.write(b"".join(line.encode("utf-8") + b"\r\n" for line in text))
            await writer.drain()

        def record(t: CapturedTransaction) -> None:
            with self._cond:
                self.transactions.append(t)
                self._cond.notify_all()

        try:
            await send("CONNECT", self.greeting)
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                with self._cond:
                    self.commands.append(line)
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                if verb in self.disconnect_on:
                    break
                if verb == "EHLO":
                    ehlo, xforward = line, []
                    lines = [self.hostname, *self.caps]
                    reply = "\n".join(
                        ("250-" if i < len(lines) - 1 else "250 ") + text
                        for i, text in enumerate(lines)
                    )
                    await send(verb, reply)
                elif verb in ("HELO", "LHLO"):
                    ehlo, xforward = line, []
                    await send(verb, f"250 {self.hostname}")
                elif verb == "XFORWARD":
                    xforward.append(line)
                    await send(verb, "250 2.0.0 Ok")
                elif verb == "MAIL":
                    params = arg.split(":", 1)[1] if ":" in arg else arg
                    reply = self._resolve(self.mail_reply, line)
                    if reply.startswith("2"):
                        txn = CapturedTransaction(
                            session=session,
                            ehlo=ehlo,
                            xforward=list(xforward),
                            mail_line=line,
                            mail_from=_address(params),
                            mail_params=_ANGLE.sub("", params, count=1).split(),
                        )
                    await send(verb, reply)
                elif verb == "RCPT":
                    if txn is None:
                        await send(verb, "503 5.5.1 Error: need MAIL command")
                        continue
                    params = arg.split(":", 1)[1] if ":" in arg else arg
                    address = _address(params)
                    reply = self.rcpt_replies.get(address.lower(), self.rcpt_default)
                    txn.rcpts.append(
                        RcptRecord(
                            line=line,
                            address=address,
                            params=_ANGLE.sub("", params, count=1).split(),
                            reply=reply,
                        )
                    )
                    await send(verb, reply)
                elif verb == "DATA":
                    if txn is None or not txn.accepted_rcpts:
                        await send(verb, "554 5.5.1 Error: no valid recipients")
                        continue
                    first = (
                        self._resolve(self.data_command_reply, line)
                        if self.data_command_reply is not None
                        else "354 End data with <CR><LF>.<CR><LF>"
                    )
                    await send(verb, first)
                    if not first.startswith("3"):
                        continue
                    chunks: list[bytes] = []
                    received = 0
                    while True:
                        chunk = await reader.readline()
                        if not chunk:
                            raise ConnectionError("EOF inside DATA")
                        if chunk == b".\r\n":
                            break
                        chunks.append(chunk)
                        received += len(chunk)
                        if self.close_in_data is not None and received >= self.close_in_data:
                            writer.transport.abort()
                            raise ConnectionError("closing mid-DATA as told")
                    wire = b"".join(chunks)
                    txn.raw_data = wire
                    txn.data = b"".join(c[1:] if c.startswith(b".") else c for c in chunks)
                    if "." in self.disconnect_on:
                        record(txn)
                        txn = None
                        break
                    final = self._resolve(self.data_reply, ",".join(txn.accepted_rcpts))
                    txn.data_reply = final
                    record(txn)
                    txn = None
                    await send(".", final)
                elif verb == "RSET":
                    if txn is not None:
                        record(txn)
                    txn, xforward = None, []
                    await send(verb, "250 2.0.0 Ok")
                elif verb == "NOOP":
                    await send(verb, "250 2.0.0 Ok")
                elif verb == "QUIT":
                    await send(verb, "221 2.0.0 Bye")
                    break
                else:
                    await send(verb, "502 5.5.2 Error: command not recognized")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if txn is not None:
                record(txn)
            with contextlib.suppress(Exception):
                writer.close()
