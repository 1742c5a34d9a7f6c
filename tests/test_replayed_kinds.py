"""Members of issue 16's kinds replayed beyond the ones the issue names (red-team review).

Each test is one more member of a kind: IDN in every configured identifier, full stops other
than "." in a domain, and (with hypothesis) arbitrary From/Sender values that must give a
verdict rather than an exception in the policy and the verifier.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dkproxy import config
from dkproxy.mailauth.addresses import canonical_domain, parse_mailboxes
from dkproxy.mailauth.dnsresolver import DnsAnswer, Resolver
from dkproxy.mailauth.message import Message, MessageFormatError
from dkproxy.mailauth.verifier import VerifySettings, decide, verify_message
from dkproxy.outbound import OutboundSigner
from tests.support.dnsserver import DNSServer
from tests.support.sink import CaptureServer
from tests.support.testkeys import make_rsa_key
from tests.test_inbound import ar_results, send, signing_key, start_inbound

__all__ = ["signing_key"]  # the module-scoped fixture publishing example.org's records

UMESSAGE = "From: Jörg <jörg@Exämple.org>\r\nSubject: idn\r\n\r\nbody\r\n".encode()


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("replayed") / "key.pem"))


def _signer(*args: str) -> OutboundSigner:
    cfg = config.parse_proxy_command("out", [*args, "127.0.0.1:1", "127.0.0.1:2"])
    return OutboundSigner.from_config(cfg)  # type: ignore[arg-type]


def _dkim_tags(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    field = head.split("DKIM-Signature:", 1)[1]
    field = field.split("\r\n")[0] + "".join(
        line for line in field.split("\r\n")[1:] if line[:1] in (" ", "\t")
    )
    tags = (t.strip().split("=", 1) for t in field.replace("\t", "").split(";") if "=" in t)
    return {k.strip(): v.replace(" ", "") for k, v in tags}


@pytest.mark.parametrize(
    "option",
    [
        "--identity=@exämple.org",
        "--identity=@EXÄMPLE.ORG.",
        "--signature=dkim(i=@exämple.org)",
        "--signature=dkim(i=joe@Mail.Exämple.org.)",
        "--signature=dkim(d=exämple.org,i=@xn--exmple-cua.org)",
    ],
)
def test_u_label_identity_is_accepted_and_signed_in_a_labels(rsa_key: str, option: str) -> None:
    signer = _signer(f"--keyfile={rsa_key}", "--selector=s", "--domain=exämple.org", option)
    outcome = signer.sign(UMESSAGE)
    assert outcome.prepend, outcome.summary
    tags = _dkim_tags(b"".join(outcome.prepend) + UMESSAGE)
    assert tags["d"] == "xn--exmple-cua.org"
    assert tags["i"].rpartition("@")[2] in ("xn--exmple-cua.org", "mail.xn--exmple-cua.org")
    assert tags["i"].isascii()


@pytest.mark.parametrize("stop", ["\u3002", "\uff0e", "\uff61"])
def test_other_full_stops_and_a_root_dot_in_them(stop: str) -> None:
    # UTS 46 maps these to "."; written last they are the root dot, which is dropped.
    assert canonical_domain(f"exämple{stop}org") == "xn--exmple-cua.org"
    assert canonical_domain(f"exämple{stop}org{stop}") == "xn--exmple-cua.org"
    found = parse_mailboxes(f"Jörg <joerg@EXÄMPLE{stop}org{stop}>")
    assert found.domains == ["xn--exmple-cua.org"], found.problems


# --------------------------------------------------------------------------------------------
# Any From/Sender: a verdict, never an exception; an example.org author never escapes p=reject


class _Zone(Resolver):
    """DNS answers from a dict (the property test runs hundreds of messages; every other name
    is NXDOMAIN). Real DNS through NSD is exercised by test_inbound and test_dmarc_authors."""

    ZONE = {"_dmarc.example.org": b"v=DMARC1; p=reject", "example.org": b"v=spf1 -all"}

    async def _lookup(self, name: str, rdtype: str) -> tuple[DnsAnswer, float]:
        record = self.ZONE.get(name.rstrip(".").lower()) if rdtype == "TXT" else None
        if record is None:
            return DnsAnswer("nxdomain", (), "NXDOMAIN"), 60.0
        return DnsAnswer("ok", (record,)), 60.0


_PIECES = [
    "a", "Jörg", "ä", "ß", "İ", "@", "@", "example.org", "EXAMPLE.ORG.", "exämple.org",
    "example.com", "xn--", "xn--exmple-cua.org", '"', '"', "<", ">", ",", ";", ":", "(", ")",
    "\\", ".", " ", "\t", "\r\n ", "[", "]", "=?utf-8?q?", "=?iso-2022-jp?b?", "=2C", "=40",
    "?=", "\x00", "\uff0e", "\u3002", "\u200d", "\r", "\n", "\udcff",
]  # fmt: skip
_values = st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=14).map("".join)


def _raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(from_values=st.lists(_values, min_size=1, max_size=3), sender=st.none() | _values)
def test_any_from_or_sender_gives_a_verdict(
    rsa_key: str, from_values: list[str], sender: str | None
) -> None:
    head = b"".join(b"From: " + _raw(v) + b"\r\n" for v in from_values)
    if sender is not None:
        head += b"Sender: " + _raw(sender) + b"\r\n"
    raw = head + b"Subject: p\r\n\r\nbody\r\n"
    # Outbound: a signed or unsigned outcome with a reason, never an exception.
    outcome = _signer_for(rsa_key).sign(raw)
    assert outcome.summary
    # Inbound: a report and a decision, never an exception.
    try:
        message = Message(raw)
    except MessageFormatError:
        return  # answered without verification (inbound.py), not an exception
    settings_ = VerifySettings(authserv_id="mx.test", reject_fail=True, arc=True)
    report = asyncio.run(
        verify_message(
            message, client_ip="192.0.2.9", helo="c.test", mail_from=None,
            resolver=_Zone(), settings=settings_,
        )
    )  # fmt: skip
    decision = decide(report, settings_)
    assert decision.action in ("accept", "reject", "tempfail")
    authors = {r.from_domain for r in report.dmarc_authors}
    # An unsigned message naming example.org (p=reject) as an author is never accepted.
    if "example.org" in authors:
        assert decision.action == "reject", (from_values, report.dmarc_authors)


_SIGNERS: dict[str, OutboundSigner] = {}


def _signer_for(key: str) -> OutboundSigner:
    """One signer per key for all examples (building one loads the key)."""
    if key not in _SIGNERS:
        _SIGNERS[key] = _signer(
            f"--keyfile={key}", "--selector=s", "--domain=example.org,exämple.org,example.com",
            "--signature=dkim(d=$senderdomain)", "--signature=domainkeys",
        )  # fmt: skip
    return _SIGNERS[key]


# --------------------------------------------------------------------------------------------
# A header block dkproxy cannot parse still gets a DMARC verdict through `dkproxy in`

BAD_HEADERS = {
    "line-without-colon": b"From: Alice <alice@example.org>\r\nX-Bad line\r\n",
    "empty-field-name": b"From: alice@example.org\r\n: empty name\r\n",
    "space-in-field-name": b"From: alice@example.org\r\nX Y: v\r\n",
    "nul-field-name": b"From: alice@example.org\r\n\x00X: v\r\n",
}


def test_unparsable_header_block_never_escapes_p_reject(
    tmp_path: Path, dns_server: DNSServer, signing_key: str
) -> None:
    """example.org publishes p=reject (tests/test_inbound.py's signing_key fixture): a From
    above a malformed header line is what a reader sees, so reject_fail must not accept it."""
    with CaptureServer() as capture:
        proxy = start_inbound(tmp_path, capture.address, dns_server, "reject_fail")
        try:
            for name, head in BAD_HEADERS.items():
                message = head + b"Subject: " + name.encode() + b"\r\n\r\nbody\r\n"
                code, text = send(proxy, message, xforward="ADDR=198.51.100.9")
                assert code == 550 and "DMARC cannot be applied" in text, (name, code, text)
        finally:
            proxy.stop()
        assert capture.messages == []
        assert "Traceback" not in proxy.log
    # Without reject_fail the message passes, with a dmarc=permerror saying why, and the
    # Authentication-Results claiming our authserv-id (above or below the bad line) are cut.
    forged = (
        b"Authentication-Results: mx.example.test; dkim=pass header.d=example.org;\r\n"
        b"\tdmarc=pass header.from=example.org\r\n"
    )
    other = b"Authentication-Results: other.example; spf=pass\r\n"
    head = forged + BAD_HEADERS["line-without-colon"] + other + forged.replace(b"Auth", b"auth")
    with CaptureServer() as capture:
        proxy = start_inbound(tmp_path, capture.address, dns_server)
        try:
            assert send(proxy, head + b"\r\nbody\r\n")[0] == 250
        finally:
            proxy.stop()
        (tx,) = capture.messages
        assert tx.data is not None
        results = ar_results(tx.data)
        assert [r.result for r in results["dmarc"]] == ["permerror"]
        assert b"dmarc=pass" not in tx.data and b"dkim=pass" not in tx.data
        assert tx.data.endswith(BAD_HEADERS["line-without-colon"] + other + b"\r\nbody\r\n")
        assert "removed 2 forged Authentication-Results" in proxy.log


# --------------------------------------------------------------------------------------------
# SPF: the domain DMARC aligns on is the one pyspf evaluated


class _AttackerZone(_Zone):
    """pyspf reads `x@attacker.example@example.org` as local part `x`, domain
    `attacker.example@example.org` (a name whose TXT records someone else may publish)."""

    ZONE = {
        **_Zone.ZONE,
        "attacker.example@example.org": b"v=spf1 +all",
        '"@example.org': b"v=spf1 +all",
    }


@pytest.mark.parametrize(
    "mail_from",
    ["x@attacker.example@example.org", 'x@"@example.org', "x@attacker.example@EXAMPLE.ORG."],
)
def test_spf_pass_for_another_name_never_aligns_with_the_last_at_domain(mail_from: str) -> None:
    message = Message(b"From: alice@example.org\r\nSubject: spf\r\n\r\nbody\r\n")
    settings_ = VerifySettings(authserv_id="mx.test", reject_fail=True)
    report = asyncio.run(
        verify_message(
            message, client_ip="192.0.2.9", helo="c.test", mail_from=mail_from,
            resolver=_AttackerZone(), settings=settings_,
        )
    )  # fmt: skip
    assert report.spf is not None
    assert report.spf.domain != "example.org"
    assert report.dmarc is not None and report.dmarc.result == "fail", report.dmarc
    assert decide(report, settings_).action == "reject"


# --------------------------------------------------------------------------------------------
# An unusable author mailbox beside a passing one


class _SenderZone(_Zone):
    """example.com (the sender's own domain) passes SPF for 192.0.2.9 and says p=none."""

    ZONE = {
        **_Zone.ZONE,
        "example.com": b"v=spf1 ip4:192.0.2.9 -all",
        "_dmarc.example.com": b"v=DMARC1; p=none",
    }


@pytest.mark.parametrize(
    "other",
    ['a"@example.org', "ceo@[192.0.2.1]", "ceo@xn--zz.example", '"ceo@example.org"', "ceo@"],
)
def test_an_unusable_author_beside_a_passing_one_is_refused_under_reject_fail(
    other: str,
) -> None:
    settings_ = VerifySettings(authserv_id="mx.test", reject_fail=True)

    def decision(from_value: str) -> str:
        message = Message(f"From: {from_value}\r\nSubject: a\r\n\r\nbody\r\n".encode())
        report = asyncio.run(
            verify_message(
                message, client_ip="192.0.2.9", helo="c.test", mail_from="m@example.com",
                resolver=_SenderZone(), settings=settings_,
            )
        )  # fmt: skip
        return decide(report, settings_).action

    assert decision("mallory@example.com") == "accept"
    assert decision(f"mallory@example.com, {other}") == "reject"
    assert decision(f"{other}, mallory@example.com") == "reject"
