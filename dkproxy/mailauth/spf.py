"""SPF (RFC 7208) through pyspf, with DNS answered by dkproxy's shared resolver.

pyspf evaluates records correctly (macros, include/redirect, lookup and void limits) but is
synchronous and does its DNS through the module-level function `spf.DNSLookup(name, qtype,
strict, timeout)`. We keep pyspf's evaluator and replace only that hook. When every answer it
needs is in the resolver's cache, the check runs right on the event loop; otherwise it runs in
a worker thread, and the hook hands each query to the event loop's caching `Resolver` and waits
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
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import spf as pyspf

from .addresses import canonical_domain_or_none
from .dnsresolver import DnsAnswer, Resolver

log = logging.getLogger("dkproxy.spf")

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
_QTYPES = frozenset({"TXT", "A", "AAAA", "MX", "PTR"})
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


def _records(name: str, qtype: str, answer: DnsAnswer) -> list[tuple[tuple[str, str], Any]]:
    """An answer in the form pyspf's DNSLookup returns."""
    if answer.status == "temperror":
        raise pyspf.TempError(f"DNS {name}/{qtype}: {answer.detail}")
    key = (name, qtype)
    if qtype == "TXT":
        # pyspf joins the strings of each record itself; hand it one string per record.
        return [(key, [record]) for record in answer.records]
    return [(key, value) for value in answer.records]


def _make_bridge(resolver: Resolver, loop: asyncio.AbstractEventLoop, reuse: _Reuse) -> _Lookup:
    """Lookups from the worker thread, answered by the event loop's resolver."""

    async def query(name: str, qtype: str) -> tuple[DnsAnswer, float | None]:
        answer = await resolver.query(name, qtype)
        return answer, resolver.expires(name, qtype)

    def lookup(name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        if qtype not in _QTYPES:
            return []  # type SPF (99) is only asked in pyspf's "harsh" mode, which we don't use
        future = asyncio.run_coroutine_threadsafe(query(name, qtype), loop)
        try:
            answer, expires = future.result(timeout=resolver.timeout + 2.0)
        except Exception as exc:  # loop gone or wedged: same as a DNS timeout
            future.cancel()
            reuse.keep = False
            raise pyspf.TempError(f"DNS {name}/{qtype}: {exc}") from exc
        reuse.saw(qtype, answer, expires)
        return _records(name, qtype, answer)

    return lookup


class _NotCached(Exception):
    """A lookup the resolver's cache cannot answer: evaluate in the worker thread instead."""


class _CachedBridge:
    """Lookups answered from the resolver's cache only, on the event loop. `missed` is set
    on the first miss, even where pyspf swallows the exception (its exp= lookup does)."""

    def __init__(self, resolver: Resolver, reuse: _Reuse) -> None:
        self.resolver = resolver
        self.reuse = reuse
        self.missed = False

    def __call__(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        if qtype not in _QTYPES:
            return []
        answer = self.resolver.cached(name, qtype)
        if answer is None:
            self.missed = True
            raise _NotCached(f"{name}/{qtype}")
        self.reuse.saw(qtype, answer, self.resolver.expires(name, qtype))
        return _records(name, qtype, answer)


def _check_on_loop(query: Any, resolver: Resolver, reuse: _Reuse) -> tuple[str, int, str] | None:
    """Run pyspf here, without a thread hop, if every answer it needs is cached; else None.

    pyspf is pure computation once the answers are at hand, bounded by its lookup limits
    (RFC 7208 4.6.4), so running it on the loop costs less than handing it to a thread."""
    bridge = _CachedBridge(resolver, reuse)
    context = contextvars.copy_context()
    context.run(_BRIDGE.set, bridge)
    try:
        outcome: tuple[str, int, str] = context.run(query.check)
    except _NotCached:
        return None
    return None if bridge.missed else outcome


def _domain_of(identity: str) -> str:
    """The domain pyspf checked: after the first "@" (pyspf's split_email), so that the
    domain DMARC aligns on is the one whose policy gave the result. With a second "@"
    (`x@attacker.example@victim.example`) that is no domain name and aligns with nothing,
    where the last "@" would have named a domain whose SPF policy was never consulted."""
    domain = identity.partition("@")[2] if "@" in identity else identity
    return domain.rstrip(".").lower()


@dataclass(frozen=True)
class _Check:
    """One SPF check to make: the inputs pyspf gets and what the result will be keyed by."""

    ip: str
    sender: str
    helo: str
    receiver: str
    total_timeout: float

    @property
    def scope(self) -> SpfScope:
        return "mailfrom" if self.sender else "helo"

    @property
    def identity(self) -> str:
        return self.sender if self.sender else self.helo

    @functools.cached_property  # a frozen dataclass keeps it in its __dict__: made once
    def cache_key(self) -> tuple[str, ...]:
        # Keyed on the domain exactly as pyspf reads it (after the first "@", split_email).
        checked_domain = self.sender.split("@", 1)[1].lower() if self.sender else ""
        return ("spf", self.ip, checked_domain, self.helo.lower(), self.receiver)

    def query(self) -> Any:
        return pyspf.query(
            i=self.ip, s=self.sender, h=self.helo, receiver=self.receiver, strict=True,
            querytime=self.total_timeout,
        )  # fmt: skip

    def result(self, outcome: tuple[str, int, str]) -> SpfResult:
        result, _code, explanation = outcome
        value: SpfValue = result if result in _VALUES else "permerror"
        identity = self.identity
        return SpfResult(
            value, self.scope, _domain_of(identity), identity, self.ip, str(explanation or "")
        )


@functools.lru_cache(maxsize=1024)  # pure; clients send many messages
def _client_address(client_ip: str) -> str | None:
    """The client's address in the form pyspf and the result cache use, None if unusable."""
    try:
        return str(ipaddress.ip_address(client_ip.strip().strip("[]").removeprefix("IPv6:")))
    except ValueError:
        return None


def _make_check(
    client_ip: str, mail_from: str | None, helo: str | None, receiver: str, total_timeout: float
) -> _Check | None:
    ip = _client_address(client_ip)
    if ip is None:
        log.info("SPF skipped: bad client address %r", client_ip)
        return None
    return _check_for(ip, mail_from, helo, receiver, total_timeout)


@functools.lru_cache(maxsize=1024)  # pure; a client sends many messages from one sender
def _check_for(
    ip: str, mail_from: str | None, helo: str | None, receiver: str, total_timeout: float
) -> _Check | None:
    """The check for a usable client address (see _make_check); None without an identity."""
    sender = (mail_from or "").strip().strip("<>")
    helo_name = (helo or "").strip().rstrip(".")
    if sender and "@" not in sender:
        sender = "postmaster@" + sender  # RFC 7208 4.3: a bare domain means postmaster@
    # RFC 8616 s3: an SMTPUTF8 MAIL FROM or HELO domain is looked up (and aligned) as A-labels.
    if sender and not sender.isascii():
        local, _, domain = sender.rpartition("@")
        sender = f"{local}@{canonical_domain_or_none(domain) or domain}"
    if helo_name and not helo_name.isascii():
        helo_name = canonical_domain_or_none(helo_name) or helo_name
    if not sender and not helo_name:
        return None
    return _Check(ip, sender, helo_name, receiver, total_timeout)


def _failed(check: _Check, exc: Exception) -> tuple[str, int, str]:
    # A pyspf bug or unexpected input: never lose the message over SPF.
    log.warning("SPF evaluation failed for %s from %s: %s", check.identity, check.ip, exc)
    return "temperror", 0, f"internal error: {exc}"


def _keep(
    resolver: Resolver, check: _Check, result: SpfResult, reuse: _Reuse, started: float
) -> None:
    if reuse.keep and result.result != "temperror":
        expires = reuse.expires if reuse.expires is not None else started + NO_LOOKUP_TTL
        resolver.keep_derived(check.cache_key, result, min(expires, started + MAX_RESULT_TTL))


async def _check_in_thread(resolver: Resolver, check: _Check, started: float) -> SpfResult:
    """pyspf in a worker thread, its lookups answered by the resolver on this loop."""
    loop = asyncio.get_running_loop()
    reuse = _Reuse()
    context = contextvars.copy_context()
    context.run(_BRIDGE.set, _make_bridge(resolver, loop, reuse))
    try:
        outcome = await loop.run_in_executor(_EXECUTOR, context.run, check.query().check)
    except Exception as exc:
        outcome = _failed(check, exc)
        reuse.keep = False
    result = check.result(outcome)
    _keep(resolver, check, result, reuse, started)
    return result


def start_spf_check(
    resolver: Resolver,
    client_ip: str,
    mail_from: str | None,
    helo: str | None,
    *,
    receiver: str = "unknown",
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
) -> asyncio.Future[SpfResult | None]:
    """`check_spf` started now: a finished future when the result is kept or every answer
    is cached (evaluated right here, no task, no thread), else a task."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[SpfResult | None] = loop.create_future()
    check = _make_check(client_ip, mail_from, helo, receiver, total_timeout)
    if check is None:
        done.set_result(None)
        return done
    kept = resolver.derived(check.cache_key)
    if isinstance(kept, SpfResult):
        identity = check.identity
        done.set_result(kept if kept.identity == identity else replace(kept, identity=identity))
        return done
    started = time.monotonic()
    reuse = _Reuse()
    try:
        outcome = _check_on_loop(check.query(), resolver, reuse)
    except Exception as exc:
        outcome = _failed(check, exc)
        reuse.keep = False
    if outcome is None:  # an answer is not cached: the thread waits for the network
        return asyncio.ensure_future(_check_in_thread(resolver, check, started))
    result = check.result(outcome)
    _keep(resolver, check, result, reuse, started)
    done.set_result(result)
    return done


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
    return await start_spf_check(
        resolver, client_ip, mail_from, helo, receiver=receiver, total_timeout=total_timeout
    )


_VALUES = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
