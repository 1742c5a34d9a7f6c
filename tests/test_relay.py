"""The downstream side, seen from outside: what a recording downstream receives from the running
proxy, and what the upstream client is told."""

from __future__ import annotations

import hashlib
import time

import pytest

from tests.support.client import RawClient
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer, SmtpSink
from tests.support.testkeys import make_rsa_key

MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: relay\r\n\r\nHi.\r\n"


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)


def signing_args(keyfile: str, *extra: str) -> list[str]:
    return [f"--keyfile={keyfile}", "--selector=sel", "--domain=example.org", *extra]


def test_dsn_parameters_arrive_byte_identical_with_the_downstreams_replies(keyfile: str) -> None:
    """RFC 3461 parameters keep their case (ENVID and ORCPT are xtext) and each answer is the
    downstream's own text."""
    mail = "MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ314159+2Bx"
    rcpt = "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Example.NET"
    with CaptureServer(mail_reply="250 2.1.0 Sender <a@example.org> fine by me",
                       rcpt_replies={"b@example.net": "250 2.1.5 Bob is here"},
                       data_reply="250 2.0.0 Ok: queued as 4XyZ") as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO client.test")
        assert client.command(mail) == (250, "2.1.0 Sender <a@example.org> fine by me")
        assert client.command(rcpt) == (250, "2.1.5 Bob is here")
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.reply() == (250, "2.0.0 Ok: queued as 4XyZ")
    (tx,) = down.messages
    assert tx.mail_line == mail
    assert [r.line for r in tx.rcpts] == [rcpt]


def test_multiline_downstream_replies_pass_line_by_line(keyfile: str) -> None:
    refused = (
        "550-5.1.1 <gone@example.net>: no such user\r\n550-5.1.1 see the list\r\n550 5.1.1 end"
    )
    final = "250-2.0.0 first line\r\n250 2.0.0 Ok: queued as MULTI"
    with CaptureServer(rcpt_replies={"gone@example.net": refused}, data_reply=final) as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        code, ehlo = client.command("EHLO client.test")
        assert code == 250 and len(ehlo.splitlines()) > 3
        client.command("MAIL FROM:<a@example.org>")
        client.command("RCPT TO:<b@example.net>")
        client.send(b"RCPT TO:<gone@example.net>\r\n")
        lines = [client._line() for _ in range(3)]
        assert lines == [b"550-5.1.1 <gone@example.net>: no such user",
                         b"550-5.1.1 see the list", b"550 5.1.1 end"]  # fmt: skip
        client.command("DATA")
        client.send(MESSAGE + b".\r\n")
        assert [client._line() for _ in range(2)] == [b"250-2.0.0 first line",
                                                      b"250 2.0.0 Ok: queued as MULTI"]  # fmt: skip
    assert down.messages[0].accepted_rcpts == ["b@example.net"]


def test_idle_downstream_sessions_are_quit_within_seconds(keyfile: str) -> None:
    """A downstream session kept for reuse is ended politely after about 2 s idle (as
    Postfix's own connection cache), before the downstream's limits or timeouts bite."""
    args = signing_args(keyfile, "--workers=1")
    with CaptureServer() as down, ProxyProcess("out", args, down.address) as proxy:
        for number in range(2):
            with proxy.smtp() as client:
                client.sendmail("alice@example.org", [f"r{number}@example.net"], MESSAGE)
        assert down.sessions == 1  # reused while fresh
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and down.commands[-1] != "QUIT":
            time.sleep(0.1)
        assert down.commands[-1] == "QUIT"
        with proxy.smtp() as client:
            client.sendmail("alice@example.org", ["r2@example.net"], MESSAGE)
        assert down.sessions == 2
    assert len(down.messages) == 3


def test_a_64_mb_message_relays_intact(keyfile: str) -> None:
    """Spooled to a file, signed through a read-only map and relayed in pieces: the 64 MB
    message arrives byte for byte, below our own size limit of 64 MiB."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789+/\r\n"
    body = line * (64_000_000 // len(line)) + b".leading dot\r\n"
    message = MESSAGE.replace(b"Hi.\r\n", b"") + body
    with SmtpSink() as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            proxy.smtp(timeout=120) as client:  # fmt: skip
        assert client.sendmail("alice@example.org", ["bob@example.net"], message) == {}
        (received,) = down.wait_for(1, timeout=60)
    assert received.data.endswith(message)
    assert received.data.startswith(b"DKIM-Signature:")
    digest = hashlib.sha256(received.data[-len(message) :]).hexdigest()
    assert digest == hashlib.sha256(message).hexdigest()
