"""The shortcut DATA reception takes for pieces of short lines must agree with the full rule.

`lines_within_limit` decides whether `break_long_lines` may be skipped for a piece; if it ever
said yes for a piece with a line over 998 characters, that line would reach the next hop
unbroken while the signature covers it broken (or the other way round). The behavioural side
(long lines through the running proxy, as Postfix sends them) is in tests/test_line_ends.py
and tests/test_session.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dkproxy.smtp.data_in import lines_within_limit
from dkproxy.smtp.lines import LINE_LENGTH_LIMIT, break_long_lines

#: Line lengths around every boundary the search steps over (998, 1000, 2 x 1000 ...).
LENGTHS = st.one_of(
    st.integers(0, 120),
    st.integers(LINE_LENGTH_LIMIT - 3, LINE_LENGTH_LIMIT + 3),
    st.integers(1995, 2005),
    st.integers(0, 5000),
)


@given(st.lists(LENGTHS, min_size=1, max_size=12), st.booleans())
def test_shortcut_agrees_with_break_long_lines(lengths: list[int], complete: bool) -> None:
    content = b"\r\n".join(b"x" * n for n in lengths) + (b"\r\n" if complete else b"")
    unchanged = break_long_lines(content, 0)[0] == content
    if lines_within_limit(content):
        assert unchanged
        assert content.endswith(b"\n")  # one ending inside a line takes the full path
    elif complete:
        assert not unchanged


def test_a_line_of_exactly_998_characters_is_within_the_limit() -> None:
    assert lines_within_limit(b"a" * 998 + b"\r\n")
    assert not lines_within_limit(b"a" * 999 + b"\r\n")
    assert lines_within_limit((b"b" * 78 + b"\r\n") * 1000 + b"a" * 998 + b"\r\n")
    assert not lines_within_limit((b"b" * 78 + b"\r\n") * 1000 + b"a" * 999 + b"\r\nc\r\n")
