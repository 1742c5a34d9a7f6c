"""`dkproxy in`: the running verifying proxy between an SMTP client and a recording server.

Messages are signed by Perl Mail::DKIM (what DKIMproxy itself uses) and by our own outbound
proxy; keys, SPF and DMARC records come from NSD on loopback; every Authentication-Results
that arrives must parse with `authres` and say what the verifiers we did not write would say.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import authres
import pytest

from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import KeySet, dns_record
from tests.support.verifiers import sign_mail_dkim

AUTHSERV = "mx.example.test"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: inbound test\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <inbound-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


@pytest.fixture(scope="module")
def signing_key(key_dir: KeySet, dns_server: DNSServer) -> Iterator[str]:
    """A 2048-bit key (its record split into 255-byte strings) at in2026._domainkey."""
    path = str(key_dir / "rsa2048-pkcs1.pem")
    dns_server.publish({
        "in2026._domainkey.example.org": [dns_record(path)],
        "example.org": ["v=spf1 ip4:192.0.2.7 ~all"],
        "_dmarc.example.org": ["v=DMARC1; p=reject; adkim=r; aspf=r"],
        "example.net": ["v=spf1 ip4:192.0.2.0/24 -all"],
        "_dmarc.example.net": ["v=DMARC1; p=none"],
    })  # fmt: skip
    yield path
    dns_server.unpublish(
        "in2026._domainkey.example.org", "example.org", "_dmarc.example.org",
        "example.net", "_dmarc.example.net",
    )  # fmt: skip


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def dkimproxy_conf(path: Path, proxy: ProxyProcess, relay: str, dns: DNSServer, *extra: str) -> str:
    path.write_text(
        f"listen {proxy.address}\nrelay {relay}\nhostname {AUTHSERV}\n"
        f"dns_server {dns.address}\n" + "".join(f"{line}\n" for line in extra)
    )
    return str(path)


def start_inbound(tmp_path: Path, relay: str, dns: DNSServer, *extra: str) -> ProxyProcess:
    conf = tmp_path / "dkimproxy_in.conf"
    proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False)
    dkimproxy_conf(conf, proxy, relay, dns, *extra)
    return proxy.start()


def ar_results(message: bytes) -> dict[str, list[authres.core.AuthenticationResult]]:
    """Parse our Authentication-Results (the topmost field) with the authres package."""
    first = message.split(b"\r\n\r\n", 1)[0].decode()
    assert first.startswith("Authentication-Results:"), first[:200]
    field = first.split("\r\n")[0]
    for line in first.split("\r\n")[1:]:
        if line[:1] not in (" ", "\t"):
            break
        field += "\r\n" + line
    parsed = authres.AuthenticationResultsHeader.parse(field)
    assert parsed.authserv_id == AUTHSERV
    by_method: dict[str, list[authres.core.AuthenticationResult]] = {}
    for result in parsed.results:
        by_method.setdefault(result.method, []).append(result)
    return by_method


def send(proxy: ProxyProcess, message: bytes, sender: str = "alice@example.org",
         xforward: str | None = None) -> tuple[int, str]:  # fmt: skip
    with RawClient(proxy.host, proxy.port) as client:
        client.reply()
        client.command("EHLO relay.example.test")
        if xforward:
            assert client.command(f"XFORWARD {xforward}")[0] == 250
        assert client.command(f"MAIL FROM:<{sender}>")[0] == 250
        assert client.command("RCPT TO:<bob@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(message + b".\r\n")
        return client.reply()


def test_mail_dkim_signed_tampered_and_unsigned(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    dkim_signed = sign_mail_dkim(MESSAGE, signing_key, "example.org", "in2026")
    both = sign_mail_dkim(dkim_signed, signing_key, "example.org", "in2026", kind="domainkeys")
    assert both.startswith(b"DomainKey-Signature:")
    tampered = both.replace(b"Hello Bob.", b"Hello Eve.")
    proxy = start_inbound(tmp_path, capture.address, dns_server)
    try:
        for message in (both, tampered, MESSAGE):
            assert send(proxy, message)[0] == 250
    finally:
        proxy.stop()
    signed_out, tampered_out, unsigned_out = (tx.data for tx in capture.messages)
    assert signed_out is not None and tampered_out is not None and unsigned_out is not None
    expected = [(signed_out, "pass"), (tampered_out, "fail"), (unsigned_out, "none")]
    for delivered, verdict in expected:
        results = ar_results(delivered)
        assert [r.result for r in results["dkim"]] == [verdict]
        assert [r.result for r in results["domainkeys"]] == [verdict]
    ok = ar_results(signed_out)
    dkim_props = {p.name: p.value for p in ok["dkim"][0].properties}
    assert dkim_props["d"] == "example.org" and dkim_props["s"] == "in2026"
    assert dkim_props["a"] == "rsa-sha256" and len(dkim_props["b"]) == 8
    dk_props = {(p.type, p.name): p.value for p in ok["domainkeys"][0].properties}
    assert dk_props[("header", "from")] == "alice@example.org"
    # Only our header is added; the rest arrives byte-identical.
    assert signed_out.endswith(both) and unsigned_out.endswith(MESSAGE)
    assert "dkim=pass" in proxy.log


def test_our_outbound_output_verifies_inbound(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    inbound = start_inbound(tmp_path, capture.address, dns_server)
    outbound = ProxyProcess("out", [f"--keyfile={signing_key}", "--selector=in2026",
                                    "--domain=example.org", "--signature=dkim(c=relaxed)",
                                    "--signature=domainkeys(c=nofws)"],
                            inbound.address).start()  # fmt: skip
    try:
        with outbound.smtp() as client:
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    finally:
        outbound.stop()
        inbound.stop()
    (tx,) = capture.messages
    assert tx.data is not None
    results = ar_results(tx.data)
    assert [r.result for r in results["dkim"]] == ["pass"]
    assert [r.result for r in results["domainkeys"]] == ["pass"]


@pytest.mark.parametrize(
    ("client_ip", "sender", "spf", "dmarc"),
    [
        ("192.0.2.7", "alice@example.org", "pass", "pass"),
        ("198.51.100.9", "alice@example.org", "softfail", "fail"),
        ("198.51.100.9", "carol@example.net", "fail", "fail"),
        ("192.0.2.99", "carol@example.net", "pass", "fail"),
    ],
)
def test_spf_from_xforward_and_dmarc(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer,
    client_ip: str, sender: str, spf: str, dmarc: str,
) -> None:  # fmt: skip
    proxy = start_inbound(tmp_path, capture.address, dns_server)
    try:
        code, _ = send(proxy, MESSAGE, sender, f"ADDR={client_ip} HELO=client.example.test")
    finally:
        proxy.stop()
    assert code == 250
    (tx,) = capture.messages
    assert tx.data is not None
    results = ar_results(tx.data)
    assert [r.result for r in results["spf"]] == [spf]
    assert [r.result for r in results["dmarc"]] == [dmarc]


def test_reject_fail_rejects_dmarc_p_reject_failures(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    proxy = start_inbound(tmp_path, capture.address, dns_server, "reject_fail")
    try:
        code, text = send(proxy, MESSAGE, xforward="ADDR=198.51.100.9")
        assert code == 550 and "DMARC" in text
        signed = sign_mail_dkim(MESSAGE, signing_key, "example.org", "in2026")
        assert send(proxy, signed, xforward="ADDR=198.51.100.9")[0] == 250
    finally:
        proxy.stop()
    assert len(capture.messages) == 1


def test_dns_failure_is_temperror_and_reject_error_defers(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    signed = sign_mail_dkim(MESSAGE, signing_key, "example.org", "in2026")
    conf = tmp_path / "in.conf"
    proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False)
    conf.write_text(
        f"listen {proxy.address}\nrelay {capture.address}\nhostname {AUTHSERV}\n"
        f"dns_server {dns_server.blackhole_address()}\ndns_timeout 1\nreject_error\n"
    )
    with proxy:
        code, _ = send(proxy, signed)
    assert code == 451
    assert capture.messages == []
    conf.write_text(
        f"listen {proxy.address}\nrelay {capture.address}\nhostname {AUTHSERV}\n"
        f"dns_server {dns_server.blackhole_address()}\ndns_timeout 1\n"
    )
    proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False, port=proxy.port)
    with proxy:
        assert send(proxy, signed)[0] == 250
    (tx,) = capture.messages
    assert tx.data is not None
    assert [r.result for r in ar_results(tx.data)["dkim"]] == ["temperror"]


def test_forged_authentication_results_are_removed(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    forged = f"Authentication-Results: {AUTHSERV};\r\n dkim=pass header.d=example.org\r\n"
    foreign = "Authentication-Results: other.example.net; spf=pass smtp.mailfrom=a@b.c\r\n"
    message = forged.encode() + foreign.encode() + MESSAGE
    proxy = start_inbound(tmp_path, capture.address, dns_server)
    try:
        assert send(proxy, message)[0] == 250
    finally:
        proxy.stop()
    (tx,) = capture.messages
    assert tx.data is not None
    assert tx.data.count(f"Authentication-Results: {AUTHSERV};".encode()) == 1
    assert tx.data.endswith(foreign.encode() + MESSAGE)
    assert [r.result for r in ar_results(tx.data)["dkim"]] == ["none"]


def test_native_toml_actions(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    conf = tmp_path / "in.toml"
    proxy = ProxyProcess("in", ["-c", str(conf)], positional=False)
    conf.write_text(
        f'mode = "in"\nlisten = "{proxy.address}"\nrelay = "{capture.address}"\n'
        f'hostname = "{AUTHSERV}"\ndns_server = "{dns_server.address}"\n'
        '[actions]\n"dkim.fail" = "reject"\n"dkim.none" = "tempfail"\n'
    )
    signed = sign_mail_dkim(MESSAGE, signing_key, "example.org", "in2026")
    tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
    with proxy:
        assert send(proxy, signed)[0] == 250
        assert send(proxy, tampered)[0] == 550
        assert send(proxy, MESSAGE)[0] == 451
    assert len(capture.messages) == 1


def test_smtp_path_unchanged_for_inbound(
    tmp_path: Path, dns_server: DNSServer, capture: CaptureServer
) -> None:
    """Inbound uses the same session: ESMTP parameters pass, a dead relay gives 4xx."""
    proxy = start_inbound(tmp_path, capture.address, dns_server)
    try:
        with proxy.smtp() as client:
            client.ehlo()
            assert client.has_extn("dsn") and client.has_extn("xforward")
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE,
                            mail_options=["RET=HDRS", "ENVID=Xy1"],
                            rcpt_options=["NOTIFY=NEVER"])  # fmt: skip
    finally:
        proxy.stop()
    (tx,) = capture.messages
    assert tx.mail_params[1:] == ["RET=HDRS", "ENVID=Xy1"]  # smtplib puts size= first
    assert tx.rcpts[0].params == ["NOTIFY=NEVER"]
    dead = start_inbound(tmp_path, "127.0.0.1:1", dns_server)
    try:
        with RawClient(dead.host, dead.port) as client:
            assert client.reply()[0] == 421
    finally:
        dead.stop()


def test_rsa_sha1_as_dkimproxy_signs_by_default(
    tmp_path: Path, dns_server: DNSServer, signing_key: str, capture: CaptureServer
) -> None:
    """DKIMproxy's `signature dkim(c=relaxed)` signs rsa-sha1 (Mail::DKIM's default): accepted
    by default, like OpenDKIM and Mail::DKIM do; `allow_sha1 no` applies RFC 8301."""
    sha1 = sign_mail_dkim(MESSAGE, signing_key, "example.org", "in2026", algorithm="rsa-sha1")
    assert b"a=rsa-sha1" in sha1.split(b"\r\n\r\n")[0]
    for extra, verdict in (((), "pass"), (("allow_sha1 no",), "policy")):
        proxy = start_inbound(tmp_path, capture.address, dns_server, *extra)
        try:
            assert send(proxy, sha1)[0] == 250
        finally:
            proxy.stop()
        data = capture.messages[-1].data
        assert data is not None
        (result,) = ar_results(data)["dkim"]
        assert result.result == verdict
        assert {p.name: p.value for p in result.properties}["a"] == "rsa-sha1"
