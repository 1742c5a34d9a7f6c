"""One caching asynchronous DNS resolver for every lookup the verifier makes.

DKIM keys, DomainKeys policies, SPF and DMARC all go through this class so that they share
one cache (a mail flood from one sender costs one key lookup per TTL, not one per message),
one timeout policy and one configured server. Results are plain values with a status, never
exceptions: a verifier has to turn "no such name" into permerror and "server did not answer"
into temperror, and that distinction is easiest to keep when it is data.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

log = logging.getLogger("dkproxy.dnsresolver")

DnsStatus = Literal["ok", "nxdomain", "nodata", "temperror"]

#: Record types the verifier needs; others are refused so a typo cannot silently return [].
SUPPORTED_TYPES = frozenset({"TXT", "A", "AAAA", "MX", "PTR"})

#: EDNS payload size recommended by DNS Flag Day 2020: avoids fragmentation, large enough
#: for a 4096-bit key in one UDP answer; dnspython retries over TCP when it is truncated.
EDNS_PAYLOAD = 1232


@dataclass(frozen=True)
class DnsAnswer:
    """Outcome of one query.

    `records` depends on the type: TXT -> bytes (one per record, its character-strings joined
    without separator), A/AAAA -> address text, MX -> (preference, exchange without final
    dot), PTR -> target without final dot.
    """

    status: DnsStatus
    records: tuple[Any, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class TxtResult:
    """TXT records at a name: one entry per record, strings of a record concatenated."""

    status: DnsStatus
    raw: tuple[bytes, ...] = ()
    detail: str = ""

    @property
    def records(self) -> list[str]:
        """The records as text (invalid UTF-8 replaced: keys and policies are ASCII)."""
        return [r.decode("utf-8", "replace") for r in self.raw]


@dataclass
class CacheStats:
    """Counters for logs and tests: how often the network was spared."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0


@dataclass(frozen=True)
class _Entry:
    expires: float
    answer: DnsAnswer


@dataclass
class ResolverConfig:
    """Tunables kept apart from the Resolver so tests can shorten TTL caps."""

    max_ttl: float = 86400.0
    #: Negative answers (NXDOMAIN/NODATA) are cached for min(SOA negative TTL, this).
    max_negative_ttl: float = 300.0
    #: Temporary errors are remembered briefly, so that one message (which may ask for the
    #: same name twice) and a burst of messages from a domain whose servers are down do not
    #: each wait out a full timeout.
    temperror_ttl: float = 5.0
    #: An answer with more records than this is not used: it counts as a temporary error
    #: (a hostile zone could otherwise make every message cost thousands of records; and
    #: dropping some of them could drop the one that matters, turning fail into none).
    max_answers: int = 50


def parse_servers(server: str) -> list[tuple[str, int]]:
    """Parse "HOST[:PORT][,HOST[:PORT]...]"; IPv6 as "[::1]:53" or a bare "::1"."""
    servers: list[tuple[str, int]] = []
    for item in server.split(","):
        item = item.strip()
        if not item:
            continue
        host, port = item, 53
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise ValueError(f"bad DNS server {item!r}: missing ']'")
            host = item[1:end]
            rest = item[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"bad DNS server {item!r}")
                port = _port(rest[1:], item)
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
            port = _port(port_text, item)
        if not host:
            raise ValueError(f"bad DNS server {item!r}: empty host")
        servers.append((host, port))
    if not servers:
        raise ValueError("no DNS server given")
    return servers


def _address(host: str) -> str:
    """An IP address for a configured server; a host name is resolved once, at start-up."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, 53, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve DNS server name {host!r}: {exc}") from exc
    return str(infos[0][4][0])


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad DNS server {item!r}: bad port")
    return int(text)


class Resolver:
    """Asynchronous stub resolver with a TTL-honouring LRU cache and in-flight coalescing.

    `server` is "HOST:PORT" (several separated by commas); None uses /etc/resolv.conf, and
    127.0.0.1 when that has no nameserver. `timeout` bounds one lookup including retries.
    """

    def __init__(
        self,
        server: str | None = None,
        timeout: float = 5.0,
        max_cache: int = 10000,
        config: ResolverConfig | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("DNS timeout must be positive")
        self.timeout = timeout
        self.max_cache = max(0, max_cache)
        self.config = config or ResolverConfig()
        self.stats = CacheStats()
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
        self._derived: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._resolver = self._make_resolver(server, timeout)

    @staticmethod
    def _make_resolver(server: str | None, timeout: float) -> dns.asyncresolver.Resolver:
        if server:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(_address(host), port)
                for host, port in parse_servers(server)
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                log.warning("no nameserver in /etc/resolv.conf; using 127.0.0.1")
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        # One lookup may take `timeout` in total; within it, retry a silent server a few
        # times (UDP loss) rather than wait the whole budget on one datagram.
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, max(1.0, timeout / 3))
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        # Names in signatures are absolute; never append a local search domain.
        resolver.use_search_by_default = False
        return resolver

    # -- public lookups -----------------------------------------------------------------------

    async def txt(self, name: str) -> TxtResult:
        answer = await self.query(name, "TXT")
        return TxtResult(answer.status, tuple(answer.records), answer.detail)

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The cached answer for name/type while it is fresh, else None (no lookup starts)."""
        key = (_normalise(name), rdtype.upper())
        entry = self._cache.get(key)
        if entry is None or entry.expires <= time.monotonic():
            return None
        self._cache.move_to_end(key)
        self.stats.hits += 1
        return entry.answer

    def cached_txt(self, name: str) -> TxtResult | None:
        """`txt(name)` when the answer is cached and fresh, else None (no lookup starts)."""
        answer = self.cached(name, "TXT")
        if answer is None:
            return None
        return TxtResult(answer.status, tuple(answer.records), answer.detail)

    def txt_future(self, name: str) -> asyncio.Future[TxtResult]:
        """`txt(name)` started now: an already-finished future when the answer is cached (no
        task, no trip through the event loop), else a task doing the lookup."""
        result = self.cached_txt(name)
        if result is not None:
            done: asyncio.Future[TxtResult] = asyncio.get_running_loop().create_future()
            done.set_result(result)
            return done
        return asyncio.ensure_future(self.txt(name))

    async def a(self, name: str) -> DnsAnswer:
        return await self.query(name, "A")

    async def aaaa(self, name: str) -> DnsAnswer:
        return await self.query(name, "AAAA")

    async def mx(self, name: str) -> DnsAnswer:
        return await self.query(name, "MX")

    async def ptr(self, name: str) -> DnsAnswer:
        return await self.query(name, "PTR")

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Cached lookup; concurrent identical lookups share one network query."""
        rdtype = rdtype.upper()
        if rdtype not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported record type {rdtype}")
        key = (_normalise(name), rdtype)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > now:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return entry.answer
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            self.stats.misses += 1
            # The lookup runs as its own task: a caller that is cancelled (client hung up)
            # must not cancel the query the other waiters share.
            task = asyncio.ensure_future(self._lookup_and_store(key))
            self._inflight[key] = task
        else:
            self.stats.coalesced += 1
        return await asyncio.shield(task)

    async def _lookup_and_store(self, key: tuple[str, str]) -> DnsAnswer:
        try:
            answer, ttl = await self._lookup(*key)
        finally:
            self._inflight.pop(key, None)
        self._store(key, answer, ttl)
        return answer

    def expires(self, name: str, rdtype: str) -> float | None:
        """When (time.monotonic()) the cached answer for name/type expires; None if none is
        cached. Lets callers keep results derived from answers no longer than the answers."""
        entry = self._cache.get((_normalise(name), rdtype.upper()))
        return entry.expires if entry is not None else None

    def cache_size(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._derived.clear()

    def derived(self, key: Hashable) -> Any | None:
        """A value computed from DNS answers (see `keep_derived`), while it is fresh."""
        item = self._derived.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._derived[key]
            return None
        self._derived.move_to_end(key)
        return item[1]

    def keep_derived(self, key: Hashable, value: Any, expires: float) -> None:
        """Keep `value`, computed from cached answers, until `expires` (time.monotonic()):
        callers pass the earliest expiry of the answers it was computed from, so it is
        recomputed when any of them is looked up again (RFC 1035 TTL semantics)."""
        if self.max_cache == 0 or expires <= time.monotonic():
            return
        self._derived[key] = (expires, value)
        self._derived.move_to_end(key)
        while len(self._derived) > self.max_cache:
            self._derived.popitem(last=False)

    def preload(self, name: str, rdtype: str, answer: DnsAnswer, ttl: float) -> None:
        """Put an answer in the cache (benchmarks and tests that must not depend on DNS)."""
        self._store((_normalise(name), rdtype.upper()), answer, ttl)

    # -- internals ----------------------------------------------------------------------------

    def _store(self, key: tuple[str, str], answer: DnsAnswer, ttl: float) -> None:
        if ttl <= 0 or self.max_cache == 0:
            return
        self._cache[key] = _Entry(time.monotonic() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cache:
            self._cache.popitem(last=False)

    async def _lookup(self, name: str, rdtype: str) -> tuple[DnsAnswer, float]:
        cfg = self.config
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError) as exc:
            # A name that cannot exist (empty label, label > 63 bytes...): nothing to find.
            return DnsAnswer("nxdomain", (), f"invalid name: {exc}"), cfg.max_negative_ttl
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return DnsAnswer("nxdomain", (), "NXDOMAIN"), _negative_ttl(exc, qname, cfg)
        except dns.resolver.LifetimeTimeout as exc:
            log.info("DNS timeout for %s/%s: %s", name, rdtype, exc)
            return DnsAnswer("temperror", (), "timeout"), cfg.temperror_ttl
        except dns.resolver.NoNameservers as exc:
            log.info("DNS failure for %s/%s: %s", name, rdtype, exc)
            return DnsAnswer("temperror", (), "server failure"), cfg.temperror_ttl
        except (dns.exception.DNSException, OSError) as exc:
            log.info("DNS error for %s/%s: %s", name, rdtype, exc)
            return DnsAnswer("temperror", (), f"DNS error: {exc}"), cfg.temperror_ttl
        ttl = max(0.0, answer.expiration - time.time())
        if answer.rrset is None:
            return DnsAnswer("nodata", (), "no records"), min(ttl, cfg.max_negative_ttl)
        if len(answer.rrset) > cfg.max_answers:
            log.info("DNS answer for %s/%s has %d records, more than max_dns_answers %d",
                     name, rdtype, len(answer.rrset), cfg.max_answers)  # fmt: skip
            detail = f"{len(answer.rrset)} records, more than {cfg.max_answers}"
            return DnsAnswer("temperror", (), detail), cfg.temperror_ttl
        records = tuple(_convert(rdata, rdtype) for rdata in answer.rrset)
        return DnsAnswer("ok", records), min(ttl, cfg.max_ttl)


@functools.lru_cache(maxsize=4096)  # pure; the same names are asked message after message
def _normalise(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _negative_ttl(exc: dns.resolver.NXDOMAIN, qname: dns.name.Name, cfg: ResolverConfig) -> float:
    """The SOA-derived negative TTL of an NXDOMAIN (RFC 2308), capped."""
    try:
        responses = exc.responses()
        response = responses.get(qname) or next(iter(responses.values()), None)
        if isinstance(response, dns.message.QueryMessage):
            return float(min(response.resolve_chaining().minimum_ttl, cfg.max_negative_ttl))
    except Exception:  # a response we cannot read still means NXDOMAIN; cache briefly
        log.debug("cannot read negative TTL for %s", qname, exc_info=True)
    return min(60.0, cfg.max_negative_ttl)


def _convert(rdata: Any, rdtype: str) -> Any:
    if rdtype == "TXT":
        return b"".join(rdata.strings)
    if rdtype in ("A", "AAAA"):
        return str(rdata.address)
    if rdtype == "MX":
        return (int(rdata.preference), rdata.exchange.to_text(omit_final_dot=True))
    return rdata.target.to_text(omit_final_dot=True)  # PTR


#: Type of a dnsfunc-style coroutine, for callers that want to stub the resolver.
TxtLookup = Callable[[str], Awaitable[TxtResult]]
