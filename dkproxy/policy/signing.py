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
  configuration or the message are converted; see dkproxy.util.domains).
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
from dataclasses import dataclass
from typing import Literal

from dkproxy.config import ConfigError, OutboundConfig, is_domain
from dkproxy.mailauth.keys import KeyCache, SigningKey
from dkproxy.mailauth.message import Address
from dkproxy.policy.macros import Unsafe, check_identity, shown
from dkproxy.policy.maps import (
    canonical_list_id,
    domain_and_parents,
    listid_keys,
    read_map,
    sender_keys,
)
from dkproxy.policy.rules import PreparedSignature, Rule, RuleBuilder, SignatureKind


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


class SigningPolicy:
    """Key selection for outbound mail; build with `from_config`."""

    def __init__(self) -> None:
        self._listid: dict[str, Rule] = {}
        self._sender: dict[str, Rule] = {}
        self._default: Rule | None = None
        self._default_by_domain: dict[str, Rule] = {}
        self._default_mode: Literal["none", "all", "domains"] = "none"
        self._domains: tuple[str, ...] = ()
        self.warnings: list[str] = []

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: OutboundConfig, keys: KeyCache | None = None) -> SigningPolicy:
        """Load every key and map file now; raise ConfigError naming the line at fault."""
        policy = cls()
        builder = RuleBuilder(cfg, keys or KeyCache(cfg.min_rsa_bits), policy.warnings)
        policy.warnings.extend(cfg.warnings)

        if cfg.listid_map:
            for pattern, templates, where in read_map(cfg.listid_map, cfg, "listid_map"):
                policy._add(policy._listid, builder.listid_rule(pattern, templates, where), where)
        if cfg.sender_map:
            for pattern, templates, where in read_map(cfg.sender_map, cfg, "sender_map"):
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

    def _add(self, table: dict[str, Rule], rule: Rule | None, where: str) -> None:
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
            ident = canonical_list_id(list_id)
            for key in listid_keys(ident):
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
            for key in sender_keys(sender) if sender is not None else ["*"]:
                rule = self._sender.get(key)
                if rule is not None:
                    return self._render(rule, sender, rule.key_domain)
        if self._default_mode == "all" and self._default is not None:
            return self._render(self._default, sender, self._default.key_domain)
        if self._default_mode == "domains":
            if sender is None:
                return Selection((), None, no_sender)
            for domain in domain_and_parents(sender.domain):
                rule = self._default_by_domain.get(domain)
                if rule is not None:
                    return self._render(rule, sender, rule.key_domain)
            return Selection(
                (),
                None,
                f"sender domain {shown(sender.domain)} is not one of the configured domains "
                f"({', '.join(self._domains)}) or below one",
            )
        if sender is None:
            return Selection((), None, no_sender)
        what = f"sender {shown(str(sender))}"
        if list_id and self._listid:
            what += f" or List-Id {shown(list_id)}"
        return Selection((), None, f"no signing rule matches {what}")

    def _render(self, rule: Rule, sender: Address | None, key_domain: str | None) -> Selection:
        specs: list[SignatureSpec] = []
        notes: list[str] = []
        for prepared in rule.signatures:
            try:
                specs.append(_concrete(prepared, sender, key_domain))
            except Unsafe as exc:
                notes.append(f"{prepared.label} skipped: {exc}")
        if not rule.signatures:
            notes.append(f"{rule.label} lists no signatures (do not sign)")
        return Selection(tuple(specs), rule.label, "; ".join(notes) or None)

    # -- introspection -------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """The effective rules in look-up order, for `dkproxy check-config`."""
        lines: list[str] = []

        def add(rule: Rule, key_domain: str | None) -> None:
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


def _concrete(
    prepared: PreparedSignature, sender: Address | None, key_domain: str | None
) -> SignatureSpec:
    """Fill the macros of one prepared signature for one message; raise Unsafe."""
    domain = prepared.domain.render(sender, key_domain).lower().rstrip(".")
    if not is_domain(domain):
        raise Unsafe(f"d={shown(domain)} is not a valid domain name")
    identity = check_identity(prepared.identity, domain, sender, key_domain)
    if prepared.kind == "domainkeys":
        # dkimproxy.out signer_policy: DomainKeys only for a sender at d= or below it.
        if sender is None:
            raise Unsafe("DomainKeys needs a sender address and the message has none")
        sender_domain = sender.domain.lower()
        if sender_domain != domain and not sender_domain.endswith("." + domain):
            raise Unsafe(
                f"DomainKeys requires the sender domain to be {domain} or below it, "
                f"not {shown(sender_domain)}"
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


__all__ = ["Selection", "SignatureKind", "SignatureSpec", "SigningPolicy"]
