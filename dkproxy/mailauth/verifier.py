"""Inbound verification: DKIM and DomainKeys signatures, SPF and DMARC for one message.

The work is split so that DNS never blocks the event loop and crypto never waits on DNS:
1. every signature header is parsed and checked without the network (malformed ones end here
   as permerror, which also keeps junk signatures from costing a DNS query);
2. all key records, the DomainKeys sender policy, the DMARC record and SPF are looked up
   concurrently through the shared caching `Resolver`;
3. signatures are verified with the fetched records: DKIM by dkimpy (its canonicalization and
   verification, fed from the prefetched records through its `dnsfunc` hook), DomainKeys by
   `dkproxy.mailauth.domainkeys`.

The report is plain data; `authresults` turns it into a header and `decide` into an SMTP
verdict, so the SMTP layer needs neither DKIM nor DNS knowledge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from . import arc as arc_mod
from . import dkim_verify
from . import dmarc as dmarc_mod
from . import domainkeys as dk
from .addresses import canonical_domain_or_none
from .authors import author_domains, evaluate_authors, unusable_authors
from .bodylength import uncovered_body
from .dnsresolver import Resolver, TxtResult
from .message import Message
from .spf import SpfResult, start_spf_check

log = logging.getLogger("dkproxy.verifier")
_dkimpy_log = logging.getLogger("dkproxy.verifier.dkimpy")

Method = Literal["dkim", "domainkeys"]
#: RFC 8601 result words for dkim= and domainkeys= (plus "none" for unsigned mail).
SigValue = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror", "none"]
Action = Literal["accept", "tempfail", "reject"]

DKIM_FIELD = b"dkim-signature"
DK_FIELD = b"domainkey-signature"

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


# --------------------------------------------------------------------------------------------
# Signature preparation (no network)


@dataclass
class _Pending:
    """A signature that passed the offline checks and now needs its key record(s)."""

    method: Method
    index: int
    key_name: str
    base: SignatureResult
    dkim_tags: dict[bytes, bytes] | None = None
    dkim_position: int = 0
    dk_sig: dk.DKSignature | None = None
    #: Canonical header fields and body hashes shared by the message's DKIM signatures.
    hashes: dkim_verify.MessageHashes | None = None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace")


def _b_prefix(value: bytes | None) -> str | None:
    if not value:
        return None
    return re.sub(rb"\s+", b"", value)[:8].decode("ascii", "replace") or None


def _tidy(exc: Exception) -> str:
    """dkimpy's message without Python bytes reprs (b'h' -> h), short enough for a header."""
    return re.sub(r"b'([^']*)'", r"\1", str(exc))[:200]


def _internal(exc: Exception) -> str:
    return f"internal error ({exc.__class__.__name__})"


def _dkim_base(index: int, tags: dict[bytes, bytes]) -> SignatureResult:
    d = _text(tags.get(b"d"))
    identity = _text(tags.get(b"i")) or (f"@{d}" if d else None)
    return SignatureResult(
        method="dkim",
        result="none",
        header_index=index,
        domain=d.lower() if d else None,
        selector=_text(tags.get(b"s")),
        identity=identity,
        algorithm=_text(tags.get(b"a")),
        b_prefix=_b_prefix(tags.get(b"b")),
    )


def _finish(base: SignatureResult, result: SigValue, reason: str) -> SignatureResult:
    return _replace(base, result=result, reason=reason)


def _replace(base: SignatureResult, **changes: object) -> SignatureResult:
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


def _prepare_dkim(index: int, value: bytes, position: int) -> SignatureResult | _Pending:
    """Offline checks of one DKIM-Signature (RFC 6376 6.1.1); a result if it fails them."""
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as exc:
        base = SignatureResult("dkim", "permerror", index)
        return _finish(base, "permerror", f"malformed signature: {exc.__class__.__name__}")
    base = _dkim_base(index, tags)
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as exc:
        return _finish(base, "permerror", _tidy(exc))
    except Exception as exc:  # dkimpy raises IndexError on some i=/d= combinations
        return _finish(base, "permerror", f"invalid signature fields ({exc.__class__.__name__})")
    for name in (b"b", b"bh"):
        try:
            base64.b64decode(re.sub(rb"\s+", b"", tags[name]), validate=True)
        except (binascii.Error, ValueError):
            return _finish(base, "permerror", f"{name.decode()}= is not valid base64")
    signed = {h.strip().lower() for h in tags[b"h"].split(b":")}
    if b"from" not in signed:
        return _finish(base, "permerror", "From field not signed")
    try:
        CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        return _finish(base, "permerror", f"invalid c= value {exc}")
    try:
        domain = tags[b"d"].decode("ascii").rstrip(".")
        selector = tags[b"s"].decode("ascii")
    except UnicodeDecodeError:
        return _finish(base, "permerror", "non-ASCII d= or s=")
    if not domain or not selector:
        return _finish(base, "permerror", "empty d= or s=")
    return _Pending(
        "dkim",
        index,
        f"{selector}._domainkey.{domain}",
        base,
        dkim_tags=tags,
        dkim_position=position,
    )


def _prepare_dk(index: int, value: bytes) -> SignatureResult | _Pending:
    base = SignatureResult("domainkeys", "none", index, algorithm="rsa-sha1")
    try:
        sig = dk.parse_signature(value)
    except dk.DomainKeysError as exc:
        res = dk.signature_error_result(exc)
        tags = _loose_tags(value)
        return _replace(
            base,
            result=res.result,
            reason=res.detail,
            dk_status=res.status,
            domain=(tags.get("d") or "").lower() or None,
            selector=tags.get("s") or None,
            b_prefix=_b_prefix((tags.get("b") or "").encode()),
        )
    base = _replace(
        base,
        domain=sig.d,
        selector=sig.s,
        b_prefix=_b_prefix(sig.tags.get("b", "").encode("latin-1")),
    )
    return _Pending("domainkeys", index, sig.key_name, base, dk_sig=sig)


def _loose_tags(value: bytes) -> dict[str, str]:
    """Best-effort tag split for reporting signatures we will not (or cannot) verify."""
    tags: dict[str, str] = {}
    for part in value.decode("latin-1").split(";"):
        name, sep, val = part.partition("=")
        if sep:
            tags.setdefault(name.strip(), re.sub(r"\s+", "", val))
    return tags


def _unchecked(method: Method, index: int, value: bytes, limit: int) -> SignatureResult:
    tags = _loose_tags(value)
    d = (tags.get("d") or "").lower() or None
    return SignatureResult(
        method=method,
        result="policy",
        header_index=index,
        domain=d,
        selector=tags.get("s") or None,
        identity=(tags.get("i") or (f"@{d}" if d else None)) if method == "dkim" else None,
        algorithm=tags.get("a") or ("rsa-sha1" if method == "domainkeys" else None),
        b_prefix=_b_prefix((tags.get("b") or "").encode()),
        reason=f"not checked: more than {limit} signatures",
        checked=False,
    )


# --------------------------------------------------------------------------------------------
# Verification with key records (no network)


_RANK: dict[str, int] = {"pass": 0, "policy": 1, "fail": 2, "permerror": 3, "neutral": 4}


def _best(results: list[SignatureResult]) -> SignatureResult:
    return min(results, key=lambda r: _RANK.get(r.result, 9))


def _key_records(answer: TxtResult, limit: int) -> tuple[list[bytes], str]:
    note = ""
    records = list(answer.raw)
    if len(records) > 1:
        note = f" ({len(records)} TXT records at selector)"
    return records[:limit], note


def _verify_dkim(
    message: Message, pending: _Pending, answer: TxtResult, settings: VerifySettings
) -> SignatureResult:
    base = pending.base
    if answer.status == "temperror":
        return _finish(base, "temperror", f"key lookup failed: {answer.detail}")
    if answer.status != "ok" or not answer.raw:
        return _finish(base, "permerror", f"no key for signature ({pending.key_name})")
    records, note = _key_records(answer, settings.max_key_records)
    outcomes = []
    for record in records:
        outcomes.append(_verify_dkim_record(message, pending, record, settings))
        if outcomes[-1].result == "pass":
            break
    best = _best(outcomes)
    return _replace(best, reason=best.reason + note) if note else best


def _check_key_tags(key: dict[bytes, bytes], sig: dict[bytes, bytes]) -> str | None:
    """RFC 6376 3.6.1 / 6.1.2 checks dkimpy leaves out; a reason if the key is unusable."""
    version = key.get(b"v")
    if version is not None and version != b"DKIM1":
        return "key record has unsupported version"
    p = key.get(b"p")
    if p is None:
        return "key record has no p= tag"
    if not re.sub(rb"\s+", b"", p):
        return "key revoked"
    ktype = key.get(b"k", b"rsa").lower()
    if ktype not in (b"rsa", b"ed25519"):
        return f"unsupported key type k={ktype.decode('ascii', 'replace')}"
    algorithm = sig[b"a"].lower()
    if not algorithm.startswith(ktype + b"-"):
        return "key type does not match signature algorithm"
    hashes = key.get(b"h")
    if hashes is not None:
        wanted = algorithm.split(b"-", 1)[1]
        if wanted not in {h.strip().lower() for h in hashes.split(b":")}:
            return f"key does not allow hash {wanted.decode('ascii', 'replace')}"
    services = key.get(b"s")
    if services is not None:
        names = {s.strip().lower() for s in services.split(b":")}
        if not names & {b"*", b"email"}:
            return "key is not for email"
    flags = {f.strip().lower() for f in key.get(b"t", b"").split(b":")}
    if b"s" in flags:
        identity = sig.get(b"i", b"@" + sig[b"d"])
        if not _same_domain(identity.rpartition(b"@")[2], sig[b"d"]):
            return "key forbids subdomain identities (t=s)"
    return None


def _same_domain(a: bytes, b: bytes) -> bool:
    """Domain names from tags compared as A-labels (RFC 8616), e.g. i= against d=."""
    first, second = a.decode("utf-8", "replace"), b.decode("utf-8", "replace")
    return (canonical_domain_or_none(first) or first.lower()) == (
        canonical_domain_or_none(second) or second.lower()
    )


def _verify_dkim_record(
    message: Message, pending: _Pending, record: bytes, settings: VerifySettings
) -> SignatureResult:
    base = pending.base
    tags = pending.dkim_tags
    assert tags is not None and pending.hashes is not None
    # Parsed once per distinct record (dkim_verify's cache), not once per message.
    parsed = dkim_verify.key_for(pending.key_name, record)
    if parsed.tags is None:
        return _finish(base, "permerror", "key record syntax error")
    key = parsed.tags
    problem = _check_key_tags(key, tags)
    if problem:
        return _finish(base, "permerror", problem)
    if parsed.error is not None:
        return _finish(base, "permerror", f"unusable key ({parsed.error})")
    bits = parsed.bits
    testing = b"y" in {f.strip().lower() for f in key.get(b"t", b"").split(b":")}
    base = _replace(base, key_bits=bits, testing=testing)
    try:
        valid = dkim_verify.verify(pending.hashes, pending.dkim_position, tags, parsed)
    except dkim.ValidationError as exc:
        text = _tidy(exc)
        if "body hash mismatch" in text:
            return _finish(base, "fail", "body hash mismatch")
        return _finish(base, "permerror", text)
    except dkim.DKIMException as exc:
        return _finish(base, "permerror", _tidy(exc))
    except Exception as exc:
        log.warning("DKIM verification failed on signature by %s: %r", base.domain, exc)
        return _finish(base, "permerror", f"verification error ({exc.__class__.__name__})")
    if not valid:
        return _finish(base, "fail", "signature did not verify")
    ktype = key.get(b"k", b"rsa").lower()
    if ktype == b"rsa" and bits is not None and bits < settings.min_key_bits:
        log.warning(
            "DKIM key %s is %d bits, below the minimum of %d: result policy",
            pending.key_name,
            bits,
            settings.min_key_bits,
        )
        return _finish(
            base, "policy", f"key too short ({bits} bits, {settings.min_key_bits} required)"
        )
    if tags[b"a"].lower() == b"rsa-sha1" and not settings.allow_sha1:
        return _finish(base, "policy", "rsa-sha1 signatures are not accepted (RFC 8301)")
    uncovered = uncovered_body(message.body_bytes(), tags)
    if uncovered is not None and not settings.allow_body_length:
        limit, length = uncovered
        return _replace(
            base,
            result="policy",
            reason=f"l={limit} leaves {length - limit} of {length} body bytes unsigned",
            body_length=uncovered,
        )
    return _finish(base, "pass", "good signature" + (" (key in testing mode)" if testing else ""))


@functools.lru_cache(maxsize=1024)  # once per distinct record, not per message
def _rsa_bits(record: str) -> int | None:
    """Size of the RSA key in a key record, or None when it cannot be read."""
    match = re.search(r"(?:^|;)\s*p\s*=\s*([A-Za-z0-9+/=\s]+)", record)
    if not match:
        return None
    data = re.sub(r"\s+", "", match.group(1))
    try:
        public = serialization.load_der_public_key(base64.b64decode(data + "=" * (-len(data) % 4)))
    except Exception:
        return None
    return public.key_size if isinstance(public, rsa.RSAPublicKey) else None


def _verify_dk(
    message: Message, pending: _Pending, answer: TxtResult, settings: VerifySettings
) -> SignatureResult:
    sig = pending.dk_sig
    assert sig is not None
    if answer.status == "temperror":
        res = dk.dns_error_result(sig, answer.detail)
        return _from_dk(pending.base, res)
    if answer.status != "ok" or not answer.raw:
        return _from_dk(pending.base, dk.verify_with_key(message, pending.index, sig, None))
    records, note = _key_records(answer, settings.max_key_records)
    outcomes = []
    for raw in records:
        text = raw.decode("utf-8", "replace")
        result = _from_dk(pending.base, dk.verify_with_key(message, pending.index, sig, text))
        bits = _rsa_bits(text)
        result = _replace(result, key_bits=bits)
        if result.result == "pass" and bits is not None and bits < settings.min_key_bits:
            log.warning(
                "DomainKeys key %s is %d bits, below the minimum of %d: result policy",
                sig.key_name,
                bits,
                settings.min_key_bits,
            )
            result = _finish(
                result, "policy", f"key too short ({bits} bits, {settings.min_key_bits} required)"
            )
        outcomes.append(result)
        if result.result == "pass":
            break
    best = _best(outcomes)
    return _replace(best, reason=best.reason + note) if note else best


def _from_dk(base: SignatureResult, res: dk.DKResult) -> SignatureResult:
    value: SigValue = res.result
    return _replace(
        base,
        result=value,
        reason=res.detail,
        identity=res.identity,
        identity_header=res.identity_header,
        testing=res.testing,
        dk_status=res.status,
    )


# --------------------------------------------------------------------------------------------
# Message-level checks


def _first_party(sig: SignatureResult, domain: str) -> bool:
    d = canonical_domain_or_none(sig.domain or "") or ""
    return bool(d) and (domain == d or domain.endswith("." + d))


async def _dk_policy(
    resolver: Resolver, domain: str, signatures: list[SignatureResult]
) -> DKPolicyResult:
    first_party = any(s.result == "pass" and _first_party(s, domain) for s in signatures)
    if first_party:
        # Mail::DKIM's DkPolicy->apply accepts before looking at o=: spare the lookup.
        return DKPolicyResult(domain, dk.parse_policy(None), "accept", "first-party signature")
    answer = await resolver.txt(dk.policy_name(domain))
    if answer.status == "temperror":
        # Mail::DKIM ignores a policy it cannot fetch; so do we (no reject on DNS trouble).
        return DKPolicyResult(domain, dk.parse_policy(None), "neutral", "policy lookup failed")
    record = answer.records[0] if answer.status == "ok" and answer.records else None
    policy = dk.parse_policy(record)
    return DKPolicyResult(domain, policy, policy.apply(first_party))


async def verify_message(
    message: Message,
    *,
    client_ip: str | None,
    helo: str | None,
    mail_from: str | None,
    resolver: Resolver,
    settings: VerifySettings,
) -> VerificationReport:
    """Check every signature (up to the cap), SPF and DMARC; never raises for bad input."""
    started = time.perf_counter()
    report = VerificationReport(client_ip=client_ip)
    results: dict[int, SignatureResult] = {}
    pending: list[_Pending] = []
    dkim_position = 0
    checked = 0
    hashes: dkim_verify.MessageHashes | None = None
    for index, (name, value) in enumerate(message.headers):
        lname = name.lower()
        if lname not in (DKIM_FIELD, DK_FIELD):
            continue
        method: Method = "dkim" if lname == DKIM_FIELD else "domainkeys"
        position = dkim_position
        if method == "dkim":
            dkim_position += 1
        if checked >= settings.max_signatures:
            results[index] = _unchecked(method, index, value, settings.max_signatures)
            continue
        checked += 1
        try:
            prepared = (
                _prepare_dkim(index, value, position)
                if method == "dkim"
                else _prepare_dk(index, value)
            )
        except Exception as exc:  # a bug must cost one signature, never the message
            log.exception("cannot parse %s field %d", method, index)
            prepared = SignatureResult(method, "permerror", index, reason=_internal(exc))
        if isinstance(prepared, _Pending):
            if prepared.method == "dkim":
                prepared.hashes = hashes = hashes or dkim_verify.MessageHashes(message)
            pending.append(prepared)
        else:
            results[index] = prepared

    sender = message.sender()
    report.sender = str(sender) if sender else None
    authors, author_error, has_from = author_domains(message)
    if settings.dmarc and has_from and (not authors or unusable_authors(author_error)):
        report.author_problem = author_error

    # Everything that needs DNS starts now and runs concurrently; the DMARC record is only
    # warmed here (its evaluation needs the signature results) and then read from the cache.
    key_names = sorted({p.key_name for p in pending})
    key_tasks = [resolver.txt_future(n) for n in key_names]
    warm: list[asyncio.Future[TxtResult]] = []
    if settings.dmarc:
        warm.extend(resolver.txt_future(f"_dmarc.{a}") for a in authors)
    arc_task: asyncio.Future[arc_mod.ArcResult] | None = None
    if settings.arc:
        arc_task = arc_mod.start_verify(message, resolver, settings.min_key_bits)
    spf_task: asyncio.Future[SpfResult | None] | None = None
    if settings.spf and client_ip:
        spf_task = start_spf_check(
            resolver,
            client_ip,
            mail_from,
            helo,
            receiver=settings.authserv_id,
            total_timeout=settings.spf_timeout,
        )
    try:
        # The lookups run concurrently already; awaiting them in turn (not gather) costs no
        # trip through the event loop when they are answered from the cache.
        answers = {name: await task for name, task in zip(key_names, key_tasks, strict=True)}
        for item in pending:
            answer = answers[item.key_name]
            check = _verify_dkim if item.method == "dkim" else _verify_dk
            try:
                results[item.index] = check(message, item, answer, settings)
            except Exception as exc:
                log.exception("cannot verify %s signature by %s", item.method, item.base.domain)
                results[item.index] = _finish(item.base, "permerror", _internal(exc))
        report.signatures = [results[i] for i in sorted(results)]
        if spf_task is not None:
            report.spf = await spf_task
        if arc_task is not None:
            report.arc = await arc_task
        for task in warm:
            await task
    except BaseException:
        for task in [*key_tasks, *warm, *(t for t in (spf_task, arc_task) if t is not None)]:
            task.cancel()
        raise

    if settings.domainkeys_policy and sender:
        report.dk_policy = await _dk_policy(resolver, sender.domain, report.signatures)
    if settings.dmarc:
        report.dmarc_authors = await _evaluate_dmarc(resolver, report, authors, author_error)
        report.dmarc = report.dmarc_authors[0]
        if report.dmarc.result == "fail" and report.arc is not None and len(authors) == 1:
            # A trusted sealer vouches for one author domain; with several authors there
            # is no override (it must never cover an author domain nobody vouched for).
            report.dmarc_override = arc_mod.trusted_override(
                report.arc, settings.arc_trusted_sealers, authors[0]
            )
    report.elapsed = time.perf_counter() - started
    return report


async def _evaluate_dmarc(
    resolver: Resolver, report: VerificationReport, authors: list[str], author_error: str
) -> list[dmarc_mod.DmarcResult]:
    passes: list[dmarc_mod.AuthenticatedDomain] = []
    temporary: list[dmarc_mod.AuthenticatedDomain] = []
    for sig in report.dkim:
        if not sig.checked or not sig.domain:
            continue
        item = dmarc_mod.AuthenticatedDomain("dkim", sig.domain, sig.result)
        if sig.result == "pass":
            passes.append(item)
        elif sig.result == "temperror":
            temporary.append(item)
    if report.spf is not None and report.spf.domain:
        item = dmarc_mod.AuthenticatedDomain("spf", report.spf.domain, report.spf.result)
        if report.spf.result == "pass":
            passes.append(item)
        elif report.spf.result == "temperror":
            temporary.append(item)
    return await evaluate_authors(resolver, authors, passes, temporary, from_error=author_error)


# --------------------------------------------------------------------------------------------
# Policy


#: Enhanced status codes (RFC 3463, RFC 7372) for a rejection caused by each method.
_REJECT_CODES = {"dkim": "5.7.20", "spf": "5.7.23", "domainkeys": "5.7.1", "dmarc": "5.7.1"}
_SEVERITY: dict[Action, int] = {"accept": 0, "tempfail": 1, "reject": 2}


def matched_actions(
    report: VerificationReport, settings: VerifySettings
) -> list[tuple[str, Action]]:
    """The ("method.result", action) pairs of `settings.actions` that apply to the report.

    "dmarc.reject" / "dmarc.quarantine" apply when DMARC fails and the sender's policy (p=,
    or sp= for a subdomain) is reject / quarantine; "dmarc.fail" applies to any DMARC fail.
    """
    keys = [f"{method}.{result}" for method, result in report.method_results().items()]
    if report.dmarc_override:  # a trusted ARC sealer vouched for the author domain
        keys = [key for key in keys if key != "dmarc.fail"]
    dmarc = report.dmarc
    if (
        dmarc is not None
        and dmarc.result == "fail"
        and dmarc.policy in ("quarantine", "reject")
        and not report.dmarc_override
    ):
        keys.append(f"dmarc.{dmarc.policy}")
    return [(key, settings.actions[key]) for key in keys if key in settings.actions]


def decide(report: VerificationReport, settings: VerifySettings) -> Decision:
    """The SMTP verdict for a verified message (pure: no I/O, no clock).

    In order:
    - reject_fail: 550 when the sender's published policy says reject: DMARC fails and p=
      (sp= for a subdomain) is reject, unless a trusted ARC sealer overrides it; or
      DomainKeys o=- without a passing first-party signature (not when the policy or key is
      in testing mode).
    - reject_error: 451 on a temporary error that could change the outcome: no DKIM or
      DomainKeys signature passed and one hit a temperror, or DMARC itself is temperror.
    - `settings.actions` ("method.result" -> action, see `matched_actions`); the most severe
      matching action wins.
    With several author domains (dkproxy.mailauth.authors) the verdict is the most severe of those
    each author domain's DMARC result alone gives. Under reject_fail, a From field without
    any author domain DMARC can evaluate, or with a mailbox whose domain cannot be used
    beside usable ones, is rejected (the safe result: RFC 7489 6.6.1 leaves such messages
    out of scope).
    """
    if len(report.dmarc_authors) > 1:
        each = [
            decide(replace(report, dmarc=result, dmarc_authors=[result]), settings)
            for result in report.dmarc_authors
        ]
        return max(each, key=lambda d: _SEVERITY[d.action])  # first of the most severe
    if settings.reject_fail and report.author_problem:
        return Decision(
            "reject",
            f"550 5.7.1 Message rejected: DMARC cannot be applied ({report.author_problem})",
            "dmarc-author",
        )
    dmarc = report.dmarc
    if settings.reject_fail:
        if (
            dmarc is not None
            and dmarc.result == "fail"
            and dmarc.policy == "reject"
            and not report.dmarc_override
        ):
            return Decision(
                "reject",
                f"550 5.7.1 Message rejected: DMARC policy of {dmarc.from_domain} "
                f"says reject ({dmarc.reason})",
                "dmarc",
            )
        policy = report.dk_policy
        if policy is not None and policy.verdict == "reject":
            return Decision(
                "reject",
                f"550 5.7.1 Message rejected: DomainKeys policy of {policy.domain} requires "
                "a valid signature",
                "domainkeys-policy",
            )
    if settings.reject_error and (
        report.signature_result == "temperror"
        or (dmarc is not None and dmarc.result == "temperror")
    ):
        return Decision(
            "tempfail",
            "451 4.4.3 Temporary DNS failure verifying the message; please try again later",
            "temperror",
        )
    matched = matched_actions(report, settings)
    if not matched:
        return Decision("accept")
    key, action = max(matched, key=lambda item: _SEVERITY[item[1]])
    method, _, result = key.partition(".")
    if action == "reject":
        code = _REJECT_CODES.get(method, "5.7.1")
        return Decision("reject", f"550 {code} Message rejected: {method}={result}", key)
    if action == "tempfail":
        return Decision(
            "tempfail", f"451 4.7.1 Message deferred: {method}={result}; try again later", key
        )
    return Decision("accept", "", key)
