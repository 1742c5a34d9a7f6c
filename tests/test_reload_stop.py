"""Reload and stop under a steady load: nothing refused on reload, nothing lost on stop.

The daemon (two workers) gets continuous traffic from Postfix's smtp-source and from an
accounting client of ours, which gives every message its own Message-ID and records what
became of it: acknowledged (250), temporarily refused (4xx, or the connection refused or
closed before the greeting, which an MTA retries), or anything else (which must not happen).
What arrived at smtp-sink is then matched against the acknowledged messages one for one.
"""

from __future__ import annotations

import contextlib
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.proxy import ProxyProcess
from tests.support.sink import SmtpSink
from tests.support.testkeys import KeySet
from tests.support.tools import die_with_parent, require_tool

SENDER = "alice@example.org"
RCPT = "bob@example.net"


@dataclass
class Ledger:
    """What became of each message the accounting client offered."""

    acknowledged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # 4xx, or no session at all
    other: list[tuple[str, str]] = field(default_factory=list)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, msgid: str, detail: str = "") -> None:
        with self.lock:
            self.sent += 1
            if kind == "ack":
                self.acknowledged.append(msgid)
            elif kind == "refused":
                self.refused.append(msgid)
            else:
                self.other.append((msgid, detail))


class AccountingClient:
    """`threads` senders, each sending one message per SMTP session until stopped."""

    def __init__(self, port: int, threads: int = 4, tag: str = "m") -> None:
        self.port = port
        self.ledger = Ledger()
        self._stop = threading.Event()
        self._tag = tag
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def start(self) -> AccountingClient:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Ledger:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.ledger

    def send_one(self, msgid: str) -> None:
        data = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: load\r\n"
                f"Message-ID: <{msgid}>\r\n\r\nSteady load.\r\n").encode()  # fmt: skip
        try:
            client = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
        except smtplib.SMTPConnectError as exc:
            kind = "refused" if 400 <= exc.smtp_code < 500 else "other"
            self.ledger.record(kind, msgid, f"greeting {exc.smtp_code}")
            return
        except (ConnectionError, smtplib.SMTPServerDisconnected) as exc:
            self.ledger.record("refused", msgid, repr(exc))  # before any greeting: retried
            return
        try:
            client.sendmail(SENDER, [RCPT], data)
        except smtplib.SMTPResponseException as exc:
            kind = "refused" if 400 <= exc.smtp_code < 500 else "other"
            self.ledger.record(kind, msgid, f"{exc.smtp_code} {exc.smtp_error!r}")
        except Exception as exc:
            self.ledger.record("other", msgid, repr(exc))  # cut mid-transaction: unknown fate
        else:
            self.ledger.record("ack", msgid)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()  # the message is acknowledged; QUIT cannot change that
            return
        client.close()

    def _run(self, number: int) -> None:
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            self.send_one(f"{self._tag}-{number}-{sequence}@load.test")


def smtp_source(port: int, messages: int, sessions: int = 4) -> subprocess.Popen[bytes]:
    """Postfix's smtp-source: `messages` messages over `sessions` parallel sessions."""
    return subprocess.Popen(
        [require_tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", "2000",
         "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )  # fmt: skip


def conf(path: Path, key: str, selector: str) -> None:
    path.write_text(f"domain example.org\nkeyfile {key}\nselector {selector}\n"
                    "signature dkim(c=relaxed)\n")  # fmt: skip


def selector_of(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    found = [part.strip()[2:] for part in head.replace("\r\n", "").split(";")
             if part.strip().startswith("s=")]  # fmt: skip
    assert len(found) == 1, head
    return found[0]


def wait_log(proxy: ProxyProcess, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while proxy.log.count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not logged:\n{proxy.log[-4000:]}"
        time.sleep(0.05)


@pytest.fixture
def load_conf(tmp_path: Path, key_dir: KeySet) -> Iterator[Path]:
    path = tmp_path / "dkimproxy_out.conf"
    conf(path, key_dir.rsa2048.path, "before")
    yield path


@pytest.mark.timeout(300)
def test_reload_under_load_takes_effect_for_the_next_message_and_refuses_nothing(
    smtp_sink: type[SmtpSink], load_conf: Path, key_dir: KeySet
) -> None:
    sink = smtp_sink()
    args = [f"--conf_file={load_conf}", "--workers=2"]
    with ProxyProcess("out", args, relay=sink.address) as proxy:
        client = AccountingClient(proxy.port, tag="reload").start()
        source = smtp_source(proxy.port, messages=600)
        time.sleep(2)  # steady state
        conf(load_conf, key_dir.rsa2048.path, "after")
        proxy.signal(signal.SIGHUP)
        wait_log(proxy, "configuration reloaded", 2)  # both workers
        # From here on, every new message must carry the new selector.
        after = [f"after-reload-{n}@load.test" for n in range(5)]
        for msgid in after:
            client.send_one(msgid)
        time.sleep(2)
        ledger = client.stop()
        output, _ = source.communicate(timeout=240)
        assert source.returncode == 0, output.decode()
        assert output == b"", output.decode()  # no error reply, no refused connection
        exit_code = proxy.stop()
    assert exit_code == 0
    assert ledger.refused == [] and ledger.other == [], (ledger.refused[:5], ledger.other[:5])
    assert ledger.sent == len(ledger.acknowledged) > len(after)
    assert set(after) <= set(ledger.acknowledged)

    arrived = sink.wait_for(600 + ledger.sent, timeout=120)
    assert len(arrived) == 600 + ledger.sent
    ours = {msg.header("Message-ID").strip("<>"): msg for msg in arrived  # type: ignore[union-attr]
            if msg.header("Message-ID") and "@load.test" in msg.header("Message-ID")}  # type: ignore[operator]  # fmt: skip
    assert set(ours) == set(ledger.acknowledged)
    assert {selector_of(ours[msgid].data) for msgid in after} == {"after"}
    selectors = Counter(selector_of(msg.data) for msg in arrived)
    assert selectors["before"] > 0 and selectors["after"] > 0, selectors
    assert sum(selectors.values()) == len(arrived)
    assert "reload failed" not in proxy.log


@pytest.mark.timeout(300)
def test_stop_under_load_finishes_sessions_in_flight_and_loses_nothing(
    smtp_sink: type[SmtpSink], load_conf: Path
) -> None:
    sink = smtp_sink()
    args = [f"--conf_file={load_conf}", "--workers=2"]
    with ProxyProcess("out", args, relay=sink.address) as proxy:
        client = AccountingClient(proxy.port, tag="stop").start()
        source = smtp_source(proxy.port, messages=100000)
        time.sleep(2)
        # Sessions in flight at the stop: mid-transaction, with MAIL and RCPT accepted.
        held = []
        for number in range(3):
            session = smtplib.SMTP("127.0.0.1", proxy.port, timeout=60)
            session.ehlo("held.example.org")
            assert session.mail(SENDER)[0] == 250
            assert session.rcpt(RCPT)[0] == 250
            held.append((session, f"held-{number}@load.test"))
        proxy.signal(signal.SIGTERM)
        wait_log(proxy, "stopping: waiting up to", 1)
        time.sleep(0.5)
        # New connections are refused now, at once (not accepted and left without a
        # greeting); the held sessions still complete their message.
        started = time.monotonic()
        with pytest.raises((ConnectionError, smtplib.SMTPServerDisconnected)):
            smtplib.SMTP("127.0.0.1", proxy.port, timeout=20).noop()
        assert time.monotonic() - started < 5
        for session, msgid in held:
            data = f"From: <{SENDER}>\r\nMessage-ID: <{msgid}>\r\n\r\nIn flight.\r\n"
            assert session.data(data.encode())[0] == 250
            session.quit()
        assert proxy.proc is not None
        exit_code = proxy.proc.wait(60)
        ledger = client.stop()
        source.wait(60)  # it gives up once connections are refused
    assert exit_code == 0, proxy.log[-3000:]
    assert "stopped" in proxy.log
    # sent = acknowledged + temporarily refused; nothing cut with an unknown fate.
    assert ledger.other == [], ledger.other[:5]
    assert ledger.sent == len(ledger.acknowledged) + len(ledger.refused)
    assert ledger.acknowledged and ledger.refused

    acknowledged = proxy.log.count("relay='250 ")  # every 250 dkproxy gave, smtp-source's too
    arrived = sink.wait_for(acknowledged, timeout=60)
    time.sleep(1)
    arrived = sink.messages()
    assert len(arrived) == acknowledged
    ids = {msg.header("Message-ID") for msg in arrived}
    for msgid in ledger.acknowledged + [msgid for _, msgid in held]:
        assert f"<{msgid}>" in ids, msgid
    assert not {f"<{msgid}>" for msgid in ledger.refused} & ids
