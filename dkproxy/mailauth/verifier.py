"""Inbound verification: DKIM and DomainKeys signatures, SPF and DMARC for one message.

The work is split so that DNS never blocks the event loop and crypto never waits on DNS:
1. every signature header is parsed and checked without the network (malformed ones end here
   as permerror, which also keeps junk signatures from costing a DNS query);
2. all key records, the DomainKeys sender policy, the DMARC record and SPF are looked up
   concurrently through the shared caching `Resolver`;
3. signatures are verified with the fetched records: DKIM by dkimpy (its canonicalization and
   verification, fed from the prefetched records through its `dnsfunc` hook), DomainKeys by
   `dkproxy.mailauth.domainkeys`.

The report is plain data (`verify_report`); `authresults` turns it into a header and
`verdict.decide` into an SMTP verdict, so the SMTP layer needs neither DKIM nor DNS knowledge.
The per-signature checks of steps 1 and 3 are in `signature_checks`; this module orchestrates.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import arc as arc_mod
from . import dkim_verify
from . import dmarc as dmarc_mod
from . import domainkeys as dk
from .addresses import canonical_domain_or_none
from .authors import author_domains, evaluate_authors, unusable_authors
from .dnsresolver import Resolver, TxtResult
from .message import Message
from .signature_checks import (
    _internal,
    _Pending,
    _prepare_dk,
    _prepare_dkim,
    _unchecked,
    _verify_dk,
    _verify_dkim,
)
from .spf import SpfResult, start_spf_check
from .verdict import decide, matched_actions
from .verify_report import (
    Action,
    Decision,
    DKPolicyResult,
    Method,
    SignatureResult,
    SigValue,
    VerificationReport,
    VerifySettings,
    finish_result,
    overall_result,
)

__all__ = [
    "Action",
    "DKPolicyResult",
    "Decision",
    "Method",
    "SigValue",
    "SignatureResult",
    "VerificationReport",
    "VerifySettings",
    "decide",
    "matched_actions",
    "overall_result",
    "verify_message",
]

log = logging.getLogger("dkproxy.verifier")
#: The policy of a domain whose policy was not looked at (immutable, so made once).
_NO_POLICY = dk.parse_policy(None)
#: What `arc.verify` finds in a message without any ARC field (immutable, so made once).
_NO_ARC = arc_mod.ArcResult("none")

DKIM_FIELD = b"dkim-signature"
DK_FIELD = b"domainkey-signature"
_SIGNATURE_FIELDS = frozenset((DKIM_FIELD, DK_FIELD))

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
        return DKPolicyResult(domain, _NO_POLICY, "accept", "first-party signature")
    answer = await resolver.txt(dk.policy_name(domain))
    if answer.status == "temperror":
        # Mail::DKIM ignores a policy it cannot fetch; so do we (no reject on DNS trouble).
        return DKPolicyResult(domain, _NO_POLICY, "neutral", "policy lookup failed")
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
    headers = message.headers
    names = [name.lower() for name, _value in headers]
    # Every ARC field name starts so (RFC 8617 4.1); without one the chain is "none". Names
    # hold no line break, so in the joined list "arc-" after one starts a name.
    joined = b"\n" + b"\n".join(names)
    arc_fields = b"\narc-" in joined
    for index in [i for i, name in enumerate(names) if name in _SIGNATURE_FIELDS]:
        lname = names[index]
        value = headers[index][1]
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
    # Cached answers (the usual case) are taken as they are: no future, no task.
    answers: dict[str, TxtResult] = {}
    key_tasks: dict[str, asyncio.Future[TxtResult]] = {}
    for name in sorted({p.key_name for p in pending}):
        cached = resolver.cached_txt(name)
        if cached is not None:
            answers[name] = cached
        else:
            key_tasks[name] = resolver.txt_future(name)
    warm: list[asyncio.Future[TxtResult]] = []
    if settings.dmarc:
        for author in authors:
            name = f"_dmarc.{author}"
            if resolver.cached(name, "TXT") is None:
                warm.append(resolver.txt_future(name))
    arc_task: asyncio.Future[arc_mod.ArcResult] | None = None
    if settings.arc and arc_fields:
        arc_task = arc_mod.start_verify(message, resolver, settings.min_key_bits)
    elif settings.arc:
        report.arc = _NO_ARC
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
        # The lookups run concurrently already; they are awaited in turn (not gathered).
        for name, task in key_tasks.items():
            answers[name] = await task
        for item in pending:
            answer = answers[item.key_name]
            check = _verify_dkim if item.method == "dkim" else _verify_dk
            try:
                results[item.index] = check(message, item, answer, settings)
            except Exception as exc:
                log.exception("cannot verify %s signature by %s", item.method, item.base.domain)
                results[item.index] = finish_result(item.base, "permerror", _internal(exc))
        report.signatures = [results[i] for i in sorted(results)]
        if spf_task is not None:
            report.spf = await spf_task
        if arc_task is not None:
            report.arc = await arc_task
        for task in warm:
            await task
    except BaseException:
        started_tasks = [*key_tasks.values(), *warm, spf_task, arc_task]
        for task in (t for t in started_tasks if t is not None):
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
