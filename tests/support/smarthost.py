"""Test certificates (made with `cryptography`) and a TLS + AUTH smarthost built on aiosmtpd.

The smarthost records what arrives: each AUTH attempt (mechanism, login, password) and each
message (envelope and bytes). It can require AUTH, refuse every login, or answer MAIL/DATA
with a given reply, to exercise the relay's proxy semantics.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .tools import free_port


@dataclass(frozen=True)
class CertFiles:
    """PEM files: the certificate (chain) and its key, and the CA that issued it."""

    certificate: str
    key: str
    ca: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_certificates(directory: str, name: str, hosts: tuple[str, ...] = ("localhost",
                      "127.0.0.1")) -> CertFiles:  # fmt: skip
    """A CA and a server certificate it signed for `hosts` (DNS names and IP addresses),
    written as DIR/NAME-ca.pem, DIR/NAME.pem and DIR/NAME.key."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} test CA"))
        .issuer_name(_name(f"{name} test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(
        certificate=os.path.join(directory, f"{name}.pem"),
        key=os.path.join(directory, f"{name}.key"),
        ca=os.path.join(directory, f"{name}-ca.pem"),
    )
    with open(files.certificate, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(files.ca, "wb") as handle:
        handle.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.key, key)
    return files


def certificate_serial(host: str, port: int) -> int:
    """The serial number of the certificate an implicit-TLS server on host:port presents."""
    pem = ssl.get_server_certificate((host, port))
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


@dataclass
class Arrival:
    """A message as the smarthost received it."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    data: bytes
    login: str | None
    tls: bool


@dataclass
class _Behaviour:
    accept_logins: dict[str, str] = field(default_factory=dict)
    refuse_all_logins: bool = False
    mail_reply: str | None = None
    data_reply: str | None = None


class _Handler:
    def __init__(self, owner: SmtpSmarthost) -> None:
        self.owner = owner

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        if self.owner.behaviour.mail_reply:
            return self.owner.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.owner.behaviour.data_reply:
            return self.owner.behaviour.data_reply
        login = session.auth_data.login.decode() if session.authenticated else None
        arrival = Arrival(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            data=bytes(envelope.original_content or b""),
            login=login,
            tls=session.ssl is not None or self.owner.implicit_tls,
        )
        with self.owner.lock:
            self.owner.arrivals.append(arrival)
        return "250 2.0.0 Ok: queued as SMARTHOST"


class SmtpSmarthost:
    """aiosmtpd on 127.0.0.1 with STARTTLS or implicit TLS and AUTH PLAIN/LOGIN.

    `logins` are the accepted login/password pairs; every AUTH attempt is recorded in
    `auth_attempts` as (mechanism, login, password), so a test can see what the relay sent.
    """

    def __init__(
        self,
        cert: CertFiles,
        *,
        implicit_tls: bool = False,
        logins: dict[str, str] | None = None,
        require_auth: bool = True,
    ) -> None:
        self.cert = cert
        self.implicit_tls = implicit_tls
        self.port = free_port()
        self.behaviour = _Behaviour(accept_logins=dict(logins or {}))
        self.arrivals: list[Arrival] = []
        self.auth_attempts: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert.certificate, cert.key)
        kwargs: dict[str, Any] = {
            "authenticator": self._authenticate,
            "auth_required": require_auth,
            "auth_require_tls": True,
        }
        if implicit_tls:
            # The socket is TLS from the start; aiosmtpd only knows about STARTTLS.
            kwargs["auth_require_tls"] = False
        else:
            kwargs["tls_context"] = context
            kwargs["require_starttls"] = True
        self.controller = Controller(
            _Handler(self),
            hostname="127.0.0.1",
            port=self.port,
            ssl_context=context if implicit_tls else None,
            server_hostname="localhost",
            **kwargs,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        with self.lock:
            self.auth_attempts.append((mechanism, login, password))
        ok = (
            not self.behaviour.refuse_all_logins
            and self.behaviour.accept_logins.get(login) == password
        )
        return AuthResult(success=ok, handled=False, auth_data=data)

    def refuse_logins(self) -> None:
        self.behaviour.refuse_all_logins = True

    def answer_mail(self, reply: str | None) -> None:
        self.behaviour.mail_reply = reply

    def answer_data(self, reply: str | None) -> None:
        self.behaviour.data_reply = reply

    def start(self) -> SmtpSmarthost:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SmtpSmarthost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
