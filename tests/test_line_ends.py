"""Line-end irregularities in DATA: rewritten as Postfix stores them, before signing.

RFC 5321 2.3.8 allows CR and LF only together. A client that sends a bare CR, CR CR LF, a bare
LF or LF CR straight to `dkproxy out` gets its message signed; the next hop (Postfix's smtpd,
per conf/postfix-master-out.cf) then stores the lines its own way. Measured with Postfix 3.7:
every LF ends a line, the CRs right before it are dropped, every other CR becomes a space.
`wire_line_ends` does the same, and these tests hold it to the real Postfix: the same bytes
sent straight to the reinjection smtpd arrive as `wire_line_ends` predicts, and through the
whole chain (dkproxy out -> Postfix -> capture) the signatures still verify with Mail::DKIM,
go-msgauth and dkimpy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from dkproxy.smtp.lines import break_long_lines, wire_line_ends
from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.postfix import PostfixInstance
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import dns_record, make_rsa_key
from tests.support.tools import free_port
from tests.support.verifiers import verify_dkimpy, verify_go_msgauth, verify_mail_dkim_many
from tests.test_postfix import outbound_services

DOMAIN = "example.org"
SELECTOR = "lineends"

#: body (as sent, still dot-stuffed) -> what Postfix 3.7 stores and delivers.
CASES: dict[str, tuple[bytes, bytes]] = {
    "cr-cr-lf": (b"line one\r\r\nline two\r\n", b"line one\r\nline two\r\n"),
    "three-cr-lf": (b"line one\r\r\r\nx\r\n", b"line one\r\nx\r\n"),
    "bare-cr-mid-line": (b"line\rone\r\nline two\r\n", b"line one\r\nline two\r\n"),
    "bare-lf": (b"line one\nline two\r\n", b"line one\r\nline two\r\n"),
    "lf-cr": (b"line one\n\rline two\r\n", b"line one\r\n line two\r\n"),
    "cr-at-end-of-data": (b"line one\r\nlast\r", b"line one\r\nlast\r\n"),
    "cr-only-line": (b"a\r\n\r\r\nb\r\n", b"a\r\n\r\nb\r\n"),
    "cr-before-space": (b"a\r \r\nb\r\n", b"a  \r\nb\r\n"),
    "cr-at-line-start": (b"a\r\n\rb\r\n", b"a\r\n b\r\n"),
    "cr-runs": (b"a\r\r\nb\r\rc\r\n", b"a\r\nb  c\r\n"),
    "cr-before-dot": (b"a\r.\r\n", b"a .\r\n"),
    # Postfix's smtp client breaks lines over 998 characters with CRLF SPACE.
    "line-of-998": (b"x" * 998 + b"\r\n", b"x" * 998 + b"\r\n"),
    "line-of-999": (b"x" * 999 + b"\r\n", b"x" * 998 + b"\r\n x\r\n"),
    "line-of-5000": (
        b"y" * 5000 + b"\r\n",
        b"y" * 998 + b"".join(b"\r\n " + b"y" * n for n in (997, 997, 997, 997, 14)) + b"\r\n",
    ),
    "long-stuffed-line": (
        b".." + b"z" * 1200 + b"\r\n",
        b"." + b"z" * 997 + b"\r\n " + b"z" * 203 + b"\r\n",
    ),
    "nul-vt-ff": (b"a\x00b\x0bc\x0c\r\n", b"a\x00b\x0bc\x0c\r\n"),
}
# (the data terminator CRLF.CRLF follows each body; a body ending in bare CR makes "CR CRLF")


def predicted(wire: bytes) -> bytes:
    """What the session stores for a whole DATA body: line ends, unstuffing, long lines."""
    unstuffed = re.sub(rb"(?m)^\.", b"", wire_line_ends(wire))
    return break_long_lines(unstuffed, 0)[0]


def test_wire_line_ends_matches_measured_postfix() -> None:
    for name, (sent, stored) in CASES.items():
        wire = sent if sent.endswith(b"\n") else sent + b"\r\n"
        assert predicted(wire) == stored, name


def test_break_long_lines_same_result_in_pieces() -> None:
    """Cut anywhere but inside CRLF (what the DATA reader guarantees), the pieces give the
    same bytes as the whole, and the whole is what Postfix sends on."""
    lengths = (0, 1, 997, 998, 999, 1995, 1996, 2048, 5000)
    data = b"".join(b"w" * n + b"\r\n" for n in lengths)
    whole = break_long_lines(data, 0)[0]
    assert max(len(line) for line in whole.split(b"\r\n")) == 998
    assert whole.replace(b"\r\n ", b"") == data
    for step in (1, 7, 997, 998, 999, 4096):
        out, column, start = b"", 0, 0
        while start < len(data):
            end = min(start + step, len(data))
            if data[end - 1 : end] == b"\r":
                end += 1  # the session never cuts inside CRLF
            stored, column = break_long_lines(data[start:end], column)
            out += stored
            start = end
        assert out == whole, step


def test_wire_line_ends_leaves_clean_data_alone() -> None:
    clean = b"a\r\n\r\n.b\r\n" * 100
    assert wire_line_ends(clean) is clean
    assert wire_line_ends(b"") == b""


def test_wire_line_ends_in_a_header_block() -> None:
    # A line starting with CR becomes a folded continuation line, as Postfix stores it.
    sent = b"Subject: hdr\rmid\r\nX-Fold: one\r\n\rtwo\r\nX-End: v \r\r\n\r\n"
    assert wire_line_ends(sent) == b"Subject: hdr mid\r\nX-Fold: one\r\n two\r\nX-End: v \r\n\r\n"


def test_wire_line_ends_same_result_in_pieces() -> None:
    """Cut anywhere but inside a run of CRs (what the DATA reader guarantees), the pieces give
    the same bytes as the whole: every pair of cut points in a message with every form."""
    short = [sent for sent, _ in CASES.values() if len(sent) < 100]
    data = b"".join(sent + b"\r\n" for sent in short) + b"x\n\r\r.y\r\r\r\n"
    whole = wire_line_ends(data)
    assert whole.count(b"\r") == whole.count(b"\n") == whole.count(b"\r\n")
    allowed = [i for i in range(1, len(data)) if data[i - 1] != 0x0D]
    for first in allowed:
        for second in allowed[allowed.index(first) :: 7]:
            pieces = (data[:first], data[first:second], data[second:])
            assert b"".join(wire_line_ends(p) for p in pieces) == whole, (first, second)


# --------------------------------------------------------------------------------------------
# against the real Postfix


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer
) -> Iterator[tuple[PostfixInstance, ProxyProcess, CaptureServer]]:
    """conf/postfix-master-out.cf in a private Postfix relaying to a byte-exact capture server,
    and `dkproxy out` re-injecting into it (DKIM relaxed and simple, DomainKeys nofws)."""
    key = make_rsa_key(str(tmp_path_factory.mktemp("line-ends") / "key.pem"))
    name = f"{SELECTOR}._domainkey.{DOMAIN}"
    dns_server.publish({name: [dns_record(key)]})
    capture = CaptureServer().start()
    submission, filter_port, reinject = free_port(), free_port(), free_port()
    mta = PostfixInstance(
        services=outbound_services(submission, filter_port, reinject),
        relayhost=f"[127.0.0.1]:{capture.port}",
    )
    args = [
        f"--keyfile={key}",
        f"--selector={SELECTOR}",
        f"--domain={DOMAIN}",
        "--signature=dkim(c=relaxed)",
        "--signature=dkim(c=simple)",
        "--signature=domainkeys(c=nofws)",
    ]
    proxy = ProxyProcess("out", args, relay=f"127.0.0.1:{reinject}", port=filter_port)
    try:
        mta.start()
        proxy.start()
        yield mta, proxy, capture
    finally:
        proxy.stop()
        print(f"=== dkproxy\n{proxy.log}\n=== Postfix\n{mta.diagnostics() if mta.dir else ''}")
        mta.cleanup()
        capture.stop()
        dns_server.unpublish(name)


def send_raw(port: int, subject: str, body: bytes) -> None:
    head = f"From: Alice <alice@{DOMAIN}>\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
    head += f"Message-ID: <{subject}@{DOMAIN}>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n"
    with RawClient("127.0.0.1", port) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example.org")[0] == 250
        assert client.command(f"MAIL FROM:<alice@{DOMAIN}>")[0] == 250
        assert client.command("RCPT TO:<bob@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        end = b".\r\n" if body.endswith(b"\n") else b"\r\n.\r\n"
        client.send(head.encode() + body + end)
        code, text = client.reply()
        assert code == 250, text
        client.command("QUIT")


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def test_postfix_stores_what_wire_line_ends_predicts(
    chain: tuple[PostfixInstance, ProxyProcess, CaptureServer],
) -> None:
    mta, _proxy, capture = chain
    reinject = mta.inet_ports[-1]
    before = len(capture.messages)
    for name, (sent, _stored) in CASES.items():
        send_raw(reinject, f"direct-{name}", sent)
    arrived = capture.wait_for(before + len(CASES), timeout=60)[before:]
    got = {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]: m.data for m in arrived}
    for name, (sent, stored) in CASES.items():
        assert body_of(got[f"direct-{name}".encode()]) == stored, name
        wire = sent if sent.endswith(b"\n") else sent + b"\r\n"
        assert body_of(got[f"direct-{name}".encode()]) == predicted(wire), name


def test_signatures_survive_postfix_for_every_line_end_form(
    chain: tuple[PostfixInstance, ProxyProcess, CaptureServer], dns_server: DNSServer
) -> None:
    _mta, proxy, capture = chain
    before = len(capture.messages)
    for name, (sent, _stored) in CASES.items():
        send_raw(proxy.port, f"signed-{name}", sent)
    arrived = capture.wait_for(before + len(CASES), timeout=90)[before:]
    delivered = [m.data for m in arrived]
    for data in delivered:
        subject = data.split(b"Subject: signed-", 1)[1].split(b"\r\n", 1)[0].decode()
        assert body_of(data) == CASES[subject][1], subject
    expected = [
        ("dkim", "pass", DOMAIN),
        ("dkim", "pass", DOMAIN),
        ("domainkeys", "pass", DOMAIN),
    ]
    for results in verify_mail_dkim_many(delivered, dns_server):
        assert sorted((r.kind, r.result, r.domain) for r in results) == expected, results
    for results in verify_go_msgauth(delivered, dns_server):
        assert [(r.kind, r.result) for r in results] == [("dkim", "pass")] * 2, results
    for data in delivered:
        results = verify_dkimpy(data, dns_server)
        assert [r.result for r in results] == ["pass", "pass"], results


#: Author forms Postfix's cleanup "completes" in header fields from a local client unless the
#: reinjection service sets local_header_rewrite_clients= (as conf/postfix-master-*.cf do).
HEADER_FORMS = {
    "route": "<@relay.example:john@example.org>",
    "bare-local-part": "john",
    "trailing-dot": "john@example.org.",
    "obsolete-spacing": "john . doe @ example . org",
    "quoted-local-part": '"John Doe" <"john doe"@example.org>',
    "utf8": "Jörg <jörg@exämple.org>",
}


def test_header_fields_arrive_as_signed_through_postfix(
    chain: tuple[PostfixInstance, ProxyProcess, CaptureServer], dns_server: DNSServer
) -> None:
    """Sent straight to `dkproxy out` (so Postfix sees dkproxy, a local client): the
    reinjection must neither rewrite header addresses nor add Message-ID/Date after signing."""
    _mta, proxy, capture = chain
    before = len(capture.messages)
    sent: dict[str, bytes] = {}
    for name, author in HEADER_FORMS.items():
        sent[name] = (
            f"From: {author}\r\nSender: {author}\r\nTo: {author}\r\nSubject: hdr-{name}\r\n"
            f"Message-ID: <{name}@example.org>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
            "\r\nbody\r\n"
        ).encode()
    sent["no-message-id-or-date"] = b"From: a@example.org\r\nSubject: hdr-bare\r\n\r\nbody\r\n"
    with RawClient("127.0.0.1", proxy.port) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example.org")[0] == 250
        for data in sent.values():
            assert client.command("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
            assert client.command("RCPT TO:<bob@example.net>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(data + b".\r\n")
            assert client.reply()[0] == 250
    arrived = [m.data for m in capture.wait_for(before + len(sent), timeout=60)[before:]]
    for data in sent.values():
        assert any(got.endswith(data) for got in arrived), data[:80]
    for results in verify_mail_dkim_many(arrived, dns_server):
        assert [(r.kind, r.result) for r in results if r.kind == "dkim"] == [("dkim", "pass")] * 2
    for results in verify_go_msgauth(arrived, dns_server):
        assert [r.result for r in results] == ["pass", "pass"], results
    for data in arrived:
        assert [r.result for r in verify_dkimpy(data, dns_server)] == ["pass", "pass"]


def test_line_end_forms_in_the_header_block_survive_postfix(
    chain: tuple[PostfixInstance, ProxyProcess, CaptureServer], dns_server: DNSServer
) -> None:
    """Bare CR in a field, a line starting with CR (Postfix makes it a folded line), CR CR LF
    ending a field or the header block, a bare LF between fields, a field over 998 characters
    (Postfix's smtp client folds it)."""
    _mta, proxy, capture = chain
    heads = [
        b"Subject: hdr\rmid\r\n",
        b"Subject: fold\r\n\rcontinued\r\n",
        b"Subject: crcrlf\r\r\n",
        b"Subject: bare-lf\nX-Next: field\r\n",
        b"Subject: end-of-header\r\n\r\r\n",
        b"Subject: long-field " + b"h" * 2500 + b"\r\n",  # a signed field broken at 998
    ]
    before = len(capture.messages)
    for head in heads:
        data = b"From: alice@example.org\r\nTo: bob@example.net\r\n" + head
        data += b"Message-ID: <h@example.org>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        if not head.endswith(b"\r\n\r\r\n"):  # else the header block has ended already
            data += b"\r\n"
        with RawClient("127.0.0.1", proxy.port) as client:
            client.reply()
            client.command("EHLO client.example.org")
            client.command("MAIL FROM:<alice@example.org>")
            client.command("RCPT TO:<bob@example.net>")
            assert client.command("DATA")[0] == 354
            client.send(data + b"body\r\n.\r\n")
            assert client.reply()[0] == 250
    arrived = [m.data for m in capture.wait_for(before + len(heads), timeout=60)[before:]]
    subjects = sorted(re.search(rb"Subject: ([^\r]*?)(?: h+)?\r\n", d).group(1) for d in arrived)  # type: ignore[union-attr]
    assert subjects == sorted(
        [b"hdr mid", b"fold", b"crcrlf", b"bare-lf", b"end-of-header", b"long-field"]
    )
    for results in verify_mail_dkim_many(arrived, dns_server):
        assert sorted((r.kind, r.result) for r in results) == [
            ("dkim", "pass"),
            ("dkim", "pass"),
            ("domainkeys", "pass"),
        ], results
    for results in verify_go_msgauth(arrived, dns_server):
        assert [r.result for r in results] == ["pass", "pass"], results
