"""The option table (DKIMproxy, Net::Server and dkproxy options, by mode) and the conversion
of collected `name value` settings into model values."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from dkproxy.config.errors import COMMAND_LINE, ConfigError
from dkproxy.config.models import HostPort, parse_metrics_address
from dkproxy.config.signatures import (
    canonical_identity,
    check_canonicalization,
    check_identity_syntax,
    check_selector,
    parse_signature_list,
    with_sample_macros,
)
from dkproxy.config.values import (
    DEFAULT_RELAY_PORT,
    IDENTITY_MACROS,
    check_macros,
    parse_bool,
    parse_domain_list,
    parse_float,
    parse_int,
    parse_log_level,
    parse_size,
)

# ---------------------------------------------------------------------------------------------
# The option table (DKIMproxy, Net::Server, dkproxy extensions)
# ---------------------------------------------------------------------------------------------

BOTH_MODES = frozenset({"out", "in"})
OUT_ONLY = frozenset({"out"})
IN_ONLY = frozenset({"in"})


@dataclass(frozen=True)
class _Opt:
    name: str
    kind: str  # str, path, int, float, bool, size, loglevel, list, hostport, domains, signature,
    #            relay_host, relay_port, host, port, log_file, ignore
    modes: frozenset[str] = BOTH_MODES
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
        OUT_ONLY,
        field="domains",
        help="domain(s) to sign for, comma-separated; one domain signs every message",
        metavar="DOMAIN[,DOMAIN...]",
    ),
    _Opt("keyfile", "path", OUT_ONLY, help="private key file", metavar="FILE"),
    _Opt(
        "selector",
        "str",
        OUT_ONLY,
        help="selector (name of the key record in DNS)",
        metavar="SELECTOR",
    ),
    _Opt(
        "method",
        "str",
        OUT_ONLY,
        help="canonicalization: relaxed|simple (DKIM), nofws|simple (DK)",
        metavar="METHOD",
    ),
    _Opt(
        "dkim_method",
        "str",
        OUT_ONLY,
        help="canonicalization for DKIM signatures",
        metavar="METHOD",
    ),
    _Opt(
        "domainkeys_method",
        "str",
        OUT_ONLY,
        help="canonicalization for DomainKeys signatures",
        metavar="METHOD",
    ),
    _Opt(
        "identity",
        "str",
        OUT_ONLY,
        help="i= for default DKIM signatures (macros allowed)",
        metavar="IDENTITY",
    ),
    _Opt(
        "signature",
        "signature",
        OUT_ONLY,
        field="signatures",
        help="signature to add, repeatable, e.g. dkim(c=relaxed) or domainkeys(c=nofws)",
        metavar="SPEC",
    ),
    _Opt("sender_map", "path", OUT_ONLY, help="sender map file (DKIMproxy format)", metavar="FILE"),
    _Opt(
        "listid_map", "path", OUT_ONLY, help="List-Id map file (DKIMproxy format)", metavar="FILE"
    ),
    _Opt(
        "min_rsa_bits",
        "int",
        OUT_ONLY,
        help="smallest RSA signing key accepted (default 1024)",
        metavar="BITS",
        minimum=1024,
    ),
    # verifying (dkimproxy.in)
    _Opt(
        "reject_fail", "bool", IN_ONLY, help="reject mail whose DMARC policy is p=reject and fails"
    ),
    _Opt(
        "dns_server",
        "dns",
        IN_ONLY,
        help="DNS resolver to query (default: system resolvers)",
        metavar="ADDR[:PORT]",
    ),
    _Opt(
        "dns_timeout",
        "float",
        IN_ONLY,
        help="DNS timeout in seconds (default 5)",
        metavar="SECONDS",
    ),
    _Opt(
        "max_dns_answers",
        "int",
        IN_ONLY,
        help="records used from one DNS answer (default 50)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "max_signatures",
        "int",
        IN_ONLY,
        help="signatures verified per message (default 5)",
        metavar="N",
        minimum=1,
    ),
    _Opt(
        "min_key_bits",
        "int",
        IN_ONLY,
        help="smallest RSA key accepted as valid (default 1024)",
        metavar="BITS",
        minimum=1024,
    ),
    _Opt(
        "allow_sha1",
        "bool",
        IN_ONLY,
        help="accept rsa-sha1 DKIM signatures, as DKIMproxy signs by default (default on; "
        "--no-allow_sha1 follows RFC 8301 strictly)",
    ),
    _Opt(
        "allow_body_length",
        "bool",
        IN_ONLY,
        help="let DKIM signatures with l= pass even when unsigned body content follows "
        "(default off: dkim=policy, RFC 6376 8.2)",
    ),
    _Opt("spf", "bool", IN_ONLY, help="check SPF (default on; --no-spf turns it off)"),
    _Opt("dmarc", "bool", IN_ONLY, help="evaluate DMARC (default on; --no-dmarc turns it off)"),
    _Opt("arc", "bool", IN_ONLY, help="verify ARC chains (default on; --no-arc turns it off)"),
    _Opt(
        "arc_trusted_sealers",
        "domains",
        IN_ONLY,
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

BY_NAME: dict[str, _Opt] = {}
for _option in _OPTIONS:
    BY_NAME[_option.name] = _option
    for _alias in _option.aliases:
        BY_NAME[_alias] = _option


def normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def lookup_option(name: str, mode: str) -> _Opt | None:
    option = BY_NAME.get(name)
    if option is None or mode not in option.modes:
        return None
    return option


def unknown_option_message(name: str, mode: str) -> str:
    other = BY_NAME.get(name)
    if other is not None:
        where = "dkproxy out (dkimproxy.out)" if "out" in other.modes else "dkproxy in"
        return f"option {name!r} only applies to {where}"
    candidates = [o for o, opt in BY_NAME.items() if mode in opt.modes]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {name!r}{hint}"


# ---------------------------------------------------------------------------------------------
# Collected settings and their conversion into model values
# ---------------------------------------------------------------------------------------------


@dataclass
class Setting:
    option: _Opt
    value: str | None  # None: a bare flag
    where: str  # "FILE:LINE" or "command line: --opt"
    spelled: str  # the option as written, for messages


@dataclass
class Values:
    """Field values being assembled, with where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    address_parts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def set(self, name: str, value: Any, where: str) -> None:
        self.values[name] = value
        self.sources[name] = where


def _error(setting: Setting, message: str) -> ConfigError:
    if setting.where.startswith(COMMAND_LINE):
        return ConfigError(COMMAND_LINE, None, f"{setting.spelled}: {message}")
    return ConfigError.at(setting.where, f"{setting.option.name}: {message}")


def apply_settings(mode: str, settings: list[Setting], acc: Values, replace: bool) -> None:
    """Apply one source's settings on top of `acc`.

    With `replace` (the command line over a file) a list option given here drops the
    earlier list, as Net::Server's process_args does.
    """
    seen_scalar: dict[str, Setting] = {}
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
                    check_identity_syntax(value, with_sample_macros(value))
                acc.set(target, value, setting.where)
            else:  # pragma: no cover - the option table and this switch must agree
                raise AssertionError(f"unhandled option kind {kind}")
        except ValueError as exc:
            raise _error(setting, str(exc)) from None


def resolve_addresses(acc: Values, positional: list[tuple[str, str]]) -> None:
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
