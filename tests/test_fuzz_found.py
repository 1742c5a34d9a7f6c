"""The two kinds of fault a fuzzer found in the old SMTP engine, several members of each.

1. Octets in command arguments. `EHLO h\\xe9llo.example` ended the session with a traceback
   and 421 while `HELO h\\xe9llo.example` passed. The kind: any octet a client may send in a
   command argument is carried to the downstream exactly as sent, or refused with 501
   (control octets, which could inject a command), never an internal error.
2. Fairness. A client pipelining thousands of NOOPs without reading the replies delayed
   every other session of its worker by hundreds of milliseconds, because buffered
   commands were served without yielding. The kind: however much one client has queued,
   the other sessions of the worker keep being served promptly.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.client import RawClient
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import make_rsa_key

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: octets\r\n\r\nhi\r\n"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, CaptureServer]]:
    key = make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)
    args = [f"--keyfile={key}", "--selector=sel", "--domain=example.org", "--workers=1"]
    with CaptureServer() as down, ProxyProcess("out", args, down.address) as daemon:
        yield daemon, down
    assert "Traceback" not in daemon.log and "internal error" not in daemon.log, daemon.log[-3000:]


def _wire(line: str) -> bytes:
    """A command line as the capture server recorded it, back to the octets received."""
    return line.encode("utf-8", "surrogateescape")


#: (setup lines, the line under test): one member per command and kind of octet.
OCTET_CASES = {
    "EHLO latin-1": ([], b"EHLO h\xe9llo.example"),
    "HELO latin-1": ([], b"HELO h\xe9llo.example"),
    "EHLO invalid UTF-8 lead": ([], b"EHLO \xc3\x28.example"),
    "EHLO encoded surrogate": ([], b"EHLO \xed\xa0\x80.example"),
    "EHLO valid UTF-8": ([], "EHLO bücher.example".encode()),
    "EHLO 0xff": ([], b"EHLO \xff\xfe"),
    "MAIL local part": ([b"EHLO c.example"], b"MAIL FROM:<j\xf6rg@example.org>"),
    "MAIL parameter": ([b"EHLO c.example"], b"MAIL FROM:<a@example.org> ENVID=\xe9\xff"),
    "RCPT address": (
        [b"EHLO c.example", b"MAIL FROM:<a@example.org>"],
        b"RCPT TO:<b\xe9@example.net>",
    ),
    "RCPT ORCPT": (
        [b"EHLO c.example", b"MAIL FROM:<a@example.org>"],
        b"RCPT TO:<b@example.net> ORCPT=rfc822;b\xc3\xa9@example.net",
    ),
    "XFORWARD": ([b"EHLO c.example"], b"XFORWARD NAME=h\xe9llo.example HELO=\xff"),
}


@pytest.mark.parametrize("case", list(OCTET_CASES), ids=list(OCTET_CASES))
def test_octets_in_arguments_are_carried_as_sent(
    proxy: tuple[ProxyProcess, CaptureServer], case: str
) -> None:
    daemon, down = proxy
    setup, line = OCTET_CASES[case]
    seen = len(down.commands)
    with RawClient(daemon.host, daemon.port) as client:
        assert client.reply()[0] == 220
        for command in setup:
            assert client.command(command)[0] == 250
        code, text = client.command(line)
        assert code == 250, (code, text)  # the capture server accepts what it receives
        # the downstream got exactly the octets the client sent
        assert line in [_wire(c) for c in down.commands[seen:]]
        assert client.command("NOOP")[0] == 250  # and the session goes on


@pytest.mark.parametrize(
    "line",
    [b"EHLO a\x00b", b"HELO a\x7fb", b"MAIL FROM:<a@example.org>\x0bSIZE=1",
     b"RCPT TO:<b@example.net>\x08", b"XFORWARD NAME=\x1b[31m"],
    ids=["EHLO NUL", "HELO DEL", "MAIL VT", "RCPT BS", "XFORWARD ESC"],
)  # fmt: skip
def test_control_octets_in_arguments_are_refused_with_501(
    proxy: tuple[ProxyProcess, CaptureServer], line: bytes
) -> None:
    daemon, down = proxy
    with RawClient(daemon.host, daemon.port) as client:
        client.reply()
        if not line.startswith((b"EHLO", b"HELO")):
            assert client.command("EHLO c.example")[0] == 250
        if line.startswith(b"RCPT"):
            assert client.command("MAIL FROM:<a@example.org>")[0] == 250
        assert client.command(line)[0] == 501
        assert client.command("NOOP")[0] == 250
    assert line not in [_wire(c) for c in down.commands]


def test_a_message_with_8bit_envelope_arrives_byte_identical(
    proxy: tuple[ProxyProcess, CaptureServer],
) -> None:
    daemon, down = proxy
    with RawClient(daemon.host, daemon.port) as client:
        client.reply()
        assert client.command(b"EHLO h\xe9llo.example")[0] == 250
        assert client.command(b"MAIL FROM:<j\xf6rg@example.org> BODY=8BITMIME")[0] == 250
        assert client.command(b"RCPT TO:<b\xe9@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.reply()[0] == 250
    tx = down.messages[-1]
    assert _wire(tx.ehlo or "") == b"EHLO h\xe9llo.example"
    assert _wire(tx.mail_line) == b"MAIL FROM:<j\xf6rg@example.org> BODY=8BITMIME"
    assert _wire(tx.rcpts[0].line) == b"RCPT TO:<b\xe9@example.net>"
    assert tx.data is not None and tx.data.endswith(MESSAGE)


# -- fairness ------------------------------------------------------------------------------------


def _round_trips(daemon: ProxyProcess, seconds: float) -> list[float]:
    """NOOP round-trip times (s) of a well-behaved client of the same worker."""
    times = []
    with RawClient(daemon.host, daemon.port) as client:
        client.reply()
        client.command("EHLO victim.example")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            assert client.command("NOOP")[0] == 250
            times.append(time.perf_counter() - started)
            time.sleep(0.005)
    return times


def _flood(daemon: ProxyProcess, command: bytes, stop: threading.Event) -> None:
    """Pipeline `command` as fast as the socket takes it, never reading a reply."""
    with RawClient(daemon.host, daemon.port) as client:
        client.reply()
        client.send(b"EHLO flood.example\r\n")
        block = command * 4096
        client.sock.settimeout(0.5)
        while not stop.is_set():
            try:
                client.send(block)
            except TimeoutError:
                continue  # the server stopped reading us: it is waiting for us to read
            except OSError:
                return


@pytest.mark.parametrize(
    "command",
    [b"NOOP\r\n", b"HELP\r\n", b"VRFY x\r\n", b"NOOP x\r\nHELP\r\n"],
    ids=["NOOP", "HELP", "VRFY", "mixed"],
)
def test_a_pipelining_flood_does_not_starve_other_sessions(
    proxy: tuple[ProxyProcess, CaptureServer], command: bytes
) -> None:
    daemon, _down = proxy
    quiet = _round_trips(daemon, 1.0)
    stop = threading.Event()
    floods = [threading.Thread(target=_flood, args=(daemon, command, stop)) for _ in range(2)]
    for flood in floods:
        flood.start()
    try:
        time.sleep(0.3)  # the floods fill their buffers
        busy = _round_trips(daemon, 2.0)
    finally:
        stop.set()
        for flood in floods:
            flood.join(10)
    # Generous margins for a shared machine: before the fix the median was hundreds of ms.
    assert statistics.median(busy) < max(0.05, 10 * statistics.median(quiet)), (quiet, busy)
    assert max(busy) < 0.5, sorted(busy)[-5:]
    assert len(busy) >= 20
