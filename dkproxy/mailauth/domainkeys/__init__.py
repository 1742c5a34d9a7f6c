"""DomainKeys (RFC 4870): signing, canonicalization, signature parsing, verification with a key.

No maintained Python library speaks DomainKeys, and the verifier that matters in practice is
Perl's Mail::DKIM (DKIMproxy, SpamAssassin). Where RFC 4870 and Mail::DKIM disagree this module
follows Mail::DKIM 1.20230212, down to its quirks: which fields are hashed under h=, how bare CR
and LF in the body are dropped by nofws, and that it only reads an unfolded From/Sender field as
the signing identity.

There is no network I/O here: callers look up `<s>._domainkey.<d>` (key) and `_domainkey.<domain>`
(policy) themselves and pass the TXT text in, so the module serves the outbound signer and the
inbound verifier alike.

Input is a `Message` in CRLF wire form. Messages stored with LF line ends (qmail) must be turned
into CRLF by the caller first; a bare LF in the header block makes `sign` refuse the message.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from dkproxy.mailauth.message import Message

FIELD_NAME = "DomainKey-Signature"
CANONICALIZATIONS = ("nofws", "simple")

#: Signed when present. A trailing "*" makes the entry a prefix (Content-*, List-*).
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-*", "in-reply-to", "references", "list-*",
)  # fmt: skip

#: Fold the signature header before this column, like Mail::DKIM's own signer.
FOLD_COLUMN = 72

#: DER prefix of a SHA-1 DigestInfo (RFC 8017 section 9.2, note 1).
_SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")

Result = Literal["pass", "fail", "neutral", "permerror", "temperror", "none"]
Status = Literal[
    "good", "bad", "no key", "revoked", "no signature", "bad format", "non-participant"
]

# Mail::DKIM's view of one header field line: the identity regex has no /s, so `.` stops at
# the first LF and `$` only matches at the very end: a folded From/Sender never matches.
_IDENTITY_LINE = re.compile(rb"(from|sender)\s*:(.*)$", re.IGNORECASE)
_HLIST_NAME = re.compile(rb"([^\s:]+)\s*:")
_FWS_CHARS = str.maketrans("", "", "\r\n \t")
_B64_DATA = re.compile(r"[A-Za-z0-9+/=]+")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"([^\r])\n")
_LEADING_CRLFS = re.compile(rb"(?:\r\n)+")
_BARE_LF_ANYWHERE = re.compile(rb"(?<!\r)\n")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")


class DomainKeysError(Exception):
    """The message cannot carry (or does not carry) a valid DomainKeys signature; says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Signature header


@dataclass(frozen=True)
class DKSignature:
    """A parsed DomainKey-Signature with Mail::DKIM's defaults applied.

    `h` is the lower-cased h= list, or None when absent (then every field below the signature
    is signed). `raw` is the header value as found (or the whole field when given so).
    """

    a: str
    c: str
    d: str
    s: str
    q: str
    h: tuple[str, ...] | None
    b: bytes
    raw: bytes
    tags: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key_name(self) -> str:
        """Where the public key lives: `<s>._domainkey.<d>`."""
        return f"{self.s}._domainkey.{self.d}"


def _parse_tag_list(text: str) -> dict[str, str]:
    """Mail::DKIM::KeyValueList::parse: split on ';', trim, split at the first '=' with
    surrounding whitespace; later duplicates win; a tag without '=' is a syntax error."""
    tags: dict[str, str] = {}
    for raw_tag in text.split(";"):
        # str.strip() and partition() give what the regexes ^\s+|\s*$ and \s*=\s* give
        # (the same white space: str.isspace), without a regex call per tag.
        tag = raw_tag.strip()
        if not tag:
            continue
        name, equals, value = tag.partition("=")
        if not equals:
            raise DomainKeysError("bad format: syntax error")
        tags[name.rstrip()] = value.lstrip()
    return tags


@functools.lru_cache(maxsize=1024)  # one sender's h= is the same on every message
def _header_list(value: str | None) -> tuple[str, ...] | None:
    """Mail::DKIM's headerlist(): whitespace next to colons removed, lower-cased, split."""
    if value is None:
        return None
    h = re.sub(r":\s+", ":", re.sub(r"\s+:", ":", value)).lower()
    if not h or h == "0":  # Perl treats "" and "0" as false: the same as no h= at all
        return None
    names = [re.sub(r"^\s+|\s+$", "", n) for n in h.split(":")]
    while names and names[-1] == "":  # Perl's split drops trailing empty fields
        names.pop()
    return tuple(names) or None


def parse_signature(value: bytes) -> DKSignature:
    """Parse a DomainKey-Signature value (or the whole field) as Mail::DKIM does.

    Raises DomainKeysError('bad format: ...') for what Mail::DKIM rejects before fetching a key
    (syntax, algorithm, canonicalization, q=, d=, s=) and for a missing or undecodable b=.
    """
    raw = value
    text = value.decode("latin-1")
    if text.endswith("\r\n"):
        text = text[:-2]
    if text[:20].lower() == "domainkey-signature:":
        text = text[20:]
    tags = _parse_tag_list(text)
    a = tags.get("a")
    algorithm = a.lower() if a else "rsa-sha1"
    if algorithm != "rsa-sha1":
        raise DomainKeysError(f"bad format: unsupported algorithm {algorithm}")
    canonicalization = (tags.get("c") or "").lower() or "simple"
    if canonicalization == "0":
        canonicalization = "simple"
    if canonicalization not in CANONICALIZATIONS:
        raise DomainKeysError(f"bad format: unsupported canonicalization {canonicalization}")
    q = tags.get("q")
    protocol = "dns" if q is None else q.lower()
    if protocol != "dns":
        raise DomainKeysError(f"bad format: unsupported query protocol, q={protocol}")
    d = tags.get("d")
    if d is None:
        raise DomainKeysError("bad format: missing d tag")
    if d == "":
        raise DomainKeysError("bad format: invalid domain in d tag")
    s = tags.get("s")
    if s is None:
        raise DomainKeysError("bad format: missing s tag")
    b64 = (tags.get("b") or "").translate(_FWS_CHARS)
    if not b64:
        raise DomainKeysError("bad format: missing b tag")
    try:
        b = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DomainKeysError("bad format: b= is not base64") from exc
    return DKSignature(
        a=algorithm,
        c=canonicalization,
        d=d.lower(),
        s=s,
        q=protocol,
        h=_header_list(tags.get("h")),
        b=b,
        raw=raw,
        tags=tags,
    )


def signature_positions(message: Message) -> list[int]:
    """Indexes into `message.headers` of every DomainKey-Signature field, top first."""
    wanted = FIELD_NAME.lower().encode("ascii")
    return [i for i, (name, _value) in enumerate(message.headers) if name.lower() == wanted]


# --------------------------------------------------------------------------------------------
# Canonicalization


def _field_line(name: bytes, value: bytes) -> bytes:
    return name + b":" + value


def _select_fields(lines: list[bytes], h: tuple[str, ...] | None) -> list[bytes]:
    """The fields hashed, in hash order (Mail::DKIM::Canonicalization::DkCommon).

    Without h=, every field. With h=, fields are grouped by name and h= is walked backwards:
    a name that occurs again earlier in h= takes the last remaining field of that name; its
    first occurrence takes all remaining ones. Perl's `while (pop)` stops at an empty name.
    """
    if h is None:
        return list(lines)
    groups: dict[str, list[bytes]] = {}
    for line in lines:
        m = _HLIST_NAME.match(line)
        if m:
            groups.setdefault(m.group(1).decode("latin-1").lower(), []).append(line)
    counts: dict[str, int] = {}
    for name in h:
        groups.setdefault(name, [])
        counts[name] = counts.get(name, 0) + 1
    selected: list[bytes] = []
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


def _hash_parts(
    fields: list[bytes], h: tuple[str, ...] | None, method: str, message: Message
) -> tuple[list[bytes], Iterator[bytes]]:
    """(selected raw fields, iterator over every byte string that is hashed, in order)."""
    selected = _select_fields(fields, h)

    def parts() -> Iterator[bytes]:
        for line in selected:
            yield _canon_header(line, method)
        yield from _canon_body(_body_chunks(message), method)

    return selected, parts()


def _fields_below(message: Message, sig_position: int) -> list[bytes]:
    """Raw header fields below the signature at `sig_position` (-1: all fields)."""
    if sig_position < -1 or sig_position >= len(message.headers):
        raise IndexError(f"no header field at position {sig_position}")
    return [_field_line(n, v) for n, v in message.headers[sig_position + 1 :]]


def canonical_hash_input(message: Message, sig_position: int, sig: DKSignature) -> bytes:
    """The exact bytes SHA-1 hashes for `sig` at index `sig_position` of `message.headers`.

    `sig_position` -1 means the signature is not in the message yet (signing): every header
    field counts. Useful for debugging interop; signing and verifying hash incrementally.
    """
    _selected, parts = _hash_parts(_fields_below(message, sig_position), sig.h, sig.c, message)
    return b"".join(parts)


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


def _identity_of(fields: list[bytes]) -> tuple[str, str] | None:
    """('sender'|'from', address) from the signed fields, as Mail::DKIM's dk_rsa_sha1 does:
    the last unfolded Sender/From of each kind wins; Sender if it yields an address."""
    seen: dict[str, bytes] = {}
    for line in fields:
        m = _IDENTITY_LINE.match(line)
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
    return _identity_of([_field_line(n, v) for n, v in message.headers])


def _rfc_sender(headers: list[list[bytes]]) -> tuple[str, str] | None:
    """The RFC 4870 sender of the given [name, value] fields (last Sender with an address,
    else last From), read from the whole, unfolded value: what other verifiers and our key
    choice use."""
    for name in (b"sender", b"from"):
        values = [value for field_name, value in headers if field_name.lower() == name]
        if values:
            unfolded = _UNFOLD.sub(b"", values[-1])
            address = _first_address(unfolded)
            if address:
                return name.decode("ascii"), address
    return None


def _domain_of(address: str) -> str | None:
    m = re.search(r"@([^@]*)$", address)
    return m.group(1) if m else None


def domain_matches(identity_domain: str, signing_domain: str) -> bool:
    """Mail::DKIM's match_subdomain: equal to d= or a subdomain of it (ASCII case-insensitive)."""
    sub = "." + identity_domain
    return _lc(sub[-1 - len(signing_domain) :]) == _lc("." + signing_domain)


# --------------------------------------------------------------------------------------------
# Signing


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


def _fold(fixed_tags: tuple[str, ...], h_names: list[str], b64: str) -> bytes:
    """Build the folded field: tags separated by '; ', lines broken before FOLD_COLUMN with
    CRLF TAB; h= may break before a colon and b= anywhere (Mail::DKIM strips that FWS)."""
    start, line = _fold_start(fixed_tags)
    lines = list(start)
    last = len(h_names) - 1
    for i, name in enumerate(h_names):
        token = ("h=" if i == 0 else ":") + name + (";" if i == last else "")
        lines, line = _put(lines, line, token, " " if i == 0 else "")
    lines, line = _put(lines, line, "b=", " ")
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
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _check_tag_value(what: str, value: str) -> str:
    if not value or re.search(r"[;\s=]", value) or not value.isascii():
        raise ValueError(f"invalid DomainKeys {what}: {value!r}")
    return value


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
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DomainKeysError(f"key is not RSA ({type(key).__name__}); DomainKeys is rsa-sha1")
    if canonicalization not in CANONICALIZATIONS:
        raise ValueError(
            f"DomainKeys canonicalization is nofws or simple, not {canonicalization!r}"
        )
    domain = _check_tag_value("domain", domain.strip().rstrip(".").lower())
    selector = _check_tag_value("selector", selector.strip())
    if _BARE_LF_ANYWHERE.search(message.data, 0, message.header_end):
        raise DomainKeysError("bare LF in the header block: convert the message to CRLF first")

    all_fields = [_field_line(n, v) for n, v in message.headers]
    rfc_sender = _rfc_sender(message.headers)
    if rfc_sender is None:
        raise DomainKeysError("no sender: the message has no Sender or From address")
    sender_domain = _domain_of(rfc_sender[1])
    if sender_domain is None or not domain_matches(sender_domain, domain):
        raise DomainKeysError(f"sender {rfc_sender[1]} is not in d={domain} or a subdomain of it")

    wanted = _header_matcher(DEFAULT_SIGNED_HEADERS if headers is None else tuple(headers))
    signed = [(n, v) for n, v in message.headers if wanted(n)]
    signed_names = {n.lower() for n, _v in signed}
    for name, label in ((b"sender", "Sender"), (b"from", "From")):
        present = any(n.lower() == name for n, _v in message.headers)
        if present and name not in signed_names:
            raise DomainKeysError(f"the {label} header field is present but not signed")
    h_names = [n.decode("latin-1").lower() for n, _v in signed]
    h = tuple(h_names) if h_names else None
    selected, parts = _hash_parts(all_fields, h, canonicalization, message)

    if any(n.lower() == b"sender" for n, _v in signed) and rfc_sender[0] != "sender":
        raise DomainKeysError("the Sender header field has no address")
    identity = _identity_of(selected)
    if identity is None or identity[1].lower() != rfc_sender[1].lower():
        raise DomainKeysError(
            f"bad identity: Mail::DKIM would not read {rfc_sender[1]} from the "
            f"{rfc_sender[0]} field (it ignores folded Sender/From fields)"
        )
    digest = _digest(parts)
    signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))
    fixed = ("a=rsa-sha1", f"c={canonicalization}", f"d={domain}", f"s={selector}", "q=dns")
    return _fold(fixed, h_names, base64.b64encode(signature).decode("ascii"))


# --------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class DKResult:
    """One DomainKeys verdict.

    `result` is the RFC 8601 word and follows Mail::DKIM: its "pass" and "fail" (the RSA check
    ran) stay, its "invalid" (no usable key, revoked key, bad identity, g= mismatch) becomes
    permerror. `status` is the legacy DomainKey-Status word, `code` the qmail-dk DKVERIFY
    letter (A good, B bad, C no signature, D no key, E bad key, F cannot verify, G syntax,
    J revoked, L granularity). `testing` is set when the key has t=y: RFC 4870 says treat the
    message as unsigned then, so callers must not reject on it.
    """

    result: Result
    status: Status
    domain: str | None = None
    selector: str | None = None
    identity_header: Literal["from", "sender"] | None = None
    identity: str | None = None
    detail: str = ""
    code: str = ""
    testing: bool = False

    @property
    def ar_property(self) -> tuple[str, str] | None:
        """('header.from'|'header.sender', address) for Authentication-Results."""
        if self.identity_header is None or self.identity is None:
            return None
        return f"header.{self.identity_header}", self.identity


@dataclass(frozen=True)
class _PublicKey:
    key: rsa.RSAPublicKey
    tags: dict[str, str]


class _KeyProblem(Exception):
    def __init__(self, status: Status, result: Result, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.result = result
        self.code = code
        self.detail = detail


def _bad_key(detail: str) -> _KeyProblem:
    return _KeyProblem("bad format", "permerror", "E", f"public key: {detail}")


#: Parsed key records (or why they are unusable), keyed by the record text: a record is a
#: pure input, so a key rotated in DNS is simply another entry once the resolver's cached
#: answer has expired.
_KEY_CACHE: OrderedDict[str, _PublicKey | _KeyProblem] = OrderedDict()
KEY_CACHE_SIZE = 4096


def _load_public_key(record: str | None) -> _PublicKey:
    """Mail::DKIM::PublicKey->parse + check, with its error words; parsed once per record."""
    if not record:
        return _parse_public_key(record)
    parsed = _KEY_CACHE.get(record)
    if parsed is None:
        try:
            parsed = _parse_public_key(record)
        except _KeyProblem as problem:
            parsed = problem
        _KEY_CACHE[record] = parsed
        while len(_KEY_CACHE) > KEY_CACHE_SIZE:
            _KEY_CACHE.popitem(last=False)
    else:
        _KEY_CACHE.move_to_end(record)
    if isinstance(parsed, _KeyProblem):
        raise _KeyProblem(parsed.status, parsed.result, parsed.code, parsed.detail)
    return parsed


def _parse_public_key(record: str | None) -> _PublicKey:
    if not record:
        raise _KeyProblem("no key", "permerror", "D", "public key: not available")
    try:
        tags = _parse_tag_list(record)
    except DomainKeysError as exc:
        raise _bad_key("syntax error") from exc
    v = tags.get("v")
    if v and v != "DKIM1":
        raise _bad_key("unsupported version")
    k = tags.get("k")
    if k and k != "rsa":
        raise _bad_key("unsupported key type")
    p = tags.get("p")
    if p is None:
        raise _bad_key("missing p= tag")
    p = re.sub(r'[\r\n \t"]', "", p)
    if p == "":
        raise _KeyProblem("revoked", "permerror", "J", "public key: revoked")
    if not _B64_DATA.fullmatch(p):
        raise _bad_key("invalid data")
    try:
        public = serialization.load_der_public_key(base64.b64decode(p + "=" * (-len(p) % 4)))
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise _bad_key("cannot load the key data") from exc
    if not isinstance(public, rsa.RSAPublicKey):
        raise _bad_key("not an RSA key")
    service = tags.get("s")
    if service and not any(x in ("*", "email") for x in service.split(":")):
        raise _bad_key("does not support email")
    return _PublicKey(key=public, tags=tags)


def _check_key_use(pub: _PublicKey, identity: str, domain: str) -> None:
    """Mail::DKIM check_hash_algorithm + check_granularity (empty g= means any, for DK)."""
    h = pub.tags.get("h")
    if h and "sha1" not in h.split(":"):
        raise _bad_key("does not support hash algorithm 'sha1'")
    g = pub.tags.get("g")
    if g is None or g == "":
        g = "*"
    m = re.fullmatch(r"(.*)@([^@]*)", identity, re.DOTALL)
    local, dom = (m.group(1), m.group(2)) if m else ("", identity)
    if "*" in g:
        begins, ends = g.split("*", 1)
        if (
            len(local) < len(begins) + len(ends)
            or not local.startswith(begins)
            or (ends and not local.endswith(ends))
        ):
            raise _KeyProblem("bad", "permerror", "L", "public key: granularity mismatch")
    elif local != g:
        raise _KeyProblem("bad", "permerror", "L", "public key: granularity mismatch")
    flags = (pub.tags.get("t") or "").split(":")
    if "s" in flags and _lc(dom) != _lc(domain):
        raise _KeyProblem(
            "bad", "permerror", "L", "public key: does not support signing subdomains"
        )


def verify_with_key(
    message: Message, sig_position: int, sig: DKSignature, key_record: str | None
) -> DKResult:
    """Verify the signature at `message.headers[sig_position]` against the key TXT record.

    `key_record` is the TXT text found at `sig.key_name` (the first record, its strings
    joined, as Mail::DKIM takes it), or None when there is none. DNS failures are the
    caller's to report (see `dns_error_result`).
    """
    if sig_position not in signature_positions(message):
        raise ValueError(f"header field {sig_position} is not a {FIELD_NAME}")
    fields = _fields_below(message, sig_position)
    selected, parts = _hash_parts(fields, sig.h, sig.c, message)
    identity = _identity_of(selected)
    header: Literal["from", "sender"] | None = None
    address: str | None = None
    if identity is not None:
        header = "sender" if identity[0] == "sender" else "from"
        address = identity[1]

    def result(
        res: Result, status: Status, detail: str, code: str, testing: bool = False
    ) -> DKResult:
        return DKResult(res, status, sig.d, sig.s, header, address, detail, code, testing)

    id_domain = _domain_of(address) if address else None
    if address is None or id_domain is None or not domain_matches(id_domain, sig.d):
        return result("permerror", "bad format", "bad identity", "G")
    try:
        pub = _load_public_key(key_record)
        _check_key_use(pub, address, sig.d)
    except _KeyProblem as problem:
        return result(problem.result, problem.status, problem.detail, problem.code)
    testing = "y" in (pub.tags.get("t") or "").split(":")
    note = " (key in testing mode, t=y)" if testing else ""
    digest = _digest(parts)
    try:
        recovered = pub.key.recover_data_from_signature(sig.b, padding.PKCS1v15(), None)
    except (InvalidSignature, ValueError):
        recovered = b""
    if recovered == _SHA1_DIGEST_INFO + digest:
        return result("pass", "good", "signature verified" + note, "A", testing)
    # Like Mail::DKIM: a well-formed SHA-1 DigestInfo with another digest means the message
    # changed; anything else means the signature was not made with this key.
    altered = recovered.startswith(_SHA1_DIGEST_INFO)
    detail = "message has been altered" if altered else "bad RSA signature"
    return result("fail", "bad", detail + note, "B", testing)


def signature_error_result(error: DomainKeysError) -> DKResult:
    """The verdict for a DomainKey-Signature that `parse_signature` rejected."""
    return DKResult("permerror", "bad format", detail=error.reason, code="G")


def dns_error_result(sig: DKSignature, detail: str) -> DKResult:
    """The verdict when the key lookup failed temporarily (timeout, SERVFAIL)."""
    return DKResult("temperror", "no key", sig.d, sig.s, detail=f"public key: {detail}", code="F")


# --------------------------------------------------------------------------------------------
# Sender signing policy


@dataclass(frozen=True)
class DKPolicy:
    """The `_domainkey.<domain>` policy: o='-' signs all mail, '~' some (the default)."""

    o: Literal["~", "-"] = "~"
    testing: bool = False
    published: bool = False

    @property
    def signs_all(self) -> bool:
        return self.o == "-"

    def apply(self, first_party_pass: bool) -> Literal["accept", "reject", "neutral"]:
        """Mail::DKIM DkPolicy->apply: reject only unsigned-by-sender mail of an o=- domain
        that is not testing."""
        if first_party_pass:
            return "accept"
        if self.signs_all and not self.testing:
            return "reject"
        return "neutral"


def policy_name(domain: str) -> str:
    """Where the sender signing policy lives: `_domainkey.<domain>`."""
    return f"_domainkey.{domain.rstrip('.')}"


def parse_policy(record: str | None) -> DKPolicy:
    """Parse a policy TXT record like Mail::DKIM::Policy->parse; None or an empty record is
    the default policy (o=~), a malformed one too (Mail::DKIM ignores it)."""
    if not record:
        return DKPolicy(published=record is not None)
    tags: dict[str, str] = {}
    for raw_tag in record.split(";"):
        tag = raw_tag.strip()
        if not tag:
            continue
        name, eq, value = tag.partition("=")
        if not eq:
            return DKPolicy(published=True)
        tags[name.rstrip()] = value.lstrip()
    o: Literal["~", "-"] = "-" if tags.get("o") == "-" else "~"
    testing = "y" in (tags.get("t") or "").lower()
    return DKPolicy(o=o, testing=testing, published=True)


def unsigned_result(policy: DKPolicy) -> DKResult:
    """The verdict for a message without a DomainKey-Signature: 'no signature' when the
    sender's domain publishes a policy, 'non-participant' when it does not."""
    if policy.published:
        return DKResult("none", "no signature", detail="no signature", code="C")
    return DKResult("none", "non-participant", detail="no policy published", code="C")
