"""The upstream SMTP session: one per connection, with its own downstream session.

Every answer that commits mail comes from the downstream: MAIL, RCPT and the end of DATA are
relayed and the downstream's reply is passed back unchanged. dkproxy answers on its own only
where no mail is committed (NOOP, HELP, protocol errors) or where it refuses mail itself
(signing error with reject_error, a verification policy, a message over the size limit), and
then always before the downstream has accepted anything. When the downstream cannot be
reached or fails mid-session the upstream gets a 4xx, so its queue keeps the mail.

Why not aiosmtpd: its MAIL/RCPT handling upper-cases parameter values (ENVID and ORCPT are
case-sensitive xtext) and answers 555 to RCPT NOTIFY/ORCPT before any handler hook runs, which
a transparent proxy cannot accept; this module reads the protocol itself and forwards lines
verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from dkproxy.message import Buffer, break_long_lines, wire_line_ends
from dkproxy.relay import DownstreamError, Part, RelayClient, RelayPool, Reply, local_reply
from dkproxy.spool import Spool

log = logging.getLogger("dkproxy.session")
T = TypeVar("T")

MAX_COMMAND_LINE = 4096
MAX_ERRORS = 20
_READ_CHUNK = 1 << 16
_MAIL_FROM = re.compile(rb"^MAIL\s+FROM:\s*(<[^>]*>|[^\s<>]*)(.*)$", re.IGNORECASE | re.DOTALL)
_RCPT_TO = re.compile(rb"^RCPT\s+TO:\s*(<[^>]*>|[^\s<>]+)(.*)$", re.IGNORECASE | re.DOTALL)
MAX_PIPELINED_RCPTS = 100
#: Extensions passed upstream when the downstream has them; everything else is withheld.
RELAYED_EXTENSIONS = ("8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES", "XFORWARD")


@dataclass
class Envelope:
    """What the SMTP dialogue says about one message, for processors and the log line."""

    peer: str
    helo: str | None = None
    mail_from: str | None = None
    mail_line: bytes = b""
    rcpt_to: list[str] = field(default_factory=list)
    xforward: dict[str, str] = field(default_factory=dict)

    @property
    def client_address(self) -> str:
        """The original client: XFORWARD ADDR when an MTA in front told us, else our peer."""
        addr = self.xforward.get("ADDR", "")
        if addr and addr.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            return addr[5:] if addr.upper().startswith("IPV6:") else addr
        return self.peer

    @property
    def client_helo(self) -> str | None:
        helo = self.xforward.get("HELO", "")
        return helo if helo and not helo.startswith("[") else self.helo


@dataclass
class Outcome:
    """What a processor decided: the header fields to add, or a reply that refuses the mail."""

    prepend: list[bytes] = field(default_factory=list)
    reject: Reply | None = None
    summary: str = ""
    #: (start, end) byte ranges of header fields to drop (forged Authentication-Results).
    remove_ranges: list[tuple[int, int]] = field(default_factory=list)


#: A processor turns (message bytes, envelope) into an Outcome: the signer or the verifier.
Processor = Callable[[Buffer, Envelope], Awaitable[Outcome]]
#: The message sent downstream, as parts in order, from the spooled message and the outcome.
Assembler = Callable[[Spool, Outcome], Sequence[Part]]


@dataclass(frozen=True)
class SessionSettings:
    hostname: str
    relay_host: str
    relay_port: int
    relay_timeout: float = 300.0
    command_timeout: float = 300.0
    max_message_size: int = 64 << 20
    ident: str = "dkproxy"
    #: Log every command and reply (DKIMproxy's debugtrace); message bodies are not logged.
    debugtrace: bool = False


class ClientGone(Exception):
    """The upstream client closed the connection or stopped talking."""


class LineTooLong(Exception):
    pass


class UpstreamStream:
    """Buffered reads from the upstream client: command lines and DATA bodies.

    DATA is found by scanning for CRLF.CRLF in big chunks instead of reading line by line, and
    whatever the client pipelined after the terminating dot stays buffered for the next read.
    """

    def __init__(self, reader: asyncio.StreamReader, timeout: float) -> None:
        self._reader = reader
        self._buf = bytearray()
        self.timeout = timeout

    @property
    def has_buffered(self) -> bool:
        return bool(self._buf)

    async def _fill(self) -> None:
        try:
            # asyncio.timeout() arms a timer; wait_for() would also wrap the read in a task,
            # which costs more than the read itself on this hot path.
            async with asyncio.timeout(self.timeout):
                chunk = await self._reader.read(_READ_CHUNK)
        except TimeoutError as exc:
            raise ClientGone("timeout") from exc
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from exc
        if not chunk:
            raise ClientGone("connection closed")
        self._buf += chunk

    async def readline(self) -> bytes:
        """One command line without its line end; LineTooLong after discarding an overlong one."""
        start = 0
        overlong = False
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                if overlong or len(line) > MAX_COMMAND_LINE:
                    raise LineTooLong
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > MAX_COMMAND_LINE:
                overlong = True
                self._buf.clear()
            start = len(self._buf)
            await self._fill()

    def take_buffered_lines(self, prefix: bytes, limit: int) -> list[bytes]:
        """Pop complete command lines already received that start with `prefix` (any case)."""
        lines: list[bytes] = []
        while len(lines) < limit:
            end = self._buf.find(b"\n")
            if end < 0 or end > MAX_COMMAND_LINE or self._buf[: len(prefix)].upper() != prefix:
                break
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            lines.append(line[:-1] if line.endswith(b"\r") else line)
        return lines

    async def read_data(self, max_size: int) -> Spool | None:
        """The message up to CRLF.CRLF, dot-stuffing undone; None when it exceeded max_size.

        The message goes into a Spool (memory, or a file when large), a line-aligned piece
        at a time with the stuffing undone per piece, so it is never held as pieces plus a
        joined copy plus an unstuffed copy. Bare LF line ends become CRLF.
        """
        spool = Spool()
        try:
            return await self._read_into(spool, max_size)
        except BaseException:
            spool.close()  # the client went away mid-DATA
            raise

    async def _read_into(self, message: Spool, max_size: int) -> Spool | None:
        kept: Spool | None = message
        after_crlf = True  # the buffer begins right after a CRLF (or at the start of DATA)
        line_start = True  # ... or after a bare LF, which also starts a line (see below)
        column = 0  # characters of the current (stored) line in earlier pieces
        while True:
            while len(self._buf) < 3:
                await self._fill()
            # Only CRLF.CRLF ends the data: a dot line after a bare LF is content (treating
            # it as the end is what SMTP smuggling exploits).
            if after_crlf and self._buf.startswith(b".\r\n"):
                del self._buf[:3]
                return kept
            end = self._buf.find(b"\r\n.\r\n")
            if end >= 0:
                cut, consumed = end + 2, end + 5
            else:
                # Take whole lines only: a piece must end at a line end for unstuffing.
                last = self._buf.rfind(b"\r\n")
                if last < 0:
                    if len(self._buf) < _READ_CHUNK:
                        await self._fill()
                        continue
                    # One very long line: split it anywhere but inside a run of CRs (they
                    # may end in the LF that makes them one line end, see wire_line_ends).
                    cut = len(self._buf) - 1
                    while cut > 1 and self._buf[cut - 1] == 0x0D:
                        cut -= 1
                    consumed = cut
                else:
                    cut = consumed = last + 2
            if kept is not None:
                # Bare LF, bare CR, CR CR LF ...: rewritten as Postfix stores them, so what we
                # sign is what arrives (a dot after a bare LF is stuffing, as Postfix reads it).
                piece = wire_line_ends(bytes(self._buf[:cut]))
                if line_start and piece.startswith(b"."):
                    piece = piece[1:]
                # Lines over 998 characters: broken as Postfix's smtp client sends them on.
                stored, column = break_long_lines(piece.replace(b"\r\n.", b"\r\n"), column)
                kept.write(stored)
                if max_size and len(kept) > max_size:
                    kept.close()  # keep reading to the end, keep nothing
                    kept = None
            after_crlf = self._buf[cut - 2 : cut] == b"\r\n"
            line_start = self._buf[cut - 1 : cut] == b"\n"
            del self._buf[:consumed]
            if end >= 0:
                return kept
            if not self._buf:
                await self._fill()


def _address(token: bytes) -> str:
    """The address of a MAIL/RCPT path, without angle brackets."""
    text = token.decode("utf-8", "replace")
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def _reply(code: int, text: str) -> bytes:
    return f"{code} {text}\r\n".encode()


class SmtpSession:
    """Serves one upstream connection until QUIT, a fatal error or the client goes away."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: SessionSettings,
        processor: Processor,
        assembler: Assembler,
        pool: RelayPool,
    ) -> None:
        self.writer = writer
        self.pool = pool
        self.settings = settings
        self.processor = processor
        self.assembler = assembler
        self.stream = UpstreamStream(reader, settings.command_timeout)
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        self.relay = pool.new_client()
        #: The relay came from the pool and has not answered yet: it may have died while idle.
        self._relay_untested = False
        #: The downstream said 421 or refused the session: never pool it.
        self._relay_spent = False
        self.envelope = Envelope(peer=self.peer)
        self.helo: str | None = None
        self.extended = False
        self.accepted_rcpts = 0
        self.errors = 0
        self._closing = False

    # -- plumbing -------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self.settings.debugtrace:
            log.info("client=%s < %r", self.peer, data)
        self.writer.write(data)
        if not self.stream.has_buffered:
            # Like Postfix: with pipelined input pending, replies are flushed in one write.
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ClientGone(str(exc)) from exc

    async def send_reply(self, reply: Reply) -> None:
        await self.send(reply.render())
        if reply.code == 421:
            self._closing = True
            self._relay_spent = True

    async def downstream(self, call: Callable[[RelayClient], Awaitable[T]]) -> T:
        """Run a downstream call; a pooled session that turns out dead on its first use is
        replaced by a fresh one (nothing was committed on it), so pooling never costs mail."""
        if not self._relay_untested:
            return await call(self.relay)
        self._relay_untested = False
        try:
            return await call(self.relay)
        except DownstreamError as exc:
            log.debug("client=%s pooled downstream session unusable (%s); reconnecting",
                      self.peer, exc)  # fmt: skip
        self.relay.discard()
        self.relay = self.pool.new_client()
        greeting = await self.relay.connect()
        if greeting.code != 220:
            raise DownstreamError(f"downstream refused a new session: {greeting}")
        if self.helo is not None:
            hello = self.relay.ehlo if self.extended else self._helo_only
            reply = await hello(self.helo)
            if reply.code != 250:
                raise DownstreamError(f"downstream refused {self.helo!r}: {reply}")
        return await call(self.relay)

    async def _helo_only(self, name: str) -> Reply:
        self.relay.extensions = {}
        return await self.relay.command(b"HELO " + name.encode("utf-8", "surrogateescape"))

    async def release_relay(self) -> None:
        """Pool the downstream session if it is between transactions, else end it."""
        clean = self.envelope.mail_from is None and not self._relay_spent
        if not (clean and self.pool.give_back(self.relay)):
            await self.relay.quit()

    async def downstream_failed(self, exc: DownstreamError) -> None:
        """The downstream is gone: tell the client to try later and end the session."""
        log.warning("client=%s downstream failure: %s", self.peer, exc)
        await self.send(
            _reply(421, f"4.4.2 {self.settings.hostname} downstream failed, try again later")
        )
        self._closing = True

    def reset_transaction(self) -> None:
        """A new transaction; XFORWARD attributes end with the old one, as in Postfix's smtpd
        (its client sends them again before each MAIL)."""
        self.envelope = Envelope(peer=self.peer, helo=self.helo)
        self.accepted_rcpts = 0

    # -- session --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._serve()
        except ClientGone as exc:
            log.debug("client=%s gone: %s", self.peer, exc)
        except Exception:
            log.exception("client=%s internal error; closing the session", self.peer)
            with contextlib.suppress(Exception):
                self.writer.write(_reply(421, "4.3.0 internal error, try again later"))
        finally:
            await self.release_relay()
            self.writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def _serve(self) -> None:
        if not await self._open_downstream():
            return
        await self.send(_reply(220, f"{self.settings.hostname} ESMTP {self.settings.ident}"))
        while not self._closing:
            try:
                line = await self.stream.readline()
            except LineTooLong:
                await self.protocol_error(500, "5.5.2 Error: line too long")
                continue
            await self.dispatch(line)

    async def _open_downstream(self) -> bool:
        """Take a pooled downstream session or open one; if neither works, tell the client
        to come back later (4xx) and return False."""
        pooled = self.pool.take()
        if pooled is not None:
            self.relay, self._relay_untested = pooled, True
            return True
        try:
            greeting = await self.relay.connect()
        except DownstreamError as exc:
            log.warning("client=%s downstream unavailable: %s", self.peer, exc)
            host = self.settings.hostname
            await self.send(_reply(421, f"4.4.1 {host} downstream unavailable, try again later"))
            return False
        if greeting.code != 220:
            # The downstream refuses sessions (e.g. overloaded): say so with a temporary code.
            self._relay_spent = True
            code = 421 if greeting.code < 500 else 554
            await self.send(_reply(code, f"{self.settings.hostname} downstream said: {greeting}"))
            return False
        return True

    async def protocol_error(self, code: int, text: str) -> None:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            await self.send(_reply(421, "4.7.0 Error: too many errors"))
            self._closing = True
            return
        await self.send(_reply(code, text))

    async def dispatch(self, line: bytes) -> None:
        if self.settings.debugtrace:
            log.info("client=%s > %r", self.peer, line)
        verb, _, arg = line.partition(b" ")
        name = verb.upper().decode("ascii", "replace")
        handler = self._COMMANDS.get(name)
        if handler is None:
            await self.protocol_error(500, "5.5.2 Error: command not recognized")
            return
        try:
            await handler(self, line, arg.strip())
        except DownstreamError as exc:
            await self.downstream_failed(exc)

    # -- commands -------------------------------------------------------------------------

    async def cmd_ehlo(self, line: bytes, arg: bytes) -> None:
        if not arg:
            await self.protocol_error(501, "5.5.4 Syntax: EHLO hostname")
            return
        name = arg.decode("utf-8", "surrogateescape")
        reply = await self.downstream(lambda relay: relay.ehlo(name))
        if reply.code != 250:
            await self.send_reply(reply)
            return
        self.helo = arg.decode("utf-8", "replace")
        self.extended = True
        self.reset_transaction()
        lines = [self.settings.hostname, "PIPELINING"]
        size_limit = self._size_limit()
        lines.append(f"SIZE {size_limit}" if size_limit else "SIZE")
        for ext in RELAYED_EXTENSIONS:
            if self.relay.supports(ext):
                params = self.relay.extensions[ext]
                lines.append(f"{ext} {params}".rstrip())
        await self.send_reply(Reply(250, tuple(lines)))

    def _size_limit(self) -> int:
        """Offer the smaller of our limit and the downstream's SIZE (0 means no limit)."""
        ours = self.settings.max_message_size
        theirs_text = self.relay.extensions.get("SIZE", "")
        theirs = int(theirs_text) if theirs_text.isdigit() else 0
        limits = [value for value in (ours, theirs) if value > 0]
        return min(limits) if limits else 0

    async def cmd_helo(self, line: bytes, arg: bytes) -> None:
        if not arg:
            await self.protocol_error(501, "5.5.4 Syntax: HELO hostname")
            return
        reply = await self.downstream(lambda relay: relay.command(b"HELO " + arg))
        if reply.code == 250:
            self.helo = arg.decode("utf-8", "replace")
            self.extended = False
            self.relay.extensions = {}
            self.reset_transaction()
        await self.send_reply(reply)

    async def cmd_mail(self, line: bytes, arg: bytes) -> None:
        if self.envelope.mail_from is not None:
            await self.protocol_error(503, "5.5.1 Error: nested MAIL command")
            return
        match = _MAIL_FROM.match(line)
        if match is None:
            await self.protocol_error(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        if match.group(2).strip() and not self.extended:
            await self.protocol_error(501, "5.5.4 Error: MAIL parameters need EHLO")
            return
        # RFC 2920: RCPT commands the client pipelined behind MAIL go downstream in the same
        # write when the downstream pipelines too; each still gets the downstream's own reply
        # (if MAIL fails there, the downstream itself answers the RCPTs with 503).
        lines = [line]
        if self.relay.supports("PIPELINING"):
            lines += self.stream.take_buffered_lines(b"RCPT ", MAX_PIPELINED_RCPTS)
            if self.settings.debugtrace:
                for extra in lines[1:]:
                    log.info("client=%s > %r", self.peer, extra)
        replies = await self.downstream(lambda relay: relay.pipeline(lines))
        if replies[0].code == 250:
            self.envelope.mail_from = _address(match.group(1))
            self.envelope.mail_line = line
            self.envelope.helo = self.helo
        await self.send_reply(replies[0])
        for rcpt_line, reply in zip(lines[1:], replies[1:], strict=True):
            self._record_rcpt(rcpt_line, reply)
            await self.send_reply(reply)

    async def cmd_rcpt(self, line: bytes, arg: bytes) -> None:
        if self.envelope.mail_from is None:
            await self.protocol_error(503, "5.5.1 Error: need MAIL command")
            return
        if _RCPT_TO.match(line) is None:
            await self.protocol_error(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        reply = await self.relay.command(line)
        self._record_rcpt(line, reply)
        await self.send_reply(reply)

    def _record_rcpt(self, line: bytes, reply: Reply) -> None:
        match = _RCPT_TO.match(line)
        if match is not None and reply.code in (250, 251):
            self.accepted_rcpts += 1
            self.envelope.rcpt_to.append(_address(match.group(1)))

    async def cmd_data(self, line: bytes, arg: bytes) -> None:
        if arg:
            await self.protocol_error(501, "5.5.4 Syntax: DATA")
            return
        if self.envelope.mail_from is None:
            await self.protocol_error(503, "5.5.1 Error: need MAIL command")
            return
        if not self.accepted_rcpts:
            await self.protocol_error(554, "5.5.1 Error: no valid recipients")
            return
        await self.send(_reply(354, "End data with <CR><LF>.<CR><LF>"))
        started = time.monotonic()
        spool = await self.stream.read_data(self.settings.max_message_size)
        envelope = self.envelope
        if spool is None:
            await self._abort_transaction()
            log.info("from=<%s> rejected: message exceeds %d bytes",
                     envelope.mail_from, self.settings.max_message_size)  # fmt: skip
            await self.send(_reply(552, "5.3.4 Error: message too big"))
            return
        with spool:
            await self._deliver(spool, envelope, started)

    async def _deliver(self, spool: Spool, envelope: Envelope, started: float) -> None:
        """Process the received message and relay it, or refuse it; answer the client."""
        try:
            outcome = await self.processor(spool.buffer(), envelope)
        except Exception:
            log.exception("from=<%s> processing failed", envelope.mail_from)
            outcome = Outcome(reject=local_reply(451, "4.3.0 Error: internal processing error"),
                              summary="processing failed")  # fmt: skip
        finally:
            spool.release()
        if outcome.reject is not None:
            await self._abort_transaction()
            self._log_message(envelope, outcome, outcome.reject, started)
            await self.send_reply(outcome.reject)
            return
        try:
            reply = await self.relay.send_message(self.assembler(spool, outcome))
        except DownstreamError as exc:
            self._log_message(envelope, outcome, local_reply(421, f"downstream failed: {exc}"),
                              started)  # fmt: skip
            raise
        self._log_message(envelope, outcome, reply, started)
        self.reset_transaction()
        await self.send_reply(reply)

    async def _abort_transaction(self) -> None:
        """Undo MAIL/RCPT downstream after refusing a message ourselves."""
        self.reset_transaction()
        reply = await self.relay.command(b"RSET")
        if reply.code != 250:
            raise DownstreamError(f"RSET refused by downstream: {reply}")

    def _log_message(
        self, envelope: Envelope, outcome: Outcome, reply: Reply, started: float
    ) -> None:
        elapsed_ms = (time.monotonic() - started) * 1000
        log.info(
            "client=%s from=<%s> rcpts=%d %s relay=%r time=%.1fms",
            envelope.client_address, envelope.mail_from, len(envelope.rcpt_to),
            outcome.summary, str(reply), elapsed_ms,
        )  # fmt: skip

    async def cmd_rset(self, line: bytes, arg: bytes) -> None:
        self.reset_transaction()
        await self.send_reply(await self.downstream(lambda relay: relay.command(b"RSET")))

    async def cmd_noop(self, line: bytes, arg: bytes) -> None:
        await self.send(_reply(250, "2.0.0 Ok"))

    async def cmd_quit(self, line: bytes, arg: bytes) -> None:
        await self.send(_reply(221, "2.0.0 Bye"))
        self._closing = True  # the downstream session goes back to the pool in run()

    async def cmd_xforward(self, line: bytes, arg: bytes) -> None:
        if not self.relay.supports("XFORWARD"):
            await self.protocol_error(502, "5.5.1 Error: XFORWARD not supported")
            return
        reply = await self.downstream(lambda relay: relay.command(line))
        if reply.code == 250:
            for item in arg.decode("utf-8", "replace").split():
                key, _, value = item.partition("=")
                self.envelope.xforward[key.upper()] = value
        await self.send_reply(reply)

    async def cmd_vrfy(self, line: bytes, arg: bytes) -> None:
        await self.send(_reply(502, "5.5.1 VRFY command is disabled"))

    async def cmd_help(self, line: bytes, arg: bytes) -> None:
        await self.send(_reply(214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT"))

    async def cmd_not_implemented(self, line: bytes, arg: bytes) -> None:
        await self.protocol_error(502, "5.5.1 Error: command not implemented")

    _COMMANDS: dict[str, Callable[[SmtpSession, bytes, bytes], Awaitable[None]]] = {
        "EHLO": cmd_ehlo,
        "HELO": cmd_helo,
        "MAIL": cmd_mail,
        "RCPT": cmd_rcpt,
        "DATA": cmd_data,
        "RSET": cmd_rset,
        "NOOP": cmd_noop,
        "QUIT": cmd_quit,
        "XFORWARD": cmd_xforward,
        "VRFY": cmd_vrfy,
        "EXPN": cmd_vrfy,
        "HELP": cmd_help,
        "STARTTLS": cmd_not_implemented,
        "AUTH": cmd_not_implemented,
        "BDAT": cmd_not_implemented,
        "ETRN": cmd_not_implemented,
        "TURN": cmd_not_implemented,
    }
