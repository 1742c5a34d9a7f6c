"""Our DKIM tag=value parser against dkimpy's on arbitrary input (RFC 6376 3.2).

Both must return the same tags for the same bytes and reject the same bytes with the same
exception class; a malformed DKIM-Signature must come out of the verifier as a permerror,
never as an exception.
"""

from __future__ import annotations

import pytest
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList, parse_tag_value
from hypothesis import example, given
from hypothesis import strategies as st

from dkproxy.mailauth import signature_checks
from dkproxy.mailauth.dkim_tags import parse_tag_list

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
