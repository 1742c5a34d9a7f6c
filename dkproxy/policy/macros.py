"""Signature templates with macros: `$sender`, `$senderdomain`, `$key`, `$keydomain` in d=
and i= (DKIMproxy 1.4 interpret_macros), filled per message only with safe values."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dkproxy.config import is_domain, is_safe_local_part
from dkproxy.mailauth.addresses import Address


class Unsafe(Exception):
    """A macro could not be filled safely for this message."""


_MACRO_SPLIT = re.compile(r"\$(\$|[A-Za-z_]\w*)")


def shown(text: str) -> str:
    """A message-derived value, quoted and shortened for a log line."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


@dataclass(frozen=True)
class Template:
    """A d= or i= value with macros, split once at load time."""

    text: str
    parts: tuple[tuple[bool, str], ...]  # (is_macro, text or macro name)

    @classmethod
    def parse(cls, text: str) -> Template:
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
            raise Unsafe(f"${name} needs a sender address and the message has none")
        if not is_domain(sender.domain):
            raise Unsafe(f"sender domain {shown(sender.domain)} is not a plain domain name")
        if name == "senderdomain":
            return sender.domain
        if not is_safe_local_part(sender.local):
            raise Unsafe(
                f"sender local part {shown(sender.local)} has characters a DKIM tag cannot carry"
            )
        return f"{sender.local}@{sender.domain}"
    if name in ("key", "keydomain"):
        if key is None:  # pragma: no cover - rejected at load time
            raise Unsafe(f"${name} has no matched domain here")
        return key.rpartition("@")[2] if name == "keydomain" else key
    raise Unsafe(f"unknown macro ${name}")  # pragma: no cover - rejected at load time


def check_identity(
    identity: Template | None,
    domain: str,
    sender: Address | None,
    key_domain: str | None,
    static_only: bool = False,
) -> str | None:
    """Render i= and check it is a safe address within d=; raise Unsafe."""
    if identity is None:
        return None
    if static_only and identity.literal is None and not identity.macros <= {"key", "keydomain"}:
        return None  # depends on the message; checked per message
    value = identity.render(sender, key_domain)
    local, at, id_domain = value.rpartition("@")
    id_domain = id_domain.lower()
    if not at or not is_domain(id_domain) or (local and not is_safe_local_part(local)):
        raise Unsafe(f"i={shown(value)} is not a safe address")
    if id_domain != domain and not id_domain.endswith("." + domain):
        raise Unsafe(f"i={shown(value)} is not within d={domain} (RFC 6376 3.5)")
    return value
