"""Signature specifiers (`dkim(c=relaxed,key=/k,s=sel,d=example.org)`) and their checks:
canonicalization, selector, identity, signed header fields."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from dkproxy.config.models import SignatureTemplate
from dkproxy.config.values import (
    ALGORITHMS,
    DK_CANONICALIZATIONS,
    DKIM_CANONICALIZATIONS,
    DOMAIN_MACROS,
    FIELD_NAME_RE,
    HOSTNAME_RE,
    IDENTITY_MACROS,
    MACRO_RE,
    check_macros,
    is_domain,
    is_safe_local_part,
    to_alabels,
)

# ---------------------------------------------------------------------------------------------
# Signature specifiers: dkim(c=relaxed,key=/k,s=sel,d=example.org)
# ---------------------------------------------------------------------------------------------

_SIG_OPTION_NAMES = {
    "key": "key",
    "keyfile": "key",
    "s": "selector",
    "selector": "selector",
    "d": "domain",
    "domain": "domain",
    "c": "canonicalization",
    "method": "canonicalization",
    "a": "algorithm",
    "algorithm": "algorithm",
    "h": "headers",
    "headers": "headers",
    "i": "identity",
    "identity": "identity",
    "authserv_id": "authserv_id",
}
_SPECIFIER_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?", re.DOTALL)


def split_by_commas(text: str) -> list[str]:
    """Split at commas outside parentheses, trimming items (DKIMproxy's split_by_commas)."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "," and depth <= 0:
            items.append("".join(current).strip())
            current = []
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in {text.strip()!r}")
    items.append("".join(current).strip())
    if len(items) > 1 and items[-1] == "":
        items.pop()  # a trailing comma
    return items


def parse_signature_list(text: str, source: str) -> list[SignatureTemplate]:
    """Parse "dkim(c=relaxed,a=rsa-sha256), domainkeys(c=nofws)"; raise ValueError."""
    if not text.strip():
        raise ValueError("empty signature list")
    return [parse_signature_specifier(item, source) for item in split_by_commas(text)]


def parse_signature_specifier(text: str, source: str) -> SignatureTemplate:
    """Parse one `TYPE` or `TYPE(opt=value,...)`; raise ValueError naming what is wrong."""
    spec = text.strip()
    match = _SPECIFIER_RE.fullmatch(spec)
    if not match:
        raise ValueError(f"invalid signature specifier {spec!r}; expected e.g. dkim(c=relaxed)")
    kind = match.group(1).lower()
    if kind not in ("dkim", "domainkeys", "arc"):
        raise ValueError(f"invalid signature type {match.group(1)!r}; use dkim, domainkeys or arc")
    values: dict[str, Any] = {"kind": kind, "source": source}
    body = match.group(2)
    if body is not None:
        for option in body.split(","):
            option = option.strip()
            if not option:
                continue
            name, eq, value = option.partition("=")
            name, value = name.strip(), value.strip()
            key = _SIG_OPTION_NAMES.get(name.lower())
            if key is None:
                known = "key, s, d, c, a, h, i, authserv_id"
                raise ValueError(f"unknown signature option {name!r} in {spec!r} (known: {known})")
            if not eq or not value:
                raise ValueError(f"signature option {name!r} in {spec!r} needs a value")
            if key in values:
                raise ValueError(f"signature option {name!r} given twice in {spec!r}")
            values[key] = value
    return make_signature_template(values)


def make_signature_template(values: dict[str, Any]) -> SignatureTemplate:
    """Validate the syntax of the parts of a signature that do not need keys or defaults."""
    kind = values.get("kind", "dkim")
    out = dict(values)
    if kind == "arc":
        _check_arc_template(out)
    elif out.get("authserv_id") is not None:
        raise ValueError("authserv_id= only applies to arc(...)")
    canon = out.get("canonicalization")
    if canon is not None:
        canon = out["canonicalization"] = str(canon).strip().lower()
        check_canonicalization(kind, canon)
    algorithm = out.get("algorithm")
    if algorithm is not None:
        algorithm = out["algorithm"] = str(algorithm).strip().lower()
        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {algorithm!r}; use rsa-sha256 or ed25519-sha256"
                + (" (domainkeys: rsa-sha1)" if kind == "domainkeys" else "")
            )
    domain = out.get("domain")
    if domain is not None:
        domain = out["domain"] = str(domain).strip().rstrip(".").lower()
        if "$" in domain:
            check_macros(domain, DOMAIN_MACROS, "d=")
        else:
            domain = out["domain"] = to_alabels(domain)
        if not is_domain(with_sample_macros(domain)):
            raise ValueError(f"d={domain!r} is not a valid domain name")
    identity = out.get("identity")
    if identity is not None:
        identity = str(identity).strip()
        if "$" in identity:
            check_macros(identity, IDENTITY_MACROS, "i=")
        identity = canonical_identity(identity)
        check_identity_syntax(identity, with_sample_macros(identity))
        out["identity"] = identity
    selector = out.get("selector")
    if selector is not None:
        selector = out["selector"] = str(selector).strip()
        check_selector(selector)
    headers = out.get("headers")
    if headers is not None:
        out["headers"] = parse_header_list(headers)
    return SignatureTemplate(**out)


def _check_arc_template(values: dict[str, Any]) -> None:
    """arc(...): RFC 8617 fixes c=relaxed/relaxed and a=rsa-sha256, and has no i=."""
    if str(values.get("canonicalization") or "relaxed/relaxed").lower() not in (
        "relaxed",
        "relaxed/relaxed",
    ):
        raise ValueError("ARC signatures always use c=relaxed/relaxed")
    values.pop("canonicalization", None)
    if str(values.get("algorithm") or "rsa-sha256").lower() != "rsa-sha256":
        raise ValueError("ARC signatures are a=rsa-sha256 (RFC 8617)")
    if values.get("identity") is not None:
        raise ValueError("ARC signatures have no i= tag")
    srv = str(values.get("authserv_id") or "").strip()
    if not HOSTNAME_RE.fullmatch(srv):
        raise ValueError(
            "arc(...) needs authserv_id=NAME: the authserv-id whose Authentication-Results "
            "are sealed"
        )
    values["authserv_id"] = srv.rstrip(".").lower()


def check_canonicalization(kind: str, canon: str) -> None:
    if kind == "dkim":
        if canon == "nowsp":
            raise ValueError(
                "c=nowsp is a pre-RFC draft canonicalization that current verifiers reject; "
                "use relaxed"
            )
        if canon not in DKIM_CANONICALIZATIONS:
            raise ValueError(f"invalid DKIM canonicalization {canon!r}; use relaxed or simple")
    elif canon not in DK_CANONICALIZATIONS:
        raise ValueError(f"invalid DomainKeys canonicalization {canon!r}; use nofws or simple")


def check_selector(selector: str) -> None:
    if not selector:
        raise ValueError("empty selector")
    if "$" in selector:
        raise ValueError(f"macros are not allowed in a selector ({selector!r})")
    if not is_domain(selector.lower()):
        raise ValueError(f"selector {selector!r} is not a valid DNS name")


def with_sample_macros(text: str) -> str:
    """`text` with its macros replaced by typical values, to check the shape of the rest."""
    samples = {"sender": "user@sub.example", "senderdomain": "sub.example", "$": "$"}
    return MACRO_RE.sub(lambda m: samples.get(m.group(1), "sub.example"), text)


def canonical_identity(identity: str) -> str:
    """i= with a literal domain written in lower-case A-labels (U-labels accepted, as for
    `domain`): it is compared with d= in A-labels (RFC 8616 s4). Macros are left alone;
    raises ValueError for a domain that has no A-label form."""
    local, at, domain = identity.rpartition("@")
    if not at or not domain or "$" in domain:
        return identity
    return f"{local}@{to_alabels(domain.rstrip('.').lower())}"


def check_identity_syntax(identity: str, sample: str | None = None) -> None:
    """Check i= (with its macros filled by `sample` values); raise ValueError."""
    local, at, domain = (sample if sample is not None else identity).rpartition("@")
    if not at:
        raise ValueError(f"i={identity!r} needs an '@' (e.g. @example.org or user@example.org)")
    if local and not is_safe_local_part(local):
        raise ValueError(f"i={identity!r}: local part has characters a DKIM tag cannot carry")
    if not is_domain(domain.lower()):
        raise ValueError(f"i={identity!r}: {domain!r} is not a valid domain name")


def parse_header_list(value: str | Iterable[str]) -> list[str]:
    names = value.split(":") if isinstance(value, str) else list(value)
    result: list[str] = []
    for name in names:
        name = str(name).strip().lower()
        if not name:
            continue
        if not FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a header field name")
        result.append(name)
    if not result:
        raise ValueError("empty header list")
    return result
