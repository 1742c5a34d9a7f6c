"""The DKIM body length limit (`l=`): how much of the canonical body a signature leaves out.

RFC 6376 8.2: content added after the signed `l=` bytes leaves the signature valid, which is
how a signed newsletter becomes a signed phishing mail ("Click here: ..."). dkproxy never signs
with `l=`; when verifying, a signature whose canonical body is longer than its `l=` gets
`dkim=policy` instead of `pass` (and so never aligns for DMARC), unless `allow_body_length` is
set. Rspamd and maddy made the same choice. The comparison is made on the body after the
signature's own body canonicalization, which is what `l=` counts (RFC 6376 3.5, 3.4).
"""

from __future__ import annotations

from dkim.canonicalization import CanonicalizationPolicy


def canonical_body_length(body: bytes, c_value: bytes) -> int:
    """Length in bytes of `body` after the body canonicalization named by `c_value`
    (e.g. b"relaxed/simple"; RFC 6376 3.4.3/3.4.4). Raises dkimpy's
    InvalidCanonicalizationPolicyError for an unknown c= (verification has refused it first)."""
    policy = CanonicalizationPolicy.from_c_value(c_value)
    return len(policy.canonicalize_body(body))


def uncovered_body(body: bytes, tags: dict[bytes, bytes]) -> tuple[int, int] | None:
    """(l=, canonical body length) when the signature's `l=` leaves canonical body bytes
    unsigned; None without `l=` or when `l=` covers the whole canonical body."""
    raw = tags.get(b"l")
    if raw is None:
        return None
    limit = int(raw.strip())  # validated as digits by dkim.validate_signature_fields
    length = canonical_body_length(body, tags.get(b"c", b"simple/simple"))
    return (limit, length) if length > limit else None
