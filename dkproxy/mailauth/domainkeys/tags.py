"""DomainKeys (RFC 4870 section 3.3): the DomainKey-Signature field, its tag list and its
defaults as Mail::DKIM applies them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass, field

from dkproxy.mailauth.message import Message

FIELD_NAME = "DomainKey-Signature"
CANONICALIZATIONS = ("nofws", "simple")

#: Signed when present. A trailing "*" makes the entry a prefix (Content-*, List-*).
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-*", "in-reply-to", "references", "list-*",
)  # fmt: skip

#: Fold the signature header before this column, like Mail::DKIM's own signer.
FOLD_COLUMN = 72


_FWS_CHARS = str.maketrans("", "", "\r\n \t")


class DomainKeysError(Exception):
    """The message cannot carry (or does not carry) a valid DomainKeys signature; says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Signature header


@dataclass(frozen=True)
class DKSignature:
    """A parsed DomainKey-Signature with Mail::DKIM's defaults applied.

    `h` is the lower-cased h= list, or None when absent (then every field below the signature
    is signed). `raw` is the header value as found (or the whole field when given so).
    """

    a: str
    c: str
    d: str
    s: str
    q: str
    h: tuple[str, ...] | None
    b: bytes
    raw: bytes
    tags: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key_name(self) -> str:
        """Where the public key lives: `<s>._domainkey.<d>`."""
        return f"{self.s}._domainkey.{self.d}"


def _parse_tag_list(text: str) -> dict[str, str]:
    """Mail::DKIM::KeyValueList::parse: split on ';', trim, split at the first '=' with
    surrounding whitespace; later duplicates win; a tag without '=' is a syntax error."""
    tags: dict[str, str] = {}
    for raw_tag in text.split(";"):
        # str.strip() and partition() give what the regexes ^\s+|\s*$ and \s*=\s* give
        # (the same white space: str.isspace), without a regex call per tag.
        tag = raw_tag.strip()
        if not tag:
            continue
        name, equals, value = tag.partition("=")
        if not equals:
            raise DomainKeysError("bad format: syntax error")
        tags[name.rstrip()] = value.lstrip()
    return tags


@functools.lru_cache(maxsize=1024)  # one sender's h= is the same on every message
def _header_list(value: str | None) -> tuple[str, ...] | None:
    """Mail::DKIM's headerlist(): whitespace next to colons removed, lower-cased, split."""
    if value is None:
        return None
    h = re.sub(r":\s+", ":", re.sub(r"\s+:", ":", value)).lower()
    if not h or h == "0":  # Perl treats "" and "0" as false: the same as no h= at all
        return None
    names = [re.sub(r"^\s+|\s+$", "", n) for n in h.split(":")]
    while names and names[-1] == "":  # Perl's split drops trailing empty fields
        names.pop()
    return tuple(names) or None


def parse_signature(value: bytes) -> DKSignature:
    """Parse a DomainKey-Signature value (or the whole field) as Mail::DKIM does.

    Raises DomainKeysError('bad format: ...') for what Mail::DKIM rejects before fetching a key
    (syntax, algorithm, canonicalization, q=, d=, s=) and for a missing or undecodable b=.
    """
    raw = value
    text = value.decode("latin-1")
    if text.endswith("\r\n"):
        text = text[:-2]
    if text[:20].lower() == "domainkey-signature:":
        text = text[20:]
    tags = _parse_tag_list(text)
    a = tags.get("a")
    algorithm = a.lower() if a else "rsa-sha1"
    if algorithm != "rsa-sha1":
        raise DomainKeysError(f"bad format: unsupported algorithm {algorithm}")
    canonicalization = (tags.get("c") or "").lower() or "simple"
    if canonicalization == "0":
        canonicalization = "simple"
    if canonicalization not in CANONICALIZATIONS:
        raise DomainKeysError(f"bad format: unsupported canonicalization {canonicalization}")
    q = tags.get("q")
    protocol = "dns" if q is None else q.lower()
    if protocol != "dns":
        raise DomainKeysError(f"bad format: unsupported query protocol, q={protocol}")
    d = tags.get("d")
    if d is None:
        raise DomainKeysError("bad format: missing d tag")
    if d == "":
        raise DomainKeysError("bad format: invalid domain in d tag")
    s = tags.get("s")
    if s is None:
        raise DomainKeysError("bad format: missing s tag")
    b64 = (tags.get("b") or "").translate(_FWS_CHARS)
    if not b64:
        raise DomainKeysError("bad format: missing b tag")
    try:
        b = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DomainKeysError("bad format: b= is not base64") from exc
    return DKSignature(
        a=algorithm,
        c=canonicalization,
        d=d.lower(),
        s=s,
        q=protocol,
        h=_header_list(tags.get("h")),
        b=b,
        raw=raw,
        tags=tags,
    )


def signature_positions(message: Message) -> list[int]:
    """Indexes into `message.headers` of every DomainKey-Signature field, top first."""
    return list(message.index.lower_positions().get(b"domainkey-signature", ()))
