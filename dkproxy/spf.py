"""SPF (RFC 7208) through pyspf, with DNS answered by dkproxy's shared resolver.

pyspf evaluates records correctly (macros, include/redirect, lookup and void limits) but is
synchronous and does its DNS through the module-level function `spf.DNSLookup(name, qtype,
strict, timeout)`. We keep pyspf's evaluator and replace only that hook: the check runs in a
worker thread, and the hook hands each query to the event loop's caching `Resolver` and waits
for the answer. Which resolver a lookup belongs to travels in a context variable, so concurrent
checks (and any other pyspf user in the process, which keeps pyspf's own DNS) never mix.

A result is kept with the resolver's cache, keyed by (client address, MAIL FROM domain, HELO
name), until the first of the DNS answers it was computed from expires: a flood from one
sender costs one evaluation (and one thread hop) per TTL, not one per message. Results that
depend on more than the key are never kept: a temporary error, or any record using the
local-part or time macros (%{s}, %{l}, %{t}; RFC 7208 7.2).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import spf as pyspf

from .dnsresolver import DnsAnswer, Resolver

log = logging.getLogger(__name__)

SpfValue = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
SpfScope = Literal["mailfrom", "helo"]

#: RFC 7208 section 4.6.4 suggests at least 20 s for a whole evaluation.
DEFAULT_TOTAL_TIMEOUT = 20.0

#: Bounds on how long a result is reused (seconds): its answers' TTLs, at most MAX; MIN when
#: the evaluation needed no DNS at all (the result then depends on the key alone).
MAX_RESULT_TTL = 3600.0
NO_LOOKUP_TTL = 300.0
#: Macros whose values are not part of the cache key: sender, local part, time.
_UNKEYED_MACRO = re.compile(rb"%\{[slt]", re.IGNORECASE)

_Lookup = Callable[[str, str], list[tuple[tuple[str, str], Any]]]
_BRIDGE: contextvars.ContextVar[_Lookup | None] = contextvars.ContextVar(
    "dkproxy_spf_bridge", default=None
)
_ORIGINAL_LOOKUP = pyspf.DNSLookup
#: Threads only wait on the event loop, so many are cheap; a bound keeps a DNS outage from
#: piling up unbounded threads.
_EXECUTOR = ThreadPoolExecutor(max_workers=32, thread_name_prefix="dkproxy-spf")


@dataclass(frozen=True)
class SpfResult:
    """One SPF evaluation: `domain` is the checked identity's domain (DMARC aligns on it)."""

    result: SpfValue
    scope: SpfScope
    domain: str
    identity: str
    client_ip: str
    explanation: str = ""


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    """pyspf's DNS hook: our resolver inside a dkproxy check, pyspf's own elsewhere."""
    bridge = _BRIDGE.get()
    if bridge is None:
        return _ORIGINAL_LOOKUP(name, qtype, strict, timeout)
    return bridge(name, qtype)


pyspf.DNSLookup = _dispatch


class _Reuse:
    """What the answers of one evaluation allow: whether, and until when, to keep it."""

    def __init__(self) -> None:
        self.keep = True
        self.expires: float | None = None

    def saw(self, qtype: str, answer: DnsAnswer, expires: float | None) -> None:
        if answer.status == "temperror" or expires is None:
            self.keep = False
            return
        if qtype == "TXT" and any(_UNKEYED_MACRO.search(r) for r in answer.records):
            self.keep = False
        self.expires = expires if self.expires is None else min(self.expires, expires)


def _make_bridge(resolver: Resolver, loop: asyncio.AbstractEventLoop, reuse: _Reuse) -> _Lookup:
    async def query(name: str, qtype: str) -> tuple[DnsAnswer, float | None]:
        answer = await resolver.query(name, qtype)
        return answer, resolver.expires(name, qtype)

    def lookup(name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        if qtype not in ("TXT", "A", "AAAA", "MX", "PTR"):
            return []  # type SPF (99) is only asked in pyspf's "harsh" mode, which we don't use
        future = asyncio.run_coroutine_threadsafe(query(name, qtype), loop)
        try:
            answer, expires = future.result(timeout=resolver.timeout + 2.0)
        except Exception as exc:  # loop gone or wedged: same as a DNS timeout
            future.cancel()
            reuse.keep = False
            raise pyspf.TempError(f"DNS {name}/{qtype}: {exc}") from exc
        reuse.saw(qtype, answer, expires)
        if answer.status == "temperror":
            raise pyspf.TempError(f"DNS {name}/{qtype}: {answer.detail}")
        key = (name, qtype)
        if qtype == "TXT":
            # pyspf joins the strings of each record itself; hand it one string per record.
            return [(key, [record]) for record in answer.records]
        return [(key, value) for value in answer.records]

    return lookup


def _domain_of(identity: str) -> str:
    return identity.rpartition("@")[2].rstrip(".").lower()


async def check_spf(
    resolver: Resolver,
    client_ip: str,
    mail_from: str | None,
    helo: str | None,
    *,
    receiver: str = "unknown",
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
) -> SpfResult | None:
    """Evaluate SPF for MAIL FROM, or for the HELO name when MAIL FROM is null (<>).

    Returns None when there is no identity to check (null sender and no HELO) or the client
    address is unusable; the caller then reports no SPF result rather than a made-up one.
    """
    try:
        ip = str(ipaddress.ip_address(client_ip.strip().strip("[]").removeprefix("IPv6:")))
    except ValueError:
        log.info("SPF skipped: bad client address %r", client_ip)
        return None
    sender = (mail_from or "").strip().strip("<>")
    helo_name = (helo or "").strip().rstrip(".")
    if sender and "@" not in sender:
        sender = "postmaster@" + sender  # RFC 7208 4.3: a bare domain means postmaster@
    if not sender and not helo_name:
        return None
    scope: SpfScope = "mailfrom" if sender else "helo"
    identity = sender if sender else helo_name
    domain = _domain_of(identity)
    # Keyed on the domain exactly as pyspf reads it (after the first "@", split_email).
    checked_domain = sender.split("@", 1)[1].lower() if sender else ""
    cache_key = ("spf", ip, checked_domain, helo_name.lower(), receiver)
    kept = resolver.derived(cache_key)
    if isinstance(kept, SpfResult):
        return kept if kept.identity == identity else replace(kept, identity=identity)
    query = pyspf.query(
        i=ip, s=sender, h=helo_name, receiver=receiver, strict=True, querytime=total_timeout
    )
    loop = asyncio.get_running_loop()
    reuse = _Reuse()
    started = time.monotonic()
    context = contextvars.copy_context()
    context.run(_BRIDGE.set, _make_bridge(resolver, loop, reuse))
    try:
        result, _code, explanation = await loop.run_in_executor(_EXECUTOR, context.run, query.check)
    except Exception as exc:  # pyspf bug or unexpected input: never lose the message over SPF
        log.warning("SPF evaluation failed for %s from %s: %s", identity, ip, exc)
        result, explanation = "temperror", f"internal error: {exc}"
        reuse.keep = False
    value: SpfValue = result if result in _VALUES else "permerror"
    spf_result = SpfResult(value, scope, domain, identity, ip, str(explanation or ""))
    if reuse.keep and value != "temperror":
        expires = reuse.expires if reuse.expires is not None else started + NO_LOOKUP_TTL
        resolver.keep_derived(cache_key, spf_result, min(expires, started + MAX_RESULT_TTL))
    return spf_result


_VALUES = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
