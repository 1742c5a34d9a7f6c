"""Generated SMTP against the running daemon: it answers, never crashes, relays exactly.

Whatever a client sends as command lines (known verbs with hostile arguments, unknown
verbs, any octet, overlong lines, pipelined or not), the proxy answers every line with one
well-formed reply, keeps serving other clients, and never logs a traceback. Whatever the
message content (dot lines, 8-bit, NUL, long lines, bare CR and LF, split across packets
anywhere), a message is either relayed with its content intact (line ends, bare CRs and
lines over 998 characters as Postfix stores them) or refused with a 4xx/5xx; a refused one
never arrives.

`./dev fuzz` runs these with many more examples (hypothesis profile "fuzz").
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.client import RawClient
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import make_rsa_key

#: Talking to a daemon costs milliseconds per example: a tenth of the profile's examples.
EXAMPLES = max(20, settings().max_examples // 10)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, CaptureServer]]:
    key = make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)
    with (
        CaptureServer() as down,
        ProxyProcess(
            "out", [f"--keyfile={key}", "--selector=sel", "--domain=example.org"], down.address
        ) as daemon,
    ):
        yield daemon, down
    assert "Traceback" not in daemon.log, daemon.log[-3000:]


_REPLY = re.compile(r"[2-5][0-9][0-9]")

#: Octets a client may put in an argument: any but CR and LF (which end the line).
_ARG_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_VERBS = st.sampled_from([b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"RSET", b"NOOP",
                          b"VRFY", b"EXPN", b"HELP", b"XFORWARD", b"STARTTLS", b"AUTH", b"BDAT",
                          b"ehlo", b"mail from:", b"Rcpt To:", b"X", b"", b"\xff\xfe",
                          b"MAIL", b"RCPT"])  # fmt: skip
_ARGS = st.one_of(
    _ARG_BYTES,
    st.sampled_from([b"<a@example.org>", b"<>", b"<a@example.org> SIZE=100 BODY=8BITMIME",
                     b"<b@example.net> NOTIFY=SUCCESS ORCPT=rfc822;B@Example.NET",
                     b"h\xe9llo.example", b"<\xe9@example.org>", b"ADDR=192.0.2.1 NAME=x",
                     b"<a@example.org> SMTPUTF8", b" ", b"\x00", b"<" + b"a" * 300 + b">"]),
)  # fmt: skip
command_lines = st.builds(
    lambda verb, sep, arg: verb + sep + arg, _VERBS, st.sampled_from([b"", b" ", b"  "]), _ARGS
) | st.just(b"x" * 5000)


def replies(client: RawClient, count: int) -> list[tuple[int, str]]:
    out = []
    for _ in range(count):
        code, text = client.reply()
        out.append((code, text))
        if code == 421:  # the server ends the session (e.g. too many errors)
            break
    return out


@settings(max_examples=EXAMPLES)
@given(st.lists(command_lines, min_size=1, max_size=12), st.booleans())
def test_any_command_lines_get_one_reply_each(
    proxy: tuple[ProxyProcess, CaptureServer], lines: list[bytes], pipelined: bool
) -> None:
    daemon, _down = proxy
    with RawClient(daemon.host, daemon.port, timeout=30) as client:
        assert client.reply()[0] == 220
        answered: list[tuple[int, str]] = []
        if pipelined:
            client.send(b"".join(line + b"\r\n" for line in lines))
            answered = replies(client, len(lines))
        else:
            for line in lines:
                client.send(line + b"\r\n")
                answered += replies(client, 1)
                if answered[-1][0] == 421:
                    break
        for code, _text in answered:
            assert _REPLY.fullmatch(str(code)), answered
        if answered[-1][0] != 421:
            assert len(answered) == len(lines)
            assert client.command("NOOP")[0] == 250  # still in command mode, still alive
        # a 421 here must be a deliberate end (too many errors), never an internal error
        assert all("internal" not in text.lower() for _code, text in answered), answered
    # and every other client is still served
    with RawClient(daemon.host, daemon.port, timeout=30) as other:
        assert other.reply()[0] == 220
        assert other.command("EHLO other.example")[0] == 250


_CONTENT = st.lists(
    st.sampled_from([b"a", b"text ", b".", b"..", b". ", b"\r\n", b"\r\n", b"\r\n.", b"\n",
                     b"\r", b"\xe9\xff", b"\x00", b"\t", b"x" * 1200, b"\r\n\r\n"]),
    max_size=40,
).map(b"".join)  # fmt: skip
_HEAD = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: fuzz\r\n\r\n"


def _stuffed(content: bytes) -> bytes:
    """What a client sends for `content`: a dot at the start of a line gets another (RFC
    5321 4.5.2; a bare LF starts a line too, as Postfix reads it), and a final CRLF."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    pieces = re.split(rb"(\r\n|(?<!\r)\n)", content)
    out = []
    at_line_start = True
    for piece in pieces:
        if at_line_start and piece.startswith(b"."):
            piece = b"." + piece
        out.append(piece)
        if piece:
            at_line_start = piece in (b"\r\n", b"\n")
    return b"".join(out)


def _as_postfix_stores(message: bytes) -> bytes:
    """`message` (ending in CRLF) as Postfix 3.7 stores and sends it on, measured with the real
    Postfix in tests/test_line_ends.py: every LF ends a line, the CRs right before it are
    dropped, every other CR becomes a space (RFC 5321 2.3.8), and a line over 998 characters
    gets CRLF SPACE after its 998th character and after every further 997 (RFC 5322 2.1.1)."""
    out = []
    for line in message.split(b"\n")[:-1]:
        line = line.rstrip(b"\r").replace(b"\r", b" ")
        pieces, rest = [line[:998]], line[998:]
        while rest:
            pieces.append(b" " + rest[:997])
            rest = rest[997:]
        out.append(b"\r\n".join(pieces) + b"\r\n")
    return b"".join(out)


@settings(max_examples=EXAMPLES)
@given(_CONTENT, st.lists(st.integers(1, 2000), max_size=6))
def test_message_content_is_relayed_exactly_or_refused(
    proxy: tuple[ProxyProcess, CaptureServer], content: bytes, cuts: list[int]
) -> None:
    daemon, down = proxy
    message = _HEAD + content
    wire = _stuffed(message) + b".\r\n"
    before = len(down.messages)
    with RawClient(daemon.host, daemon.port, timeout=30) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.reply()
        for line in ("EHLO fuzz.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"):
            assert client.command(line)[0] == 250
        assert client.command("DATA")[0] == 354
        position = 0
        for cut in sorted(cuts):  # the same bytes in odd packets
            if position < cut < len(wire):
                client.send(wire[position:cut])
                time.sleep(0.001)
                position = cut
        client.send(wire[position:])
        code, text = client.reply()
        assert client.command("QUIT")[0] == 221
    delivered = down.messages[before:]
    if code != 250:
        assert 400 <= code < 600 and delivered == [], (code, text)
        return
    (tx,) = delivered
    assert tx.data is not None
    expected = _as_postfix_stores(message if message.endswith(b"\r\n") else message + b"\r\n")
    assert tx.data.endswith(expected)
    added = tx.data[: -len(expected)]
    assert added.startswith(b"DKIM-Signature:") or added == b"", added[:200]
