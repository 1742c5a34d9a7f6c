"""SMTP semantics of the running proxy: what the upstream is told, what the downstream gets.

Each test starts the real `dkproxy out` daemon between a client speaking SMTP and a recording
downstream server, then checks replies and what arrived byte for byte.
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
from collections.abc import Iterator

import pytest

from dkproxy.smtp.lines import break_long_lines
from tests.support.client import RawClient
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer, SmtpSink
from tests.support.testkeys import make_rsa_key
from tests.support.tools import free_port

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: session test\r\n"
    b"Message-ID: <session-1@example.org>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)


def signing_args(keyfile: str, *extra: str) -> list[str]:
    return [f"--keyfile={keyfile}", "--selector=sel", "--domain=example.org", *extra]


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def start_proxy(keyfile: str, relay: str, *extra: str) -> ProxyProcess:
    return ProxyProcess("out", signing_args(keyfile, *extra), relay).start()


def test_per_recipient_answers_and_final_answer_come_from_downstream(keyfile: str) -> None:
    rejected = "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown"
    with CaptureServer(rcpt_replies={"nobody@example.net": rejected},
                       data_reply="250 2.0.0 Ok: queued as ABC123") as down:  # fmt: skip
        proxy = start_proxy(keyfile, down.address)
        try:
            with RawClient(proxy.host, proxy.port) as client:
                assert client.reply()[0] == 220
                assert client.command("EHLO client.test")[0] == 250
                assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
                assert client.command("RCPT TO:<bob@example.net>") == (250, "2.1.5 Ok")
                code, text = client.command("RCPT TO:<nobody@example.net>")
                assert (code, text) == (550, rejected[4:])
                assert client.command("DATA")[0] == 354
                client.send(MESSAGE + b".\r\n")
                assert client.reply() == (250, "2.0.0 Ok: queued as ABC123")
                assert client.command("QUIT")[0] == 221
        finally:
            proxy.stop()
        (tx,) = down.messages
        assert tx.accepted_rcpts == ["bob@example.net"]
        assert tx.data is not None and tx.data.endswith(MESSAGE)
        assert tx.data.startswith(b"DKIM-Signature:")
        assert "queued as ABC123" in proxy.log and "d=example.org" in proxy.log


def test_esmtp_parameters_and_xforward_pass_through_verbatim(
    keyfile: str, capture: CaptureServer
) -> None:
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        code, ehlo = client.command("EHLO client.test")
        assert code == 250
        offered = {line.split()[0] for line in ehlo.splitlines()[1:]}
        assert {"PIPELINING", "SIZE", "8BITMIME", "DSN", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                "XFORWARD"} <= offered  # fmt: skip
        xforward = "XFORWARD NAME=mail.client.test ADDR=192.0.2.7 PROTO=ESMTP HELO=Client.Test"
        assert client.command(xforward)[0] == 250
        mail = "MAIL FROM:<alice@example.org> SIZE=342 BODY=8BITMIME RET=HDRS ENVID=QQ314159"
        rcpt = "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Example.NET"
        assert client.command(mail)[0] == 250
        assert client.command(rcpt)[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.reply()[0] == 250
    (tx,) = capture.messages
    assert tx.mail_line == mail
    assert tx.rcpts[0].line == rcpt
    assert tx.xforward == [xforward]


def test_unsupported_extensions_are_not_offered(keyfile: str) -> None:
    caps = ["PIPELINING", "SIZE 1000000", "STARTTLS", "AUTH PLAIN LOGIN", "CHUNKING", "8BITMIME"]
    with CaptureServer(ehlo_capabilities=caps) as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        code, ehlo = client.command("EHLO client.test")
        offered = {line.split()[0] for line in ehlo.splitlines()[1:]}
        assert code == 250
        assert offered == {"PIPELINING", "SIZE", "8BITMIME"}
        assert "SIZE 1000000" in ehlo.splitlines()
        assert client.command("XFORWARD ADDR=192.0.2.1")[0] == 502
        assert client.command("STARTTLS")[0] == 502


def test_downstream_rejecting_data_is_relayed(keyfile: str) -> None:
    with CaptureServer(data_reply="554 5.7.1 Message rejected as spam") as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            proxy.smtp() as client:  # fmt: skip
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        assert err.value.smtp_code == 554
        assert err.value.smtp_error == b"5.7.1 Message rejected as spam"
        # The session goes on: the next message is accepted.
        down.data_reply = "250 2.0.0 Ok"
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}


def test_downstream_temporary_failure_on_data_command_is_relayed(keyfile: str) -> None:
    with SmtpSink(soft_reject=["DATA"]) as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            proxy.smtp() as client:  # fmt: skip
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        assert err.value.smtp_code == 450
        assert down.messages() == []


def test_downstream_down_gives_421_and_proxy_keeps_serving(keyfile: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with ProxyProcess("out", signing_args(keyfile), dead) as proxy:
        for _ in range(3):
            with RawClient(proxy.host, proxy.port) as client:
                code, text = client.reply()
                assert code == 421 and "downstream unavailable" in text
                assert client.closed_by_peer()
        assert proxy.proc is not None and proxy.proc.poll() is None


def test_downstream_closing_mid_transaction_gives_4xx(keyfile: str) -> None:
    with CaptureServer(disconnect_on=["."]) as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        client.command("MAIL FROM:<alice@example.org>")
        client.command("RCPT TO:<bob@example.net>")
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        code, _ = client.reply()
        assert 400 <= code < 500
        assert "downstream failed" in proxy.log


def test_downstream_timeout_gives_4xx(keyfile: str) -> None:
    args = signing_args(keyfile, "--relay_timeout=1")
    with CaptureServer(delays={".": 5}) as down, \
            ProxyProcess("out", args, down.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        client.command("MAIL FROM:<alice@example.org>")
        client.command("RCPT TO:<bob@example.net>")
        client.command("DATA")
        client.send(MESSAGE + b".\r\n")
        started = time.monotonic()
        code, _ = client.reply()
        assert 400 <= code < 500
        assert time.monotonic() - started < 4


@pytest.mark.parametrize("verb", ["MAIL", "RCPT"])
def test_downstream_silent_on_a_command_gives_4xx_logged_as_a_timeout(
    keyfile: str, verb: str
) -> None:
    """A downstream that never answers an envelope command: 4xx within relay_timeout, the
    failure named a timeout (not a lost connection), and the proxy serves the next client."""
    args = signing_args(keyfile, "--relay_timeout=1")
    with CaptureServer(delays={verb: 30}) as down, ProxyProcess("out", args, down.address) as proxy:
        with RawClient(proxy.host, proxy.port) as client:
            client.reply()
            client.command("EHLO c.test")
            started = time.monotonic()
            code, _ = client.command("MAIL FROM:<alice@example.org>")
            if verb == "RCPT":
                assert code == 250
                code, _ = client.command("RCPT TO:<bob@example.net>")
            assert 400 <= code < 500
            assert time.monotonic() - started < 10
        assert f"did not answer to {verb}" in proxy.log, proxy.log
        with RawClient(proxy.host, proxy.port) as client:
            assert client.reply()[0] == 220


def test_pipelined_commands_get_replies_in_order(keyfile: str, capture: CaptureServer) -> None:
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        client.send(
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<a@example.net>\r\n"
            b"RCPT TO:<b@example.net>\r\nDATA\r\n"
        )
        assert [code for code, _ in client.replies(4)] == [250, 250, 250, 354]
        client.send(MESSAGE + b".\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<c@example.net>\r\n"
                    b"DATA\r\n")  # fmt: skip
        assert [code for code, _ in client.replies(4)] == [250, 250, 250, 354]
        client.send(MESSAGE + b".\r\nQUIT\r\n")
        assert [code for code, _ in client.replies(2)] == [250, 221]
    assert [tx.accepted_rcpts for tx in capture.messages] == [
        ["a@example.net", "b@example.net"],
        ["c@example.net"],
    ]


def test_rset_noop_and_several_messages_per_session(keyfile: str, capture: CaptureServer) -> None:
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        assert client.command("NOOP")[0] == 250
        client.command("MAIL FROM:<alice@example.org>")
        client.command("RCPT TO:<dropped@example.net>")
        assert client.command("RSET")[0] == 250
        assert client.command("RCPT TO:<x@example.net>")[0] == 503
        for number in range(3):
            assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
            assert client.command(f"RCPT TO:<r{number}@example.net>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(MESSAGE + b".\r\n")
            assert client.reply()[0] == 250
    assert [tx.accepted_rcpts for tx in capture.messages] == [
        ["r0@example.net"],
        ["r1@example.net"],
        ["r2@example.net"],
    ]


def test_bad_commands_get_errors_and_the_server_keeps_serving(
    keyfile: str, capture: CaptureServer
) -> None:
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy:
        with RawClient(proxy.host, proxy.port) as client:
            client.reply()
            assert client.command("EHLO")[0] == 501
            assert client.command("EHLO c.test")[0] == 250
            assert client.command("FOO bar")[0] == 500
            assert client.command(b"\x00\xff\xfe")[0] == 500
            assert client.command("DATA")[0] == 503
            assert client.command("MAIL alice")[0] == 501
            assert client.command("RCPT TO:<a@example.net>")[0] == 503
            assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
            assert client.command("MAIL FROM:<alice@example.org>")[0] == 503
            assert client.command("DATA")[0] == 554  # no recipients yet
            assert client.command(b"NOOP " + b"x" * 10000)[0] == 500
            assert client.command("RCPT TO:<a@example.net>")[0] == 250
        with RawClient(proxy.host, proxy.port) as client:
            client.reply()
            client.send(b"BOGUS\r\n" * 20)
            codes = [code for code, _ in client.replies(20)]
            assert codes[-1] == 421 and set(codes[:-1]) == {500}
            assert client.closed_by_peer()
        # A client that disconnects in the middle of DATA loses nothing and harms nothing.
        with RawClient(proxy.host, proxy.port) as client:
            client.reply()
            client.command("EHLO c.test")
            client.command("MAIL FROM:<alice@example.org>")
            client.command("RCPT TO:<a@example.net>")
            client.command("DATA")
            client.send(b"From: a@example.org\r\n\r\nhalf a mess")
        with proxy.smtp() as client:
            assert client.sendmail("alice@example.org", ["b@example.net"], MESSAGE) == {}
    assert len(capture.messages) == 1


def test_message_over_size_limit_is_refused_and_session_continues(
    keyfile: str, capture: CaptureServer
) -> None:
    with ProxyProcess("out", signing_args(keyfile, "--max_message_size=2000"),
                      capture.address) as proxy, proxy.smtp() as client:  # fmt: skip
        client.ehlo()
        assert client.esmtp_features["size"] == "2000"
        big = MESSAGE + b"x" * 3000 + b"\r\n"
        # smtplib declares SIZE= on MAIL, so the refusal comes at once (RFC 1870 6.1); a
        # client that declares nothing gets 552 after its data (tests/test_limits.py).
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            client.sendmail("alice@example.org", ["bob@example.net"], big)
        assert err.value.smtp_code == 552
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    assert len(capture.messages) == 1


def test_unsigned_passthrough_and_reject_error(keyfile: str, capture: CaptureServer) -> None:
    foreign = MESSAGE.replace(b"alice@example.org", b"carol@elsewhere.test")
    no_from = b"To: bob@example.net\r\nSubject: no from\r\n\r\nbody\r\n"
    malformed = b"From: a@example.org\r\nthis line is not a header\r\n\r\nbody\r\n"
    with ProxyProcess("out", signing_args(keyfile, "--domain=example.org,example.com"),
                      capture.address) as proxy, proxy.smtp() as client:  # fmt: skip
        for message in (foreign, no_from, malformed):
            assert client.sendmail("carol@elsewhere.test", ["bob@example.net"], message) == {}
    assert [tx.data for tx in capture.messages] == [foreign, no_from, malformed]
    assert "unsigned" in proxy.log
    with ProxyProcess("out", signing_args(keyfile, "--reject-error"), capture.address) as proxy, \
            proxy.smtp() as client:  # fmt: skip
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("alice@example.org", ["bob@example.net"], malformed)
        assert err.value.smtp_code == 451
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    assert len(capture.messages) == 4


def test_refuses_to_start_on_port_in_use(keyfile: str, capture: CaptureServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proxy = ProxyProcess("out", signing_args(keyfile), capture.address, port=port)
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            proxy.start()


def _reference_stuff(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def test_dot_stuffing_survives_any_packet_and_chunk_boundary(
    keyfile: str, capture: CaptureServer
) -> None:
    """Lines starting with dots, a 300 KB line and CRLFs split across TCP writes arrive
    byte-identical but for the long lines, broken after 998 characters as Postfix sends them on
    (the proxy reads and writes in chunks; boundaries must not matter)."""
    import random

    rng = random.Random(5)
    lines = [b".", b"..", b".x", b"", b"x" * 70_000, b". trailing ", b"y" * 300_000 + b".",
             b"\tz", b"..."]  # fmt: skip
    body = b"\r\n".join(rng.choice(lines) for _ in range(60)) + b"\r\n"
    message = b"From: a@example.org\r\nSubject: dots\r\n\r\n" + body
    wire = _reference_stuff(message[:-2]) + b"\r\n.\r\n"
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        for number, step in enumerate((1, 7, 4097, 65535, 65537, 262145)):
            client.command("MAIL FROM:<a@example.org>")
            client.command(f"RCPT TO:<r{number}@example.net>")
            assert client.command("DATA")[0] == 354
            # step 1: byte by byte through the head, then the rest at once
            head = 300 if step == 1 else len(wire)
            for position in range(0, head, step):
                client.send(wire[position : position + step])
            client.send(wire[head:])
            assert client.reply()[0] == 250
    assert len(capture.messages) == 6
    stored = break_long_lines(message, 0)[0]
    assert stored.replace(b"\r\n ", b"") == message
    for tx in capture.messages:
        assert tx.data is not None and tx.data.endswith(stored)
        added = tx.data[: -len(stored)]
        assert added.startswith(b"DKIM-Signature:") and b"\r\n\r\n" not in added


def test_empty_and_headers_only_messages(keyfile: str, capture: CaptureServer) -> None:
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        for data in (b"", b"From: a@example.org\r\n", b"From: a@example.org\r\n\r\n"):
            client.command("MAIL FROM:<a@example.org>")
            client.command("RCPT TO:<b@example.net>")
            client.command("DATA")
            client.send(data + b".\r\n")
            assert client.reply()[0] == 250
    empty, headers_only, empty_body = (tx.data for tx in capture.messages)
    assert empty == b""
    assert headers_only is not None and headers_only.endswith(b"\r\nFrom: a@example.org\r\n")
    assert headers_only.startswith(b"DKIM-Signature:")
    assert empty_body is not None and empty_body.endswith(b"\r\nFrom: a@example.org\r\n\r\n")


def test_downstream_sessions_are_reused_between_upstream_sessions(
    keyfile: str, capture: CaptureServer
) -> None:
    with ProxyProcess("out", signing_args(keyfile, "--workers=1"), capture.address) as proxy:
        for number in range(5):
            with proxy.smtp() as client:
                client.ehlo(f"client{number}.test")
                client.sendmail("alice@example.org", [f"r{number}@example.net"], MESSAGE)
    assert [tx.accepted_rcpts for tx in capture.messages] == [
        [f"r{n}@example.net"] for n in range(5)
    ]
    assert capture.sessions == 1
    # Each upstream session's EHLO is still passed on (it also proves the session alive).
    assert [tx.ehlo for tx in capture.messages] == [f"EHLO client{n}.test" for n in range(5)]


def test_pooled_session_closed_by_downstream_is_replaced(keyfile: str) -> None:
    args = signing_args(keyfile, "--workers=1")
    with SmtpSink(extra_args=["-t", "1"]) as down, \
            ProxyProcess("out", args, down.address) as proxy:  # fmt: skip
        for number in range(3):
            with proxy.smtp() as client:
                client.sendmail("alice@example.org", [f"r{number}@example.net"], MESSAGE)
            time.sleep(1.5)  # smtp-sink drops the idle pooled session meanwhile
        assert len(down.wait_for(3)) == 3


def test_pipelined_rcpts_each_get_the_downstream_answer(keyfile: str) -> None:
    rejected = "550 5.1.1 <no@example.net>: User unknown"
    with CaptureServer(rcpt_replies={"no@example.net": rejected}) as down, \
            ProxyProcess("out", signing_args(keyfile), down.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<a@example.net>\r\n"
                    b"RCPT TO:<no@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")  # fmt: skip
        replies = client.replies(5)
        assert [code for code, _ in replies] == [250, 250, 550, 250, 354]
        assert replies[2][1] == rejected[4:]
        client.send(MESSAGE + b".\r\n")
        assert client.reply()[0] == 250
    (tx,) = down.messages
    assert tx.accepted_rcpts == ["a@example.net", "b@example.net"]


def test_smtp_smuggling_attempt_stays_inside_one_message(
    keyfile: str, capture: CaptureServer
) -> None:
    """A "<LF>.<CR><LF>" is not the end of DATA: what follows it is content, not commands."""
    smuggled = (b"From: a@example.org\r\nSubject: outer\r\n\r\nhello\n.\r\n"
                b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                b"From: ceo@example.org\r\nSubject: inner\r\n\r\nsmuggled\r\n")  # fmt: skip
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        client.command("MAIL FROM:<a@example.org>")
        client.command("RCPT TO:<b@example.net>")
        assert client.command("DATA")[0] == 354
        client.send(smuggled + b".\r\n")
        assert client.reply()[0] == 250
        assert client.command("QUIT")[0] == 221
    (tx,) = capture.messages
    assert tx.accepted_rcpts == ["b@example.net"]
    assert tx.data is not None
    assert b"hello\r\n\r\nMAIL FROM:<evil@example.org>\r\n" in tx.data
    assert tx.data.endswith(b"smuggled\r\n")
    assert not any("victim" in line for line in capture.commands)


def test_large_messages_are_spooled_and_leave_no_files_behind(
    keyfile: str, capture: CaptureServer
) -> None:
    """Messages past the memory threshold go through a temporary file; neither a delivered
    message nor one abandoned mid-DATA leaves a descriptor or a file behind."""
    big = MESSAGE + (b"0123456789abcdef.\r\n.line\r\n" * 60_000)  # ~1.6 MB, dot lines
    args = signing_args(keyfile, "--workers=1")
    with ProxyProcess("out", args, capture.address) as proxy:
        assert proxy.proc is not None
        fd_dir = f"/proc/{proxy.proc.pid}/fd"
        with proxy.smtp() as client:
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        baseline = len(os.listdir(fd_dir))
        for _ in range(3):
            with proxy.smtp() as client:
                client.sendmail("alice@example.org", ["bob@example.net"], big)
        with RawClient(proxy.host, proxy.port) as client:
            client.reply()
            client.command("EHLO c.test")
            client.command("MAIL FROM:<alice@example.org>")
            client.command("RCPT TO:<bob@example.net>")
            client.command("DATA")
            client.send(big[: len(big) // 2])
        time.sleep(0.5)
        leaked = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
        assert len(leaked) <= baseline, leaked
        assert not [name for name in leaked if name.endswith(".msg (deleted)")]
    assert len(capture.messages) == 4
    for tx in capture.messages[1:]:
        assert tx.data is not None and tx.data.endswith(big)


def test_random_garbage_never_stops_the_server(keyfile: str, capture: CaptureServer) -> None:
    """Junk of every kind, pipelined or not, gets answers or a closed connection; the next
    client is served normally."""
    import random

    rng = random.Random(11)
    verbs = [b"MAIL FROM:", b"RCPT TO:", b"DATA", b"EHLO", b"XFORWARD", b"BDAT 10", b"\x00",
             b"\xff\xfe", b"HELO", b"RSET", b"MAIL FROM:<a@example.org> SIZE=x", b"."]  # fmt: skip
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy:
        for _ in range(30):
            with RawClient(proxy.host, proxy.port, timeout=5) as client:
                client.reply()
                junk = b"".join(
                    rng.choice(verbs) + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
                    + rng.choice([b"\r\n", b"\n", b"\r", b""])
                    for _ in range(rng.randrange(1, 25))
                )  # fmt: skip
                client.send(junk + b"\r\nQUIT\r\n")
                try:
                    while client.reply()[0] != 221:
                        pass
                except (ConnectionError, TimeoutError):
                    pass  # closed after too many errors, or still inside DATA: both fine
        with proxy.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
        assert proxy.proc is not None and proxy.proc.poll() is None
        assert "Traceback" not in proxy.log
    assert capture.messages[-1].data is not None
    assert capture.messages[-1].data.endswith(MESSAGE)


#: Arguments with octets that are not UTF-8, or UTF-8 without SMTPUTF8 being asked for.
CARRIED = [
    b"EHLO h\xe9llo.example",
    b"HELO h\xe9llo.example",
    b"EHLO \xff\xfe.example",
    b"MAIL FROM:<a@example.org> ENVID=caf\xe9+2B",
    b"MAIL FROM:<j\xc3\xb6rg@example.org> SMTPUTF8",
    b"RCPT TO:<b@example.net> ORCPT=rfc822;b\xe9@example.net",
    b"XFORWARD NAME=h\xe9llo.example HELO=\xc3\xa9t\xc3\xa9",
]
#: Control octets, which no SMTP argument may hold (they would inject commands downstream).
REFUSED = [
    b"EHLO bad\x01name",
    b"HELO bad\x7fname",
    b"MAIL FROM:<a@example.org> ENVID=x\x00y",
    b"RCPT TO:<b@example.net>\tNOTIFY=NEVER",
    b"XFORWARD NAME=a\x1bb",
]


@pytest.mark.parametrize(
    ("command", "carried"), [(c, True) for c in CARRIED] + [(c, False) for c in REFUSED]
)
def test_any_octet_in_an_argument_is_carried_as_sent_or_refused_with_501(
    keyfile: str, capture: CaptureServer, command: bytes, carried: bool
) -> None:
    """issue 13: an argument octet the client sends reaches the downstream exactly, or the
    command gets 501; never a traceback or a 421, and the session goes on."""
    verb = command.split(b" ", 1)[0]
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        if verb != b"EHLO" and verb != b"HELO":
            assert client.command("EHLO client.test")[0] == 250
        if verb == b"RCPT":
            assert client.command("MAIL FROM:<a@example.org>")[0] == 250
        code, _ = client.command(command)
        if carried:
            assert code == 250
            received = [line.encode("utf-8", "surrogateescape") for line in capture.commands]
            assert command in received
        else:
            assert code == 501
        # The session is intact: a message still goes through it.
        client.command("RSET")
        if verb == b"HELO":
            client.command("EHLO client.test")
        assert client.command("MAIL FROM:<a@example.org>")[0] == 250
        assert client.command("RCPT TO:<b@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.reply()[0] == 250
        assert client.command("QUIT")[0] == 221
        assert "Traceback" not in proxy.log
    assert capture.messages[-1].data is not None
    assert capture.messages[-1].data.endswith(MESSAGE)


@pytest.mark.parametrize("command", [b"NOOP", b"VRFY someone", b"HELP", b"NOOP " + b"x" * 200])
def test_a_client_pipelining_thousands_of_commands_does_not_starve_others(
    keyfile: str, capture: CaptureServer, command: bytes
) -> None:
    """issue 13: one worker, one client pipelining 150,000 commands without reading a reply;
    another client's commands on the same worker are still answered at once (the old engine
    kept them waiting for 0.5-1.3 s in all), long before the flood has been served."""
    import threading

    flood = (command + b"\r\n") * 150_000 + b"QUIT\r\n"
    finished: list[float] = []
    with ProxyProcess("out", signing_args(keyfile, "--workers=1"), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port, timeout=120) as flooder, \
            RawClient(proxy.host, proxy.port) as probe:  # fmt: skip
        flooder.reply()
        probe.reply()
        probe.command("EHLO probe.test")

        def drain_flooder() -> None:
            while True:
                try:
                    code, _ = flooder.reply()
                except (ConnectionError, TimeoutError):
                    break
                if code == 221:
                    break
            finished.append(time.monotonic())

        sender = threading.Thread(target=flooder.send, args=(flood,))
        sender.start()
        time.sleep(0.05)
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            assert probe.command("NOOP")[0] == 250
            latencies.append(time.monotonic() - started)
        probes_done = time.monotonic()
        reader = threading.Thread(target=drain_flooder)
        reader.start()
        sender.join(60)
        reader.join(60)
        assert finished, "the flooding client was not served to its QUIT"
        assert "Traceback" not in proxy.log
    assert sum(latencies) < 0.3, latencies
    assert probes_done < finished[0]


def test_commands_are_logged_only_with_debugtrace(keyfile: str, capture: CaptureServer) -> None:
    """aiosmtpd logs every command line at INFO ("mail.log"): in production that logger stays
    at WARNING (addresses in logs, cost per command); debugtrace shows commands and replies."""
    for extra, shown in (((), False), (("--debugtrace",), True)):
        with ProxyProcess("out", signing_args(keyfile, *extra), capture.address) as proxy:
            with proxy.smtp() as client:
                client.sendmail("alice@example.org", ["traced@example.net"], MESSAGE)
            time.sleep(0.2)
            log = proxy.log
        assert ("TO:<traced@example.net>" in log) is shown, log
        assert ("2.0.0 Bye" in log) is shown
        assert "from=<alice@example.org>" in log  # the message's own log line, always


def test_nothing_pipelined_after_quit_is_served(keyfile: str, capture: CaptureServer) -> None:
    with ProxyProcess("out", signing_args(keyfile), capture.address) as proxy, \
            RawClient(proxy.host, proxy.port) as client:  # fmt: skip
        client.reply()
        client.command("EHLO c.test")
        client.send(b"QUIT\r\nMAIL FROM:<after-quit@example.org>\r\nNOOP\r\n")
        assert client.reply()[0] == 221
        assert client.closed_by_peer()
    time.sleep(0.3)
    assert not [line for line in capture.commands if "after-quit" in line]


def test_a_pooled_downstream_session_greeted_with_the_same_name_is_reset_not_greeted_again(
    keyfile: str, capture: CaptureServer
) -> None:
    """Postfix's content filter transport opens a session per message, always with the same
    EHLO name: the pooled downstream session gets RSET (as Postfix's own connection cache
    does), a new name gets EHLO, and each transaction carries only its own XFORWARD."""
    sessions = [("mta.test", "192.0.2.1"), ("mta.test", "192.0.2.2"), ("other.test", "192.0.2.3")]
    offered: list[str] = []
    with ProxyProcess("out", signing_args(keyfile, "--workers=1"), capture.address) as proxy:
        for name, address in sessions:
            with RawClient(proxy.host, proxy.port) as client:
                client.reply()
                code, ehlo = client.command(f"EHLO {name}")
                assert code == 250
                offered.append("\n".join(ehlo.splitlines()[1:]))
                xforward = f"XFORWARD NAME=client.test ADDR={address}"
                assert client.command(xforward)[0] == 250
                assert client.command(f"MAIL FROM:<a@example.org> ENVID={address}")[0] == 250
                assert client.command("RCPT TO:<bob@example.net>")[0] == 250
                assert client.command("DATA")[0] == 354
                client.send(MESSAGE + b".\r\n")
                assert client.reply()[0] == 250
                assert client.command("QUIT")[0] == 221
            time.sleep(0.3)  # the session is back in the pool before the next client comes
        messages = capture.wait_for(3)
    assert offered[0] == offered[1] == offered[2]  # the reply in force is the first EHLO's
    assert {tx.session for tx in messages} == {1}, "one downstream connection for all three"
    greetings = [line for line in capture.commands if line.split()[0] in ("EHLO", "HELO", "RSET")]
    assert greetings == ["EHLO mta.test", "RSET", "EHLO other.test"]
    for tx, (name, address) in zip(messages, sessions, strict=True):
        assert tx.ehlo == f"EHLO {name}"
        assert tx.xforward == [f"XFORWARD NAME=client.test ADDR={address}"]
        assert tx.mail_line == f"MAIL FROM:<a@example.org> ENVID={address}"
        assert tx.data is not None and tx.data.endswith(MESSAGE)


def test_a_pooled_downstream_session_that_fails_its_rset_is_replaced(keyfile: str) -> None:
    """A pooled session whose RSET finds the connection gone (here the downstream hangs up on
    it): nothing was committed on it, so a fresh session is opened and greeted with EHLO, and
    the message goes through."""
    args = signing_args(keyfile, "--workers=1")
    with CaptureServer(disconnect_on=["RSET"]) as down, \
            ProxyProcess("out", args, down.address) as proxy:  # fmt: skip
        for _ in range(2):
            with RawClient(proxy.host, proxy.port) as client:
                client.reply()
                assert client.command("EHLO mta.test")[0] == 250
                assert client.command("MAIL FROM:<a@example.org>")[0] == 250
                assert client.command("RCPT TO:<bob@example.net>")[0] == 250
                assert client.command("DATA")[0] == 354
                client.send(MESSAGE + b".\r\n")
                assert client.reply()[0] == 250
                assert client.command("QUIT")[0] == 221
            time.sleep(0.3)
        messages = down.wait_for(2)
    assert [tx.session for tx in messages] == [1, 2]
    assert [tx.ehlo for tx in messages] == ["EHLO mta.test", "EHLO mta.test"]
    assert "RSET" in down.commands
