"""Outbound signing of awkward messages, checked by verifiers we did not write.

A corpus of messages goes through `dkproxy out --conf_file` (a DKIMproxy-style configuration:
two domains, `dkim(c=relaxed,a=rsa-sha256)` + `domainkeys(c=nofws)`) into Postfix's
smtp-sink. Keys are served by NSD on loopback. Every arriving message must carry only our
header fields on top of the original bytes, and every signature must verify with Perl
Mail::DKIM (DKIM and DomainKeys) and go-msgauth (DKIM).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dkproxy.smtp.lines import break_long_lines
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import SmtpSink
from tests.support.testkeys import dns_record, make_ed25519_key, make_rsa_key
from tests.support.verifiers import (
    VerifierResult,
    signature_tags,
    verify_dkimpy,
    verify_go_msgauth,
    verify_mail_dkim_many,
    verify_opendkim,
)

SIGNATURE_FIELDS = (b"dkim-signature:", b"domainkey-signature:")


def _headers(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


BASE = (
    "From: Alice Example <alice@example.org>",
    "To: Bob <bob@example.net>",
    "Subject: corpus",
    "Date: Sun, 22 Nov 2026 10:00:00 +0000",
    "Message-ID: <{id}@example.org>",
)


def _msg(name: str, body: bytes, *extra: str, base: tuple[str, ...] = BASE) -> bytes:
    lines = [line.format(id=name) for line in base] + list(extra)
    return _headers(*lines) + b"\r\n" + body


def _attachment(size: int) -> bytes:
    import base64
    import os

    payload = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    return (
        b"--BOUNDARY\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee attached.\r\n"
        b"--BOUNDARY\r\nContent-Type: application/octet-stream; name=data.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n'
        + payload + b"--BOUNDARY--\r\n"
    )  # fmt: skip


_LONG_HEADER = _msg(
    "longhdr",
    b"body\r\n",
    "X-Long: " + "z" * 2000,
    "References: " + " ".join(f"<id{n}@example.org>" for n in range(60)),
)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    envelope_from: str = "alice@example.org"
    domain: str = "example.org"  # the d= expected on every signature
    domainkeys: bool = True  # a DomainKeys signature is expected
    #: What must arrive under our header fields, when it is not `data` itself: smtplib adds a
    #: final CRLF when the message lacks one, and bare LF line ends are sent on as CRLF.
    expected: bytes | None = None
    #: go-msgauth cannot read a message without the empty line after the header ("failed to
    #: read header: EOF"), signed or not: for such a message only that error is expected.
    go_readable: bool = True

    @property
    def arrives(self) -> bytes:
        if self.expected is not None:
            return self.expected
        return self.data if self.data.endswith(b"\r\n") or not self.data else self.data + b"\r\n"


CORPUS: list[Case] = [
    Case("plain", _msg("plain", b"Hello Bob.\r\n")),
    Case("dot-lines", _msg("dots", b".\r\n..\r\n.leading dot\r\n. \r\nend\r\n.\r\n")),
    Case("8bit-latin1", _msg("latin1", "Grüße aus Köln, ça va?\r\n".encode("latin-1"),
                             "MIME-Version: 1.0", "Content-Type: text/plain; charset=iso-8859-1",
                             "Content-Transfer-Encoding: 8bit")),
    Case("utf8", _msg("utf8", "Привет, 世界 — ünïcödé\r\n".encode(),
                      "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                      "Content-Transfer-Encoding: 8bit")
         .replace(b"Subject: corpus", "Subject: =?UTF-8?B?w7xtbGF1dA==?= ünïcödé".encode())),
    Case("empty-body", _msg("empty", b"")),
    Case("blank-only-body", _msg("blank", b"\r\n\r\n\r\n")),
    Case("whitespace-lines", _msg("ws", b"a  \r\n \t \r\n\tb\t\r\n  \r\n")),
    Case("no-final-newline", _msg("nonl", b"last line without newline")),
    Case("folded-headers", _msg("folded", b"body\r\n",
                                "X-Long: first part\r\n second part\r\n\tthird part",
                                "Cc: carol@example.net,\r\n   dave@example.net")),
    Case("odd-whitespace-headers", _headers(
        "From:alice@example.org", "To:   bob@example.net   ", "Subject:\tTabbed\t  subject ",
        "Date:Sun, 22 Nov 2026 10:00:00 +0000", "Message-ID:<odd@example.org>",
        "X-Empty:", "X-Spaces:    ") + b"\r\nbody\r\n"),
    Case("duplicate-headers", _msg("dup", b"body\r\n", "To: second@example.net",
                                   "Subject: second subject", "X-Dup: 1", "X-Dup: 2")),
    Case("long-lines", _msg("long", b"x" * 990 + b"\r\n" + b"y " * 400 + b"\r\n")),
    Case("mime-attachment-5mb", _msg("mime", _attachment(3_800_000), "MIME-Version: 1.0",
                                     'Content-Type: multipart/mixed; boundary="BOUNDARY"')),
    Case("foreign-dkim-signature", _headers(
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=forwarder.test; s=x;",
        " h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA",
    ) + _msg("foreign", b"forwarded body\r\n")),
    Case("sender-vs-from", _msg("sender", b"body\r\n", "Sender: list@example.net",
                                base=tuple(b.replace("alice@example.org", "alice@elsewhere.test")
                                           for b in BASE)),
         envelope_from="list@example.net", domain="example.net"),
    Case("subdomain-sender", _msg("sub", b"body\r\n",
                                  base=tuple(b.replace("@example.org", "@mail.sub.example.org")
                                             for b in BASE)),
         envelope_from="alice@mail.sub.example.org"),
    Case("second-domain", _msg("second", b"body\r\n",
                               base=tuple(b.replace("@example.org", "@example.net") for b in BASE)),
         envelope_from="alice@example.net", domain="example.net"),
    Case("space-before-colon", _msg("spcolon", b"body\r\n", "X-Spaced : value",
                                    "Comments : hello")),
    Case("bare-lf-line-ends",
         _msg("barelf", b"one\r\n.dot\r\n", "X-Before: 1").replace(b"\r\n", b"\n"),
         expected=_msg("barelf", b"one\r\n.dot\r\n\r\n", "X-Before: 1")),
    Case("very-long-header", _LONG_HEADER,
         # lines folded after 998 characters, as Postfix's smtp client sends them on
         # (break_long_lines is checked against the real Postfix in test_line_ends.py)
         expected=break_long_lines(_LONG_HEADER, 0)[0]),
    Case("blank-continuation", _msg("blankcont", b"body\r\n", "X-Blank: a\r\n \r\n\tb")),
    Case("nul-and-controls", _msg("ctl", b"nul\x00byte \x01\x7f ctl\r\n")),
    Case("headers-only", _headers(*[line.format(id="hdronly") for line in BASE]),
         go_readable=False),
    Case("folded-from", _msg("foldfrom", b"body\r\n",
                             base=("From: Alice Example\r\n <alice@example.org>", *BASE[1:])),
         domainkeys=False),
    # RFC 5322 4.5 obsolete "Name :" fields: three From fields for relaxed selection; h=
    # must count all of them (verifiers add a "from" to catch one added later).
    Case("obsolete-from-fields", _headers("From\t:alice@example.org")
         + _msg("obsfrom", b"body\r\n", "From : Alice <alice@example.org>")),
]  # fmt: skip


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer
) -> Iterator[dict[str, bytes]]:
    """Send the whole corpus through one proxy; return what arrived, by case name."""
    workdir: Path = tmp_path_factory.mktemp("interop")
    keyfile = make_rsa_key(str(workdir / "dkim.key"), 2048)
    record = dns_record(keyfile)
    dns_server.publish({
        "s2026._domainkey.example.org": [record],
        "s2026._domainkey.example.net": [record],
    })  # fmt: skip
    with SmtpSink() as sink:
        conf = workdir / "dkimproxy_out.conf"
        proxy = ProxyProcess("out", [f"--conf_file={conf}"], positional=False)
        conf.write_text(
            "# DKIMproxy-style configuration, as an administrator would have it\n"
            f"listen    127.0.0.1:{proxy.port}\n"
            f"relay     {sink.address}\n"
            "domain    example.org,example.net\n"
            "signature dkim(c=relaxed,a=rsa-sha256)\n"
            "signature domainkeys(c=nofws)\n"
            f"keyfile   {keyfile}\n"
            "selector  s2026\n"
        )
        with proxy, proxy.smtp() as client:
            for case in CORPUS:
                client.sendmail(case.envelope_from, ["bob@example.net"], case.data)
        arrived = sink.wait_for(len(CORPUS), timeout=30)
        by_id = {}
        for message in arrived:
            for case in CORPUS:
                if message.data.endswith(case.arrives):
                    by_id[case.name] = message.data
        yield by_id


@pytest.fixture(scope="module")
def mail_dkim_results(
    signed: dict[str, bytes], dns_server: DNSServer
) -> dict[str, list[VerifierResult]]:
    names = [case.name for case in CORPUS]
    results = verify_mail_dkim_many([signed[name] for name in names], dns_server)
    return dict(zip(names, results, strict=True))


@pytest.fixture(scope="module")
def go_results(signed: dict[str, bytes], dns_server: DNSServer) -> dict[str, list[VerifierResult]]:
    names = [case.name for case in CORPUS]
    results = verify_go_msgauth([signed[name] for name in names], dns_server)
    return dict(zip(names, results, strict=True))


def _ours(results: list[VerifierResult], domain: str) -> list[VerifierResult]:
    return [r for r in results if r.domain == domain]


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_body_arrives_intact_with_only_our_headers_on_top(
    case: Case, signed: dict[str, bytes]
) -> None:
    delivered = signed[case.name]
    original = case.arrives
    assert delivered.endswith(original)
    added = delivered[: len(delivered) - len(original)]
    fields = [b"DKIM-Signature:" if f.startswith(b"DKIM") else f for f in _split_fields(added)]
    kinds = sorted(field.split(b":", 1)[0].lower() + b":" for field in fields)
    expected = [b"dkim-signature:"] + ([b"domainkey-signature:"] if case.domainkeys else [])
    assert kinds == expected
    if case.domainkeys:
        assert added.startswith(b"DomainKey-Signature:")  # DK on top, so DKIM is below it
    tags = [t for kind, t in signature_tags(delivered) if t.get("d") == case.domain]
    assert len(tags) == len(expected)


def _split_fields(block: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_mail_dkim_verifies_dkim_and_domainkeys(
    case: Case, mail_dkim_results: dict[str, list[VerifierResult]]
) -> None:
    ours = _ours(mail_dkim_results[case.name], case.domain)
    kinds = sorted(r.kind for r in ours)
    assert kinds == (["dkim", "domainkeys"] if case.domainkeys else ["dkim"])
    assert all(r.result == "pass" for r in ours), ours


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_go_msgauth_verifies_dkim(case: Case, go_results: dict[str, list[VerifierResult]]) -> None:
    if not case.go_readable:
        (result,) = go_results[case.name]
        assert "failed to read header: EOF" in result.detail
        return
    ours = [r for r in _ours(go_results[case.name], case.domain) if r.kind == "dkim"]
    assert len(ours) == 1
    assert ours[0].result == "pass", ours


@pytest.mark.parametrize("name", ["plain", "dot-lines", "duplicate-headers", "utf8"])
def test_opendkim_and_dkimpy_verify(
    name: str, signed: dict[str, bytes], dns_server: DNSServer
) -> None:
    domain = "example.org"
    for verifier in (verify_opendkim, verify_dkimpy):
        ours = [r for r in _ours(verifier(signed[name], dns_server), domain) if r.kind == "dkim"]
        assert [r.result for r in ours] == ["pass"], (verifier.__name__, ours)


def test_tampered_copies_fail(signed: dict[str, bytes], dns_server: DNSServer) -> None:
    """The verifiers are really checking: a changed body or Subject must fail everywhere."""
    original = signed["plain"]
    tampered_body = original.replace(b"Hello Bob.", b"Hello Eve.")
    tampered_subject = original.replace(b"Subject: corpus", b"Subject: c0rpus")
    results = verify_mail_dkim_many([tampered_body, tampered_subject], dns_server)
    for per_message in results:
        ours = _ours(per_message, "example.org")
        assert ours and all(r.result != "pass" for r in ours), ours
    for per_message in verify_go_msgauth([tampered_body, tampered_subject], dns_server):
        assert all(r.result != "pass" for r in per_message), per_message


def test_sender_map_and_listid_map_choose_the_signatures(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """DKIMproxy map files through the running proxy: the chosen d=/s= verify for real."""
    default_key = make_rsa_key(str(tmp_path / "default.key"), 2048)
    vip_key = make_rsa_key(str(tmp_path / "vip.key"), 1024)
    list_key = make_ed25519_key(str(tmp_path / "list.key"))
    dns_server.publish({
        "dflt._domainkey.example.org": [dns_record(default_key)],
        "dflt._domainkey.example.com": [dns_record(default_key)],
        "vip._domainkey.example.com": [dns_record(vip_key)],
        "lists._domainkey.lists.example.org": [dns_record(list_key)],
    })  # fmt: skip
    (tmp_path / "sender_map").write_text(
        "# address first, then domain (and its subdomains)\n"
        f"boss@example.org   dkim(d=example.com,s=vip,key={vip_key}), domainkeys(c=nofws)\n"
        "example.org        dkim(c=relaxed), domainkeys(c=nofws)\n"
    )
    (tmp_path / "listid_map").write_text(
        f"lists.example.org  dkim(key={list_key},s=lists,d=lists.example.org)\n"
    )
    messages = {
        "boss": _msg("boss", b"from the boss\r\n",
                     base=tuple(b.replace("alice@", "boss@") for b in BASE)),
        "staff": _msg("staff", b"from staff\r\n", base=tuple(b.replace("alice@", "carol@sales.")
                                                             for b in BASE)),
        "list": _msg("list", b"list mail\r\n", "List-Id: Announce <announce.lists.example.org>"),
        "stranger": _msg("stranger", b"not ours\r\n",
                         base=tuple(b.replace("alice@example.org", "eve@elsewhere.test")
                                    for b in BASE)),
    }  # fmt: skip
    with SmtpSink() as sink:
        args = [f"--keyfile={default_key}", "--selector=dflt", "--domain=example.org",
                f"--sender_map={tmp_path / 'sender_map'}",
                f"--listid_map={tmp_path / 'listid_map'}"]  # fmt: skip
        with ProxyProcess("out", args, sink.address) as proxy, proxy.smtp() as client:
            for message in messages.values():
                client.sendmail("postmaster@example.org", ["bob@example.net"], message)
        arrived = {name: next(m.data for m in sink.wait_for(len(messages))
                              if m.data.endswith(data))
                   for name, data in messages.items()}  # fmt: skip
    tags = {name: [(kind.split("-")[0].replace("domainkey", "domainkeys"), t["d"], t["s"])
                   for kind, t in signature_tags(data)]
            for name, data in arrived.items()}  # fmt: skip
    assert sorted(tags["boss"]) == [("dkim", "example.com", "vip"),
                                    ("domainkeys", "example.org", "dflt")]  # fmt: skip
    assert sorted(tags["staff"]) == [("dkim", "example.org", "dflt"),
                                     ("domainkeys", "example.org", "dflt")]  # fmt: skip
    assert tags["list"] == [("dkim", "lists.example.org", "lists")]
    assert tags["stranger"] == []
    names = ["boss", "staff"]
    for name, results in zip(names, verify_mail_dkim_many([arrived[n] for n in names],
                                                          dns_server), strict=True):  # fmt: skip
        assert len(results) == 2 and all(r.result == "pass" for r in results), (name, results)
    (list_results,) = verify_go_msgauth([arrived["list"]], dns_server)
    assert [(r.domain, r.result) for r in list_results] == [("lists.example.org", "pass")]


OBSOLETE_NAME_HEADS = [
    b"From\t:alice@example.org\r\nFrom: Alice <alice@example.org>\r\nFrom : \r\n",
    b"From : Alice <alice@example.org>\r\nFrom: alice@example.org\r\n",
    b"Subject : one\r\nFrom: Alice <alice@example.org>\r\nSubject: two\r\n",
    b"From: Alice <alice@example.org>\r\nTo  : b@example.net\r\nTo: c@example.net\r\n",
]


def test_obsolete_names_verify_elsewhere_under_every_canonicalization(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """A field written "Name :" is named Name (RFC 5322 4.5) for selection (RFC 6376 5.4.2)
    under simple as under relaxed: Mail::DKIM and go-msgauth select it so, and must verify."""
    from dkproxy.mailauth.dkim_signer import DKIMParams, sign
    from dkproxy.mailauth.keys import load_signing_key
    from dkproxy.mailauth.message import Message

    keyfile = make_rsa_key(str(tmp_path / "obs.key"), 1024)
    dns_server.publish({"obsname._domainkey.example.org": [dns_record(keyfile)]})
    key = load_signing_key(keyfile)
    messages = []
    for head in OBSOLETE_NAME_HEADS:
        data = head + b"\r\nbody\r\n"
        for c in ("simple/simple", "relaxed/simple", "simple/relaxed", "relaxed/relaxed"):
            params = DKIMParams("example.org", "obsname", key, canonicalization=c)
            messages.append(sign(Message(data), params) + data)
    for message, results in zip(messages, verify_mail_dkim_many(messages, dns_server), strict=True):
        assert [r.result for r in _ours(results, "example.org")] == ["pass"], (message, results)
    for message, results in zip(messages, verify_go_msgauth(messages, dns_server), strict=True):
        assert [r.result for r in _ours(results, "example.org")] == ["pass"], (message, results)
