"""Mailboxes that are not plain ASCII atoms, and internationalized domain names.

Any mailbox RFC 5322 3.4.1 or RFC 6532 allows must give its domain (quoted local parts,
comments, obsolete whitespace and route forms, groups, UTF-8 local parts and domains), and
domains are compared as A-labels everywhere: a U-label sender matches an A-label rule (and
the reverse), and the signature's d= is the A-label. What `dkproxy out` signs is checked with
Mail::DKIM, go-msgauth and dkimpy against keys served by NSD.
"""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest

from dkproxy.mailauth.addresses import DomainError, canonical_domain, parse_mailboxes
from dkproxy.mailauth.message import Message
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import dns_record, make_rsa_key
from tests.support.verifiers import (
    signature_tags,
    verify_dkimpy,
    verify_go_msgauth,
    verify_mail_dkim_many,
)

EXAEMPLE = "xn--exmple-cua.org"  # exämple.org
BUECHER = "xn--bcher-kva.example"  # bücher.example


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"John Doe" <"john doe"@example.com>', ['"john doe"@example.com']),
        ('"a\\"b"@example.com', ['"a\\"b"@example.com']),
        ("john(comment)@example.com", ["john@example.com"]),
        ("Alice <alice@example.org> (Work)", ["alice@example.org"]),
        ("john . doe @ example . com", ["john.doe@example.com"]),  # obs-local-part, obs-domain
        ("<@relay.example:john@example.com>", ["john@example.com"]),  # obs-route
        ("Team: a@x.example, b@y.example;", ["a@x.example", "b@y.example"]),  # group
        ("john@Example.COM.", ["john@example.com"]),
        ("jörg@exämple.org", [f"jörg@{EXAEMPLE}"]),  # RFC 6532
        ('"Jörg" <jörg@EXÄMPLE.org>', [f"jörg@{EXAEMPLE}"]),
        (f"Jörg <joerg@{EXAEMPLE.upper()}>", [f"joerg@{EXAEMPLE}"]),
        ("=?utf-8?q?J=C3=B6rg?= <j@example.org>", ["j@example.org"]),
        ("Straße <s@straße.de>", ["s@xn--strae-oqa.de"]),  # IDNA 2008: ß is kept
        # split differently by the two parsers: both mailboxes count
        ("alice@example.org <mallory@example.com>", ["alice@example.org", "mallory@example.com"]),
    ],
)
def test_every_valid_mailbox_form_gives_its_domain(value: str, expected: list[str]) -> None:
    found = parse_mailboxes(value)
    assert [str(a) for a in found.addresses] == expected
    assert found.problems == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("john@[192.0.2.1]", "address literal"),
        ("undisclosed-recipients:;", "no mailbox"),
        ("john", "has no domain"),
        ("a@example..org", "is not a domain name"),
        ("x@ex_ä.org", "not a valid domain name"),
    ],
)
def test_unusable_mailboxes_say_why(value: str, problem: str) -> None:
    found = parse_mailboxes(value)
    assert found.addresses == []
    assert any(problem in text for text in found.problems), found.problems


def test_canonical_domain_is_lower_case_a_labels() -> None:
    assert canonical_domain("EXÄMPLE.org.") == EXAEMPLE
    assert canonical_domain(EXAEMPLE.upper()) == EXAEMPLE
    assert canonical_domain("ÖBB.at") == "xn--bb-eka.at"
    for bad in ("", "xn--zz.org", "[127.0.0.1]", "a\u200db.example"):
        with pytest.raises(DomainError):
            canonical_domain(bad)


def test_unsigned_reason_says_what_was_wrong_with_the_from() -> None:
    message = Message(b"From: John <john@[192.0.2.1]>\r\nSender: nobody\r\n\r\nbody\r\n")
    address, reason = message.sender_and_reason()
    assert address is None
    assert "Sender 'nobody': mailbox 'nobody' has no domain" in reason
    assert "From 'John <john@[192.0.2.1]>'" in reason and "address literal" in reason
    assert Message(b"Subject: x\r\n\r\n").sender_and_reason() == (None, "no Sender or From header")


# --------------------------------------------------------------------------------------------
# through dkproxy out


def _message(sender: str, subject: str, *extra: str) -> bytes:
    more = "".join(f"{line}\r\n" for line in extra)
    return (
        f"From: {sender}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n{more}"
        f"Message-ID: <{subject}@addresses.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "\r\nHällo Bob.\r\n"
    ).encode()


def test_out_signs_every_mailbox_form_with_the_a_label_domain(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    key = make_rsa_key(str(tmp_path / "key.pem"))
    domains = ["example.org", "example.com", EXAEMPLE, BUECHER, "mapped.example"]
    dns_server.publish({f"addr._domainkey.{d}": [dns_record(key)] for d in domains})
    # U-label and A-label configuration alike: `domain` in U-labels, the map in both.
    (tmp_path / "sender_map").write_text(
        "bücher.example  dkim(c=relaxed)\n"
        f"jörg@{EXAEMPLE}  dkim(c=relaxed,d=mapped.example)\n"
        "example.com     dkim(c=relaxed)\n"
        "exämple.org     dkim(c=relaxed)\n",
        encoding="utf-8",
    )
    # A listid_map key in U-labels matches a List-Id in either form (d= the id minus a label).
    (tmp_path / "listid_map").write_text("news.bücher.example  dkim(c=relaxed)\n", "utf-8")
    lists = {
        "list-a-label": f"List-Id: News <news.{BUECHER}>",
        "list-u-label": "List-Id: Bücher-News <news.BÜCHER.example>",
    }
    messages = {
        "quoted": ('"John Doe" <"john doe"@example.com>', "example.com"),
        "comment": ("john(the boss)@example.com", "example.com"),
        "obsolete": ("john . doe @ example . com", "example.com"),
        "route": ("<@relay.example:john@example.com>", "example.com"),
        "utf8-local": ("Jörg <jörg@exämple.org>", "mapped.example"),
        "u-label": ("Anna <anna@EXÄMPLE.org>", EXAEMPLE),
        "a-label-sender-u-label-rule": (f"Bob <bob@{BUECHER}>", BUECHER),
        "u-label-sender-u-label-rule": ("Bob <bob@bücher.example>", BUECHER),
        "literal": ("john@[192.0.2.1]", None),
        "list-a-label": ("x@elsewhere.example", BUECHER),
        "list-u-label": ("x@elsewhere.example", BUECHER),
    }
    with CaptureServer() as sink:
        args = [f"--keyfile={key}", "--selector=addr", "--domain=example.org",
                f"--sender_map={tmp_path / 'sender_map'}",
                f"--listid_map={tmp_path / 'listid_map'}"]  # fmt: skip
        with ProxyProcess("out", args, sink.address) as proxy:
            with smtplib.SMTP(proxy.host, proxy.port, timeout=30) as client:
                for subject, (sender, _) in messages.items():
                    extra = [lists[subject]] if subject in lists else []
                    client.sendmail(
                        "jörg@exämple.org",
                        ["bob@example.net"],
                        _message(sender, subject, *extra),
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
                    )
            arrived = {
                re.search(rb"Subject: (\S+)", m.data).group(1).decode(): m.data  # type: ignore[union-attr]
                for m in sink.wait_for(len(messages), timeout=30)
            }
            log = proxy.log
    for subject, (_, domain) in messages.items():
        tags = signature_tags(arrived[subject])
        assert [t["d"] for _, t in tags] == ([domain] if domain else []), subject
    assert re.search(r"unsigned: .*From 'john@\[192\.0\.2\.1\]'.*address literal", log), log
    signed = [arrived[s] for s, (_, d) in messages.items() if d]
    for results in verify_mail_dkim_many(signed, dns_server):
        assert [r.result for r in results] == ["pass"], results
    for results in verify_go_msgauth(signed, dns_server):
        assert [r.result for r in results] == ["pass"], results
    for data in signed:
        assert [r.result for r in verify_dkimpy(data, dns_server)] == ["pass"]


def test_domain_option_accepts_u_labels_and_signs_a_labels(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """The field report: `domain example.org,example.com` and a quoted local part; and a
    U-label `domain` entry for a sender written in A-labels."""
    key = make_rsa_key(str(tmp_path / "key.pem"))
    dns_server.publish({f"multi._domainkey.{d}": [dns_record(key)] for d in
                        ("example.org", "example.com", EXAEMPLE)})  # fmt: skip
    senders = {
        "report": ('"John Doe" <"john doe"@example.com>', "example.com"),
        "a-label": (f"x@{EXAEMPLE}", EXAEMPLE),
        "u-label": ("y@exämple.org", EXAEMPLE),
        "none": ("z@elsewhere.example", None),
    }
    with CaptureServer() as sink:
        args = [
            f"--keyfile={key}",
            "--selector=multi",
            "--domain=example.org,example.com,exämple.org",
        ]
        with ProxyProcess("out", args, sink.address) as proxy:
            with smtplib.SMTP(proxy.host, proxy.port, timeout=30) as client:
                for subject, (sender, _) in senders.items():
                    client.sendmail("a@example.org", ["b@example.net"], _message(sender, subject),
                                    mail_options=["BODY=8BITMIME"])  # fmt: skip
            arrived = {
                re.search(rb"Subject: (\S+)", m.data).group(1).decode(): m.data  # type: ignore[union-attr]
                for m in sink.wait_for(len(senders), timeout=30)
            }
            log = proxy.log
    for subject, (_, domain) in senders.items():
        assert [t["d"] for _, t in signature_tags(arrived[subject])] == (
            [domain] if domain else []
        ), subject
    assert "sender domain 'elsewhere.example' is not one of the configured domains" in log
    signed = [arrived[s] for s, (_, d) in senders.items() if d]
    for results in verify_go_msgauth(signed, dns_server):
        assert [r.result for r in results] == ["pass"], results
