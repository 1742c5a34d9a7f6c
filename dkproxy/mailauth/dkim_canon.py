"""Canonical forms of one message for DKIM (RFC 6376 3.4), shared by every signature on it.

What is hashed is what dkimpy hashes: its header selection (`dkim.select_headers`), its
simple and relaxed canonicalizations, and its removal of b='s value from the signature
field. dkimpy computes them with a regex substitution per field and a lower() per field per
h= name; here the relaxed forms (RFC 6376 3.4.2, 3.4.4) are computed with bytes methods
(a regex only where a value really has a tab or a run of spaces), the selection (RFC 6376
5.4.2) walks the message's header index (`Message.index`), and `MessageHashes` keeps each
selected field's canonical form once per message and header canonicalization, and each
canonical body once per body canonicalization, so that the signatures of one message
(signing: RSA + Ed25519; verifying: any number) share that work. The signer and the
verifier both hash through it. tests/test_canon_differential.py compares every function
here with dkimpy's on generated awkward input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from dkim.canonicalization import CanonicalizationPolicy, Relaxed

from dkproxy.mailauth.message import HeaderIndex, Message

#: dkim.RE_BTAG's language: "b", FWS, "=", base64 with FWS between characters, and a final
#: CRLF when the value ends the field.
_BTAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=]+(?:\s+[a-zA-Z0-9+/=]+)*)?(?:\r?\n\Z)?")


def strip_b(value: bytes) -> bytes:
    """The signature field value with b='s value removed, as dkimpy's `RE_BTAG.sub` does.

    dkimpy's pattern nests optional FWS groups around every base64 character, which costs
    ~40 us per signature; this one matches the same strings (FWS there is any run of
    white space) in a tenth of the time. tests/test_dkim_verify.py compares the two.
    """
    return _BTAG.sub(b"\\1", value)


#: White space that relaxed canonicalization compresses (RFC 6376 3.4.2: WSP).
_WSP_RUN = re.compile(rb"[\t ]+")
#: A CRLF within a field: followed by white space (RFC 5322 2.2.3).
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_RELAXED_HEADERS = CanonicalizationPolicy(Relaxed, Relaxed)


def relaxed_field(name: bytes, value: bytes) -> bytes:
    """One header field in relaxed form (RFC 6376 3.4.2), as `name:value CRLF`.

    `name` is the field name as found, `value` everything after the colon (folding and the
    final CRLF included). Like dkimpy's `Relaxed.canonicalize_headers`: the name
    lower-cased without trailing white space, CR LF and bare LF removed from the value, runs
    of tabs and spaces made one space, ASCII white space stripped at both ends.
    """
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower().rstrip() + b":" + value.strip() + b"\r\n"


def relaxed_body_lines(body: bytes) -> bytes:
    """The per-line rules of relaxed body canonicalization (RFC 6376 3.4.4 a, b): white
    space at line ends removed, other runs of tabs and spaces made one space.

    Works on any CRLF-aligned piece of a body (a line's white space never spans a CRLF).
    """
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:  # each pass halves every run: a few passes even for long runs
        body = body.replace(b"  ", b" ")
    return body.replace(b" \r\n", b"\r\n")


def strip_trailing_lines(body: bytes) -> bytes:
    """Empty lines at the end removed and a missing final CRLF added (RFC 6376 3.4.3),
    as dkimpy's `strip_trailing_lines`: an empty or blank body becomes a single CRLF."""
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == len(body):
        return body + b"\r\n"
    return body[: end + 2]


def simple_body(body: bytes) -> bytes:
    """Simple body canonicalization (RFC 6376 3.4.3), as dkimpy's `Simple.canonicalize_body`."""
    return strip_trailing_lines(body)


def relaxed_body(body: bytes) -> bytes:
    """Relaxed body canonicalization (RFC 6376 3.4.4), as dkimpy's
    `Relaxed.canonicalize_body`: an empty body (after the rules) hashes as nothing."""
    canonical = strip_trailing_lines(relaxed_body_lines(body))
    return b"" if canonical == b"\r\n" else canonical


def select_fields(positions: dict[bytes, list[int]], include: list[bytes]) -> list[int]:
    """Indexes of the fields that h= names `include` select, in hash order (RFC 6376 5.4.2).

    Each occurrence of a name takes the bottom-most instance not yet taken; a name with no
    instance left selects nothing (the "oversigned" case). `positions` maps a field name
    (as the canonicalization compares it, lower-cased) to its fields' indexes, top first.
    The same fields as `dkim.select_headers`, which scans the header block per name.
    """
    selected: list[int] = []
    taken: dict[bytes, int] = {}
    for name in include:
        found = positions.get(name)
        if found is None:
            continue
        count = taken.get(name, 0)
        if count < len(found):
            selected.append(found[-1 - count])
            taken[name] = count + 1
    return selected


class MessageHashes:
    """What every DKIM signature of one message shares: the header index, canonical
    header fields per header canonicalization, body digests per (canonicalization, hash,
    l=)."""

    __slots__ = (
        "_blocks",
        "_bodies",
        "_digests",
        "_fields",
        "headers",
        "index",
        "message",
        "signatures",
    )

    def __init__(self, message: Message) -> None:
        self.message = message
        self.headers = message.headers
        self.index: HeaderIndex = message.index
        #: The DKIM-Signature fields in order: dkimpy's `idx` counts these.
        headers = message.headers
        self.signatures = [
            (headers[i][0], headers[i][1])
            for i in self.index.lower_positions().get(b"dkim-signature", ())
        ]
        self._fields: dict[bytes, dict[int, bytes]] = {}
        self._blocks: dict[tuple[int, ...], bytes] = {}
        self._bodies: dict[bytes, bytes] = {}
        self._digests: dict[tuple[bytes, str, int | None], bytes] = {}

    def _canonical(self, policy: CanonicalizationPolicy, indexes: Sequence[int]) -> list[bytes]:
        """The fields at `indexes` as hashed (`name:value`), each canonicalized once.

        dkimpy knows two header canonicalizations, simple and relaxed; a policy it parsed is
        one of them.
        """
        relaxed = policy.header_algorithm is Relaxed
        key = b"relaxed" if relaxed else b"simple"
        done = self._fields.get(key)
        if done is None:
            done = self._fields[key] = {}
        headers = self.headers
        lines: list[bytes] = []
        for i in indexes:
            line = done.get(i)
            if line is None:
                name, value = headers[i]
                line = done[i] = relaxed_field(name, value) if relaxed else name + b":" + value
            lines.append(line)
        return lines

    def selected_input(self, policy: CanonicalizationPolicy, selected: Sequence[int]) -> bytes:
        """The fields at `selected` (indexes into `headers`, in hash order) as hashed."""
        if policy.header_algorithm is not Relaxed:
            return b"".join(self._canonical(policy, selected))
        key = tuple(selected)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = self._relaxed_block(key)
        return block

    def _relaxed_block(self, selected: tuple[int, ...]) -> bytes:
        """`relaxed_field` of each field at `selected`, joined, with the value rules applied
        to the whole block at once where that gives the same bytes: when every CR and LF is
        part of a CRLF (so each CRLF within a value is a fold, followed by white space, and
        each between fields is not) and there is no VT or FF (which strip() would remove
        at a value's ends but the compression leaves)."""
        headers = self.headers
        keys = self.index.keys
        block = b"".join([keys[i] + b":" + headers[i][1].strip() + b"\r\n" for i in selected])
        crlf = block.count(b"\r\n")
        if (
            block.count(b"\r") != crlf
            or block.count(b"\n") != crlf
            or b"\x0b" in block
            or b"\x0c" in block
        ):
            return b"".join(self._canonical(_RELAXED_HEADERS, selected))
        if b"\r\n " in block or b"\r\n\t" in block:
            block = _FOLD.sub(b"", block)
        return relaxed_body_lines(block)  # tabs to spaces, runs to one: no line ends in WSP

    def header_hash_input(
        self,
        policy: CanonicalizationPolicy,
        include: list[bytes],
        sig_header: tuple[bytes, bytes],
    ) -> bytes:
        """The bytes `dkim.hash_headers` feeds its hasher for this message: the fields
        `include` selects, canonicalized, then the signature field with b='s value removed
        and without its final CRLF (RFC 6376 3.7)."""
        relaxed = policy.header_algorithm is Relaxed
        # Fields are selected by name (RFC 6376 5.4.2), and a field written "From :" is named
        # From (RFC 5322 4.5) under either canonicalization, as Mail::DKIM and go-msgauth
        # select it. dkimpy's simple selection keeps the white space in the name (its parser
        # refuses such a message, so there is no dkimpy verdict to keep).
        positions = self.index.positions
        lines = [self.selected_input(policy, select_fields(positions, include))]
        name, value = sig_header
        value = strip_b(value)
        signature = relaxed_field(name, value) if relaxed else name + b":" + value
        lines.append(signature.rstrip())
        return b"".join(lines)

    def hash_headers(
        self,
        hasher: Any,
        policy: CanonicalizationPolicy,
        include: list[bytes],
        sig_header: tuple[bytes, bytes],
    ) -> None:
        """`dkim.hash_headers` on this message: dkimpy's selection and canonicalization,
        applied to the selected fields only rather than to the whole header block."""
        hasher.update(self.header_hash_input(policy, include, sig_header))

    def canonical_body(self, policy: CanonicalizationPolicy) -> bytes:
        """The whole body in `policy`'s body canonicalization, made once per message."""
        relaxed = policy.body_algorithm is Relaxed
        key = b"relaxed" if relaxed else b"simple"
        body = self._bodies.get(key)
        if body is None:
            data = self.message.body_bytes()
            body = self._bodies[key] = relaxed_body(data) if relaxed else simple_body(data)
        return body

    def body_digest(
        self, policy: CanonicalizationPolicy, hasher: Callable[[], Any], length: int | None
    ) -> bytes:
        """The body hash for `policy`, hash `hasher` (e.g. hashlib.sha256) and l= `length`
        (None: the whole canonical body), computed once per message (RFC 6376 3.7)."""
        name = policy.body_algorithm.name
        probe = hasher()
        key = (name, probe.name, length)
        digest = self._digests.get(key)
        if digest is None:
            body = self.canonical_body(policy)
            probe.update(body if length is None else body[:length])
            digest = probe.digest()
            self._digests[key] = digest
        return digest
