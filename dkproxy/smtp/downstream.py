"""The downstream side: an aiosmtplib session per upstream session, and the idle-session pool.

A transparent proxy forwards each MAIL, RCPT, RSET and XFORWARD line exactly as the upstream
client wrote it (ENVID and ORCPT values are case-sensitive xtext, RFC 3461) and hands back the
downstream's own reply, line by line, for every command. aiosmtplib does both: its
`SMTP.execute_command` sends a line verbatim and returns the server's `SMTPResponse`. This module
is the thin adapter over it: replies as `Reply`, every failure as `DownstreamError` with a kind,
DATA streamed from the spool, and the pool that keeps sessions between upstream sessions.

Non-public aiosmtplib interfaces relied on (checked with aiosmtplib 5.1.3, pinned <5.2 in
pyproject.toml), all for streaming DATA without holding the message twice in memory:
`SMTP.protocol` (an `SMTPProtocol`), `SMTPProtocol.write()`, `SMTPProtocol.read_response()`,
`SMTPProtocol._drain_helper()` (flow control) and `SMTPProtocol._response_pending` (the
protocol drops reply bytes that arrive while no reply is expected). `SMTP.data()` would
normalise line ends and dot-stuff the whole message in one bytes object instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiosmtplib

log = logging.getLogger("dkproxy.downstream")

#: aiosmtplib refuses these in a command argument (CR, LF and NUL would inject commands).
CONTROL_OCTETS = frozenset(range(0x20)) | {0x7F}


class DownstreamError(Exception):
    """The downstream server could not be reached, timed out, closed or spoke nonsense.

    `kind` names the failure for logs and metrics: "connect", "timeout", "closed", "protocol".
    """

    def __init__(self, message: str, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: its code and the text of each line (without code and separator)."""

    code: int
    lines: tuple[str, ...]

    @classmethod
    def from_response(cls, response: aiosmtplib.SMTPResponse) -> Reply:
        """aiosmtplib joins the lines of a multi-line reply with "\\n"; split them again."""
        return cls(response.code, tuple(response.message.split("\n")))

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def render(self) -> bytes:
        """Wire form, as the downstream sent it (multi-line replies stay multi-line)."""
        lines = self.lines or ("",)
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n" if lines[-1] else f"{self.code}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def local_reply(code: int, text: str) -> Reply:
    return Reply(code, (text,))


Bytes = bytes | bytearray | memoryview | mmap.mmap
#: Message data is written in pieces of this size, so a large message is never copied whole.
WRITE_CHUNK = 256 * 1024


class Chunked(Protocol):
    """A part of a message too large to hold at once (a spool file), read piece by piece."""

    def chunks(self, size: int = ...) -> Iterator[Bytes]: ...


Part = Bytes | Chunked


def _pieces(parts: Sequence[Part], chunk: int) -> Iterator[bytes]:
    for part in parts:
        blocks = part.chunks(chunk) if hasattr(part, "chunks") else (part,)
        for block in blocks:
            if len(block) <= chunk and isinstance(block, bytes):
                yield block
                continue
            view = memoryview(block)  # type: ignore[arg-type]
            for position in range(0, len(view), chunk):
                yield bytes(view[position : position + chunk])


def dot_stuffed(parts: Sequence[Part], chunk: int = WRITE_CHUNK) -> Iterator[bytes]:
    """The parts as DATA content: SMTP transparency (RFC 5321 4.5.2), a final CRLF if the
    content lacks one, and the terminating dot line."""
    line_start = True
    carry = b""  # a CR at the end of a piece waits for the next: "\r\n." must not be split
    for piece in _pieces(parts, chunk):
        if carry:
            piece, carry = carry + piece, b""
        if piece.endswith(b"\r"):
            piece, carry = piece[:-1], b"\r"
        if not piece:
            continue
        stuffed = piece.replace(b"\r\n.", b"\r\n..")
        if line_start and piece.startswith(b"."):
            stuffed = b"." + stuffed
        line_start = piece.endswith(b"\r\n")
        yield stuffed
    if carry:
        yield carry
        line_start = False
    yield b".\r\n" if line_start else b"\r\n.\r\n"


@dataclass(frozen=True)
class DownstreamSettings:
    """Where and how to reach the downstream server.

    `timeout` (seconds) bounds every reply, `connect_timeout` the TCP connect and greeting.
    `client_options` go to `aiosmtplib.SMTP` unchanged: `use_tls`, `start_tls`,
    `validate_certs`, `cert_bundle`, `tls_context`, `client_cert`, `client_key`, `username`,
    `password` (a smarthost). With the default `start_tls=False` nothing but the upstream's
    own commands is sent, so the downstream sees the upstream's EHLO name.
    """

    host: str
    port: int
    timeout: float = 300.0
    connect_timeout: float = 30.0
    local_hostname: str = "localhost"
    client_options: Mapping[str, Any] = field(default_factory=dict)


def _error(exc: BaseException, doing: str) -> DownstreamError:
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return DownstreamError(f"downstream did not answer {doing}", "timeout")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return DownstreamError(f"cannot connect: {exc}", "connect")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError | OSError):
        return DownstreamError(f"downstream connection lost {doing}: {exc}", "closed")
    return DownstreamError(f"downstream failed {doing}: {exc}", "protocol")


class Downstream:
    """One SMTP session with the downstream server, over `aiosmtplib.SMTP`."""

    def __init__(self, settings: DownstreamSettings) -> None:
        self.settings = settings
        self.client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            timeout=settings.timeout,
            local_hostname=settings.local_hostname,
            **{"start_tls": False, **settings.client_options},
        )
        #: ESMTP keywords (upper case) and their parameters from the last EHLO reply.
        self.extensions: dict[str, str] = {}
        #: A command went unanswered for `settings.timeout` seconds (the session is closed).
        self.expired = False
        #: The name of the last EHLO this session answered with 250, and that reply.
        self._greeted: tuple[bytes, Reply] | None = None

    @property
    def connected(self) -> bool:
        """Open, as far as we can tell without a round trip (the peer has not closed)."""
        return self.client.is_connected

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    async def connect(self) -> Reply:
        """Open the connection and read the greeting; a 4xx/5xx greeting is returned, not
        raised. DownstreamError when the server cannot be reached."""
        try:
            # asyncio.timeout, not the client's (asyncio.wait_for, which on Python 3.11 drops
            # a cancellation that lands as the greeting arrives: the upstream session would
            # then go on with its client gone; see Listener.handle_exception).
            async with asyncio.timeout(self.settings.connect_timeout):
                response = await self.client.connect(timeout=None)
            return Reply.from_response(response)
        except aiosmtplib.SMTPConnectResponseError as exc:
            return Reply(exc.code, tuple(exc.message.split("\n")))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise _error(exc, "at connect") from exc

    async def command(self, line: bytes) -> Reply:
        """Send one command line (without CRLF) verbatim and return the server's reply.

        ValueError if the line holds a control octet (the caller answers 501 before that);
        DownstreamError when the server times out, closes or sends a malformed reply.
        """
        # The reply is awaited under one timer that closes the connection when it fires,
        # not under the client's own timeout (asyncio.wait_for: a future and a callback more
        # per reply, and on Python 3.11 it drops a cancellation that lands as the reply
        # arrives) nor asyncio.timeout (a context object and a task look-up per command,
        # four commands a message): a timeout discards the session either way.
        timer = asyncio.get_running_loop().call_later(self.settings.timeout, self._expire)
        try:
            response = await self.client.execute_command(line, timeout=None)
        except aiosmtplib.SMTPResponseException as exc:
            self.discard()  # the reply could not be parsed: the session is out of step
            raise DownstreamError(f"malformed reply from downstream: {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.discard()
            doing = f"to {line.split(b' ', 1)[0].decode('ascii', 'replace')}"
            raise _error(TimeoutError() if self.expired else exc, doing) from exc
        finally:
            timer.cancel()
        return Reply.from_response(response)

    def _expire(self) -> None:
        """No reply within the timeout: end the session, which fails the waiting command."""
        self.expired = True
        transport = self.client.transport
        if transport is not None:
            transport.abort()  # (close() would first wait for unsent data to go out)
        self.discard()

    async def ehlo(self, name: bytes) -> Reply:
        """EHLO with the upstream's name, falling back to HELO when the server does not speak
        ESMTP (RFC 5321 3.2); records the extensions offered.

        A session that already greeted with this very name (a pooled one, taken by the next
        upstream session of the same client, e.g. Postfix's content filter transport, whose
        name never changes) is reset with RSET instead, as Postfix's own connection cache
        does: the downstream ends up in the same state (RFC 5321 4.1.1.1 and 4.1.1.5: both
        clear the transaction; XFORWARD attributes end with it) for less work on both sides,
        and the EHLO reply it gave is still the one in force. DownstreamError as `command`.
        """
        if self._greeted is not None and self._greeted[0] == name:
            reset = await self.command(b"RSET")
            if reset.code == 250:
                return self._greeted[1]
        self._greeted = None
        reply = await self.command(b"EHLO " + name)
        self.extensions = {}
        if reply.code == 250:
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
            self._greeted = (name, reply)
            return reply
        if reply.code in (500, 501, 502, 504):
            return await self.command(b"HELO " + name)
        return reply

    async def helo(self, name: bytes) -> Reply:
        self.extensions = {}
        self._greeted = None
        return await self.command(b"HELO " + name)

    async def send_message(self, parts: Sequence[Part]) -> Reply:
        """DATA, the message (the parts in order, dot-stuffed), and the final reply, or the
        refusal of DATA itself. Written a piece at a time through the client's protocol,
        waiting whenever the socket's buffer fills, so memory stays bounded however large
        the message (see the module docstring for the interfaces used)."""
        reply = await self.command(b"DATA")
        if reply.code != 354:
            return reply
        protocol = self.client.protocol
        if protocol is None:
            raise DownstreamError("downstream connection lost after DATA", "closed")
        timeout = self.settings.timeout
        try:
            # The final reply may arrive while pieces are still being written (a server
            # that gives up early): keep the protocol expecting it.
            protocol._response_pending = True
            batch: list[bytes] = []
            batched = 0
            for piece in dot_stuffed(parts):
                # Small pieces (our header fields, a small message, the final dot) go out
                # in one write: every write is a system call.
                batch.append(piece)
                batched += len(piece)
                if batched < WRITE_CHUNK:
                    continue
                protocol.write(b"".join(batch) if len(batch) > 1 else batch[0])
                batch, batched = [], 0
                transport = protocol.transport
                if transport is not None and transport.get_write_buffer_size() > WRITE_CHUNK:
                    async with asyncio.timeout(timeout):
                        await protocol._drain_helper()
            if batch:
                protocol.write(b"".join(batch))
            async with asyncio.timeout(timeout):  # (not wait_for: see command())
                response = await protocol.read_response(timeout=None)
        except aiosmtplib.SMTPResponseException as exc:
            self.discard()
            raise DownstreamError(f"malformed reply from downstream: {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.discard()
            raise _error(exc, "to the message") from exc
        return Reply.from_response(response)

    async def quit(self) -> None:
        """Polite QUIT; any failure just closes the socket."""
        if self.connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await self.client.execute_command(b"QUIT", timeout=5)
        self.discard()

    def discard(self) -> None:
        """Drop the connection without waiting (an expired, dead or out-of-step session)."""
        self.client.close()


class PoolPressure:
    """A flag shared by all workers: "the downstream is short of sessions, give idle ones back".

    The downstream counts our idle sessions against its own limits (Postfix's re-injection
    smtpd allows a few processes): one worker's idle sessions can starve another worker's new
    one. A worker whose connect is slow sets the flag; every worker then closes its idle
    sessions. The flag is a deadline in CLOCK_MONOTONIC seconds (system-wide on Linux) in
    anonymous shared memory created before the workers fork.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, 8)

    def raise_for(self, seconds: float) -> None:
        self._map[:8] = int((time.monotonic() + seconds) * 1000).to_bytes(8, "little")

    @property
    def active(self) -> bool:
        return int.from_bytes(self._map[:8], "little") / 1000 > time.monotonic()


class DownstreamPool:
    """Idle downstream sessions kept for the next upstream session (per worker process).

    Reusing a session saves the TCP handshake, the greeting and QUIT for every message when
    the upstream opens one connection per message, as Postfix's content filter transport and
    smtp-source do. A session is pooled only between transactions; the next user re-sends
    EHLO, or RSET when its EHLO name is the one the session already greeted with (either
    resets the session and proves it alive), and falls back to a fresh connection if the
    pooled one died while idle.

    Idle sessions count against the downstream's limits, so the pool holds few and briefly:
    at most as many as were in use at once during the last `max_idle` seconds (2 s, as
    Postfix's own connection cache), and none while any worker reports a slow connect
    (`PoolPressure`): a connect whose greeting takes longer than `slow_connect` seconds first
    gives this worker's idle sessions back and raises the flag for the others.
    """

    def __init__(
        self,
        settings: DownstreamSettings,
        size: int = 32,
        max_idle: float = 2.0,
        slow_connect: float = 0.2,
        pressure: PoolPressure | None = None,
    ) -> None:
        self.settings = settings
        self.size = size
        self.max_idle = max_idle
        self.slow_connect = slow_connect
        self.pressure = pressure or PoolPressure()
        self._idle: list[tuple[float, Downstream]] = []
        self.in_use = 0
        self._peak = 0
        self._peak_since = 0.0
        self._closing: set[asyncio.Task[None]] = set()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _note_use(self) -> None:
        now = self._now()
        if now - self._peak_since > self.max_idle:
            self._peak, self._peak_since = self.in_use, now
        self._peak = max(self._peak, self.in_use)

    def take(self) -> Downstream | None:
        """An idle session that still looks alive, or None; counts it as in use."""
        now = self._now()
        while self._idle:
            since, client = self._idle.pop()
            if client.connected and now - since < self.max_idle:
                self.in_use += 1
                self._note_use()
                return client
            client.discard()
        return None

    async def open(self) -> tuple[Downstream, Reply]:
        """A new session and its greeting; counts it as in use (give it back or end it).

        DownstreamError when the server cannot be reached (nothing is counted then).
        """
        client = Downstream(self.settings)
        loop = asyncio.get_running_loop()
        slow = loop.call_later(self.slow_connect, self._connect_is_slow)
        try:
            greeting = await client.connect()
        except DownstreamError:
            self._connect_is_slow()
            raise
        finally:
            slow.cancel()
        if greeting.code != 220:
            self._connect_is_slow()
        self.in_use += 1
        self._note_use()
        return client, greeting

    def _connect_is_slow(self) -> None:
        """The downstream is short of sessions (or down): idle ones go back, everywhere."""
        self.pressure.raise_for(self.max_idle)
        self.release_idle()

    def give_back(self, client: Downstream, reusable: bool) -> None:
        """End the use of a session: keep it idle if `reusable` and wanted, else QUIT it."""
        self._note_use()  # it was in use until now
        self.in_use -= 1
        now = self._now()
        wanted = min(self.size, self._peak if now - self._peak_since <= self.max_idle else 0)
        if (
            reusable
            and client.connected
            and len(self._idle) + self.in_use < wanted
            and not self.pressure.active
        ):
            self._idle.append((now, client))
            return
        self._quit(client)

    def _quit(self, client: Downstream) -> None:
        task = asyncio.get_running_loop().create_task(client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def release_idle(self) -> None:
        idle, self._idle = self._idle, []
        for _since, client in idle:
            self._quit(client)

    def expire(self) -> None:
        """QUIT sessions idle for max_idle (before the downstream times them out and logs a
        timeout for each, as Postfix's smtpd does), and all of them under pressure."""
        if self.pressure.active:
            self.release_idle()
            return
        now = self._now()
        expired = [c for since, c in self._idle if now - since >= self.max_idle]
        self._idle = [(since, c) for since, c in self._idle if now - since < self.max_idle]
        for client in expired:
            self._quit(client)

    async def close(self) -> None:
        self.release_idle()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)
