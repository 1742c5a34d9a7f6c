"""The message as it crossed the SMTP DATA phase, split into header fields and body.

The proxy never rewrites a message: it only prepends header fields. So this class keeps the
original bytes and records where each header field and the body start; signers read from it,
and the relay sends our fields followed by these same bytes. Parsing touches the header block
only, and the body is handed out as a memoryview and in line-aligned chunks, so a 20 MB
attachment is never copied as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from dkproxy.mailauth.addresses import Address, parse_mailboxes
from dkproxy.util.buffer import Buffer

#: Body chunk size for canonicalization: large enough that per-chunk overhead is noise,
#: small enough that the transient copies of a 20 MB message stay small.
BODY_CHUNK = 256 * 1024

#: A header field name per RFC 5322: printable US-ASCII except colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")


class MessageFormatError(ValueError):
    """The header block cannot be parsed into fields; signing is not possible."""


class Message:
    """An RFC 5322 message in wire form (CRLF line ends, dot-stuffing already undone).

    `headers` uses dkimpy's representation, a list of `[name, value]` where `value` is
    everything after the colon including folding and the final CRLF, so the list can be
    handed to dkimpy's canonicalization unchanged.
    """

    __slots__ = ("_body_bytes", "_fields", "body_offset", "data", "header_end", "headers")

    def __init__(self, data: Buffer) -> None:
        self.data = data
        self.headers: list[list[bytes]] = []
        self._body_bytes: bytes | None = None
        #: Field values by lower-case name, unfolded and stripped; made on first lookup.
        self._fields: dict[bytes, list[bytes]] | None = None
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
        fields = self._fields
        if fields is None:
            # One pass over the header block serves every lookup of the message (sender,
            # author, list id, message id ...), instead of one pass per lookup.
            fields = self._fields = {}
            for field_name, value in self.headers:
                key = field_name.rstrip(b" \t").lower()
                unfolded = (
                    _UNFOLD.sub(b"", value).strip()
                    if b"\n " in value or b"\n\t" in value
                    else value.strip()
                )
                fields.setdefault(key, []).append(unfolded)
        return list(fields.get(name.lower().encode("ascii"), ()))

    def get_last(self, name: str) -> str | None:
        """The last occurrence wins, as in Mail::DKIM and DKIMproxy."""
        values = self.get_all(name)
        return values[-1].decode("utf-8", "replace") if values else None

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
