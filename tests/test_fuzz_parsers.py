"""Property tests of the code that reads bytes a sender controls.

Header fields, DKIM and DomainKeys signature tag lists, DNS key and policy records, the
DomainKeys canonicalizations and the Authentication-Results we write from all of them: for
any input, each either gives a documented error or a result with the stated properties,
never an exception of another kind. Agreement with Perl Mail::DKIM (the DomainKeys verifier
in use) is checked on generated messages through one long-running Mail::DKIM signer.

`./dev fuzz` runs the same properties with many more examples (hypothesis profile "fuzz").
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from dkproxy.mailauth import authresults, signature_checks, verifier
from dkproxy.mailauth import domainkeys as dk
from dkproxy.mailauth.dkim_tags import parse_tag_list
from dkproxy.mailauth.dmarc import DmarcRecord, DmarcRecordError, DmarcResult, parse_record
from dkproxy.mailauth.keys import load_signing_key, public_p_value
from dkproxy.mailauth.message import Message, MessageFormatError
from dkproxy.mailauth.spf import SpfResult
from dkproxy.tools import dnscheck
from tests.support.testkeys import make_rsa_key
from tests.support.tools import require_perl_module
from tests.support.verifiers import PERL_HELPER
from tests.test_authresults import parse_ar

# -- generators ------------------------------------------------------------------------------

#: Pieces a header block is made of, weighted towards the awkward ones.
_HEADER_PIECES = st.sampled_from(
    [b"From", b"Subject", b"To", b"X-A", b"From ", b":", b": ", b" ", b"\t", b"\r\n",
     b"\r\n ", b"\r\n\t", b"\n", b"\r", b"a", b"b@c.example", b"<x@y.example>", b"\xe9",
     b"\x00", b"=", b";", b"(", b")", b'"', b"\r\n\r\n"]
)  # fmt: skip
_BODY_PIECES = st.sampled_from(
    [b"a", b"word", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n", b"\r\n\r\n", b".", b"..",
     b"\xe9", b"\x00", b"  \t ", b"\r\r\n", b"\n\n"]
)  # fmt: skip


def _joined(pieces: st.SearchStrategy[bytes], max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(pieces, max_size=max_size).map(b"".join)


raw_messages = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda h, b: h + b, _joined(_HEADER_PIECES, 40), _joined(_BODY_PIECES, 40)),
)

_FIELD_NAMES = st.sampled_from([b"Subject", b"To", b"Cc", b"Date", b"X-Mailer", b"Reply-To",
                                b"Content-Type", b"Message-ID", b"List-Id"])  # fmt: skip
#: A field value: printable text, white space, folding, 8-bit; never a bare CR or LF.
_FIELD_VALUE = st.lists(
    st.sampled_from([b"x", b"yz", b" ", b"\t", b"  ", b"\r\n ", b"\r\n\t", b"\xe9", b";", b"="]),
    min_size=1,
    max_size=12,
).map(b"".join)


@st.composite
def well_formed_messages(draw: st.DrawFn) -> bytes:
    """CRLF messages with an unfolded From first (what Mail::DKIM reads as the identity)."""
    fields = [b"From: joe@example.org\r\n"]
    for _ in range(draw(st.integers(0, 5))):
        fields.append(draw(_FIELD_NAMES) + b":" + draw(_FIELD_VALUE) + b"\r\n")
    if not draw(st.booleans()):
        return b"".join(fields)  # no body at all
    return b"".join(fields) + b"\r\n" + draw(_joined(_BODY_PIECES, 60))


_TAG_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,4}", fullmatch=True)
#: A tag value as RFC 6376 3.2 allows: no ";", no leading/trailing white space.
_TAG_VALUE = st.from_regex(r"([!-:<-~]([!-:<-~ \t]*[!-:<-~])?)?", fullmatch=True)
_WSP = st.sampled_from(["", " ", "\t", "  ", " \t"])


@st.composite
def tag_lists(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    tags = draw(st.dictionaries(_TAG_NAME, _TAG_VALUE, max_size=8))
    parts = [f"{draw(_WSP)}{k}{draw(_WSP)}={draw(_WSP)}{v}{draw(_WSP)}" for k, v in tags.items()]
    text = ";".join(parts) + (";" if tags and draw(st.booleans()) else "")
    return tags, text


#: Anything a sender can write: text, control characters, non-ASCII, quotes, separators.
hostile_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00") | st.sampled_from('";()\\=\r\n\t '),
    max_size=60,
)


# -- header parsing --------------------------------------------------------------------------


@given(raw_messages)
def test_header_parsing_gives_fields_that_rebuild_the_header_block(data: bytes) -> None:
    try:
        message = Message(data)
    except MessageFormatError:
        return
    rebuilt = b"".join(name + b":" + value for name, value in message.headers)
    block = data[: message.header_end]
    if block.startswith(b"From ") and not rebuilt.startswith(b"From "):
        block = block.split(b"\r\n", 1)[1] if b"\r\n" in block else b""  # the mbox line
    if block and not block.endswith(b"\r\n"):
        block += b"\r\n"  # a last field without its line end gets one (dkimpy's form)
    assert rebuilt == block
    assert message.header_end <= message.body_offset <= len(data)
    assert bytes(message.body) == data[message.body_offset :]
    for size in (1, 7, 64):
        assert b"".join(message.body_chunks(size)) == bytes(message.body)
    for name in ("from", "subject", "list-id", "message-id"):
        assert all(isinstance(v, bytes) for v in message.get_all(name))
    sender = message.sender()
    if sender is not None:
        assert sender.domain == sender.domain.lower() and "@" not in sender.domain
    message.list_id()


# -- tag=value lists -------------------------------------------------------------------------


@given(tag_lists())
def test_tag_lists_round_trip(case: tuple[dict[str, str], str]) -> None:
    tags, text = case
    assert dnscheck.parse_tags(text) == tags
    assert dk._parse_tag_list(text) == tags
    parsed = parse_tag_list(text.encode())
    assert {k.decode(): v.decode() for k, v in parsed.items()} == tags


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_tag_list_parsers_raise_only_their_own_errors(text: str) -> None:
    with _maybe(dnscheck.RecordError):
        dnscheck.parse_tags(text)
    with _maybe(dnscheck.RecordError):
        dnscheck.parse_key_record(text)
    with _maybe(dk.DomainKeysError):
        dk._parse_tag_list(text)
    dk.parse_policy(text)
    with _maybe(DmarcRecordError):
        parse_record(text)


class _maybe:
    """Context manager: the block may raise `expected` (and nothing else)."""

    def __init__(self, expected: type[BaseException]) -> None:
        self.expected = expected

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self.expected)


_SIG_TAGS = st.sampled_from(["v", "a", "b", "bh", "c", "d", "h", "i", "l", "q", "s", "t", "x"])
_SIG_VALUES = st.sampled_from(["1", "rsa-sha256", "rsa-sha1", "ed25519-sha256", "relaxed/simple",
                               "nofws", "simple", "example.org", "sel", "from:to", "from",
                               "@example.org", "dns/txt", "dns", "AAAA", "QUJD", "", "0", "-1",
                               "99999999999999999999", "x@y", "\xe9", " a = b "])  # fmt: skip


@st.composite
def signature_values(draw: st.DrawFn) -> bytes:
    """A DKIM-Signature / DomainKey-Signature value: plausible tags, awkward values."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    pairs = draw(st.lists(st.tuples(_SIG_TAGS, _SIG_VALUES | hostile_text), max_size=14))
    text = "; ".join(f"{k}={v}" for k, v in pairs)
    return text.encode("utf-8", "surrogateescape")


@given(signature_values(), st.integers(0, 3))
def test_signature_parsing_never_raises(value: bytes, index: int) -> None:
    """A signature field from the wire becomes a verdict (permerror...) or a key lookup."""
    dkim_result = signature_checks._prepare_dkim(index, value, index)
    assert isinstance(dkim_result, verifier.SignatureResult | signature_checks._Pending)
    if isinstance(dkim_result, verifier.SignatureResult):
        assert dkim_result.result == "permerror"
    dk_result = signature_checks._prepare_dk(index, value)
    assert isinstance(dk_result, verifier.SignatureResult | signature_checks._Pending)
    with _maybe(dk.DomainKeysError):
        sig = dk.parse_signature(value)
        assert sig.key_name.endswith(f"._domainkey.{sig.d}")
    signature_checks._unchecked("dkim", index, value, 5)


@given(signature_values().map(lambda v: v.decode("latin-1")))
def test_key_records_give_a_verdict_or_a_key_problem(record: str) -> None:
    with _maybe(dk._KeyProblem):
        dk._load_public_key(record)
    with _maybe(dnscheck.RecordError):
        dnscheck.parse_key_record(record)


# -- DomainKeys canonicalization -------------------------------------------------------------


def _template(c: str) -> dk.DKSignature:
    return dk.DKSignature("rsa-sha1", c, "example.org", "s", "dns", None, b"", b"")


@given(raw_messages, st.sampled_from(dk.CANONICALIZATIONS))
def test_domainkeys_canonicalization_is_idempotent(data: bytes, c: str) -> None:
    """Canonicalizing the canonical form changes nothing (no header or body rule re-fires).

    Bare LFs are made CRLF first, as the proxy's DATA reader does: Mail::DKIM's nofws, which
    ours follows, drops only every other LF of a run of bare LFs, so a run shrinks by one
    LF per pass (the agreement test below keeps such runs in).
    """
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    try:
        message = Message(data)
    except MessageFormatError:
        return
    once = dk.canonical_hash_input(message, -1, _template(c))
    try:
        again = dk.canonical_hash_input(Message(once), -1, _template(c))
    except MessageFormatError:
        pytest.fail(f"the canonical form does not parse: {once!r}")
    assert again == once


class MailDkimSigner:
    """One Mail::DKIM::Signer process for many messages (one JSON line per message)."""

    def __init__(self, key: str, method: str) -> None:
        perl = require_perl_module("Mail::DKIM::Signer")
        args = ["--key", key, "--domain", "example.org", "--selector", "fuzz",
                "--type", "domainkeys", "--method", method, "--algorithm", "rsa-sha1"]  # fmt: skip
        self.proc = subprocess.Popen(
            [perl, PERL_HELPER, "sign", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def sign(self, message: bytes) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"%d\n" % len(message) + message)
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        assert "error" not in out, (out, message)
        (header,) = out["headers"]
        return re.sub(rb"\r?\n", b"\r\n", header.encode("latin-1")) + b"\r\n"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def dk_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    # Mail::DKIM reads PKCS#1 ("BEGIN RSA PRIVATE KEY") files only.
    path = make_rsa_key(str(tmp_path_factory.mktemp("dk") / "k.pem"), 1024, traditional=True)
    private = load_signing_key(path).private
    assert isinstance(private, rsa.RSAPrivateKey)
    return path, f"k=rsa; p={public_p_value(private)}"


@pytest.fixture(scope="module")
def mail_dkim(dk_key: tuple[str, str]) -> Iterator[dict[str, MailDkimSigner]]:
    signers = {c: MailDkimSigner(dk_key[0], c) for c in dk.CANONICALIZATIONS}
    yield signers
    for signer in signers.values():
        signer.close()


@given(well_formed_messages(), st.sampled_from(dk.CANONICALIZATIONS))
def test_domainkeys_canonicalization_agrees_with_mail_dkim(
    mail_dkim: dict[str, MailDkimSigner], dk_key: tuple[str, str], data: bytes, c: str
) -> None:
    """Mail::DKIM signs a generated message; our verifier, hashing what we think Mail::DKIM
    hashed, must accept the signature (RSA-SHA1 passes only on identical hash input)."""
    field = mail_dkim[c].sign(data)
    message = Message(field + data)
    sig = dk.parse_signature(message.headers[0][1])
    result = dk.verify_with_key(message, 0, sig, dk_key[1])
    assert result.result == "pass", (result, data)


# -- Authentication-Results ------------------------------------------------------------------

_results = st.sampled_from(["pass", "fail", "neutral", "policy", "temperror", "permerror"])
_maybe_text = st.none() | hostile_text
_spf_results = st.sampled_from(
    ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
)


@st.composite
def reports(draw: st.DrawFn) -> verifier.VerificationReport:
    signatures = []
    for index in range(draw(st.integers(0, 4))):
        method = draw(st.sampled_from(["dkim", "domainkeys"]))
        signatures.append(
            verifier.SignatureResult(
                method,
                draw(_results),
                index,
                domain=draw(_maybe_text),
                selector=draw(_maybe_text),
                identity=draw(_maybe_text),
                identity_header=draw(st.sampled_from([None, "from", "sender"])),
                algorithm=draw(_maybe_text),
                b_prefix=draw(_maybe_text),
                key_bits=draw(st.none() | st.integers(0, 8192)),
                reason=draw(hostile_text),
                testing=draw(st.booleans()),
            )
        )
    spf = None
    if draw(st.booleans()):
        spf = SpfResult(
            draw(_spf_results),
            draw(st.sampled_from(["mailfrom", "helo"])),
            draw(hostile_text),
            draw(hostile_text),
            draw(hostile_text),
            draw(hostile_text),
        )
    dmarc = None
    if draw(st.booleans()):
        record = DmarcRecord(p=draw(st.sampled_from(["none", "quarantine", "reject"])))
        dmarc = DmarcResult(
            draw(st.sampled_from(["pass", "fail", "none", "temperror", "permerror"])),
            draw(_maybe_text),
            record=draw(st.none() | st.just(record)),
            reason=draw(hostile_text),
        )
    return verifier.VerificationReport(signatures=signatures, spf=spf, dmarc=dmarc)


#: Host names. (An authserv-id that is a token but not a dot-atom, "a..b", is valid RFC 8601
#: but authres reads the authserv-id as a dot-atom only.)
_authserv_ids = st.lists(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4
).map(".".join)


@given(reports(), _authserv_ids)
def test_authentication_results_always_parse_with_authres(
    report: verifier.VerificationReport, authserv_id: str
) -> None:
    header = authresults.authentication_results(report, authserv_id)
    parsed = parse_ar(header, authserv_id, keep_dk_none=True)
    expected = [(s.method, s.result) for s in report.signatures]
    if not report.dkim:
        expected.insert(0, ("dkim", "none"))
    if not report.domainkeys:
        expected.append(("domainkeys", "none"))
    if report.spf is not None:
        expected.append(("spf", report.spf.result))
    if report.dmarc is not None:
        expected.append(("dmarc", report.dmarc.result))
    assert [(method, result) for method, result, _props in parsed] == expected
