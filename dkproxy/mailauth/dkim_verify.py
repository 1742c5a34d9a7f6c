"""DKIM signature verification (RFC 6376 6.1.3): dkimpy's canonicalization, OpenSSL's RSA.

dkimpy decides what is hashed (header selection, canonicalization, the b= removal), exactly
as `dkim.DKIM.verify` does, but its RSA is pure Python and it parses the public key from
ASN.1 on every call. Here:
- a key record is parsed once (by dkimpy's own `evaluate_pk`, so the same records are
  accepted) and kept with an OpenSSL key object in a small cache keyed by the record's bytes:
  a record that changes in DNS is a new entry, so a rotated key is used as soon as the
  resolver's cached answer expires (its TTL);
- the canonical header fields and body hashes are computed once per message and shared by
  every signature with the same canonicalization and hash (`dkim_canon.MessageHashes`);
- the RSA check is OpenSSL's (`cryptography`), with dkimpy's acceptance rules: the signature
  is read as an integer modulo n and the recovered EMSA-PKCS1-v1_5 DigestInfo must equal the
  one dkimpy builds (RFC 8017 9.2, with the NULL parameter). Ed25519 (RFC 8463) is checked by
  the same libsodium call dkimpy makes.
Keys OpenSSL will not load, and keys under 1024 bits, are verified by dkimpy's own code.
"""

from __future__ import annotations

import base64
import functools
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import dkim
import nacl.exceptions  # dkimpy's own Ed25519 dependency (libsodium)
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import HASH_ALGORITHMS, DigestTooLargeError, RSASSA_PKCS1_v1_5_verify
from dkim.util import InvalidTagValueList, parse_tag_value

from dkproxy.mailauth.dkim_canon import MessageHashes

#: DER DigestInfo prefixes with the NULL parameter, as dkimpy builds them (RFC 8017 9.2).
_DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
}
#: Below this size the check stays dkimpy's (such keys are a policy result anyway).
_OPENSSL_MIN_BITS = 1024
_WSP = re.compile(rb"\s+")
#: The bytes `_WSP` matches, for bytes.translate (no regular expression per message).
_WSP_BYTES = b" \t\n\r\x0b\x0c"
_H_SPLIT = re.compile(rb"\s*:\s*")
#: Distinct key records kept parsed; a record is a few hundred bytes.
KEY_CACHE_SIZE = 4096


@dataclass(frozen=True)
class KeyFacts:
    """What RFC 6376 3.6.1 says about a key record on its own, read once per record.

    `problem` makes the key unusable for any signature (bad v=, no p=, revoked, unknown k=);
    `not_for_email` is kept apart because it is reported after the signature-dependent
    checks (a= against k= and h=), as `signature_checks` has always ordered them.
    """

    problem: str | None
    ktype: bytes
    #: h= of the key, lower-cased; None when absent (every hash allowed).
    hashes: frozenset[bytes] | None
    not_for_email: bool
    #: t= flags, lower-cased.
    flags: frozenset[bytes]

    @property
    def testing(self) -> bool:
        return b"y" in self.flags

    @property
    def strict_identity(self) -> bool:
        return b"s" in self.flags


def key_facts(key: dict[bytes, bytes]) -> KeyFacts:
    """Read the per-record checks of a key record's tags (pure)."""
    problem = None
    version = key.get(b"v")
    p = key.get(b"p")
    ktype = key.get(b"k", b"rsa").lower()
    if version is not None and version != b"DKIM1":
        problem = "key record has unsupported version"
    elif p is None:
        problem = "key record has no p= tag"
    elif not _WSP.sub(b"", p):
        problem = "key revoked"
    elif ktype not in (b"rsa", b"ed25519"):
        problem = f"unsupported key type k={ktype.decode('ascii', 'replace')}"
    hashes = key.get(b"h")
    services = key.get(b"s")
    not_for_email = services is not None and not (
        {s.strip().lower() for s in services.split(b":")} & {b"*", b"email"}
    )
    return KeyFacts(
        problem,
        ktype,
        None if hashes is None else frozenset(h.strip().lower() for h in hashes.split(b":")),
        not_for_email,
        frozenset(f.strip().lower() for f in key.get(b"t", b"").split(b":")),
    )


@dataclass(frozen=True)
class DKIMKey:
    """One key record, parsed once.

    `tags` is None when the record is not a tag list (`syntax_error`); `error` names the
    exception dkimpy's `evaluate_pk` raised for an unusable key (then the rest is None).
    `openssl` is the RSA key for OpenSSL, None when dkimpy's code has to verify.
    """

    tags: dict[bytes, bytes] | None
    error: str | None = None
    bits: int | None = None
    ktag: bytes | None = None
    dkimpy_key: Any = None
    openssl: rsa.RSAPublicKey | None = None
    modulus: int = 0
    #: `key_facts` of `tags`; None with a syntax error.
    facts: KeyFacts | None = None

    @property
    def syntax_error(self) -> bool:
        return self.tags is None


class _KeyCache:
    """A bounded LRU of parsed key records keyed by the record bytes (a pure function)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parsed = 0
        self._items: OrderedDict[bytes, DKIMKey] = OrderedDict()

    def get(self, name: str, record: bytes) -> DKIMKey:
        key = self._items.get(record)
        if key is not None:
            self._items.move_to_end(record)
            return key
        key = _parse_key(name, record)
        self.parsed += 1
        self._items[record] = key
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return key

    def clear(self) -> None:
        self._items.clear()


KEYS = _KeyCache(KEY_CACHE_SIZE)


def key_for(name: str, record: bytes) -> DKIMKey:
    """The parsed key record `record` found at `name` (parsed on first sight only)."""
    return KEYS.get(name, record)


def _parse_key(name: str, record: bytes) -> DKIMKey:
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return DKIMKey(None)
    facts = key_facts(tags)
    try:
        pk, bits, ktag, _tlsrpt = dkim.evaluate_pk(name, record)
    except Exception as exc:  # KeyFormatError, binascii.Error, ASN.1 errors...
        return DKIMKey(tags, error=exc.__class__.__name__, facts=facts)
    openssl = None
    modulus = 0
    if ktag == b"rsa" and bits is not None and bits >= _OPENSSL_MIN_BITS:
        modulus = int(pk["modulus"])
        try:
            openssl = rsa.RSAPublicNumbers(int(pk["publicExponent"]), modulus).public_key()
        except (ValueError, TypeError):
            openssl = None  # OpenSSL refuses the numbers: dkimpy's arithmetic decides
    return DKIMKey(tags, None, bits, ktag, pk, openssl, modulus, facts)


def verify(
    hashes: MessageHashes,
    position: int,
    sig: dict[bytes, bytes],
    key: DKIMKey,
    *,
    decoded: tuple[bytes, bytes] | None = None,
) -> bool:
    """Check the `position`-th DKIM-Signature (0 = topmost) of a message against `key`.

    `sig` is the signature's parsed tag list, already through `dkim.validate_signature_fields`;
    `key` comes from `key_for` and is usable (no syntax error, no `error`). `decoded` is
    (b=, bh=) already base64-decoded by a caller that checked them (else they are decoded
    here, as leniently as dkimpy does). Returns whether the signature verifies. Raises what
    `dkim.DKIM.verify` raises at the same points:
    `dkim.ValidationError` ("body hash mismatch ..."), `dkim.MessageFormatError`,
    `dkim.KeyFormatError` (digest too large for the modulus).
    """
    try:
        policy = _policy(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from exc
    hasher = HASH_ALGORITHMS[sig[b"a"]]
    length = int(sig[b"l"]) if b"l" in sig else None
    body_hash = hashes.body_digest(policy, hasher, length)
    if decoded is not None:
        signature, expected = decoded
    else:
        try:
            expected = base64.b64decode(sig[b"bh"].translate(None, _WSP_BYTES))
        except TypeError as exc:
            raise dkim.MessageFormatError(str(exc)) from exc
    if body_hash != expected:
        raise dkim.ValidationError(
            f"body hash mismatch (got {base64.b64encode(body_hash)!r}, expected {sig[b'bh']!r})"
        )
    include = list(_included(sig[b"h"]))
    header_hash = hasher()
    hashes.hash_headers(header_hash, policy, include, hashes.signatures[position])
    if decoded is None:
        signature = base64.b64decode(sig[b"b"].translate(None, _WSP_BYTES))
    if key.ktag == b"rsa":
        if key.openssl is None:
            try:
                return bool(RSASSA_PKCS1_v1_5_verify(header_hash, signature, key.dkimpy_key))
            except (TypeError, DigestTooLargeError) as exc:
                raise dkim.KeyFormatError(f"digest too large for modulus: {exc}") from exc
        return _rsa_check(key, signature, header_hash.name, header_hash.digest())
    if key.ktag == b"ed25519":
        try:
            key.dkimpy_key.verify(header_hash.digest(), signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True
    raise dkim.UnknownKeyTypeError(key.ktag)


@functools.lru_cache(maxsize=64)  # a pure function of c=; there are four valid values
def _policy(c_value: bytes) -> CanonicalizationPolicy:
    return CanonicalizationPolicy.from_c_value(c_value)


@functools.lru_cache(maxsize=1024)  # a pure function of h=; signers reuse a few lists
def _included(h_value: bytes) -> tuple[bytes, ...]:
    """The header field names an h= list signs, lower-cased, in order (RFC 6376 3.5)."""
    include = [x.lower() for x in _H_SPLIT.split(h_value)]
    if b"from" in include:
        include.append(b"from")  # dkimpy bug#644046: an extra From must break the signature
    return tuple(include)


def _rsa_check(key: DKIMKey, signature: bytes, hash_name: str, digest: bytes) -> bool:
    assert key.openssl is not None
    modlen = (key.modulus.bit_length() + 7) // 8
    # dkimpy reads the signature as an integer and reduces it modulo n; do the same so that
    # exactly the same byte strings verify.
    value = int.from_bytes(signature, "big") % key.modulus
    try:
        recovered = key.openssl.recover_data_from_signature(
            value.to_bytes(modlen, "big"), padding.PKCS1v15(), None
        )
    except (InvalidSignature, ValueError):
        return False
    return recovered == _DIGEST_INFO[hash_name] + digest
