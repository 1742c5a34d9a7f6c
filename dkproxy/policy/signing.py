"""Signing policy: which signatures, with which keys, a given message gets.

Everything that can be checked without a message is checked by `SigningPolicy.from_config`:
key files are loaded (and sized), map files parsed, macros and tags validated, so a bad
configuration stops the daemon at start-up with FILE:LINE instead of failing mail later.
`select` then only does dictionary look-ups and fills in macros.

Semantics follow DKIMproxy 1.4.1 (scripts/dkimproxy.out get_signature_options, best_domain,
signer_policy, interpret_macros; lib/LookupMap.pm):

* The sender is the Sender header's address, else From's (Mail::DKIM message_sender);
  dkproxy.mailauth.message.Message.sender() supplies it.
* Order: the listid_map is consulted first (only if the message has a List-Id), then the
  sender_map, then the default signatures. The first source that matches decides alone.
  Without any sender only a catch-all map entry can match (DKIMproxy failed such a message
  with a temporary error whenever it needed the sender).
* Map look-up keys, most specific first: the full address `user+ext@sub.example.org`, the
  address without the +extension, the domain `sub.example.org`, each parent domain
  (`example.org`, `org`), then the catch-all `.`. A plain domain entry therefore also covers
  all subdomains. For a List-Id `a.lists.example.org` the keys are the id, its parent domains
  and `.`. Keys are compared in lower case, domains as A-labels (U-labels in a map, the
  configuration or the message are converted; see dkproxy.mailauth.addresses).
* The default d= of a map signature is the matched key (its domain part for an address key);
  for a List-Id matched in full, the id without its first label.
* Default signatures (`signature`, or the implicit `dkim`): with one `domain` every message is
  signed with it, whatever the sender (DKIMproxy 1.4 release notes: "dkimproxy.out will ALWAYS
  add a DKIM signature"); with several, the sender's domain or its nearest parent in the list
  is used and a sender matching none gets no signature at all; with no `domain`, each
  signature must carry its own d=. A signature's own d= overrides the matched domain.
* A DomainKeys signature is only added when the sender's domain is d= or a subdomain of it
  (signer_policy skips it otherwise); the policy drops it here and says why in `reason`.
* Macros, in d= and i= only: `$sender` (the sender address), `$senderdomain`, `$key` /
  `$keydomain` (the matched domain); `$$` is a literal `$`.

Deliberate differences, each safer or documented-but-broken in DKIMproxy:
* DKIM without a= used Mail::DKIM's default rsa-sha1; dkproxy signs rsa-sha256 (or
  ed25519-sha256 for an Ed25519 key) and refuses an explicit rsa-sha1 (RFC 8301).
* A value from the message (sender address or domain) is only substituted when it is plain
  dot-atom / LDH text: no `;`, `=`, whitespace, CR/LF or quotes can reach a signature tag.
  A signature whose macro result is unsafe, whose d= is not a domain name, or whose i= is not
  within d= is skipped with a reason (DKIMproxy substituted blindly).
* `--identity` was validated but never applied by 1.4.1; dkproxy applies it, as documented,
  to the default DKIM signatures that have no i= of their own.
* `h=` was parsed but ignored (Mail::DKIM's default list was used); dkproxy honours it and
  requires it to contain From (RFC 6376 5.4).
* LookupMap stripped "+ext@" wrongly (`s/\\+(.*)\\@//` turns jason+x@long.name into
  "jasonlong.name"), so extension addresses never matched their domain entry; dkproxy does
  what its comment says. Map keys with capitals never matched; dkproxy lower-cases them.
  Map files are read once at start-up (DKIMproxy re-read them when their mtime changed).
* Entries DKIMproxy can never match (`.example.org`, `*`) are ignored with a warning. A
  catch-all `.` entry must give d= (DKIMproxy would sign with d=.).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dkproxy.config import (
    ConfigError,
    OutboundConfig,
    SignatureTemplate,
    check_canonicalization,
    is_domain,
    is_safe_local_part,
    parse_signature_list,
)
from dkproxy.mailauth.addresses import DomainError, canonical_domain, canonical_domain_or_none
from dkproxy.mailauth.keys import KeyCache, KeyLoadError, SigningKey
from dkproxy.mailauth.message import Address

SignatureKind = Literal["dkim", "domainkeys", "arc"]

#: Header fields DKIM must sign (RFC 6376 section 5.4).
_REQUIRED_DKIM_HEADERS = ("from",)


@dataclass(frozen=True)
class SignatureSpec:
    """A concrete signature to add to one message."""

    kind: SignatureKind
    domain: str
    selector: str
    key: SigningKey
    #: dkim: 'rsa-sha256' | 'ed25519-sha256' (matching key.kind); domainkeys: 'rsa-sha1'.
    algorithm: str
    #: dkim: 'header/body', e.g. 'relaxed/simple'; domainkeys: 'simple' | 'nofws'.
    canonicalization: str
    identity: str | None = None
    #: Header field names to sign (lower case); None lets the signer choose.
    headers: tuple[str, ...] | None = None
    #: Where this signature was configured, for log lines.
    source: str = ""
    #: arc: whose Authentication-Results the ARC set seals.
    authserv_id: str | None = None


@dataclass(frozen=True)
class Selection:
    """What `select` decided: the signatures, the rule that matched, and why not more.

    `reason` is set when nothing is signed ("no sender ...", "sender domain x is not one of
    the configured domains ...") and also when some configured signatures were skipped.
    """

    specs: tuple[SignatureSpec, ...]
    rule: str | None
    reason: str | None


class _Unsafe(Exception):
    """A macro could not be filled safely for this message."""


# ---------------------------------------------------------------------------------------------
# Macro templates
# ---------------------------------------------------------------------------------------------

_MACRO_SPLIT = re.compile(r"\$(\$|[A-Za-z_]\w*)")


def _shown(text: str) -> str:
    """A message-derived value, quoted and shortened for a log line."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


@dataclass(frozen=True)
class _Template:
    """A d= or i= value with macros, split once at load time."""

    text: str
    parts: tuple[tuple[bool, str], ...]  # (is_macro, text or macro name)

    @classmethod
    def parse(cls, text: str) -> _Template:
        parts: list[tuple[bool, str]] = []
        last = 0
        for match in _MACRO_SPLIT.finditer(text):
            if match.start() > last:
                parts.append((False, text[last : match.start()]))
            name = match.group(1)
            parts.append((False, "$") if name == "$" else (True, name))
            last = match.end()
        if last < len(text):
            parts.append((False, text[last:]))
        return cls(text, tuple(parts))

    @property
    def literal(self) -> str | None:
        """The value when there is no macro, else None."""
        if any(is_macro for is_macro, _ in self.parts):
            return None
        return "".join(text for _, text in self.parts)

    @property
    def macros(self) -> set[str]:
        return {name for is_macro, name in self.parts if is_macro}

    def render(self, sender: Address | None, key: str | None) -> str:
        out: list[str] = []
        for is_macro, text in self.parts:
            out.append(_macro_value(text, sender, key) if is_macro else text)
        return "".join(out)


def _macro_value(name: str, sender: Address | None, key: str | None) -> str:
    if name in ("sender", "senderdomain"):
        if sender is None:
            raise _Unsafe(f"${name} needs a sender address and the message has none")
        if not is_domain(sender.domain):
            raise _Unsafe(f"sender domain {_shown(sender.domain)} is not a plain domain name")
        if name == "senderdomain":
            return sender.domain
        if not is_safe_local_part(sender.local):
            raise _Unsafe(
                f"sender local part {_shown(sender.local)} has characters a DKIM tag cannot carry"
            )
        return f"{sender.local}@{sender.domain}"
    if name in ("key", "keydomain"):
        if key is None:  # pragma: no cover - rejected at load time
            raise _Unsafe(f"${name} has no matched domain here")
        return key.rpartition("@")[2] if name == "keydomain" else key
    raise _Unsafe(f"unknown macro ${name}")  # pragma: no cover - rejected at load time


# ---------------------------------------------------------------------------------------------
# Prepared signatures and rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """A signature with key, selector, algorithm and canonicalization settled."""

    kind: SignatureKind
    selector: str
    key: SigningKey
    algorithm: str
    canonicalization: str
    headers: tuple[str, ...] | None
    domain: _Template  # may be "$key" (the matched domain) when no d= was configured
    identity: _Template | None
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
class _Rule:
    """A map entry, TOML rule or the default signatures, ready for `select`."""

    name: str  # the pattern as matched, e.g. "example.org", "jason@long.name", "*"
    label: str  # for Selection.rule / describe, e.g. "sender_map example.org (file:3)"
    signatures: tuple[_Prepared, ...]
    key_domain: str | None  # what $key and a missing d= stand for
    where: str  # "FILE:LINE" or "FILE: sign[0]"
    exact_key_domain: str | None = None  # list-id rules matched in full


class SigningPolicy:
    """Key selection for outbound mail; build with `from_config`."""

    def __init__(self) -> None:
        self._listid: dict[str, _Rule] = {}
        self._sender: dict[str, _Rule] = {}
        self._default: _Rule | None = None
        self._default_by_domain: dict[str, _Rule] = {}
        self._default_mode: Literal["none", "all", "domains"] = "none"
        self._domains: tuple[str, ...] = ()
        self.warnings: list[str] = []

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: OutboundConfig, keys: KeyCache | None = None) -> SigningPolicy:
        """Load every key and map file now; raise ConfigError naming the line at fault."""
        policy = cls()
        builder = _Builder(cfg, keys or KeyCache(cfg.min_rsa_bits), policy.warnings)
        policy.warnings.extend(cfg.warnings)

        if cfg.listid_map:
            for pattern, templates, where in _read_map(cfg.listid_map, cfg, "listid_map"):
                policy._add(policy._listid, builder.listid_rule(pattern, templates, where), where)
        if cfg.sender_map:
            for pattern, templates, where in _read_map(cfg.sender_map, cfg, "sender_map"):
                policy._add(policy._sender, builder.sender_rule(pattern, templates, where), where)
        for rule in cfg.rules:
            if rule.match.startswith("list-id:"):
                pattern = rule.match[len("list-id:") :]
                prepared = builder.listid_rule(pattern, rule.signatures, rule.source, toml=True)
                policy._add(policy._listid, prepared, rule.source)
            else:
                prepared = builder.sender_rule(rule.match, rule.signatures, rule.source, True)
                policy._add(policy._sender, prepared, rule.source)

        policy._domains = tuple(cfg.domains)
        templates = list(cfg.signatures)
        if templates:
            if len(cfg.domains) > 1:
                policy._default_mode = "domains"
                for domain in cfg.domains:
                    label = f"default signatures, domain {domain}"
                    policy._default_by_domain[domain] = builder.rule(
                        domain, label, templates, domain, "default", default=True
                    )
            else:
                policy._default_mode = "all"
                domain = cfg.domains[0] if cfg.domains else None
                label = (
                    f"default signatures, single domain {domain} (signs every message)"
                    if domain
                    else "default signatures (every message)"
                )
                key_domain = domain if domain and "$" not in domain else None
                policy._default = builder.rule(
                    "*", label, templates, key_domain, "default", default=True
                )
        return policy

    def _add(self, table: dict[str, _Rule], rule: _Rule | None, where: str) -> None:
        if rule is None:
            return
        previous = table.get(rule.name)
        if previous is not None:
            in_map = re.fullmatch(r".+:\d+", where) is not None
            if not in_map or _file_of(previous.where) != _file_of(where):
                raise ConfigError.at(
                    where, f"{rule.name!r} is already configured by {previous.label}"
                )
            # LookupMap reads a map into a hash: a later line with the same key wins.
            self.warnings.append(
                f"{where}: {rule.name!r} appears again (first at {previous.where}); "
                "this later entry wins, as in DKIMproxy"
            )
        table[rule.name] = rule

    # -- per message ---------------------------------------------------------------------------

    def select(
        self, sender: Address | None, list_id: str | None, *, no_sender: str = ""
    ) -> Selection:
        """Decide the signatures for a message with this sender (Sender/From) and List-Id.

        `sender` has its domain in A-labels (dkproxy.mailauth.addresses), as every rule has; without
        a sender, `no_sender` says why (it becomes the reason when nothing is signed).
        """
        no_sender = no_sender or "no sender address (no usable Sender or From header)"
        if list_id and self._listid:
            ident = _canonical_list_id(list_id)
            for key in _listid_keys(ident):
                rule = self._listid.get(key)
                if rule is not None:
                    key_domain = (
                        rule.exact_key_domain
                        if key == ident and rule.exact_key_domain is not None
                        else rule.key_domain
                    )
                    return self._render(rule, sender, key_domain)
        if self._sender:
            # Without a sender only a catch-all entry can apply.
            for key in _sender_keys(sender) if sender is not None else ["*"]:
                rule = self._sender.get(key)
                if rule is not None:
                    return self._render(rule, sender, rule.key_domain)
        if self._default_mode == "all" and self._default is not None:
            return self._render(self._default, sender, self._default.key_domain)
        if self._default_mode == "domains":
            if sender is None:
                return Selection((), None, no_sender)
            for domain in _domain_and_parents(sender.domain):
                rule = self._default_by_domain.get(domain)
                if rule is not None:
                    return self._render(rule, sender, rule.key_domain)
            return Selection(
                (),
                None,
                f"sender domain {_shown(sender.domain)} is not one of the configured domains "
                f"({', '.join(self._domains)}) or below one",
            )
        if sender is None:
            return Selection((), None, no_sender)
        what = f"sender {_shown(str(sender))}"
        if list_id and self._listid:
            what += f" or List-Id {_shown(list_id)}"
        return Selection((), None, f"no signing rule matches {what}")

    def _render(self, rule: _Rule, sender: Address | None, key_domain: str | None) -> Selection:
        specs: list[SignatureSpec] = []
        notes: list[str] = []
        for prepared in rule.signatures:
            try:
                specs.append(_concrete(prepared, sender, key_domain))
            except _Unsafe as exc:
                notes.append(f"{prepared.label} skipped: {exc}")
        if not rule.signatures:
            notes.append(f"{rule.label} lists no signatures (do not sign)")
        return Selection(tuple(specs), rule.label, "; ".join(notes) or None)

    # -- introspection -------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """The effective rules in look-up order, for `dkproxy check-config`."""
        lines: list[str] = []

        def add(rule: _Rule, key_domain: str | None) -> None:
            lines.append(f"{rule.label}:")
            if not rule.signatures:
                lines.append("    (no signature)")
            for prepared in rule.signatures:
                lines.append(f"    {prepared.describe(key_domain)}")

        for rule in self._listid.values():
            add(rule, rule.key_domain)
        for rule in self._sender.values():
            add(rule, rule.key_domain)
        if self._default is not None:
            add(self._default, self._default.key_domain)
        for rule in self._default_by_domain.values():
            add(rule, rule.key_domain)
        if not lines:
            lines.append("no signing rules: no message will be signed")
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        return lines

    def signing_keys(self) -> list[tuple[str, str, SigningKey, str]]:
        """(domain, selector, key, source) for every configured key, for `dkproxy dnscheck`.

        A d= that depends on the message is reported as its pattern, e.g. "$senderdomain".
        """
        seen: set[tuple[str, str, str]] = set()
        result: list[tuple[str, str, SigningKey, str]] = []
        rules = [
            *self._listid.values(),
            *self._sender.values(),
            *([self._default] if self._default is not None else []),
            *self._default_by_domain.values(),
        ]
        for rule in rules:
            domains = [rule.key_domain]
            if rule.exact_key_domain is not None:
                domains.append(rule.exact_key_domain)
            for prepared in rule.signatures:
                for key_domain in domains:
                    literal = prepared.domain.literal
                    if literal is not None:
                        domain = literal
                    elif prepared.domain.text == "$key" and key_domain is not None:
                        domain = key_domain
                    else:
                        domain = prepared.domain.text
                    marker = (domain, prepared.selector, prepared.key.path)
                    if marker in seen:
                        continue
                    seen.add(marker)
                    result.append((domain, prepared.selector, prepared.key, prepared.source))
        return result


def _file_of(where: str) -> str:
    match = re.fullmatch(r"(.+):\d+", where)
    return match.group(1) if match else where


# ---------------------------------------------------------------------------------------------
# Look-up keys
# ---------------------------------------------------------------------------------------------


def _domain_and_parents(domain: str) -> list[str]:
    labels = domain.lower().rstrip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels)) if labels[i]]


def _sender_keys(sender: Address) -> list[str]:
    """Most specific first: address, address without +ext, domain, (.)parents, catch-all."""
    local = sender.local.lower()
    domain = sender.domain.lower()
    keys = [f"{local}@{domain}"]
    if "+" in local:
        base = local.split("+", 1)[0]
        if base:
            keys.append(f"{base}@{domain}")
    chain = _domain_and_parents(domain)
    keys.append(chain[0] if chain else domain)
    for parent in chain[1:]:
        keys.append("." + parent)  # TOML ".example.org": subdomains only
        keys.append(parent)
    keys.append("*")
    return keys


def _canonical_list_id(list_id: str) -> str:
    """A List-Id identifier with its domain-like labels in A-labels where they have one."""
    ident = list_id.strip().strip("<>").lower()
    return canonical_domain_or_none(ident) or ident


def _listid_keys(ident: str) -> list[str]:
    return [*_domain_and_parents(ident), "*"]


# ---------------------------------------------------------------------------------------------
# Map files (DKIMproxy sender_map / listid_map format)
# ---------------------------------------------------------------------------------------------


def _read_map(
    path: str, cfg: OutboundConfig, option: str
) -> list[tuple[str, list[SignatureTemplate], str]]:
    """Parse a DKIMproxy map: `KEY  SIGNATURE[, SIGNATURE...]` per line, # or ; comments."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        where = cfg.sources.get(option, path)
        raise ConfigError.at(
            where, f"{option} {path}: cannot read ({exc.strerror or exc})"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not valid UTF-8") from None
    entries: list[tuple[str, list[SignatureTemplate], str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.replace("\t", " ").partition(" ")
        value = value.strip()
        where = f"{path}:{number}"
        if not value:
            raise ConfigError(path, number, f"{key!r} has no signature list (e.g. dkim)")
        try:
            templates = parse_signature_list(value, where)
        except ValueError as exc:
            raise ConfigError(path, number, str(exc)) from None
        entries.append((_canonical_key(key.lower(), where), templates, where))
    return entries


def _canonical_key(key: str, where: str) -> str:
    """A map key with its domain in A-labels, so U-label and A-label entries both match."""
    if key in (".", "*"):
        return key
    lead = "." if key.startswith(".") else ""
    local, at, domain = key[len(lead) :].rpartition("@")
    try:
        return f"{lead}{local}{at}{canonical_domain(domain)}"
    except DomainError as exc:
        raise ConfigError.at(where, f"{key!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Building prepared rules
# ---------------------------------------------------------------------------------------------


class _Builder:
    """Resolves templates against the global defaults and loads their keys."""

    def __init__(self, cfg: OutboundConfig, keys: KeyCache, warnings: list[str]) -> None:
        self.cfg = cfg
        self.keys = keys
        self.warnings = warnings

    def sender_rule(
        self, pattern: str, templates: list[SignatureTemplate], where: str, toml: bool = False
    ) -> _Rule | None:
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
    ) -> _Rule | None:
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
    ) -> _Rule:
        prepared = tuple(self.prepare(t, key_domain, default, exact_key_domain) for t in templates)
        if sum(p.kind == "arc" for p in prepared) > 1:
            raise ConfigError.at(where, "one ARC set per message: give at most one arc(...)")
        return _Rule(name, label, prepared, key_domain, where, exact_key_domain)

    def prepare(
        self,
        template: SignatureTemplate,
        key_domain: str | None,
        default: bool,
        exact_key_domain: str | None,
    ) -> _Prepared:
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
            domain = _Template.parse(template.domain)
        elif default and len(cfg.domains) == 1 and "$" in cfg.domains[0]:
            domain = _Template.parse(cfg.domains[0])
        elif key_domain is not None:
            domain = _Template.parse("$key")
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
        identity = _Template.parse(identity_text) if identity_text is not None else None
        if identity is not None and template.kind == "domainkeys":
            raise fail("DomainKeys signatures have no i= tag")
        if "key" in (identity.macros if identity else set()) and key_domain is None:
            raise fail("$key has no matched domain here")

        # h=
        headers = tuple(template.headers) if template.headers is not None else None
        if template.kind == "dkim" and headers is not None:
            missing = [h for h in _REQUIRED_DKIM_HEADERS if h not in headers]
            if missing:
                raise fail(f"h= must include {', '.join(missing)} (RFC 6376 5.4)")

        shown_domain = key_domain if domain.text == "$key" and key_domain else domain.text
        prepared = _Prepared(
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
                    _check_identity(identity, sample, None, value, static_only=True)
                except _Unsafe as exc:
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


def _check_identity(
    identity: _Template | None,
    domain: str,
    sender: Address | None,
    key_domain: str | None,
    static_only: bool = False,
) -> str | None:
    """Render i= and check it is a safe address within d=; raise _Unsafe."""
    if identity is None:
        return None
    if static_only and identity.literal is None and not identity.macros <= {"key", "keydomain"}:
        return None  # depends on the message; checked per message
    value = identity.render(sender, key_domain)
    local, at, id_domain = value.rpartition("@")
    id_domain = id_domain.lower()
    if not at or not is_domain(id_domain) or (local and not is_safe_local_part(local)):
        raise _Unsafe(f"i={_shown(value)} is not a safe address")
    if id_domain != domain and not id_domain.endswith("." + domain):
        raise _Unsafe(f"i={_shown(value)} is not within d={domain} (RFC 6376 3.5)")
    return value


def _concrete(prepared: _Prepared, sender: Address | None, key_domain: str | None) -> SignatureSpec:
    """Fill the macros of one prepared signature for one message; raise _Unsafe."""
    domain = prepared.domain.render(sender, key_domain).lower().rstrip(".")
    if not is_domain(domain):
        raise _Unsafe(f"d={_shown(domain)} is not a valid domain name")
    identity = _check_identity(prepared.identity, domain, sender, key_domain)
    if prepared.kind == "domainkeys":
        # dkimproxy.out signer_policy: DomainKeys only for a sender at d= or below it.
        if sender is None:
            raise _Unsafe("DomainKeys needs a sender address and the message has none")
        sender_domain = sender.domain.lower()
        if sender_domain != domain and not sender_domain.endswith("." + domain):
            raise _Unsafe(
                f"DomainKeys requires the sender domain to be {domain} or below it, "
                f"not {_shown(sender_domain)}"
            )
    return SignatureSpec(
        kind=prepared.kind,
        domain=domain,
        selector=prepared.selector,
        key=prepared.key,
        algorithm=prepared.algorithm,
        canonicalization=prepared.canonicalization,
        identity=identity,
        headers=prepared.headers,
        source=prepared.source,
        authserv_id=prepared.authserv_id,
    )


__all__ = ["Selection", "SignatureSpec", "SigningPolicy"]
