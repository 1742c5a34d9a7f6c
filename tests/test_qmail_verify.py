"""dkproxy-qmail-queue verification: Authentication-Results, DKVERIFY / DKIMVERIFY letters
and their exit codes, inbound configurations; and notqmail end to end (qmail-inject and
qmail-smtpd with QMAILQUEUE set to the wrapper) where notqmail is installed.

Messages are signed by Perl Mail::DKIM and then damaged in known ways; keys come from NSD.
Helpers: tests/support/qmail.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dkproxy.qmail import wire_form
from tests.support.dnsserver import DNSServer
from tests.support.qmail import (
    AUTHSERV,
    CASES,
    CONSOLE_SCRIPT,
    DOMAIN,
    REAL_QUEUE,
    WRAPPER,
    Case,
    RealQueue,
    Setup,
    StandIn,
    added_fields,
    build_case,
    field_names,
    lf_message,
    mail_dkim,
    make_queue,
    pct_env,
    qmail_setup,
    queue_params,
    run,
    sign_lf,
)
from tests.support.testkeys import KeySet


@pytest.fixture(params=queue_params())
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> StandIn | RealQueue:
    return make_queue(request.param, tmp_path)


@pytest.fixture(scope="module")
def setup(
    dns_server: DNSServer, key_dir: KeySet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    yield from qmail_setup(dns_server, key_dir, tmp_path_factory.mktemp("qmail"))


# ---------------------------------------------------------------------------------------------
# Verification


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verification_letters_and_exit_codes(
    setup: Setup, queue: StandIn | RealQueue, case: Case
) -> None:
    message = build_case(setup, case.name)
    others = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVW" if c not in (case.dk, case.dkim))
    # Not listed: queued, with Authentication-Results and the legacy status fields on top.
    result = run(setup, queue, message, DKVERIFY=others.replace("T", ""),
                 DKIMVERIFY="".join(c for c in others if c not in "T"),
                 DKPROXY_STATUS="1")  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.queued is not None
    fields = added_fields(result.queued, message)
    assert field_names(fields) == ["Authentication-Results", "DKIM-Status", "DomainKey-Status"]
    assert f"DomainKey-Status: {case.dk_status}\n".encode() in fields
    assert f"DKIM-Status: {case.dkim_status}\n".encode() in fields
    assert fields.startswith(f"Authentication-Results: {AUTHSERV};".encode())
    # Upper case: permanent refusal (13); lower case: temporary (82); nothing queued.
    for variable, letter in (("DKVERIFY", case.dk), ("DKIMVERIFY", case.dkim)):
        for value, code in ((letter.upper(), 13), (letter.lower(), 82)):
            result = run(setup, queue, message, **{variable: value})
            assert (result.code, variable, value) == (code, variable, value), result.stderr
            assert result.queued is None


def test_dns_failure_letters(setup: Setup, queue: StandIn | RealQueue) -> None:
    """No answer from DNS: DomainKeys F (cannot verify), DKIM P (temporary DNS failure)."""
    message = build_case(setup, "good")
    dead = {"DKPROXY_DNS_SERVER": setup.dns.blackhole_address(), "DKPROXY_DNS_TIMEOUT": "0.5"}
    result = run(setup, queue, message, DKVERIFY="DEfh", DKIMVERIFY="Q", **dead)
    assert result.code == 82 and result.queued is None
    result = run(setup, queue, message, DKIMVERIFY="P", **dead)
    assert result.code == 13 and result.queued is None
    result = run(setup, queue, message, DKVERIFY="ABCDEGJ", DKIMVERIFY="p", **dead)
    assert result.code == 82 and result.queued is None


def test_permanent_letter_wins_over_temporary(setup: Setup, queue: StandIn | RealQueue) -> None:
    message = build_case(setup, "body-altered")
    result = run(setup, queue, message, DKVERIFY="b", DKIMVERIFY="U")
    assert result.code == 13


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_verify_output_matches_dkproxy_in(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    """Authentication-Results as `dkproxy in` writes it (dkim, domainkeys, spf, dmarc), a
    forged one claiming our authserv-id removed, foreign ones kept."""
    message = build_case(setup, "good")
    forged = f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.test\n".encode()
    foreign = b"Authentication-Results: other.example; spf=pass\n"
    received = b"Received: from x by y; Mon, 30 Nov 2026 10:00:00 +0000\n"
    incoming = received + forged + foreign + message
    result = run(setup, queue, incoming, service=service, DKVERIFY="", TCPREMOTEIP="192.0.2.7")
    assert result.code == 0, result.stderr
    assert result.queued is not None
    stored = result.queued.message
    assert stored.endswith(foreign + message)
    assert forged not in stored and stored.count(b"Authentication-Results:") == 2
    header = stored[: stored.index(received)].decode()
    assert header.startswith(f"Authentication-Results: {AUTHSERV};\n\t")
    for clause in ("dkim=pass", "header.d=qmail-a.test", "domainkeys=pass", "spf=none",
                   "smtp.mailfrom=a@qmail-a.test", "dmarc=none"):  # fmt: skip
        assert clause in header, header
    assert "\r" not in header


def test_inbound_config_actions_refuse(setup: Setup, queue: StandIn | RealQueue) -> None:
    """DKPROXY_CONFIG with an inbound configuration: its hostname and actions apply."""
    conf = setup.conf / "in.toml"
    conf.write_text(
        f'mode = "in"\nhostname = "in.qmail.test"\ndns_server = "{setup.dns.address}"\n'
        '[actions]\n"dkim.fail" = "reject"\n"dkim.none" = "tempfail"\n'
    )
    result = run(setup, queue, build_case(setup, "body-altered"), DKPROXY_CONFIG=str(conf))
    assert result.code == 13 and result.queued is None
    result = run(setup, queue, build_case(setup, "unsigned"), DKPROXY_CONFIG=str(conf))
    assert result.code == 82 and result.queued is None
    message = build_case(setup, "good")
    result = run(setup, queue, message, DKPROXY_CONFIG=str(conf))
    assert result.code == 0 and result.queued is not None
    assert added_fields(result.queued, message).startswith(
        b"Authentication-Results: in.qmail.test;"
    )


def test_unparsable_header_is_queued_with_a_verdict(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    message = b" continuation first\nFrom: a@b\n\nbody\n"
    result = run(setup, queue, message, DKIMVERIFY="GHI")
    assert result.code == 0 and result.queued is not None
    assert b"dkim=none" in added_fields(result.queued, message)
    result = run(setup, queue, message, DKIMVERIFY="S")  # no signature seen: S applies
    assert result.code == 13 and result.queued is None


def test_authentication_results_are_those_of_dkproxy_in(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    """The field the wrapper adds is, byte for byte but for line ends, the one `dkproxy in`'s
    verifier writes for the same message, client and sender."""
    import asyncio
    from types import SimpleNamespace

    from dkproxy.config import HostPort, InboundConfig
    from dkproxy.inbound import InboundVerifier

    message = sign_lf(setup, sign_lf(setup, lf_message(f"alice@{DOMAIN}"), "dkim"), "domainkeys")
    result = run(setup, queue, message, b"Falice@qmail-a.test\0Tb@example.net\0\0",
                 DKVERIFY="", TCPREMOTEIP="192.0.2.7")  # fmt: skip
    assert result.code == 0 and result.queued is not None
    ours = added_fields(result.queued, message)
    cfg = InboundConfig(hostname=AUTHSERV, dns_server=HostPort.parse(setup.dns.address))
    envelope = SimpleNamespace(client_address="192.0.2.7", client_helo=None,
                               mail_from="alice@qmail-a.test")  # fmt: skip
    outcome = asyncio.run(InboundVerifier(cfg)(wire_form(message), envelope))  # type: ignore[arg-type]
    assert outcome.prepend == [ours.replace(b"\n", b"\r\n")]


# ---------------------------------------------------------------------------------------------
# notqmail end to end: qmail-inject and qmail-smtpd with QMAILQUEUE set to the wrapper.
# Defined only where notqmail is installed and usable (see _queue_params); the stand-in tests
# above cover every point without it.

NOTQMAIL = "qmail-queue" in queue_params() and all(
    os.path.exists(f"/var/qmail/{name}")
    for name in ("bin/qmail-inject", "bin/qmail-smtpd", "control/me", "control/rcpthosts")
)

if NOTQMAIL:

    def _notqmail_env(setup: Setup, service: bool = True, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "QMAILQUEUE": CONSOLE_SCRIPT if os.path.exists(CONSOLE_SCRIPT) else WRAPPER[0],
            "DKQUEUE": REAL_QUEUE,
            "DKPROXY_SOCKET": setup.socket if service else str(setup.conf / "none.sock"),
            "DKPROXY_DNS_SERVER": setup.dns.address,
            "DKPROXY_HOSTNAME": AUTHSERV,
            **extra,
        }

    def _smtpd(env: dict[str, str], message: bytes, rcpt: str) -> list[str]:
        """One SMTP transaction with qmail-smtpd on pipes; its replies after DATA."""
        wire = wire_form(message).replace(b"\r\n.", b"\r\n..")
        script = (f"HELO client.test\r\nMAIL FROM:<alice@{DOMAIN}>\r\nRCPT TO:<{rcpt}>\r\n"
                  "DATA\r\n").encode() + wire + b".\r\nQUIT\r\n"  # fmt: skip
        proc = subprocess.run(["/var/qmail/bin/qmail-smtpd"], input=script, capture_output=True,
                              env={**env, "TCPREMOTEIP": "127.0.0.1"}, cwd="/var/qmail",
                              timeout=120, check=False)  # fmt: skip
        return proc.stdout.decode("utf-8", "replace").splitlines()[-2:]

    @pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
    def test_notqmail_qmail_inject_queues_signed_mail(setup: Setup, service: bool) -> None:
        queue = RealQueue()
        queue.reset()
        message = lf_message(f"Alice <alice@{DOMAIN}>", b"Local mail.\n")
        proc = subprocess.run(
            ["/var/qmail/bin/qmail-inject", "-f", f"alice@{DOMAIN}", "bob@example.net"],
            input=message, capture_output=True, timeout=120, check=False,
            env=_notqmail_env(setup, service, **pct_env(setup)),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        queued = queue.queued()
        assert queued is not None
        assert queued.envelope == f"Falice@{DOMAIN}\0Tbob@example.net\0\0".encode()
        assert mail_dkim(setup, queued.message) == [
            ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip

    def test_notqmail_qmail_smtpd_signs_relay_clients_and_applies_letters(setup: Setup) -> None:
        queue = RealQueue()
        message = lf_message(f"alice@{DOMAIN}", b"Via SMTP.\n")
        queue.reset()
        relay = _notqmail_env(setup, RELAYCLIENT="", **pct_env(setup))
        replies = _smtpd(relay, message, "bob@example.net")
        assert replies[0].startswith("250 ok"), replies
        queued = queue.queued()
        assert queued is not None
        assert mail_dkim(setup, queued.message) == [
            ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip
        me = Path("/var/qmail/control/me").read_text().strip()
        altered = build_case(setup, "body-altered")
        for letters, reply in (("U", "554 "), ("u", "451 "), ("GHI", "250 ok")):
            queue.reset()
            replies = _smtpd(_notqmail_env(setup, DKIMVERIFY=letters), altered, f"postmaster@{me}")
            assert replies[0].startswith(reply), (letters, replies)
            assert (queue.queued() is not None) == (reply == "250 ok")

    def test_notqmail_failure_is_a_temporary_smtp_error(setup: Setup) -> None:
        """A key the wrapper cannot use: the client sees 451 and nothing is queued."""
        queue = RealQueue()
        queue.reset()
        env = _notqmail_env(setup, RELAYCLIENT="", DKIMSIGN=str(setup.keys / "fixed" / "absent"))
        replies = _smtpd(env, lf_message(), "bob@example.net")
        assert replies[0].startswith("451 "), replies
        assert queue.queued() is None
