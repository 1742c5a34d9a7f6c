"""Idle downstream sessions must never starve the downstream (issue 8).

The shipped Postfix recipe (conf/postfix-master-out.cf) re-injects through an smtpd limited
to 10 processes. An idle session dkproxy keeps for reuse holds one of them: if one worker
held many while another worker needed a new one, that worker's connect waited in Postfix's
listen queue until the idle ones expired (15-40 s with the old pool). Here two workers serve
waves of 8-16 concurrent sessions of different sizes, and dkproxy's greeting (sent only once
it holds a downstream session) must come within a second every time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.client import RawClient
from tests.support.postfix import PostfixInstance
from tests.support.proxy import ProxyProcess
from tests.support.sink import SmtpSink
from tests.support.testkeys import make_rsa_key
from tests.support.tools import free_port
from tests.test_postfix import outbound_services

MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: pool\r\n\r\nHi.\r\n"


def one_session(host: str, port: int, waits: list[float], errors: list[str]) -> None:
    """Connect, time the greeting, relay one message, QUIT."""
    try:
        started = time.monotonic()
        with RawClient(host, port, timeout=60) as client:
            code, text = client.reply()
            waits.append(time.monotonic() - started)
            if code != 220:
                errors.append(f"greeting {code} {text}")
                return
            replies = [client.command("EHLO client.test")[0]]
            replies.append(client.command("MAIL FROM:<alice@example.org>")[0])
            replies.append(client.command("RCPT TO:<bob@example.net>")[0])
            replies.append(client.command("DATA")[0])
            client.send(MESSAGE + b".\r\n")
            replies.append(client.reply()[0])
            replies.append(client.command("QUIT")[0])
            if replies != [250, 250, 250, 354, 250, 221]:
                errors.append(f"replies {replies}")
    except OSError as exc:
        errors.append(repr(exc))


def test_two_workers_never_wait_for_a_downstream_session_behind_idle_ones(
    smtp_sink: Callable[..., SmtpSink], tmp_path: Path
) -> None:
    submission, filter_port, reinject = free_port(), free_port(), free_port()
    sink = smtp_sink()
    mta = PostfixInstance(
        services=outbound_services(submission, filter_port, reinject),
        relayhost=f"[127.0.0.1]:{sink.port}",
    ).start()
    try:
        run_waves(mta, sink, filter_port, reinject, tmp_path)
    finally:
        print(f"=== Postfix {mta.dir}\n{mta.diagnostics()}")
        mta.cleanup()


def run_waves(
    mta: PostfixInstance, sink: SmtpSink, filter_port: int, reinject: int, tmp_path: Path
) -> None:
    key = make_rsa_key(f"{tmp_path}/example.org.key", 1024)
    args = [f"--keyfile={key}", "--selector=sel", "--domain=example.org", "--workers=2"]
    waves = [8, 16, 8, 12, 16, 8, 16, 10, 16, 8]
    waits: list[float] = []
    errors: list[str] = []
    with ProxyProcess("out", args, f"127.0.0.1:{reinject}", port=filter_port) as proxy:
        for size in waves:
            threads = [
                threading.Thread(target=one_session, args=(proxy.host, proxy.port, waits, errors))
                for _ in range(size)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(90)
            time.sleep(0.3)  # idle sessions are still fresh when the next wave comes
        log = proxy.log
    print(log)
    assert not errors, errors
    assert len(waits) == sum(waves)
    assert max(waits) < 1.0, sorted(waits)[-5:]
    assert "Traceback" not in log
    # Everything that was acknowledged arrived.
    assert len(sink.wait_for(sum(waves), timeout=60)) == sum(waves)
    mta.wait_queue(lambda queue: not queue)
