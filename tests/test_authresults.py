"""Authentication-Results: syntax (checked with the `authres` parser), quoting, forgeries."""

from __future__ import annotations

import re

import authres
import pytest

from dkproxy.inbound import assemble_inbound
from dkproxy.mailauth.authresults import (
    authentication_results,
    claimed_authserv_id,
    forged_authentication_results,
    header_byte_ranges,
)
from dkproxy.mailauth.dmarc import DmarcRecord, DmarcResult
from dkproxy.mailauth.message import Message
from dkproxy.mailauth.spf import SpfResult
from dkproxy.mailauth.verifier import SignatureResult, VerificationReport
from dkproxy.smtp.proxy import Outcome
from dkproxy.smtp.spool import Spool

AUTHSERV = "mx.ar.test"


def parse_ar(
    header: bytes, authserv_id: str = AUTHSERV, *, keep_dk_none: bool = False
) -> list[tuple[str, str, dict[str, str]]]:
    """Parse our header with `authres` (strictly: every property must be understood) and
    return [(method, result, {ptype.property: value})]; asserts the framing on the way.

    The `domainkeys=none` written for mail without a DomainKeys signature is left out unless
    keep_dk_none, so that tests about other results can index the list directly."""
    assert header.startswith(b"Authentication-Results: ")
    assert header.endswith(b"\r\n")
    body = header[:-2]
    # Only folding may introduce line breaks: CRLF followed by whitespace.
    assert re.fullmatch(rb"[\x20-\x7e\t]*(?:\r\n[ \t][\x20-\x7e\t]*)*", body), header
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))
    unfolded = re.sub(r"\r\n(?=[ \t])", "", body.decode("ascii"))
    features = authres.all_features()
    parsed = features.header_class(features, strict=True)
    parsed._parse_text = unfolded.split(":", 1)[1].strip()
    parsed._parse()
    assert parsed.authserv_id == authserv_id.lower()
    out = []
    for result in parsed.results:
        props = {f"{p.type}.{p.name}": str(p.value) for p in result.properties}
        out.append((result.method, result.result, props))
    # The lenient public entry point must agree.
    assert len(features.parse(unfolded).results) == len(out)
    if not keep_dk_none:
        out = [entry for entry in out if entry != ("domainkeys", "none", {})]
    return out


def _dkim(result: str = "pass", header_index: int = 0, **kw: object) -> SignatureResult:
    fields: dict[str, object] = {
        "domain": "example.com",
        "selector": "sel",
        "identity": "@example.com",
        "algorithm": "rsa-sha256",
        "b_prefix": "ab/cd+ef",
        "key_bits": 2048,
    }
    fields.update(kw)
    return SignatureResult("dkim", result, header_index, **fields)  # type: ignore[arg-type]


def test_unsigned_message_gets_dkim_none_never_empty() -> None:
    header = authentication_results(VerificationReport(), AUTHSERV)
    assert parse_ar(header, keep_dk_none=True) == [("dkim", "none", {}), ("domainkeys", "none", {})]
    assert b"dkim=none" in header and b"domainkeys=none" in header


def test_full_report_round_trips_through_authres() -> None:
    report = VerificationReport(
        signatures=[
            _dkim(),
            _dkim("fail", reason="body hash mismatch", header_index=3),
            SignatureResult(
                "domainkeys",
                "pass",
                4,
                domain="example.com",
                identity="alice@mail.example.com",
                identity_header="sender",
                b_prefix="Zm9vYmFy",
            ),
        ],
        spf=SpfResult("softfail", "mailfrom", "example.com", "bounce@example.com", "192.0.2.1"),
        dmarc=DmarcResult(
            "fail",
            "example.com",
            policy="reject",
            record=DmarcRecord(p="reject", sp="none", pct=50),
            record_domain="example.com",
            reason="no aligned DKIM or SPF pass",
        ),
    )
    header = authentication_results(report, AUTHSERV)
    results = parse_ar(header)
    assert [(m, r) for m, r, _ in results] == [
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("domainkeys", "pass"),
        ("spf", "softfail"),
        ("dmarc", "fail"),
    ]
    assert results[0][2] == {
        "header.d": "example.com",
        "header.i": "@example.com",
        "header.s": "sel",
        "header.a": "rsa-sha256",
        "header.b": "ab/cd+ef",
    }
    assert results[2][2]["header.sender"] == "alice@mail.example.com"
    assert results[3][2] == {"smtp.mailfrom": "bounce@example.com"}
    assert results[4][2] == {"header.from": "example.com"}
    assert b'reason="body hash mismatch"' in header
    assert b"p=reject sp=none pct=50 dis=reject" in header
    # Folded: every line fits in 78 columns for values this short.
    assert max(len(line.expandtabs(8)) for line in header.split(b"\r\n")) <= 78


def test_helo_scope_spf_and_every_dkim_result_word() -> None:
    words = ["pass", "fail", "neutral", "policy", "temperror", "permerror"]
    report = VerificationReport(
        signatures=[_dkim(w, reason=f"why {w}") for w in words],
        spf=SpfResult("none", "helo", "mail.example.net", "mail.example.net", "2001:db8::5"),
    )
    results = parse_ar(authentication_results(report, AUTHSERV))
    assert [r for _m, r, _p in results[:-1]] == words
    assert results[-1] == ("spf", "none", {"smtp.helo": "mail.example.net"})


@pytest.mark.parametrize(
    "hostile",
    [
        "evil.test\r\nX-Injected: yes",
        'evil.test"; dkim=pass header.d=bank.test',
        "evil.test (comment",
        "\u00e9vil.test",
        "",
        "a b c",
        "x\\y",
    ],
)
def test_hostile_values_cannot_break_or_inject(hostile: str) -> None:
    report = VerificationReport(
        signatures=[
            _dkim(
                "fail",
                domain=hostile or None,
                selector=hostile or None,
                identity=hostile + "@x" if hostile else None,
                b_prefix=hostile[:8] or None,
                reason=hostile,
            )
        ]
    )
    header = authentication_results(report, AUTHSERV)
    results = parse_ar(header)
    assert len(results) == 1
    method, result, props = results[0]
    assert (method, result) == ("dkim", "fail")
    assert b"X-Injected" not in header.split(b"\r\n")[-2][:12]
    assert b"\r\nX-Injected" not in header
    token = re.fullmatch(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+", hostile)
    assert props.get("header.d") == (hostile if token else None)


def test_values_needing_quotes_are_last_or_left_out() -> None:
    report = VerificationReport(
        signatures=[
            _dkim(identity='"john smith"@example.com', selector="sel.one", b_prefix="a/b=c+d"),
            _dkim(domain="bad domain.test", identity="@bad domain.test", b_prefix="plain123"),
        ],
        spf=SpfResult("pass", "mailfrom", "example.com", "we ird@example.com", "192.0.2.1"),
    )
    header = authentication_results(report, AUTHSERV)
    first, second, spf = parse_ar(header)
    # A quoted local part falls back to the domain; header.b is quoted and comes last.
    assert first[2]["header.i"] == "@example.com"
    assert first[2]["header.s"] == "sel.one"
    assert first[2]["header.b"] == "a/b=c+d"
    assert b'header.b="a/b=c+d"' in header
    assert list(first[2])[-1] == "header.b"
    # Junk that is neither a token nor an address is left out rather than quoted.
    assert "header.d" not in second[2] and "header.i" not in second[2]
    assert second[2]["header.b"] == "plain123"
    assert spf[2] == {"smtp.mailfrom": "@example.com"}


def test_authserv_id_quoted_when_not_a_token() -> None:
    header = authentication_results(VerificationReport(), "mx.example.org")
    assert header.startswith(b"Authentication-Results: mx.example.org;\r\n")
    with pytest.raises(ValueError):
        authentication_results(VerificationReport(), "  ")


# --------------------------------------------------------------------------------------------
# Forged headers

FORGED_MESSAGE = (
    b"Authentication-Results: MX.AR.TEST; dkim=pass header.d=bank.test\r\n"
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: other.test; spf=pass smtp.mailfrom=x@y.test\r\n"
    b"authentication-results: (sneaky)\r\n mx.ar.test 1; dkim=pass\r\n"
    b'Authentication-Results: "mx.ar.test"; dmarc=pass\r\n'
    b"Authentication-Results: mx.ar.test.example; dkim=pass\r\n"
    b"ARC-Authentication-Results: i=1; mx.ar.test; dkim=pass\r\n"
    b"Authentication-Results:mx.ar.test;none\r\n"
    b"From: a@example.com\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_forged_results_found_and_others_kept() -> None:
    message = Message(FORGED_MESSAGE)
    assert forged_authentication_results(message, "mx.ar.test") == [0, 3, 4, 7]
    assert forged_authentication_results(message, "other.test") == [2]
    assert forged_authentication_results(message, "nobody.test") == []


def test_claimed_authserv_id_forms() -> None:
    assert claimed_authserv_id(b" example.org; none\r\n") == "example.org"
    assert claimed_authserv_id(b" (c (nested)) Example.ORG 1; none\r\n") == "example.org"
    assert claimed_authserv_id(b' "ex\\"q"; none\r\n') == 'ex"q'
    assert claimed_authserv_id(b"\r\n") is None
    assert claimed_authserv_id(b" (only a comment)\r\n") is None


def test_removal_by_byte_ranges_is_exact() -> None:
    mbox = b"From sender@example.com Mon Jan  1 00:00:00 2024\r\n" + FORGED_MESSAGE
    for data in (FORGED_MESSAGE, mbox):
        message = Message(data)
        indexes = forged_authentication_results(message, "mx.ar.test")
        ranges = header_byte_ranges(message, indexes)
        assert [data[s:e].split(b":", 1)[0].lower() for s, e in ranges] == [
            b"authentication-results"
        ] * 4
        # The proxy's own path: the spooled message (here in a file) minus those ranges.
        with Spool(threshold=0) as spool:
            spool.write(data)
            parts = assemble_inbound(spool, Outcome(remove_ranges=ranges))
            cleaned = b"".join(
                b"".join(map(bytes, part.chunks())) if hasattr(part, "chunks") else bytes(part)
                for part in parts
            )
        remaining = Message(cleaned)
        names_values = [(n.lower(), v) for n, v in remaining.headers]
        assert forged_authentication_results(remaining, "mx.ar.test") == []
        assert (b"authentication-results", b" other.test; spf=pass smtp.mailfrom=x@y.test\r\n") in (
            names_values
        )
        assert cleaned.endswith(b"From: a@example.com\r\n\r\nbody\r\n")
        assert len(data) - len(cleaned) == sum(e - s for s, e in ranges)
