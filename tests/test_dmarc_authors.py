"""DMARC through `dkproxy in --reject_fail`: internationalized author domains and messages
with several author domains.

Keys, DMARC and SPF records are served by NSD; signatures are made by Perl Mail::DKIM (what
DKIMproxy uses) and checked by `dkproxy in`, whose Authentication-Results is parsed with
`authres`. The rule under test: no way of writing the author (U-labels, several mailboxes,
several From fields, a field the address parsers split differently, a group) may turn a
p=reject rejection into an acceptance.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dkproxy.mailauth.authors import author_domains
from dkproxy.mailauth.message import Message
from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import KeySet
from tests.support.verifiers import sign_mail_dkim, verify_dkimpy, verify_go_msgauth
from tests.test_inbound import ar_results, dkimproxy_conf

IDN = "xn--exmple-cua.org"  # exämple.org
VICTIM = "victim.test"  # p=reject, never signs here
ATTACKER = "attacker.test"  # p=none, the signing domain the sender controls


@pytest.fixture
def records(clean_dns: DNSServer, key_dir: KeySet) -> Iterator[DNSServer]:
    key = key_dir.rsa2048
    clean_dns.publish(
        {
            f"_dmarc.{VICTIM}": ["v=DMARC1; p=reject"],
            f"_dmarc.{ATTACKER}": ["v=DMARC1; p=none"],
            f"_dmarc.{IDN}": ["v=DMARC1; p=reject"],
            IDN: ["v=spf1 ip4:192.0.2.7 -all"],
            key.dns_name(ATTACKER): [key.dns_record],
            key.dns_name(IDN): [key.dns_record],
        }
    )
    yield clean_dns


@pytest.fixture
def inbound(tmp_path: Path, records: DNSServer) -> Iterator[tuple[ProxyProcess, CaptureServer]]:
    with CaptureServer() as capture:
        conf = tmp_path / "dkimproxy_in.conf"
        proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False)
        dkimproxy_conf(conf, proxy, capture.address, records, "reject_fail")
        with proxy:
            yield proxy, capture


def message(subject: str, *author_fields: str) -> bytes:
    head = "".join(f"{field}\r\n" for field in author_fields)
    return (
        f"{head}To: bob@example.net\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@authors.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        "\r\nPlease pay the attached invoice.\r\n"
    ).encode()


def send(
    proxy: ProxyProcess, data: bytes, mail_from: str, client_ip: str = "198.51.100.9"
) -> tuple[int, str]:
    with RawClient(proxy.host, proxy.port) as client:
        client.reply()
        client.command("EHLO relay.example.test")
        assert client.command(f"XFORWARD ADDR={client_ip} HELO=relay.example.test")[0] == 250
        params = "" if mail_from.isascii() else " SMTPUTF8"
        assert client.command(f"MAIL FROM:<{mail_from}>{params}".encode())[0] == 250
        assert client.command("RCPT TO:<bob@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(data + b".\r\n")
        return client.reply()


def signed_by(data: bytes, key_dir: KeySet, domain: str) -> bytes:
    return sign_mail_dkim(data, key_dir.rsa2048.path, domain, key_dir.rsa2048.selector)


@pytest.mark.parametrize(
    ("name", "authors"),
    [
        ("one-field", [f"From: alice@{VICTIM}, mallory@{ATTACKER}", f"Sender: mallory@{ATTACKER}"]),
        ("two-fields", [f"From: alice@{VICTIM}", f"From: mallory@{ATTACKER}"]),
        ("two-fields-attacker-first", [f"From: mallory@{ATTACKER}", f"From: alice@{VICTIM}"]),
        ("parser-split", [f"From: alice@{VICTIM} <mallory@{ATTACKER}>"]),
        ("parser-split-reversed", [f"From: mallory@{ATTACKER} <alice@{VICTIM}>"]),
        ("group", [f"From: Accounts: mallory@{ATTACKER}, alice@{VICTIM};"]),
        ("upper-case-victim", [f"From: mallory@{ATTACKER}, Alice <alice@VICTIM.test>"]),
        ("obsolete-form", [f"From: mallory@{ATTACKER}, alice . x @ victim . test"]),
    ],
)
def test_several_author_domains_never_defeat_p_reject(
    inbound: tuple[ProxyProcess, CaptureServer],
    key_dir: KeySet,
    records: DNSServer,
    name: str,
    authors: list[str],
) -> None:
    proxy, capture = inbound
    data = signed_by(message(name, *authors), key_dir, ATTACKER)
    # The signature itself is good, for verifiers we did not write too.
    assert [r.result for r in verify_dkimpy(data, records)] == ["pass"]
    ((go,),) = verify_go_msgauth([data], records)
    assert go.result == "pass"
    code, text = send(proxy, data, f"bounce@{ATTACKER}")
    assert code == 550, text
    assert f"DMARC policy of {VICTIM} says reject" in text
    assert capture.messages == []
    # The same message from the attacker alone is fine: its own domain is aligned.
    alone = signed_by(message(f"{name}-alone", f"From: mallory@{ATTACKER}"), key_dir, ATTACKER)
    assert send(proxy, alone, f"bounce@{ATTACKER}")[0] == 250
    (tx,) = capture.messages
    assert [r.result for r in ar_results(tx.data or b"")["dmarc"]] == ["pass"]


def test_display_name_is_no_author_and_all_passing_authors_pass(
    inbound: tuple[ProxyProcess, CaptureServer], key_dir: KeySet
) -> None:
    proxy, capture = inbound
    shown = signed_by(
        message("display", f'From: "alice@{VICTIM}" <mallory@{ATTACKER}>'), key_dir, ATTACKER
    )
    both = signed_by(
        message("both-ours", f"From: a@{ATTACKER}, b@mail.{ATTACKER}"), key_dir, ATTACKER
    )
    assert send(proxy, shown, f"bounce@{ATTACKER}")[0] == 250
    assert send(proxy, both, f"bounce@{ATTACKER}")[0] == 250
    for tx in capture.messages:
        assert [r.result for r in ar_results(tx.data or b"")["dmarc"]] == ["pass"]


def test_from_without_usable_author_domain_is_rejected_under_reject_fail(
    inbound: tuple[ProxyProcess, CaptureServer], key_dir: KeySet
) -> None:
    proxy, capture = inbound
    for index, author in enumerate(["From: alice@[192.0.2.1]", "From: undisclosed:;"]):
        data = signed_by(message(f"nodomain{index}", author), key_dir, ATTACKER)
        code, text = send(proxy, data, f"bounce@{ATTACKER}")
        assert code == 550 and "DMARC cannot be applied" in text, text
    assert capture.messages == []


@pytest.mark.parametrize(
    ("name", "author", "sign", "mail_from", "client_ip", "expected"),
    [
        # The field report: U-label From, A-label d= (Mail::DKIM signs and verifies it).
        ("u-label-dkim", "From: joerg@exämple.org", True, "b@elsewhere.test", "198.51.100.9",
         "pass"),
        ("u-label-upper", "From: Jörg <jörg@EXÄMPLE.org>", True, "b@elsewhere.test",
         "198.51.100.9", "pass"),
        ("u-label-subdomain", "From: a@post.exämple.org", True, "b@elsewhere.test",
         "198.51.100.9", "pass"),
        # SPF for an SMTPUTF8 MAIL FROM in U-labels is checked, and aligned, as A-labels.
        ("u-label-spf", "From: a@exämple.org", False, "bounce@exämple.org", "192.0.2.7",
         "pass"),
        # Unsigned, SPF fails: the U-label From finds the A-label p=reject and is rejected.
        ("u-label-forged", "From: a@exämple.org", False, "bounce@exämple.org", "198.51.100.9",
         "reject"),
        ("a-label-forged", f"From: a@{IDN}", False, f"bounce@{IDN}", "198.51.100.9", "reject"),
    ],
)  # fmt: skip
def test_internationalized_from_domain_is_checked_as_a_labels(
    inbound: tuple[ProxyProcess, CaptureServer],
    key_dir: KeySet,
    name: str,
    author: str,
    sign: bool,
    mail_from: str,
    client_ip: str,
    expected: str,
) -> None:
    proxy, capture = inbound
    data = message(name, author)
    if sign:
        data = signed_by(data, key_dir, IDN)
    code, text = send(proxy, data, mail_from, client_ip)
    if expected == "reject":
        assert code == 550 and f"DMARC policy of {IDN} says reject" in text, text
        return
    assert code == 250, text
    (tx,) = capture.messages
    results = ar_results(tx.data or b"")
    assert [r.result for r in results["dmarc"]] == ["pass"]
    props = {p.name: p.value for p in results["dmarc"][0].properties}
    assert props["from"].endswith(IDN)


def test_author_domains_of_each_shape() -> None:
    def domains(*fields: str) -> list[str]:
        head = "".join(f"{f}\r\n" for f in fields).encode()
        return author_domains(Message(head + b"\r\nbody\r\n"))[0]

    assert domains("From: a@x.test, b@y.test") == ["x.test", "y.test"]
    assert domains("From: a@x.test", "From: b@y.test") == ["x.test", "y.test"]
    assert domains("From: a@x.test <b@y.test>") == ["x.test", "y.test"]
    assert domains('From: "a@x.test" <b@y.test>') == ["y.test"]
    assert domains("From: jörg@EXÄMPLE.org") == [IDN]
    assert author_domains(Message(b"To: a@b.test\r\n\r\n")) == ([], "no From field", False)


def test_decide_takes_the_most_severe_verdict_of_any_author_domain() -> None:
    from dkproxy.mailauth.dmarc import DmarcResult
    from dkproxy.mailauth.verifier import VerificationReport, VerifySettings, decide

    reject = DmarcResult("fail", VICTIM, policy="reject", reason="no aligned DKIM or SPF pass")
    weak = DmarcResult("fail", ATTACKER, policy="none", reason="no aligned DKIM or SPF pass")
    unsure = DmarcResult("temperror", "dns-trouble.test", reason="DNS timeout")
    passed = DmarcResult("pass", ATTACKER, policy="none")

    def verdict(results: list[DmarcResult], **settings: object) -> str:
        report = VerificationReport(dmarc=results[0], dmarc_authors=results)
        return decide(report, VerifySettings(authserv_id="mx.test", **settings)).action  # type: ignore[arg-type]

    assert verdict([reject, passed], reject_fail=True) == "reject"
    assert verdict([passed, reject], reject_fail=True) == "reject"
    # A failing p=none domain of the sender's own does not hide another domain's temperror.
    assert verdict([weak, unsure], reject_error=True) == "tempfail"
    assert verdict([unsure, weak], actions={"dmarc.fail": "reject"}) == "reject"
    assert verdict([passed, weak], reject_fail=True) == "accept"
