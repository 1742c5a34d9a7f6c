"""DKIM tag=value lists (RFC 6376 3.2), parsed the way dkimpy parses them, without its
per-tag regular expression.

A verifier parses every DKIM-Signature it sees, so this runs once per signature per message.
It accepts and rejects exactly what `dkim.util.parse_tag_value` does (dkproxy's verdicts stay
dkimpy's; tests/test_dkim_tags.py checks both side by side on arbitrary input), and raises
dkimpy's own exceptions, so callers catch `dkim.util.InvalidTagValueList` as before.
"""

from __future__ import annotations

from dkim.util import DuplicateTag, InvalidTagSpec


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
