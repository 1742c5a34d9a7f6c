"""The validated configuration models (pydantic): OutboundConfig, InboundConfig and their parts."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dkproxy.config.values import (
    ACTION_RESULTS,
    DEFAULT_MAX_MESSAGE_SIZE,
    HOSTNAME_RE,
    Action,
    parse_log_level,
)

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class HostPort(BaseModel):
    """An address to listen on or connect to; parses "127.0.0.1:25", "[::1]:25", "mx:25"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(ge=0, le=65535)

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> HostPort:
        """Parse HOST:PORT; raise ValueError with a message fit for an operator."""
        text = text.strip()
        if not text:
            raise ValueError("empty address")
        port_text: str | None
        if text.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
            if not match:
                raise ValueError(f"bad address {text!r}; expected [IPv6]:PORT")
            host, port_text = match.group(1), match.group(2)
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
        elif text.count(":") > 1:
            raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:25, not {text!r}")
        else:
            host, colon, port_text = text.partition(":")
            if not colon:
                port_text = None
            if host.isdigit() and port_text is None:
                raise ValueError(f"{text!r} has no host; expected HOST:PORT, e.g. 127.0.0.1:{host}")
        if host in ("*", ""):
            host = "0.0.0.0"
        elif not _is_host(host):
            raise ValueError(f"{host!r} is not a valid host name or address")
        if port_text is None or port_text == "":
            if default_port is None:
                raise ValueError(f"{text!r} has no port; expected HOST:PORT")
            return cls(host=host, port=default_port)
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"bad port {port_text!r} in {text!r}")
        return cls(host=host, port=int(port_text))

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            parsed = cls.parse(data)
            return {"host": parsed.host, "port": parsed.port}
        return data

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


#: Port of the metrics endpoint when only an address is given.
DEFAULT_METRICS_PORT = 9120


def parse_metrics_address(text: str) -> HostPort:
    """The metrics endpoint: HOST:PORT, HOST (port 9120) or a bare PORT on 127.0.0.1, so that
    metrics stay on loopback unless an address says otherwise; ValueError when malformed."""
    text = text.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return HostPort.parse(text, DEFAULT_METRICS_PORT)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and HOSTNAME_RE.fullmatch(host) is not None


class SignatureTemplate(BaseModel):
    """One signature as configured; unset fields come from the global defaults later.

    `domain`/`identity` may hold DKIMproxy macros ($senderdomain, $sender, $key, $keydomain);
    they are filled per message by dkproxy.policy.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["dkim", "domainkeys", "arc"] = "dkim"
    canonicalization: str | None = None
    algorithm: str | None = None
    key: str | None = None
    selector: str | None = None
    domain: str | None = None
    identity: str | None = None
    headers: list[str] | None = None
    #: arc only: whose Authentication-Results the ARC set seals (RFC 8617 5.1).
    authserv_id: str | None = None
    source: str = ""

    def describe(self) -> str:
        """DKIMproxy specifier syntax, e.g. "dkim(c=relaxed,s=sel)"."""
        opts = [
            f"{name}={value}"
            for name, value in (
                ("c", self.canonicalization),
                ("a", self.algorithm),
                ("key", self.key),
                ("s", self.selector),
                ("d", self.domain),
                ("i", self.identity),
                ("h", ":".join(self.headers) if self.headers is not None else None),
                ("authserv_id", self.authserv_id),
            )
            if value is not None
        ]
        return f"{self.kind}({','.join(opts)})" if opts else self.kind


class SignRule(BaseModel):
    """A native-TOML signing rule: one match pattern and the signatures to add.

    Patterns: "user@example.org", "example.org" (the domain and all its subdomains, as in
    DKIMproxy's sender_map), ".example.org" (subdomains only), "*" (every sender),
    "list-id:lists.example.org" (List-Id equal to it or ending in ".lists.example.org"),
    "list-id:*" (any List-Id). An empty signature list means "matched: do not sign".
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str
    signatures: list[SignatureTemplate]
    source: str


class ArcSealConfig(BaseModel):
    """`[arc_seal]`: the ARC set dkproxy adds to every message it passes on (RFC 8617 5.1).

    `authserv_id` names the Authentication-Results to seal; in `dkproxy in` it defaults to
    the results of dkproxy's own pass (`hostname`), `dkproxy out` needs it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str
    selector: str
    key: str
    authserv_id: str | None = None
    headers: list[str] | None = None
    source: str = ""


class CommonConfig(BaseModel):
    """Options shared by both directions: SMTP plumbing, daemon and logging."""

    model_config = ConfigDict(extra="forbid")

    reject_error: bool = False
    arc_seal: ArcSealConfig | None = None
    relay_timeout: float = Field(300.0, gt=0)
    max_message_size: int = Field(DEFAULT_MAX_MESSAGE_SIZE, ge=0)  # 0 = unlimited
    workers: int | None = Field(None, ge=1)
    #: Prometheus endpoint (dkproxy.metrics); None: no metrics.
    metrics: HostPort | None = None
    # Limits on what one client may make a worker do (README "Security notes"); each default
    # is far above what real mail needs and far below what hurts a worker.
    max_recipients: int = Field(1000, ge=1)  # per message; 452 past it (Postfix's default)
    max_messages_per_session: int = Field(1000, ge=1)  # 421 and close past it
    max_sessions: int = Field(500, ge=1)  # concurrent sessions per worker; 421 past it
    max_command_line: int = Field(4096, ge=512)  # octets; RFC 5321 4.5.3.1.4 allows 512
    max_header_size: int = Field(1 << 20, ge=1024)  # octets of the header block; 552 past it
    max_header_fields: int = Field(1000, ge=1)  # fields in the header block; 552 past it
    command_timeout: float = Field(300.0, gt=0)  # seconds idle waiting for a command line
    data_timeout: float = Field(300.0, gt=0)  # seconds without a byte during DATA

    # Daemon options (DKIMproxy/Net::Server names); stored for the daemon code.
    user: str | None = None
    group: str | None = None
    pidfile: str | None = None
    daemonize: bool = False
    chroot: str | None = None
    min_servers: int | None = Field(None, ge=0)
    max_servers: int | None = Field(None, ge=1)
    min_spare_servers: int | None = Field(None, ge=0)
    max_spare_servers: int | None = Field(None, ge=0)
    max_requests: int | None = Field(None, ge=0)
    #: Net::Server client access lists. The server must enforce these or refuse to start:
    #: a DKIMproxy set-up may rely on them to keep strangers off the signing port.
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    cidr_allow: list[str] = Field(default_factory=list)
    cidr_deny: list[str] = Field(default_factory=list)
    #: Clients whose XFORWARD (the original client's address and name) is believed and
    #: relayed: by default only the MTA on this host; others get 550 and are not offered it.
    xforward_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    log_level: str = "info"
    syslog: bool = False
    syslog_facility: str = "mail"
    syslog_ident: str | None = None
    log_file: str | None = None
    debugtrace: bool = False

    #: Files read, in order; warnings worth logging at start-up; where each field was set
    #: ("FILE:LINE", "FILE: key.path" or "command line: --opt"), for later error messages.
    source_files: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict)

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        return parse_log_level(value)

    @field_validator("cidr_allow", "cidr_deny", "xforward_hosts")
    @classmethod
    def _check_cidrs(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an address or network") from None
        return values

    @field_validator("allow", "deny")
    @classmethod
    def _check_regexes(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression ({exc})") from None
        return values


class OutboundConfig(CommonConfig):
    """Configuration of `dkproxy out` (dkimproxy.out)."""

    mode: Literal["out"] = "out"
    listen: HostPort = HostPort(host="127.0.0.1", port=10027)
    relay: HostPort = HostPort(host="127.0.0.1", port=10028)
    hostname: str | None = None

    domains: list[str] = Field(default_factory=list)
    keyfile: str | None = None
    selector: str | None = None
    method: str | None = None
    dkim_method: str | None = None
    domainkeys_method: str | None = None
    identity: str | None = None
    #: The default signature list (`signature` options). When none is given and there is no
    #: sender_map/listid_map, DKIMproxy's default applies: one plain `dkim` signature.
    signatures: list[SignatureTemplate] = Field(default_factory=list)
    sender_map: str | None = None
    listid_map: str | None = None
    #: Native TOML rules ([[sign]]); they share the sender_map/listid_map lookup.
    rules: list[SignRule] = Field(default_factory=list)
    min_rsa_bits: int = Field(1024, ge=1024)


class InboundConfig(CommonConfig):
    """Configuration of `dkproxy in` (dkimproxy.in).

    DKIMproxy's two switches become actions unless `actions` says otherwise: reject_error
    (450 when verification hits an error) -> dkim.temperror/domainkeys.temperror = tempfail;
    reject_fail (550 when the author domain's policy says reject; ADSP then, DMARC now) ->
    dmarc.reject = reject.
    """

    mode: Literal["in"] = "in"
    listen: HostPort = HostPort(host="127.0.0.1", port=10025)
    relay: HostPort = HostPort(host="127.0.0.1", port=10026)
    #: The authserv-id written into Authentication-Results.
    hostname: str = Field(default_factory=socket.getfqdn)
    reject_fail: bool = False
    dns_server: HostPort | None = None
    dns_timeout: float = Field(5.0, gt=0)
    max_signatures: int = Field(5, ge=1)
    #: Records read from one DNS answer; the rest are ignored (a hostile zone can answer a
    #: TXT or MX lookup with thousands).
    max_dns_answers: int = Field(50, ge=1)
    min_key_bits: int = Field(1024, ge=1024)
    #: rsa-sha1 DKIM signatures count as valid. RFC 8301 says they must not, but DKIMproxy,
    #: whose users this replaces, signs rsa-sha1 unless told a=rsa-sha256, and OpenDKIM and
    #: Mail::DKIM still accept it; off gives such signatures dkim=policy.
    allow_sha1: bool = True
    #: A DKIM signature whose l= leaves body bytes unsigned passes (RFC 6376 8.2); off gives
    #: it dkim=policy, so appended content never rides on a pass.
    allow_body_length: bool = False
    #: "method.result" -> action, e.g. {"dkim.temperror": "tempfail", "dmarc.reject": "reject"};
    #: results not listed are accepted.
    actions: dict[str, Action] = Field(default_factory=dict)
    spf: bool = True
    dmarc: bool = True
    #: Verify ARC chains (RFC 8617); sealers whose passing chain may override DMARC failures.
    arc: bool = True
    arc_trusted_sealers: list[str] = Field(default_factory=list)

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        if not HOSTNAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a host name usable as authserv-id")
        return value.rstrip(".")

    @field_validator("actions")
    @classmethod
    def _check_actions(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            check_action_key(key)
        return value


def check_action_key(key: str) -> None:
    method, _, result = key.partition(".")
    if method not in ACTION_RESULTS:
        raise ValueError(f"{key!r}: unknown method {method!r} (one of {', '.join(ACTION_RESULTS)})")
    if result not in ACTION_RESULTS[method]:
        allowed = ", ".join(sorted(ACTION_RESULTS[method]))
        raise ValueError(f"{key!r}: unknown {method} result {result!r} (one of {allowed})")


AnyConfig = OutboundConfig | InboundConfig
