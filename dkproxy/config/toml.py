"""dkproxy's native TOML format (`-c FILE.toml`): its schema (extra='forbid') and its
conversion into the same collected values as a DKIMproxy file."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dkproxy.config.errors import ConfigError, format_validation_error, read_text
from dkproxy.config.models import (
    ArcSealConfig,
    HostPort,
    SignatureTemplate,
    SignRule,
    check_action_key,
    parse_metrics_address,
)
from dkproxy.config.options import Values
from dkproxy.config.signatures import check_selector, make_signature_template, parse_header_list
from dkproxy.config.values import (
    ACTIONS,
    DEFAULT_RELAY_PORT,
    Mode,
    is_domain,
    is_safe_local_part,
    parse_domain_list,
    parse_log_level,
    parse_size,
)
from dkproxy.util.domains import DomainError, canonical_domain

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


class TomlLog(BaseModel):
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
    log: TomlLog = Field(default_factory=TomlLog)
    limits: _TomlLimits = Field(default_factory=lambda: _TomlLimits())

    @field_validator("max_message_size")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else parse_size(value)


class TomlOut(_TomlCommon):
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


def toml_settings(path: str, mode: Mode | None) -> tuple[Mode, Values]:
    text = read_text(path)
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
    schema: type[_TomlCommon] = TomlOut if mode == "out" else _TomlIn
    try:
        doc = schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, None, format_validation_error(exc, schema)) from None
    return mode, toml_values(path, doc)


def toml_values(path: str, doc: _TomlCommon) -> Values:
    acc = Values()
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

    if isinstance(doc, TomlOut):
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
