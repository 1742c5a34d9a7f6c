"""The test infrastructure itself: every other test trusts these parts, so prove them."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable

import dkim
import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from dkproxy.mailauth.keys import KeyLoadError, load_signing_key
from tests.support.dnsserver import DNSServer, NetnsJob, ZoneTextError, split_txt
from tests.support.sink import CaptureServer, SmtpSink, header_value
from tests.support.testkeys import KeySet
from tests.support.tools import find_tool, free_port, require_tool, wait_for_port
from tests.support.verifiers import (
    sign_mail_dkim,
    verify_dkimpy,
    verify_go_msgauth,
    verify_mail_dkim,
    verify_mail_dkim_many,
    verify_opendkim,
)

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: infrastructure check\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <support-1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"this message proves the verifiers.\r\n"
)


# -- tools ---------------------------------------------------------------------------------


def test_require_tool_returns_absolute_path_and_searches_sbin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    sh = require_tool("sh")
    assert os.path.isabs(sh) and os.access(sh, os.X_OK)
    assert require_tool(sh) == sh


def test_require_tool_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "dkproxy-no-such-tool-xyz"
    assert find_tool(name) is None
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match=name):
            require_tool(name)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=name):
        require_tool(name)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_tool(name)


def test_wait_for_port_times_out_on_closed_port() -> None:
    port = free_port()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        wait_for_port("127.0.0.1", port, timeout=2)


# -- DNS -----------------------------------------------------------------------------------


def test_split_txt_cuts_at_255_bytes() -> None:
    parts = split_txt("x" * 600)
    assert [len(p) for p in parts] == [255, 255, 90]
    assert split_txt("") == [b""]


def test_dns_serves_2048_bit_key_split_into_255_byte_strings(
    clean_dns: DNSServer, key_dir: KeySet
) -> None:
    record = key_dir.rsa2048.dns_record
    assert len(record) > 255
    name = key_dir.rsa2048.publish(clean_dns, "example.com")
    for tcp in (False, True):
        response = clean_dns.query(name, "TXT", tcp=tcp)
        assert response.rcode() == dns.rcode.NOERROR
        (rrset,) = response.answer
        (rdata,) = list(rrset)
        assert len(rdata.strings) == -(-len(record) // 255)
        assert all(len(s) <= 255 for s in rdata.strings)
        assert b"".join(rdata.strings) == record.encode()
    assert clean_dns.lookup_txt(name) == [record.encode()]


def test_dns_keeps_explicit_splits_and_several_records(clean_dns: DNSServer) -> None:
    name = "odd._domainkey.example.org"
    clean_dns.publish({name: [["v=DKIM1; k=rsa; p=", "AB", ""], 'quote " and \\ backslash']})
    response = clean_dns.query(name)
    strings = sorted(tuple(r.strings) for r in response.answer[0])
    assert strings == sorted([(b"v=DKIM1; k=rsa; p=", b"AB", b""), (b'quote " and \\ backslash',)])
    clean_dns.publish({name: ["one"]}, append=True)
    assert sorted(clean_dns.lookup_txt(name)) == sorted(
        [b"v=DKIM1; k=rsa; p=AB", b'quote " and \\ backslash', b"one"]
    )
    clean_dns.publish({name: ["replaced"]})
    assert clean_dns.lookup_txt(name) == [b"replaced"]


def test_dns_answers_for_many_domains_and_nxdomain_for_unknown(clean_dns: DNSServer) -> None:
    names = [
        "a._domainkey.example.com",
        "b._domainkey.example.org",
        "c._domainkey.sub.example.org",
        "d._domainkey.example.net",
        "e._domainkey.anything.test",
        "_domainkey.policy.test",
    ]
    clean_dns.publish({n: [f"value {n}"] for n in names})
    for n in names:
        assert clean_dns.lookup_txt(n) == [f"value {n}".encode()]
    for unknown in ("zz._domainkey.example.com", "nothing.example.invalid", "x.unknown.test"):
        assert clean_dns.query(unknown).rcode() == dns.rcode.NXDOMAIN
    clean_dns.unpublish(names[0])
    assert clean_dns.query(names[0]).rcode() == dns.rcode.NXDOMAIN
    # an existing name without TXT data is NOERROR/NODATA, not NXDOMAIN
    nodata = clean_dns.query("_domainkey.example.org")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer


def test_dns_fixture_restores_state(dns_server: DNSServer) -> None:
    state = dns_server.snapshot()
    dns_server.publish({"temp.restore.test": ["x"]})
    dns_server.restore(state)
    assert dns_server.lookup_txt("temp.restore.test") == []


def test_load_zone_text_serves_bind_syntax_as_written(clean_dns: DNSServer) -> None:
    text = (
        'sel._domainkey\tIN\tTXT\t( "v=DKIM1; k=rsa; "\n'
        '\t  "p=MIIBIjAN" )  ; ----- DKIM key sel for zone.test\n'
        'other 300 IN TXT "plain"\n'
    )
    clean_dns.load_zone_text("zone.test", text)
    assert clean_dns.lookup_txt("sel._domainkey.zone.test") == [b"v=DKIM1; k=rsa; p=MIIBIjAN"]
    assert clean_dns.query("other.zone.test").answer[0].ttl == 300
    with pytest.raises(ZoneTextError, match="quoted"):
        clean_dns.load_zone_text("broken.test", 'sel._domainkey IN TXT ( "unterminated\n')
    # a rejected text leaves the server serving the previous data
    assert clean_dns.lookup_txt("sel._domainkey.zone.test") == [b"v=DKIM1; k=rsa; p=MIIBIjAN"]
    clean_dns.unload_zone_text("zone.test")
    assert clean_dns.query("sel._domainkey.zone.test").rcode() == dns.rcode.NXDOMAIN


def test_blackhole_never_answers(dns_server: DNSServer) -> None:
    host, _, port = dns_server.blackhole_address().rpartition(":")
    query = dns.message.make_query("sel._domainkey.example.com", "TXT")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(query, host, port=int(port), timeout=0.3)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(query, host, port=int(port), timeout=0.3)


def test_netns_resolves_through_port_53_without_touching_host(clean_dns: DNSServer) -> None:
    with open("/etc/resolv.conf", "rb") as fh:
        before = fh.read()
    clean_dns.publish({"netns.example.net": ["inside"]})
    code = (
        "import dns.resolver; r = dns.resolver.Resolver();"
        "print(r.nameservers, b''.join(r.resolve('netns.example.net', 'TXT')[0].strings))"
    )
    (result,) = clean_dns.run_in_netns([NetnsJob([sys.executable, "-c", code])])
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "['127.0.0.1'] b'inside'"
    with open("/etc/resolv.conf", "rb") as fh:
        assert fh.read() == before


# -- verifiers -----------------------------------------------------------------------------


def _dkimpy_sign(key_path: str, selector: bytes, domain: bytes, message: bytes) -> bytes:
    with open(key_path, "rb") as fh:
        private = fh.read()
    header = dkim.sign(
        message,
        selector,
        domain,
        private,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return header + message


def test_all_four_verifiers_pass_good_and_fail_tampered(
    clean_dns: DNSServer, key_dir: KeySet
) -> None:
    key_dir.rsa2048.publish(clean_dns, "example.com")
    signed = _dkimpy_sign(key_dir.rsa2048.path, b"sel2048", b"example.com", MESSAGE)
    tampered = signed.replace(b"proves the", b"disproves the")

    def summary(results: list) -> list[tuple[str, str, str | None, str]]:
        return [(r.kind, r.domain, r.selector, r.result) for r in results]

    good = [("dkim", "example.com", "sel2048", "pass")]
    bad = [("dkim", "example.com", "sel2048", "fail")]
    assert [summary(r) for r in verify_mail_dkim_many([signed, tampered], clean_dns)] == [good, bad]
    assert [summary(r) for r in verify_go_msgauth([signed, tampered], clean_dns)] == [good, bad]
    assert summary(verify_opendkim(signed, clean_dns)) == good
    assert summary(verify_opendkim(tampered, clean_dns)) == bad
    assert summary(verify_dkimpy(signed, clean_dns)) == good
    assert summary(verify_dkimpy(tampered, clean_dns)) == bad


def test_verifiers_report_each_signature_in_header_order(
    clean_dns: DNSServer, key_dir: KeySet
) -> None:
    key_dir.rsa2048.publish(clean_dns, "example.com")
    key_dir.rsa1024.publish(clean_dns, "example.org")
    once = _dkimpy_sign(key_dir.rsa2048.path, b"sel2048", b"example.com", MESSAGE)
    twice = _dkimpy_sign(key_dir.rsa1024.path, b"sel1024", b"example.org", once)
    expected = [("example.org", "sel1024", "pass"), ("example.com", "sel2048", "pass")]
    for results in (
        verify_mail_dkim(twice, clean_dns),
        verify_go_msgauth([twice], clean_dns)[0],
        verify_opendkim(twice, clean_dns),
        verify_dkimpy(twice, clean_dns),
    ):
        assert [(r.domain, r.selector, r.result) for r in results] == expected


def test_verifiers_do_not_pass_a_missing_key(clean_dns: DNSServer, key_dir: KeySet) -> None:
    signed = _dkimpy_sign(key_dir.rsa2048.path, b"sel2048", b"nokey.example.net", MESSAGE)
    (mail_dkim,) = verify_mail_dkim(signed, clean_dns)
    assert (mail_dkim.result, "not available" in mail_dkim.detail) == ("invalid", True)
    ((go,),) = verify_go_msgauth([signed], clean_dns)
    assert go.result == "permerror" and "no key" in go.detail
    (opendkim,) = verify_opendkim(signed, clean_dns)
    assert opendkim.result != "pass" and "key not found" in opendkim.detail
    (dkimpy,) = verify_dkimpy(signed, clean_dns)
    assert dkimpy.result == "permerror" and "missing public key" in dkimpy.detail


def test_verifiers_see_a_dns_timeout_as_temporary(dns_server: DNSServer, key_dir: KeySet) -> None:
    signed = _dkimpy_sign(key_dir.rsa2048.path, b"sel2048", b"example.com", MESSAGE)
    hole = dns_server.blackhole_address()
    (mail_dkim,) = verify_mail_dkim(signed, hole, timeout=1)
    assert mail_dkim.result == "invalid" and "timeout" in mail_dkim.detail
    assert [r.result for r in verify_opendkim(signed, hole, timeout=1)] == ["temperror"]
    assert [r.result for r in verify_dkimpy(signed, hole, timeout=1)] == ["temperror"]


def test_mail_dkim_verifies_perl_signed_domainkeys(clean_dns: DNSServer, key_dir: KeySet) -> None:
    key_dir.rsa1024.publish(clean_dns, "example.com")
    for key in (key_dir.rsa1024, key_dir.rsa2048_pkcs1):
        key.publish(clean_dns, "example.com")
        signed = sign_mail_dkim(
            MESSAGE, key.path, "example.com", key.selector, kind="domainkeys", method="nofws"
        )
        assert signed.startswith(b"DomainKey-Signature: a=rsa-sha1; c=nofws; d=example.com;")
        (result,) = verify_mail_dkim(signed, clean_dns)
        assert (result.kind, result.domain, result.selector, result.result) == (
            "domainkeys",
            "example.com",
            key.selector,
            "pass",
        )
        (bad,) = verify_mail_dkim(signed.replace(b"Hello Bob", b"Hello Eve"), clean_dns)
        assert bad.result == "fail"


def test_unsigned_message_gives_no_results(clean_dns: DNSServer) -> None:
    assert verify_mail_dkim(MESSAGE, clean_dns) == []
    assert verify_go_msgauth([MESSAGE], clean_dns) == [[]]
    assert verify_opendkim(MESSAGE, clean_dns) == []
    assert verify_dkimpy(MESSAGE, clean_dns) == []


# -- keys ----------------------------------------------------------------------------------


def test_key_set_files(key_dir: KeySet) -> None:
    assert os.path.isdir(os.fspath(key_dir))
    assert (key_dir / "rsa2048.pem").is_file()
    assert load_signing_key(key_dir.rsa2048.path).bits == 2048
    assert load_signing_key(key_dir.rsa1024.path).bits == 1024
    assert load_signing_key(key_dir.ed25519.path).kind == "ed25519"
    with open(key_dir.rsa2048.path, "rb") as fh:
        assert fh.read().startswith(b"-----BEGIN PRIVATE KEY-----")
    with open(key_dir.rsa2048_pkcs1.path, "rb") as fh:
        assert fh.read().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    with pytest.raises(KeyLoadError, match="512 bits"):
        load_signing_key(key_dir.rsa512.path)
    assert key_dir.rsa512.dns_record.startswith("v=DKIM1; k=rsa; p=MFww")
    assert key_dir.ed25519.dns_record.startswith("v=DKIM1; k=ed25519; p=")


# -- smtp-sink -----------------------------------------------------------------------------


def _send(sink: SmtpSink, body: bytes, rcpts: list[str] | None = None) -> None:
    with smtplib.SMTP(sink.host, sink.port, local_hostname="client.test") as client:
        client.sendmail(
            "sender@example.com",
            rcpts or ["rcpt@example.org"],
            body,
            mail_options=["BODY=8BITMIME"],
            rcpt_options=[],
        )


def test_smtp_sink_round_trip_representation(smtp_sink: Callable[..., SmtpSink]) -> None:
    sink = smtp_sink()
    cases = [
        # (sent in DATA, what data must read back)
        (b"Subject: a\r\n\r\nplain body\r\n", b"Subject: a\r\n\r\nplain body\r\n"),
        (b"Subject: b\r\n\r\nno final newline", b"Subject: b\r\n\r\nno final newline\r\n"),
        (b"Subject: c\r\n\r\n\r\n\r\n", b"Subject: c\r\n\r\n\r\n\r\n"),
        (b"Subject: d\r\n\r\n", b"Subject: d\r\n\r\n"),
        (b"Subject: e\r\n", b"Subject: e\r\n"),
        (b"Subject: f\r\n\r\n.\r\n..two\r\n.x\r\n", b"Subject: f\r\n\r\n.\r\n..two\r\n.x\r\n"),
        (b"Subject: g\r\n\r\ncaf\xc3\xa9 \xff\r\n", b"Subject: g\r\n\r\ncaf\xc3\xa9 \xff\r\n"),
        (
            b"Subject: h\r\n\r\n" + b"y" * 5000 + b"\r\n",
            b"Subject: h\r\n\r\n" + b"y" * 5000 + b"\r\n",
        ),
        (b"Subject: i \t\r\n\r\ntrailing \t\r\n", b"Subject: i \t\r\n\r\ntrailing \t\r\n"),
        # not byte-exact: bare LF reads back as CRLF, a bare CR is dropped
        (b"Subject: j\r\n\r\nbare\nlf\rcr\r\n", b"Subject: j\r\n\r\nbare\r\nlfcr\r\n"),
    ]
    for sent, _ in cases:
        _send(sink, sent, ["a@example.org", "b@example.org"])
    messages = sink.wait_for(len(cases))
    # several messages can complete within one file-timestamp tick: pair them up by Subject
    by_subject = {m.header("Subject"): m.data for m in messages}
    assert by_subject == {header_value(exp, "Subject"): exp for _, exp in cases}
    first = next(m for m in messages if m.header("Subject") == "a")
    assert first.helo == "client.test"
    assert first.proto == "ESMTP"
    assert first.mail_from == "sender@example.com"
    assert first.mail_params == ["BODY=8BITMIME"] or "SIZE=" in first.mail_args
    assert first.rcpts == ["a@example.org", "b@example.org"]
    assert first.client_addr == "127.0.0.1"
    sink.clear()
    assert sink.messages() == []


def test_smtp_sink_options_change_behaviour(smtp_sink: Callable[..., SmtpSink]) -> None:
    plain = smtp_sink()
    with smtplib.SMTP(plain.host, plain.port) as client:
        client.ehlo("client.test")
        assert client.has_extn("pipelining") and client.has_extn("8bitmime")
        assert client.has_extn("xforward") and client.has_extn("dsn")
    limited = smtp_sink(no_pipelining=True, no_8bitmime=True, no_xforward=True, no_dsn=True)
    with smtplib.SMTP(limited.host, limited.port) as client:
        client.ehlo("client.test")
        for ext in ("pipelining", "8bitmime", "xforward", "dsn"):
            assert not client.has_extn(ext)
    rejecting = smtp_sink(hard_reject=["RCPT"])
    with smtplib.SMTP(rejecting.host, rejecting.port) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.com")[0] == 250
        assert client.rcpt("b@example.org")[0] == 500
    soft = smtp_sink(soft_reject="MAIL")
    with smtplib.SMTP(soft.host, soft.port) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.com")[0] == 450
    closing = smtp_sink(reply_421=["DATA"])
    with smtplib.SMTP(closing.host, closing.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        assert client.docmd("DATA")[0] == 421


# -- CaptureServer -------------------------------------------------------------------------


def test_capture_server_records_exact_bytes_and_per_recipient_replies(
    capture_server: Callable[..., CaptureServer],
) -> None:
    server = capture_server(
        rcpt_replies={"bad@example.org": "550 5.1.1 <bad@example.org>: unknown user"},
        ehlo_capabilities=["PIPELINING", "8BITMIME", "XFORWARD NAME ADDR"],
    )
    body = b"Subject: x\r\n\r\n.leading dot\r\nbare\nlf\r\nno end"
    with smtplib.SMTP(server.host, server.port, local_hostname="client.test") as client:
        _code, caps = client.ehlo()
        assert caps.split(b"\n")[1:] == [b"PIPELINING", b"8BITMIME", b"XFORWARD NAME ADDR"]
        assert client.docmd("XFORWARD", "NAME=host.example ADDR=192.0.2.1")[0] == 250
        refused = client.sendmail(
            "a@example.com",
            ["good@example.org", "bad@example.org"],
            body,
            mail_options=["BODY=8BITMIME"],
            rcpt_options=["NOTIFY=NEVER"],
        )
    assert refused == {"bad@example.org": (550, b"5.1.1 <bad@example.org>: unknown user")}
    (txn,) = server.wait_for(1)
    assert txn.data == body + b"\r\n"
    assert txn.raw_data == b"Subject: x\r\n\r\n..leading dot\r\nbare\nlf\r\nno end\r\n"
    assert txn.ehlo == "ehlo client.test"
    assert txn.xforward == ["XFORWARD NAME=host.example ADDR=192.0.2.1"]
    assert txn.mail_from == "a@example.com"
    assert "BODY=8BITMIME" in txn.mail_params
    assert [(r.address, r.params, r.reply[:3]) for r in txn.rcpts] == [
        ("good@example.org", ["NOTIFY=NEVER"], "250"),
        ("bad@example.org", ["NOTIFY=NEVER"], "550"),
    ]
    assert txn.accepted_rcpts == ["good@example.org"]
    assert txn.data_reply == "250 2.0.0 Ok: queued"


def test_capture_server_rejects_data_when_told(
    capture_server: Callable[..., CaptureServer],
) -> None:
    server = capture_server(data_reply="554 5.7.1 rejected by test")
    with smtplib.SMTP(server.host, server.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.com", ["b@example.org"], b"Subject: y\r\n\r\nz\r\n")
        assert info.value.smtp_code == 554
    (txn,) = server.wait_for(1)
    assert txn.data == b"Subject: y\r\n\r\nz\r\n"
    assert txn.data_reply == "554 5.7.1 rejected by test"

    refusing = capture_server(data_command_reply="451 4.3.0 try later")
    with smtplib.SMTP(refusing.host, refusing.port) as client:
        client.ehlo("c.test")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        assert client.docmd("DATA") == (451, b"4.3.0 try later")
    assert refusing.messages == []


def test_perl_and_tools_present_when_ci() -> None:
    """Under CI every tool the verifiers use must be there (locally this just skips)."""
    for tool in ("nsd", "nsd-checkzone", "smtp-sink", "dkim-verify", "opendkim", "perl"):
        assert os.path.isabs(require_tool(tool))
    perl = require_tool("perl")
    proc = subprocess.run([perl, "-MMail::DKIM::Verifier", "-e", "1"], check=False)
    assert proc.returncode == 0
