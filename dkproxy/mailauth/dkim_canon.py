"""Canonical forms of one message for DKIM (RFC 6376 3.4), shared by every signature on it.

dkimpy decides what is hashed: its header selection (`dkim.select_headers`), its
canonicalizations, and the removal of b='s value from the signature field. `dkim.hash_headers`
canonicalizes the whole header block for each signature; `MessageHashes` canonicalizes each
selected field once per message and header canonicalization, and each body once per body
canonicalization, so that the signatures of one message (signing: RSA + Ed25519; verifying:
any number) share that work. The signer and the verifier both hash through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, Relaxed, Simple

from dkproxy.mailauth.message import Message

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


class MessageHashes:
    """What every DKIM signature of one message shares: parsed header list, canonical
    header fields per header canonicalization, body digests per (canonicalization, hash,
    l=)."""

    __slots__ = ("_bodies", "_digests", "_fields", "_names_by", "headers", "message", "signatures")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.headers = message.headers
        #: The DKIM-Signature fields in order: dkimpy's `idx` counts these.
        self.signatures = [(n, v) for n, v in message.headers if n.lower() == b"dkim-signature"]
        self._names_by: dict[bytes, list[tuple[bytes, int]]] = {}
        self._fields: dict[bytes, dict[int, tuple[bytes, bytes]]] = {}
        self._bodies: dict[bytes, bytes] = {}
        self._digests: dict[tuple[bytes, str, int | None], bytes] = {}

    def _names(self, policy: CanonicalizationPolicy) -> list[tuple[bytes, int]]:
        """(canonical field name, index) per field: what dkimpy's selection compares."""
        algorithm = policy.header_algorithm
        names = self._names_by.get(algorithm.name)
        if names is None:
            if algorithm is Relaxed:  # Relaxed.canonicalize_headers: lower(), rstrip()
                names = [(n.lower().rstrip(), i) for i, (n, _v) in enumerate(self.headers)]
            elif algorithm is Simple:
                names = [(n, i) for i, (n, _v) in enumerate(self.headers)]
            else:
                canonical = policy.canonicalize_headers(self.headers)
                names = [(n, i) for i, (n, _v) in enumerate(canonical)]
            self._names_by[algorithm.name] = names
        return names

    def _canonical(
        self, policy: CanonicalizationPolicy, indexes: list[int]
    ) -> list[tuple[bytes, bytes]]:
        """The canonical form of the fields at `indexes`, each canonicalized once."""
        done = self._fields.setdefault(policy.header_algorithm.name, {})
        missing = [i for i in dict.fromkeys(indexes) if i not in done]
        if missing:
            canonical = policy.canonicalize_headers([self.headers[i] for i in missing])
            done.update(zip(missing, canonical, strict=True))
        return [done[i] for i in indexes]

    def hash_headers(
        self,
        hasher: Any,
        policy: CanonicalizationPolicy,
        include: list[bytes],
        sig_header: tuple[bytes, bytes],
    ) -> None:
        """`dkim.hash_headers` on this message: dkimpy's selection and canonicalization,
        applied to the selected fields only rather than to the whole header block."""
        # dkimpy's selection scans the header list backwards once per h= name, and an
        # oversigned name (one listed but absent, or listed twice) scans all of it. Fields
        # whose name is not in h= can never be selected (it compares names lower-cased), so
        # dkimpy selects among the others only: the same fields in the same order.
        wanted = set(include)
        selected = dkim.select_headers(
            [item for item in self._names(policy) if item[0].lower() in wanted], include
        )
        fields = self._canonical(policy, [i for _n, i in selected])
        signature = policy.canonicalize_headers([(sig_header[0], strip_b(sig_header[1]))])
        # The signature field is hashed without its final CRLF (RFC 6376 3.7).
        for name, value in [*fields, *[(n, v.rstrip()) for n, v in signature]]:
            hasher.update(name)
            hasher.update(b":")
            hasher.update(value)

    def body_digest(
        self, policy: CanonicalizationPolicy, hasher: Callable[[], Any], length: int | None
    ) -> bytes:
        name = policy.body_algorithm.name
        probe = hasher()
        key = (name, probe.name, length)
        digest = self._digests.get(key)
        if digest is None:
            body = self._bodies.get(name)
            if body is None:
                body = policy.canonicalize_body(self.message.body_bytes())
                self._bodies[name] = body
            probe.update(body if length is None else body[:length])
            digest = probe.digest()
            self._digests[key] = digest
        return digest
