"""Mailboxes and domain names taken from mail: parsing and the one canonical domain form.

Header fields are parsed with the standard library's RFC 5322 parser (`email.headerregistry`,
which knows quoted local parts, comments, groups, obsolete route and whitespace forms, and
RFC 6532 UTF-8), cross-checked with `email.utils.getaddresses`, which splits some malformed
fields differently. Domains are compared in one form everywhere: lower-case A-labels (IDNA
2008 with the UTS 46 mapping, through the `idna` package), as RFC 8616 asks for every DKIM,
SPF and DMARC comparison. Configuration values go through the same function, so a U-label
rule and an A-label sender (or the reverse) meet.
"""

from __future__ import annotations

import email.headerregistry
import functools
import re
from dataclasses import dataclass, field
from email.utils import getaddresses

import idna

_REGISTRY = email.headerregistry.HeaderRegistry()


class DomainError(ValueError):
    """A domain name that has no A-label form (empty label, disallowed code point ...)."""


@dataclass(frozen=True)
class Address:
    """A mailbox: `local` as in the addr-spec (quoted if it must be), `domain` in A-labels."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass
class Mailboxes:
    """The mailboxes of one address field: usable ones in order, and why others were not."""

    addresses: list[Address] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def domains(self) -> list[str]:
        """The distinct domains, in order of appearance."""
        return list(dict.fromkeys(a.domain for a in self.addresses))


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


def canonical_address(text: str) -> str:
    """`local@domain` with the domain in A-labels (for map keys and MAIL FROM); raises
    DomainError when the domain has no A-label form. Text without @ is taken as a domain."""
    local, at, domain = text.rpartition("@")
    return f"{local}{at}{canonical_domain(domain)}"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _getaddresses(value: str) -> list[tuple[str, str]]:
    """`email.utils.getaddresses` in its lenient reading on every Python: since 3.13 (and
    security releases of 3.11/3.12) it returns nothing for fields it finds ambiguous, such as
    `a@x.example <b@y.example>`, unless told strict=False; the lenient split is the one that
    shows every domain a reader might take for the author."""
    try:
        return getaddresses([value], strict=False)  # type: ignore[call-arg]
    except TypeError:  # an older Python: always lenient
        return getaddresses([value])


def _add(found: Mailboxes, seen: set[tuple[str, str]], local: str, domain: str) -> None:
    shown = _shown(f"{local}@{domain}" if domain else local)
    if not local:
        found.problems.append(f"mailbox {shown} has no local part")
        return
    if not domain:
        found.problems.append(f"mailbox {shown} has no domain")
        return
    try:
        canonical = canonical_domain(domain)
    except DomainError as exc:
        found.problems.append(f"mailbox {shown}: {exc}")
        return
    if "" in canonical.split(".") or len(canonical) > 253:
        found.problems.append(f"mailbox {shown}: {canonical!r} is not a domain name")
        return
    key = (local.lower(), canonical)
    if key not in seen:
        seen.add(key)
        found.addresses.append(Address(local, canonical))


#: What needs the full RFC 5322 parser: quoted strings, comments, groups, routes, literals,
#: escapes and non-ASCII text. Without any of them both parsers read the field alike.
_NEEDS_FULL_PARSER = frozenset('"()\\:;[]')
_PLAIN_ADDR_SPEC = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _simple_mailboxes(value: str) -> list[tuple[str, str]] | None:
    """(local, domain) pairs of a field of plain ASCII mailboxes (`a@x.example`,
    `Name <a@x.example>`, comma-separated), or None when the field needs the full parser.

    A fast path only: the usual From costs about a tenth of the header parser's time, and the
    answer is what `getaddresses`, which `parse_mailboxes` consults anyway, gives for it.
    """
    if not value.isascii() or not _NEEDS_FULL_PARSER.isdisjoint(value):
        return None
    pairs = []
    for _display, addr in _getaddresses(value):
        if not _PLAIN_ADDR_SPEC.fullmatch(addr):
            return None
        local, _, domain = addr.rpartition("@")
        pairs.append((local, domain))
    return pairs or None


def parse_mailboxes(value: str) -> Mailboxes:
    """Every mailbox of an address-list field value (RFC 5322 3.4, RFC 6532), in order.

    The standard library's header parser reads the field; the mailboxes that
    `email.utils.getaddresses` finds besides (it splits `a@x.example <b@y.example>` into two,
    for instance) are added after them, so a caller looking for every author domain sees
    each domain either parser would report. The parse is pure, so it is kept per field value
    (the sender and the author domains read the same From field; senders repeat); each
    caller gets its own copy of the lists.
    """
    found = _parse_mailboxes(value)
    return Mailboxes(list(found.addresses), list(found.problems))


@functools.lru_cache(maxsize=4096)
def _parse_mailboxes(value: str) -> Mailboxes:
    found = Mailboxes()
    seen: set[tuple[str, str]] = set()
    simple = _simple_mailboxes(value)
    if simple is not None:
        for local, domain in simple:
            _add(found, seen, local, domain)
        return found
    unreadable = False
    try:
        header = _REGISTRY("from", value)
        parsed = [(a.addr_spec, a.domain) for a in header.addresses]
    except Exception:  # the parser is lenient, but a crash must cost only this parse
        parsed = []
        unreadable = True  # e.g. `a@x.example, b@`: getaddresses drops the second silently
    for addr_spec, domain in parsed:
        if addr_spec in ("", "<>"):
            continue
        local = addr_spec.rpartition("@")[0] if domain else addr_spec
        _add(found, seen, local, domain)
    first_said = bool(found.addresses or found.problems)
    # Entries the header parser could not read (`b@` in `b@, a@x.example`) come back as "<>".
    unread = sum(1 for addr_spec, _domain in parsed if addr_spec in ("", "<>"))
    first_count = len(found.addresses)
    for _display, addr in _getaddresses(value):
        addr = addr.strip()
        if not addr:
            continue
        local, at, domain = addr.rpartition("@")
        if not at:
            if not first_said:
                found.problems.append(f"{_shown(addr)} is not a mailbox (no @domain)")
            continue
        before = len(found.addresses)
        problems = len(found.problems)
        _add(found, seen, local, domain)
        if len(found.addresses) == before and first_said:
            del found.problems[problems:]  # the first parser already said why
    if found.addresses and unread > len(found.addresses) - first_count:
        unreadable = True  # getaddresses did not find a mailbox in their place either
    if unreadable:
        # What a reader sees as a mailbox may be one no parser could read: say so, so that
        # DMARC callers treat the field as having an unusable author (dkproxy.mailauth.authors).
        found.problems.append(f"{_shown(value)} does not parse as an RFC 5322 address list")
    if not found.addresses and not found.problems:
        found.problems.append("no mailbox")
    return found
