"""What the inbound path keeps between messages, and for how long.

Parsed keys (DKIM and DomainKeys) and SPF results are kept no longer than the DNS answers
they come from: a key rotated in DNS is used once the old answer's TTL has passed, and an
SPF result is evaluated again once one of its answers has expired. Results that depend on
more than (client address, MAIL FROM domain, HELO) are never kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dkproxy.mailauth import spf as spf_module
from dkproxy.mailauth.dnsresolver import Resolver
from dkproxy.mailauth.spf import SpfResult, check_spf
from tests.support.dnsserver import DNSServer
from tests.support.sink import CaptureServer
from tests.support.testkeys import KeySet, dns_record
from tests.support.verifiers import sign_mail_dkim
from tests.test_inbound import ar_results, send, start_inbound

DOMAIN = "rotate.test"
SELECTOR = "rot"
TTL = 4  # seconds; long enough to send two messages under load, short enough to wait out
MESSAGE = (
    b"From: Alice <alice@rotate.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: key rotation\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <rotate-1@rotate.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def _signed(key_path: str) -> bytes:
    """DKIM and DomainKeys signatures by Perl Mail::DKIM with the given key."""
    dkim_signed = sign_mail_dkim(MESSAGE, key_path, DOMAIN, SELECTOR)
    return sign_mail_dkim(dkim_signed, key_path, DOMAIN, SELECTOR, kind="domainkeys")


def _verdicts(delivered: bytes | None) -> tuple[str, str]:
    assert delivered is not None
    results = ar_results(delivered)
    return results["dkim"][0].result, results["domainkeys"][0].result


def test_rotated_key_is_used_after_the_ttl(
    tmp_path: Path, clean_dns: DNSServer, key_dir: KeySet, capture: CaptureServer
) -> None:
    old_key, new_key = key_dir.rsa2048.path, (key_dir / "rsa2048-pkcs1.pem").as_posix()
    assert dns_record(old_key) != dns_record(new_key)
    old_mail, new_mail = _signed(old_key), _signed(new_key)
    clean_dns.publish({f"{SELECTOR}._domainkey.{DOMAIN}": [dns_record(old_key)]}, ttl=TTL)
    # One worker, so that every message meets the same caches.
    proxy = start_inbound(tmp_path, capture.address, clean_dns, "workers 1")
    try:
        assert send(proxy, old_mail, "alice@rotate.test")[0] == 250
        fetched = time.monotonic()
        clean_dns.publish({f"{SELECTOR}._domainkey.{DOMAIN}": [dns_record(new_key)]}, ttl=TTL)
        assert send(proxy, new_mail, "alice@rotate.test")[0] == 250
        within_ttl = time.monotonic() - fetched < TTL - 0.5
        time.sleep(max(0.0, fetched + TTL + 1.0 - time.monotonic()))
        assert send(proxy, new_mail, "alice@rotate.test")[0] == 250
        assert send(proxy, old_mail, "alice@rotate.test")[0] == 250
    finally:
        proxy.stop()
    first, during, after_new, after_old = (_verdicts(tx.data) for tx in capture.messages)
    assert first == ("pass", "pass")
    if within_ttl:  # the old answer, parsed key included, is still the one in use
        assert during == ("fail", "fail")
    assert after_new == ("pass", "pass")
    assert after_old == ("fail", "fail")


# --------------------------------------------------------------------------------------------
# SPF results


def _lookups(resolver: Resolver) -> int:
    """DNS answers asked of the resolver so far (from its cache or the network)."""
    return resolver.stats.hits + resolver.stats.misses + resolver.stats.coalesced


def _check(resolver: Resolver, ip: str, sender: str, helo: str | None = None) -> SpfResult:
    result = asyncio.run(check_spf(resolver, ip, sender, helo, receiver="mx.test"))
    assert result is not None
    return result


def test_spf_result_kept_until_its_answers_expire(clean_dns: DNSServer) -> None:
    name = "kept.spf.test"
    clean_dns.publish({name: ["v=spf1 ip4:192.0.2.1 -all"]}, ttl=TTL)
    resolver = Resolver(clean_dns.address, timeout=2)
    first = _check(resolver, "192.0.2.1", f"alice@{name}", "mail.kept.test")
    fetched = time.monotonic()
    asked = _lookups(resolver)
    clean_dns.publish({name: ["v=spf1 -all"]}, ttl=TTL)
    # Another mailbox of the same domain, same client and HELO: the kept result, no lookup.
    again = _check(resolver, "192.0.2.1", f"bob@{name}", "mail.kept.test")
    if time.monotonic() - fetched < TTL - 0.5:
        assert _lookups(resolver) == asked
        assert (again.result, again.identity) == ("pass", f"bob@{name}")
    assert first.result == "pass" and first.identity == f"alice@{name}"
    # Another client address, HELO name or domain is another evaluation.
    assert _check(resolver, "192.0.2.2", f"alice@{name}", "mail.kept.test").result == "fail"
    _check(resolver, "192.0.2.1", f"alice@{name}", "other.kept.test")
    assert _lookups(resolver) > asked
    time.sleep(max(0.0, fetched + TTL + 1.0 - time.monotonic()))
    assert _check(resolver, "192.0.2.1", f"alice@{name}", "mail.kept.test").result == "fail"


def test_spf_result_with_local_part_macro_is_not_kept(clean_dns: DNSServer) -> None:
    clean_dns.publish({
        "macro.spf.test": ["v=spf1 include:%{l}._spf.macro.spf.test -all"],
        "alice._spf.macro.spf.test": ["v=spf1 ip4:192.0.2.1 -all"],
    })  # fmt: skip
    resolver = Resolver(clean_dns.address, timeout=2)
    assert _check(resolver, "192.0.2.1", "alice@macro.spf.test").result == "pass"
    # bob's include names a domain without a record: permerror, not alice's pass.
    assert _check(resolver, "192.0.2.1", "bob@macro.spf.test").result == "permerror"


def test_spf_cache_key_is_the_domain_pyspf_checks(clean_dns: DNSServer) -> None:
    """pyspf takes the domain after the first "@": a sender with two "@" must not leave a
    result under the domain after the last one."""
    clean_dns.publish({
        "second.spf.test": ["v=spf1 -all"],
        "first.spf.test@second.spf.test": ["v=spf1 +all"],
    })  # fmt: skip
    resolver = Resolver(clean_dns.address, timeout=2)
    _check(resolver, "192.0.2.1", "x@first.spf.test@second.spf.test")
    assert _check(resolver, "192.0.2.1", "y@second.spf.test").result == "fail"


def test_spf_temperror_is_not_kept(clean_dns: DNSServer) -> None:
    resolver = Resolver(clean_dns.blackhole_address(), timeout=0.5)
    assert _check(resolver, "192.0.2.1", "x@slow.spf.test").result == "temperror"
    asked = _lookups(resolver)
    assert _check(resolver, "192.0.2.1", "x@slow.spf.test").result == "temperror"
    assert _lookups(resolver) > asked  # evaluated again (from the resolver's brief cache)


class _CountingExecutor(ThreadPoolExecutor):
    """The SPF worker pool, counting the evaluations handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_spf_from_cached_answers_needs_no_thread(
    clean_dns: DNSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_dns.publish({
        "loop.spf.test": ["v=spf1 include:_net.loop.spf.test -all"],
        "_net.loop.spf.test": ["v=spf1 ip4:192.0.2.0/28 ~all"],
    })  # fmt: skip
    pool = _CountingExecutor()
    monkeypatch.setattr(spf_module, "_EXECUTOR", pool)
    resolver = Resolver(clean_dns.address, timeout=2)
    assert _check(resolver, "192.0.2.1", "a@loop.spf.test").result == "pass"
    assert pool.submitted == 1  # the answers had to come from the network
    # Other clients: other results, all from the answers now cached, on the event loop.
    assert _check(resolver, "192.0.2.2", "a@loop.spf.test").result == "pass"
    assert _check(resolver, "198.51.100.1", "b@loop.spf.test").result == "fail"
    assert _check(resolver, "192.0.2.3", "a@loop.spf.test", "mail.loop.test").result == "pass"
    assert pool.submitted == 1
    # A domain not looked up yet goes to the thread again.
    assert _check(resolver, "192.0.2.1", "a@other.loop.spf.test").result == "none"
    assert pool.submitted == 2
    pool.shutdown()
