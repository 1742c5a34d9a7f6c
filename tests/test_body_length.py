"""DKIM signatures with a body length limit (`l=`) through `dkproxy in`.

RFC 6376 8.2: text appended after the `l=` bytes keeps the signature valid. Such a signature
must not give dkim=pass (dkim=policy with a comment) nor align for DMARC, unless
`allow_body_length` restores the old behaviour. The decision is made on the canonical body:
what `l=` counts. Signatures are made by dkimpy (`length=True`), keys come from NSD, and the
same messages are checked with Mail::DKIM, which calls each signature good, and go-msgauth,
which refuses every signature with l=.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import authres
import dkim
import pytest

from dkproxy.mailauth.bodylength import canonical_body_length, uncovered_body
from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import KeySet
from tests.support.verifiers import verify_go_msgauth, verify_mail_dkim_many
from tests.test_inbound import ar_results, dkimproxy_conf

DOMAIN = "newsletter.test"
HEAD = (
    f"From: News <news@{DOMAIN}>\r\nTo: bob@example.net\r\nSubject: weekly\r\n"
    f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <weekly@{DOMAIN}>\r\n\r\n"
).encode()
BODY = b"This week's news.\r\nRegards\r\n"
#: (name, c=, appended after signing, dkproxy's verdict)
CASES = [
    ("whole-simple", b"simple/simple", b"", "pass"),
    ("whole-relaxed", b"relaxed/relaxed", b"", "pass"),
    ("phish-simple", b"simple/simple", b"Click here: http://phish.example/\r\n", "policy"),
    ("phish-relaxed", b"relaxed/relaxed", b"Click here: http://phish.example/\r\n", "policy"),
    ("one-byte", b"relaxed/simple", b"!\r\n", "policy"),
    # Canonically nothing was added: trailing empty lines (both), trailing white space (relaxed).
    ("empty-lines-simple", b"simple/simple", b"\r\n\r\n\r\n", "pass"),
    ("empty-lines-relaxed", b"relaxed/relaxed", b"\r\n \t\r\n", "pass"),
]


def sign_with_length(key_dir: KeySet, c_value: bytes, body: bytes = BODY) -> bytes:
    with open(key_dir.rsa2048.path, "rb") as handle:
        key = handle.read()
    header, body_c = c_value.split(b"/")
    field = dkim.sign(
        HEAD + body,
        key_dir.rsa2048.selector.encode(),
        DOMAIN.encode(),
        key,
        canonicalize=(header, body_c),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        length=True,
    )
    return field + HEAD + body


@pytest.fixture
def records(clean_dns: DNSServer, key_dir: KeySet) -> Iterator[DNSServer]:
    key = key_dir.rsa2048
    clean_dns.publish(
        {key.dns_name(DOMAIN): [key.dns_record], f"_dmarc.{DOMAIN}": ["v=DMARC1; p=reject"]}
    )
    yield clean_dns


def run_inbound(tmp_path: Path, dns: DNSServer, messages: list[bytes], *extra: str) -> list:
    """Send `messages` through `dkproxy in --reject_fail ...`; (code, delivered or None)."""
    out = []
    with CaptureServer() as capture:
        conf = tmp_path / "dkimproxy_in.conf"
        proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False)
        dkimproxy_conf(conf, proxy, capture.address, dns, "reject_fail", *extra)
        with proxy:
            for data in messages:
                before = len(capture.messages)
                with RawClient(proxy.host, proxy.port) as client:
                    client.reply()
                    client.command("EHLO relay.example.test")
                    client.command("XFORWARD ADDR=198.51.100.9")
                    client.command("MAIL FROM:<bounce@elsewhere.test>")
                    client.command("RCPT TO:<bob@example.net>")
                    client.command("DATA")
                    client.send(data + b".\r\n")
                    code, text = client.reply()
                delivered = capture.messages[before].data if code == 250 else None
                out.append((code, text, delivered))
    return out


def test_content_after_l_is_never_a_pass(
    tmp_path: Path, records: DNSServer, key_dir: KeySet
) -> None:
    messages = [sign_with_length(key_dir, c) + extra for _, c, extra, _ in CASES]
    # The signatures themselves are good: verifiers that honour l= call every one a pass.
    for name_results in verify_mail_dkim_many(messages, records):
        assert [r.result for r in name_results] == ["pass"]
    # go-msgauth goes further than dkproxy: it refuses every l= signature, whole body or not.
    for go in verify_go_msgauth(messages, records):
        assert [(r.result, r.detail) for r in go] == [
            ("permerror", "dkim: message contains an insecure body length tag")
        ]
    for (name, _c, _extra, verdict), (code, text, delivered) in zip(
        CASES, run_inbound(tmp_path, records, messages), strict=True
    ):
        if verdict == "pass":
            assert code == 250, (name, text)
            results = ar_results(delivered)
            assert [r.result for r in results["dkim"]] == ["pass"], name
            assert [r.result for r in results["dmarc"]] == ["pass"], name
        else:
            # Not aligned for DMARC either: p=reject applies.
            assert code == 550 and f"DMARC policy of {DOMAIN} says reject" in text, (name, text)


def test_policy_result_carries_a_comment_and_the_option_restores_pass(
    tmp_path: Path, records: DNSServer, key_dir: KeySet
) -> None:
    phish = sign_with_length(key_dir, b"relaxed/simple") + b"Click here: http://x.example/\r\n"
    strict = tmp_path / "strict"
    loose = tmp_path / "loose"
    strict.mkdir()
    loose.mkdir()
    # Without reject_fail's 550 the header can be read: DMARC p=none for this run.
    records.publish({f"_dmarc.{DOMAIN}": ["v=DMARC1; p=none"]})
    ((code, _, delivered),) = run_inbound(strict, records, [phish])
    assert code == 250
    field = delivered.split(b"\r\n\r\n", 1)[0].decode()
    assert "dkim=policy (2048-bit key; body beyond l=" in field
    header = authres.AuthenticationResultsHeader.parse(field.split("\r\nDKIM-Signature")[0])
    dkim_result = next(r for r in header.results if r.method == "dkim")
    assert dkim_result.result == "policy"
    assert "unsigned" in (dkim_result.reason or "")
    assert [r.result for r in header.results if r.method == "dmarc"] == ["fail"]
    ((code, _, delivered),) = run_inbound(loose, records, [phish], "allow_body_length yes")
    results = ar_results(delivered)
    assert [r.result for r in results["dkim"]] == ["pass"]
    assert [r.result for r in results["dmarc"]] == ["pass"]


def test_decided_on_the_canonical_body() -> None:
    body = b"a  b \r\n\r\n\r\n"
    assert canonical_body_length(body, b"simple/simple") == len(b"a  b \r\n")
    assert canonical_body_length(body, b"relaxed/relaxed") == len(b"a b\r\n")
    assert uncovered_body(body, {b"l": b"5", b"c": b"relaxed/relaxed"}) is None
    assert uncovered_body(body, {b"l": b"5", b"c": b"simple/simple"}) == (5, 7)
    assert uncovered_body(body, {b"l": b"0"}) == (0, 7)  # c= defaults to simple/simple
    # An empty body is one CRLF under simple (RFC 6376 3.4.3), nothing under relaxed.
    assert uncovered_body(b"", {b"l": b"0"}) == (0, 2)
    assert uncovered_body(b"", {b"l": b"0", b"c": b"relaxed/relaxed"}) is None
