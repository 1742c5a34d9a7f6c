"""Our DKIM tag=value parser against dkimpy's on arbitrary input (RFC 6376 3.2).

Both must return the same tags for the same bytes and reject the same bytes with the same
exception class; a malformed DKIM-Signature must come out of the verifier as a permerror,
never as an exception.
"""

from __future__ import annotations

import re
import time

import dkim
import pytest
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList, parse_tag_value
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dkproxy.mailauth import signature_checks
from dkproxy.mailauth.dkim_tags import base64_like, parse_tag_list, validate_signature_fields

#: Bytes that matter to the grammar, mixed with anything at all.
_PIECES = st.sampled_from(
    [b";", b"=", b" ", b"\t", b"\r\n", b"\x0b", b"\x0c", b"a", b"Z", b"_", b"1", b"-", b"\xc3\xa9"]
)
tag_bytes = st.lists(_PIECES | st.binary(max_size=4), max_size=24).map(b"".join)


def _outcome(parse: object, value: bytes) -> tuple[str, object]:
    try:
        return "ok", parse(value)  # type: ignore[operator]
    except InvalidTagValueList as exc:
        return type(exc).__name__, exc.args


@given(tag_bytes)
@example(b"")
@example(b";")
@example(b"a=1;;")
@example(b"a=1; ;")
@example(b"a=1;a=2")
@example(b" a b = c d ; ")
@example(b"1a=x")
@example(b"_a=x")
@example(b"=x")
@example(b"a")
@example(b"\xc3\xa9=x")
@example(b"v=1; a=rsa-sha256; b=ab\r\n cd==;")
def test_same_tags_and_same_errors_as_dkimpy(value: bytes) -> None:
    assert _outcome(parse_tag_list, value) == _outcome(parse_tag_value, value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"a=1;;", InvalidTagSpec),  # an empty spec between separators
        (b"a=1; b", InvalidTagSpec),  # no "="
        (b"9a=1", InvalidTagSpec),  # a name must start with a letter
        (b"\xc3\xa9=1", InvalidTagSpec),  # ... an ASCII one
        (b"a=1; A=2; a=3", DuplicateTag),  # names are case-sensitive; a= twice is not
    ],
)
def test_malformed_lists_are_rejected(value: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_tag_list(value)


def test_values_keep_inner_whitespace_and_trailing_semicolon_is_allowed() -> None:
    assert parse_tag_list(b" v=1 ;\tb = ab\r\n cd ; h=From : To;") == {
        b"v": b"1",
        b"b": b"ab\r\n cd",
        b"h": b"From : To",
    }


@given(tag_bytes)
@example(b"v=1; a=rsa-sha256; d=x; d=y")
@example(b"v=1;;")
def test_a_malformed_signature_field_is_a_permerror_never_an_exception(value: bytes) -> None:
    prepared = signature_checks._prepare_dkim(3, value, 0)
    if isinstance(prepared, signature_checks.SignatureResult):
        assert prepared.result == "permerror"
        assert prepared.header_index == 3


# -- field validation ------------------------------------------------------------------------

_NOW = int(time.time())
_FIELD_VALUES = {
    b"v": [b"1", b"2", b""],
    b"a": [b"rsa-sha256", b"rsa-sha1", b"ed25519-sha256", b"RSA-SHA256", b"hmac"],
    b"b": [b"dGVzdA==", b"dGVzd A==", b"dGVzdA", b"dGVz\r\n dA==", b"!!", b"", b"dGVzdA==\n"],
    b"bh": [b"dGVzdA==", b"dGVzdA", b"abc=", b" ", b"####"],
    b"d": [b"example.org", b"Example.ORG", b"ex@mple.org", b"\xc3\xa9x.org", b"a[b].org", b""],
    b"i": [b"@example.org", b"u@sub.example.org", b"example.org", b"u@other.org", b"xexample.org"],
    b"l": [b"0", b"123", b"1" * 77, b"-1", b"1 2", b"12\n"],
    b"q": [b"dns/txt", b"dns", b"DNS/TXT"],
    b"t": [b"1", str(_NOW).encode(), str(_NOW + 10**6).encode(), b"x", b"12a"],
    b"x": [str(_NOW + 3600).encode(), b"1", b"0", b"y", str(_NOW + 10**6).encode()],
    b"cv": [b"pass", b"none", b"bogus"],
    b"h": [b"from:to", b"To"],
    b"s": [b"sel", b""],
}
signature_fields = st.dictionaries(
    st.sampled_from(sorted(_FIELD_VALUES)),
    st.binary(max_size=6),
    max_size=13,
).flatmap(
    lambda junk: st.fixed_dictionaries(
        {name: st.sampled_from(values) for name, values in _FIELD_VALUES.items()}
    ).flatmap(
        lambda good: st.sets(st.sampled_from(sorted(_FIELD_VALUES))).map(
            lambda dropped: {k: junk.get(k, v) for k, v in good.items() if k not in dropped}
        )
    )
)


def _validation(validate: object, sig: dict[bytes, bytes]) -> tuple[str, str]:
    try:
        validate(dict(sig))  # type: ignore[operator]
    except Exception as exc:  # IndexError included: dkimpy raises it on some i=/d= pairs
        return type(exc).__name__, str(exc)
    return "ok", ""


@given(signature_fields)
@example({})
@example({k: v[0] for k, v in _FIELD_VALUES.items()})
@example({**{k: v[0] for k, v in _FIELD_VALUES.items()}, b"i": b"example.org"})
@example({**{k: v[0] for k, v in _FIELD_VALUES.items()}, b"b": b"!!", b"bh": b"abc"})
def test_field_checks_match_dkimpy(sig: dict[bytes, bytes]) -> None:
    assert _validation(validate_signature_fields, sig) == _validation(
        dkim.validate_signature_fields, sig
    )


def test_field_checks_reject_each_kind_of_bad_field() -> None:
    good = {k: v[0] for k, v in _FIELD_VALUES.items()}
    validate_signature_fields(dict(good))
    bad = {
        b"a": b"hmac",
        b"b": b"!!",
        b"bh": b"abc",
        b"d": b"ex@mple.org",
        b"i": b"u@other.org",
        b"l": b"1" * 77,
        b"q": b"dns",
        b"t": str(_NOW + 10**6).encode(),
        b"v": b"2",
        b"x": b"1",
        b"cv": b"bogus",
    }
    for name, value in bad.items():
        with pytest.raises(dkim.ValidationError, match=f"^{name.decode()}= value|domain|unknown"):
            validate_signature_fields({**good, name: value})
    for name in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"):
        fields = dict(good)
        del fields[name]
        with pytest.raises(dkim.ValidationError, match="missing"):
            validate_signature_fields(fields)


_DKIMPY_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")  # dkimpy's pattern for b= and bh=


@given(
    st.lists(st.sampled_from(list(b" \t\r\n\x0b\x0c=+/aZ09-_.\x00\xff")), max_size=12).map(bytes)
)
@example(b"")
@example(b"=")
@example(b" =")
@example(b"\n")
@example(b"ab=c")
@example(b"ab==\n")
@example(b"ab\r\n cd==  ")
@settings(max_examples=1000)
def test_base64_shape_check_matches_dkimpys_pattern(value: bytes) -> None:
    assert base64_like(value) == (_DKIMPY_BASE64.match(value) is not None)
