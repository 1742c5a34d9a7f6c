"""Configuration: DKIMproxy 1.4 command lines and conf files, and dkproxy's native TOML.

dkproxy must start from an unchanged DKIMproxy 1.4 init script, so the first job of this module
is to read what `dkimproxy.out` / `dkimproxy.in` read, with the same meaning. Facts taken from
DKIMproxy 1.4.1 (scripts/dkimproxy.out, scripts/dkimproxy.in, lib/LookupMap.pm) and the
Net::Server it is built on (Net::Server::process_args / _read_conf):

* Command line: `dkimproxy.out [options] LISTENADDR:PORT RELAYADDR:PORT`. Net::Server takes
  `--name=value`, `--name value` and even a bare `name=value`; a flag followed by another
  `--option` (or nothing) is 1. Whatever Net::Server does not know goes to Getopt::Long, which
  only knows `--reject-error` (and `--reject-fail` in dkimproxy.in) and `--help|-?`; anything
  else there is "Unknown option" and a usage error. Exactly zero or two positional arguments
  (listen, relay); they override `--listen`/`--relay`. A listen address needs a port; a relay
  port defaults to 25. `[v6addr]:port` is accepted.
* Conf file (`--conf_file`): one option per line, `name value` (also `name=value`,
  `name: value`, `--name value`); an unescaped `#` starts a comment anywhere on the line;
  `\\#` is a literal `#`. The value is the rest of the line (Net::Server 2.x; older releases
  kept only the first word, hence "comma-separated, no spaces" in DKIMproxy's sample).
  Options given on the command line win over the file; a list option
  (`signature`) given on the command line replaces the file's list. Within one source a
  repeated single-valued option keeps its last value; `signature` lines accumulate.
* dkimproxy.out options: listen, relay, relay_host, relay_port, domain (comma-separated),
  keyfile, selector, method, dkim_method, domainkeys_method, identity, signature (repeatable),
  sender_map, listid_map, reject_error / --reject-error, debugtrace, daemonize (= setsid),
  pidfile (= pid_file), plus Net::Server's (user, group, chroot, log_level, log_file, host,
  port, allow, deny, cidr_allow, cidr_deny, ...) and Net::Server::PreFork's (min_servers,
  max_servers, min_spare_servers, max_spare_servers, max_requests, ...).
  dkimproxy.in: listen, relay, relay_host, relay_port, hostname, reject_fail / --reject-fail,
  reject_error / --reject-error, debugtrace and the same daemon options.
* Without any `signature`, `sender_map` or `listid_map`, dkimproxy.out adds one default
  signature, `dkim`, built from keyfile/selector/domain. With a map but no `signature` there is
  no default signature at all: unmatched mail is not signed (and `domain` has no effect).
* `signature TYPE(opt=value,...)`: TYPE is dkim or domainkeys; options key (also keyfile),
  s/selector, d/domain, c/method, a/algorithm, h/headers, i/identity. Method defaults: dkim
  `relaxed` (Mail::DKIM reads a lone `relaxed` as relaxed/simple), domainkeys `nofws`;
  `--method` applies to both kinds, `--dkim_method`/`--domainkeys_method` to one.

Where DKIMproxy is silent or surprising, dkproxy is stricter and says where the problem is:
an unknown option in a conf file is an error naming FILE:LINE (Net::Server skips it silently,
so a typo such as `selecter` used to go unnoticed); a bare flag line (`reject_error`) means
"on" (Net::Server ignored such a line although dkimproxy.in's own manual shows one); unknown
signature options are errors (DKIMproxy ignored them); `nowsp` and DKIM `rsa-sha1` are
refused at start-up (no current verifier reads nowsp; RFC 8301 forbids rsa-sha1).
Net::Server's `%XX` unescaping of values is not reproduced (it decoded a single hex digit,
e.g. "%20" became "\\x02" + "0").

The native TOML format (`-c FILE.toml`) is documented in conf/dkproxy-out.toml.example and
conf/dkproxy-in.toml.example; it is validated with `extra='forbid'`, so a misspelt key is an
error naming the file and the key path.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dkproxy.mailauth.addresses import DomainError, canonical_domain

Mode = Literal["out", "in"]
Action = Literal["accept", "tempfail", "reject"]

MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 64 * MIB
DEFAULT_RELAY_PORT = 25
COMMAND_LINE = "command line"


class ConfigError(Exception):
    """A configuration problem, located as precisely as the input allows.

    str() is "FILE:LINE: message", "FILE: key.path: message" (TOML) or
    "command line: --opt: message", so an operator can go straight to the culprit.
    """

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}: {self.message}"
        return f"{self.source}: {self.message}"

    @classmethod
    def at(cls, where: str, message: str) -> ConfigError:
        """Build from a location string as stored in `source` fields.

        "FILE:LINE" -> (FILE, LINE); "FILE: key.path" -> (FILE, None, "key.path: message");
        anything else is used as the source as it is.
        """
        match = re.fullmatch(r"(.+):(\d+)", where)
        if match:
            return cls(match.group(1), int(match.group(2)), message)
        head, sep, tail = where.partition(": ")
        if sep and tail:
            return cls(head, None, f"{tail}: {message}")
        return cls(where, None, message)


class HelpRequested(Exception):
    """`--help` was given; `text` is the usage text to print (exit status 0)."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


# ---------------------------------------------------------------------------------------------
# Value syntax shared by all formats
# ---------------------------------------------------------------------------------------------

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
#: dot-atom local part without "=" (DKIM i= is quoted-printable; "=" would need encoding).
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+)*")
_MACRO_RE = re.compile(r"\$(\$|[A-Za-z_]\w*)")

#: Macros DKIMproxy 1.4 knows (interpret_macros); `$xdomain` is the domain part of `$x`.
DOMAIN_MACROS = frozenset({"senderdomain", "key", "keydomain"})
IDENTITY_MACROS = frozenset({"sender", "senderdomain", "key", "keydomain"})

DKIM_CANONICALIZATIONS = frozenset(
    {
        "simple",
        "relaxed",
        "simple/simple",
        "simple/relaxed",
        "relaxed/simple",
        "relaxed/relaxed",
    }
)
DK_CANONICALIZATIONS = frozenset({"simple", "nofws"})
ALGORITHMS = frozenset({"rsa-sha256", "ed25519-sha256", "rsa-sha1"})

#: Results per method that `actions` may name (RFC 8601 result names); for dmarc, `quarantine`
#: and `reject` mean "fail, and the domain publishes p=quarantine / p=reject".
ACTION_RESULTS: dict[str, frozenset[str]] = {
    "dkim": frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"}),
    "domainkeys": frozenset(
        {"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"}
    ),
    "spf": frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"}),
    "dmarc": frozenset({"none", "pass", "fail", "temperror", "permerror", "quarantine", "reject"}),
    "arc": frozenset({"none", "pass", "fail"}),
}
ACTIONS = ("accept", "tempfail", "reject")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Net::Server's numeric log_level (0 err .. 4 debug).
_NET_SERVER_LEVELS = {"0": "error", "1": "warning", "2": "info", "3": "info", "4": "debug"}

_TRUE_WORDS = frozenset({"1", "yes", "true", "on", "y"})
_FALSE_WORDS = frozenset({"0", "no", "false", "off", "n", ""})


def to_alabels(domain: str) -> str:
    """A configured domain in the form every comparison uses: lower-case A-labels.

    U-labels and A-labels are both accepted (RFC 5890, UTS 46; see
    dkproxy.mailauth.addresses); raises ValueError naming the value when it has no A-label form.
    """
    try:
        return canonical_domain(domain)
    except DomainError as exc:
        raise ValueError(str(exc)) from None


def is_domain(value: str) -> bool:
    """True for a lower-case LDH domain name of at most 253 characters."""
    return len(value) <= 253 and _DOMAIN_RE.fullmatch(value) is not None


def is_safe_local_part(value: str) -> bool:
    """True when `value` can stand as the local part of a DKIM i= without any encoding."""
    return len(value) <= 64 and _LOCAL_RE.fullmatch(value) is not None


def parse_bool(value: str | bool | int) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE_WORDS:
        return True
    if text in _FALSE_WORDS:
        return False
    raise ValueError(f"expected yes/no (1/0, true/false, on/off), got {value!r}")


def parse_int(value: str | int, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        number = int(str(value).strip(), 10)
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"must be at least {minimum}, got {number}")
    return number


def parse_float(value: str | float, positive: bool = True) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if positive and not number > 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return number


_SIZE_RE = re.compile(r"(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Bytes from "67108864", "64M", "64MiB", "512k"; 0 means unlimited. Units are binary."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 64M, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    match = _SIZE_RE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"expected a size such as 67108864, 512K or 64M, got {value!r}")
    unit = match.group(2).lower()[:1]
    factor = {"": 1, "b": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[unit]
    return int(match.group(1)) * factor


def parse_log_level(value: str | int) -> str:
    text = str(value).strip().lower()
    if text in _NET_SERVER_LEVELS:
        return _NET_SERVER_LEVELS[text]
    aliases = {"warn": "warning", "notice": "info", "err": "error", "crit": "critical"}
    text = aliases.get(text, text)
    if text not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)} (or Net::Server's 0-4)")
    return text


def parse_domain_list(value: str) -> list[str]:
    """DKIMproxy's `domain`: comma-separated; spaces around commas are tolerated."""
    domains: list[str] = []
    for item in value.split(","):
        item = item.strip().rstrip(".").lower()
        if not item:
            continue
        if "$" in item:
            check_macros(item, frozenset({"senderdomain"}), "domain")
        elif not is_domain(item := to_alabels(item)):
            raise ValueError(f"{item!r} is not a valid domain name")
        if item not in domains:
            domains.append(item)
    if not domains:
        raise ValueError("no domain given")
    if len(domains) > 1 and any("$" in d for d in domains):
        raise ValueError("a macro in 'domain' only works with a single domain")
    return domains


def check_macros(text: str, allowed: frozenset[str], what: str) -> None:
    """Reject a `$name` that DKIMproxy would die on at message time; `$$` is a literal `$`."""
    stripped = _MACRO_RE.sub("", text)
    if "$" in stripped:
        raise ValueError(f"stray '$' in {what} {text!r} (write $$ for a literal $)")
    for match in _MACRO_RE.finditer(text):
        name = match.group(1)
        if name != "$" and name not in allowed:
            names = ", ".join(f"${m}" for m in sorted(allowed))
            if name in IDENTITY_MACROS:
                raise ValueError(f"${name} is not allowed in {what} {text!r} (here: {names})")
            raise ValueError(f"unknown macro ${name} in {what} {text!r} (allowed: {names})")


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
        return len(host) <= 253 and _HOSTNAME_RE.fullmatch(host) is not None


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


class _CommonConfig(BaseModel):
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


class OutboundConfig(_CommonConfig):
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


class InboundConfig(_CommonConfig):
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
        if not _HOSTNAME_RE.fullmatch(value):
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


# ---------------------------------------------------------------------------------------------
# Signature specifiers: dkim(c=relaxed,key=/k,s=sel,d=example.org)
# ---------------------------------------------------------------------------------------------

_SIG_OPTION_NAMES = {
    "key": "key",
    "keyfile": "key",
    "s": "selector",
    "selector": "selector",
    "d": "domain",
    "domain": "domain",
    "c": "canonicalization",
    "method": "canonicalization",
    "a": "algorithm",
    "algorithm": "algorithm",
    "h": "headers",
    "headers": "headers",
    "i": "identity",
    "identity": "identity",
    "authserv_id": "authserv_id",
}
_SPECIFIER_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?", re.DOTALL)


def split_by_commas(text: str) -> list[str]:
    """Split at commas outside parentheses, trimming items (DKIMproxy's split_by_commas)."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "," and depth <= 0:
            items.append("".join(current).strip())
            current = []
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in {text.strip()!r}")
    items.append("".join(current).strip())
    if len(items) > 1 and items[-1] == "":
        items.pop()  # a trailing comma
    return items


def parse_signature_list(text: str, source: str) -> list[SignatureTemplate]:
    """Parse "dkim(c=relaxed,a=rsa-sha256), domainkeys(c=nofws)"; raise ValueError."""
    if not text.strip():
        raise ValueError("empty signature list")
    return [parse_signature_specifier(item, source) for item in split_by_commas(text)]


def parse_signature_specifier(text: str, source: str) -> SignatureTemplate:
    """Parse one `TYPE` or `TYPE(opt=value,...)`; raise ValueError naming what is wrong."""
    spec = text.strip()
    match = _SPECIFIER_RE.fullmatch(spec)
    if not match:
        raise ValueError(f"invalid signature specifier {spec!r}; expected e.g. dkim(c=relaxed)")
    kind = match.group(1).lower()
    if kind not in ("dkim", "domainkeys", "arc"):
        raise ValueError(f"invalid signature type {match.group(1)!r}; use dkim, domainkeys or arc")
    values: dict[str, Any] = {"kind": kind, "source": source}
    body = match.group(2)
    if body is not None:
        for option in body.split(","):
            option = option.strip()
            if not option:
                continue
            name, eq, value = option.partition("=")
            name, value = name.strip(), value.strip()
            key = _SIG_OPTION_NAMES.get(name.lower())
            if key is None:
                known = "key, s, d, c, a, h, i, authserv_id"
                raise ValueError(f"unknown signature option {name!r} in {spec!r} (known: {known})")
            if not eq or not value:
                raise ValueError(f"signature option {name!r} in {spec!r} needs a value")
            if key in values:
                raise ValueError(f"signature option {name!r} given twice in {spec!r}")
            values[key] = value
    return make_signature_template(values)


def make_signature_template(values: dict[str, Any]) -> SignatureTemplate:
    """Validate the syntax of the parts of a signature that do not need keys or defaults."""
    kind = values.get("kind", "dkim")
    out = dict(values)
    if kind == "arc":
        _check_arc_template(out)
    elif out.get("authserv_id") is not None:
        raise ValueError("authserv_id= only applies to arc(...)")
    canon = out.get("canonicalization")
    if canon is not None:
        canon = out["canonicalization"] = str(canon).strip().lower()
        check_canonicalization(kind, canon)
    algorithm = out.get("algorithm")
    if algorithm is not None:
        algorithm = out["algorithm"] = str(algorithm).strip().lower()
        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {algorithm!r}; use rsa-sha256 or ed25519-sha256"
                + (" (domainkeys: rsa-sha1)" if kind == "domainkeys" else "")
            )
    domain = out.get("domain")
    if domain is not None:
        domain = out["domain"] = str(domain).strip().rstrip(".").lower()
        if "$" in domain:
            check_macros(domain, DOMAIN_MACROS, "d=")
        else:
            domain = out["domain"] = to_alabels(domain)
        if not is_domain(_sample(domain)):
            raise ValueError(f"d={domain!r} is not a valid domain name")
    identity = out.get("identity")
    if identity is not None:
        identity = str(identity).strip()
        if "$" in identity:
            check_macros(identity, IDENTITY_MACROS, "i=")
        identity = canonical_identity(identity)
        check_identity_syntax(identity, _sample(identity))
        out["identity"] = identity
    selector = out.get("selector")
    if selector is not None:
        selector = out["selector"] = str(selector).strip()
        check_selector(selector)
    headers = out.get("headers")
    if headers is not None:
        out["headers"] = parse_header_list(headers)
    return SignatureTemplate(**out)


def _check_arc_template(values: dict[str, Any]) -> None:
    """arc(...): RFC 8617 fixes c=relaxed/relaxed and a=rsa-sha256, and has no i=."""
    if str(values.get("canonicalization") or "relaxed/relaxed").lower() not in (
        "relaxed",
        "relaxed/relaxed",
    ):
        raise ValueError("ARC signatures always use c=relaxed/relaxed")
    values.pop("canonicalization", None)
    if str(values.get("algorithm") or "rsa-sha256").lower() != "rsa-sha256":
        raise ValueError("ARC signatures are a=rsa-sha256 (RFC 8617)")
    if values.get("identity") is not None:
        raise ValueError("ARC signatures have no i= tag")
    srv = str(values.get("authserv_id") or "").strip()
    if not _HOSTNAME_RE.fullmatch(srv):
        raise ValueError(
            "arc(...) needs authserv_id=NAME: the authserv-id whose Authentication-Results "
            "are sealed"
        )
    values["authserv_id"] = srv.rstrip(".").lower()


def check_canonicalization(kind: str, canon: str) -> None:
    if kind == "dkim":
        if canon == "nowsp":
            raise ValueError(
                "c=nowsp is a pre-RFC draft canonicalization that current verifiers reject; "
                "use relaxed"
            )
        if canon not in DKIM_CANONICALIZATIONS:
            raise ValueError(f"invalid DKIM canonicalization {canon!r}; use relaxed or simple")
    elif canon not in DK_CANONICALIZATIONS:
        raise ValueError(f"invalid DomainKeys canonicalization {canon!r}; use nofws or simple")


def check_selector(selector: str) -> None:
    if not selector:
        raise ValueError("empty selector")
    if "$" in selector:
        raise ValueError(f"macros are not allowed in a selector ({selector!r})")
    if not is_domain(selector.lower()):
        raise ValueError(f"selector {selector!r} is not a valid DNS name")


def _sample(text: str) -> str:
    """`text` with its macros replaced by typical values, to check the shape of the rest."""
    samples = {"sender": "user@sub.example", "senderdomain": "sub.example", "$": "$"}
    return _MACRO_RE.sub(lambda m: samples.get(m.group(1), "sub.example"), text)


def canonical_identity(identity: str) -> str:
    """i= with a literal domain written in lower-case A-labels (U-labels accepted, as for
    `domain`): it is compared with d= in A-labels (RFC 8616 s4). Macros are left alone;
    raises ValueError for a domain that has no A-label form."""
    local, at, domain = identity.rpartition("@")
    if not at or not domain or "$" in domain:
        return identity
    return f"{local}@{to_alabels(domain.rstrip('.').lower())}"


def check_identity_syntax(identity: str, sample: str | None = None) -> None:
    """Check i= (with its macros filled by `sample` values); raise ValueError."""
    local, at, domain = (sample if sample is not None else identity).rpartition("@")
    if not at:
        raise ValueError(f"i={identity!r} needs an '@' (e.g. @example.org or user@example.org)")
    if local and not is_safe_local_part(local):
        raise ValueError(f"i={identity!r}: local part has characters a DKIM tag cannot carry")
    if not is_domain(domain.lower()):
        raise ValueError(f"i={identity!r}: {domain!r} is not a valid domain name")


def parse_header_list(value: str | Iterable[str]) -> list[str]:
    names = value.split(":") if isinstance(value, str) else list(value)
    result: list[str] = []
    for name in names:
        name = str(name).strip().lower()
        if not name:
            continue
        if not _FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a header field name")
        result.append(name)
    if not result:
        raise ValueError("empty header list")
    return result


# ---------------------------------------------------------------------------------------------
# The option table (DKIMproxy, Net::Server, dkproxy extensions)
# ---------------------------------------------------------------------------------------------

_BOTH = frozenset({"out", "in"})
_OUT = frozenset({"out"})
_IN = frozenset({"in"})


@dataclass(frozen=True)
class _Opt:
    name: str
    kind: str  # str, path, int, float, bool, size, loglevel, list, hostport, domains, signature,
    #            relay_host, relay_port, host, port, log_file, ignore
    modes: frozenset[str] = _BOTH
    field: str | None = None
    help: str = ""
    metavar: str = ""
    aliases: tuple[str, ...] = ()
    minimum: int | None = None

    @property
    def target(self) -> str:
        return self.field or self.name


_OPTIONS: tuple[_Opt, ...] = (
    # SMTP plumbing
    _Opt("listen", "hostport", help="address to accept SMTP on", metavar="ADDR:PORT"),
    _Opt("relay", "hostport", help="SMTP server to pass mail to", metavar="ADDR:PORT"),
    _Opt("relay_host", "relay_host", help="relay host (use --relay instead)", metavar="HOST"),
    _Opt("relay_port", "relay_port", help="relay port (use --relay instead)", metavar="PORT"),
    _Opt("host", "host", help="listen host (Net::Server; use --listen)", metavar="HOST"),
    _Opt("port", "port", help="listen port (Net::Server; use --listen)", metavar="PORT"),
    _Opt(
        "reject_error",
        "bool",
        help="reject (4xx/5xx) instead of passing unsigned/unverified mail when an error occurs",
    ),
    _Opt(
        "hostname",
        "str",
        help="host name (inbound: authserv-id in Authentication-Results)",
        metavar="NAME",
    ),
    _Opt(
        "relay_timeout",
        "float",
        help="seconds to wait for the relay (default 300)",
        metavar="SECONDS",
    ),
    _Opt(
        "max_message_size",
        "size",
        help="largest message accepted, e.g. 64M (0 = no limit)",
        metavar="SIZE",
    ),
    _Opt("workers", "int", help="worker processes (default: one per CPU)", metavar="N", minimum=1),
    _Opt(
        "metrics",
        "metrics",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (a bare port: on 127.0.0.1)",
        metavar="ADDR:PORT",
    ),
    # limits (README "Security notes")
    _Opt(
        "max_recipients",
        "int",
        help="recipients per message (default 1000; 452 past it)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "max_messages_per_session",
        "int",
        help="messages per SMTP session (default 1000; then 421)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "max_sessions",
        "int",
        help="concurrent sessions per worker (default 500; 421 past it)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "max_command_line",
        "int",
        help="longest command line in octets (default 4096)",
        metavar="OCTETS",
        minimum=512,
    ),
    _Opt(
        "max_header_size",
        "size",
        help="largest header block (default 1M; 552 past it)",
        metavar="SIZE",
    ),
    _Opt(
        "max_header_fields",
        "int",
        help="header fields per message (default 1000; 552 past it)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "command_timeout",
        "float",
        help="seconds to wait for a command (default 300)",
        metavar="SECONDS",
    ),
    _Opt(
        "data_timeout",
        "float",
        help="seconds without data during DATA (default 300)",
        metavar="SECONDS",
    ),
    # signing (dkimproxy.out)
    _Opt(
        "domain",
        "domains",
        _OUT,
        field="domains",
        help="domain(s) to sign for, comma-separated; one domain signs every message",
        metavar="DOMAIN[,DOMAIN...]",
    ),
    _Opt("keyfile", "path", _OUT, help="private key file", metavar="FILE"),
    _Opt(
        "selector", "str", _OUT, help="selector (name of the key record in DNS)", metavar="SELECTOR"
    ),
    _Opt(
        "method",
        "str",
        _OUT,
        help="canonicalization: relaxed|simple (DKIM), nofws|simple (DK)",
        metavar="METHOD",
    ),
    _Opt("dkim_method", "str", _OUT, help="canonicalization for DKIM signatures", metavar="METHOD"),
    _Opt(
        "domainkeys_method",
        "str",
        _OUT,
        help="canonicalization for DomainKeys signatures",
        metavar="METHOD",
    ),
    _Opt(
        "identity",
        "str",
        _OUT,
        help="i= for default DKIM signatures (macros allowed)",
        metavar="IDENTITY",
    ),
    _Opt(
        "signature",
        "signature",
        _OUT,
        field="signatures",
        help="signature to add, repeatable, e.g. dkim(c=relaxed) or domainkeys(c=nofws)",
        metavar="SPEC",
    ),
    _Opt("sender_map", "path", _OUT, help="sender map file (DKIMproxy format)", metavar="FILE"),
    _Opt("listid_map", "path", _OUT, help="List-Id map file (DKIMproxy format)", metavar="FILE"),
    _Opt(
        "min_rsa_bits",
        "int",
        _OUT,
        help="smallest RSA signing key accepted (default 1024)",
        metavar="BITS",
        minimum=1024,
    ),
    # verifying (dkimproxy.in)
    _Opt("reject_fail", "bool", _IN, help="reject mail whose DMARC policy is p=reject and fails"),
    _Opt(
        "dns_server",
        "dns",
        _IN,
        help="DNS resolver to query (default: system resolvers)",
        metavar="ADDR[:PORT]",
    ),
    _Opt("dns_timeout", "float", _IN, help="DNS timeout in seconds (default 5)", metavar="SECONDS"),
    _Opt(
        "max_dns_answers",
        "int",
        _IN,
        help="records used from one DNS answer (default 50)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "max_signatures",
        "int",
        _IN,
        help="signatures verified per message (default 5)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "min_key_bits",
        "int",
        _IN,
        help="smallest RSA key accepted as valid (default 1024)",
        metavar="BITS",
        minimum=1024,
    ),
    _Opt(
        "allow_sha1",
        "bool",
        _IN,
        help="accept rsa-sha1 DKIM signatures, as DKIMproxy signs by default (default on; "
        "--no-allow_sha1 follows RFC 8301 strictly)",
    ),
    _Opt(
        "allow_body_length",
        "bool",
        _IN,
        help="let DKIM signatures with l= pass even when unsigned body content follows "
        "(default off: dkim=policy, RFC 6376 8.2)",
    ),
    _Opt("spf", "bool", _IN, help="check SPF (default on; --no-spf turns it off)"),
    _Opt("dmarc", "bool", _IN, help="evaluate DMARC (default on; --no-dmarc turns it off)"),
    _Opt("arc", "bool", _IN, help="verify ARC chains (default on; --no-arc turns it off)"),
    _Opt(
        "arc_trusted_sealers",
        "domains",
        _IN,
        help="ARC sealers whose passing chain overrides a DMARC failure, comma-separated",
        metavar="DOMAIN[,DOMAIN...]",
    ),
    # daemon
    _Opt("daemonize", "bool", help="run in the background", aliases=("setsid", "background")),
    _Opt("user", "str", help="user to run as", metavar="USER"),
    _Opt("group", "str", help="group to run as", metavar="GROUP"),
    _Opt(
        "pidfile",
        "path",
        help="write the process id to FILE",
        metavar="FILE",
        aliases=("pid_file",),
    ),
    _Opt("chroot", "path", help="chroot to DIR after start-up", metavar="DIR"),
    _Opt(
        "min_servers",
        "int",
        help="(Net::Server::PreFork) minimum processes",
        metavar="N",
        minimum=0,
    ),
    _Opt("max_servers", "int", help="(PreFork) maximum processes", metavar="N", minimum=1),
    _Opt(
        "min_spare_servers", "int", help="(PreFork) minimum idle processes", metavar="N", minimum=0
    ),
    _Opt(
        "max_spare_servers", "int", help="(PreFork) maximum idle processes", metavar="N", minimum=0
    ),
    _Opt(
        "max_requests",
        "int",
        help="(PreFork) connections per process before it is replaced",
        metavar="N",
        minimum=0,
    ),
    _Opt(
        "allow",
        "list",
        help="(Net::Server) client host regex to allow, repeatable",
        metavar="REGEX",
    ),
    _Opt(
        "deny", "list", help="(Net::Server) client host regex to deny, repeatable", metavar="REGEX"
    ),
    _Opt("cidr_allow", "list", help="client network to allow, repeatable", metavar="CIDR"),
    _Opt("cidr_deny", "list", help="client network to deny, repeatable", metavar="CIDR"),
    _Opt(
        "xforward_hosts",
        "list",
        help="client network whose XFORWARD is accepted, repeatable (default loopback)",
        metavar="CIDR",
    ),
    # logging
    _Opt(
        "log_level",
        "loglevel",
        help="debug|info|warning|error (or Net::Server 0-4)",
        metavar="LEVEL",
    ),
    _Opt("log_file", "log_file", help="log file; Sys::Syslog means syslog", metavar="FILE"),
    _Opt("syslog", "bool", help="log to syslog"),
    _Opt("syslog_facility", "str", help="syslog facility (default mail)", metavar="FACILITY"),
    _Opt("syslog_ident", "str", help="syslog program name", metavar="NAME"),
    _Opt("debugtrace", "bool", help="log the SMTP dialogue"),
    # Net::Server / PreFork knobs that have no meaning in dkproxy: accepted with a warning.
    *(
        _Opt(name, "ignore")
        for name in (
            "proto",
            "ipv",
            "reverse_lookups",
            "double_reverse_lookups",
            "no_close_by_child",
            "no_client_stdout",
            "leave_children_open_on_hup",
            "server_type",
            "ipv6_package",
            "serialize",
            "lock_file",
            "check_for_dead",
            "check_for_waiting",
            "check_for_spawn",
            "min_child_ttl",
            "max_dequeue",
            "child_communication",
            "syslog_logsock",
            "syslog_logopt",
        )
    ),
)

_BY_NAME: dict[str, _Opt] = {}
for _option in _OPTIONS:
    _BY_NAME[_option.name] = _option
    for _alias in _option.aliases:
        _BY_NAME[_alias] = _option


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _lookup_option(name: str, mode: str) -> _Opt | None:
    option = _BY_NAME.get(name)
    if option is None or mode not in option.modes:
        return None
    return option


def _unknown_option_message(name: str, mode: str) -> str:
    other = _BY_NAME.get(name)
    if other is not None:
        where = "dkproxy out (dkimproxy.out)" if "out" in other.modes else "dkproxy in"
        return f"option {name!r} only applies to {where}"
    candidates = [o for o, opt in _BY_NAME.items() if mode in opt.modes]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {name!r}{hint}"


# ---------------------------------------------------------------------------------------------
# Collected settings and their conversion into model values
# ---------------------------------------------------------------------------------------------


@dataclass
class _Setting:
    option: _Opt
    value: str | None  # None: a bare flag
    where: str  # "FILE:LINE" or "command line: --opt"
    spelled: str  # the option as written, for messages


@dataclass
class _Values:
    """Field values being assembled, with where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    address_parts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def set(self, name: str, value: Any, where: str) -> None:
        self.values[name] = value
        self.sources[name] = where


def _error(setting: _Setting, message: str) -> ConfigError:
    if setting.where.startswith(COMMAND_LINE):
        return ConfigError(COMMAND_LINE, None, f"{setting.spelled}: {message}")
    return ConfigError.at(setting.where, f"{setting.option.name}: {message}")


def _apply_settings(mode: str, settings: list[_Setting], acc: _Values, replace: bool) -> None:
    """Apply one source's settings on top of `acc`.

    With `replace` (the command line over a file) a list option given here drops the
    earlier list, as Net::Server's process_args does.
    """
    seen_scalar: dict[str, _Setting] = {}
    reset_lists: set[str] = set()
    for setting in settings:
        option = setting.option
        value = setting.value
        kind = option.kind
        target = option.target
        try:
            if kind == "ignore":
                acc.warnings.append(
                    f"{setting.where}: {option.name}: Net::Server option has no effect in "
                    "dkproxy; ignored"
                )
                continue
            if kind in ("signature", "list"):
                if value is None or not value.strip():
                    raise ValueError("needs a value")
                if replace and target not in reset_lists:
                    acc.values[target] = []
                reset_lists.add(target)
                current = list(acc.values.get(target, []))
                if kind == "signature":
                    current.extend(parse_signature_list(value, setting.where))
                else:
                    current.append(value.strip())
                acc.set(target, current, setting.where)
                continue
            if target in seen_scalar:
                acc.warnings.append(
                    f"{setting.where}: {option.name} given again (first at "
                    f"{seen_scalar[target].where}); the last value wins"
                )
            seen_scalar[target] = setting
            if kind == "bool":
                acc.set(target, True if value is None else parse_bool(value), setting.where)
                continue
            if value is None or not value.strip():
                raise ValueError("needs a value")
            value = value.strip()
            if kind in ("relay_host", "relay_port", "host", "port"):
                acc.address_parts[kind] = (value, setting.where)
            elif kind == "hostport":
                default_port = DEFAULT_RELAY_PORT if option.name == "relay" else None
                acc.set(target, HostPort.parse(value, default_port), setting.where)
            elif kind == "dns":
                acc.set(target, HostPort.parse(value, 53), setting.where)
            elif kind == "metrics":
                acc.set(target, parse_metrics_address(value), setting.where)
            elif kind == "domains":
                acc.set(target, parse_domain_list(value), setting.where)
            elif kind == "int":
                acc.set(target, parse_int(value, option.minimum), setting.where)
            elif kind == "float":
                acc.set(target, parse_float(value), setting.where)
            elif kind == "size":
                acc.set(target, parse_size(value), setting.where)
            elif kind == "loglevel":
                acc.set(target, parse_log_level(value), setting.where)
            elif kind == "log_file":
                if value.lower() == "sys::syslog":
                    acc.set("syslog", True, setting.where)
                else:
                    acc.set("log_file", value, setting.where)
            elif kind in ("str", "path"):
                if option.name in ("method", "dkim_method", "domainkeys_method"):
                    value = value.lower()
                    if option.name == "dkim_method":
                        check_canonicalization("dkim", value)
                    elif option.name == "domainkeys_method":
                        check_canonicalization("domainkeys", value)
                elif option.name == "selector":
                    check_selector(value)
                elif option.name == "identity":
                    if "$" in value:
                        check_macros(value, IDENTITY_MACROS, "identity")
                    value = canonical_identity(value)
                    check_identity_syntax(value, _sample(value))
                acc.set(target, value, setting.where)
            else:  # pragma: no cover - the option table and this switch must agree
                raise AssertionError(f"unhandled option kind {kind}")
        except ValueError as exc:
            raise _error(setting, str(exc)) from None


def _resolve_addresses(acc: _Values, positional: list[tuple[str, str]]) -> None:
    """Combine host/port, relay_host/relay_port, listen/relay and positional arguments.

    Precedence as in dkimproxy.out's configure(): positional > listen/relay > the split
    Net::Server-style options.
    """
    parts = acc.address_parts
    if "listen" not in acc.values and ("host" in parts or "port" in parts):
        if "port" not in parts:
            raise ConfigError.at(parts["host"][1], "host: no port given (use listen)")
        host = parts.get("host", ("127.0.0.1", ""))[0]
        port_text, where = parts["port"]
        try:
            port = parse_int(port_text, 0)
            acc.set("listen", HostPort.parse(f"{_bracket(host)}:{port}"), where)
        except ValueError as exc:
            raise ConfigError.at(where, f"port: {exc}") from None
    if "relay" not in acc.values and ("relay_host" in parts or "relay_port" in parts):
        if "relay_host" not in parts:
            raise ConfigError.at(parts["relay_port"][1], "relay_port: no relay_host given")
        host, where = parts["relay_host"]
        try:
            port = parse_int(parts["relay_port"][0], 1) if "relay_port" in parts else 25
            acc.set("relay", HostPort.parse(f"{_bracket(host)}:{port}"), where)
        except ValueError as exc:
            raise ConfigError.at(where, f"relay_host/relay_port: {exc}") from None
    if positional:
        (listen, relay) = positional
        for name, (text, where), default in (("listen", listen, None), ("relay", relay, 25)):
            try:
                acc.set(name, HostPort.parse(text, default), where)
            except ValueError as exc:
                raise ConfigError(COMMAND_LINE, None, f"{name} address: {exc}") from None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ---------------------------------------------------------------------------------------------
# DKIMproxy conf files
# ---------------------------------------------------------------------------------------------

#: Net::Server's `name value`, `name=value`, `name: value`; a colon only separates right after
#: the name, so "cidr_allow ::1" keeps its value.
_CONF_LINE_RE = re.compile(r"(?:--)?([A-Za-z_][\w-]*)(?:\s*=\s*|:\s*|\s+)(.*)")
_CONF_FLAG_RE = re.compile(r"(?:--)?([A-Za-z_][\w-]*)")


def _read_text(path: str, what: str = "configuration file") -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(path, line, "not valid UTF-8") from None


def _strip_comment(line: str) -> str:
    """Net::Server: an unescaped # starts a comment; \\# is a literal #."""
    match = re.match(r"(.*?)(?<!\\)#", line)
    if match:
        line = match.group(1)
    return line.replace("\\#", "#")


def _parse_dkimproxy_conf(path: str, mode: str | None, text: str | None = None) -> list[_Setting]:
    """Read a dkimproxy_out.conf / dkimproxy_in.conf into settings (mode None: guess later)."""
    if text is None:
        text = _read_text(path)
    settings: list[_Setting] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        match = _CONF_LINE_RE.fullmatch(line)
        if match:
            name, value = match.group(1), match.group(2).strip()
            if value == "":
                value = None  # "reject_error  " is a bare flag
        else:
            flag = _CONF_FLAG_RE.fullmatch(line)
            if not flag:
                raise ConfigError(path, number, f"cannot parse {line!r}; expected 'name value'")
            name, value = flag.group(1), None
        normal = _norm(name)
        where = f"{path}:{number}"
        if normal in ("conf_file", "config"):
            raise ConfigError(path, number, f"{name}: a configuration file cannot include another")
        if normal == "help":
            raise ConfigError(path, number, "help: not a configuration option")
        option = _BY_NAME.get(normal) if mode is None else _lookup_option(normal, mode)
        if option is None:
            message = _unknown_option_message(normal, mode or "out")
            raise ConfigError(path, number, message)
        if value is None and option.kind not in ("bool", "ignore"):
            raise ConfigError(path, number, f"{name}: needs a value")
        settings.append(_Setting(option, value, where, name))
    return settings


def _guess_mode(path: str, settings: list[_Setting]) -> Mode:
    kinds = {mode for s in settings for mode in s.option.modes if s.option.modes != _BOTH}
    if kinds == {"out"}:
        return "out"
    if kinds == {"in"}:
        return "in"
    if kinds == {"out", "in"}:
        outs = sorted({s.option.name for s in settings if s.option.modes == _OUT})
        ins = sorted({s.option.name for s in settings if s.option.modes == _IN})
        raise ConfigError(
            path,
            None,
            f"mixes outbound options ({', '.join(outs)}) and inbound options ({', '.join(ins)})",
        )
    base = os.path.basename(path).lower()
    if re.search(r"[._-]out\b|out[._-]|\.out$", base):
        return "out"
    if re.search(r"[._-]in\b|in[._-]|\.in$", base):
        return "in"
    raise ConfigError(
        path,
        None,
        "cannot tell whether this is an outbound or inbound "
        "configuration; name the mode (dkproxy out|in, or --mode)",
    )


# ---------------------------------------------------------------------------------------------
# Native TOML
# ---------------------------------------------------------------------------------------------


class _TomlSignature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["dkim", "domainkeys", "arc"] = "dkim"
    key: str | None = None
    selector: str | None = None
    domain: str | None = None
    algorithm: str | None = None
    canonicalization: str | None = None
    identity: str | None = None
    headers: list[str] | None = None
    authserv_id: str | None = None

    @field_validator("headers", mode="before")
    @classmethod
    def _split_headers(cls, value: Any) -> Any:
        return value.split(":") if isinstance(value, str) else value


class _TomlRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: list[str]
    signature: list[_TomlSignature] = Field(default_factory=list)

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("match")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one pattern")
        return value


class _TomlDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    selector: str | None = None
    headers: list[str] | None = None

    @field_validator("headers", mode="before")
    @classmethod
    def _split_headers(cls, value: Any) -> Any:
        return value.split(":") if isinstance(value, str) else value


class _TomlDaemon(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = None
    group: str | None = None
    pidfile: str | None = None
    daemonize: bool | None = None
    chroot: str | None = None
    workers: int | None = None
    min_servers: int | None = None
    max_servers: int | None = None
    min_spare_servers: int | None = None
    max_spare_servers: int | None = None
    max_requests: int | None = None
    allow: list[str] | None = None
    deny: list[str] | None = None
    cidr_allow: list[str] | None = None
    cidr_deny: list[str] | None = None
    xforward_hosts: list[str] | None = None


class _TomlLog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: str | int | None = None
    syslog: bool | None = None
    facility: str | None = None
    ident: str | None = None
    file: str | None = None
    debugtrace: bool | None = None


class _TomlArcSeal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: str
    selector: str
    key: str
    authserv_id: str | None = None
    headers: list[str] | None = None

    @field_validator("headers", mode="before")
    @classmethod
    def _split_headers(cls, value: Any) -> Any:
        return value.split(":") if isinstance(value, str) else value


class _TomlLimits(BaseModel):
    """[limits]: the same names and meanings as the command-line options."""

    model_config = ConfigDict(extra="forbid")

    max_recipients: int | None = None
    max_messages_per_session: int | None = None
    max_sessions: int | None = None
    max_command_line: int | None = None
    max_header_size: Any = None
    max_header_fields: int | None = None
    command_timeout: float | None = None
    data_timeout: float | None = None
    max_dns_answers: int | None = None

    @field_validator("max_header_size")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else parse_size(value)


class _TomlCommon(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arc_seal: _TomlArcSeal | None = None
    listen: str | None = None
    relay: str | None = None
    hostname: str | None = None
    reject_error: bool | None = None
    relay_timeout: float | None = None
    max_message_size: Any = None
    metrics: str | int | None = None
    daemon: _TomlDaemon = Field(default_factory=_TomlDaemon)
    log: _TomlLog = Field(default_factory=_TomlLog)
    limits: _TomlLimits = Field(default_factory=lambda: _TomlLimits())

    @field_validator("max_message_size")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else parse_size(value)


class _TomlOut(_TomlCommon):
    mode: Literal["out"] = "out"
    min_rsa_bits: int | None = None
    sender_map: str | None = None
    listid_map: str | None = None
    defaults: _TomlDefaults = Field(default_factory=_TomlDefaults)
    sign: list[_TomlRule] = Field(default_factory=list)


class _TomlIn(_TomlCommon):
    mode: Literal["in"] = "in"
    reject_fail: bool | None = None
    dns_server: str | None = None
    dns_timeout: float | None = None
    max_signatures: int | None = None
    min_key_bits: int | None = None
    allow_sha1: bool | None = None
    allow_body_length: bool | None = None
    spf: bool | None = None
    dmarc: bool | None = None
    arc: bool | None = None
    arc_trusted_sealers: list[str] | None = None
    actions: dict[str, Any] = Field(default_factory=dict)


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class found by following `loc` (field names and list indexes) from `model`."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _unwrap(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """list[X] -> X, X | None -> X (for locating nested models)."""
    for _ in range(3):
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if args and origin in (list, typing.Union, types.UnionType):
            annotation = args[0]
        else:
            break
    return annotation


def _format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    problems: list[str] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else ""
            message = f"unknown key (allowed: {allowed})" if allowed else "unknown key"
        elif error["type"] == "literal_error":
            message = message.replace("Input should be", "expected")
        problems.append(f"{_loc_text(loc)}: {message}")
    return "; ".join(problems)


def _load_toml(path: str, mode: Mode | None) -> AnyConfig:
    file_mode, acc = _toml_settings(path, mode)
    return _build(file_mode, acc, [path])


def _toml_settings(path: str, mode: Mode | None) -> tuple[Mode, _Values]:
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column \d+\)", message)
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        raise ConfigError(path, line, f"TOML syntax error: {message}") from None
    file_mode = raw.get("mode")
    if file_mode is not None and file_mode not in ("out", "in"):
        raise ConfigError(path, None, f"mode: expected 'out' or 'in', got {file_mode!r}")
    if mode is None:
        if file_mode is None:
            if "sign" in raw or "defaults" in raw or "sender_map" in raw:
                file_mode = "out"
            elif "actions" in raw or "dns_server" in raw:
                file_mode = "in"
            else:
                raise ConfigError(path, None, 'mode: missing; add mode = "out" or "in"')
        mode = file_mode
    elif file_mode is not None and file_mode != mode:
        raise ConfigError(
            path, None, f"mode: this file configures dkproxy {file_mode}, not dkproxy {mode}"
        )
    schema: type[_TomlCommon] = _TomlOut if mode == "out" else _TomlIn
    try:
        doc = schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, None, _format_validation_error(exc, schema)) from None
    return mode, _toml_values(path, doc)


def _toml_values(path: str, doc: _TomlCommon) -> _Values:
    acc = _Values()
    base = os.path.dirname(os.path.abspath(path))

    def where(key: str) -> str:
        return f"{path}: {key}"

    def rel(value: str) -> str:
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))

    def put(name: str, value: Any, key: str, convert: Callable[[Any], Any] | None = None) -> None:
        if value is None:
            return
        if convert is not None:
            try:
                value = convert(value)
            except ValueError as exc:
                raise ConfigError(path, None, f"{key}: {exc}") from None
        acc.set(name, value, where(key))

    put("listen", doc.listen, "listen", HostPort.parse)
    put("relay", doc.relay, "relay", lambda v: HostPort.parse(v, DEFAULT_RELAY_PORT))
    put("hostname", doc.hostname, "hostname")
    put("reject_error", doc.reject_error, "reject_error")
    put("relay_timeout", doc.relay_timeout, "relay_timeout")
    put("max_message_size", doc.max_message_size, "max_message_size")
    put("metrics", doc.metrics, "metrics", lambda v: parse_metrics_address(str(v)))
    for name in _TomlLimits.model_fields:
        if name == "max_dns_answers" and not isinstance(doc, _TomlIn):
            if doc.limits.max_dns_answers is not None:
                raise ConfigError(path, None, "limits.max_dns_answers: inbound only")
            continue
        put(name, getattr(doc.limits, name), f"limits.{name}")
    daemon = doc.daemon
    for name in (
        "user",
        "group",
        "daemonize",
        "workers",
        "min_servers",
        "max_servers",
        "min_spare_servers",
        "max_spare_servers",
        "max_requests",
        "allow",
        "deny",
        "cidr_allow",
        "cidr_deny",
        "xforward_hosts",
        "chroot",
    ):
        put(name, getattr(daemon, name), f"daemon.{name}")
    put("pidfile", daemon.pidfile, "daemon.pidfile", rel)
    log = doc.log
    put("log_level", log.level, "log.level", parse_log_level)
    put("syslog", log.syslog, "log.syslog")
    put("syslog_facility", log.facility, "log.facility")
    put("syslog_ident", log.ident, "log.ident")
    put("log_file", log.file, "log.file", rel)
    put("debugtrace", log.debugtrace, "log.debugtrace")
    if doc.arc_seal is not None:
        acc.set("arc_seal", _toml_arc_seal(path, doc, rel), where("arc_seal"))

    if isinstance(doc, _TomlOut):
        put("min_rsa_bits", doc.min_rsa_bits, "min_rsa_bits")
        put("sender_map", doc.sender_map, "sender_map", rel)
        put("listid_map", doc.listid_map, "listid_map", rel)
        defaults = doc.defaults
        put("keyfile", defaults.key, "defaults.key", rel)
        put("selector", defaults.selector, "defaults.selector", _checked(check_selector))
        default_headers = None
        if defaults.headers is not None:
            try:
                default_headers = parse_header_list(defaults.headers)
            except ValueError as exc:
                raise ConfigError(path, None, f"defaults.headers: {exc}") from None
        acc.set("rules", _toml_rules(path, doc.sign, default_headers, rel), where("sign"))
    elif isinstance(doc, _TomlIn):
        put("reject_fail", doc.reject_fail, "reject_fail")
        put("dns_server", doc.dns_server, "dns_server", lambda v: HostPort.parse(v, 53))
        put("dns_timeout", doc.dns_timeout, "dns_timeout")
        put("max_signatures", doc.max_signatures, "max_signatures")
        put("min_key_bits", doc.min_key_bits, "min_key_bits")
        put("allow_sha1", doc.allow_sha1, "allow_sha1")
        put("allow_body_length", doc.allow_body_length, "allow_body_length")
        put("spf", doc.spf, "spf")
        put("dmarc", doc.dmarc, "dmarc")
        put("arc", doc.arc, "arc")
        sealers = ",".join(doc.arc_trusted_sealers or []) or None
        put("arc_trusted_sealers", sealers, "arc_trusted_sealers", parse_domain_list)
        acc.set("actions", _flatten_actions(path, doc.actions), where("actions"))
    return acc


def _toml_arc_seal(path: str, doc: _TomlCommon, rel: Callable[[str], str]) -> ArcSealConfig:
    seal = doc.arc_seal
    assert seal is not None
    values = {
        "kind": "arc",
        "domain": seal.domain,
        "selector": seal.selector,
        "key": rel(seal.key),
        "headers": seal.headers,
        # dkproxy in seals its own results when no authserv_id is named: check the rest.
        "authserv_id": seal.authserv_id or ("own.results" if isinstance(doc, _TomlIn) else None),
    }
    try:
        template = make_signature_template(values)
    except ValueError as exc:
        message = str(exc)
        if not values["authserv_id"]:
            message = "authserv_id is needed in dkproxy out (whose results to seal)"
        raise ConfigError(path, None, f"arc_seal: {message}") from None
    return ArcSealConfig(
        domain=template.domain or seal.domain,
        selector=template.selector or seal.selector,
        key=template.key or seal.key,
        authserv_id=seal.authserv_id and template.authserv_id,
        headers=template.headers,
        source=f"{path}: arc_seal",
    )


def _checked(check: Callable[[str], None]) -> Callable[[str], str]:
    def convert(value: str) -> str:
        check(value)
        return value

    return convert


def _flatten_actions(path: str, actions: dict[str, Any]) -> dict[str, str]:
    """Accept both `dkim.fail = "reject"` (nested tables) and `"dkim.fail" = "reject"`."""
    flat: dict[str, str] = {}
    for key, value in actions.items():
        items = (
            [(f"{key}.{sub}", v) for sub, v in value.items()]
            if isinstance(value, dict)
            else [(key, value)]
        )
        for name, action in items:
            try:
                check_action_key(name)
            except ValueError as exc:
                raise ConfigError(path, None, f"actions.{name}: {exc}") from None
            if action not in ACTIONS:
                raise ConfigError(
                    path,
                    None,
                    f"actions.{name}: expected one of {', '.join(ACTIONS)}, got {action!r}",
                )
            flat[name] = action
    return flat


def _alabels_or_same(name: str) -> str:
    """`name` in A-labels when it has that form; else unchanged, for the caller's own check."""
    try:
        return canonical_domain(name) if name else name
    except DomainError:
        return name


def normalise_pattern(pattern: str) -> str:
    """Check and lower-case a [[sign]] match pattern; raise ValueError."""
    text = pattern.strip().lower()
    if text == "*":
        return text
    if text.startswith("list-id:"):
        ident = text[len("list-id:") :].strip().strip("<>")
        if ident == "*":
            return "list-id:*"
        ident = _alabels_or_same(ident)
        if not ident or not re.fullmatch(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]+", ident):
            raise ValueError(f"{pattern!r} is not a valid List-Id pattern")
        return f"list-id:{ident}"
    if "@" in text:
        local, _, domain = text.rpartition("@")
        domain = _alabels_or_same(domain)
        # RFC 6532 local parts (UTF-8) may be matched too; a pattern is never put in a tag.
        utf8_local = not local.isascii() and local.isprintable() and " " not in local
        if not (is_safe_local_part(local) or utf8_local) or not is_domain(domain):
            raise ValueError(f"{pattern!r} is not a valid address pattern")
        return f"{local}@{domain}"
    bare = text[1:] if text.startswith(".") else text
    bare = _alabels_or_same(bare)
    if not is_domain(bare.rstrip(".")):
        raise ValueError(
            f"{pattern!r} is not a valid pattern (use a domain, .domain, user@domain, *, "
            "or list-id:ID)"
        )
    return ("." if text.startswith(".") else "") + bare.rstrip(".")


def _toml_rules(
    path: str,
    rules: list[_TomlRule],
    default_headers: list[str] | None,
    rel: Callable[[str], str],
) -> list[SignRule]:
    result: list[SignRule] = []
    seen: dict[str, str] = {}
    for index, rule in enumerate(rules):
        templates: list[SignatureTemplate] = []
        for sig_index, sig in enumerate(rule.signature):
            key_path = f"sign[{index}].signature[{sig_index}]"
            values: dict[str, Any] = {
                "kind": sig.type,
                "key": rel(sig.key) if sig.key else None,
                "selector": sig.selector,
                "domain": sig.domain,
                "algorithm": sig.algorithm,
                "canonicalization": sig.canonicalization,
                "identity": sig.identity,
                "headers": sig.headers if sig.headers is not None else default_headers,
                "authserv_id": sig.authserv_id,
                "source": f"{path}: {key_path}",
            }
            try:
                templates.append(make_signature_template(values))
            except ValueError as exc:
                raise ConfigError(path, None, f"{key_path}: {exc}") from None
        for pattern in rule.match:
            try:
                normal = normalise_pattern(pattern)
            except ValueError as exc:
                raise ConfigError(path, None, f"sign[{index}].match: {exc}") from None
            if normal in seen:
                raise ConfigError(
                    path,
                    None,
                    f"sign[{index}].match: {pattern!r} is already matched by {seen[normal]}",
                )
            seen[normal] = f"sign[{index}]"
            result.append(
                SignRule(match=normal, signatures=templates, source=f"{path}: sign[{index}]")
            )
    return result


# ---------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------


def _build(mode: Mode, acc: _Values, files: list[str]) -> AnyConfig:
    values = dict(acc.values)
    values.pop("mode", None)
    if mode == "in":
        actions = dict(values.get("actions", {}))
        if values.get("reject_error"):
            for name in ("dkim.temperror", "domainkeys.temperror"):
                actions.setdefault(name, "tempfail")
        if values.get("reject_fail"):
            actions.setdefault("dmarc.reject", "reject")
        values["actions"] = actions
    else:
        _out_checks(acc, values, files)
    values["source_files"] = files
    values["warnings"] = list(acc.warnings)
    values["sources"] = dict(acc.sources)
    cls: type[_CommonConfig] = OutboundConfig if mode == "out" else InboundConfig
    try:
        return cls.model_validate(values)  # type: ignore[return-value]
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        where = acc.sources.get(name)
        if where is None:
            where = files[-1] if files else COMMAND_LINE
            raise ConfigError(where, None, f"{name}: {message}") from None
        if re.fullmatch(r".+:\d+", where):
            raise ConfigError.at(where, f"{name}: {message}") from None
        raise ConfigError.at(where, message) from None


def _out_checks(acc: _Values, values: dict[str, Any], files: list[str]) -> None:
    """DKIMproxy's default-signature rule, and warnings about options that do nothing."""
    has_maps = bool(values.get("sender_map") or values.get("listid_map") or values.get("rules"))
    if not values.get("signatures") and not has_maps:
        # dkimproxy.out: 'unless (@signature_arg || sender_map || listid_map) { ("dkim") }'
        where = files[-1] if files else COMMAND_LINE
        values["signatures"] = [SignatureTemplate(kind="dkim", source=where)]
    elif not values.get("signatures") and values.get("domains"):
        acc.warnings.append(
            f"{acc.sources.get('domains')}: domain is set but there is no 'signature' option: "
            "with a sender_map/listid_map DKIMproxy adds no default signature, so unmatched "
            "mail is not signed and 'domain' has no effect"
        )


def load_config_file(path: str, mode: Mode | None = None) -> AnyConfig:
    """Load a TOML or DKIMproxy-style file on its own (for `dkproxy check-config`).

    TOML is recognised by a .toml extension or by parsing as TOML; a DKIMproxy file's mode
    is guessed from its options (domain/keyfile/signature... = out; reject_fail = in) or
    its name (dkimproxy_out.conf), unless `mode` is given.
    """
    if _looks_like_toml(path):
        return _load_toml(path, mode)
    text = _read_text(path)
    settings = _parse_dkimproxy_conf(path, mode, text)
    if mode is None:
        mode = _guess_mode(path, settings)
        settings = _parse_dkimproxy_conf(path, mode, text)
    acc = _Values()
    _apply_settings(mode, settings, acc, replace=False)
    _resolve_addresses(acc, [])
    return _build(mode, acc, [path])


def _looks_like_toml(path: str) -> bool:
    """A .toml name, or content that parses as TOML with a table, list, string or `mode`.

    A DKIMproxy file can be valid TOML only if every line is `name = number|true|false`;
    such a file is still read as a DKIMproxy file.
    """
    if path.lower().endswith(".toml"):
        return True
    try:
        text = _read_text(path)
    except ConfigError:
        return False
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return "mode" in doc or any(isinstance(v, dict | list | str) for v in doc.values())


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


def parse_proxy_command(mode: Mode, argv: list[str]) -> AnyConfig:
    """Parse the arguments after `dkproxy out` / `dkproxy in` (all dkimproxy.* forms).

    Accepts `--opt=value`, `--opt value`, `-opt`, hyphens or underscores, `--no-FLAG`,
    DKIMproxy's bare `opt=value`, `-c/--config FILE` or DKIMproxy's `--conf_file=FILE` (either
    format, told apart as load_config_file does) and the positional `LISTEN RELAY`. The
    command line wins over the file. Raises ConfigError, or HelpRequested for --help/-h/-?.
    """
    settings: list[_Setting] = []
    positional: list[tuple[str, str]] = []
    conf_file: str | None = None
    index = 0
    only_positional = False
    while index < len(argv):
        arg = argv[index]
        index += 1
        if only_positional or not arg.startswith("-") or arg == "-":
            name, eq, value = arg.partition("=")
            option = _lookup_option(_norm(name), mode) if eq and "." not in name else None
            if option is not None and not only_positional:
                # Net::Server also takes a bare "name=value" argument.
                settings.append(_Setting(option, value, f"{COMMAND_LINE}: {name}", name))
            elif eq and not only_positional and re.fullmatch(r"[A-Za-z_][\w-]*", name):
                raise ConfigError(
                    COMMAND_LINE, None, f"{arg}: " + _unknown_option_message(_norm(name), mode)
                )
            else:
                role = "listen" if not positional else "relay"
                positional.append((arg, f"{COMMAND_LINE}: {role} argument"))
            continue
        if arg == "--":
            only_positional = True
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, value_text = body.partition("=")
        value: str | None = value_text if eq else None
        normal = _norm(name)
        spelled = "--" + name if arg.startswith("--") else "-" + name
        if normal in ("help", "h", "?"):
            raise HelpRequested(help_text(mode))
        if normal in ("c", "config", "conf_file", "conffile"):
            if value is None:
                if index >= len(argv):
                    raise ConfigError(COMMAND_LINE, None, f"{spelled}: needs a file name")
                value = argv[index]
                index += 1
            if conf_file is not None and conf_file != value:
                raise ConfigError(
                    COMMAND_LINE,
                    None,
                    f"{spelled}: only one configuration file can be given (already {conf_file})",
                )
            conf_file = value
            continue
        option = _lookup_option(normal, mode)
        negated = False
        if option is None and normal.startswith("no_"):
            candidate = _lookup_option(normal[3:], mode)
            if candidate is not None and candidate.kind == "bool":
                option, negated = candidate, True
        if option is None:
            raise ConfigError(
                COMMAND_LINE, None, f"{spelled}: " + _unknown_option_message(normal, mode)
            )
        if option.kind == "ignore":
            if value is None and index < len(argv) and not argv[index].startswith("--"):
                value = argv[index]  # Net::Server: the next word is the value
                index += 1
        elif option.kind == "bool":
            if negated:
                if value is not None:
                    raise ConfigError(COMMAND_LINE, None, f"{spelled}: takes no value")
                value = "0"
            elif (
                value is None
                and index < len(argv)
                and argv[index].lower() in (_TRUE_WORDS | _FALSE_WORDS) - {""}
            ):
                # Net::Server takes the next word as the flag's value ("--daemonize 1").
                value = argv[index]
                index += 1
        elif value is None:
            if index >= len(argv):
                raise ConfigError(COMMAND_LINE, None, f"{spelled}: needs a value")
            value = argv[index]
            index += 1
        settings.append(_Setting(option, value, f"{COMMAND_LINE}: {spelled}", spelled))

    if len(positional) not in (0, 2):
        shown = " ".join(text for text, _ in positional)
        raise ConfigError(
            COMMAND_LINE,
            None,
            f"wrong number of arguments ({shown}); expected LISTENADDR:PORT RELAYADDR:PORT or none",
        )

    files: list[str] = []
    acc = _Values()
    if conf_file is not None:
        path = conf_file
        files.append(path)
        if _looks_like_toml(path):
            _, acc = _toml_settings(path, mode)
        else:
            file_settings = _parse_dkimproxy_conf(path, mode)
            _apply_settings(mode, file_settings, acc, replace=False)
            _resolve_addresses(acc, [])
            acc.address_parts.clear()
    _apply_settings(mode, settings, acc, replace=True)
    _resolve_addresses(acc, positional)
    return _build(mode, acc, files)


def help_text(mode: Mode) -> str:
    """Usage text for `dkproxy out|in --help`, generated from the option table."""
    program = f"dkproxy {mode}"
    legacy = "dkimproxy.out" if mode == "out" else "dkimproxy.in"
    lines = [
        f"usage: {program} [options] [LISTENADDR:PORT RELAYADDR:PORT]",
        f"       {program} -c FILE.toml [options]",
        f"       {program} --conf_file=FILE [options]   ({legacy} configuration file)",
        "",
        f"Accepts every {legacy} 1.4 option. Options may be written --opt=value, --opt value,",
        "with - or _; flags take --no-FLAG. Command-line options override the file.",
        "",
        "  -c, --config FILE        configuration file: native TOML or DKIMproxy format",
        "  --conf_file=FILE         the same (DKIMproxy's spelling)",
        "  -h, --help               show this text",
    ]
    sections = (
        (
            "SMTP",
            "listen relay reject_error hostname relay_timeout max_message_size workers metrics",
        ),
        (
            "limits",
            "max_recipients max_messages_per_session max_sessions max_command_line "
            "max_header_size max_header_fields command_timeout data_timeout max_dns_answers",
        ),
        (
            "signing",
            "domain keyfile selector method dkim_method domainkeys_method identity signature "
            "sender_map listid_map min_rsa_bits",
        ),
        (
            "verifying",
            "reject_fail dns_server dns_timeout max_signatures min_key_bits allow_sha1 "
            "allow_body_length spf dmarc",
        ),
        (
            "daemon",
            "daemonize user group pidfile chroot min_servers max_servers min_spare_servers "
            "max_spare_servers max_requests cidr_allow cidr_deny xforward_hosts",
        ),
        ("logging", "log_level syslog syslog_facility log_file debugtrace"),
    )
    for title, names in sections:
        options = [_BY_NAME[n] for n in names.split() if mode in _BY_NAME[n].modes]
        if not options:
            continue
        lines += ["", f"{title} options:"]
        for option in options:
            flag = f"--{option.name}" + (f"={option.metavar}" if option.metavar else "")
            lines.extend(
                textwrap.wrap(
                    option.help,
                    width=96,
                    initial_indent=f"  {flag:<30} ",
                    subsequent_indent=" " * 33,
                )
            )
    return "\n".join(lines) + "\n"
