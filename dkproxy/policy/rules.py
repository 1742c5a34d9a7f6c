"""Signing rules prepared at start-up: each configured signature with its key loaded and its
selector, algorithm, canonicalization and h= settled against the global defaults
(DKIMproxy 1.4 get_signature_options), so a bad value stops the daemon naming FILE:LINE."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dkproxy.config import (
    ConfigError,
    OutboundConfig,
    SignatureTemplate,
    check_canonicalization,
    is_domain,
)
from dkproxy.mailauth.keys import KeyCache, KeyLoadError, SigningKey
from dkproxy.policy.macros import Template, Unsafe, check_identity

SignatureKind = Literal["dkim", "domainkeys", "arc"]

#: Header fields DKIM must sign (RFC 6376 section 5.4).
REQUIRED_DKIM_HEADERS = ("from",)


@dataclass(frozen=True)
class PreparedSignature:
    """A signature with key, selector, algorithm and canonicalization settled."""

    kind: SignatureKind
    selector: str
    key: SigningKey
    algorithm: str
    canonicalization: str
    headers: tuple[str, ...] | None
    domain: Template  # may be "$key" (the matched domain) when no d= was configured
    identity: Template | None
    source: str
    label: str
    authserv_id: str | None = None

    def describe(self, key_domain: str | None) -> str:
        domain = self.domain.text
        if domain == "$key" and key_domain is not None:
            domain = key_domain
        opts = [f"d={domain}", f"s={self.selector}", f"a={self.algorithm}"]
        opts.append(f"c={self.canonicalization}")
        if self.identity is not None:
            opts.append(f"i={self.identity.text}")
        if self.headers is not None:
            opts.append("h=" + ":".join(self.headers))
        opts.append(f"key={self.key.path} ({self.key.kind} {self.key.bits})")
        return f"{self.kind}({', '.join(opts)})"


@dataclass(frozen=True)
class Rule:
    """A map entry, TOML rule or the default signatures, ready for `select`."""

    name: str  # the pattern as matched, e.g. "example.org", "jason@long.name", "*"
    label: str  # for Selection.rule / describe, e.g. "sender_map example.org (file:3)"
    signatures: tuple[PreparedSignature, ...]
    key_domain: str | None  # what $key and a missing d= stand for
    where: str  # "FILE:LINE" or "FILE: sign[0]"
    exact_key_domain: str | None = None  # list-id rules matched in full


class RuleBuilder:
    """Resolves templates against the global defaults and loads their keys."""

    def __init__(self, cfg: OutboundConfig, keys: KeyCache, warnings: list[str]) -> None:
        self.cfg = cfg
        self.keys = keys
        self.warnings = warnings

    def sender_rule(
        self, pattern: str, templates: list[SignatureTemplate], where: str, toml: bool = False
    ) -> Rule | None:
        if not toml:
            if pattern == ".":
                pattern = "*"
            elif pattern.startswith(".") or pattern == "*":
                self.warnings.append(
                    f"{where}: {pattern!r} never matches in a DKIMproxy map (a plain domain "
                    "entry already covers its subdomains); entry ignored"
                )
                return None
            elif "@" in pattern:
                local, _, domain = pattern.rpartition("@")
                if not local or not is_domain(domain):
                    raise ConfigError.at(where, f"{pattern!r} is not an address or domain")
            elif not is_domain(pattern.rstrip(".")):
                raise ConfigError.at(where, f"{pattern!r} is not an address or domain")
            pattern = pattern.rstrip(".")
        if pattern == "*":
            key_domain = None
        elif "@" in pattern:
            key_domain = pattern.rpartition("@")[2]
        else:
            key_domain = pattern.lstrip(".")
        kind = "sender_map" if not toml else "rule"
        label = f"{kind} {'catch-all' if pattern == '*' else pattern} ({where})"
        return self.rule(pattern, label, templates, key_domain, where)

    def listid_rule(
        self, pattern: str, templates: list[SignatureTemplate], where: str, toml: bool = False
    ) -> Rule | None:
        if pattern == "." or (toml and pattern == "*"):
            pattern = "*"
        elif pattern.startswith(".") or pattern == "*":
            self.warnings.append(f"{where}: {pattern!r} never matches in a listid_map; ignored")
            return None
        if pattern == "*":
            key_domain = exact = None
        else:
            # LookupMap: a suffix match gives the suffix; a full match gives the id minus its
            # first label ("announce.example.org" -> "example.org").
            key_domain = pattern
            exact = pattern.split(".", 1)[1] if "." in pattern else pattern
        kind = "listid_map" if not toml else "rule"
        label = f"{kind} List-Id {'catch-all' if pattern == '*' else pattern} ({where})"
        return self.rule(pattern, label, templates, key_domain, where, exact_key_domain=exact)

    def rule(
        self,
        name: str,
        label: str,
        templates: list[SignatureTemplate],
        key_domain: str | None,
        where: str,
        *,
        default: bool = False,
        exact_key_domain: str | None = None,
    ) -> Rule:
        prepared = tuple(self.prepare(t, key_domain, default, exact_key_domain) for t in templates)
        if sum(p.kind == "arc" for p in prepared) > 1:
            raise ConfigError.at(where, "one ARC set per message: give at most one arc(...)")
        return Rule(name, label, prepared, key_domain, where, exact_key_domain)

    def prepare(
        self,
        template: SignatureTemplate,
        key_domain: str | None,
        default: bool,
        exact_key_domain: str | None,
    ) -> PreparedSignature:
        cfg = self.cfg
        where = template.source or (cfg.source_files[-1] if cfg.source_files else "command line")

        def fail(message: str) -> ConfigError:
            return ConfigError.at(where, f"{template.describe()}: {message}")

        # key
        key_path = template.key or cfg.keyfile
        key_where = where if template.key else cfg.sources.get("keyfile", where)
        if not key_path:
            raise fail("no key file: set 'keyfile' or key= in the signature")
        try:
            key = self.keys.get(key_path)
        except KeyLoadError as exc:
            raise ConfigError.at(key_where, f"key file {exc}") from None

        # selector
        selector = template.selector or cfg.selector
        if not selector:
            raise fail("no selector: set 'selector' or s= in the signature")

        # d=: the signature's own, else the matched/configured domain (possibly a macro)
        if template.domain is not None:
            domain = Template.parse(template.domain)
        elif default and len(cfg.domains) == 1 and "$" in cfg.domains[0]:
            domain = Template.parse(cfg.domains[0])
        elif key_domain is not None:
            domain = Template.parse("$key")
        else:
            if default:
                raise fail("domain not specified: set 'domain' or d= in the signature")
            raise fail("a catch-all entry must give d= (e.g. d=example.org or d=$senderdomain)")
        if "key" in domain.macros or "keydomain" in domain.macros:
            if key_domain is None:
                raise fail("$key has no matched domain here; give d= explicitly")
            for value in {key_domain, exact_key_domain} - {None}:
                if not is_domain(str(value)):
                    raise fail(f"matched key {value!r} is not a domain; give d= explicitly")

        # canonicalization (DKIMproxy: c= > dkim_method/domainkeys_method > method > default)
        if template.kind == "arc":
            canon = "relaxed/relaxed"  # RFC 8617: ARC signatures are always relaxed/relaxed
        elif template.kind == "dkim":
            canon = template.canonicalization or cfg.dkim_method or cfg.method or "relaxed"
        else:
            canon = template.canonicalization or cfg.domainkeys_method or cfg.method or "nofws"
        try:
            if template.kind != "arc":
                check_canonicalization(template.kind, canon)
        except ValueError as exc:
            raise fail(str(exc)) from None
        if template.kind == "dkim" and "/" not in canon:
            canon = f"{canon}/simple"  # RFC 6376 3.5: the body defaults to simple

        # algorithm
        algorithm = self._algorithm(template, key, fail)

        # i=
        identity_text = template.identity
        if identity_text is None and default and template.kind == "dkim" and cfg.identity:
            identity_text = cfg.identity
        identity = Template.parse(identity_text) if identity_text is not None else None
        if identity is not None and template.kind == "domainkeys":
            raise fail("DomainKeys signatures have no i= tag")
        if "key" in (identity.macros if identity else set()) and key_domain is None:
            raise fail("$key has no matched domain here")

        # h=
        headers = tuple(template.headers) if template.headers is not None else None
        if template.kind == "dkim" and headers is not None:
            missing = [h for h in REQUIRED_DKIM_HEADERS if h not in headers]
            if missing:
                raise fail(f"h= must include {', '.join(missing)} (RFC 6376 5.4)")

        shown_domain = key_domain if domain.text == "$key" and key_domain else domain.text
        prepared = PreparedSignature(
            kind=template.kind,
            selector=selector,
            key=key,
            algorithm=algorithm,
            canonicalization=canon,
            headers=headers,
            domain=domain,
            identity=identity,
            source=where,
            label=f"{template.kind}(d={shown_domain}, s={selector}) from {where}",
            authserv_id=template.authserv_id,
        )
        # Check values fixed per rule now, so a wrong i= is a start-up error, not a skip.
        if domain.macros <= {"key", "keydomain"}:
            key_values = [v for v in (key_domain, exact_key_domain) if v is not None] or [None]
            for value in key_values:
                sample = domain.render(None, value)
                if not is_domain(sample):
                    raise fail(f"d={sample!r} is not a valid domain name")
                try:
                    check_identity(identity, sample, None, value, static_only=True)
                except Unsafe as exc:
                    raise fail(str(exc)) from None
        return prepared

    @staticmethod
    def _algorithm(
        template: SignatureTemplate, key: SigningKey, fail: Callable[[str], ConfigError]
    ) -> str:
        wanted = template.algorithm
        if template.kind == "arc":
            if key.kind != "rsa":
                raise fail(f"ARC needs an RSA key (RFC 8617); {key.path} is {key.kind}")
            return "rsa-sha256"
        if template.kind == "domainkeys":
            if key.kind != "rsa":
                raise fail(f"DomainKeys needs an RSA key; {key.path} is {key.kind}")
            if wanted not in (None, "rsa-sha1"):
                raise fail(f"DomainKeys only supports a=rsa-sha1, not {wanted}")
            return "rsa-sha1"
        if wanted == "rsa-sha1":
            raise fail("a=rsa-sha1 must not be used for DKIM signing (RFC 8301); use rsa-sha256")
        natural = "rsa-sha256" if key.kind == "rsa" else "ed25519-sha256"
        if wanted is not None and wanted != natural:
            raise fail(f"a={wanted} does not fit the {key.kind} key {key.path} (use {natural})")
        return natural
