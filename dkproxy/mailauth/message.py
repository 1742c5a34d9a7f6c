"""The message as it crossed the SMTP DATA phase, split into header fields and body.

The proxy never rewrites a message: it only prepends header fields. So this class keeps the
original bytes and records where each header field and the body start; signers read from it,
and the relay sends our fields followed by these same bytes. Parsing touches the header block
only, and the body is handed out as a memoryview and in line-aligned chunks, so a 20 MB
attachment is never copied as a whole.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

from dkproxy.mailauth.addresses import Address, parse_mailboxes
from dkproxy.util.buffer import Buffer

#: Body chunk size for canonicalization: large enough that per-chunk overhead is noise,
#: small enough that the transient copies of a 20 MB message stay small.
BODY_CHUNK = 256 * 1024

#: A header field name per RFC 5322: printable US-ASCII except colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
#: Field names joined by CRLF (which no name can contain: the block was split at CRLFs), each
#: as found: white space before the colon allowed (RFC 5322 4.5).
_FIELD_NAMES = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*(?:\r\n[\x21-\x39\x3b-\x7e]+[ \t]*)*")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
_LIST_ID = re.compile(r"<([^<>\s]+)>")


class MessageFormatError(ValueError):
    """The header block cannot be parsed into fields; signing is not possible."""


class HeaderIndex:
    """The header block's field names, lower-cased once per message, and where each occurs.

    `lower` is each field's name lower-cased as found (trailing white space of the obsolete
    "Name :" syntax kept): how dkimpy counts DKIM-Signature fields. `keys` is the name
    lower-cased without that white space (RFC 6376 3.4.2; RFC 5322 4.5): what DKIM header
    selection (simple and relaxed), DomainKeys and lookups by name compare. It is the same
    list as `lower` when no name carries such white space, as in almost every message.
    `positions` maps a key to the indexes of its fields, top first, so that picking the
    bottom-most unused instance of a name (RFC 6376 5.4.2) is a list access rather than a
    scan of the header block.
    """

    __slots__ = ("_lower_positions", "keys", "lower", "positions")

    def __init__(self, headers: list[list[bytes]]) -> None:
        self.lower = [name.lower() for name, _value in headers]
        ends = b"\n".join(self.lower) + b"\n"
        if b" \n" in ends or b"\t\n" in ends:  # a name written with white space before ":"
            self.keys = [name.rstrip(b" \t") for name in self.lower]
        else:
            self.keys = self.lower
        positions: dict[bytes, list[int]] = {}
        for index, key in enumerate(self.keys):
            found = positions.get(key)
            if found is None:
                positions[key] = [index]
            else:
                found.append(index)
        self.positions = positions
        self._lower_positions: dict[bytes, list[int]] | None = (
            positions if self.keys is self.lower else None
        )

    def lower_positions(self) -> dict[bytes, list[int]]:
        """`positions` by the names in `lower` (white space before the colon kept)."""
        if self._lower_positions is None:
            found: dict[bytes, list[int]] = {}
            for index, name in enumerate(self.lower):
                found.setdefault(name, []).append(index)
            self._lower_positions = found
        return self._lower_positions


class Message:
    """An RFC 5322 message in wire form (CRLF line ends, dot-stuffing already undone).

    `headers` uses dkimpy's representation, a list of `[name, value]` where `value` is
    everything after the colon including folding and the final CRLF, so the list can be
    handed to dkimpy's canonicalization unchanged.
    """

    __slots__ = (
        "_body_bytes",
        "_index",
        "body_offset",
        "data",
        "header_end",
        "headers",
    )

    def __init__(self, data: Buffer) -> None:
        self.data = data
        self.headers: list[list[bytes]] = []
        self._body_bytes: bytes | None = None
        self._index: HeaderIndex | None = None
        self.header_end, self.body_offset = _find_header_end(data)
        self._parse_headers(bytes(data[: self.header_end]))

    def _parse_headers(self, block: bytes) -> None:
        if not block:
            return
        lines = block.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        # The common block is well formed: split it without a regex per line, check every
        # field name with one regex, and only on a problem take the line-by-line way below,
        # which finds the bad line (or an mbox "From " line) and says which.
        headers = self.headers
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                if not headers:
                    break
                headers[-1][1] += line + b"\r\n"
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name:
                break
            headers.append([name, value + b"\r\n"])
        else:
            if _FIELD_NAMES.fullmatch(b"\r\n".join([name for name, _value in headers])):
                return
        headers.clear()
        self._parse_lines(lines)

    def _parse_lines(self, lines: list[bytes]) -> None:
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
    def index(self) -> HeaderIndex:
        """The names of `headers` lower-cased and indexed, made on first use (see HeaderIndex).

        Every signer and verifier of the message shares it; `headers` must not change after
        the first use (the proxy only ever prepends fields to the bytes it sends on).
        """
        index = self._index
        if index is None:
            index = self._index = HeaderIndex(self.headers)
        return index

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
        # The header index serves every lookup of the message (sender, author, list id,
        # message id ...) without a pass over the header block per lookup.
        found = self.index.positions.get(_lookup_key(name))
        return [self._unfolded(i) for i in found] if found else []

    def _unfolded(self, i: int) -> bytes:
        value = self.headers[i][1]
        if b"\n " in value or b"\n\t" in value:
            value = _UNFOLD.sub(b"", value)
        return value.strip()

    def get_last(self, name: str) -> str | None:
        """The last occurrence wins, as in Mail::DKIM and DKIMproxy."""
        found = self.index.positions.get(_lookup_key(name))
        return self._unfolded(found[-1]).decode("utf-8", "replace") if found else None

    def sender(self) -> Address | None:
        """The address whose domain decides the signing key: Sender header, else From."""
        return self.sender_and_reason()[0]

    def sender_and_reason(self) -> tuple[Address | None, str]:
        """(Sender's first usable mailbox, else From's; or None and why none was usable).

        Mail::DKIM's message_sender: the last Sender field, else the last From field. Any
        mailbox RFC 5322 3.4.1 or RFC 6532 allows counts (see dkproxy.mailauth.addresses); its
        domain is in A-labels.
        """
        problems: list[str] = []
        for name in ("Sender", "From"):
            value = self.get_last(name)
            if value is None:
                continue
            found = parse_mailboxes(value)
            if found.addresses:
                return found.addresses[0], ""
            shown = value if len(value) <= 60 else value[:57] + "..."
            problems.append(f"{name} {shown!r}: {'; '.join(found.problems)}")
        if not problems:
            return None, "no Sender or From header"
        return None, "no usable sender address (" + "; ".join(problems) + ")"

    def list_id(self) -> str | None:
        """The List-Id identifier (the part in angle brackets), lower-cased."""
        value = self.get_last("list-id")
        if value is None:
            return None
        match = _LIST_ID.search(value)
        return (match.group(1) if match else value.strip()).lower() or None

    def message_id(self) -> str | None:
        return self.get_last("message-id")


@functools.lru_cache(maxsize=256)
def _lookup_key(name: str) -> bytes:
    """A field name as `HeaderIndex.positions` keys it; callers ask for a few fixed names."""
    return name.lower().encode("ascii")


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
