"""DKIM and DomainKeys verification against keys served by a real DNS server (NSD).

Messages are signed by dkimpy and by Perl Mail::DKIM (the signer DKIMproxy used), then
verified by `verify_message`; every report is also rendered as Authentication-Results and
parsed back with the `authres` package.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from dkproxy.mailauth.authresults import authentication_results
from dkproxy.mailauth.dmarc import DmarcResult
from dkproxy.mailauth.dnsresolver import Resolver
from dkproxy.mailauth.domainkeys import DKPolicy
from dkproxy.mailauth.message import Message
from dkproxy.mailauth.spf import SpfResult
from dkproxy.mailauth.verifier import (
    DKPolicyResult,
    SignatureResult,
    VerificationReport,
    VerifySettings,
    decide,
    verify_message,
)
from tests.support.dnsserver import DNSServer
from tests.support.testkeys import KeySet, TestKey, dns_record, make_rsa_key
from tests.support.verifiers import sign_mail_dkim
from tests.test_authresults import parse_ar

AUTHSERV = "mx.verify.test"


def make_message(domain: str, body: bytes | None = None, sender: bytes = b"alice") -> bytes:
    if body is None:
        body = b"Hello Bob,\r\n\r\nthis is a test message.\r\n"
    return (
        b"Received: from mail." + domain.encode() + b" by mx.verify.test; "
        b"Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: Alice <" + sender + b"@" + domain.encode() + b">\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: verification test\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <test@" + domain.encode() + b">\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n" + body
    )


def dkimpy_sign(
    message: bytes,
    key: TestKey | str,
    domain: str,
    selector: str | None = None,
    **options: Any,
) -> bytes:
    """Prepend a DKIM-Signature made by dkimpy (pure-Python RSA, Ed25519 through PyNaCl)."""
    path = key.path if isinstance(key, TestKey) else key
    with open(path, "rb") as fh:
        pem = fh.read()
    sel = selector or (key.selector if isinstance(key, TestKey) else "sel")
    if isinstance(key, TestKey) and key.kind == "ed25519":
        private = serialization.load_pem_private_key(pem, password=None)
        raw = private.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pem = base64.b64encode(raw)
        options.setdefault("signature_algorithm", b"ed25519-sha256")
    options.setdefault("include_headers", [b"from", b"to", b"subject", b"date", b"message-id"])
    header = dkim.sign(message, sel.encode(), domain.encode(), pem, **options)
    return header + message


def settings(**changes: Any) -> VerifySettings:
    changes.setdefault("spf", False)
    changes.setdefault("dmarc", False)
    return VerifySettings(authserv_id=AUTHSERV, **changes)


def verify(
    message: bytes, server: DNSServer | str, timeout: float = 2.0, **changes: Any
) -> VerificationReport:
    """verify_message with a fresh resolver; also checks the AR header it would write."""
    address = server if isinstance(server, str) else server.address
    report = asyncio.run(
        verify_message(
            Message(message),
            client_ip=None,
            helo=None,
            mail_from=None,
            resolver=Resolver(address, timeout=timeout),
            settings=settings(**changes),
        )
    )
    check_header(report)
    return report


def check_header(report: VerificationReport) -> list[tuple[str, str, dict[str, str]]]:
    """The AR header parses with authres and says what the report says."""
    parsed = parse_ar(authentication_results(report, AUTHSERV), AUTHSERV, keep_dk_none=True)
    sigs = [(m, r) for m, r, _ in parsed if m in ("dkim", "domainkeys")]
    expected = [(s.method, s.result) for s in report.signatures]
    if not report.dkim:
        expected.insert(0, ("dkim", "none"))
    if not report.domainkeys:
        expected.append(("domainkeys", "none"))
    assert sigs == expected
    for (_m, _r, props), sig in zip(
        [p for p in parsed if p[0] in ("dkim", "domainkeys") and p[1:] != ("none", {})],
        report.signatures,
        strict=False,
    ):
        if sig.domain and re.fullmatch(r"[a-z0-9.-]+", sig.domain):
            assert props.get("header.d") == sig.domain
        if sig.method == "dkim" and sig.b_prefix:
            assert props.get("header.b") == sig.b_prefix
            assert len(sig.b_prefix) <= 8
    return parsed


def only(report: VerificationReport) -> SignatureResult:
    assert len(report.signatures) == 1, report.signatures
    return report.signatures[0]


# --------------------------------------------------------------------------------------------
# Good signatures


@pytest.mark.parametrize("key_name", ["rsa2048", "rsa1024", "ed25519", "rsa2048_pkcs1"])
def test_dkimpy_signature_passes(clean_dns: DNSServer, key_dir: KeySet, key_name: str) -> None:
    key: TestKey = getattr(key_dir, key_name)
    domain = f"{key_name.replace('_', '-')}.good.test"
    key.publish(clean_dns, domain)
    report = verify(dkimpy_sign(make_message(domain), key, domain), clean_dns)
    sig = only(report)
    assert (sig.method, sig.result) == ("dkim", "pass")
    assert sig.domain == domain and sig.selector == key.selector
    assert sig.identity == f"@{domain}"
    assert sig.algorithm == ("ed25519-sha256" if key.kind == "ed25519" else "rsa-sha256")
    assert sig.key_bits == key.bits
    assert report.signature_result == "pass"
    parsed = check_header(report)
    assert parsed[0][2] == {
        "header.d": domain,
        "header.i": f"@{domain}",
        "header.s": key.selector,
        "header.a": sig.algorithm,
        "header.b": sig.b_prefix,
    }


def test_2048_bit_key_split_into_255_byte_strings(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "split.good.test"
    name = key_dir.rsa2048.publish(clean_dns, domain)
    strings = clean_dns.query(name, tcp=True).answer[0][0].strings
    assert len(strings) >= 2 and all(len(s) <= 255 for s in strings)
    report = verify(dkimpy_sign(make_message(domain), key_dir.rsa2048, domain), clean_dns)
    assert only(report).result == "pass"


@pytest.mark.parametrize(
    ("method", "algorithm"),
    [
        ("relaxed/simple", "rsa-sha256"),
        ("simple/simple", "rsa-sha256"),
        ("relaxed/relaxed", "rsa-sha256"),
    ],
)
def test_mail_dkim_signature_passes(
    clean_dns: DNSServer, key_dir: KeySet, method: str, algorithm: str
) -> None:
    domain = "perl.good.test"
    key_dir.rsa2048.publish(clean_dns, domain)
    signed = sign_mail_dkim(
        make_message(domain), key_dir.rsa2048.path, domain, "sel2048", method=method
    )
    sig = only(verify(signed, clean_dns))
    assert (sig.method, sig.result, sig.algorithm) == ("dkim", "pass", algorithm)


@pytest.mark.parametrize("method", ["nofws", "simple"])
def test_mail_dkim_domainkeys_signature_passes(
    clean_dns: DNSServer, key_dir: KeySet, method: str
) -> None:
    domain = "dk.good.test"
    key_dir.rsa1024.publish(clean_dns, domain)
    signed = sign_mail_dkim(
        make_message(domain),
        key_dir.rsa1024.path,
        domain,
        "sel1024",
        kind="domainkeys",
        method=method,
    )
    report = verify(signed, clean_dns)
    sig = only(report)
    assert (sig.method, sig.result) == ("domainkeys", "pass")
    assert sig.identity == f"alice@{domain}" and sig.identity_header == "from"
    assert sig.dk_status == "good"
    parsed = check_header(report)
    assert parsed[0] == ("dkim", "none", {})
    assert parsed[1][2]["header.from"] == f"alice@{domain}"
    assert parsed[1][2]["header.d"] == domain


def test_dkim_and_domainkeys_together_and_tampering(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "both.good.test"
    key_dir.rsa2048.publish(clean_dns, domain)
    dk_signed = sign_mail_dkim(
        make_message(domain), key_dir.rsa2048.path, domain, "sel2048", kind="domainkeys"
    )
    both = dkimpy_sign(dk_signed, key_dir.rsa2048, domain)
    report = verify(both, clean_dns)
    assert [(s.method, s.result) for s in report.signatures] == [
        ("dkim", "pass"),
        ("domainkeys", "pass"),
    ]
    tampered = verify(both.replace(b"this is a test", b"this is a TEST"), clean_dns)
    assert [(s.method, s.result) for s in tampered.signatures] == [
        ("dkim", "fail"),
        ("domainkeys", "fail"),
    ]
    assert tampered.signatures[0].reason == "body hash mismatch"
    assert tampered.signatures[1].dk_status == "bad"
    assert tampered.signature_result == "fail"


def test_tampered_signed_header_and_added_from_fail(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "tamper.test"
    key_dir.rsa2048.publish(clean_dns, domain)
    signed = dkimpy_sign(make_message(domain), key_dir.rsa2048, domain)
    subject = only(verify(signed.replace(b"verification test", b"verification TEST"), clean_dns))
    assert (subject.result, subject.reason) == ("fail", "signature did not verify")
    # An unsigned header change does not matter...
    received = only(verify(signed.replace(b"by mx.verify.test", b"by other.test"), clean_dns))
    assert received.result == "pass"
    # ...but a second From added above the signed one does (dkimpy hashes every From).
    added = b"From: Mallory <m@evil.test>\r\n" + signed
    assert only(verify(added, clean_dns)).result == "fail"


def test_l_tag_with_appended_body_is_policy_unless_allowed(
    clean_dns: DNSServer, key_dir: KeySet
) -> None:
    domain = "length.test"
    key_dir.rsa2048.publish(clean_dns, domain)
    signed = dkimpy_sign(make_message(domain), key_dir.rsa2048, domain, length=True)
    assert b" l=" in signed.split(b"\r\n\r\n")[0]
    assert only(verify(signed, clean_dns)).result == "pass"  # l= covers the whole body
    appended = signed + b"-- \r\nmailing list footer\r\n"
    sig = only(verify(appended, clean_dns))
    assert sig.result == "policy" and sig.body_length is not None  # RFC 6376 8.2
    assert sig.body_length[1] - sig.body_length[0] == len(b"-- \r\nmailing list footer\r\n")
    assert only(verify(appended, clean_dns, allow_body_length=True)).result == "pass"


def test_unsigned_message_is_dkim_none(clean_dns: DNSServer) -> None:
    report = verify(make_message("unsigned.test"), clean_dns)
    assert report.signatures == []
    assert report.signature_result == "none"
    header = authentication_results(report, AUTHSERV)
    assert parse_ar(header, AUTHSERV, keep_dk_none=True) == [
        ("dkim", "none", {}),
        ("domainkeys", "none", {}),
        ("arc", "none", {}),
    ]


# --------------------------------------------------------------------------------------------
# Keys: missing, revoked, short, several records, DNS failures


def _record_with(key: TestKey, extra: str) -> str:
    return key.dns_record.replace("v=DKIM1; ", "v=DKIM1; " + extra)


@pytest.mark.parametrize(
    ("record", "result", "reason"),
    [
        (None, "permerror", "no key for signature"),
        ("v=DKIM1; k=rsa; p=", "permerror", "key revoked"),
        ("v=DKIM2; k=rsa; p=AAAA", "permerror", "unsupported version"),
        ("v=DKIM1; k=rsa; p=!!!notbase64!!!", "permerror", "unusable key"),
        ("v=DKIM1; k=rsa; p=QUJD", "permerror", "unusable key"),
        ("v=DKIM1; k=dsa; p=QUJD", "permerror", "unsupported key type"),
        ("this is not a key record", "permerror", "key record syntax error"),
        (lambda r: r.replace("v=DKIM1; ", "v=DKIM1; h=sha1; "), "permerror", "hash sha256"),
        (lambda r: r.replace("v=DKIM1; ", "v=DKIM1; s=tlsrpt; "), "permerror", "not for email"),
        (lambda r: r.replace("k=rsa", "k=ed448"), "permerror", "unsupported key type k=ed448"),
        (lambda r: r.replace("k=rsa", "k=ed25519"), "permerror", "does not match"),
    ],
)
def test_bad_key_records(
    clean_dns: DNSServer,
    key_dir: KeySet,
    record: str | Callable[[str], str] | None,
    result: str,
    reason: str,
) -> None:
    domain = "badkey.test"
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    if callable(record):
        record = record(key_dir.rsa1024.dns_record)
    if record is not None:
        clean_dns.publish({key_dir.rsa1024.dns_name(domain): [record]})
    sig = only(verify(signed, clean_dns))
    assert sig.result == result
    assert reason in sig.reason


def test_key_type_must_match_algorithm(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "ktype.test"
    clean_dns.publish({f"sel1024._domainkey.{domain}": [key_dir.ed25519.dns_record]})
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    sig = only(verify(signed, clean_dns))
    assert (sig.result, sig.reason) == ("permerror", "key type does not match signature algorithm")


def test_strict_key_flag_rejects_subdomain_identity(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "strict.test"
    clean_dns.publish({key_dir.rsa1024.dns_name(domain): [_record_with(key_dir.rsa1024, "t=s; ")]})
    signed = dkimpy_sign(
        make_message(domain), key_dir.rsa1024, domain, identity=b"@sub." + domain.encode()
    )
    sig = only(verify(signed, clean_dns))
    assert sig.result == "permerror" and "t=s" in sig.reason
    plain = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    assert only(verify(plain, clean_dns)).result == "pass"


def test_short_keys_give_policy(
    clean_dns: DNSServer, key_dir: KeySet, tmp_path: Any, caplog: Any
) -> None:
    rsa768 = make_rsa_key(str(tmp_path / "rsa768.pem"), 768)
    cases = [(key_dir.rsa512.path, "sel512", 512), (rsa768, "sel768", 768)]
    for path, selector, bits in cases:
        domain = f"short{bits}.test"
        clean_dns.publish({f"{selector}._domainkey.{domain}": [dns_record(path)]})
        signed = dkimpy_sign(make_message(domain), path, domain, selector)
        with caplog.at_level("WARNING", logger="dkproxy.verifier"):
            sig = only(verify(signed, clean_dns))
        assert (sig.result, sig.key_bits) == ("policy", bits)
        assert f"key too short ({bits} bits, 1024 required)" == sig.reason
        assert f"is {bits} bits" in caplog.text
        # A broken signature with a short key is still just a failure.
        broken = only(verify(signed.replace(b"Hello Bob", b"Hello Eve"), clean_dns))
        assert broken.result == "fail"
    # The minimum is configurable: 1024 bits is too short when 2048 are required.
    domain = "min2048.test"
    key_dir.rsa1024.publish(clean_dns, domain)
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    assert only(verify(signed, clean_dns, min_key_bits=2048)).result == "policy"
    assert only(verify(signed, clean_dns)).result == "pass"


def test_short_domainkeys_key_gives_policy(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "dkshort.test"
    key_dir.rsa512.publish(clean_dns, domain)
    signed = sign_mail_dkim(
        make_message(domain), key_dir.rsa512.path, domain, "sel512", kind="domainkeys"
    )
    sig = only(verify(signed, clean_dns))
    assert (sig.method, sig.result, sig.key_bits) == ("domainkeys", "policy", 512)


def test_rsa_sha1_is_policy_unless_allowed(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "sha1.test"
    key_dir.rsa1024.publish(clean_dns, domain)
    signed = dkimpy_sign(
        make_message(domain), key_dir.rsa1024, domain, signature_algorithm=b"rsa-sha1"
    )
    sig = only(verify(signed, clean_dns))
    assert (sig.result, sig.algorithm) == ("policy", "rsa-sha1")
    assert only(verify(signed, clean_dns, allow_sha1=True)).result == "pass"


def test_several_txt_records_at_selector(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "multi.test"
    name = key_dir.rsa1024.dns_name(domain)
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    right = key_dir.rsa1024.dns_record
    wrong = key_dir.rsa2048.dns_record
    # RFC 6376 3.6.2.2: the verifier may try each record; one good key is enough.
    clean_dns.publish({name: ["some unrelated text", right]})
    sig = only(verify(signed, clean_dns))
    assert sig.result == "pass" and "2 TXT records" in sig.reason
    clean_dns.publish({name: [wrong, right]})
    assert only(verify(signed, clean_dns)).result == "pass"
    clean_dns.publish({name: [wrong, "v=DKIM1; p="]})
    sig = only(verify(signed, clean_dns))
    assert sig.result == "fail"  # the best outcome among the records
    clean_dns.publish({name: ["junk one", "junk two"]})
    assert only(verify(signed, clean_dns)).result == "permerror"
    # DomainKeys goes through the same path.
    dk_domain = "dkmulti.test"
    clean_dns.publish({key_dir.rsa1024.dns_name(dk_domain): ["junk", right]})
    dk_signed = sign_mail_dkim(
        make_message(dk_domain), key_dir.rsa1024.path, dk_domain, "sel1024", kind="domainkeys"
    )
    assert only(verify(dk_signed, clean_dns)).result == "pass"


def test_dns_timeout_is_temperror(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "timeout.test"
    message = dkimpy_sign(
        sign_mail_dkim(
            make_message(domain), key_dir.rsa1024.path, domain, "sel1024", kind="domainkeys"
        ),
        key_dir.rsa1024,
        domain,
    )
    started = time.monotonic()
    report = verify(message, clean_dns.blackhole_address(), timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert [(s.method, s.result) for s in report.signatures] == [
        ("dkim", "temperror"),
        ("domainkeys", "temperror"),
    ]
    assert report.signature_result == "temperror"
    assert decide(report, settings(reject_error=True)).reply.startswith("451 4.4.3 ")
    assert decide(report, settings()).action == "accept"


def test_testing_mode_key_does_not_count_as_failure(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "testing.test"
    clean_dns.publish({key_dir.rsa1024.dns_name(domain): [_record_with(key_dir.rsa1024, "t=y; ")]})
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    good = only(verify(signed, clean_dns))
    assert good.result == "pass" and good.testing
    report = verify(signed.replace(b"Hello Bob", b"Hello Eve"), clean_dns)
    assert only(report).result == "fail" and only(report).testing
    assert report.signature_result == "none"
    assert decide(report, settings(actions={"dkim.fail": "reject"})).action == "accept"


# --------------------------------------------------------------------------------------------
# Malformed signature headers


def _mutate_signature(
    message: bytes, change: Callable[[dict[str, str]], dict[str, str] | str]
) -> bytes:
    """Rewrite the first DKIM-Signature's tags (unfolded; relaxed c= makes that harmless)."""
    field, rest = message.split(b"\r\n", 1)
    while rest[:1] in (b" ", b"\t"):
        line, rest = rest.split(b"\r\n", 1)
        field += line
    name, value = field.decode().split(":", 1)
    assert name == "DKIM-Signature"
    tags = {}
    for part in value.split(";"):
        if part.strip():
            key, _, val = part.strip().partition("=")
            tags[key] = val
    changed = change(tags)
    text = (
        changed if isinstance(changed, str) else "; ".join(f"{k}={v}" for k, v in changed.items())
    )
    return f"DKIM-Signature: {text}".encode() + b"\r\n" + rest


def _drop(tag: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda tags: {k: v for k, v in tags.items() if k != tag}


def _set(tag: str, val: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda tags: {**tags, tag: val}


_NOW = int(time.time())
_OTHER_BH = base64.b64encode(hashlib.sha256(b"other").digest()).decode()

MALFORMED: list[tuple[str, Callable[[dict[str, str]], dict[str, str] | str], str, str]] = [
    ("unchanged", lambda t: t, "pass", "good signature"),
    ("missing v", _drop("v"), "permerror", "missing v="),
    ("bad v", _set("v", "2"), "permerror", "v= value is not 1"),
    ("missing a", _drop("a"), "permerror", "missing a="),
    ("bad a", _set("a", "rsa-md5"), "permerror", "unknown signature algorithm"),
    ("missing b", _drop("b"), "permerror", "missing b="),
    ("b not base64", _set("b", "!!!!"), "permerror", "b= value is not valid base64"),
    ("b bad padding", _set("b", "abc"), "permerror", "b= value is not valid base64"),
    ("missing bh", _drop("bh"), "permerror", "missing bh="),
    ("bh mismatch", _set("bh", _OTHER_BH), "fail", "body hash mismatch"),
    ("bh not base64", _set("bh", "@@@@"), "permerror", "bh= is not valid base64"),
    ("missing d", _drop("d"), "permerror", "missing d="),
    ("missing s", _drop("s"), "permerror", "missing s="),
    ("missing h", _drop("h"), "permerror", "missing h="),
    ("From not signed", _set("h", "to : subject"), "permerror", "From field not signed"),
    ("i not under d", _set("i", "@other.test"), "permerror", "not a subdomain of d="),
    ("i at subdomain", _set("i", "user@sub.malformed.test"), "fail", "signature did not verify"),
    ("x expired", _set("x", str(_NOW - 3 * 86400)), "permerror", "x= value is past"),
    (
        "x before t",
        lambda t: {**t, "t": str(_NOW), "x": str(_NOW - 10)},
        "permerror",
        "less than t=",
    ),
    ("t in future", _set("t", str(_NOW + 3 * 86400)), "permerror", "t= value is in the future"),
    ("l not a number", _set("l", "ten"), "permerror", "l= value is not a decimal"),
    ("l too short", _set("l", "5"), "fail", "body hash mismatch"),
    ("bad c", _set("c", "relaxed/bogus"), "permerror", "invalid c= value"),
    ("bad q", _set("q", "http"), "permerror", "q= value is not dns/txt"),
    ("bad d chars", _set("d", "exa(mple).test"), "permerror", "d= value is not valid"),
    (
        "duplicate tag",
        lambda t: "; ".join(f"{k}={v}" for k, v in t.items()) + "; d=x.test",
        "permerror",
        "malformed signature",
    ),
    ("not tag=value", lambda t: "this is not a signature", "permerror", "malformed signature"),
]


@pytest.mark.parametrize(
    ("label", "change", "result", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_signature_tags(
    clean_dns: DNSServer,
    key_dir: KeySet,
    label: str,
    change: Callable[[dict[str, str]], dict[str, str] | str],
    result: str,
    reason: str,
) -> None:
    domain = "malformed.test"
    key_dir.rsa1024.publish(clean_dns, domain)
    signed = dkimpy_sign(
        make_message(domain), key_dir.rsa1024, domain, canonicalize=(b"relaxed", b"simple")
    )
    sig = only(verify(_mutate_signature(signed, change), clean_dns))
    assert sig.method == "dkim"
    assert sig.result == result, sig.reason
    assert reason in sig.reason


def test_internal_error_costs_one_signature_only(
    clean_dns: DNSServer, key_dir: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    domain = "bug.test"
    key_dir.rsa1024.publish(clean_dns, domain)
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    dk_field = b"DomainKey-Signature: a=rsa-sha1; c=nofws; d=bug.test; s=sel1024; b=AAAA\r\n"

    def broken(*args: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("dkproxy.mailauth.verifier.dk.verify_with_key", broken)
    report = verify(signed.replace(b"Received:", dk_field + b"Received:", 1), clean_dns)
    assert [(s.method, s.result) for s in report.signatures] == [
        ("dkim", "pass"),
        ("domainkeys", "permerror"),
    ]
    assert report.signatures[1].reason == "internal error (RuntimeError)"


def test_malformed_domainkeys_signature(clean_dns: DNSServer) -> None:
    message = (
        b"DomainKey-Signature: a=rsa-sha1; c=nofws; d=dkbad.test; s=sel; q=dns\r\n"
        + make_message("dkbad.test")
    )
    sig = only(verify(message, clean_dns))
    assert (sig.method, sig.result, sig.dk_status) == ("domainkeys", "permerror", "bad format")
    assert "missing b" in sig.reason
    assert sig.domain == "dkbad.test"


# --------------------------------------------------------------------------------------------
# The cap on signatures


def test_signatures_beyond_the_cap_are_reported_unchecked(
    clean_dns: DNSServer, key_dir: KeySet
) -> None:
    domain = "cap.test"
    key_dir.rsa1024.publish(clean_dns, domain)
    signed = dkimpy_sign(make_message(domain), key_dir.rsa1024, domain)
    header = signed.split(b"Received:", 1)[0]  # the DKIM-Signature field
    many = header * 7 + signed[len(header) :]
    report = verify(many, clean_dns)
    assert [s.result for s in report.signatures] == ["pass"] * 5 + ["policy"] * 2
    assert [s.checked for s in report.signatures] == [True] * 5 + [False] * 2
    assert all("not checked" in s.reason for s in report.signatures[5:])
    assert report.signatures[6].domain == domain
    assert report.signature_result == "pass"
    parsed = check_header(report)
    assert [m for m, _r, _p in parsed] == ["dkim"] * 7 + ["domainkeys", "arc"]  # both =none
    # Unchecked signatures never trigger a per-result action.
    assert decide(report, settings(actions={"dkim.policy": "reject"})).action == "accept"
    one = verify(many, clean_dns, max_signatures=1)
    assert [s.result for s in one.signatures] == ["pass"] + ["policy"] * 6


# --------------------------------------------------------------------------------------------
# DomainKeys sender policy and decide()


def test_domainkeys_policy_signs_all(clean_dns: DNSServer, key_dir: KeySet) -> None:
    domain = "dkpolicy.test"
    clean_dns.publish({f"_domainkey.{domain}": ["o=-"]})
    key_dir.rsa1024.publish(clean_dns, domain)
    unsigned = verify(make_message(domain), clean_dns)
    assert unsigned.dk_policy is not None and unsigned.dk_policy.verdict == "reject"
    decision = decide(unsigned, settings(reject_fail=True))
    assert decision.action == "reject" and decision.reply.startswith("550 5.7.1 ")
    assert domain in decision.reply
    assert decide(unsigned, settings()).action == "accept"
    signed = sign_mail_dkim(
        make_message(domain), key_dir.rsa1024.path, domain, "sel1024", kind="domainkeys"
    )
    ok = verify(signed, clean_dns)
    assert ok.dk_policy is not None and ok.dk_policy.verdict == "accept"
    assert decide(ok, settings(reject_fail=True)).action == "accept"
    bad = verify(signed.replace(b"Hello Bob", b"Hello Eve"), clean_dns)
    assert decide(bad, settings(reject_fail=True)).action == "reject"
    clean_dns.publish({f"_domainkey.{domain}": ["o=-; t=y"]})
    testing = verify(make_message(domain), clean_dns)
    assert testing.dk_policy is not None and testing.dk_policy.verdict == "neutral"
    assert decide(testing, settings(reject_fail=True)).action == "accept"


def _report(**kw: Any) -> VerificationReport:
    return VerificationReport(**kw)


def test_decide_pure_policies() -> None:
    fail_sig = SignatureResult("dkim", "fail", 0, domain="x.test")
    temp_sig = SignatureResult("dkim", "temperror", 1, domain="y.test")
    pass_sig = SignatureResult("dkim", "pass", 2, domain="z.test")
    reject = DmarcResult("fail", "x.test", policy="reject", reason="no aligned pass")
    quarantine = DmarcResult("fail", "x.test", policy="quarantine")
    dmarc_temp = DmarcResult("temperror", "x.test", policy="reject")

    strict = settings(reject_fail=True, reject_error=True)
    decision = decide(_report(signatures=[fail_sig], dmarc=reject), strict)
    assert decision.action == "reject" and decision.reply.startswith("550 5.7.1 ")
    assert "DMARC policy of x.test" in decision.reply
    assert decide(_report(signatures=[fail_sig], dmarc=reject), settings()).action == "accept"
    assert decide(_report(dmarc=quarantine), strict).action == "accept"
    # Temporary errors: only when nothing passed, or DMARC itself is temporary.
    assert decide(_report(signatures=[fail_sig, temp_sig]), strict).action == "tempfail"
    assert decide(_report(signatures=[temp_sig, pass_sig]), strict).action == "accept"
    assert decide(_report(dmarc=dmarc_temp), strict).reply.startswith("451 ")
    assert decide(_report(signatures=[temp_sig]), settings()).action == "accept"
    # Per-result actions, "method.result"; dkim/domainkeys use the method's overall result.
    actions = settings(
        actions={"dkim.fail": "reject", "dkim.none": "tempfail", "dkim.permerror": "accept"}
    )
    d = decide(_report(signatures=[fail_sig]), actions)
    assert (d.action, d.reply[:10], d.reason) == ("reject", "550 5.7.20", "dkim.fail")
    d = decide(_report(), actions)
    assert (d.action, d.reply[:3]) == ("tempfail", "451")
    assert decide(_report(signatures=[fail_sig, pass_sig]), actions).action == "accept"
    spf_soft = SpfResult("softfail", "mailfrom", "x.test", "a@x.test", "192.0.2.1")
    mixed = settings(
        actions={"spf.softfail": "tempfail", "dmarc.quarantine": "reject", "dkim.pass": "accept"}
    )
    d = decide(_report(signatures=[pass_sig], spf=spf_soft), mixed)
    assert (d.action, d.reason) == ("tempfail", "spf.softfail")
    d = decide(_report(signatures=[pass_sig], spf=spf_soft, dmarc=quarantine), mixed)
    assert (d.action, d.reason, d.reply[:9]) == ("reject", "dmarc.quarantine", "550 5.7.1")
    assert decide(_report(dmarc=reject), mixed).action == "accept"  # p=reject is not quarantine
    assert decide(_report(dmarc=reject), settings(actions={"dmarc.fail": "reject"})).action == (
        "reject"
    )
    dk_reject = DKPolicyResult("dk.test", DKPolicy(o="-", published=True), "reject")
    d = decide(_report(dk_policy=dk_reject), settings(reject_fail=True))
    assert d.action == "reject" and "DomainKeys policy of dk.test" in d.reply
    assert decide(_report(), settings()).reply == ""


# --------------------------------------------------------------------------------------------
# Speed


def test_verification_speed_with_cached_keys(clean_dns: DNSServer, key_dir: KeySet) -> None:
    """A 3 KB message, DKIM (rsa-sha256, 2048 bits) + DMARC + SPF, keys cached."""
    domain = "speed.test"
    key_dir.rsa2048.publish(clean_dns, domain)
    clean_dns.publish(
        {f"_dmarc.{domain}": ["v=DMARC1; p=reject"], domain: ["v=spf1 ip4:192.0.2.0/24 -all"]}
    )
    body = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 50 + b"\r\n")[:2900]
    message = dkimpy_sign(make_message(domain, body + b"\r\n"), key_dir.rsa2048, domain)
    assert 3000 <= len(message) <= 4000
    msg = Message(message)
    resolver = Resolver(clean_dns.address, timeout=2)
    full = settings(spf=True, dmarc=True)
    dkim_only = settings(domainkeys_policy=False)

    async def measure(cfg: VerifySettings, rounds: int) -> float:
        await verify_message(
            msg,
            client_ip="192.0.2.9",
            helo="mail.speed.test",
            mail_from=f"a@{domain}",
            resolver=resolver,
            settings=cfg,
        )
        started = time.perf_counter()
        for _ in range(rounds):
            report = await verify_message(
                msg,
                client_ip="192.0.2.9",
                helo="mail.speed.test",
                mail_from=f"a@{domain}",
                resolver=resolver,
                settings=cfg,
            )
        elapsed = (time.perf_counter() - started) / rounds
        assert report.signature_result == "pass"
        return elapsed

    full_ms = asyncio.run(measure(full, 100)) * 1000
    dkim_ms = asyncio.run(measure(dkim_only, 100)) * 1000
    print(f"\nverify 3 KB, keys cached: all {full_ms:.2f} ms, DKIM only {dkim_ms:.2f} ms")
    # Generous bounds for a shared 2-core machine; typical figures are ~1.3 ms and ~0.6 ms.
    assert dkim_ms < 15
    assert full_ms < 30
