"""DomainKeys verification with a key record (RFC 4870 section 3.6) and the sender signing
policy (RFC 4870 section 3.6.2.2, as Mail::DKIM::DkPolicy).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dkproxy.mailauth.message import Message

from .canon import (
    _digest,
    _domain_of,
    _hash_parts,
    _identity_of,
    _lc,
    _select_positions,
    domain_matches,
)
from .tags import (
    FIELD_NAME,
    DKSignature,
    DomainKeysError,
    _parse_tag_list,
    signature_positions,
)

_B64_DATA = re.compile(r"[A-Za-z0-9+/=]+")
_KEY_DATA_JUNK = re.compile(r'[\r\n \t"]')
_LOCAL_AT_DOMAIN = re.compile(r"(.*)@([^@]*)", re.DOTALL)

#: DER prefix of a SHA-1 DigestInfo (RFC 8017 section 9.2, note 1).
_SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")

Result = Literal["pass", "fail", "neutral", "permerror", "temperror", "none"]
Status = Literal[
    "good", "bad", "no key", "revoked", "no signature", "bad format", "non-participant"
]


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
    p = _KEY_DATA_JUNK.sub("", p)
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
    m = _LOCAL_AT_DOMAIN.fullmatch(identity)
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
    selected = _select_positions(message, sig_position + 1, sig.h)
    identity = _identity_of(message, selected)
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
    digest = _digest(_hash_parts(message, selected, sig.c))
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
