"""The relay configuration file (`dkproxy relay -c relay.toml`), one TOML table per concern.

Validated with pydantic like the `dkproxy out` TOML file: an unknown key, a wrong type or an
unusable value is a ConfigError naming the file and the key (`relay.toml: smarthost.tls: ...`).
The `[signing]` table takes the signing keys of the `dkproxy out` TOML file (sender_map,
listid_map, min_rsa_bits, reject_error, [signing.defaults], [[signing.sign]]) and is turned
into the same OutboundConfig, so the relay signs with the same policy code as `dkproxy out`.

Safety rules checked here, before anything listens (conf/dkproxy-relay.toml.example shows all
keys):
* no open relay: a listener on a non-loopback address needs AUTH or an allow list;
* AUTH only over TLS (RFC 4954 4, RFC 8314): credentials need a certificate;
* the smarthost hop is TLS with verification unless `tls_verify = false` is written out,
  and plaintext only to a loopback smarthost;
* the smarthost password file must be 0600 (or stricter) and is never logged.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dkproxy import config as base
from dkproxy.config import ConfigError, HostPort, OutboundConfig

DEFAULT_SUBMISSION_PORT = 587
#: Keys of the `dkproxy out` TOML file that make sense under [signing].
SIGNING_KEYS = ("sender_map", "listid_map", "min_rsa_bits", "reject_error", "defaults", "sign")


class _Listen(BaseModel):
    model_config = ConfigDict(extra="forbid")

    addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1:587"])
    tls_addresses: list[str] = Field(default_factory=list)
    certificate: str | None = None
    key: str | None = None
    require_tls: bool | None = None


class _Auth(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credentials: str | None = None
    sender_login_map: str | None = None
    any_sender: bool = False
    failure_delay: float = Field(1.0, ge=0, le=60)
    max_failures: int = Field(5, ge=1)
    failure_window: float = Field(600.0, gt=0)


class _Clients(BaseModel):
    model_config = ConfigDict(extra="forbid")

    relay_without_auth: list[str] = Field(default_factory=list)

    @field_validator("relay_without_auth")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an address or network") from None
            if network.prefixlen == 0:
                raise ValueError(f"{value!r} lets every client relay: that is an open relay")
        return values


class _Smarthost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    tls_verify: bool = True
    ca_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    connect_timeout: float = Field(30.0, gt=0)
    timeout: float = Field(300.0, gt=0)


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_message_size: Any = 25 * base.MIB
    max_recipients: int = Field(100, ge=1)
    max_sessions: int = Field(100, ge=1)
    max_connections_per_minute: int = Field(60, ge=0)
    command_timeout: float = Field(300.0, gt=0)

    @field_validator("max_message_size")
    @classmethod
    def _size(cls, value: Any) -> int:
        return base.parse_size(value)


class _Daemon(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = None
    group: str | None = None
    pidfile: str | None = None
    daemonize: bool = False


class _RelayFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["relay"] = "relay"
    hostname: str | None = None
    listen: _Listen = Field(default_factory=_Listen)
    auth: _Auth = Field(default_factory=_Auth)
    clients: _Clients = Field(default_factory=_Clients)
    smarthost: _Smarthost
    limits: _Limits = Field(default_factory=_Limits)
    signing: dict[str, Any] = Field(default_factory=dict)
    daemon: _Daemon = Field(default_factory=_Daemon)
    log: base.TomlLog = Field(default_factory=base.TomlLog)


@dataclass(frozen=True)
class SmarthostConfig:
    """Where signed mail goes and how: address, TLS mode and trust, login, timeouts (s)."""

    address: HostPort
    tls: Literal["starttls", "implicit", "none"]
    tls_verify: bool
    ca_file: str | None
    username: str | None
    #: Read from the 0600 password file; never logged (repr hides it).
    password: str | None = field(repr=False)
    connect_timeout: float
    timeout: float


@dataclass(frozen=True)
class RelayConfig:
    """The validated relay configuration (file names absolute, sizes in bytes)."""

    path: str
    hostname: str | None
    listen: list[HostPort]
    tls_listen: list[HostPort]
    certificate: str | None
    key: str | None
    require_tls: bool
    credentials: str | None
    sender_login_map: str | None
    any_sender: bool
    failure_delay: float
    max_auth_failures: int
    failure_window: float
    relay_without_auth: list[str]
    smarthost: SmarthostConfig
    max_message_size: int
    max_recipients: int
    max_sessions: int
    max_connections_per_minute: int
    command_timeout: float
    signing: OutboundConfig
    user: str | None
    group: str | None
    pidfile: str | None
    daemonize: bool
    log_level: str
    syslog: bool
    syslog_facility: str
    syslog_ident: str | None
    log_file: str | None
    #: Said at start (WARNING) and by check-config: choices that weaken the set-up.
    warnings: list[str]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost (no DNS look-up)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def looks_like_relay_file(path: str) -> bool:
    """A TOML file whose `mode` is "relay" (for check-config); False when unreadable."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle).get("mode") == "relay"
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return False


def read_password_file(path: str, where: str) -> str:
    """The password in `path` (first line, line end removed).

    Raises ConfigError at `where` ("FILE: key") when the file is missing, readable by group
    or others (it must be 0600 or stricter, as ssh insists for its keys), or empty.
    """
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(4096)
    except OSError as exc:
        raise ConfigError.at(where, f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError.at(
            where,
            f"{path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); chmod 600 it",
        )
    password = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not password:
        raise ConfigError.at(where, f"{path} is empty")
    return password


def load_relay_config(path: str) -> RelayConfig:
    """Read and check `path`; ConfigError naming the file and key on any problem.

    Loads nothing from the network; reads the password file, checks that the certificate,
    key and credential files exist, and validates the [signing] table as `dkproxy out`
    would (key files and maps are loaded later by the signer, with the same errors).
    """
    text = base.read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"TOML syntax error: {exc}") from None
    if raw.get("mode") != "relay":
        raise ConfigError(path, None, 'mode: a relay configuration starts with mode = "relay"')
    try:
        doc = _RelayFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, None, base.format_validation_error(exc, _RelayFile)) from None
    folder = os.path.dirname(os.path.abspath(path))

    def rel(value: str | None) -> str | None:
        if value is None:
            return None
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))

    def where(key: str) -> str:
        return f"{path}: {key}"

    def addresses(values: list[str], key: str) -> list[HostPort]:
        result = []
        for value in values:
            try:
                result.append(HostPort.parse(value, DEFAULT_SUBMISSION_PORT))
            except ValueError as exc:
                raise ConfigError(path, None, f"{key}: {exc}") from None
        return result

    warnings: list[str] = []
    listen = doc.listen
    plain, implicit = addresses(listen.addresses, "listen.addresses"), []
    implicit = addresses(listen.tls_addresses, "listen.tls_addresses")
    if not plain and not implicit:
        raise ConfigError(path, None, "listen: give addresses or tls_addresses")
    certificate, key = rel(listen.certificate), rel(listen.key)
    if (certificate is None) != (key is None):
        missing = "listen.key" if key is None else "listen.certificate"
        raise ConfigError(path, None, f"{missing}: needed with the other (certificate and key)")
    for name, value in (("listen.certificate", certificate), ("listen.key", key)):
        if value is not None and not os.access(value, os.R_OK):
            raise ConfigError(path, None, f"{name}: cannot read {value}")
    if implicit and certificate is None:
        raise ConfigError(path, None, "listen.tls_addresses: implicit TLS needs listen.certificate")
    require_tls = listen.require_tls if listen.require_tls is not None else certificate is not None
    if require_tls and certificate is None:
        raise ConfigError(path, None, "listen.require_tls: needs listen.certificate and key")

    auth = doc.auth
    credentials = rel(auth.credentials)
    login_map = rel(auth.sender_login_map)
    if credentials is not None:
        if certificate is None:
            raise ConfigError(
                path, None, "auth.credentials: AUTH is only offered over TLS; set "
                "listen.certificate and listen.key")  # fmt: skip
        if not os.access(credentials, os.R_OK):
            raise ConfigError(path, None, f"auth.credentials: cannot read {credentials}")
        if login_map is None and not auth.any_sender:
            raise ConfigError(
                path,
                None,
                "auth.sender_login_map: missing; it says which senders each login may use "
                "(auth.any_sender = true lets every login send as anyone)",
            )
        if login_map is None:
            warnings.append(
                f"{where('auth.any_sender')}: every authenticated login may send as any address"
            )
    elif login_map is not None:
        raise ConfigError(path, None, "auth.sender_login_map: needs auth.credentials")

    # No open relay (issue 12): a client on the network must prove who it is or come from
    # an allowed network; only loopback listeners may take mail from anyone who connects.
    if credentials is None and not doc.clients.relay_without_auth:
        for key_name, group in (("listen.addresses", plain), ("listen.tls_addresses", implicit)):
            for address in group:
                if not is_loopback(address.host):
                    raise ConfigError(
                        path,
                        None,
                        f"{key_name}: {address} is not a loopback address and neither "
                        "auth.credentials nor clients.relay_without_auth restricts who may "
                        "relay: refusing to run as an open relay",
                    )

    hop = doc.smarthost
    try:
        hop_address = HostPort.parse(hop.address, 465 if hop.tls == "implicit" else 587)
    except ValueError as exc:
        raise ConfigError(path, None, f"smarthost.address: {exc}") from None
    if hop.tls == "none" and not is_loopback(hop_address.host):
        raise ConfigError(
            path, None, f"smarthost.tls: 'none' is only allowed for a loopback smarthost, not "
            f"{hop_address.host}; use 'starttls' or 'implicit'")  # fmt: skip
    ca_file = rel(hop.ca_file)
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigError(path, None, f"smarthost.ca_file: cannot read {ca_file}")
    if not hop.tls_verify and hop.tls != "none":
        warnings.append(
            f"{where('smarthost.tls_verify')}: false: the smarthost's certificate is NOT "
            "verified; anyone on the path can read the mail and the smarthost password"
        )
    if (hop.username is None) != (hop.password_file is None):
        missing = "smarthost.password_file" if hop.username else "smarthost.username"
        raise ConfigError(path, None, f"{missing}: needed with the other (username, password)")
    password = None
    if hop.password_file is not None:
        password = read_password_file(str(rel(hop.password_file)), where("smarthost.password_file"))

    signing = _signing_config(path, doc.signing)
    log = doc.log
    return RelayConfig(
        path=path,
        hostname=doc.hostname,
        listen=plain,
        tls_listen=implicit,
        certificate=certificate,
        key=key,
        require_tls=require_tls,
        credentials=credentials,
        sender_login_map=login_map,
        any_sender=auth.any_sender,
        failure_delay=auth.failure_delay,
        max_auth_failures=auth.max_failures,
        failure_window=auth.failure_window,
        relay_without_auth=list(doc.clients.relay_without_auth),
        smarthost=SmarthostConfig(
            address=hop_address,
            tls=hop.tls,
            tls_verify=hop.tls_verify,
            ca_file=ca_file,
            username=hop.username,
            password=password,
            connect_timeout=hop.connect_timeout,
            timeout=hop.timeout,
        ),
        max_message_size=doc.limits.max_message_size,
        max_recipients=doc.limits.max_recipients,
        max_sessions=doc.limits.max_sessions,
        max_connections_per_minute=doc.limits.max_connections_per_minute,
        command_timeout=doc.limits.command_timeout,
        signing=signing,
        user=doc.daemon.user,
        group=doc.daemon.group,
        pidfile=rel(doc.daemon.pidfile),
        daemonize=doc.daemon.daemonize,
        log_level=base.parse_log_level(log.level) if log.level is not None else "info",
        syslog=bool(log.syslog),
        syslog_facility=log.facility or "mail",
        syslog_ident=log.ident,
        log_file=rel(log.file),
        warnings=warnings + list(signing.warnings),
    )


def _signing_config(path: str, table: dict[str, Any]) -> OutboundConfig:
    """[signing] as the OutboundConfig `dkproxy out` builds from its own TOML file.

    The table goes through the out file's own schema and converter, so keys, defaults and
    errors are the same; locations read "relay.toml: signing: sign[0]...".
    """
    for name in table:
        if name not in SIGNING_KEYS:
            raise ConfigError(
                path, None, f"signing.{name}: unknown key (allowed: {', '.join(SIGNING_KEYS)})"
            )
    try:
        doc = base.TomlOut.model_validate({**table, "mode": "out"})
    except ValidationError as exc:
        message = base.format_validation_error(exc, base.TomlOut)
        raise ConfigError(path, None, f"signing.{message}") from None
    # The converter resolves relative file names against the directory of the name it is
    # given and puts that name in every location; ": signing" names the table in both.
    label = f"{path}: signing"
    values = base.toml_values(label, doc)
    return base.build_config("out", values, [label])  # type: ignore[return-value]
