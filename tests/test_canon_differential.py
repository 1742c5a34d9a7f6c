"""Our canonicalization and header selection against the references, on generated awkward input.

DKIM: dkimpy decides what is hashed (its `select_headers`, `Relaxed`/`Simple`, `hash_headers`),
so every function of dkproxy.mailauth.dkim_canon and the signer's per-header-shape plans must
give dkimpy's bytes. DomainKeys has no maintained reference library: its one-pass forms (the
header block and a small clean body canonicalized at once) must give what the line-by-line,
chunk-by-chunk path (Mail::DKIM's order) gives, and the selection over the header index must
give what Mail::DKIM's grouping of raw lines gives (its algorithm written out below). The
header block parser's one-regex path must agree with its line-by-line path.

Headers are folded, have tabs, trailing white space, empty values, duplicate names in any
case, white space before the colon, 8-bit bytes, VT/FF, bare CR and LF; h= lists name fields
that are absent, twice, or in upper case.
"""

from __future__ import annotations

import hashlib
import re

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy, Relaxed, Simple
from hypothesis import given
from hypothesis import strategies as st

from dkproxy.mailauth import domainkeys as dk
from dkproxy.mailauth import message as message_module
from dkproxy.mailauth.dkim_canon import (
    MessageHashes,
    relaxed_body,
    relaxed_field,
    select_fields,
    simple_body,
)
from dkproxy.mailauth.dkim_signer import DKIMParams, header_list, sign
from dkproxy.mailauth.domainkeys import canon as dk_canon
from dkproxy.mailauth.keys import SigningKey, load_signing_key
from dkproxy.mailauth.message import Message, MessageFormatError
from tests.support.testkeys import make_rsa_key

NAMES = [b"From", b"from", b"FROM", b"To", b"to", b"Cc", b"Subject", b"Sender", b"Date",
         b"Message-ID", b"X-A", b"Received", b"Content-Type", b"List-Id", b"DKIM-Signature",
         b"Reply-To", b"0"]  # fmt: skip
VALUE_PIECES = [b" ", b"  ", b"\t", b" \t ", b"a", b"Bob", b"<b@example.org>", b"x@example.org",
                b"\xc3\xa9", b"\xff", b":", b";", b"=", b"\r\n ", b"\r\n\t", b"\r\n \r\n ",
                b"\x0b", b"\x0c", b"\r", b"\n", b"(c)"]  # fmt: skip
BODY_PIECES = [b"a", b"b ", b" ", b"\t", b"  x", b"\r\n", b"\r\n", b"\r\n\r\n", b".", b"\n",
               b"\r", b"\xc3\xa9", b"\x00", b"long" * 20]  # fmt: skip

ODD_LINES = [b" continued", b"\tx", b"no colon", b":empty name", b"From x@y", b"a b: spaced",
             b"\x80name: v", b"X\nY: v", b"X\rY: v", b"X\n: v", b""]  # fmt: skip

names = st.builds(
    lambda name, pad: name + pad, st.sampled_from(NAMES), st.sampled_from([b"", b"", b" ", b"\t"])
)
values = st.lists(st.sampled_from(VALUE_PIECES), max_size=8).map(b"".join)
clean_values = values.map(lambda v: v.replace(b"\r\n", b"\x00").translate(None, b"\r\n\x0b\x0c"))
fields = st.lists(st.tuples(names, values), min_size=1, max_size=12)
bodies = st.lists(st.sampled_from(BODY_PIECES), max_size=40).map(b"".join)
include_names = st.lists(
    st.sampled_from([n.lower() for n in NAMES] + [b"absent", b"x-a ", b""]), max_size=12
)


def build(header_fields: list[tuple[bytes, bytes]], body: bytes) -> Message | None:
    """The message with these fields and body, or None when the header block cannot parse
    (a value piece produced a line that is not a field): such input never reaches signing."""
    block = b"".join(name + b":" + value + b"\r\n" for name, value in header_fields)
    try:
        return Message(block + b"\r\n" + body)
    except MessageFormatError:
        return None


class _Name(bytes):
    """A field name as hashed, compared without white space before the colon."""

    def lower(self) -> bytes:  # type: ignore[override]
        return bytes(self).lower().rstrip(b" \t")


class Recorder:
    """A stand-in hasher that keeps what it is fed."""

    def __init__(self) -> None:
        self.data = b""

    def update(self, data: bytes) -> None:
        self.data += data


# --------------------------------------------------------------------------------------------
# DKIM (RFC 6376 3.4, 5.4.2) against dkimpy


@given(names, values)
def test_relaxed_field_is_dkimpys(name: bytes, value: bytes) -> None:
    ((cname, cvalue),) = Relaxed.canonicalize_headers([(name, value)])
    assert relaxed_field(name, value) == cname + b":" + cvalue


@given(bodies)
def test_body_canonicalizations_are_dkimpys(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)
    assert simple_body(body) == Simple.canonicalize_body(body)


@given(st.lists(names, max_size=15), include_names)
def test_selection_is_dkimpys(header_names: list[bytes], include: list[bytes]) -> None:
    headers = [(name.lower().rstrip(), b"") for name in header_names]
    positions: dict[bytes, list[int]] = {}
    for i, (name, _value) in enumerate(headers):
        positions.setdefault(name, []).append(i)
    expected = dkim.select_headers([(n, i) for i, (n, _v) in enumerate(headers)], include)
    assert select_fields(positions, include) == [i for _name, i in expected]


@pytest.mark.parametrize("c", ["simple/simple", "relaxed/simple", "relaxed/relaxed"])
@given(header_fields=fields, include=include_names, sig_value=values)
def test_header_hash_input_is_dkimpys(
    c: str, header_fields: list[tuple[bytes, bytes]], include: list[bytes], sig_value: bytes
) -> None:
    message = build(header_fields, b"body\r\n")
    if message is None:
        return
    policy = CanonicalizationPolicy.from_c_value(c.encode())
    sig_header = (b"DKIM-Signature", b" v=1; a=rsa-sha256;" + sig_value + b" b=abc\r\n d\r\n")
    expected = Recorder()
    # Selection names a field "From :" From under simple as well (RFC 5322 4.5, as Mail::DKIM
    # and go-msgauth do); dkimpy keeps the space there, so its names are given that lower().
    canonical = [(_Name(n), v) for n, v in policy.canonicalize_headers(message.headers)]
    dkim.hash_headers(expected, policy, canonical, include, sig_header, {})
    hashes = MessageHashes(message)
    # dkimpy counts the fields named exactly DKIM-Signature (any case), not "DKIM-Signature :".
    assert hashes.signatures == [
        (n, v) for n, v in message.headers if n.lower() == b"dkim-signature"
    ]
    got = Recorder()
    hashes.hash_headers(got, policy, include, sig_header)
    assert got.data == expected.data
    # A second signature on the same message reuses the canonical fields: same bytes again.
    again = Recorder()
    hashes.hash_headers(again, policy, include, sig_header)
    assert again.data == expected.data


@pytest.mark.parametrize("c", ["simple", "relaxed"])
@given(header_fields=fields, body=bodies)
def test_body_digest_is_dkimpys(
    c: str, header_fields: list[tuple[bytes, bytes]], body: bytes
) -> None:
    message = build(header_fields, body)
    if message is None:
        return
    policy = CanonicalizationPolicy.from_c_value(f"simple/{c}".encode())
    expected = policy.canonicalize_body(message.body_bytes())
    hashes = MessageHashes(message)
    assert hashes.body_digest(policy, hashlib.sha256, None) == hashlib.sha256(expected).digest()
    assert hashes.body_digest(policy, hashlib.sha1, 5) == hashlib.sha1(expected[:5]).digest()


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return load_signing_key(make_rsa_key(str(tmp_path_factory.mktemp("k") / "r.pem"), 1024))


@pytest.mark.parametrize("c", ["relaxed/simple", "simple/simple", "relaxed/relaxed"])
@given(
    # Names as RFC 5322 3.6.8 writes them: with white space before the colon (obsolete
    # syntax) dkimpy's verifier and our signer disagree, before and after this code (noted).
    header_fields=st.lists(
        st.tuples(st.sampled_from(NAMES), clean_values), min_size=1, max_size=10
    ),
    expire=st.sampled_from([None, 86400, 7]),
)
def test_signatures_from_header_plans_verify_with_dkimpy(
    rsa_key: SigningKey,
    c: str,
    header_fields: list[tuple[bytes, bytes]],
    expire: int | None,
) -> None:
    """The signer hashes through per-header-shape plans and templates; dkimpy, which hashes
    the whole message its own way, must verify every signature (a From is always there)."""
    header_fields = [*header_fields, (b"From", b" A <a@example.org>")]
    message = build(header_fields, b"body  \t\r\n\r\n")
    assert message is not None
    params = DKIMParams("example.org", "r", rsa_key, canonicalization=c, expire_seconds=expire)
    include = header_list(message, params)
    assert include == [n for n in message.index.lower if n in _wanted()] + [
        n.encode() for n in params.oversign
    ]
    signed = sign(message, params)
    record = rsa_key.dns_record.encode()
    verifier = dkim.DKIM(signed + message.data)
    assert verifier.verify(dnsfunc=lambda name, timeout=5: record)


def _wanted() -> frozenset[bytes]:
    from dkproxy.mailauth.dkim_signer import DEFAULT_SIGNED_HEADERS, NEVER_SIGNED

    return frozenset(n.encode() for n in DEFAULT_SIGNED_HEADERS) - NEVER_SIGNED


# --------------------------------------------------------------------------------------------
# DomainKeys (RFC 4870 3.4): one-pass forms against the line-by-line path

_HLIST_NAME = re.compile(rb"([^\s:]+)\s*:")


def mail_dkim_selection(lines: list[bytes], h: tuple[str, ...] | None) -> list[bytes]:
    """Mail::DKIM::Canonicalization::DkCommon's choice of fields, on raw `name:value` lines:
    group by name, walk h= backwards, a repeated name takes the last remaining field, its
    first occurrence all remaining ones; an empty (or "0") name stops the walk."""
    if h is None:
        return list(lines)
    groups: dict[str, list[bytes]] = {}
    for line in lines:
        m = _HLIST_NAME.match(line)
        if m:
            groups.setdefault(m.group(1).decode("latin-1").lower(), []).append(line)
    counts: dict[str, int] = {}
    for name in h:
        groups.setdefault(name, [])
        counts[name] = counts.get(name, 0) + 1
    selected: list[bytes] = []
    for name in reversed(h):
        if name in ("", "0"):
            break
        counts[name] -= 1
        if counts[name] > 0:
            if groups[name]:
                selected.append(groups[name].pop())
        else:
            selected.extend(reversed(groups[name]))
            groups[name] = []
    selected.reverse()
    return selected


h_values = st.one_of(
    st.none(),
    st.lists(
        st.sampled_from(["From", "from", "TO", "to", "x-a", "absent", "0", "", "subject", "Cc"]),
        max_size=8,
    ).map(":".join),
)


@pytest.mark.parametrize("method", ["nofws", "simple"])
@given(header_fields=fields, body=bodies, h=h_values, below=st.integers(-1, 3))
def test_domainkeys_hash_input_is_the_line_by_line_one(
    method: str,
    header_fields: list[tuple[bytes, bytes]],
    body: bytes,
    h: str | None,
    below: int,
) -> None:
    message = build(header_fields, body)
    if message is None or below >= len(message.headers):
        return
    tags = f"a=rsa-sha1; c={method}; d=example.org; s=s; b=AAAA" + (f"; h={h}" if h else "")
    sig = dk.parse_signature(tags.encode())
    lines = [name + b":" + value for name, value in message.headers[below + 1 :]]
    selected = mail_dkim_selection(lines, sig.h)
    expected = b"".join(dk_canon._canon_header(line, method) for line in selected)
    expected += b"".join(dk_canon._canon_body(dk_canon._body_chunks(message), method))
    assert dk.canonical_hash_input(message, below, sig) == expected


@given(header_fields=fields)
def test_domainkeys_identity_reads_only_signed_unfolded_fields(
    header_fields: list[tuple[bytes, bytes]],
) -> None:
    message = build(header_fields, b"")
    if message is None:
        return
    identity_line = re.compile(rb"(from|sender)\s*:(.*)$", re.IGNORECASE)
    seen: dict[str, bytes] = {}
    for name, value in message.headers:
        m = identity_line.match(name + b":" + value)
        if m:
            seen[m.group(1).decode().lower()] = m.group(2)
    expected = None
    for kind in ("sender", "from"):
        if kind in seen:
            address = dk_canon._first_address(seen[kind])
            if address:
                expected = (kind, address)
                break
    assert dk.sender_identity(message) == expected


# --------------------------------------------------------------------------------------------
# Header block parsing


@given(
    st.lists(
        st.one_of(
            st.tuples(names, values).map(lambda f: f[0] + b":" + f[1]),
            st.sampled_from(ODD_LINES),
        ),
        max_size=10,
    )
)
def test_header_block_fast_path_is_the_line_by_line_one(lines: list[bytes]) -> None:
    data = b"".join(line + b"\r\n" for line in lines) + b"\r\nbody"
    try:
        fast: list[list[bytes]] | str = Message(data).headers
    except MessageFormatError as exc:
        fast = str(exc)
    reference = Message.__new__(Message)
    reference.headers = []
    header_end, _body_offset = message_module._find_header_end(data)
    block_lines = data[:header_end].split(b"\r\n") if header_end else []
    if block_lines and block_lines[-1] == b"":
        block_lines.pop()
    try:
        reference._parse_lines(block_lines)
        slow: list[list[bytes]] | str = reference.headers
    except MessageFormatError as exc:
        slow = str(exc)
    assert fast == slow
