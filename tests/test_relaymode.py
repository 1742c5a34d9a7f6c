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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess, run_dkproxy
from tests.support.relayhelp import (
    PASSWORDS,
    SMARTHOST_LOGIN,
    RelaySetup,
    add_login,
    message,
    swaks,
)
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
