"""DMARC for every author domain of a message (RFC 7489 6.6.1), in A-labels (RFC 8616 s5).

A message can name several authors: one From field with several mailboxes, several From
fields, or a From field that the address parsers split differently (dkproxy.mailauth.addresses takes
every mailbox either parser finds). RFC 7489 6.6.1 asks to run DMARC for each author domain
and to apply the strictest policy among those that fail; several From fields are out of its
scope. dkproxy's choice, safe in every shape: each author domain is evaluated on its own, and
the verdict for the message is the most severe verdict any one of them alone would have given
(`verifier.decide` runs once per author result). Adding an author can therefore only make the
answer stricter, never turn a rejection or a deferral into an acceptance. The one result
reported in Authentication-Results is the strictest, ranked by `_STRICTNESS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace

from . import dmarc as dmarc_mod
from .addresses import parse_mailboxes
from .dnsresolver import Resolver
from .message import Message


def author_domains(message: Message) -> tuple[list[str], str, bool]:
    """(author domains in A-labels, why some or all were unusable, From present).

    Every mailbox of every From field counts. The text explains what could not be used
    (no From field, an address literal, an invalid domain ...); see `unusable_authors`.
    """
    values = message.get_all("from")
    if not values:
        return [], "no From field", False
    domains: list[str] = []
    problems: list[str] = []
    for value in values:
        found = parse_mailboxes(value.decode("utf-8", "replace"))
        domains.extend(d for d in found.domains if d not in domains)
        problems.extend(found.problems)
    if not domains:
        return [], "no usable author domain in From: " + "; ".join(problems), True
    notes = [f"{len(values)} From fields"] if len(values) > 1 else []
    if problems:
        notes.append(UNUSABLE + "; ".join(problems))
    return domains, "; ".join(notes), True


#: How `author_domains` starts the note on mailboxes it could not use beside usable ones.
UNUSABLE = "unusable author mailbox: "


def unusable_authors(reason: str) -> bool:
    """Whether an `author_domains` reason names a From mailbox without a usable domain.

    Such a mailbox (`a"@example.org`, an address literal, a domain IDNA refuses) is shown to
    the reader like any other, but no DMARC policy can be applied to it: under reject_fail
    dkproxy refuses the message (RFC 7489 6.6.1 lets receivers reject a From it cannot
    evaluate), so an unusable author beside a passing one never hides a rejection.
    """
    return reason.startswith("no usable author domain") or UNUSABLE in reason


def _strictness(result: dmarc_mod.DmarcResult) -> int:
    """Sort key, most severe first: a fail under p=reject or p=quarantine outranks a
    temperror (which might hide either); a temperror outranks a fail under p=none."""
    if result.result == "fail":
        return {"reject": 0, "quarantine": 1}.get(result.policy or "none", 3)
    return {"temperror": 2, "permerror": 4, "none": 5, "pass": 6}[result.result]


async def evaluate_authors(
    resolver: Resolver,
    domains: list[str],
    passes: Iterable[dmarc_mod.AuthenticatedDomain],
    temporary: Iterable[dmarc_mod.AuthenticatedDomain] = (),
    *,
    from_error: str = "",
) -> list[dmarc_mod.DmarcResult]:
    """One DMARC result per author domain, strictest first (a single permerror when there is
    no usable author domain). `from_error` (several From fields, unusable mailboxes) is added
    to the first result's reason."""
    pass_list, temp_list = list(passes), list(temporary)
    if not domains:
        return [await dmarc_mod.evaluate(resolver, None, (), from_error=from_error)]
    if len(domains) == 1:
        # The usual single author: awaited directly, no task and no trip through the loop.
        results = [await dmarc_mod.evaluate(resolver, domains[0], pass_list, temp_list)]
    else:
        results = await asyncio.gather(
            *(dmarc_mod.evaluate(resolver, d, pass_list, temp_list) for d in domains)
        )
    ordered = sorted(results, key=_strictness)
    notes = [from_error] if from_error else []
    if len(ordered) > 1:
        others = ", ".join(f"{r.from_domain} {r.result}" for r in ordered[1:])
        notes.append(f"strictest of {len(ordered)} author domains (also {others})")
    if notes:
        head = ordered[0]
        ordered[0] = replace(
            head, reason="; ".join([head.reason, *notes] if head.reason else notes)
        )
    return ordered
