"""DMARC (RFC 7489): policy discovery, identifier alignment and the resulting verdict.

Small on purpose: the verifier already has the DKIM and SPF outcomes, so DMARC here is only
"find the record, check that a pass is aligned with the From domain, report the policy". The
organisational domain comes from the public suffix list shipped inside `publicsuffix2` (no
network fetch, so results do not change under a running daemon).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from publicsuffix2 import PublicSuffixList

from .addresses import canonical_domain_or_none
from .dnsresolver import Resolver, TxtResult

log = logging.getLogger("dkproxy.dmarc")

DmarcValue = Literal["pass", "fail", "none", "temperror", "permerror"]
Policy = Literal["none", "quarantine", "reject"]
Alignment = Literal["r", "s"]

_POLICIES: dict[str, Policy] = {"none": "none", "quarantine": "quarantine", "reject": "reject"}
_ALIGNMENTS: dict[str, Alignment] = {"r": "r", "s": "s"}


@dataclass(frozen=True)
class DmarcRecord:
    """The tags of a DMARC record that matter to a receiver (reporting tags are kept raw)."""

    p: Policy
    sp: Policy | None = None
    adkim: Alignment = "r"
    aspf: Alignment = "r"
    pct: int = 100
    tags: dict[str, str] = field(default_factory=dict)


class DmarcRecordError(ValueError):
    """A record that starts with v=DMARC1 but cannot be used."""


@dataclass(frozen=True)
class AuthenticatedDomain:
    """A domain that passed DKIM or SPF, with the method, for alignment."""

    method: Literal["dkim", "spf"]
    domain: str
    result: str


@dataclass(frozen=True)
class DmarcResult:
    result: DmarcValue
    from_domain: str | None
    #: The policy the sender asks for on failure (sp= for subdomains when given), or None.
    policy: Policy | None = None
    record: DmarcRecord | None = None
    record_domain: str | None = None
    dkim_aligned: bool = False
    spf_aligned: bool = False
    reason: str = ""

    @property
    def disposition(self) -> Policy:
        """What the sender's policy asks for this message (pct= is informative only)."""
        if self.result == "fail" and self.policy is not None:
            return self.policy
        return "none"


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=4096)  # a pure function of the name; asked several times per message
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (the domain itself if it is a suffix).

    Works on A-labels, as the shipped list does (RFC 8616 s5): a U-label name is converted.
    """
    domain = _alabels(domain)
    if not domain:
        return domain
    labels = domain.split(".")
    suffix = _psl().get_tld(domain, wildcard=True, strict=False) or labels[-1]
    wanted = len(suffix.split(".")) + 1
    if len(labels) < wanted:
        return domain
    return ".".join(labels[-wanted:])


def aligned(domain: str, from_domain: str, mode: Alignment) -> bool:
    """Identifier alignment: identical (strict) or same organisational domain (relaxed).

    Both names are compared as A-labels (RFC 8616 s5), whichever form they came in.
    """
    a = _alabels(domain)
    b = _alabels(from_domain)
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return a == b or organizational_domain(a) == organizational_domain(b)


def _alabels(domain: str) -> str:
    """The A-label form for every comparison and look-up; unconvertible names lower-cased."""
    return canonical_domain_or_none(domain) or domain.strip().rstrip(".").lower()


@lru_cache(maxsize=1024)  # parsed once per record text, not once per message
def parse_record(text: str) -> DmarcRecord:
    """Parse a DMARC TXT record; DmarcRecordError when RFC 7489 6.6.3 says ignore it."""
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    for index, part in enumerate(parts):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not name:
            raise DmarcRecordError(f"malformed tag {part!r}")
        if index == 0 and (name != "v" or value != "DMARC1"):
            raise DmarcRecordError("record does not start with v=DMARC1")
        tags.setdefault(name, value)
    has_rua = bool(tags.get("rua"))
    p = _POLICIES.get(tags.get("p", "").lower())
    if p is None:
        if not has_rua:
            raise DmarcRecordError(f"missing or invalid p= ({tags.get('p')!r})")
        p = "none"  # RFC 7489 6.6.3: with a valid rua=, act as if p=none
    sp_raw = tags.get("sp")
    sp = None if sp_raw is None else _POLICIES.get(sp_raw.lower())
    if sp_raw is not None and sp is None and not has_rua:
        raise DmarcRecordError(f"invalid sp= ({sp_raw!r})")
    adkim = _ALIGNMENTS.get(tags.get("adkim", "r").lower())
    aspf = _ALIGNMENTS.get(tags.get("aspf", "r").lower())
    if adkim is None or aspf is None:
        raise DmarcRecordError("invalid adkim=/aspf=")
    pct_text = tags.get("pct", "100")
    if not pct_text.isdigit() or int(pct_text) > 100:
        raise DmarcRecordError(f"invalid pct= ({pct_text!r})")
    return DmarcRecord(p=p, sp=sp, adkim=adkim, aspf=aspf, pct=int(pct_text), tags=tags)


async def _answer(resolver: Resolver, domain: str) -> TxtResult:
    """The TXT answer at _dmarc.<domain>."""
    name = f"_dmarc.{domain}"
    # The verifier warmed this name before; a cached answer needs no coroutine.
    return resolver.cached_txt(name) or await resolver.txt(name)


def _status(answer: TxtResult, domain: str) -> tuple[str, DmarcRecord | None, str]:
    """('ok'|'none'|'temperror'|'permerror', record, reason) for _dmarc.<domain>."""
    if answer.status == "temperror":
        return "temperror", None, f"DNS {answer.detail} for _dmarc.{domain}"
    return _policy_record(answer.raw, domain)


@lru_cache(maxsize=1024)  # a pure function of the answer: read once, not once per message
def _policy_record(raw: tuple[bytes, ...], domain: str) -> tuple[str, DmarcRecord | None, str]:
    """('ok'|'none'|'permerror', record, reason) from the TXT records at _dmarc.<domain>."""
    records = [r.decode("utf-8", "replace") for r in raw]
    candidates = [r for r in records if r.lstrip().startswith("v=DMARC1")]
    if not candidates:
        return "none", None, f"no DMARC record for {domain}"
    if len(candidates) > 1:
        # RFC 7489 6.6.3: several records -> DMARC is not applied.
        return "none", None, f"{len(candidates)} DMARC records for {domain}"
    try:
        return "ok", parse_record(candidates[0]), ""
    except DmarcRecordError as exc:
        return "permerror", None, f"bad DMARC record for {domain}: {exc}"


async def evaluate(
    resolver: Resolver,
    from_domain: str | None,
    passes: Iterable[AuthenticatedDomain],
    temporary: Iterable[AuthenticatedDomain] = (),
    *,
    from_error: str = "",
) -> DmarcResult:
    """Discover the policy for `from_domain` and check alignment of the given passes.

    `passes` are DKIM signatures (d=) and the SPF identity that passed; `temporary` are those
    whose check hit a temporary error: if one of them is aligned and nothing else passed,
    the verdict is temperror rather than fail, so a DNS hiccup never triggers p=reject.
    """
    if from_domain is None:
        return DmarcResult("permerror", None, reason=from_error or "no usable From domain")
    # RFC 7489 6.6.1 / RFC 8616 s5: A-labels before the policy look-up and every comparison.
    canonical = canonical_domain_or_none(from_domain)
    if canonical is None:
        return DmarcResult(
            "permerror", from_domain, reason=f"From domain {from_domain!r} is invalid"
        )
    from_domain = canonical
    first = await _answer(resolver, from_domain)
    org = organizational_domain(from_domain)
    second = None
    if _status(first, from_domain)[0] == "none" and org != from_domain:
        second = await _answer(resolver, org)
    return _judge(from_domain, org, first, second, tuple(passes), tuple(temporary))


@lru_cache(maxsize=1024)  # pure: the same author, answers and passes give the same verdict
def _judge(
    from_domain: str,
    org: str,
    first: TxtResult,
    second: TxtResult | None,
    passes: tuple[AuthenticatedDomain, ...],
    temporary: tuple[AuthenticatedDomain, ...],
) -> DmarcResult:
    """RFC 7489 6.6: the verdict from the answers at _dmarc.<from_domain> and, when that
    has no record, at _dmarc.<org> (`second`)."""
    status, record, reason = _status(first, from_domain)
    record_domain = from_domain
    if second is not None:
        status, record, reason = _status(second, org)
        record_domain = org
    if status == "temperror":
        return DmarcResult("temperror", from_domain, reason=reason)
    if status == "permerror":
        return DmarcResult("permerror", from_domain, reason=reason)
    if record is None:
        return DmarcResult("none", from_domain, reason=reason)
    policy: Policy = record.p
    if record_domain != from_domain and record.sp is not None:
        policy = record.sp
    dkim_ok = any(
        p.method == "dkim" and aligned(p.domain, from_domain, record.adkim) for p in passes
    )
    spf_ok = any(p.method == "spf" and aligned(p.domain, from_domain, record.aspf) for p in passes)

    def verdict(value: DmarcValue, why: str) -> DmarcResult:
        return DmarcResult(
            value,
            from_domain,
            policy=policy,
            record=record,
            record_domain=record_domain,
            dkim_aligned=dkim_ok,
            spf_aligned=spf_ok,
            reason=why,
        )

    if dkim_ok or spf_ok:
        return verdict("pass", "")
    pending = sorted(
        {
            f"{t.method}:{t.domain}"
            for t in temporary
            if aligned(t.domain, from_domain, record.adkim if t.method == "dkim" else record.aspf)
        }
    )
    if pending:
        return verdict("temperror", "temporary error for aligned " + ", ".join(pending))
    return verdict("fail", "no aligned DKIM or SPF pass")
