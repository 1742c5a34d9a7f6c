"""The inbound verification result model: settings, per-signature results, the report.

Plain data shared by the verifier (which fills it), `authresults` (which writes it as an
RFC 8601 header) and `verdict` (which turns it into an SMTP answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from . import arc as arc_mod
from . import dmarc as dmarc_mod
from . import domainkeys as dk
from .spf import SpfResult

Method = Literal["dkim", "domainkeys"]
#: RFC 8601 result words for dkim= and domainkeys= (plus "none" for unsigned mail).
SigValue = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror", "none"]
Action = Literal["accept", "tempfail", "reject"]

#: When no signature passes, the result that decides per-result actions: the one a retry
#: could change first, then outright failures, then what a sender can fix.
_PRIORITY: tuple[SigValue, ...] = ("temperror", "fail", "policy", "permerror", "neutral")


@dataclass(frozen=True)
class VerifySettings:
    """What to check and how strictly; also the reject/tempfail policy used by `decide`.

    `actions` maps "method.result" (e.g. "dkim.fail", "spf.softfail", "dmarc.reject") to
    accept, tempfail or reject; see `matched_actions`.
    """

    authserv_id: str
    max_signatures: int = 5
    min_key_bits: int = 1024
    spf: bool = True
    dmarc: bool = True
    #: Look up the DomainKeys sender policy (`_domainkey.<sender domain>`, o=-) for mail
    #: without a passing first-party signature; needed by reject_fail.
    domainkeys_policy: bool = True
    #: RFC 8301: rsa-sha1 DKIM signatures must not be considered valid. The library default
    #: follows it; the proxy's configuration (allow_sha1) decides, see config.InboundConfig.
    allow_sha1: bool = False
    #: Let a signature pass although its l= leaves canonical body bytes unsigned (RFC 6376
    #: 8.2); off (the default) gives it dkim=policy, see dkproxy.mailauth.bodylength.
    allow_body_length: bool = False
    #: Several TXT records at one selector: try at most this many (RFC 6376 3.6.2.2).
    max_key_records: int = 3
    spf_timeout: float = 20.0
    reject_fail: bool = False
    reject_error: bool = False
    actions: Mapping[str, Action] = field(default_factory=dict)
    #: Verify ARC chains (RFC 8617) in the same pass.
    arc: bool = True
    #: ARC sealers whose passing chain may override a DMARC failure (see arc.trusted_override).
    arc_trusted_sealers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SignatureResult:
    """The verdict on one DKIM-Signature or DomainKey-Signature header field."""

    method: Method
    result: SigValue
    #: Index of the signature field in `message.headers`.
    header_index: int
    domain: str | None = None
    selector: str | None = None
    #: DKIM: i= (default "@d="). DomainKeys: the signing address (From or Sender).
    identity: str | None = None
    #: DomainKeys only: which header the identity came from.
    identity_header: Literal["from", "sender"] | None = None
    algorithm: str | None = None
    #: First characters of b= (RFC 6008 header.b), to tell signatures of one domain apart.
    b_prefix: str | None = None
    key_bits: int | None = None
    reason: str = ""
    #: False for signatures beyond `max_signatures`: reported, never verified.
    checked: bool = True
    #: The key says t=y: RFC 6376/4870 want such mail treated like unsigned mail.
    testing: bool = False
    #: DomainKeys only: the legacy DomainKey-Status word.
    dk_status: str | None = None
    #: DKIM only: (l=, canonical body length) when l= leaves body bytes unsigned.
    body_length: tuple[int, int] | None = None


def overall_result(signatures: list[SignatureResult]) -> SigValue:
    """pass if any checked signature passed, none if there is none, else the most telling
    failure (see _PRIORITY). Testing-mode (t=y) failures count as unsigned, as RFC 6376 and
    RFC 4870 ask; unchecked signatures (over the cap) do not count at all."""
    checked = [s for s in signatures if s.checked]
    if any(s.result == "pass" for s in checked):
        return "pass"
    relevant = {s.result for s in checked if not s.testing}
    for value in _PRIORITY:
        if value in relevant:
            return value
    return "none"


@dataclass(frozen=True)
class DKPolicyResult:
    """The DomainKeys sender signing policy and what it says about this message."""

    domain: str
    policy: dk.DKPolicy
    verdict: Literal["accept", "reject", "neutral"]
    detail: str = ""


@dataclass
class VerificationReport:
    signatures: list[SignatureResult] = field(default_factory=list)
    spf: SpfResult | None = None
    dmarc: dmarc_mod.DmarcResult | None = None
    dk_policy: DKPolicyResult | None = None
    arc: arc_mod.ArcResult | None = None
    #: Evidence when a trusted ARC sealer overrides a DMARC failure (RFC 7489 local_policy).
    dmarc_override: str = ""
    #: Sender (Sender, else From) address used for DomainKeys, if any.
    sender: str | None = None
    #: The SMTP client's address (XFORWARD ADDR, else the peer), for smtp.remote-ip.
    client_ip: str | None = None
    elapsed: float = 0.0
    #: DMARC per author domain, strictest first (`dmarc` is the first);
    #: see dkproxy.mailauth.authors.
    dmarc_authors: list[dmarc_mod.DmarcResult] = field(default_factory=list)
    #: Set when a From field is present but gives no author domain DMARC can evaluate.
    author_problem: str = ""

    @property
    def dkim(self) -> list[SignatureResult]:
        return [s for s in self.signatures if s.method == "dkim"]

    @property
    def domainkeys(self) -> list[SignatureResult]:
        return [s for s in self.signatures if s.method == "domainkeys"]

    @property
    def signature_result(self) -> SigValue:
        """One word for all signatures (DKIM and DomainKeys), see `overall_result`."""
        return overall_result(self.signatures)

    def method_results(self) -> dict[str, str]:
        """The result per method that `actions` keys ("method.result") are matched against.

        dkim/domainkeys: `overall_result` of that method's signatures; spf and dmarc only
        when they were evaluated.
        """
        results = {
            "dkim": overall_result(self.dkim),
            "domainkeys": overall_result(self.domainkeys),
        }
        if self.spf is not None:
            results["spf"] = self.spf.result
        if self.dmarc is not None:
            results["dmarc"] = self.dmarc.result
        if self.arc is not None:
            results["arc"] = self.arc.result
        return results

    def summary(self) -> str:
        """A compact one-line description for the per-message log line."""
        parts = []
        for s in self.signatures:
            tag = f"{s.method}={s.result}"
            if s.domain:
                tag += f"/{s.domain}"
            if not s.checked:
                tag += "(unchecked)"
            parts.append(tag)
        if not self.signatures:
            parts.append("dkim=none")
        if self.spf is not None:
            parts.append(f"spf={self.spf.result}/{self.spf.domain}")
        if self.dmarc is not None:
            parts.append(f"dmarc={self.dmarc.result}/{self.dmarc.from_domain or '-'}")
        if self.dk_policy is not None and self.dk_policy.verdict == "reject":
            parts.append(f"dk-policy=reject/{self.dk_policy.domain}")
        if self.arc is not None:
            parts.append(self.arc.summary())
        if self.dmarc_override:
            parts.append("dmarc-override=arc")
        return " ".join(parts) + f" ({self.elapsed * 1000:.1f} ms)"


@dataclass(frozen=True)
class Decision:
    """What the proxy answers at end of DATA; `reply` is empty for accept."""

    action: Action
    reply: str = ""
    reason: str = ""


def finish_result(base: SignatureResult, result: SigValue, reason: str) -> SignatureResult:
    """`base` with its verdict: the RFC 8601 result word and why."""
    return replace_result(base, result=result, reason=reason)


def replace_result(base: SignatureResult, **changes: object) -> SignatureResult:
    """`dataclasses.replace` without its per-field introspection and frozen __setattr__
    calls (several per signature): the new result's attributes are the old ones updated."""
    if not changes.keys() <= _RESULT_FIELDS:
        return replace(base, **changes)  # type: ignore[arg-type]  # raises, naming the field
    new = object.__new__(SignatureResult)
    attributes = new.__dict__
    attributes.update(base.__dict__)
    attributes.update(changes)
    return new


_RESULT_FIELDS = frozenset(f.name for f in fields(SignatureResult))
