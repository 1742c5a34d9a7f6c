"""A client that goes away at an awkward moment must end its session, never spin the worker.

Seen once at the end of a benchmark: a worker at 100% CPU inside aiosmtpd's command loop,
calling `Listener.handle_exception` with `asyncio.IncompleteReadError` over and over, and no
longer stopping on SIGTERM. The cause: aiosmtpd cancels the session when the client's EOF
arrives (`eof_received`), but Python 3.11's `asyncio.wait_for` (used by aiosmtplib to read a
downstream reply with a timeout) drops that cancellation when the downstream's reply is
processed in the same event-loop turn as the EOF. The session then carries on with its reader
at EOF, where `readuntil()` raises at once without waiting; nothing on the exception path
waited either, so the loop never gave control back: no cancellation, no connection_lost, no
signal handler.

To make "in the same turn" certain rather than lucky, each test stops the worker (SIGSTOP),
lets the client hang up and the downstream answer, and resumes it: both events are then read
by one `select()`. The kind covers every moment a reply can cross the client's EOF (greeting,
MAIL/RCPT, end of data, a pipelined group, an over-long command line): each test checks that
the session ends (the downstream session is closed or pooled, a new client is served), that
the worker's CPU time stops rising, and that SIGTERM still stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.client import RawClient
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import make_rsa_key

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: client gone\r\n"
    b"\r\n"
    b"Hello.\r\n"
)
#: How long the downstream holds the reply that is to cross the client's EOF (seconds).
HOLD = 1.0
#: A spinning worker burns about 1 s of CPU per second; a finished session next to nothing.
CPU_BUDGET = 0.4


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)


def start_proxy(keyfile: str, relay: str) -> ProxyProcess:
    # Unsigned pass-through (no rule matches the sender), as in the run where it was seen;
    # one worker: the daemon serves the clients itself, so its pid is the one to stop,
    # resume, measure and terminate.
    args = [f"--keyfile={keyfile}", "--selector=sel", "--domain=nobody.invalid", "--workers=1"]
    return ProxyProcess("out", args, relay).start()


def cross_with_eof(proxy: ProxyProcess, client: RawClient, half_close: bool) -> None:
    """Freeze the worker, hang the client up, let the held downstream reply go, resume."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        if half_close:
            client.sock.shutdown(socket.SHUT_WR)
        else:
            client.close()
        time.sleep(HOLD + 0.8)  # the downstream's reply is now waiting in the worker's socket
    finally:
        os.kill(pid, signal.SIGCONT)


def assert_session_ended(proxy: ProxyProcess, capture: CaptureServer) -> None:
    """The worker is idle again, serves a new client, and stops on SIGTERM."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    time.sleep(1.0)  # let the resumed worker settle (and a runaway one get going)
    before = cpu_seconds(pid)
    time.sleep(2.0)
    burnt = cpu_seconds(pid) - before
    assert burnt < CPU_BUDGET, f"worker used {burnt:.2f} s of CPU in 2 s: spinning\n{proxy.log}"
    with RawClient(proxy.host, proxy.port, timeout=15) as fresh:
        assert fresh.reply()[0] == 220
        assert fresh.command("EHLO fresh.example.test")[0] == 250
        assert fresh.command("QUIT")[0] == 221
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    try:
        proxy.proc.wait(15)
    except Exception:
        pytest.fail(f"SIGTERM did not stop the worker within 15 s\n{proxy.log}")
    assert time.monotonic() - started < 15
    assert "Traceback" not in proxy.log, proxy.log


def open_transaction(client: RawClient) -> None:
    assert client.reply()[0] == 220
    assert client.command("EHLO client.example.test")[0] == 250
    assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
    assert client.command("RCPT TO:<bob@example.net>")[0] == 250


@contextlib.contextmanager
def reply_held_for(
    keyfile: str, verb: str, half_close: bool = True
) -> Iterator[tuple[CaptureServer, RawClient]]:
    """A proxy whose downstream holds its reply to `verb` (or "." or "CONNECT") for HOLD
    seconds. The body brings the client to the moment that reply is due; then the client's
    EOF crosses it, and the session must end (assert_session_ended)."""
    with CaptureServer(delays={verb: HOLD}) as capture:
        proxy = start_proxy(keyfile, capture.address)
        try:
            with RawClient(proxy.host, proxy.port, timeout=15) as client:
                yield capture, client
                cross_with_eof(proxy, client, half_close)
            assert_session_ended(proxy, capture)
        finally:
            proxy.stop()


@pytest.mark.parametrize("half_close", [True, False], ids=["half-close", "close"])
def test_eof_crossing_the_end_of_data_reply_ends_the_session(
    keyfile: str, half_close: bool
) -> None:
    """The downstream's answer to the final dot and the client's EOF in one turn."""
    with reply_held_for(keyfile, ".", half_close) as (capture, client):
        open_transaction(client)
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        capture.wait_for(1)  # the downstream has it and holds its reply


@pytest.mark.parametrize("half_close", [True, False], ids=["half-close", "close"])
def test_eof_crossing_the_downstream_greeting_ends_the_session(
    keyfile: str, half_close: bool
) -> None:
    """A client that hangs up while the downstream session is being opened."""
    with reply_held_for(keyfile, "CONNECT", half_close) as (capture, _client):
        assert wait_until(lambda: capture.sessions >= 1)


@pytest.mark.parametrize("verb", ["MAIL", "RCPT"])
def test_eof_crossing_an_envelope_reply_ends_the_session(keyfile: str, verb: str) -> None:
    with reply_held_for(keyfile, verb) as (capture, client):
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example.test")[0] == 250
        if verb == "RCPT":
            assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
            client.send(b"RCPT TO:<bob@example.net>\r\n")
        else:
            client.send(b"MAIL FROM:<alice@example.org>\r\n")
        assert wait_until(lambda: any(c.startswith(verb) for c in capture.commands))


def test_eof_after_a_pipelined_group_ends_the_session(keyfile: str) -> None:
    """MAIL, RCPT, DATA, the message and a second MAIL in one write, then EOF."""
    with reply_held_for(keyfile, ".") as (capture, client):
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example.test")[0] == 250
        client.send(
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
            + MESSAGE
            + b".\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<carol@exam"
        )
        capture.wait_for(1)


def test_eof_after_an_over_long_command_line_ends_the_session(keyfile: str) -> None:
    """A command line past the limit with no line end, then EOF while a reply is due."""
    with reply_held_for(keyfile, "MAIL") as (capture, client):
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example.test")[0] == 250
        client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<" + b"b" * 100_000)
        assert wait_until(lambda: any(c.startswith("MAIL") for c in capture.commands))
