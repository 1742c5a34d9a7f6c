"""DomainKeys canonicalization (RFC 4870 section 3.4): which fields are hashed, simple and
nofws, and the signing identity read from the hashed fields as Mail::DKIM reads it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Iterator
from email.utils import getaddresses

from dkproxy.mailauth.message import BODY_CHUNK, Message

from .tags import DKSignature

# --------------------------------------------------------------------------------------------
# Canonicalization

# Mail::DKIM's view of one header field line: the identity regex has no /s, so `.` stops at
# the first LF and `$` only matches at the very end: a folded From/Sender never matches.
_IDENTITY_LINE = re.compile(rb"(from|sender)\s*:(.*)$", re.IGNORECASE)
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"([^\r])\n")
_LEADING_CRLFS = re.compile(rb"(?:\r\n)+")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
_FOLD = re.compile(rb"\r\n(?=[ \t])")


def _select_positions(message: Message, start: int, h: tuple[str, ...] | None) -> list[int]:
    """Indexes into `message.headers` of the fields hashed, in hash order
    (Mail::DKIM::Canonicalization::DkCommon); only fields from index `start` on count.

    Without h=, every field. With h=, fields are grouped by name (lower-cased, without white
    space before the colon: `Message.index`) and h= is walked backwards: a name that occurs
    again earlier in h= takes the last remaining field of that name; its first occurrence
    takes all remaining ones. Perl's `while (pop)` stops at an empty name.
    """
    return select_from(message.index.positions, start, len(message.headers), h)


def select_from(
    positions: dict[bytes, list[int]], start: int, count: int, h: tuple[str, ...] | None
) -> list[int]:
    """`_select_positions` on a header block of `count` fields whose indexes by name
    (lower-cased, without white space before the colon) are `positions`."""
    if h is None:
        return list(range(start, count))
    groups: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for name in h:
        if name not in groups:
            # h= was read as Latin-1 and lower-cased: it encodes back; field names are ASCII.
            found = positions.get(name.encode("latin-1"), ())
            groups[name] = [p for p in found if p >= start] if start else list(found)
        counts[name] = counts.get(name, 0) + 1
    selected: list[int] = []
    for name in reversed(h):
        if name in ("", "0"):
            break
        counts[name] -= 1
        if counts[name] > 0:
            if groups[name]:
                selected.append(groups[name].pop())
        else:
            selected.extend(reversed(groups[name]))
            groups[name] = []
    selected.reverse()
    return selected


def _canon_header(line: bytes, method: str) -> bytes:
    if line.endswith(b"\r\n"):
        line = line[:-2]
    if method == "nofws":
        return line.translate(None, b" \t\r\n") + b"\r\n"
    return line + b"\r\n"


def _body_chunks(message: Message) -> Iterator[bytes]:
    """The pieces Mail::DKIM's parser hands to the canonicalizer for a message PRINTed at once:
    the separator line, the body up to its last CRLF, then the unterminated rest. The middle
    piece comes as line-aligned chunks, so that a large body is never copied whole."""
    if not message.has_separator:
        return
    yield b"\r\n"
    previous: bytes | None = None
    for chunk in message.body_chunks():
        if previous is not None:
            yield previous
        previous = chunk
    if previous is None:
        return
    last = previous.rfind(b"\r\n")
    if last >= 0 and last + 2 < len(previous):
        yield previous[: last + 2]
        yield previous[last + 2 :]
    else:
        yield previous


def _nofws_body(chunk: bytes) -> bytes:
    """Delete spaces and tabs, then bare CRs, then bare LFs (in dk_nofws's order).

    The regexes only run when counting shows a bare CR or LF: the common message has none,
    and translate() + count() keep a 10 MB body well under 100 ms.
    """
    chunk = chunk.translate(None, b" \t")
    crlf = chunk.count(b"\r\n")
    if chunk.count(b"\r") != crlf:
        chunk = _BARE_CR.sub(b"", chunk)
        crlf = chunk.count(b"\r\n")
    if chunk.count(b"\n") != crlf:
        chunk = _BARE_LF.sub(rb"\1", chunk)
    return chunk


def _canon_body(chunks: Iterable[bytes], method: str) -> Iterator[bytes]:
    """dk_simple / dk_nofws body canonicalization, chunk by chunk as in Mail::DKIM.

    Empty lines are held back until a non-empty line follows, so trailing empty lines (and,
    for an empty or blank-only body, the separator line itself) are never hashed. nofws also
    deletes spaces, tabs, a CR not followed by LF and an LF not preceded by CR.
    """
    pending = 0
    for chunk in chunks:
        if method == "nofws":
            chunk = _nofws_body(chunk)
        m = _LEADING_CRLFS.match(chunk)
        if m:
            pending += (m.end() - m.start()) // 2
            chunk = chunk[m.end() :]
        if not chunk:
            continue
        if pending:
            yield b"\r\n" * pending
            pending = 0
        trailing = 0
        end = len(chunk)
        while end >= 2 and chunk[end - 2 : end] == b"\r\n":
            trailing += 1
            end -= 2
        if trailing > 1:
            pending += trailing - 1
            chunk = chunk[: len(chunk) - 2 * (trailing - 1)]
        yield chunk


def _hash_parts(message: Message, selected: list[int], method: str) -> Iterator[bytes]:
    """Every byte string that is hashed, in order: the fields at `selected`, then the body."""
    headers = message.headers
    block = b"".join([headers[i][0] + b":" + headers[i][1] for i in selected])
    crlf = block.count(b"\r\n")
    if block.count(b"\r") == crlf and block.count(b"\n") == crlf:
        # Every field ends in CRLF and has no bare CR or LF: a CRLF followed by white space
        # is a fold, any other ends a field; so the block can be canonicalized in one go.
        if method == "nofws":
            block = _FOLD.sub(b"", block).translate(None, b" \t")
        yield block
    else:
        yield b"".join(
            [_canon_header(headers[i][0] + b":" + headers[i][1], method) for i in selected]
        )
    body = _small_clean_body(message, method)
    if body is None:
        yield from _canon_body(_body_chunks(message), method)
        return
    # What _canon_body makes of the separator line and such a body: the empty lines at the
    # end are not hashed (a body of empty lines hashes as nothing, not even the separator).
    end = len(body.rstrip(b"\r\n"))  # all CRLF pairs: there is no bare CR or LF
    if end:
        yield b"\r\n"
        yield body if end == len(body) else body[: end + 2]


def _small_clean_body(message: Message, method: str) -> bytes | None:
    """The body, spaces and tabs deleted for nofws (dk_nofws deletes them first), when the
    message has a separator line, the body fits in one chunk and then has no bare CR or LF;
    else None. For such a body the chunks Mail::DKIM's parser cuts (at CRLFs) make no
    difference to the canonical form, so it can be canonicalized in one go."""
    if not message.has_separator or len(message.data) - message.body_offset > BODY_CHUNK:
        return None
    body = message.body_bytes()
    if method == "nofws":
        body = body.translate(None, b" \t")
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        return None
    return body


def _check_position(message: Message, sig_position: int) -> None:
    if sig_position < -1 or sig_position >= len(message.headers):
        raise IndexError(f"no header field at position {sig_position}")


def canonical_hash_input(message: Message, sig_position: int, sig: DKSignature) -> bytes:
    """The exact bytes SHA-1 hashes for `sig` at index `sig_position` of `message.headers`.

    `sig_position` -1 means the signature is not in the message yet (signing): every header
    field counts. Useful for debugging interop; signing and verifying hash incrementally.
    """
    _check_position(message, sig_position)
    selected = _select_positions(message, sig_position + 1, sig.h)
    return b"".join(_hash_parts(message, selected, sig.c))


def _digest(parts: Iterator[bytes]) -> bytes:
    sha = hashlib.sha1(usedforsecurity=False)
    for part in parts:
        sha.update(part)
    return sha.digest()


# --------------------------------------------------------------------------------------------
# Identity


def _lc(text: str) -> str:
    """Perl's lc without a locale: ASCII letters only."""
    return text.encode("latin-1", "replace").lower().decode("latin-1")


@functools.lru_cache(maxsize=1024)  # a pure function; the same From recurs in floods
def _first_address(content: bytes) -> str | None:
    """The first address of a field value, as Mail::Address->parse(...)[0]->address would."""
    text = content.decode("latin-1").strip()
    if not text:
        return None
    for _display, addr in getaddresses([text]):
        if addr:
            return addr
    return None


def _identity_of(message: Message, selected: Iterable[int]) -> tuple[str, str] | None:
    """('sender'|'from', address) from the signed fields at `selected`, as Mail::DKIM's
    dk_rsa_sha1 does: the last unfolded Sender/From of each kind wins; Sender if it yields
    an address."""
    seen: dict[str, bytes] = {}
    keys = message.index.keys
    headers = message.headers
    for i in selected:
        if keys[i] in (b"from", b"sender"):  # the only names _IDENTITY_LINE can match
            m = _IDENTITY_LINE.match(headers[i][0] + b":" + headers[i][1])
            if m:
                seen[m.group(1).decode("ascii").lower()] = m.group(2)
    for name in ("sender", "from"):
        if name in seen:
            address = _first_address(seen[name])
            if address:
                return name, address
    return None


def sender_identity(message: Message) -> tuple[str, str] | None:
    """The identity Mail::DKIM would derive if every header field were signed.

    Returns ('sender'|'from', address) or None. Only unfolded fields count: Mail::DKIM's
    pattern for them stops at the first line end, so a folded From is invisible to it.
    """
    return _identity_of(message, range(len(message.headers)))


def _rfc_sender(message: Message) -> tuple[str, str] | None:
    """The RFC 4870 sender of the message (last Sender with an address, else last From),
    read from the whole, unfolded value: what other verifiers and our key choice use. A
    field written "From :" does not count (the name is compared as found)."""
    positions = message.index.lower_positions()
    for name in (b"sender", b"from"):
        found = positions.get(name)
        if found:
            unfolded = _UNFOLD.sub(b"", message.headers[found[-1]][1])
            address = _first_address(unfolded)
            if address:
                return name.decode("ascii"), address
    return None


def _domain_of(address: str) -> str | None:
    _local, at, domain = address.rpartition("@")  # what follows the last "@"
    return domain if at else None


@functools.lru_cache(maxsize=1024)  # a pure function; a sender's domain recurs
def domain_matches(identity_domain: str, signing_domain: str) -> bool:
    """Mail::DKIM's match_subdomain: equal to d= or a subdomain of it (ASCII case-insensitive)."""
    sub = "." + identity_domain
    return _lc(sub[-1 - len(signing_domain) :]) == _lc("." + signing_domain)
