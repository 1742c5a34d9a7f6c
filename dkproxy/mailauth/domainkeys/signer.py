"""DomainKeys signing (RFC 4870 section 3.5): the folded DomainKey-Signature field."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from dkproxy.mailauth.message import Message

from .canon import (
    _digest,
    _domain_of,
    _hash_parts,
    _identity_of,
    _rfc_sender,
    domain_matches,
    select_from,
)
from .tags import (
    CANONICALIZATIONS,
    DEFAULT_SIGNED_HEADERS,
    FIELD_NAME,
    FOLD_COLUMN,
    DomainKeysError,
)

# --------------------------------------------------------------------------------------------
# Signing

#: RSASSA-PKCS1-v1_5 over a SHA-1 digest we computed (RFC 4870 3.2), made once.
_PKCS1 = padding.PKCS1v15()
_PREHASHED_SHA1 = utils.Prehashed(hashes.SHA1())
#: Concrete classes seen to be RSA private keys: the ABC check is slow on every message.
_RSA_KEY_TYPES: set[type] = set()


def _is_rsa(key: object) -> bool:
    if isinstance(key, rsa.RSAPrivateKey):
        _RSA_KEY_TYPES.add(type(key))
        return True
    return False


#: Stands for the b= value in a folded template: no tag or header field name contains NUL.
_B64_SLOT = re.compile("\x00+")


@functools.lru_cache(maxsize=64)
def _header_matcher(patterns: tuple[str, ...]) -> Callable[[bytes], bool]:
    """A test "is this field name signed?" for a configured list, built once per list."""
    exact = frozenset(p.lower() for p in patterns)
    prefixes = tuple(p.lower()[:-1] for p in patterns if p.endswith("*"))

    @functools.lru_cache(maxsize=512)
    def wanted(name: bytes) -> bool:
        if b";" in name:  # cannot be listed in h= (it would end the tag)
            return False
        lname = name.decode("latin-1").lower()
        return lname in exact or lname.startswith(prefixes)

    return wanted


class _Plan(NamedTuple):
    """What a DomainKeys signature of a header block takes from its field names alone."""

    #: The h= list: the signed fields' names as found, lower-cased, in message order.
    h_names: tuple[str, ...]
    #: The fields hashed (indexes into the header block), in hash order.
    selected: tuple[int, ...]
    #: "Sender" or "From" when such a field is present but not signed.
    unsigned_sender: str | None
    #: Whether a Sender field is signed.
    signs_sender: bool


@functools.lru_cache(maxsize=1024)
def _plan(names: tuple[bytes, ...], patterns: tuple[str, ...]) -> _Plan:
    """The `_Plan` for a header block whose field names, lower-cased as found, are `names`,
    under the configured signed-header `patterns`: the same for most of a sender's mail."""
    wanted = _header_matcher(patterns)
    signed = [i for i, name in enumerate(names) if wanted(name)]
    signed_names = {names[i] for i in signed}
    unsigned_sender = None
    for name, label in ((b"sender", "Sender"), (b"from", "From")):
        if name in names and name not in signed_names:
            unsigned_sender = label
            break
    h_names = tuple(names[i].decode("latin-1") for i in signed)
    positions: dict[bytes, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name.rstrip(b" \t"), []).append(i)
    selected = select_from(positions, 0, len(names), h_names or None)
    return _Plan(h_names, tuple(selected), unsigned_sender, b"sender" in signed_names)


@functools.lru_cache(maxsize=256)
def _fold_start(fixed_tags: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """The folded lines (and the open last line) after the fixed tags, which depend on the
    configuration only."""
    lines: list[str] = []
    line = FIELD_NAME + ":"
    for tag in fixed_tags:
        lines, line = _put(lines, line, tag + ";", " ")
    return tuple(lines), line


def _put(lines: list[str], line: str, token: str, sep: str) -> tuple[list[str], str]:
    if len(line) + len(sep) + len(token) > FOLD_COLUMN and line.strip():
        lines.append(line)
        return lines, "\t" + token
    return lines, line + sep + token


@functools.lru_cache(maxsize=1024)
def _fold_before_b64(
    fixed_tags: tuple[str, ...], h_names: tuple[str, ...]
) -> tuple[tuple[str, ...], str]:
    """The folded lines up to and including "b=" (and the open last line): they depend on
    the configuration and the signed fields' names only, the same on most messages."""
    start, line = _fold_start(fixed_tags)
    lines = list(start)
    last = len(h_names) - 1
    for i, name in enumerate(h_names):
        token = ("h=" if i == 0 else ":") + name + (";" if i == last else "")
        lines, line = _put(lines, line, token, " " if i == 0 else "")
    lines, line = _put(lines, line, "b=", " ")
    return tuple(lines), line


def _fold(fixed_tags: tuple[str, ...], h_names: tuple[str, ...], b64: str) -> bytes:
    """Build the folded field: tags separated by '; ', lines broken before FOLD_COLUMN with
    CRLF TAB; h= may break before a colon and b= anywhere (Mail::DKIM strips that FWS)."""
    pieces, cuts = _fold_template(fixed_tags, h_names, len(b64))
    out = [pieces[0]]
    for (start, end), piece in zip(cuts, pieces[1:], strict=True):
        out += (b64[start:end], piece)
    return "".join(out).encode("ascii")


@functools.lru_cache(maxsize=1024)
def _fold_template(
    fixed_tags: tuple[str, ...], h_names: tuple[str, ...], b64_len: int
) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """The folded field with the b= value cut out: the text around it and where each
    piece of the value goes (start, end), for a value of `b64_len` characters (the key's)."""
    folded = _fold_text(fixed_tags, h_names, "\x00" * b64_len)
    runs = [m.span() for m in _B64_SLOT.finditer(folded)]
    pieces = tuple(_B64_SLOT.split(folded))
    cuts: list[tuple[int, int]] = []
    position = 0
    for start, end in runs:
        cuts.append((position, position + end - start))
        position += end - start
    return pieces, tuple(cuts)


def _fold_text(fixed_tags: tuple[str, ...], h_names: tuple[str, ...], b64: str) -> str:
    done, line = _fold_before_b64(fixed_tags, h_names)
    lines = list(done)
    pos = 0
    while pos < len(b64):
        room = FOLD_COLUMN - len(line)
        if room <= 0:
            lines.append(line)
            line = "\t"
            room = FOLD_COLUMN - 1
        line += b64[pos : pos + room]
        pos += room
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _check_tag_value(what: str, value: str) -> str:
    if not value or re.search(r"[;\s=]", value) or not value.isascii():
        raise ValueError(f"invalid DomainKeys {what}: {value!r}")
    return value


@functools.lru_cache(maxsize=256)
def _fixed_tags(domain: str, selector: str, canonicalization: str) -> tuple[str, ...]:
    """The tags before h=, checked once per configuration; raises ValueError."""
    if canonicalization not in CANONICALIZATIONS:
        raise ValueError(
            f"DomainKeys canonicalization is nofws or simple, not {canonicalization!r}"
        )
    domain = _check_tag_value("domain", domain.strip().rstrip(".").lower())
    selector = _check_tag_value("selector", selector.strip())
    return ("a=rsa-sha1", f"c={canonicalization}", f"d={domain}", f"s={selector}", "q=dns")


def sign(
    message: Message,
    *,
    domain: str,
    selector: str,
    key: rsa.RSAPrivateKey,
    canonicalization: str = "nofws",
    headers: Sequence[str] | None = None,
) -> bytes:
    """Sign `message`; return the folded DomainKey-Signature field (CRLF-terminated) to put on
    top of it.

    h= always lists the signed fields' names in message order, once per occurrence, so that
    fields added below the signature later (a DKIM-Signature, say) do not break it.
    `headers` replaces DEFAULT_SIGNED_HEADERS (names; a trailing '*' makes a prefix).
    Raises DomainKeysError when a verifier could not accept the signature: no sender, sender
    outside `domain`, a sender field Mail::DKIM cannot read (folded), the Sender/From field
    not signed, or a non-RSA key. Bad arguments raise ValueError.
    """
    if type(key) not in _RSA_KEY_TYPES and not _is_rsa(key):
        raise DomainKeysError(f"key is not RSA ({type(key).__name__}); DomainKeys is rsa-sha1")
    fixed = _fixed_tags(domain, selector, canonicalization)
    domain = fixed[2][2:]
    block = message.data[: message.header_end]
    if block.count(b"\n") != block.count(b"\r\n"):  # an LF without its CR
        raise DomainKeysError("bare LF in the header block: convert the message to CRLF first")

    rfc_sender = _rfc_sender(message)
    if rfc_sender is None:
        raise DomainKeysError("no sender: the message has no Sender or From address")
    sender_domain = _domain_of(rfc_sender[1])
    if sender_domain is None or not domain_matches(sender_domain, domain):
        raise DomainKeysError(f"sender {rfc_sender[1]} is not in d={domain} or a subdomain of it")

    plan = _plan(
        tuple(message.index.lower), DEFAULT_SIGNED_HEADERS if headers is None else tuple(headers)
    )
    if plan.unsigned_sender is not None:
        raise DomainKeysError(f"the {plan.unsigned_sender} header field is present but not signed")
    h_names = plan.h_names
    selected = plan.selected

    if plan.signs_sender and rfc_sender[0] != "sender":
        raise DomainKeysError("the Sender header field has no address")
    identity = _identity_of(message, selected)
    if identity is None or identity[1].lower() != rfc_sender[1].lower():
        raise DomainKeysError(
            f"bad identity: Mail::DKIM would not read {rfc_sender[1]} from the "
            f"{rfc_sender[0]} field (it ignores folded Sender/From fields)"
        )
    digest = _digest(_hash_parts(message, selected, canonicalization))
    signature = key.sign(digest, _PKCS1, _PREHASHED_SHA1)
    return _fold(fixed, h_names, base64.b64encode(signature).decode("ascii"))
