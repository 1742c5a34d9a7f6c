"""The downstream SMTP client: relays commands verbatim and returns the server's own replies.

Why not aiosmtplib: a transparent proxy must forward each command line exactly as the
upstream client wrote it (ENVID and ORCPT values are case-sensitive xtext) and hand back the
downstream's reply lines unchanged, including multi-line replies, for every recipient. That is
a thin layer over a stream, so this module is one: it knows only how to read a reply, write a
command (or a pipelined group of them) and transfer a message with dot-stuffing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

#: RFC 5321 4.5.3.1.5 allows 512; real servers send longer lines, so be tolerant.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 200


class DownstreamError(Exception):
    """The downstream server could not be reached, timed out, closed or spoke nonsense."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: its code and the text of each line (without code and separator)."""

    code: int
    lines: tuple[str, ...]

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


Bytes = bytes | bytearray | memoryview
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


class RelayClient:
    """One SMTP session with the downstream server."""

    def __init__(self, host: str, port: int, timeout: float = 300.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        """Open, as far as we can tell without a round trip (the peer has not closed)."""
        return (
            self._writer is not None
            and not self._writer.is_closing()
            and self._reader is not None
            and not self._reader.at_eof()
        )

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    async def connect(self, connect_timeout: float = 30.0) -> Reply:
        """Open the connection and read the greeting (which may be a 4xx/5xx refusal)."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=MAX_REPLY_LINE * 4),
                connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise DownstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self.greeting = await self.read_reply()
        return self.greeting

    async def ehlo(self, name: str) -> Reply:
        """EHLO, falling back to HELO when the server does not speak ESMTP."""
        reply = await self.command(f"EHLO {name}".encode())
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
            return reply
        if reply.code in (500, 501, 502, 504):
            helo = await self.command(f"HELO {name}".encode())
            self.extensions = {}
            return helo
        return reply

    async def command(self, line: bytes) -> Reply:
        """Send one command line (without CRLF) and return its reply."""
        self._write(line + b"\r\n")
        return await self.read_reply()

    async def pipeline(self, lines: list[bytes]) -> list[Reply]:
        """Send several commands in one write (RFC 2920) and read their replies in order."""
        self._write(b"".join(line + b"\r\n" for line in lines))
        return [await self.read_reply() for _ in lines]

    async def send_message(self, parts: Sequence[Part]) -> Reply:
        """DATA, the message (the parts in order, dot-stuffed), and the final reply, or the
        refusal of DATA itself. Written a chunk at a time, waiting whenever the socket's
        buffer fills, so memory stays bounded however large the message."""
        reply = await self.command(b"DATA")
        if reply.code != 354:
            return reply
        writer = self._require_writer()
        try:
            for piece in dot_stuffed(parts):
                writer.write(piece)
                if writer.transport.get_write_buffer_size() > WRITE_CHUNK:
                    await asyncio.wait_for(writer.drain(), self.timeout)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise DownstreamError(f"writing message to downstream failed: {exc}") from exc
        return await self.read_reply()

    async def quit(self) -> None:
        """Polite QUIT; any failure just closes the socket."""
        if self.connected:
            with contextlib.suppress(DownstreamError, TimeoutError):
                await asyncio.wait_for(self.command(b"QUIT"), 5)
        await self.close()

    def discard(self) -> None:
        """Drop the connection without waiting (an expired or dead idle session)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _require_writer(self) -> asyncio.StreamWriter:
        if self._writer is None or self._writer.is_closing():
            raise DownstreamError("downstream connection is closed")
        return self._writer

    def _write(self, data: bytes) -> None:
        self._require_writer().write(data)

    async def read_reply(self) -> Reply:
        """Read one (possibly multi-line) reply; any failure closes and raises DownstreamError."""
        reader = self._reader
        if reader is None:
            raise DownstreamError("downstream connection is not open")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._read_reply(reader)
        except TimeoutError as exc:
            await self.close()
            raise DownstreamError(f"downstream did not answer within {self.timeout:g}s") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise DownstreamError(f"downstream connection lost: {exc!r}") from exc

    async def _read_reply(self, reader: asyncio.StreamReader) -> Reply:
        code: int | None = None
        lines: list[str] = []
        while True:
            raw = await reader.readuntil(b"\n")
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                await self.close()
                raise DownstreamError(f"malformed reply from downstream: {line[:80]!r}")
            this_code = int(line[:3])
            if code is None:
                code = this_code
            elif this_code != code:
                await self.close()
                raise DownstreamError("inconsistent codes in a multi-line reply")
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(code, tuple(lines))
            if len(lines) > MAX_REPLY_LINES:
                await self.close()
                raise DownstreamError("downstream reply has too many lines")


class RelayPool:
    """Idle downstream sessions kept for the next upstream session (per worker process).

    Reusing a session saves the TCP handshake, the greeting and QUIT for every message when
    the upstream opens one connection per message, as Postfix's content filter transport and
    smtp-source do. A session is pooled only between transactions; the next user re-sends
    EHLO (which resets the session and proves it alive) and falls back to a fresh connection
    if the pooled one died while idle.
    """

    def __init__(self, host: str, port: int, timeout: float, size: int = 32,
                 max_idle: float = 30.0) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.timeout = timeout
        self.size = size
        self.max_idle = max_idle
        self._idle: list[tuple[float, RelayClient]] = []

    def new_client(self) -> RelayClient:
        return RelayClient(self.host, self.port, self.timeout)

    def take(self) -> RelayClient | None:
        """An idle session that still looks alive, or None."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            since, client = self._idle.pop()
            if client.connected and now - since < self.max_idle:
                return client
            client.discard()
        return None

    def give_back(self, client: RelayClient) -> bool:
        """Keep a session that is between transactions; False if it was not kept."""
        if not client.connected or len(self._idle) >= self.size:
            return False
        self._idle.append((asyncio.get_running_loop().time(), client))
        return True

    async def expire(self) -> None:
        """QUIT sessions idle for max_idle, before the downstream times them out (and logs a
        timeout for each, as Postfix's smtpd does)."""
        now = asyncio.get_running_loop().time()
        keep = [(since, c) for since, c in self._idle if now - since < self.max_idle]
        expired = [c for since, c in self._idle if now - since >= self.max_idle]
        self._idle = keep
        for client in expired:
            await client.quit()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _since, client in idle:
            await client.quit()
