"""`dkproxy relay`: applications submit with TLS + AUTH, dkproxy signs and relays to a smarthost.

Everything runs for real on loopback: the relay daemon, an aiosmtpd smarthost with STARTTLS or
implicit TLS and AUTH (certificates made here with `cryptography`), Debian's swaks as the
submitting application, NSD serving the keys, and Perl Mail::DKIM verifying what arrived.
"""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import DNSServer
from tests.support.proxy import run_dkproxy
from tests.support.relayhelp import (
    PASSWORDS,
    SMARTHOST_LOGIN,
    RelaySetup,
    add_login,
    message,
    swaks,
)
from tests.support.sink import SmtpSink
from tests.support.smarthost import (
    CertFiles,
    SmtpSmarthost,
    certificate_serial,
    make_certificates,
)
from tests.support.testkeys import KeySet
from tests.support.tools import free_port
from tests.support.verifiers import verify_mail_dkim

SIGNATURE_FIELDS = (b"dkim-signature:", b"domainkey-signature:")
#: aiosmtpd warns about the test smarthost's implicit-TLS port, where AUTH needs no STARTTLS.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertFiles]:
    folder = str(tmp_path_factory.mktemp("certs"))
    return {
        "relay": make_certificates(folder, "relay"),
        "smarthost": make_certificates(folder, "smarthost"),
        "rogue": make_certificates(folder, "rogue"),
        "elsewhere": make_certificates(folder, "elsewhere", ("mail.elsewhere.test",)),
    }


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A credentials file made with `dkproxy passwd` (webapp argon2id, printer bcrypt), the
    sender-login map, and the smarthost password file (0600)."""
    folder = tmp_path_factory.mktemp("credentials")
    passwd = str(folder / "relay.passwd")
    add_login(passwd, "webapp", PASSWORDS["webapp"])
    add_login(passwd, "printer", PASSWORDS["printer"], "--bcrypt")
    login_map = folder / "sender_logins"
    login_map.write_text(
        "# sender            logins\n"
        "@example.org        webapp\n"
        "scanner@example.com printer, webapp\n"
    )
    password_file = folder / "smarthost.password"
    password_file.write_text(SMARTHOST_LOGIN[1] + "\n")
    password_file.chmod(0o600)
    return {"passwd": passwd, "map": str(login_map), "password_file": str(password_file)}


@pytest.fixture
def signing_dns(clean_dns: DNSServer, key_dir: KeySet) -> DNSServer:
    key_dir.rsa2048.publish(clean_dns, "example.org")
    return clean_dns


@pytest.fixture
def smarthost(certs: dict[str, CertFiles]) -> Iterator[SmtpSmarthost]:
    host = SmtpSmarthost(certs["smarthost"], logins=dict([SMARTHOST_LOGIN]))
    with host:
        yield host


def make_setup(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    hop: SmtpSmarthost | str,
    *,
    hop_tls: str = "starttls",
) -> RelaySetup:
    setup = RelaySetup(
        directory=str(tmp_path),
        relay_cert=certs["relay"],
        smarthost_ca=certs["smarthost"].ca,
        key_path=key_dir.rsa2048.path,
        selector=key_dir.rsa2048.selector,
    )
    address = hop.address if isinstance(hop, SmtpSmarthost) else hop
    setup.sections = {
        "listen": {
            "addresses": [f"127.0.0.1:{setup.port}"],
            "tls_addresses": [f"127.0.0.1:{setup.tls_port}"],
            "certificate": certs["relay"].certificate,
            "key": certs["relay"].key,
        },
        "auth": {
            "credentials": credentials["passwd"],
            "sender_login_map": credentials["map"],
            "failure_delay": 0.2,
            "max_failures": 5,
        },
        "smarthost": {
            "address": address,
            "tls": hop_tls,
            "ca_file": certs["smarthost"].ca,
            "username": SMARTHOST_LOGIN[0],
            "password_file": credentials["password_file"],
            "connect_timeout": 10,
            "timeout": 30,
        },
        "limits": {},
        "log": {"level": "debug"},
    }
    return setup


@pytest.fixture
def setup(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    smarthost: SmtpSmarthost,
) -> RelaySetup:
    return make_setup(tmp_path, certs, credentials, key_dir, smarthost)


def our_fields_and_rest(data: bytes) -> tuple[list[bytes], bytes]:
    """The header fields dkproxy put on top (signatures, Received) and the bytes below."""
    fields: list[bytes] = []
    rest = data
    while True:
        lower = rest.lower()
        if not (lower.startswith(SIGNATURE_FIELDS) or lower.startswith(b"received:")):
            return fields, rest
        end = 0
        while True:
            end = rest.index(b"\r\n", end) + 2
            if rest[end : end + 1] not in (b" ", b"\t"):
                break
        fields.append(rest[:end])
        rest = rest[end:]


# -- the whole path ------------------------------------------------------------------------


def test_signed_mail_delivered_and_verified_by_mail_dkim(
    setup: RelaySetup, smarthost: SmtpSmarthost, signing_dns: DNSServer
) -> None:
    """swaks -> STARTTLS + AUTH PLAIN -> signed -> smarthost over STARTTLS + AUTH, verified."""
    data = message()
    with setup.process() as relay:
        status, transcript = swaks(relay.port, data=data, auth=("webapp", PASSWORDS["webapp"]))
        assert status == 0, transcript + relay.log
        assert "250 2.0.0 Ok: queued as SMARTHOST" in transcript  # the smarthost's own reply
    [arrival] = smarthost.arrivals
    assert arrival.login == SMARTHOST_LOGIN[0] and arrival.tls
    assert arrival.mail_from == "alice@example.org"
    assert arrival.rcpt_tos == ["bob@example.net"]
    fields, rest = our_fields_and_rest(arrival.data)
    # Byte-identical below our fields: what swaks sent (it dot-stuffs, and ends DATA with a
    # CRLF of its own before the final dot, which is part of the message).
    assert rest == data + b"\r\n"
    names = [field.split(b":", 1)[0].lower() for field in fields]
    assert names == [b"domainkey-signature", b"dkim-signature", b"received"]
    received = fields[-1].decode()
    assert "with ESMTPSA" in received
    assert "(Authenticated sender: webapp)" in received
    assert "from app.example.test ([127.0.0.1])" in received
    assert "by relay.example.test (dkproxy)" in received
    results = verify_mail_dkim(arrival.data, signing_dns)
    assert [(r.kind, r.result) for r in results] == [("domainkeys", "pass"), ("dkim", "pass")]
    assert "login=webapp" in relay.log
    assert "signed=dkim(d=example.org,s=sel2048,a=rsa-sha256),domainkeys(" in relay.log


def test_implicit_tls_on_both_sides(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    signing_dns: DNSServer,
) -> None:
    """swaks --tlsc (port 465 style) in, implicit TLS to the smarthost out, AUTH LOGIN."""
    with SmtpSmarthost(
        certs["smarthost"], implicit_tls=True, logins=dict([SMARTHOST_LOGIN])
    ) as hop:
        setup = make_setup(tmp_path, certs, credentials, key_dir, hop, hop_tls="implicit")
        data = message(subject="implicit both sides")
        with setup.process() as relay:
            status, transcript = swaks(
                setup.tls_port, data=data, tls="implicit", auth=("webapp", PASSWORDS["webapp"]),
                mechanism="LOGIN",
            )  # fmt: skip
            assert status == 0, transcript + relay.log
        [arrival] = hop.arrivals
        assert arrival.login == SMARTHOST_LOGIN[0]
        assert hop.auth_attempts[-1][1:] == SMARTHOST_LOGIN  # our login, over implicit TLS
        fields, rest = our_fields_and_rest(arrival.data)
        assert rest == data + b"\r\n"
        assert "with ESMTPSA" in fields[-1].decode()
        assert "(using TLSv1." in fields[-1].decode()
        results = verify_mail_dkim(arrival.data, signing_dns)
        assert {r.result for r in results} == {"pass"} and len(results) == 2


def test_bcrypt_login_and_sender_map_entry_by_address(
    setup: RelaySetup, smarthost: SmtpSmarthost
) -> None:
    """printer (a bcrypt hash) may use scanner@example.com, listed by address in the map."""
    data = message(sender="scanner@example.com", subject="scan")
    with setup.process() as relay:
        status, transcript = swaks(
            relay.port, sender="scanner@example.com", data=data,
            auth=("printer", PASSWORDS["printer"]),
        )  # fmt: skip
        assert status == 0, transcript + relay.log
    assert [a.mail_from for a in smarthost.arrivals] == ["scanner@example.com"]


# -- refusals on the client side -------------------------------------------------------------


def _client(port: int, ca: str, starttls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    client.ehlo("probe.example.test")
    if starttls:
        client.starttls(context=ssl.create_default_context(cafile=ca))
        client.ehlo("probe.example.test")
    return client


def _plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_auth_before_tls_is_refused(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    """AUTH is not offered before STARTTLS: 530 while TLS is required, 538 where plaintext
    MAIL is allowed (require_tls = false); swaks cannot authenticate without TLS."""
    with setup.process() as relay:
        client = _client(relay.port, setup.relay_cert.ca, starttls=False)
        assert not client.has_extn("auth")
        assert client.has_extn("starttls")
        code, text = client.docmd("AUTH", "PLAIN " + _plain("webapp", PASSWORDS["webapp"]))
        assert code == 530, text
        code, _ = client.docmd("MAIL", "FROM:<alice@example.org>")
        assert code == 530
        client.close()
        status, transcript = swaks(
            relay.port, tls=None, auth=("webapp", PASSWORDS["webapp"]), data=message()
        )
        assert status != 0 and "250 2.0.0 Ok: queued" not in transcript
    setup.sections["listen"]["require_tls"] = False
    with setup.process() as relay:
        client = _client(relay.port, setup.relay_cert.ca, starttls=False)
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH", "LOGIN")
        assert code == 538, text
        # Without AUTH and outside any allow list, this client may not relay at all.
        code, text = client.docmd("MAIL", "FROM:<alice@example.org>")
        assert code == 530, text
        client.close()
    assert smarthost.arrivals == []


def test_wrong_password_535_after_a_delay(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    setup.sections["auth"]["failure_delay"] = 1.0
    with setup.process() as relay:
        for login, password in (
            ("webapp", "wrong password"),
            ("webapp", PASSWORDS["printer"]),  # another login's password
            ("nobody", PASSWORDS["webapp"]),  # unknown login
        ):
            status, transcript = swaks(relay.port, auth=(login, password), data=message())
            assert status != 0
            assert "<~* 535 5.7.8" in transcript, transcript
        client = _client(relay.port, setup.relay_cert.ca)
        started = time.monotonic()
        code, _ = client.docmd("AUTH", "PLAIN " + _plain("webapp", "still wrong"))
        assert code in (535, 421)
        assert time.monotonic() - started >= 1.0  # the per-client delay, growing per failure
        client.close()
    assert smarthost.arrivals == []
    assert "AUTH PLAIN failed for login=webapp" in relay.log
    assert "failed for an unknown login" in relay.log


def test_too_many_auth_failures_get_421(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    setup.sections["auth"].update(max_failures=2, failure_delay=0.1)
    with setup.process() as relay:
        client = _client(relay.port, setup.relay_cert.ca)
        code, _ = client.docmd("AUTH", "PLAIN " + _plain("webapp", "guess 1"))
        assert code == 535
        code, text = client.docmd("AUTH", "PLAIN " + _plain("webapp", "guess 2"))
        assert code == 421, text
        # The client stays locked out for the window, even with the right password.
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        assert refused.value.smtp_code == 421
        status, transcript = swaks(relay.port, auth=("webapp", PASSWORDS["webapp"]))
        assert status != 0 and "421 4.7.0" in transcript
    assert "too many authentication failures" in relay.log


@pytest.mark.parametrize(
    ("envelope_sender", "header", "expected"),
    [
        ("mallory@victim.example", "From: <alice@example.org>", "<~* 553 5.7.1 <mallory"),
        ("someone@example.com", "From: <alice@example.org>", "<~* 553 5.7.1"),
        ("alice@example.org", "From: <ceo@victim.example>", "From address <ceo@victim.example>"),
        (
            "alice@example.org",
            "From: <alice@example.org>, <ceo@victim.example>",
            "From address <ceo@victim.example>",
        ),
        (
            "alice@example.org",
            "From: <alice@example.org>\r\nSender: <ceo@victim.example>",
            "Sender address <ceo@victim.example>",
        ),
        (
            "alice@example.org",
            'From: "alice@example.org" <ceo@victim.example>',
            "From address <ceo@victim.example>",
        ),
    ],
)
def test_sender_outside_the_logins_map_553(
    setup: RelaySetup,
    smarthost: SmtpSmarthost,
    envelope_sender: str,
    header: str,
    expected: str,
) -> None:
    """MAIL FROM and every From/Sender header address must be mapped to the login."""
    data = (
        f"{header}\r\nTo: <bob@example.net>\r\nSubject: spoof\r\n\r\nbody\r\n"
    ).encode()  # fmt: skip
    with setup.process() as relay:
        status, transcript = swaks(
            relay.port, sender=envelope_sender, data=data,
            auth=("webapp", PASSWORDS["webapp"]),
        )  # fmt: skip
        assert status != 0
        assert expected in transcript, transcript
        assert "553" in transcript
        assert "refused" in relay.log
    assert smarthost.arrivals == []


def test_allowed_network_relays_without_auth(
    setup: RelaySetup, smarthost: SmtpSmarthost, signing_dns: DNSServer
) -> None:
    """A printer on an allowed network sends without AUTH and is signed; the Received field
    then says ESMTPS (TLS, no AUTH) and names no login."""
    setup.sections["clients"] = {"relay_without_auth": ["127.0.0.0/8"]}
    with setup.process() as relay:
        status, transcript = swaks(relay.port, data=message(subject="printer"))
        assert status == 0, transcript + relay.log
    [arrival] = smarthost.arrivals
    received = our_fields_and_rest(arrival.data)[0][-1].decode()
    assert "with ESMTPS id" in received and "Authenticated" not in received


# -- the smarthost hop -----------------------------------------------------------------------


@pytest.mark.parametrize("hop_tls", ["starttls", "implicit"])
@pytest.mark.parametrize("cert_name", ["rogue", "elsewhere"])
def test_untrusted_smarthost_certificate_gives_4xx_and_a_reason(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    hop_tls: str,
    cert_name: str,
) -> None:
    """A certificate from a CA we do not trust (rogue), or for another name (elsewhere):
    the client gets 451 4.7.5 and keeps its mail; the log says why; no password is sent."""
    implicit = hop_tls == "implicit"
    with SmtpSmarthost(
        certs[cert_name], implicit_tls=implicit, logins=dict([SMARTHOST_LOGIN])
    ) as hop:
        setup = make_setup(tmp_path, certs, credentials, key_dir, hop, hop_tls=hop_tls)
        if cert_name == "elsewhere":
            setup.sections["smarthost"]["ca_file"] = certs["elsewhere"].ca
        with setup.process() as relay:
            status, transcript = swaks(
                relay.port, data=message(), auth=("webapp", PASSWORDS["webapp"])
            )
            assert status != 0
            assert "451 4.7.5" in transcript, transcript
        assert hop.arrivals == [] and hop.auth_attempts == []
    reason = "unable to get local issuer" if cert_name == "rogue" else "IP address mismatch"
    assert "TLS certificate verification failed" in relay.log
    assert any(reason in line and "smarthost" in line for line in relay.log.splitlines()), relay.log


def test_tls_verify_false_is_explicit_and_loud(
    tmp_path: Path, certs: dict[str, CertFiles], credentials: dict[str, str], key_dir: KeySet
) -> None:
    with SmtpSmarthost(certs["rogue"], logins=dict([SMARTHOST_LOGIN])) as hop:
        setup = make_setup(tmp_path, certs, credentials, key_dir, hop)
        setup.sections["smarthost"]["tls_verify"] = False
        with setup.process() as relay:
            status, transcript = swaks(
                relay.port, data=message(), auth=("webapp", PASSWORDS["webapp"])
            )
            assert status == 0, transcript + relay.log
        assert len(hop.arrivals) == 1
    warning = [line for line in relay.log.splitlines() if "tls_verify" in line]
    assert warning and " WARNING " in warning[0] and "NOT verified" in warning[0]


def test_smarthost_refusing_our_login_gives_4xx(
    setup: RelaySetup, smarthost: SmtpSmarthost
) -> None:
    smarthost.refuse_logins()
    with setup.process() as relay:
        status, transcript = swaks(relay.port, data=message(), auth=("webapp", PASSWORDS["webapp"]))
        assert status != 0
        assert "451 4.7.0 smarthost refused our login" in transcript, transcript + relay.log
    assert smarthost.arrivals == []
    assert [attempt[1:] for attempt in smarthost.auth_attempts][:1] == [SMARTHOST_LOGIN]
    assert f"refused our login '{SMARTHOST_LOGIN[0]}': 535" in relay.log


def test_unreachable_smarthost_gives_4xx(
    tmp_path: Path, certs: dict[str, CertFiles], credentials: dict[str, str], key_dir: KeySet
) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    setup = make_setup(tmp_path, certs, credentials, key_dir, closed)
    with setup.process() as relay:
        status, transcript = swaks(relay.port, data=message(), auth=("webapp", PASSWORDS["webapp"]))
        assert status != 0
        assert "451 4.4.1 smarthost" in transcript, transcript
    assert "unreachable" in relay.log


def test_silent_smarthost_times_out_with_4xx(
    tmp_path: Path, certs: dict[str, CertFiles], credentials: dict[str, str], key_dir: KeySet
) -> None:
    """A smarthost that accepts the connection but never greets: 451 after connect_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nobody ever answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        setup = make_setup(tmp_path, certs, credentials, key_dir, address)
        setup.sections["smarthost"]["connect_timeout"] = 1
        with setup.process() as relay:
            started = time.monotonic()
            status, transcript = swaks(
                relay.port, data=message(), auth=("webapp", PASSWORDS["webapp"])
            )
            assert status != 0 and "451 4.4.1 smarthost" in transcript, transcript
            assert time.monotonic() - started < 30
    assert "did not answer" in relay.log or "Timed out" in relay.log, relay.log


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("mail", "452 4.3.1 Insufficient system storage"),
        ("mail", "550 5.7.1 Sender blocked by policy"),
        ("data", "451 4.3.0 Try again later"),
        ("data", "554 5.7.1 Message rejected as spam"),
    ],
)
def test_smarthost_replies_are_passed_back(
    setup: RelaySetup, smarthost: SmtpSmarthost, stage: str, reply: str
) -> None:
    """Proxy semantics: the client gets the smarthost's own answer, never our 250."""
    (smarthost.answer_mail if stage == "mail" else smarthost.answer_data)(reply)
    with setup.process() as relay:
        status, transcript = swaks(relay.port, data=message(), auth=("webapp", PASSWORDS["webapp"]))
        assert status != 0
        assert reply in transcript, transcript + relay.log
        assert "250 2.0.0" not in transcript


# -- start-up checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"listen": {"addresses": ["0.0.0.0:2587"]}},
            "listen.addresses: 0.0.0.0:2587 is not a loopback",
        ),
        (
            {"listen": {"addresses": [], "tls_addresses": ["[::]:2465"]}},
            "listen.tls_addresses: [::]:2465",
        ),
        (
            {
                "listen": {"addresses": ["192.0.2.1:2587"]},
                "clients": {"relay_without_auth": ["0.0.0.0/0"]},
            },
            "clients.relay_without_auth",
        ),
    ],
)
def test_open_relay_configuration_is_refused_at_start(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    change: dict[str, dict[str, object]],
    named: str,
) -> None:
    setup = make_setup(tmp_path, certs, credentials, key_dir, "127.0.0.1:1")
    del setup.sections["auth"]
    for table, values in change.items():
        setup.sections.setdefault(table, {}).update(values)
    path = setup.write()
    done = run_dkproxy("relay", "-c", path)
    assert done.returncode == 1
    assert f"{path}: {named}" in done.stderr, done.stderr
    checked = run_dkproxy("check-config", path)
    assert checked.returncode == 1 and named in checked.stderr


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"smarthost": {"tls": "none"}, "_smarthost_address": "192.0.2.7:25"},
            "smarthost.tls: 'none' is only allowed",
        ),
        ({"smarthost": {"colour": "blue"}}, "smarthost.colour: unknown key"),
        ({"listen": {"certificate": None}}, "listen.certificate: needed with the other"),
        ({"auth": {"sender_login_map": None}}, "auth.sender_login_map: missing"),
        ({"_password_mode": 0o644}, "smarthost.password_file: "),
        ({"signing": {"defaults": {"selector": "bad selector!"}}}, "signing: defaults.selector"),
    ],
)
def test_bad_configuration_names_file_and_key(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    change: dict[str, object],
    named: str,
) -> None:
    setup = make_setup(tmp_path, certs, credentials, key_dir, "127.0.0.1:1")
    password_file = tmp_path / "hop.password"
    password_file.write_text("secret\n")
    password_file.chmod(change.pop("_password_mode", 0o600))  # type: ignore[arg-type]
    setup.sections["smarthost"]["password_file"] = str(password_file)
    if "_smarthost_address" in change:
        setup.sections["smarthost"]["address"] = change.pop("_smarthost_address")
    signing = change.pop("signing", None)
    for table, values in change.items():
        for key, value in values.items():  # type: ignore[attr-defined]
            if value is None:
                setup.sections[table].pop(key, None)
            else:
                setup.sections[table][key] = value
    path = setup.write()
    if signing is not None:
        text = (
            Path(path)
            .read_text()
            .replace(f'selector = "{setup.selector}"', 'selector = "bad selector!"')
        )
        Path(path).write_text(text)
    done = run_dkproxy("relay", "-c", path)
    assert done.returncode == 1
    assert f"{path}: {named}" in done.stderr, done.stderr
    assert "secret" not in done.stderr


def test_check_config_describes_the_relay(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    path = setup.write()
    done = run_dkproxy("check-config", path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"{path}: relay configuration" in out
    assert f"listen  127.0.0.1:{setup.port} (STARTTLS required before MAIL and AUTH)" in out
    assert f"listen  127.0.0.1:{setup.tls_port} (implicit TLS)" in out
    assert "AUTH PLAIN LOGIN after TLS: 2 logins" in out
    assert "sender-login map" in out and "2 entries" in out
    assert (
        f"smarthost  {smarthost.address} (starttls TLS, certificate: {setup.smarthost_ca})" in out
    )
    assert f"smarthost login  {SMARTHOST_LOGIN[0]} (password from file)" in out
    assert "rule example.org" in out and "configuration ok" in out
    assert SMARTHOST_LOGIN[1] not in out


# -- secrets stay secret ------------------------------------------------------------------------


def test_no_password_in_the_log_at_debug_level(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    """Good and bad logins with PLAIN and LOGIN, a password typed as a login name, and the
    smarthost login: neither the passwords nor their base64 forms reach the debug log."""
    typed_as_login = "my-secret-typed-into-the-user-field"
    with setup.process() as relay:
        for login, password, mechanism in (
            ("webapp", PASSWORDS["webapp"], "PLAIN"),
            ("webapp", PASSWORDS["webapp"], "LOGIN"),
            ("webapp", "wrong-password-one", "PLAIN"),
            ("printer", "wrong-password-two", "LOGIN"),
            (typed_as_login, "whatever-three", "PLAIN"),
        ):
            swaks(relay.port, data=message(), auth=(login, password), mechanism=mechanism)
        log = relay.log
    assert len(smarthost.arrivals) == 2
    assert " DEBUG " in log  # the log level really was debug
    secrets = [PASSWORDS["webapp"], "wrong-password-one", "wrong-password-two", "whatever-three",
               typed_as_login, SMARTHOST_LOGIN[1]]  # fmt: skip
    for secret in secrets:
        assert secret not in log
        assert base64.b64encode(secret.encode()).decode()[:12] not in log
    assert _plain("webapp", PASSWORDS["webapp"])[:20] not in log


# -- limits ------------------------------------------------------------------------------------


def _authenticated(port: int, ca: str, login: str = "webapp") -> smtplib.SMTP:
    client = _client(port, ca)
    client.login(login, PASSWORDS[login])
    return client


def test_size_is_advertised_and_enforced(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    setup.sections["limits"] = {"max_message_size": 4000}
    with setup.process() as relay:
        client = _authenticated(relay.port, setup.relay_cert.ca)
        assert client.esmtp_features["size"] == "4000"
        code, text = client.docmd("MAIL", "FROM:<alice@example.org> SIZE=4001")
        assert code == 552, text
        code, _ = client.docmd("MAIL", "FROM:<alice@example.org> SIZE=3000")
        assert code == 250
        client.docmd("RSET")
        big = message(extra="X-Padding: " + "x" * 900 + "\r\n") + b"filler line\r\n" * 400
        # Undeclared size: the message is read to its end, then refused.
        client.docmd("MAIL", "FROM:<alice@example.org>")
        client.docmd("RCPT", "TO:<bob@example.net>")
        code, text = client.data(big)
        assert code == 552, text
        client.sendmail("alice@example.org", ["bob@example.net"], message(subject="small"))
        client.quit()
        status, transcript = swaks(relay.port, data=big, auth=("webapp", PASSWORDS["webapp"]))
        assert status != 0 and "552 5.3.4" in transcript
    assert len(smarthost.arrivals) == 1


def test_recipients_per_message_are_limited(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    setup.sections["limits"] = {"max_recipients": 2}
    with setup.process() as relay:
        client = _authenticated(relay.port, setup.relay_cert.ca)
        client.docmd("MAIL", "FROM:<alice@example.org>")
        replies = [client.docmd("RCPT", f"TO:<r{n}@example.net>")[0] for n in range(4)]
        assert replies == [250, 250, 452, 452]
        code, _ = client.data(message())
        assert code == 250
        client.quit()
    [arrival] = smarthost.arrivals
    assert arrival.rcpt_tos == ["r0@example.net", "r1@example.net"]


def test_concurrent_sessions_beyond_the_limit_get_421(
    setup: RelaySetup, smarthost: SmtpSmarthost
) -> None:
    setup.sections["limits"] = {"max_sessions": 2}
    with setup.process() as relay:
        first = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        second = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        assert refused.value.smtp_code == 421
        first.quit()
        deadline = time.monotonic() + 10
        while True:  # the session count drops once the first session has ended
            try:
                third = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
                break
            except smtplib.SMTPConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        third.quit()
        second.quit()
    assert "too many sessions" in relay.log


def test_connection_rate_per_client_is_limited(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    setup.sections["limits"] = {"max_connections_per_minute": 3}
    with setup.process() as relay:
        for _ in range(3):
            smtplib.SMTP("127.0.0.1", relay.port, timeout=30).quit()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        assert refused.value.smtp_code == 421
        assert b"too many connections from 127.0.0.1" in refused.value.smtp_error


# -- reload ------------------------------------------------------------------------------------


def test_sighup_reloads_certificate_and_credentials(
    tmp_path: Path,
    setup: RelaySetup,
    smarthost: SmtpSmarthost,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
) -> None:
    """A renewed certificate and a login added with `dkproxy passwd` take effect on SIGHUP;
    a broken certificate on a later reload is logged and the running one kept."""
    passwd = tmp_path / "relay.passwd"
    passwd.write_bytes(Path(credentials["passwd"]).read_bytes())
    cert_file, key_file = tmp_path / "relay.pem", tmp_path / "relay.key"
    cert_file.write_bytes(Path(certs["relay"].certificate).read_bytes())
    key_file.write_bytes(Path(certs["relay"].key).read_bytes())
    setup.sections["listen"].update(certificate=str(cert_file), key=str(key_file))
    setup.sections["auth"]["credentials"] = str(passwd)
    renewed = make_certificates(str(tmp_path), "renewed")
    with setup.process() as relay:
        before = certificate_serial("127.0.0.1", setup.tls_port)
        add_login(str(passwd), "newapp", "a brand new app password")
        client = _client(relay.port, setup.relay_cert.ca)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("newapp", "a brand new app password")
        client.close()
        cert_file.write_bytes(Path(renewed.certificate).read_bytes())
        key_file.write_bytes(Path(renewed.key).read_bytes())
        relay.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "configuration reloaded" not in relay.log:
            assert time.monotonic() < deadline, relay.log
            time.sleep(0.1)
        after = certificate_serial("127.0.0.1", setup.tls_port)
        assert after != before
        client = _client(relay.port, renewed.ca)
        client.login("newapp", "a brand new app password")
        client.quit()
        key_file.write_bytes(Path(certs["rogue"].key).read_bytes())  # does not match the cert
        relay.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload failed" not in relay.log:
            assert time.monotonic() < deadline, relay.log
            time.sleep(0.1)
        assert certificate_serial("127.0.0.1", setup.tls_port) == after
    assert "listen.certificate: cannot load certificate" in relay.log


# -- the credentials file and `dkproxy passwd` ---------------------------------------------------


def test_passwd_adds_changes_and_deletes_logins(tmp_path: Path) -> None:
    from dkproxy.relay.credentials import Credentials

    path = str(tmp_path / "relay.passwd")
    add_login(path, "webapp", "first password here")
    assert os.stat(path).st_mode & 0o777 == 0o600
    line = Path(path).read_text().strip()
    assert line.startswith("webapp:$argon2id$") and "first password" not in line
    add_login(path, "printer", "a bcrypt password", "--bcrypt")
    add_login(path, "webapp", "second password here")
    text = Path(path).read_text()
    assert text.count("webapp:") == 1 and "printer:$2b$12$" in text
    creds = Credentials.load(path)
    assert creds.verify("webapp", "second password here")
    assert not creds.verify("webapp", "first password here")
    assert creds.verify("printer", "a bcrypt password")
    assert not creds.verify("nobody", "a bcrypt password")
    done = run_dkproxy("passwd", "--delete", path, "printer")
    assert done.returncode == 0 and "printer" not in Path(path).read_text()
    short = run_dkproxy("passwd", "--stdin", path, "webapp", input=b"short\n")
    assert short.returncode == 1 and "at least 12" in short.stderr
    bad_login = run_dkproxy("passwd", "--stdin", path, "we:bapp", input=b"long enough password\n")
    assert bad_login.returncode == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("webapp:correct horse battery staple", "not an argon2id or bcrypt hash"),
        ("webapp:$argon2i$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA", "not an argon2id"),
        ("webapp:{PLAIN}secret", "plaintext passwords are refused"),
        ("no separator here", "expected LOGIN:HASH"),
    ],
)
def test_credentials_file_refuses_what_is_not_a_hash(
    tmp_path: Path, line: str, message: str
) -> None:
    from dkproxy.config import ConfigError
    from dkproxy.relay.credentials import Credentials

    path = tmp_path / "relay.passwd"
    path.write_text(f"# logins\n{line}\n")
    with pytest.raises(ConfigError) as error:
        Credentials.load(str(path))
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)
    assert "secret" not in str(error.value) and "staple" not in str(error.value)


def test_sender_login_map_lookup(tmp_path: Path) -> None:
    from dkproxy.config import ConfigError
    from dkproxy.relay.credentials import SenderLoginMap

    path = tmp_path / "map"
    path.write_text(
        "alice@example.org  alice, webapp\n@example.org webapp\n@Example.COM\tmon ops\n"
    )
    table = SenderLoginMap.load(str(path))
    assert table.permits("alice", "Alice@Example.org")
    assert table.permits("alice", "alice+news@example.org")  # +extension falls back
    assert not table.permits("alice", "bob@example.org")  # address entry, not the domain
    assert table.permits("webapp", "bob@example.org")
    assert table.permits("ops", "x@example.com")
    assert not table.permits("webapp", "x@sub.example.org")  # no implicit subdomains
    assert not table.permits("webapp", "")
    path.write_text("example.org webapp\n")
    with pytest.raises(ConfigError, match=r":1: 'example.org': expected an address or @domain"):
        SenderLoginMap.load(str(path))


def test_shipped_example_configuration_loads(
    tmp_path: Path, certs: dict[str, CertFiles], key_dir: KeySet
) -> None:
    """conf/dkproxy-relay.toml.example, with /etc/dkproxy/ pointed at files made here, is
    accepted by check-config (the README's example is a subset of it)."""
    root = Path(__file__).resolve().parent.parent
    etc = tmp_path / "etc"
    (etc / "keys").mkdir(parents=True)
    text = (root / "conf" / "dkproxy-relay.toml.example").read_text()
    text = text.replace("/etc/dkproxy/", f"{etc}/")
    (etc / "relay.example.org.pem").write_bytes(Path(certs["relay"].certificate).read_bytes())
    (etc / "relay.example.org.key").write_bytes(Path(certs["relay"].key).read_bytes())
    add_login(str(etc / "relay.passwd"), "webapp", PASSWORDS["webapp"])
    (etc / "sender_logins").write_text("@example.org  webapp\n")
    password = etc / "smarthost.password"
    password.write_text("provider password\n")
    password.chmod(0o600)
    (etc / "keys" / "example.org.s202611.key").write_bytes(Path(key_dir.rsa2048.path).read_bytes())
    path = etc / "dkproxy-relay.toml"
    path.write_text(text)
    done = run_dkproxy("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert "listen  0.0.0.0:587 (STARTTLS required before MAIL and AUTH)" in done.stdout
    assert "smarthost  smtp.provider.example:465 (implicit TLS" in done.stdout
    readme = (root / "README.md").read_text()
    section = readme.split("## Running as a relay for applications", 1)[1].split("\n## ", 1)[0]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    keys = {line.split("=")[0].strip() for line in example.splitlines() if " = " in line}
    shipped = {
        line.split("=")[0].strip().lstrip("# ") for line in text.splitlines() if " = " in line
    }
    assert keys <= shipped, keys - shipped


def test_local_relay_without_auth_to_a_loopback_smarthost(
    tmp_path: Path,
    certs: dict[str, CertFiles],
    credentials: dict[str, str],
    key_dir: KeySet,
    smtp_sink: Callable[..., SmtpSink],
    signing_dns: DNSServer,
) -> None:
    """The smallest set-up: programs on this host submit to a loopback listener without TLS
    or AUTH; the smarthost is Postfix on loopback without TLS (tls = "none")."""
    sink = smtp_sink()
    setup = make_setup(tmp_path, certs, credentials, key_dir, sink.address)
    setup.sections["listen"] = {"addresses": [f"127.0.0.1:{setup.port}"]}
    del setup.sections["auth"]
    setup.sections["smarthost"] = {"address": sink.address, "tls": "none"}
    data = message(subject="local program")
    with setup.process() as relay:
        status, transcript = swaks(relay.port, tls=None, data=data)
        assert status == 0, transcript + relay.log
    [arrival] = sink.wait_for(1)
    fields, rest = our_fields_and_rest(arrival.data)
    assert rest == data + b"\r\n"
    received = fields[-1].decode()
    assert "with ESMTP id" in received and "using" not in received
    results = verify_mail_dkim(arrival.data, signing_dns)
    assert {r.result for r in results} == {"pass"}


def test_client_guard_windows_slide() -> None:
    """Counts are per client address and forgotten once their window has passed."""
    from dkproxy.relay.guard import ClientGuard

    now = [1000.0]
    guard = ClientGuard(
        max_sessions=3, max_connections_per_minute=2, max_auth_failures=2,
        failure_window=600, failure_delay=1.5, clock=lambda: now[0],
    )  # fmt: skip
    assert guard.admit("192.0.2.1") is None and guard.admit("192.0.2.1") is None
    assert "too many connections from 192.0.2.1" in str(guard.admit("192.0.2.1"))
    assert guard.admit("192.0.2.2") is None  # another client has its own count
    assert "too many sessions" in str(guard.admit("192.0.2.3"))
    guard.release()
    now[0] += 61
    assert guard.admit("192.0.2.1") is None  # the minute has passed
    assert guard.auth_failed("198.51.100.7") == 1.5
    assert guard.auth_failed("198.51.100.7") == 3.0  # longer with each recent failure
    assert guard.locked_out("198.51.100.7") and not guard.locked_out("198.51.100.8")
    for _ in range(3):
        guard.release()
    assert "authentication failures" in str(guard.admit("198.51.100.7"))
    now[0] += 601
    assert not guard.locked_out("198.51.100.7")
    guard.auth_failed("198.51.100.9")
    guard.auth_succeeded("198.51.100.9")
    assert guard.auth_failed("198.51.100.9") == 1.5  # a success starts the count again


def test_malformed_auth_exchanges_are_refused(setup: RelaySetup, smarthost: SmtpSmarthost) -> None:
    """Each way an AUTH exchange can go wrong gets its own answer and authenticates nobody."""
    with setup.process() as relay:
        client = _client(relay.port, setup.relay_cert.ca)
        assert client.docmd("AUTH", "PLAIN not-base64!")[0] == 501
        assert (
            client.docmd("AUTH", "PLAIN " + base64.b64encode(b"no separators").decode())[0] == 501
        )
        other = base64.b64encode(f"printer\0webapp\0{PASSWORDS['webapp']}".encode()).decode()
        assert client.docmd("AUTH", "PLAIN " + other)[0] == 535  # acting for another login
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 504  # not offered
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd("*")[0] == 501  # the client gives up (RFC 4954 4)
        assert client.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530
        code, _ = client.docmd("AUTH", "PLAIN " + _plain("webapp", PASSWORDS["webapp"]))
        assert code == 235
        assert client.docmd("AUTH", "PLAIN " + _plain("webapp", PASSWORDS["webapp"]))[0] == 503
        client.quit()
