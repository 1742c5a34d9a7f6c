"""DKIMproxy's sender_map and listid_map files and the look-up keys a sender or a List-Id
gives, most specific first (DKIMproxy 1.4 lib/LookupMap.pm, with its +extension bug fixed)."""

from __future__ import annotations

from dkproxy.config import ConfigError, OutboundConfig, SignatureTemplate, parse_signature_list
from dkproxy.mailauth.addresses import Address
from dkproxy.util.domains import DomainError, canonical_domain, canonical_domain_or_none


def domain_and_parents(domain: str) -> list[str]:
    labels = domain.lower().rstrip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels)) if labels[i]]


def sender_keys(sender: Address) -> list[str]:
    """Most specific first: address, address without +ext, domain, (.)parents, catch-all."""
    local = sender.local.lower()
    domain = sender.domain.lower()
    keys = [f"{local}@{domain}"]
    if "+" in local:
        base = local.split("+", 1)[0]
        if base:
            keys.append(f"{base}@{domain}")
    chain = domain_and_parents(domain)
    keys.append(chain[0] if chain else domain)
    for parent in chain[1:]:
        keys.append("." + parent)  # TOML ".example.org": subdomains only
        keys.append(parent)
    keys.append("*")
    return keys


def canonical_list_id(list_id: str) -> str:
    """A List-Id identifier with its domain-like labels in A-labels where they have one."""
    ident = list_id.strip().strip("<>").lower()
    return canonical_domain_or_none(ident) or ident


def listid_keys(ident: str) -> list[str]:
    return [*domain_and_parents(ident), "*"]


def read_map(
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
