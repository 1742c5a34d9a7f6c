"""SPF (pyspf on dkproxy's resolver) and DMARC, against records served by NSD."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dkproxy.mailauth.authresults import authentication_results
from dkproxy.mailauth.dmarc import (
    AuthenticatedDomain,
    DmarcRecordError,
    aligned,
    evaluate,
    organizational_domain,
    parse_record,
)
from dkproxy.mailauth.dnsresolver import Resolver
from dkproxy.mailauth.message import Message
from dkproxy.mailauth.spf import SpfResult, check_spf
from dkproxy.mailauth.verifier import VerifySettings, decide, verify_message
from tests.support.dnsserver import DNSServer
from tests.support.testkeys import KeySet
from tests.test_authresults import parse_ar
from tests.test_verifier import AUTHSERV, dkimpy_sign, make_message


def spf(
    server: DNSServer | str, ip: str, mail_from: str | None, helo: str | None = None
) -> SpfResult | None:
    address = server if isinstance(server, str) else server.address

    async def main() -> SpfResult | None:
        return await check_spf(Resolver(address, timeout=1), ip, mail_from, helo, total_timeout=5)

    return asyncio.run(main())


# --------------------------------------------------------------------------------------------
# SPF

SPF_CASES = [
    ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.2.10", "pass"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "198.51.100.1", "fail"),
    ("v=spf1 ip4:192.0.2.0/24 ~all", "198.51.100.1", "softfail"),
    ("v=spf1 ?all", "198.51.100.1", "neutral"),
    ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8::25", "pass"),
    ("v=spf1 a mx -all", "192.0.2.25", "pass"),
    ("v=spf1 a mx -all", "192.0.2.99", "fail"),
    ("v=spf1 include:inc.spf.test -all", "203.0.113.7", "pass"),
    ("v=spf1 redirect=inc.spf.test", "203.0.113.8", "fail"),
    ("v=spf1 include:no-spf-here.spf.test -all", "192.0.2.1", "permerror"),
    ("v=spf1 bogus:mechanism -all", "192.0.2.1", "permerror"),
    (None, "192.0.2.1", "none"),
]


@pytest.mark.parametrize(("record", "ip", "expected"), SPF_CASES)
def test_spf_results(clean_dns: DNSServer, record: str | None, ip: str, expected: str) -> None:
    domain = "case.spf.test"
    clean_dns.publish({"inc.spf.test": ["v=spf1 ip4:203.0.113.7 -all"]})
    clean_dns.load_zone_text(
        "case.spf.test.", "@ IN A 192.0.2.24\n@ IN MX 10 mx\nmx IN A 192.0.2.25\n"
    )
    if record is not None:
        clean_dns.publish({domain: [record]})
    result = spf(clean_dns, ip, f"bounce@{domain}", "mail.example.net")
    assert result is not None
    assert (result.result, result.scope, result.domain) == (expected, "mailfrom", domain)
    assert result.identity == f"bounce@{domain}"


def test_spf_two_records_is_permerror(clean_dns: DNSServer) -> None:
    clean_dns.publish({"two.spf.test": ["v=spf1 -all", "v=spf1 +all"]})
    result = spf(clean_dns, "192.0.2.1", "x@two.spf.test")
    assert result is not None and result.result == "permerror"


def test_spf_helo_scope_for_null_sender(clean_dns: DNSServer) -> None:
    clean_dns.publish({"mail.helo.spf.test": ["v=spf1 ip4:192.0.2.33 -all"]})
    result = spf(clean_dns, "192.0.2.33", "", "mail.helo.spf.test")
    assert result is not None
    assert (result.result, result.scope, result.identity) == ("pass", "helo", "mail.helo.spf.test")
    assert result.domain == "mail.helo.spf.test"
    bad = spf(clean_dns, "192.0.2.34", "<>", "mail.helo.spf.test")
    assert bad is not None and bad.result == "fail"


def test_spf_nothing_to_check(clean_dns: DNSServer) -> None:
    assert spf(clean_dns, "not an ip", "a@b.test") is None
    assert spf(clean_dns, "192.0.2.1", "", "") is None
    assert spf(clean_dns, "192.0.2.1", None, None) is None
    bare = spf(clean_dns, "[192.0.2.1]", "nohost.spf.test")  # bare domain: postmaster@
    assert bare is not None and bare.identity == "postmaster@nohost.spf.test"


def test_spf_dns_timeout_is_temperror(clean_dns: DNSServer) -> None:
    result = spf(clean_dns.blackhole_address(), "192.0.2.1", "x@slow.spf.test")
    assert result is not None and result.result == "temperror"


def test_concurrent_checks_use_their_own_resolver(clean_dns: DNSServer) -> None:
    clean_dns.publish({"conc.spf.test": ["v=spf1 ip4:192.0.2.0/24 -all"]})

    async def main() -> list[SpfResult | None]:
        good = Resolver(clean_dns.address, timeout=1)
        dead = Resolver(clean_dns.blackhole_address(), timeout=0.5)
        return list(
            await asyncio.gather(
                check_spf(dead, "192.0.2.1", "x@conc.spf.test", None),
                *(check_spf(good, f"192.0.2.{i}", "x@conc.spf.test", None) for i in range(1, 6)),
                check_spf(good, "198.51.100.1", "x@conc.spf.test", None),
            )
        )

    results = [r.result if r else None for r in asyncio.run(main())]
    assert results == ["temperror"] + ["pass"] * 5 + ["fail"]


# --------------------------------------------------------------------------------------------
# DMARC pieces


def test_parse_record() -> None:
    rec = parse_record("v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=r; pct=20; rua=mailto:a@b")
    assert (rec.p, rec.sp, rec.adkim, rec.aspf, rec.pct) == ("reject", "quarantine", "s", "r", 20)
    assert parse_record("v=DMARC1;p=none").adkim == "r"
    # Invalid p= with a rua= acts as p=none (RFC 7489 6.6.3); without rua= it is unusable.
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:a@b").p == "none"
    for bad in (
        "v=DMARC1; p=bogus",
        "v=DMARC1",
        "p=reject; v=DMARC1",
        "v=DMARC1; p=reject; pct=200",
        "v=DMARC1; p=reject; adkim=x",
        "v=DMARC1; p=reject; sp=maybe",
        "v=DMARC1; p=reject; junk",
    ):
        with pytest.raises(DmarcRecordError):
            parse_record(bad)


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("a.b.example.com", "example.com"),
        ("mail.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("deep.sub.dmarc.test", "dmarc.test"),
        ("Example.COM.", "example.com"),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_alignment_modes() -> None:
    assert aligned("example.com", "example.com", "s")
    assert not aligned("mail.example.com", "example.com", "s")
    assert aligned("mail.example.com", "example.com", "r")
    assert aligned("example.com", "news.example.com", "r")
    assert not aligned("example.co.uk", "other.co.uk", "r")
    assert not aligned("evil-example.com", "example.com", "r")
    assert not aligned("", "example.com", "r")


def dmarc_eval(
    server: DNSServer | str,
    from_domain: str | None,
    *passes: tuple[str, str],
    temp: tuple[tuple[str, str], ...] = (),
) -> Any:
    address = server if isinstance(server, str) else server.address

    async def main() -> Any:
        return await evaluate(
            Resolver(address, timeout=1),
            from_domain,
            [AuthenticatedDomain(m, d, "pass") for m, d in passes],  # type: ignore[arg-type]
            [AuthenticatedDomain(m, d, "temperror") for m, d in temp],  # type: ignore[arg-type]
        )

    return asyncio.run(main())


def test_dmarc_evaluate(clean_dns: DNSServer) -> None:
    clean_dns.publish(
        {
            "_dmarc.dmarc.test": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:r@dmarc.test"],
            "_dmarc.strict.dmarc.test": ["v=DMARC1; p=reject; adkim=s; aspf=s"],
            "_dmarc.two.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
            "_dmarc.broken.test": ["v=DMARC1; p=whatever"],
            "_dmarc.example.co.uk": ["v=DMARC1; p=reject"],
            "_dmarc.other.test": ["not dmarc at all"],
        }
    )
    ok = dmarc_eval(clean_dns, "dmarc.test", ("dkim", "dmarc.test"))
    assert (ok.result, ok.policy, ok.dkim_aligned, ok.spf_aligned) == (
        "pass",
        "reject",
        True,
        False,
    )
    relaxed = dmarc_eval(clean_dns, "dmarc.test", ("dkim", "mail.dmarc.test"))
    assert relaxed.result == "pass"
    spf_only = dmarc_eval(clean_dns, "dmarc.test", ("spf", "bounces.dmarc.test"))
    assert (spf_only.result, spf_only.spf_aligned) == ("pass", True)
    third = dmarc_eval(clean_dns, "dmarc.test", ("dkim", "esp.test"), ("spf", "esp.test"))
    assert (third.result, third.policy, third.disposition) == ("fail", "reject", "reject")
    # A subdomain without its own record uses the organisational domain's sp=.
    sub = dmarc_eval(clean_dns, "news.dmarc.test", ("dkim", "esp.test"))
    assert (sub.result, sub.record_domain, sub.policy) == ("fail", "dmarc.test", "quarantine")
    # strict.dmarc.test has its own record with strict alignment.
    strict = dmarc_eval(
        clean_dns, "strict.dmarc.test", ("dkim", "dmarc.test"), ("spf", "x.strict.dmarc.test")
    )
    assert (strict.result, strict.record_domain) == ("fail", "strict.dmarc.test")
    assert (
        dmarc_eval(clean_dns, "strict.dmarc.test", ("dkim", "strict.dmarc.test")).result == "pass"
    )
    # Public suffix list: co.uk siblings are different organisations.
    assert dmarc_eval(clean_dns, "shop.example.co.uk", ("dkim", "example.co.uk")).result == "pass"
    assert dmarc_eval(clean_dns, "shop.example.co.uk", ("dkim", "other.co.uk")).result == "fail"
    assert dmarc_eval(clean_dns, "nopolicy.test", ("dkim", "x.test")).result == "none"
    assert dmarc_eval(clean_dns, "other.test").result == "none"
    two = dmarc_eval(clean_dns, "two.test")
    assert two.result == "none" and "2 DMARC records" in two.reason
    assert dmarc_eval(clean_dns, "broken.test").result == "permerror"
    assert dmarc_eval(clean_dns, None).result == "permerror"
    # An aligned temporary error (and nothing passing) is temperror, never fail.
    temp = dmarc_eval(clean_dns, "dmarc.test", ("dkim", "esp.test"), temp=(("dkim", "dmarc.test"),))
    assert temp.result == "temperror" and temp.disposition == "none"
    assert dmarc_eval(clean_dns.blackhole_address(), "dmarc.test").result == "temperror"


# --------------------------------------------------------------------------------------------
# End to end: DKIM + SPF + DMARC in one report and one header


def full_verify(server: DNSServer, message: bytes, ip: str, mail_from: str, **kw: Any) -> Any:
    cfg = VerifySettings(authserv_id=AUTHSERV, **kw)

    async def main() -> Any:
        return await verify_message(
            Message(message),
            client_ip=ip,
            helo="mail.example.net",
            mail_from=mail_from,
            resolver=Resolver(server.address, timeout=1),
            settings=cfg,
        )

    report = asyncio.run(main())
    parsed = parse_ar(authentication_results(report, AUTHSERV), AUTHSERV)
    methods = [m for m, _r, _p in parsed]
    assert methods[-2:] == ["spf", "dmarc"]
    assert parsed[-1][1] == report.dmarc.result
    assert parsed[-2][1] == report.spf.result
    return report


def test_end_to_end_dmarc(clean_dns: DNSServer, key_dir: KeySet) -> None:
    clean_dns.publish(
        {
            "_dmarc.brand.test": ["v=DMARC1; p=reject"],
            "brand.test": ["v=spf1 ip4:192.0.2.0/24 -all"],
            "esp.test": ["v=spf1 ip4:198.51.100.0/24 -all"],
        }
    )
    key_dir.rsa1024.publish(clean_dns, "brand.test")
    key_dir.rsa1024.publish(clean_dns, "esp.test")
    plain = make_message("brand.test")
    reject_fail = {"reject_fail": True}

    # Author-domain signature, mail from an ESP: DKIM aligned.
    signed = dkimpy_sign(plain, key_dir.rsa1024, "brand.test")
    report = full_verify(clean_dns, signed, "198.51.100.5", "bounce@esp.test")
    assert (report.spf.result, report.dmarc.result, report.dmarc.dkim_aligned) == (
        "pass",
        "pass",
        True,
    )
    # No signature, but SPF passes for a brand.test MAIL FROM: SPF aligned.
    report = full_verify(clean_dns, plain, "192.0.2.7", "bounce@brand.test")
    assert (report.dmarc.result, report.dmarc.spf_aligned) == ("pass", True)
    # ESP signature and ESP SPF only: DMARC fails, p=reject -> 550 with reject_fail.
    esp = dkimpy_sign(plain, key_dir.rsa1024, "esp.test")
    report = full_verify(clean_dns, esp, "198.51.100.5", "bounce@esp.test")
    assert report.signature_result == "pass" and report.dmarc.result == "fail"
    decision = decide(report, VerifySettings(authserv_id=AUTHSERV, **reject_fail))
    assert decision.action == "reject" and decision.reply.startswith("550 5.7.1")
    # Forged From from a foreign IP: SPF fail, no signature.
    report = full_verify(clean_dns, plain, "203.0.113.9", "bounce@brand.test")
    assert (report.spf.result, report.dmarc.result) == ("fail", "fail")
    # Broken author signature: DKIM fail, DMARC fail.
    broken = signed.replace(b"Hello Bob", b"Hello Eve")
    report = full_verify(clean_dns, broken, "203.0.113.9", "bounce@elsewhere.test")
    assert report.dkim[0].result == "fail" and report.dmarc.result == "fail"
    # Two From fields: DMARC runs for each author domain; the strictest result is reported
    # (esp.test publishes no DMARC record: none outranks brand.test's pass).
    twice = plain.replace(b"To: Bob", b"From: other@esp.test\r\nTo: Bob")
    report = full_verify(clean_dns, twice, "192.0.2.7", "bounce@brand.test")
    assert [(r.from_domain, r.result) for r in report.dmarc_authors] == [
        ("esp.test", "none"),
        ("brand.test", "pass"),
    ]
    assert report.dmarc.result == "none" and "2 From fields" in report.dmarc.reason
    # Checks can be switched off.
    cfg_off = {"spf": False, "dmarc": False}

    async def off() -> Any:
        return await verify_message(
            Message(signed),
            client_ip="192.0.2.7",
            helo=None,
            mail_from="a@brand.test",
            resolver=Resolver(clean_dns.address, timeout=1),
            settings=VerifySettings(authserv_id=AUTHSERV, **cfg_off),
        )

    report = asyncio.run(off())
    assert report.spf is None and report.dmarc is None and report.signature_result == "pass"
