"""DKIM signing (RFC 6376, RFC 8463): dkimpy's canonicalization, OpenSSL's signatures.

dkimpy defines what is hashed (canonicalization, header selection, the b= handling), so our
signatures agree with every verifier that agrees with dkimpy. Its own RSA is pure Python and
costs ~9 ms per signature here; `cryptography` signs the same digest in ~0.4 ms, so we compute
the digest with dkimpy's pieces and hand only the digest to OpenSSL.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
)

from dkproxy.mailauth.dkim_canon import (
    MessageHashes,
    relaxed_body,
    relaxed_body_lines,
    relaxed_field,
    select_fields,
    simple_body,
    strip_b,
)
from dkproxy.mailauth.keys import SigningKey
from dkproxy.mailauth.message import BODY_CHUNK, Message

#: Signed when present (RFC 6376 section 5.4.1's list, plus MIME and List-* fields).
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
)  # fmt: skip
#: Signed once more than they occur, so that adding another one breaks the signature.
OVERSIGNED_HEADERS: tuple[str, ...] = (
    "from", "subject", "date", "to", "cc", "reply-to", "message-id",
)  # fmt: skip
#: RFC 6376 5.4: these must not be signed (they are changed in transit, or are signatures).
NEVER_SIGNED = frozenset({b"return-path", b"received", b"comments", b"keywords",
                          b"dkim-signature", b"domainkey-signature"})  # fmt: skip

ALGORITHMS = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
#: Stand-ins for the values that change with every message (t=, x=, bh=) in a folded
#: template: characters no tag value or header field name can contain.
_SLOT = re.compile(b"[\x00-\x02]+")
_B64_FOLD = 72


class DKIMSignError(Exception):
    """The message cannot be signed as configured (the reason is in the message)."""


@dataclass(frozen=True)
class DKIMParams:
    """Everything that decides a DKIM signature except the message."""

    domain: str
    selector: str
    key: SigningKey
    algorithm: str = "rsa-sha256"
    canonicalization: str = "relaxed/simple"
    identity: str | None = None
    headers: tuple[str, ...] | None = None
    oversign: tuple[str, ...] = OVERSIGNED_HEADERS
    expire_seconds: int | None = None

    def __post_init__(self) -> None:
        kind = ALGORITHMS.get(self.algorithm)
        if kind is None:
            raise DKIMSignError(
                f"algorithm {self.algorithm!r} is not allowed for signing (RFC 8301 forbids "
                "rsa-sha1); use rsa-sha256 or ed25519-sha256"
            )
        if kind != self.key.kind:
            raise DKIMSignError(
                f"algorithm {self.algorithm} needs an {kind} key; "
                f"{self.key.path} is {self.key.kind}"
            )
        try:
            CanonicalizationPolicy.from_c_value(self.canonicalization.encode("ascii"))
        except (InvalidCanonicalizationPolicyError, UnicodeEncodeError) as exc:
            raise DKIMSignError(f"bad canonicalization {self.canonicalization!r}") from exc


class BodyHashCache:
    """Body hashes per canonicalization, and the canonical header fields: several
    signatures of one message share one pass over each."""

    __slots__ = ("_hashes", "_message", "headers")

    def __init__(self, message: Message) -> None:
        self._message = message
        self._hashes: dict[bytes, bytes] = {}
        self.headers = MessageHashes(message)

    def get(self, policy: CanonicalizationPolicy) -> bytes:
        body_algorithm = policy.body_algorithm.name
        cached = self._hashes.get(body_algorithm)
        if cached is None:
            digest = body_hash(self._message, relaxed=body_algorithm == b"relaxed")
            cached = base64.b64encode(digest)
            self._hashes[body_algorithm] = cached
        return cached


def body_hash(message: Message, relaxed: bool, chunk_size: int = BODY_CHUNK) -> bytes:
    """SHA-256 of the canonical body (RFC 6376 3.4.3, 3.4.4): a body of up to `chunk_size`
    bytes at once, a larger one chunk by chunk.

    The per-line rules run on each CRLF-aligned chunk; only the rule about trailing empty
    lines spans chunks, so a run of CRLFs at the end of a chunk is held back until some
    content follows it. Equivalent to dkimpy's canonicalize_body on the whole body (the tests
    compare the two), without holding canonical copies of a large body.
    """
    if len(message.data) - message.body_offset <= chunk_size:
        # One chunk: the whole body, the one body_bytes() holds (DomainKeys reads it too).
        body = message.body_bytes()
        return hashlib.sha256(relaxed_body(body) if relaxed else simple_body(body)).digest()
    hasher = hashlib.sha256()
    held = b""  # CRLFs after the last content seen so far
    seen_content = False
    for chunk in message.body_chunks(chunk_size):
        if relaxed:
            chunk = relaxed_body_lines(chunk)
        end = len(chunk)
        while chunk.endswith(b"\r\n", 0, end):
            end -= 2
        if end == 0:
            held += chunk
            continue
        if held:
            hasher.update(held)
        hasher.update(chunk[:end] if end < len(chunk) else chunk)
        held = chunk[end:]
        seen_content = True
    if seen_content:
        # The last content line keeps (or, if unterminated, gets) exactly one CRLF.
        hasher.update(b"\r\n")
    elif not relaxed:
        hasher.update(b"\r\n")  # simple: an empty body is a single CRLF; relaxed: nothing
    return hasher.digest()


@functools.lru_cache(maxsize=256)
def _wanted_names(headers: tuple[str, ...] | None) -> frozenset[bytes]:
    wanted = headers if headers is not None else DEFAULT_SIGNED_HEADERS
    return frozenset(name.lower().encode("ascii") for name in wanted) - NEVER_SIGNED


def header_list(message: Message, params: DKIMParams) -> list[bytes]:
    """The h= list: each wanted field once per occurrence, plus one more for oversigned ones."""
    return list(
        _header_plan(tuple(message.index.lower), _wanted_names(params.headers), params.oversign)[0]
    )


@functools.lru_cache(maxsize=1024)
def _header_plan(
    names: tuple[bytes, ...], wanted: frozenset[bytes], oversign: tuple[str, ...]
) -> tuple[tuple[bytes, ...], tuple[int, ...], tuple[int, ...]]:
    """(h= list, fields it selects under relaxed, under simple) for a header block whose
    field names are `names` (lower-cased as found): what a signature hashes depends on the
    sequence of names only, which is the same on most of one sender's messages."""
    if b"from" not in names:
        raise DKIMSignError("message has no From header field (RFC 6376 requires signing it)")
    # Each field counted under its name without the white space of the obsolete "Name :"
    # form (RFC 5322 4.5): relaxed selection finds such a field under that name, so every
    # occurrence must be listed, or an oversigned entry (and the extra "from" dkimpy's
    # verifier adds) would select a field the count left out.
    include = [key for key in (name.rstrip(b" \t") for name in names) if key in wanted]
    include.extend(name.encode("ascii") for name in oversign)
    # Both canonicalizations select by the name without white space before the colon
    # (MessageHashes.header_hash_input says why).
    positions: dict[bytes, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name.rstrip(b" \t"), []).append(i)
    selected = tuple(select_fields(positions, include))
    return tuple(include), selected, selected


_FoldState = tuple[tuple[str, ...], str, int]


def _fold_more(state: _FoldState, tokens: Sequence[tuple[str, str]]) -> _FoldState:
    """Add (separator, text) tokens to a folding state (finished lines, current line, the
    column it starts at), folding with CRLF TAB where a line would pass column 76.

    Tags are separated by a space, the names of h= by nothing: a fold between them is the
    FWS that RFC 6376 allows around ':'.
    """
    done, current, width = state
    lines = list(done)
    for separator, text in tokens:
        if current and width + len(current) + len(separator) + len(text) > 76:
            lines.append(current)
            current, width = text, 8
        else:
            current = current + separator + text if current else text
    return tuple(lines), current, width


def _folded(state: _FoldState) -> bytes:
    return "\r\n\t".join([*state[0], state[1]]).encode("ascii")


def _fold_b64(value: bytes) -> bytes:
    chunks = [value[i : i + _B64_FOLD] for i in range(0, len(value), _B64_FOLD)]
    return b"\r\n\t".join(chunks)


@functools.lru_cache(maxsize=256)
def _fixed_part(
    algorithm: str, c_value: str, domain: str, identity: str | None, selector: str
) -> tuple[CanonicalizationPolicy, _FoldState]:
    """What a signature's parameters alone decide: the policy, and the leading tags (v= to
    s=) already folded."""
    policy = CanonicalizationPolicy.from_c_value(c_value.encode("ascii"))
    tags = ["v=1;", f"a={algorithm};", f"c={policy.to_c_value().decode('ascii')};", f"d={domain};"]
    if identity:
        tags.append(f"i={identity};")
    tags.append(f"s={selector};")
    start: _FoldState = ((), "", len("DKIM-Signature: "))
    return policy, _fold_more(start, [(" ", tag) for tag in tags])


@functools.lru_cache(maxsize=1024)
def _value_template(
    fixed: _FoldState,
    t_len: int,
    x_len: int | None,
    include: tuple[bytes, ...],
    bh_len: int,
    relaxed: bool,
) -> tuple[tuple[bytes, ...], tuple[bytes, ...] | None]:
    """The folded signature value up to "b=", and the form it is hashed in (RFC 6376 3.7:
    canonicalized, b= empty, no final CRLF), each cut where t=, x= (when `x_len` is not
    None) and bh= go. Folding depends on the lengths of those values only, and the h=
    list, the tags before it and those lengths are the same on a sender's every message;
    neither canonicalization touches digits or base64, so the hashed form of the filled
    value is the filled hashed form. The hashed form is None when strip_b would change the
    template (a tag value looking like b=): then the filled value is canonicalized itself.
    """
    tokens = [(" ", "t=" + "\x00" * t_len + ";")]
    if x_len is not None:
        tokens.append((" ", "x=" + "\x01" * x_len + ";"))
    names = [name.decode("ascii") for name in include]
    tokens.append((" ", f"h={names[0]}"))
    tokens += [("", f":{name}") for name in names[1:]]
    tokens += [("", ";"), (" ", "bh=" + "\x02" * bh_len + ";")]
    # b= goes on a line of its own, so the hashed form ("...; b=") is a prefix of the result.
    value = b" " + _folded(_fold_more(fixed, tokens)) + b"\r\n\tb="
    pieces = tuple(_SLOT.split(value))
    if strip_b(value) != value:
        return pieces, None
    if relaxed:
        hashed = relaxed_field(b"DKIM-Signature", value).rstrip()
    else:
        hashed = (b"DKIM-Signature:" + value).rstrip()
    return pieces, tuple(_SLOT.split(hashed))


def _fill(pieces: tuple[bytes, ...], slots: list[bytes]) -> bytes:
    out = [pieces[0]]
    for slot, piece in zip(slots, pieces[1:], strict=True):
        out += (slot, piece)
    return b"".join(out)


def sign(
    message: Message,
    params: DKIMParams,
    body_hashes: BodyHashCache | None = None,
    now: int | None = None,
) -> bytes:
    """Return the complete `DKIM-Signature: ...` header field (folded, CRLF-terminated)."""
    policy, fixed = _fixed_part(
        params.algorithm, params.canonicalization, params.domain, params.identity, params.selector
    )
    if body_hashes is None:
        body_hashes = BodyHashCache(message)
    body_hash = body_hashes.get(policy)
    include, relaxed_fields, simple_fields = _header_plan(
        tuple(message.index.lower), _wanted_names(params.headers), params.oversign
    )
    timestamp = int(time.time()) if now is None else now

    slots = [b"%d" % timestamp]
    if params.expire_seconds:
        slots.append(b"%d" % (timestamp + params.expire_seconds))
    slots.append(body_hash)
    x_len = len(slots[1]) if params.expire_seconds else None
    relaxed = policy.header_algorithm is Relaxed
    template = _value_template(fixed, len(slots[0]), x_len, include, len(body_hash), relaxed)
    value_pieces, hashed_pieces = template
    unsigned_value = _fill(value_pieces, slots)
    # dkim.hash_headers' work (dkimpy's selection and canonicalization), with each field
    # canonicalized once for all the message's signatures.
    canonical = body_hashes.headers
    hasher = hashlib.sha256()
    if hashed_pieces is None:
        canonical.hash_headers(hasher, policy, list(include), (b"DKIM-Signature", unsigned_value))
    else:
        selected = relaxed_fields if relaxed else simple_fields
        hasher.update(canonical.selected_input(policy, selected))
        hasher.update(_fill(hashed_pieces, slots))
    signature = _sign_digest(params.key, hasher.digest())
    return b"DKIM-Signature:" + unsigned_value + _fold_b64(base64.b64encode(signature)) + b"\r\n"


#: RSASSA-PKCS1-v1_5 over a SHA-256 digest we computed (RFC 6376 3.3.1), made once.
_PKCS1 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())
#: Concrete classes seen to be RSA private keys: the ABC check is slow on every message.
_RSA_KEY_TYPES: set[type] = set()


def _sign_digest(key: SigningKey, digest: bytes) -> bytes:
    private = key.private
    if type(private) in _RSA_KEY_TYPES or isinstance(private, rsa.RSAPrivateKey):
        _RSA_KEY_TYPES.add(type(private))
        return private.sign(digest, _PKCS1, _PREHASHED_SHA256)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        # RFC 8463: Ed25519 (PureEdDSA) over the SHA-256 of the canonicalized header data.
        return private.sign(digest)
    raise DKIMSignError(f"{key.path}: unsupported key type")
