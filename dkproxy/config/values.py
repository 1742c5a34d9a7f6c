"""Value syntax shared by both configuration formats: booleans, sizes, domains, macros."""

from __future__ import annotations

import re
from typing import Literal

from dkproxy.util.domains import DomainError, canonical_domain

Mode = Literal["out", "in"]
Action = Literal["accept", "tempfail", "reject"]

MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 64 * MIB
DEFAULT_RELAY_PORT = 25

# ---------------------------------------------------------------------------------------------
# Value syntax shared by all formats
# ---------------------------------------------------------------------------------------------

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
#: dot-atom local part without "=" (DKIM i= is quoted-printable; "=" would need encoding).
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+)*")
MACRO_RE = re.compile(r"\$(\$|[A-Za-z_]\w*)")

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

TRUE_WORDS = frozenset({"1", "yes", "true", "on", "y"})
FALSE_WORDS = frozenset({"0", "no", "false", "off", "n", ""})


def to_alabels(domain: str) -> str:
    """A configured domain in the form every comparison uses: lower-case A-labels.

    U-labels and A-labels are both accepted (RFC 5890, UTS 46; see
    dkproxy.util.domains); raises ValueError naming the value when it has no A-label form.
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
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
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
    stripped = MACRO_RE.sub("", text)
    if "$" in stripped:
        raise ValueError(f"stray '$' in {what} {text!r} (write $$ for a literal $)")
    for match in MACRO_RE.finditer(text):
        name = match.group(1)
        if name != "$" and name not in allowed:
            names = ", ".join(f"${m}" for m in sorted(allowed))
            if name in IDENTITY_MACROS:
                raise ValueError(f"${name} is not allowed in {what} {text!r} (here: {names})")
            raise ValueError(f"unknown macro ${name} in {what} {text!r} (allowed: {names})")
