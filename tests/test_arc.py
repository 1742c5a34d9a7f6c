"""ARC (RFC 8617): chains verified by the running `dkproxy in`, chains sealed by dkproxy.

Chains are built hop by hop by implementations we did not write: Perl Mail::DKIM's
ARC::Signer and dkimpy's arc_sign, each hop recording in Authentication-Results what an
independent verifier (dkimpy) said about the chain it received. Keys come from NSD on
loopback. What `dkproxy in` writes must parse with `authres`; what dkproxy seals must verify
with Mail::DKIM's ARC::Verifier and dkimpy's arc_verify, across several hops.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import authres
import dkim
import pytest

from dkproxy.mailauth import arc
from dkproxy.mailauth.message import Message
from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess, run_dkproxy
from tests.support.sink import CaptureServer
from tests.support.testkeys import KeySet, dns_record
from tests.support.verifiers import (
    seal_mail_dkim_arc,
    sign_mail_dkim,
    verify_dkimpy_arc,
    verify_mail_dkim_arc_many,
)

AUTHSERV = "mx.example.test"
SELECTOR = "arc2026"
#: Sealers publishing the session's PKCS#1 RSA key; badkey.example publishes another key.
SEALERS = ("forwarder1.example", "forwarder2.example", "list.example", "relay.example")
LIST_IP = "192.0.2.99"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: list@list.example\r\n"
    b"Subject: ARC test\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <arc-1@example.org>\r\n"
    b"\r\n"
    b"Hello list.\r\n"
)


@pytest.fixture(scope="module")
def keys(key_dir: KeySet, dns_server: DNSServer) -> Iterator[str]:
    """The sealing/signing key (PKCS#1, read by Mail::DKIM, dkimpy and dkproxy) and records:
    example.org signs with DKIM and publishes p=reject; the sealers publish their keys."""
    path = str(key_dir / "rsa2048-pkcs1.pem")
    records = {f"{SELECTOR}._domainkey.{d}": [dns_record(path)] for d in SEALERS}
    records |= {
        f"{SELECTOR}._domainkey.badkey.example": [dns_record(str(key_dir / "rsa2048.pem"))],
        "orig2026._domainkey.example.org": [dns_record(path)],
        "example.org": ["v=spf1 ip4:192.0.2.7 -all"],
        "_dmarc.example.org": ["v=DMARC1; p=reject"],
    }
    dns_server.publish(records)
    yield path
    dns_server.unpublish(*records)


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def signed(key: str) -> bytes:
    return sign_mail_dkim(MESSAGE, key, "example.org", "orig2026")


def chain_verdict(message: bytes, dns: DNSServer) -> str:
    """What an honest hop's receiver says about the chain it got (dkimpy, not dkproxy)."""
    cv, _ = verify_dkimpy_arc(message, dns)
    return "fail" if cv == "terminated" else cv


def hop(message: bytes, sealer: str, key: str, dns: DNSServer, *, tool: str = "perl",
        footer: bool = False, verdict: str | None = None) -> bytes:  # fmt: skip
    """One forwarding hop: verify, record Authentication-Results, maybe add a list footer
    (breaking DKIM and earlier message signatures), then seal with Mail::DKIM or dkimpy."""
    verdict = verdict or chain_verdict(message, dns)
    srvid = f"mx.{sealer}"
    dkim_ok = "pass" if b"Hello list.\r\n" in message.split(b"\r\n\r\n", 1)[1][:20] else "fail"
    ar = (f"Authentication-Results: {srvid}; arc={verdict}; dkim={dkim_ok} header.d=example.org;"
          f" dmarc={dkim_ok} header.from=example.org\r\n").encode()  # fmt: skip
    if footer:
        message += b"-- \r\nlist footer\r\n"
    message = ar + message
    if tool == "perl":
        return seal_mail_dkim_arc(message, key, sealer, SELECTOR, srvid)
    fields = dkim.arc_sign(message, SELECTOR.encode(), sealer.encode(),
                           Path(key).read_bytes(), srvid.encode())  # fmt: skip
    assert fields, "dkimpy refused to seal"
    return b"".join(fields) + message


def start_in(tmp_path: Path, relay: str, dns: DNSServer, *extra: str) -> ProxyProcess:
    conf = tmp_path / "dkimproxy_in.conf"
    proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False)
    conf.write_text(f"listen {proxy.address}\nrelay {relay}\nhostname {AUTHSERV}\n"
                    f"dns_server {dns.address}\n" + "".join(f"{x}\n" for x in extra))  # fmt: skip
    return proxy.start()


def send(proxy: ProxyProcess, message: bytes, client_ip: str = LIST_IP) -> tuple[int, str]:
    with RawClient(proxy.host, proxy.port) as client:
        client.reply()
        client.command("EHLO list.example")
        assert client.command(f"XFORWARD ADDR={client_ip} HELO=list.example")[0] == 250
        assert client.command("MAIL FROM:<list-bounces@list.example>")[0] == 250
        assert client.command("RCPT TO:<bob@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(message + b".\r\n")
        return client.reply()


def verify_through_proxy(tmp_path: Path, dns: DNSServer, messages: list[bytes],
                         *extra: str) -> tuple[list[bytes], str]:  # fmt: skip
    with CaptureServer() as capture:
        proxy = start_in(tmp_path, capture.address, dns, *extra)
        try:
            for message in messages:
                assert send(proxy, message)[0] == 250
        finally:
            proxy.stop()
        delivered = [tx.data for tx in capture.wait_for(len(messages))]
    assert all(d is not None for d in delivered)
    return delivered, proxy.log  # type: ignore[return-value]


def our_results(message: bytes) -> dict[str, authres.core.AuthenticationResult]:
    """Our Authentication-Results, parsed by authres, by method (one result each)."""
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    for field in re.split(r"\r\n(?![ \t])", head):
        if field.startswith(f"Authentication-Results: {AUTHSERV};"):
            parsed = authres.AuthenticationResultsHeader.parse(field)
            return {r.method: r for r in parsed.results}
    raise AssertionError(f"no Authentication-Results of ours in {head[:300]!r}")


def props(result: authres.core.AuthenticationResult) -> dict[str, str]:
    return {f"{p.type}.{p.name}": p.value for p in result.properties}


def drop_fields(message: bytes, pattern: bytes, count: int = 1) -> bytes:
    """Remove the first `count` header fields whose "Name: value" start matches `pattern`."""
    head, body = message.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept, dropped = [], 0
    for f in fields:
        if dropped < count and re.match(pattern, f, re.IGNORECASE):
            dropped += 1
            continue
        kept.append(f)
    assert dropped == count
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def field(message: bytes, pattern: bytes) -> bytes:
    head = message.split(b"\r\n\r\n", 1)[0]
    return next(f for f in re.split(rb"\r\n(?![ \t])", head) if re.match(pattern, f, re.I))


# --------------------------------------------------------------------------------------------
# Inbound verdicts on chains made by Mail::DKIM and dkimpy


def test_chains_of_one_two_three_hops_and_faults(
    tmp_path: Path, dns_server: DNSServer, keys: str
) -> None:
    original = signed(keys)
    one = hop(original, "forwarder1.example", keys, dns_server)
    two = hop(one, "list.example", keys, dns_server, tool="dkimpy")
    three = hop(two, "forwarder2.example", keys, dns_server)
    listed = hop(one, "list.example", keys, dns_server, footer=True)  # hop 1's AMS breaks
    tampered = one.replace(b"Hello list.", b"Hello LIST.")  # changed after hop 1
    # Broken seals: a changed seal signature; a changed AAR the seal covers; the wrong key.
    b_tag = re.search(rb"ARC-Seal: i=1;.*?b=(\S)", two, re.S)
    assert b_tag is not None
    flip = b"A" if b_tag.group(1) != b"A" else b"B"
    bad_b = two[: b_tag.start(1)] + flip + two[b_tag.end(1) :]
    aar1 = b"ARC-Authentication-Results: i=1; mx.forwarder1.example; arc="
    bad_aar = two.replace(aar1 + b"none", aar1 + b"pass")
    wrong_key = hop(original, "badkey.example", keys, dns_server)
    # Structure: a gap (instance 2 removed from three hops), a missing member, duplicates.
    gap = drop_fields(three, rb"ARC-[A-Za-z-]+: i=2;", 3)
    no_ams = drop_fields(two, rb"ARC-Message-Signature: i=1;")
    dup_seal = field(two, rb"ARC-Seal: i=1;") + b"\r\n" + two
    dup_aar = field(two, rb"ARC-Authentication-Results: i=2;") + b"\r\n" + two
    cases = [
        (original, "none"), (one, "pass"), (two, "pass"), (three, "pass"), (listed, "pass"),
        (tampered, "fail"), (bad_b, "fail"), (bad_aar, "fail"), (wrong_key, "fail"),
        (gap, "fail"), (no_ams, "fail"), (dup_seal, "fail"), (dup_aar, "fail"),
    ]  # fmt: skip
    # Independent verdicts first: Mail::DKIM agrees with every expectation.
    perl = verify_mail_dkim_arc_many([m for m, _ in cases], dns_server)
    assert [p["result"] for p in perl] == [v for _, v in cases], perl
    delivered, log = verify_through_proxy(tmp_path, dns_server, [m for m, _ in cases])
    for (sent, verdict), out in zip(cases, delivered, strict=True):
        results = our_results(out)
        assert results["arc"].result == verdict, (verdict, results["arc"])
        assert out.endswith(sent)  # only our field added
        arc_props = props(results["arc"])
        assert arc_props["smtp.remote-ip"] == LIST_IP
        if verdict == "pass":
            oldest = "2" if sent is listed else "0"
            assert arc_props["header.oldest-pass"] == oldest
        else:
            assert "header.oldest-pass" not in arc_props
    fails = [results["arc"].reason for results in map(our_results, delivered[5:])]
    assert "body hash mismatch" in fails[0]
    # Seals are checked newest first: a changed ARC-Seal i=1 breaks the seal i=2 covering it.
    assert "ARC-Seal i=2 did not verify" in fails[1] and "did not verify" in fails[2]
    assert "i=1 did not verify" in fails[3]  # the key at badkey.example is another one
    assert "missing" in fails[4] and "i=2" in fails[4]
    assert "duplicate ARC-Seal i=1" in fails[6]
    assert "duplicate ARC-Authentication-Results i=2" in fails[7]
    # The log line carries the instance count and the sealers' domains.
    assert "arc=pass/3(forwarder1.example,list.example,forwarder2.example)" in log
    assert "arc=none" in log


@pytest.fixture(scope="module")
def fifty(keys: str, dns_server: DNSServer) -> bytes:
    """A chain of 50 honest hops sealed by dkimpy (which refuses a 51st)."""
    message = signed(keys)
    pem = Path(keys).read_bytes()
    for n in range(1, 51):
        verdict = "none" if n == 1 else "pass"
        srvid = f"mx{n}.list.example"
        message = f"Authentication-Results: {srvid}; arc={verdict}\r\n".encode() + message
        fields = dkim.arc_sign(message, SELECTOR.encode(), b"list.example", pem, srvid.encode())
        message = b"".join(fields) + message
    assert chain_verdict(message, dns_server) == "pass"
    return message


def test_instance_cap_fifty_passes_fifty_one_fails(
    tmp_path: Path, dns_server: DNSServer, fifty: bytes
) -> None:
    message = fifty
    # A 51st set: the 50th's fields renumbered. Its signatures need not be checked at all.
    extra = b"".join(
        field(message, rb"%s: i=50;" % kind).replace(b"i=50;", b"i=51;", 1) + b"\r\n"
        for kind in (b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results")
    )
    over = extra + message
    (fifty, over_out), _log = verify_through_proxy(tmp_path, dns_server, [message, over])
    assert our_results(fifty)["arc"].result == "pass"
    failed = our_results(over_out)["arc"]
    assert failed.result == "fail" and "more than 50 ARC sets" in failed.reason


def test_collect_refuses_malformed_instances_before_any_lookup() -> None:
    base = b"From: a@example.org\r\n\r\nbody\r\n"
    cases = {
        b"ARC-Authentication-Results: mx.example; none\r\n": "without a leading i=",
        b"ARC-Seal: i=0; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n": "outside 1..50",
        b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AAAA\r\n": "i=51 outside",
        b"ARC-Seal: i=x; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n": "valid i=",
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n": "missing",
        b"ARC-Seal: i=1; i=1; cv=none\r\n": "malformed",
    }
    for fields, reason in cases.items():
        result = arc.collect(Message(fields + base))
        assert isinstance(result, arc.ArcResult)
        assert result.result == "fail" and reason in result.reason, (fields, result)
    assert arc.collect(Message(base)) == arc.ArcResult("none")
    # More than 150 ARC fields: refused without parsing the rest (work cap).
    many = b"ARC-Authentication-Results: i=1; x; none\r\n" * 151
    result = arc.collect(Message(many + base))
    assert isinstance(result, arc.ArcResult) and "more than 50 ARC sets" in result.reason


# --------------------------------------------------------------------------------------------
# DMARC local override from trusted sealers


def test_trusted_sealer_overrides_dmarc_reject_only_when_it_should(
    tmp_path: Path, dns_server: DNSServer, keys: str
) -> None:
    original = signed(keys)
    # list.example checked DKIM (pass), then added a footer, which breaks DKIM downstream.
    trusted = hop(original, "list.example", keys, dns_server, footer=True)
    untrusted = hop(original, "forwarder1.example", keys, dns_server, footer=True)
    broken = trusted.replace(b"list footer", b"LIST FOOTER")  # changed after the seal
    extra = ("reject_fail", "arc_trusted_sealers list.example")
    with CaptureServer() as capture:
        proxy = start_in(tmp_path, capture.address, dns_server, *extra)
        try:
            codes = [send(proxy, m)[0] for m in (trusted, untrusted, broken)]
        finally:
            proxy.stop()
        (delivered,) = [tx.data for tx in capture.wait_for(1)]
    assert codes == [250, 550, 550]
    assert delivered is not None
    results = our_results(delivered)
    dmarc = results["dmarc"]
    assert dmarc.result == "fail" and results["dkim"].result == "fail"
    assert props(dmarc)["policy.override"] == "trusted_forwarder"
    assert "dis=none" in delivered.decode() and "as[1].d=list.example" in delivered.decode()
    assert results["arc"].result == "pass"
    assert "dmarc-override=arc" in proxy.log
    # Without the trust setting the same chain changes nothing.
    (plain,), _ = verify_through_proxy(tmp_path, dns_server, [trusted])
    assert "policy.override" not in props(our_results(plain)["dmarc"])


# --------------------------------------------------------------------------------------------
# Sealing: dkproxy's ARC sets checked by Mail::DKIM and dkimpy across several hops


def start_out(tmp_path: Path, relay: str, key: str, *lines: str) -> ProxyProcess:
    conf = tmp_path / "dkimproxy_out.conf"
    proxy = ProxyProcess("out", [f"--conf_file={conf}"], positional=False)
    head = f"listen {proxy.address}\nrelay {relay}\ndomain example.org\nkeyfile {key}\n"
    conf.write_text(head + "selector orig2026\n" + "".join(f"{x}\n" for x in lines))
    return proxy.start()


def relay_through(
    proxy: ProxyProcess, messages: list[bytes], capture: CaptureServer
) -> list[bytes]:
    start = len(capture.messages)
    for message in messages:
        with proxy.smtp() as client:
            client.sendmail("list-bounces@relay.example", ["bob@example.net"], message)
    out = [tx.data for tx in capture.wait_for(start + len(messages))[start:]]
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


def test_sealed_output_verifies_across_hops(
    tmp_path: Path, dns_server: DNSServer, keys: str, capture: CaptureServer, fifty: bytes
) -> None:
    seal_spec = (
        f"signature arc(key={keys},s={SELECTOR},d=relay.example,authserv_id=mx.relay.example)"
    )
    proxy = start_out(tmp_path, capture.address, keys, "signature dkim(c=relaxed)", seal_spec)
    try:
        original = signed(keys)
        ar = b"Authentication-Results: mx.relay.example; arc=none; dkim=pass\r\n"
        (first,) = relay_through(proxy, [ar + original], capture)
        # Forward: Mail::DKIM seals hop 2 at forwarder2.example; a list footer at hop 3,
        # then dkproxy seals again with what mx.relay.example found (arc=pass).
        second = hop(first, "forwarder2.example", keys, dns_server)
        third_in = b"Authentication-Results: mx.relay.example; arc=pass; dkim=fail\r\n" + second
        third_in += b"-- \r\nfooter\r\n"
        (third,) = relay_through(proxy, [third_in], capture)
        # A chain that failed on the way in: dkproxy records cv=fail.
        broken = second.replace(b"Hello list.", b"Hello LIST.")
        failed_in = b"Authentication-Results: mx.relay.example; arc=fail; dkim=fail\r\n" + broken
        (failed,) = relay_through(proxy, [failed_in], capture)
        # A structurally broken chain (instance 1 gone) is fail whatever the results say.
        gap_in = b"Authentication-Results: mx.relay.example; arc=pass\r\n" + drop_fields(
            second, rb"ARC-[A-Za-z-]+: i=1;", 3
        )
        (gap,) = relay_through(proxy, [gap_in], capture)
        # Passed on unsealed, each logged: no Authentication-Results of the named authserv-id;
        # results without arc= for an arriving chain; a chain that already has 50 instances.
        silent = b"Authentication-Results: mx.relay.example; dkim=pass\r\n" + second
        full = b"Authentication-Results: mx.relay.example; arc=pass\r\n" + fifty
        unsealed = relay_through(proxy, [original, silent, full], capture)
    finally:
        proxy.stop()
    assert b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=relay.example" in first
    assert b"ARC-Seal: i=3; a=rsa-sha256; cv=pass; d=relay.example" in third
    assert b"ARC-Seal: i=3; a=rsa-sha256; cv=fail; d=relay.example" in failed
    assert b"ARC-Seal: i=3; a=rsa-sha256; cv=fail; d=relay.example" in gap  # after i=2
    for out, sent in zip(unsealed, [original, silent, full], strict=True):
        assert out.endswith(sent) and not out.startswith(b"ARC-Seal")
    assert "have no arc=" in proxy.log and "the chain already has 50 instances" in proxy.log
    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=example.org" in first
    assert verify_mail_dkim_arc_many([gap], dns_server)[0]["result"] == "fail"
    perl = [
        r["result"] for r in verify_mail_dkim_arc_many([first, second, third, failed], dns_server)
    ]
    assert perl == ["pass", "pass", "pass", "fail"]
    dkimpy_verdicts = [verify_dkimpy_arc(m, dns_server)[0] for m in (first, second, third, failed)]
    assert dkimpy_verdicts == ["pass", "pass", "pass", "terminated"]
    assert "arc(d=relay.example,s=arc2026,i=3)" in proxy.log
    assert "skipped: no Authentication-Results from mx.relay.example" in proxy.log
    # And dkproxy in agrees, with the oldest passing message signature after the footer.
    delivered, _ = verify_through_proxy(tmp_path, dns_server, [third, failed])
    assert our_results(delivered[0])["arc"].result == "pass"
    assert props(our_results(delivered[0])["arc"])["header.oldest-pass"] == "3"
    assert our_results(delivered[1])["arc"].result == "fail"


def test_inbound_seals_its_own_results(
    tmp_path: Path, dns_server: DNSServer, keys: str, capture: CaptureServer
) -> None:
    conf = tmp_path / "in.toml"
    proxy = ProxyProcess("in", ["-c", str(conf)], positional=False)
    conf.write_text(
        f'mode = "in"\nlisten = "{proxy.address}"\nrelay = "{capture.address}"\n'
        f'hostname = "{AUTHSERV}"\ndns_server = "{dns_server.address}"\n'
        f'[arc_seal]\ndomain = "relay.example"\nselector = "{SELECTOR}"\nkey = "{keys}"\n'
    )
    original = signed(keys)
    one = hop(original, "forwarder1.example", keys, dns_server, tool="dkimpy")
    tampered = one.replace(b"Hello list.", b"Hello LIST.")
    proxy.start()
    try:
        for message in (original, one, tampered):
            assert send(proxy, message)[0] == 250
    finally:
        proxy.stop()
    out = [tx.data for tx in capture.wait_for(3)]
    assert all(o is not None for o in out)
    seals = [field(o, rb"ARC-Seal: i=") for o in out]  # type: ignore[arg-type]
    assert [re.search(rb"i=(\d+);.*?cv=(\w+)", s, re.S).groups() for s in seals] == [  # type: ignore[union-attr]
        (b"1", b"none"), (b"2", b"pass"), (b"2", b"fail"),
    ]  # fmt: skip
    # The AAR is a copy of our own Authentication-Results, with its arc= verdict.
    aar = field(out[1], rb"ARC-Authentication-Results: i=2;")  # type: ignore[arg-type]
    assert f"i=2; {AUTHSERV}; ".encode() in aar and b"arc=pass" in aar
    perl = [r["result"] for r in verify_mail_dkim_arc_many(out, dns_server)]  # type: ignore[arg-type]
    assert perl == ["pass", "pass", "fail"]
    assert [verify_dkimpy_arc(o, dns_server)[0] for o in out] == ["pass", "pass", "terminated"]  # type: ignore[arg-type]
    assert "sealed" in proxy.log


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("signature arc(key={rsa},s=a1,d=relay.example)",
         ":2: signature: arc(...) needs authserv_id"),
        ("signature arc(key={ed},s=a1,d=relay.example,authserv_id=mx.x.example)",
         "ARC needs an RSA key"),
        ("signature arc(c=simple,key={rsa},s=a1,d=r.example,authserv_id=mx.x.example)",
         "c=relaxed/relaxed"),
        ("signature arc(a=rsa-sha1,key={rsa},s=a1,d=r.example,authserv_id=mx.x.example)",
         "a=rsa-sha256"),
        ("signature dkim(authserv_id=mx.x.example)", "authserv_id= only applies to arc"),
        ("signature arc(key={rsa},i=@r.example,s=a1,d=r.example,authserv_id=mx.x.example)",
         "no i= tag"),
    ],
)  # fmt: skip
def test_arc_signature_specifier_errors(
    tmp_path: Path, key_dir: KeySet, text: str, expected: str
) -> None:
    conf = tmp_path / "dkimproxy_out.conf"
    spec = text.format(rsa=key_dir / "rsa2048.pem", ed=key_dir / "ed25519.pem")
    conf.write_text(f"domain example.org\n{spec}\nkeyfile {key_dir / 'rsa2048.pem'}\n")
    result = run_dkproxy("check-config", "--mode", "out", str(conf))
    assert result.returncode == 1, result.stdout
    assert expected in result.stderr and str(conf) in result.stderr


@pytest.mark.parametrize(
    ("mode", "table", "expected"),
    [
        ("out", 'domain = "r.example"\nselector = "a1"\nkey = "{rsa}"',
         "arc_seal: authserv_id is needed in dkproxy out"),
        ("in", 'domain = "r.example"\nselector = "a1"\nkey = "{weak}"', "arc_seal: key file"),
        ("in", 'domain = "r.example"\nselector = "a1"\nkey = "{ed}"', "ARC needs an RSA key"),
        ("in", 'domain = "r.example"\nselectr = "a1"\nkey = "{rsa}"', "arc_seal.selectr"),
        ("in", 'domain = "not a domain"\nselector = "a1"\nkey = "{rsa}"', "arc_seal: d="),
    ],
)  # fmt: skip
def test_arc_seal_table_errors(
    tmp_path: Path, key_dir: KeySet, mode: str, table: str, expected: str
) -> None:
    conf = tmp_path / "dkproxy.toml"
    body = table.format(rsa=key_dir / "rsa2048.pem", weak=key_dir / "rsa512.pem",
                        ed=key_dir / "ed25519.pem")  # fmt: skip
    conf.write_text(f'mode = "{mode}"\n[arc_seal]\n{body}\n')
    result = run_dkproxy("check-config", str(conf))
    assert result.returncode == 1, result.stdout
    assert expected in result.stderr and str(conf) in result.stderr


def test_check_config_shows_arc_settings(tmp_path: Path, key_dir: KeySet) -> None:
    conf = tmp_path / "dkproxy.toml"
    conf.write_text(
        'mode = "in"\nhostname = "mx.example.test"\narc_trusted_sealers = ["list.example"]\n'
        f'[arc_seal]\ndomain = "r.example"\nselector = "a1"\nkey = "{key_dir / "rsa2048.pem"}"\n'
    )
    result = run_dkproxy("check-config", str(conf))
    assert result.returncode == 0, result.stderr
    assert "ARC on, trusted sealers: list.example" in result.stdout
    assert (
        "ARC seal d=r.example s=a1" in result.stdout
        and "mx.example.test (this pass)" in result.stdout
    )


def test_arc_clause_and_override_render_and_parse() -> None:
    from dkproxy.mailauth.authresults import authentication_results
    from dkproxy.mailauth.dmarc import DmarcRecord, DmarcResult
    from dkproxy.mailauth.verifier import VerificationReport

    chain = arc.ArcResult("pass", instances=2, sealers=("a.example", "b.example"),
                          selectors=("s1", "s2"), oldest_pass=0)  # fmt: skip
    dmarc = DmarcResult("fail", "example.org", policy="reject", record=DmarcRecord(p="reject"),
                        reason="no aligned DKIM or SPF pass")  # fmt: skip
    for ip in ("192.0.2.1", "2001:db8::25"):
        report = VerificationReport(arc=chain, dmarc=dmarc, client_ip=ip,
                                    dmarc_override=arc.trusted_override(chain, [], None)
                                    or "arc=pass " + chain.describe())  # fmt: skip
        header = authentication_results(report, AUTHSERV).decode()
        parsed = authres.AuthenticationResultsHeader.parse(header)
        by_method = {r.method: r for r in parsed.results}
        assert props(by_method["arc"]) == {"header.oldest-pass": "0", "smtp.remote-ip": ip}
        assert props(by_method["dmarc"])["policy.override"] == "trusted_forwarder"
        assert "dis=none" in header and "as[2].d=b.example as[2].s=s2" in header
    failed = arc.ArcResult("fail", 'ARC-Seal i=1 did not verify "x"', instances=1)
    header = authentication_results(VerificationReport(arc=failed), AUTHSERV).decode()
    (result,) = [r for r in authres.AuthenticationResultsHeader.parse(header).results
                 if r.method == "arc"]  # fmt: skip
    assert result.result == "fail" and "did not verify" in result.reason


def test_trusted_override_needs_a_vouching_trusted_instance() -> None:
    def chain(oldest: int, aar2: str) -> arc.ArcResult:
        return arc.ArcResult("pass", instances=2, sealers=("fwd.example", "list.example"),
                             selectors=("s", "s"), oldest_pass=oldest,
                             aar=("mx.fwd; dkim=pass header.d=example.org", aar2))  # fmt: skip

    vouch = "mx.list.example; dkim=pass header.d=mail.example.org; dmarc=fail"
    assert arc.trusted_override(chain(0, vouch), ["list.example"], "example.org")
    dmarc_pass = "mx; dmarc=pass header.from=example.org"
    assert arc.trusted_override(chain(0, dmarc_pass), ["LIST.example."], "example.org")
    assert not arc.trusted_override(chain(0, "mx; dmarc=pass"), ["list.example"], "example.org")
    # Not trusted, not aligned, the wrong author, a failed chain, or nothing vouching at all.
    assert not arc.trusted_override(chain(0, vouch), ["other.example"], "example.org")
    assert not arc.trusted_override(chain(0, "mx; dkim=pass header.d=evil.example"),
                                    ["list.example"], "example.org")  # fmt: skip
    assert not arc.trusted_override(chain(0, vouch), ["list.example"], "example.net")
    assert not arc.trusted_override(
        replace(chain(0, vouch), result="fail"), ["list.example"], "example.org"
    )
    assert not arc.trusted_override(chain(0, "mx; spf=pass"), ["list.example"], "example.org")
    # fwd.example (instance 1) vouches, but its message signature no longer validates.
    assert arc.trusted_override(chain(1, "mx; none"), ["fwd.example"], "example.org")
    assert not arc.trusted_override(chain(2, "mx; none"), ["fwd.example"], "example.org")


def test_toml_rule_with_an_arc_signature(tmp_path: Path, key_dir: KeySet) -> None:
    conf = tmp_path / "out.toml"
    key = key_dir / "rsa2048.pem"
    conf.write_text(
        'mode = "out"\n[[sign]]\nmatch = "*"\n'
        f'[[sign.signature]]\ndomain = "example.org"\nselector = "s1"\nkey = "{key}"\n'
        f'[[sign.signature]]\ntype = "arc"\ndomain = "relay.example"\nselector = "a1"\n'
        f'key = "{key}"\nauthserv_id = "MX.Relay.Example"\n'
    )
    result = run_dkproxy("check-config", str(conf))
    assert result.returncode == 0, result.stderr
    assert "arc(d=relay.example, s=a1, a=rsa-sha256, c=relaxed/relaxed" in result.stdout
    twice = conf.read_text().replace('match = "*"', 'match = "*"\n[[sign.signature]]\ntype = "arc"'
                                     f'\ndomain = "r.example"\nselector = "a2"\nkey = "{key}"\n'
                                     'authserv_id = "mx.example"')  # fmt: skip
    conf.write_text(twice)
    result = run_dkproxy("check-config", str(conf))
    assert result.returncode == 1 and "one ARC set per message" in result.stderr


def test_mutated_chains_never_raise_and_mostly_fail(dns_server: DNSServer, keys: str) -> None:
    """Every byte of the ARC fields of a valid two-hop chain, replaced (a seeded sample of
    positions and bytes): verification answers pass or fail, never raises."""
    import asyncio
    import random

    from dkproxy.mailauth.dnsresolver import Resolver

    two = hop(hop(signed(keys), "forwarder1.example", keys, dns_server, tool="dkimpy"),
              "list.example", keys, dns_server, tool="dkimpy")  # fmt: skip
    arc_end = two.index(b"Authentication-Results: mx.list.example")
    rng = random.Random(8617)
    positions = rng.sample(range(arc_end), 300)
    resolver = Resolver(dns_server.address, timeout=2)

    async def run() -> list[arc.ArcResult]:
        out = []
        for pos in positions:
            byte = rng.choice(b"aZ09=;: \t\r\n\x00\xff:i")
            mutated = two[:pos] + bytes([byte]) + two[pos + 1 :]
            try:
                message = Message(mutated)
            except ValueError:
                continue  # not a parsable header block: the session answers that case
            out.append(await arc.verify(message, resolver))
        return out

    verdicts = asyncio.run(run())
    assert not [v for v in verdicts if v.reason.startswith("internal error")]
    results = [v.result for v in verdicts]
    assert set(results) <= {"pass", "fail"} and len(results) > 200
    assert results.count("fail") > 0.8 * len(results)


def test_arc_options_and_actions() -> None:
    from dkproxy.config import parse_proxy_command
    from dkproxy.mailauth.verifier import VerificationReport, VerifySettings, decide

    cfg = parse_proxy_command("in", ["--no-arc", "--arc_trusted_sealers=a.example, B.example"])
    assert cfg.arc is False and cfg.arc_trusted_sealers == ["a.example", "b.example"]
    assert parse_proxy_command("in", []).arc is True
    settings = VerifySettings(authserv_id=AUTHSERV, actions={"arc.fail": "reject"})
    failed = VerificationReport(arc=arc.ArcResult("fail", "x"))
    assert decide(failed, settings).reply.startswith("550 5.7.1 Message rejected: arc=fail")
    assert decide(VerificationReport(arc=arc.ArcResult("pass")), settings).action == "accept"


def test_verifier_finds_arc_fields_whatever_the_case_of_their_names(
    dns_server: DNSServer, keys: str
) -> None:
    """The verifier looks for ARC fields while it scans for signatures (no ARC pass over
    the header block when there is none): field names in any case are found, the chain is
    verified as before, and a message without ARC fields is arc=none."""
    import asyncio

    from dkproxy.mailauth.dnsresolver import Resolver
    from dkproxy.mailauth.verifier import VerifySettings, verify_message

    one = hop(signed(keys), "forwarder1.example", keys, dns_server, tool="dkimpy")
    arc_end = one.index(b"Authentication-Results: mx.forwarder1.example")
    shouting = (
        one[:arc_end]
        .replace(b"ARC-Seal:", b"ARC-SEAL:")
        .replace(b"ARC-Message-Signature:", b"arc-message-signature:")
        + one[arc_end:]
    )
    assert shouting != one
    broken = one.replace(b"Hello list.", b"Hello list!", 1)
    resolver = Resolver(dns_server.address, timeout=2)
    settings = VerifySettings(authserv_id=AUTHSERV, spf=False, dmarc=False)

    async def verdict(data: bytes) -> str:
        report = await verify_message(
            Message(data), client_ip=None, helo=None, mail_from=None, resolver=resolver,
            settings=settings,
        )  # fmt: skip
        assert report.arc is not None
        return report.arc.result

    async def run() -> list[str]:
        return [await verdict(m) for m in (signed(keys), one, shouting, broken)]

    assert asyncio.run(run()) == ["none", "pass", "pass", "fail"]
