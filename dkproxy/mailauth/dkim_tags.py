"""DKIM-Signature tag=value lists (RFC 6376 3.2) and the offline checks of their fields
(RFC 6376 6.1.1), done the way dkimpy does them, without its per-call regular expressions.

A verifier parses and checks every DKIM-Signature it sees, so this runs once per signature per
message. `parse_tag_list` accepts and rejects exactly what `dkim.util.parse_tag_value` does,
and `validate_signature_fields` what `dkim.validate_signature_fields` does (for DKIM, not
ARC), with the same exceptions and messages: dkproxy's verdicts stay dkimpy's
(tests/test_dkim_tags.py checks both side by side on arbitrary input).
"""

from __future__ import annotations

import re
import time

from dkim import ValidationError
from dkim.crypto import HASH_ALGORITHMS
from dkim.util import DuplicateTag, InvalidTagSpec

_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
#: dkimpy's patterns, compiled once (re.match: anchored at the start; "$" also matches
#: before a final newline, as in dkimpy).
_DOMAIN_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_LENGTH = re.compile(rb"\d{,76}$")
_DECIMAL = re.compile(rb"\d+$")
#: What `\s` matches in a bytes pattern, for bytes.translate.
_WSP_BYTES = b" \t\n\r\x0b\x0c"
_PADDING = _WSP_BYTES + b"="
_BASE64_TEXT = _WSP_BYTES + b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/"
#: dkimpy's leeway for signers with inaccurate clocks (t= in the future, x= in the past).
_SLOP = 36000


def parse_tag_list(value: bytes) -> dict[bytes, bytes]:
    """The tags of an unfolded tag=value list, names and values with surrounding whitespace
    removed, in order (RFC 6376 3.2; values are not otherwise interpreted).

    A trailing ";" is allowed. Raises `dkim.util.InvalidTagSpec` (a subclass of
    `InvalidTagValueList`) for a spec without "=" or whose name does not start with an ASCII
    letter, and `dkim.util.DuplicateTag` when a name repeats.
    """
    tags: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:
        specs.pop()  # one trailing ";" ends the list; a second one is an empty spec
    for spec in specs:
        name, sep, tag_value = spec.partition(b"=")
        if not sep:
            raise InvalidTagSpec(spec)
        name = name.strip()
        # dkimpy matches ^[a-zA-Z](\w)* without an end anchor: only the first character
        # counts. bytes.isalpha is ASCII-only, as [a-zA-Z] is.
        if not name[:1].isalpha():
            raise InvalidTagSpec(spec)
        if name in tags:
            raise DuplicateTag(name)
        tags[name] = tag_value.strip()
    return tags


def base64_like(value: bytes) -> bool:
    """Whether dkimpy's `re.match(rb"[\\s0-9A-Za-z+/]+[\\s=]*$", value)` matches, without
    running the pattern over a b= value hundreds of bytes long.

    After the trailing padding and whitespace (what `[\\s=]*` takes) only base64 letters and
    whitespace may remain; when nothing remains, the non-empty first part can only be
    whitespace the value starts with.
    """
    body = value.rstrip(_PADDING)
    if not body:
        return value[:1].isspace()
    return not body.translate(None, _BASE64_TEXT)


def validate_signature_fields(sig: dict[bytes, bytes]) -> None:
    """Presence and form of a DKIM-Signature's fields (RFC 6376 3.5, 6.1.1), as dkimpy's
    `validate_signature_fields` checks them, in the same order and with its messages.

    Raises `dkim.ValidationError` for the first problem found. Like dkimpy's, it raises
    IndexError when i= is as long as d= and ends with it (callers report that as invalid
    fields), and it tests bh= with b='s pattern (dkimpy's; kept so verdicts do not move).
    """
    for name in _MANDATORY:
        if name not in sig:
            raise ValidationError(f"missing {name!r}=")
    if sig[b"a"] not in HASH_ALGORITHMS:
        raise ValidationError(f"unknown signature algorithm: {sig[b'a']!r}")
    # dkimpy matches b='s value against its pattern twice (once under bh='s name): the
    # second time cannot fail once the first passed, so it is matched once.
    if not base64_like(sig[b"b"]):
        raise ValidationError(f"b= value is not valid base64 ({sig[b'b']!r})")
    for name in ("b", "bh"):
        value = sig[name.encode()]
        if len(value.translate(None, _WSP_BYTES)) % 4:
            raise ValidationError(f"{name}= value is not valid base64 ({value!r})")
    if b"cv" in sig and sig[b"cv"] not in (b"pass", b"fail", b"none"):
        raise ValidationError(f"cv= value is not valid ({sig[b'cv']!r})")
    domain = sig[b"d"]
    # dkimpy checks specials in ASCII domains only.
    if domain.isascii() and _DOMAIN_SPECIALS.search(domain):
        raise ValidationError(f"d= value is not valid ({domain!r})")
    if b"i" in sig:
        identity = sig[b"i"]
        # 64, 46: "@" and "." (indexing bytes gives ints)
        if not identity.lower().endswith(domain.lower()) or identity[-len(domain) - 1] not in (
            64,
            46,
        ):
            raise ValidationError(
                f"i= domain is not a subdomain of d= (i={identity!r} d={domain!r})"
            )
    if b"l" in sig and _LENGTH.match(sig[b"l"]) is None:
        raise ValidationError(f"l= value is not a decimal integer ({sig[b'l']!r})")
    if b"q" in sig and sig[b"q"] != b"dns/txt":
        raise ValidationError(f"q= value is not dns/txt ({sig[b'q']!r})")
    t_sign = None
    if b"t" in sig:
        if _DECIMAL.match(sig[b"t"]) is None:
            raise ValidationError(f"t= value is not a decimal integer ({sig[b't']!r})")
        t_sign = int(sig[b"t"])
        if t_sign > int(time.time()) + _SLOP:
            raise ValidationError(f"t= value is in the future ({sig[b't']!r})")
    if b"v" in sig and sig[b"v"] != b"1":
        raise ValidationError(f"v= value is not 1 ({sig[b'v']!r})")
    if b"x" in sig:
        if _DECIMAL.match(sig[b"x"]) is None:
            raise ValidationError(f"x= value is not a decimal integer ({sig[b'x']!r})")
        x_sign = int(sig[b"x"])
        if x_sign < int(time.time()) - _SLOP:
            raise ValidationError(f"x= value is past ({sig[b'x']!r})")
        if t_sign and x_sign < t_sign:
            raise ValidationError(
                f"x= value is less than t= value (x={sig[b'x']!r} t={sig[b't']!r})"
            )
