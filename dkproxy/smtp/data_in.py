"""DATA from the upstream client into the spool (RFC 5321 4.1.1.4, 4.5.2).

The message is taken from the stream as it arrives, a line-aligned piece at a time, never as
a list of lines: line ends made CRLF as Postfix stores them, dot-stuffing undone, lines over
998 characters broken as Postfix's smtp client sends them on, the size limit enforced while
reading. Only CRLF.CRLF ends the data (a dot line after a bare LF is content: treating it as
the end is what SMTP smuggling exploits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from dkproxy.smtp.lines import LINE_LENGTH_LIMIT, break_long_lines, wire_line_ends
from dkproxy.smtp.spool import Spool

#: How much DATA is taken from the stream at a time at most, and the size of the pieces a
#: line longer than this without a line end is stored in. Bounded because every session
#: holds its unfinished piece between reads: a hundred clients sending at once must not
#: each keep what the socket had delivered (up to a few hundred KB).
SCAN_CHUNK = 1 << 16


class ClientGone(Exception):
    """The upstream client closed the connection in the middle of DATA."""


def data_piece(piece: bytes, line_start: bool) -> bytes:
    """One line-aligned piece of DATA as it goes into the spool: line ends made CRLF, the
    dot-stuffing undone (RFC 5321 4.5.2). `line_start`: the piece begins a line.

    Bare LF, bare CR, CR CR LF ...: rewritten as Postfix stores them (`wire_line_ends`), so
    what we sign is what arrives (a dot after a bare LF is stuffing, as Postfix reads it).
    This is the one place DATA content is normalised.
    """
    piece = wire_line_ends(piece)
    if line_start and piece.startswith(b"."):
        piece = piece[1:]
    return piece.replace(b"\r\n.", b"\r\n")


def lines_within_limit(content: bytes) -> bool:
    """True when `content` (CRLF lines from a line start, ending in a line end) has no line
    over LINE_LENGTH_LIMIT characters: what `break_long_lines` would leave unchanged.

    Looks for the last LF within each next 1000 octets instead of splitting the piece into
    lines (a line of at most 998 characters and its CRLF fit in 1000), so a piece of short
    lines costs one search per kilobyte, not an object per line.
    """
    if not content.endswith(b"\n"):
        return False
    span = LINE_LENGTH_LIMIT + 2
    start, size = 0, len(content)
    while size - start > span:
        last = content.rfind(b"\n", start, start + span)
        if last < 0:
            return False
        start = last + 1
    return True


async def receive_message(
    fill: Callable[[], Awaitable[bytes]],
    reader: asyncio.StreamReader,
    spool: Spool,
    max_size: int,
) -> tuple[bool, OSError | None]:
    """The message up to CRLF.CRLF into `spool`, a line-aligned piece at a time through
    `data_piece`. `fill()` returns what has arrived from the client (waiting if nothing has;
    ClientGone at EOF); `max_size` in octets, 0 for no limit.

    Returns (kept, spool_error): kept is False when the message exceeded max_size or the spool
    failed with spool_error (the rest is read and dropped). Whatever the client pipelined
    after the terminating dot goes back into `reader` for the command loop.
    """
    spool_error: OSError | None = None
    buf = bytearray()
    kept = True
    after_crlf = True  # buf begins right after a CRLF (or at the start of DATA)
    line_start = True  # ... or after a bare LF, which also starts a line
    column = 0  # characters of the current (stored) line in earlier pieces
    while True:
        while len(buf) < 3:
            buf += await fill()
        if after_crlf and buf.startswith(b".\r\n"):
            del buf[:3]
            break
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            cut, consumed = end + 2, end + 5
        else:
            # Take whole lines only: a piece must end at a line end for unstuffing.
            last = buf.rfind(b"\r\n")
            if last < 0:
                if len(buf) < SCAN_CHUNK:
                    buf += await fill()
                    continue
                # One very long line: split it anywhere but inside a run of CRs (they
                # may end in the LF that makes them one line end, see wire_line_ends).
                cut = len(buf) - 1
                while cut > 1 and buf[cut - 1] == 0x0D:
                    cut -= 1
                consumed = cut
            else:
                cut = consumed = last + 2
        if kept:
            # Lines over 998 characters: broken as Postfix's smtp client sends them on.
            stored = data_piece(bytes(buf[:cut]), line_start)
            if column or not lines_within_limit(stored):
                stored, column = break_long_lines(stored, column)
            try:
                spool.write(stored)
            except OSError as exc:  # the spool directory is full or unusable
                spool_error = exc
                spool.close()  # keep reading to the end, keep nothing
                kept = False
            if max_size and len(spool) > max_size:
                spool.close()  # keep reading to the end, keep nothing
                kept = False
        after_crlf = buf[cut - 2 : cut] == b"\r\n"
        line_start = buf[cut - 1 : cut] == b"\n"
        if end >= 0:
            del buf[:consumed]
            break
        # A new buffer for the rest (a line's start, at most SCAN_CHUNK): del buf[:n] would
        # keep the old one's allocation for as long as the session waits for the next read.
        buf = buf[consumed:] if consumed < len(buf) else bytearray(await fill())
    if buf and not reader.at_eof():
        # Pipelined commands after the dot go back for the command loop, before what the
        # stream still holds (reads are bounded). StreamReader has no "unread": its buffer
        # (a bytearray, non-public) is prepended to, as the listener's docstring notes.
        reader._buffer[:0] = buf  # type: ignore[attr-defined]
    return kept, spool_error
