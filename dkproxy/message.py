"""The message as it crossed the SMTP DATA phase, split into header fields and body.

The proxy never rewrites a message: it only prepends header fields. So this class keeps the
original bytes and records where each header field and the body start; signers read from it,
and the relay sends our fields followed by these same bytes. Parsing touches the header block
only, and the body is handed out as a memoryview and in line-aligned chunks, so a 20 MB
attachment is never copied as a whole.
"""

from __future__ import annotations

import functools
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import getaddresses

#: What a message can be read from: memory, or a spool file's read-only mmap.
Buffer = bytes | bytearray | mmap.mmap

#: Body chunk size for canonicalization: large enough that per-chunk overhead is noise,
#: small enough that the transient copies of a 20 MB message stay small.
BODY_CHUNK = 256 * 1024

#: A header field name per RFC 5322: printable US-ASCII except colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
#: Characters we accept in an address used as a key-selection input or macro value.
_SAFE_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9.\-]+")


class MessageFormatError(ValueError):
    """The header block cannot be parsed into fields; signing is not possible."""


@dataclass(frozen=True)
class Address:
    """A mailbox taken from a header; `domain` is lower-case, without a trailing dot."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


class Message:
    """An RFC 5322 message in wire form (CRLF line ends, dot-stuffing already undone).

    `headers` uses dkimpy's representation, a list of `[name, value]` where `value` is
    everything after the colon including folding and the final CRLF, so the list can be
    handed to dkimpy's canonicalization unchanged.
    """

    __slots__ = ("_body_bytes", "body_offset", "data", "header_end", "headers")

    def __init__(self, data: Buffer) -> None:
        self.data = data
        self.headers: list[list[bytes]] = []
        self._body_bytes: bytes | None = None
        self.header_end, self.body_offset = _find_header_end(data)
        self._parse_headers(bytes(data[: self.header_end]))

    def _parse_headers(self, block: bytes) -> None:
        if not block:
            return
        lines = block.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for index, line in enumerate(lines):
            if line[:1] in (b" ", b"\t"):
                if not self.headers:
                    raise MessageFormatError("header block starts with a continuation line")
                self.headers[-1][1] += line + b"\r\n"
                continue
            colon = line.find(b":")
            name = line[:colon] if colon > 0 else b""
            # RFC 5322 4.5 (obsolete syntax) allows white space between name and colon.
            if colon <= 0 or not _FIELD_NAME.fullmatch(name.rstrip(b" \t")):
                if index == 0 and line.startswith(b"From "):
                    continue  # an mbox envelope line; not a header field
                shown = line[:60].decode("ascii", "replace")
                raise MessageFormatError(f"malformed header line {index + 1}: {shown!r}")
            self.headers.append([name, line[colon + 1 :] + b"\r\n"])

    @property
    def body(self) -> memoryview:
        """The body after the empty separator line (empty when there is none), not copied."""
        return memoryview(self.data)[self.body_offset :]

    def body_bytes(self) -> bytes:
        """The body as one bytes object (made once), for code that needs it whole (dkimpy)."""
        if self._body_bytes is None:
            self._body_bytes = bytes(self.body)
        return self._body_bytes

    def body_chunks(self, size: int = BODY_CHUNK) -> Iterator[bytes]:
        """The body in pieces of about `size` bytes, each cut just after a CRLF.

        Canonicalizations work line by line, so they can run on these pieces one at a time
        (only the last piece may lack its final CRLF, or end in bare LFs); a single line
        longer than `size` is never split.
        """
        data = self.data
        position = self.body_offset
        end = len(data)
        while position < end:
            limit = position + size
            if limit >= end:
                cut = end
            else:
                cut = data.rfind(b"\r\n", position, limit)
                if cut < 0:
                    cut = data.find(b"\r\n", limit)
                cut = end if cut < 0 else cut + 2
                # A bare LF right after the cut stays with this piece: canonicalizations that
                # look at the byte before an LF (DomainKeys nofws) must see the CRLF before it.
                while cut < end and data[cut] == 0x0A:
                    cut += 1
            yield bytes(data[position:cut])
            position = cut

    @property
    def has_separator(self) -> bool:
        return self.body_offset > self.header_end

    def get_all(self, name: str) -> list[bytes]:
        """Values of every field called `name` (case-insensitive), unfolded and stripped."""
        wanted = name.lower().encode("ascii")
        return [
            _UNFOLD.sub(b"", value).strip()
            for field_name, value in self.headers
            if field_name.rstrip(b" \t").lower() == wanted
        ]

    def get_last(self, name: str) -> str | None:
        """The last occurrence wins, as in Mail::DKIM and DKIMproxy."""
        values = self.get_all(name)
        return values[-1].decode("utf-8", "replace") if values else None

    def sender(self) -> Address | None:
        """The address whose domain decides the signing key: Sender header, else From."""
        for name in ("sender", "from"):
            value = self.get_last(name)
            if value is None:
                continue
            address = first_address(value)
            if address is not None:
                return address
        return None

    def list_id(self) -> str | None:
        """The List-Id identifier (the part in angle brackets), lower-cased."""
        value = self.get_last("list-id")
        if value is None:
            return None
        match = re.search(r"<([^<>\s]+)>", value)
        return (match.group(1) if match else value.strip()).lower() or None

    def message_id(self) -> str | None:
        return self.get_last("message-id")


def _find_header_end(data: Buffer) -> tuple[int, int]:
    """Return (end of header block, start of body).

    The header block ends after the CRLF of the last header line; the body starts after the
    empty line. A message with no empty line is all header and has no body.
    """
    if data[:2] == b"\r\n":
        return 0, 2
    separator = data.find(b"\r\n\r\n")
    if separator < 0:
        return len(data), len(data)
    return separator + 2, separator + 4


@functools.lru_cache(maxsize=1024)  # pure; email.utils parses char by char (~30 us a field)
def first_address(value: str) -> Address | None:
    """The first syntactically safe mailbox of a header value, or None."""
    for _display, addr in getaddresses([value]):
        addr = addr.strip()
        if not _SAFE_ADDRESS.fullmatch(addr):
            continue
        local, _, domain = addr.rpartition("@")
        domain = domain.rstrip(".").lower()
        if local and domain and ".." not in domain and not domain.startswith("."):
            return Address(local=local, domain=domain)
    return None
