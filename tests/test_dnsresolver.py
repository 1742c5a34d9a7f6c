"""The shared resolver against a real DNS server (NSD on loopback)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dkproxy.mailauth.dnsresolver import DnsAnswer, Resolver, ResolverConfig, parse_servers
from tests.support.dnsserver import DNSServer


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_parse_servers_forms() -> None:
    assert parse_servers("127.0.0.1:5353") == [("127.0.0.1", 5353)]
    assert parse_servers("127.0.0.1") == [("127.0.0.1", 53)]
    assert parse_servers("[::1]:5300") == [("::1", 5300)]
    assert parse_servers("::1") == [("::1", 53)]
    assert parse_servers("10.0.0.1:53, 10.0.0.2:54") == [("10.0.0.1", 53), ("10.0.0.2", 54)]
    for bad in ("127.0.0.1:0", "127.0.0.1:99999", "[::1", "", ":53", "host:port"):
        with pytest.raises(ValueError):
            parse_servers(bad)


def test_txt_strings_joined_records_separate(clean_dns: DNSServer) -> None:
    long_value = "v=DKIM1; k=rsa; p=" + "A" * 600  # split into 255-byte strings by the server
    clean_dns.publish(
        {
            "split.res.test": [["v=DKIM1; ", "k=rsa; ", "p=abc"]],
            "long.res.test": [long_value],
            "two.res.test": ["first record", "second record"],
        }
    )
    raw = clean_dns.query("long.res.test")
    assert len(raw.answer[0][0].strings) == 3  # really split on the wire

    async def main() -> None:
        resolver = Resolver(clean_dns.address, timeout=3)
        split = await resolver.txt("split.res.test")
        assert split.status == "ok"
        assert split.records == ["v=DKIM1; k=rsa; p=abc"]
        long = await resolver.txt("long.res.test.")
        assert long.records == [long_value]
        two = await resolver.txt("two.res.test")
        assert sorted(two.records) == ["first record", "second record"]

    run(main())


def test_nxdomain_nodata_and_other_types(clean_dns: DNSServer) -> None:
    clean_dns.load_zone_text(
        "hosts.res.test.",
        "@ IN A 192.0.2.1\n@ IN AAAA 2001:db8::1\n@ IN MX 10 mx1\n@ IN MX 20 mx2.other.test.\n"
        "mx1 IN A 192.0.2.2\n",
    )
    clean_dns.load_zone_text("2.0.192.in-addr.arpa.", "1 IN PTR host.res.test.\n")

    async def main() -> None:
        resolver = Resolver(clean_dns.address, timeout=3)
        missing = await resolver.txt("nothing-here.res.test")
        assert missing.status == "nxdomain" and missing.records == []
        nodata = await resolver.txt("hosts.res.test")
        assert nodata.status == "nodata"
        assert (await resolver.a("hosts.res.test")).records == ("192.0.2.1",)
        assert (await resolver.aaaa("hosts.res.test")).records == ("2001:db8::1",)
        mx = await resolver.mx("hosts.res.test")
        assert sorted(mx.records) == [(10, "mx1.hosts.res.test"), (20, "mx2.other.test")]
        ptr = await resolver.ptr("1.2.0.192.in-addr.arpa")
        assert ptr.records == ("host.res.test",)
        invalid = await resolver.txt("bad..name.res.test")
        assert invalid.status == "nxdomain"
        assert "invalid name" in invalid.detail
        with pytest.raises(ValueError):
            await resolver.query("hosts.res.test", "SRV")

    run(main())


def test_cache_honours_ttl(clean_dns: DNSServer) -> None:
    clean_dns.publish({"ttl.res.test": ["one"]}, ttl=1)
    clean_dns.publish({"long-ttl.res.test": ["kept"]}, ttl=3600)

    async def main() -> None:
        resolver = Resolver(clean_dns.address, timeout=3)
        assert (await resolver.txt("ttl.res.test")).records == ["one"]
        assert (await resolver.txt("long-ttl.res.test")).records == ["kept"]
        clean_dns.publish({"ttl.res.test": ["two"], "long-ttl.res.test": ["changed"]}, ttl=1)
        # Still cached: the change is not visible yet for either name.
        assert (await resolver.txt("ttl.res.test")).records == ["one"]
        assert (await resolver.txt("long-ttl.res.test")).records == ["kept"]
        assert resolver.stats.hits == 2
        await asyncio.sleep(1.2)
        assert (await resolver.txt("ttl.res.test")).records == ["two"]
        assert (await resolver.txt("long-ttl.res.test")).records == ["kept"]

    run(main())


def test_negative_answers_cached_within_cap(clean_dns: DNSServer) -> None:
    async def main() -> None:
        resolver = Resolver(clean_dns.address, timeout=3, config=ResolverConfig(max_negative_ttl=1))
        assert (await resolver.txt("later.res.test")).status == "nxdomain"
        clean_dns.publish({"later.res.test": ["now here"]})
        assert (await resolver.txt("later.res.test")).status == "nxdomain"  # negative cache
        await asyncio.sleep(1.2)
        assert (await resolver.txt("later.res.test")).records == ["now here"]

    run(main())


def test_timeout_is_temperror_and_bounded(clean_dns: DNSServer) -> None:
    async def main() -> None:
        resolver = Resolver(clean_dns.blackhole_address(), timeout=0.5)
        started = time.monotonic()
        answer = await resolver.txt("sel._domainkey.timeout.res.test")
        elapsed = time.monotonic() - started
        assert answer.status == "temperror"
        assert elapsed < 2.0
        # Remembered briefly: a second ask in the same message does not wait again.
        started = time.monotonic()
        assert (await resolver.txt("sel._domainkey.timeout.res.test")).status == "temperror"
        assert time.monotonic() - started < 0.1

    run(main())


def test_concurrent_lookups_coalesce(clean_dns: DNSServer) -> None:
    clean_dns.publish({"burst.res.test": ["x"]})

    async def main() -> None:
        resolver = Resolver(clean_dns.address, timeout=3)
        answers = await asyncio.gather(*(resolver.txt("burst.res.test") for _ in range(20)))
        assert all(a.records == ["x"] for a in answers)
        assert resolver.stats.misses == 1
        assert resolver.stats.coalesced == 19

    run(main())


def test_cancelled_caller_does_not_break_shared_lookup(clean_dns: DNSServer) -> None:
    async def main() -> None:
        resolver = Resolver(clean_dns.blackhole_address(), timeout=0.4)
        first = asyncio.ensure_future(resolver.txt("c.res.test"))
        second = asyncio.ensure_future(resolver.txt("c.res.test"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).status == "temperror"

    run(main())


def test_cache_is_bounded_lru() -> None:
    async def main() -> None:
        resolver = Resolver("127.0.0.1:9", timeout=1, max_cache=2)
        for name in ("a.test", "b.test", "c.test"):
            resolver.preload(name, "TXT", DnsAnswer("ok", (name.encode(),)), ttl=60)
        assert resolver.cache_size() == 2
        assert (await resolver.txt("c.test")).records == ["c.test"]
        assert (await resolver.txt("b.test")).records == ["b.test"]
        assert resolver.stats.misses == 0

    run(main())
