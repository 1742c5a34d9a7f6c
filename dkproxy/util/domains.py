"""Domain names in their one canonical form: lower-case A-labels, no trailing dot.

RFC 8616 asks every DKIM, SPF and DMARC comparison to use A-labels; configuration values
go through the same function, so a U-label rule and an A-label sender (or the reverse) meet.
IDNA 2008 with the UTS 46 mapping (RFC 5890/5891) comes from the `idna` package.
"""

from __future__ import annotations

import functools

import idna


class DomainError(ValueError):
    """A domain name that has no A-label form (empty label, disallowed code point ...)."""


@functools.lru_cache(maxsize=4096)  # pure; the same few domains come back in every message
def canonical_domain(name: str) -> str:
    """The lower-case A-label form of a domain name, without a trailing dot.

    U-labels are converted with UTS 46 mapping (RFC 5890/5891, RFC 8616); A-labels are checked
    to decode. Raises DomainError for an empty name, an address literal (`[192.0.2.1]`) or a
    name IDNA 2008 does not allow; ASCII names are otherwise only lower-cased (callers check
    LDH syntax where they need it).
    """
    text = name.strip()
    text = text[:-1] if text.endswith(".") else text
    if not text:
        raise DomainError("empty domain")
    if text.startswith("["):
        raise DomainError(f"{text} is an address literal, not a domain name")
    try:
        if text.isascii():
            lowered = text.lower()
            if "xn--" in lowered:
                idna.decode(lowered)  # an A-label that does not decode is no domain name
            return lowered
        encoded = idna.encode(text, uts46=True).decode("ascii")
        # UTS 46 maps the other full stops (U+3002, U+FF0E, U+FF61) to "."; a root dot
        # written as one of them is a root dot all the same.
        return encoded[:-1] if encoded.endswith(".") else encoded
    except idna.IDNAError as exc:
        raise DomainError(f"{text!r} is not a valid domain name ({exc})") from None


@functools.lru_cache(maxsize=4096)  # pure, and asked several times per message
def canonical_domain_or_none(name: str) -> str | None:
    """`canonical_domain`, or None where it raises."""
    try:
        return canonical_domain(name)
    except DomainError:
        return None
