"""DomainKeys (RFC 4870) signing and verification, checked against Perl Mail::DKIM.

Mail::DKIM is the verifier DomainKeys mail meets in practice (DKIMproxy, SpamAssassin), so the
interop tests run it for real (tests/support/mail_dkim.pl): it fetches keys from the session's
NSD, verifies what we sign, and signs messages that our verifier must accept. Unit tests pin
the canonicalization rules.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from dkproxy.mailauth import domainkeys as dk
from dkproxy.mailauth.keys import load_signing_key, public_p_value
from dkproxy.mailauth.message import Message
from tests.support.dnsserver import DNSServer
from tests.support.testkeys import KeySet
from tests.support.tools import require_perl_module
from tests.support.verifiers import PERL_HELPER

DOMAIN = "example.org"
#: Selector prefix of this module's records on the shared DNS server.
SEL = "dkmod"


@dataclass(frozen=True)
class PerlSig:
    """Mail::DKIM's verdict on one DomainKey-Signature; `detail` is its result_detail()."""

    result: str
    detail: str
    identity: str | None


@dataclass
class Env:
    """The signing key, the DNS server holding this module's records, and Mail::DKIM."""

    key: rsa.RSAPrivateKey
    key_path: str
    dns: DNSServer
    perl: str
    records: dict[str, str | None] = field(default_factory=dict)

    def _mail_dkim(self, mode: str, messages: list[bytes], *args: str) -> list[dict]:
        """Run mail_dkim.pl on exact bytes. verifiers.verify_mail_dkim_many turns lone LFs
        into CRLF first, which would hide the bare-LF cases this module must test."""
        frames = b"".join(b"%d\n" % len(m) + m for m in messages)
        proc = subprocess.run(
            [self.perl, PERL_HELPER, mode, "--port", str(self.dns.port), *args],
            input=frames,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
        out = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
        assert len(out) == len(messages) and not any("error" in o for o in out), out
        return out

    def perl_dk(self, messages: list[bytes]) -> list[PerlSig]:
        """Mail::DKIM's verdict on the one DomainKey-Signature of each message."""
        verdicts = []
        for raw in self._mail_dkim("verify", messages):
            dks = [s for s in raw["signatures"] if s["kind"] == "domainkeys"]
            assert len(dks) == 1, raw
            verdicts.append(PerlSig(dks[0]["result"], dks[0]["detail"], dks[0]["identity"]))
        return verdicts

    def perl_verify(self, message: bytes) -> list[tuple[str, str]]:
        """(kind, result) of every signature Mail::DKIM finds in `message`."""
        raw = self._mail_dkim("verify", [message])[0]
        return [(s["kind"], s["result"]) for s in raw["signatures"]]

    def perl_sign(self, messages: list[bytes], method: str) -> list[bytes]:
        """The messages with a DomainKey-Signature by Mail::DKIM::Signer on top."""
        args = ["--key", self.key_path, "--domain", DOMAIN, "--selector", f"{SEL}-sel"]
        args += ["--type", "domainkeys", "--method", method, "--algorithm", "rsa-sha1"]
        signed = []
        for out, data in zip(self._mail_dkim("sign", messages, *args), messages, strict=True):
            (header,) = out["headers"]
            field_bytes = header.encode("latin-1").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            signed.append(field_bytes + b"\r\n" + data)
        return signed

    def ours(self, data: bytes, position: int = 0) -> dk.DKResult:
        """Our verdict on the DomainKey-Signature at header index `position`, key from DNS."""
        message = Message(data)
        sig = dk.parse_signature(message.headers[position][1])
        if sig.key_name not in self.records:
            # cached, like a resolver would: bursts of lookups trip NSD's rate limiting
            found = self.dns.lookup_txt(sig.key_name)
            self.records[sig.key_name] = found[0].decode("ascii") if found else None
        return dk.verify_with_key(message, position, sig, self.records[sig.key_name])


def _rsa(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@pytest.fixture(scope="module")
def env(dns_server: DNSServer, key_dir: KeySet) -> Iterator[Env]:
    perl = require_perl_module("Mail::DKIM::Verifier")
    require_perl_module("JSON::PP")
    # Mail::DKIM::PrivateKey reads only PKCS#1 ("BEGIN RSA PRIVATE KEY") files.
    test_key = key_dir.rsa2048_pkcs1
    key = load_signing_key(test_key.path).private
    assert isinstance(key, rsa.RSAPrivateKey)
    p = public_p_value(key)
    ed_p = public_p_value(ed25519.Ed25519PrivateKey.generate())
    records = {
        "sel": f"k=rsa; p={p}",  # 2048 bits: split into 255-byte strings
        "dkim1": f"v=DKIM1; k=rsa; p={p}",
        "revoked": "k=rsa; p=",
        "ed": f"k=ed25519; p={ed_p}",
        "testing": f"k=rsa; t=y; p={p}",
        "gjoe": f"g=joe; k=rsa; p={p}",
        "strict": f"k=rsa; t=s; p={p}",
    }
    names = {f"{SEL}-{sel}._domainkey.{DOMAIN}": [rec] for sel, rec in records.items()}
    dns_server.publish(names)
    try:
        yield Env(key, test_key.path, dns_server, perl)
    finally:
        dns_server.unpublish(*names)


# -- corpus ----------------------------------------------------------------------------------

HEAD = (
    b"Received: from client.example.org (client [192.0.2.7])\r\n\tby mx.example.org; Mon, 1 Jan"
    b" 2024 00:00:00 +0000\r\n"
    b"From: Joe Example <joe@example.org>\r\n"
    b"To: Bob <bob@example.net>,\r\n  Carol <carol@example.net>\r\n"
    b"Subject: Hello   there,\r\n\t folded  subject\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Mailer: test\r\n"
)

CORPUS: dict[str, bytes] = {
    "plain": HEAD + b"\r\nHello  world,\r\n\tindented\tline \r\n\r\n-- \r\nJoe\r\n",
    "mime_and_lists": (
        b"From: joe@example.org\r\nTo: list@example.net\r\nSubject: x\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain;\r\n charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\nList-Id: Test <test.example.org>\r\n"
        b"List-Unsubscribe: <mailto:leave@example.org>\r\n\r\nbody\r\n"
    ),
    "sender_header": (
        b"From: Someone <someone@example.com>\r\nSender: List <list@example.org>\r\n"
        b"To: x@example.net\r\nSubject: via list\r\n\r\nbody\r\n"
    ),
    "subdomain_sender": b"From: joe@sub.example.org\r\nSubject: sub\r\n\r\nbody\r\n",
    "duplicate_headers": (
        b"Received: a\r\nFrom: joe@example.org\r\nTo: a@example.net\r\nReceived: b\r\n"
        b"To: b@example.net\r\nSubject: one\r\nSubject: two\r\n\r\nbody\r\n"
    ),
    "empty_body": b"From: joe@example.org\r\nSubject: empty\r\n\r\n",
    "blank_only_body": b"From: joe@example.org\r\nSubject: empty\r\n\r\n\r\n\r\n\r\n",
    "whitespace_only_body": b"From: joe@example.org\r\nSubject: ws\r\n\r\n \r\n\t\r\n  \t \r\n",
    "no_body_no_separator": b"From: joe@example.org\r\nSubject: headers only\r\n",
    "last_line_without_crlf": b"From: joe@example.org\r\nSubject: x\r\n\r\nline 1\r\nlast line",
    "blank_lines_then_partial": b"From: joe@example.org\r\nSubject: x\r\n\r\na\r\n\r\n\r\n  ",
    "whitespace_lines_inside": (
        b"From: joe@example.org\r\nSubject: x\r\n\r\n\r\n  \r\npara 1\r\n \t \r\n\r\n"
        b"para 2\r\n   \r\n\r\n"
    ),
    "eight_bit": (
        b"From: J\xc3\xb6rg <joerg@example.org>\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x82\xac\r\nlatin-1: \xe9\xe8\xff\r\n"
    ),
    "bare_cr_and_lf_inside_lines": (
        b"From: joe@example.org\r\nSubject: x\r\n\r\nli\rne 1\r\nli\nne 2\r\nend\r\r\n"
    ),
    "long_body_line": b"From: joe@example.org\r\nSubject: x\r\n\r\n" + b"word " * 2000 + b"\r\n",
}

#: What Mail::DKIM reports as the identity of each corpus message.
IDENTITY = {
    "sender_header": ("list@example.org", "header.sender"),
    "subdomain_sender": ("joe@sub.example.org", "header.from"),
    "eight_bit": ("joerg@example.org", "header.from"),
    "plain": ("joe@example.org", "header.from"),
}


def _sign(data: bytes, c: str = "nofws", selector: str = "sel", *, key: rsa.RSAPrivateKey) -> bytes:
    """Our DomainKey-Signature field for `data` (selector under this module's prefix)."""
    message = Message(data)
    return dk.sign(
        message, domain=DOMAIN, selector=f"{SEL}-{selector}", key=key, canonicalization=c
    )


def _manual(
    data: bytes,
    key: rsa.RSAPrivateKey,
    c: str,
    h: tuple[str, ...] | None,
    hashed_h: tuple[str, ...] | None = None,
) -> bytes:
    """A DomainKey-Signature with a chosen h= (or none), built from canonical_hash_input.

    `hashed_h` (default: `h`) is the list actually hashed, to forge an h= that lies about it.
    """
    used = h if hashed_h is None else hashed_h
    template = dk.DKSignature("rsa-sha1", c, DOMAIN, f"{SEL}-sel", "dns", used, b"", b"")
    signature = key.sign(
        dk.canonical_hash_input(Message(data), -1, template), padding.PKCS1v15(), hashes.SHA1()
    )
    h_tag = f" h={':'.join(h)};" if h else ""
    b64 = base64.b64encode(signature).decode()
    tags = f"a=rsa-sha1; c={c}; d={DOMAIN}; s={SEL}-sel; q=dns;{h_tag} b={b64}"
    return f"DomainKey-Signature: {tags}\r\n".encode()


# -- interop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_mail_dkim_verifies_our_signatures(env: Env, c: str) -> None:
    signed = [_sign(data, c, key=env.key) + data for data in CORPUS.values()]
    verdicts = env.perl_dk(signed)
    for (name, _data), verdict, message in zip(CORPUS.items(), verdicts, signed, strict=True):
        assert verdict.result == "pass", (name, verdict)
        ours = env.ours(message)
        assert (ours.result, ours.status, ours.code) == ("pass", "good", "A"), (name, ours)
        assert ours.identity == verdict.identity, name
        if name in IDENTITY:
            assert (verdict.identity, f"header.{ours.identity_header}") == IDENTITY[name]


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_we_verify_mail_dkim_signatures(env: Env, c: str) -> None:
    signed = env.perl_sign(list(CORPUS.values()), c)
    for name, message in zip(CORPUS, signed, strict=True):
        sig = dk.parse_signature(Message(message).headers[0][1])
        assert sig.c == c
        result = env.ours(message)
        assert result.result == "pass", (name, result)
        if name in IDENTITY:
            assert (result.identity, f"header.{result.identity_header}") == IDENTITY[name]
    # Their tampered copies must fail with us as they do with Mail::DKIM itself.
    tampered = [m.replace(b"body\r\n", b"b0dy\r\n") for m in signed if m.endswith(b"body\r\n")]
    assert tampered
    for verdict, message in zip(env.perl_dk(tampered), tampered, strict=True):
        assert verdict.result == "fail"
        assert env.ours(message).result == "fail"


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_random_bodies_and_subjects_agree_with_mail_dkim(env: Env, c: str) -> None:
    """Fuzz the canonicalization edge cases (whitespace, bare CR/LF, blank lines, missing
    final CRLF, folding) against Mail::DKIM: every signature must verify there and here."""
    rng = random.Random(4870)
    body_tokens = [b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n", b"\xe9"]
    subject_tokens = [b"x", b"y", b" ", b"\t", b"\r\n ", b"\r\n\t"]
    messages = []
    # 80 per run keeps Mail::DKIM's key lookups below NSD's default rate limit (200 qps).
    for _ in range(80):
        subject = b"".join(rng.choice(subject_tokens) for _ in range(rng.randrange(8)))
        body = b"".join(rng.choice(body_tokens) for _ in range(rng.randrange(30)))
        messages.append(b"From: joe@example.org\r\nSubject: s" + subject + b"\r\n\r\n" + body)
    signed = [_sign(data, c, key=env.key) + data for data in messages]
    verdicts = env.perl_dk(signed)
    for data, verdict, message in zip(messages, verdicts, signed, strict=True):
        assert verdict.result == "pass", (data, verdict)
        assert env.ours(message).result == "pass", data


def test_two_thousand_bit_key_split_txt_record(env: Env) -> None:
    data = CORPUS["plain"]
    message = _sign(data, key=env.key) + data
    answer = env.dns.query(f"{SEL}-sel._domainkey.{DOMAIN}").answer
    strings = answer[0][0].strings
    assert len(strings) > 1 and len(strings[0]) == 255  # the record spans several strings
    assert env.perl_dk([message])[0].result == "pass"
    assert env.ours(message).result == "pass"


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_h_order_different_from_message_order(env: Env, c: str) -> None:
    data = CORPUS["plain"]
    reordered = _manual(data, env.key, c, ("subject", "to", "date", "from")) + data
    # h= claims message order but the hash was taken in another order: must fail.
    lying = (
        _manual(
            data, env.key, c, ("from", "to", "subject", "date"), ("subject", "to", "date", "from")
        )
        + data
    )
    perl = env.perl_dk([reordered, lying])
    assert perl[0].result == "pass", perl[0]
    assert perl[1].result == "fail", perl[1]
    assert env.ours(reordered).result == "pass"
    assert env.ours(lying).result == "fail"


def test_duplicate_names_in_h_and_in_header(env: Env) -> None:
    data = CORPUS["duplicate_headers"]
    once = _manual(data, env.key, "simple", ("from", "to", "subject")) + data
    twice = _manual(data, env.key, "simple", ("from", "to", "to", "subject", "subject")) + data
    # Mail::DKIM: the first occurrence of a name in h= takes all remaining fields of that
    # name, so "to" once means both To fields, in message order.
    once_sig = dk.parse_signature(Message(once).headers[0][1])
    both_to = dk.canonical_hash_input(Message(data), -1, once_sig)
    assert both_to.index(b"To: a@") < both_to.index(b"To: b@")
    # A third To added right below the signature: the later h= "to" now takes it.
    sig_twice, rest = twice.split(b"\r\n", 1)
    added = sig_twice + b"\r\nTo: intruder@example.net\r\n" + rest
    perl = env.perl_dk([once, twice, added])
    assert [v.result for v in perl] == ["pass", "pass", "fail"], perl
    assert [env.ours(m).result for m in (once, twice, added)] == ["pass", "pass", "fail"]


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_headers_added_above_and_below_the_signature(env: Env, c: str) -> None:
    data = CORPUS["plain"]
    ours = _sign(data, c, key=env.key)
    no_h = _manual(data, env.key, c, None)
    above = b"Received: from relay.example.net by mx.example.com\r\n"
    below = b"X-Spam-Score: 1.0\r\n"
    cases = {
        "ours+above": above + ours + data,
        "ours+below_unsigned_name": ours + below + data,
        "ours+below_signed_name": ours + b"To: intruder@example.net\r\n" + data,
        "no_h+above": above + no_h + data,
        "no_h+below": no_h + below + data,
        "ours_bare": ours + data,
    }
    expected = {
        "ours+above": "pass",
        "ours+below_unsigned_name": "pass",
        "ours+below_signed_name": "fail",
        "no_h+above": "pass",
        "no_h+below": "fail",  # without h= every field below the signature is signed
        "ours_bare": "pass",
    }
    perl = env.perl_dk(list(cases.values()))
    for (name, message), verdict in zip(cases.items(), perl, strict=True):
        assert verdict.result == expected[name], (name, verdict)
        position = 1 if name.endswith("above") else 0
        assert env.ours(message, position).result == expected[name], name


def test_dkim_signature_below_domainkey_signature(env: Env) -> None:
    import dkim

    data = CORPUS["plain"]
    with open(env.key_path, "rb") as fh:
        pem = fh.read()
    selector = f"{SEL}-dkim1".encode()
    dkim_field = dkim.sign(data, selector, DOMAIN.encode(), pem, linesep=b"\r\n")
    message = _sign(data, key=env.key) + dkim_field + data
    verdicts = env.perl_verify(message)
    assert verdicts == [("domainkeys", "pass"), ("dkim", "pass")], verdicts
    assert env.ours(message).result == "pass"


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_tampering(env: Env, c: str) -> None:
    data = CORPUS["plain"]
    signed = _sign(data, c, key=env.key) + data
    cases = {
        "body": (signed.replace(b"Hello  world", b"Hello  World"), "fail"),
        "signed_header": (signed.replace(b"Subject: Hello", b"Subject: Jello"), "fail"),
        "unsigned_header": (signed.replace(b"X-Mailer: test", b"X-Mailer: other"), "pass"),
        "added_body_line": (signed + b"P.S. buy now\r\n", "fail"),
        "added_empty_lines": (signed + b"\r\n\r\n", "pass"),
    }
    if c == "nofws":
        cases["reflowed_whitespace"] = (
            signed.replace(b"Hello  world,", b"Hello world,").replace(
                b"\tindented", b"    indented"
            ),
            "pass",
        )
        cases["refolded_header"] = (
            signed.replace(b"there,\r\n\t folded", b"there, folded"),
            "pass",
        )
    perl = env.perl_dk([m for m, _ in cases.values()])
    for (name, (message, want)), verdict in zip(cases.items(), perl, strict=True):
        assert verdict.result == want, (name, verdict)
        ours = env.ours(message)
        assert ours.result == want, (name, ours)
        if want == "fail":
            assert (ours.status, ours.code) == ("bad", "B")
            assert verdict.detail == f"fail ({ours.detail})"


def test_key_record_problems_match_mail_dkim(env: Env) -> None:
    data = CORPUS["plain"]
    bob = data.replace(b"joe@example.org", b"bob@example.org")
    cases = {
        "revoked": (_sign(data, selector="revoked", key=env.key) + data, "revoked", "J"),
        "missing": (_sign(data, selector="nokey", key=env.key) + data, "no key", "D"),
        "ed25519": (_sign(data, selector="ed", key=env.key) + data, "bad format", "E"),
        "granularity": (_sign(bob, selector="gjoe", key=env.key) + bob, "bad", "L"),
        "subdomain_t_s": (
            _sign(CORPUS["subdomain_sender"], selector="strict", key=env.key)
            + CORPUS["subdomain_sender"],
            "bad",
            "L",
        ),
    }
    perl = env.perl_dk([m for m, *_ in cases.values()])
    for (name, (message, status, code)), verdict in zip(cases.items(), perl, strict=True):
        assert verdict.result == "invalid", (name, verdict)
        ours = env.ours(message)
        assert (ours.result, ours.status, ours.code) == ("permerror", status, code), (name, ours)
        assert verdict.detail == f"invalid ({ours.detail})", name
    granted = _sign(data, selector="gjoe", key=env.key) + data
    testing = _sign(data, selector="testing", key=env.key) + data
    assert [v.result for v in env.perl_dk([granted, testing])] == ["pass", "pass"]
    assert env.ours(granted).result == "pass"
    result = env.ours(testing)
    assert (result.result, result.testing) == ("pass", True)
    assert "t=y" in result.detail


def test_folded_from_is_bad_identity_for_mail_dkim_and_refused_by_us(env: Env) -> None:
    on_continuation = b"From: Joe Example\r\n <joe@example.org>\r\nSubject: x\r\n\r\nbody\r\n"
    on_first_line = b"From: joe@example.org\r\n (Joe Example)\r\nSubject: x\r\n\r\nbody\r\n"
    for data in (on_continuation, on_first_line):
        with pytest.raises(dk.DomainKeysError, match="bad identity"):
            _sign(data, key=env.key)
    # Mail::DKIM signs such a message without complaint, then cannot verify it.
    signed = env.perl_sign([on_continuation, on_first_line], "nofws")
    for verdict, message in zip(env.perl_dk(signed), signed, strict=True):
        assert verdict.detail == "invalid (bad identity)"
        ours = env.ours(message)
        assert (ours.result, ours.detail, ours.identity) == ("permerror", "bad identity", None)


def test_sender_outside_signing_domain(env: Env) -> None:
    foreign = b"From: joe@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    lookalike = b"From: joe@notexample.org\r\nSubject: x\r\n\r\nbody\r\n"
    for data in (foreign, lookalike):
        with pytest.raises(dk.DomainKeysError, match=r"not in d=example\.org"):
            _sign(data, key=env.key)
    # Mail::DKIM refuses such a signature as well.
    forged = _manual(foreign, env.key, "nofws", ("from", "subject")) + foreign
    assert env.perl_dk([forged])[0].detail == "invalid (bad identity)"
    assert env.ours(forged).detail == "bad identity"
    # d= a child of the sender's domain is not allowed either, only the parent.
    with pytest.raises(dk.DomainKeysError):
        dk.sign(Message(CORPUS["plain"]), domain="sub.example.org", selector="s", key=env.key)


# -- signing rules (no external tools) -------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return _rsa(1024)


def test_h_lists_signed_names_in_message_order(key: rsa.RSAPrivateKey) -> None:
    data = (
        b"Received: x\r\nTo: a@example.net\r\nFrom: joe@example.org\r\nX-Custom: 1\r\n"
        b"To: b@example.net\r\nContent-Type: text/plain\r\nList-Id: <l.example.org>\r\n"
        b"Subject: s\r\nReply-To: r@example.org\r\n\r\nbody\r\n"
    )
    field = dk.sign(Message(data), domain=DOMAIN, selector="sel", key=key)
    sig = dk.parse_signature(field)
    assert sig.h == ("to", "from", "to", "content-type", "list-id", "subject", "reply-to")
    assert (sig.a, sig.c, sig.d, sig.s, sig.q) == ("rsa-sha1", "nofws", DOMAIN, "sel", "dns")
    assert field.startswith(b"DomainKey-Signature: a=rsa-sha1; c=nofws; d=example.org; s=sel;")
    assert field.endswith(b"\r\n") and b"\n\r\n" not in field
    for line in field.split(b"\r\n")[:-1]:
        assert len(line) <= dk.FOLD_COLUMN
    custom = dk.sign(Message(data), domain=DOMAIN, selector="sel", key=key, headers=["From", "x-*"])
    assert dk.parse_signature(custom).h == ("from", "x-custom")


def test_sign_refusals(key: rsa.RSAPrivateKey) -> None:
    def refused(data: bytes, match: str, **kwargs: object) -> None:
        args: dict[str, object] = {"domain": DOMAIN, "selector": "s", "key": key, **kwargs}
        with pytest.raises(dk.DomainKeysError, match=match):
            dk.sign(Message(data), **args)  # type: ignore[arg-type]

    refused(b"Subject: no sender\r\n\r\nbody\r\n", "no sender")
    refused(b"From: undisclosed-recipients:;\r\n\r\nbody\r\n", "no sender")
    # Sender wins over From, and the last Sender/From occurrence wins.
    refused(b"From: joe@example.org\r\nSender: x@example.com\r\n\r\nb\r\n", "x@example.com")
    refused(b"From: joe@example.org\r\nFrom: x@example.com\r\n\r\nb\r\n", "x@example.com")
    refused(b"From: joe@example.org\r\nSubject: s\r\n\r\nb\r\n", "From header", headers=["subject"])
    refused(
        b"From: joe@example.org\r\nSender: s@example.org\r\n\r\nb\r\n",
        "Sender header",
        headers=["from"],
    )
    refused(b"From: joe@example.org\nSubject: lf only\n\nbody\n", "bare LF")
    refused(
        b"From: joe@example.org\r\n\r\nb\r\n", "not RSA", key=ed25519.Ed25519PrivateKey.generate()
    )
    with pytest.raises(ValueError):
        dk.sign(
            Message(CORPUS["plain"]),
            domain=DOMAIN,
            selector="s",
            key=key,
            canonicalization="relaxed",
        )
    with pytest.raises(ValueError):
        dk.sign(Message(CORPUS["plain"]), domain=DOMAIN, selector="a;b", key=key)


def test_sender_identity() -> None:
    assert dk.sender_identity(Message(CORPUS["plain"])) == ("from", "joe@example.org")
    assert dk.sender_identity(Message(CORPUS["sender_header"])) == ("sender", "list@example.org")
    folded = b"From: Joe\r\n <joe@example.org>\r\n\r\n"
    assert dk.sender_identity(Message(folded)) is None
    folded_sender = b"Sender: List\r\n <l@example.org>\r\nFrom: joe@example.org\r\n\r\n"
    assert dk.sender_identity(Message(folded_sender)) == ("from", "joe@example.org")
    twice = b"From: a@example.org\r\nFrom: b@example.org\r\n\r\n"
    assert dk.sender_identity(Message(twice)) == ("from", "b@example.org")


# -- canonicalization ------------------------------------------------------------------------


def _sig(c: str, h: tuple[str, ...] | None = None) -> dk.DKSignature:
    return dk.DKSignature("rsa-sha1", c, DOMAIN, "s", "dns", h, b"", b"")


def test_canonical_forms() -> None:
    data = (
        b"From: Joe <joe@example.org>\r\nSubject:  Hello\r\n  World\r\n\r\n"
        b" a b \r\n\tc\r\n\r\n  \r\n"
    )
    message = Message(data)
    assert dk.canonical_hash_input(message, -1, _sig("nofws")) == (
        b"From:Joe<joe@example.org>\r\nSubject:HelloWorld\r\n\r\nab\r\nc\r\n"
    )
    assert dk.canonical_hash_input(message, -1, _sig("simple")) == (
        b"From: Joe <joe@example.org>\r\nSubject:  Hello\r\n  World\r\n\r\n a b \r\n\tc\r\n"
        b"\r\n  \r\n"
    )
    # Only fields below the signature count; h= picks and orders them.
    assert dk.canonical_hash_input(message, 0, _sig("nofws")).startswith(b"Subject:")
    assert dk.canonical_hash_input(message, -1, _sig("nofws", ("subject", "from"))).startswith(
        b"Subject:HelloWorld\r\nFrom:"
    )


@pytest.mark.parametrize("c", ["nofws", "simple"])
def test_empty_and_blank_bodies_hash_alike(c: str) -> None:
    head = b"From: joe@example.org\r\nSubject: x\r\n"
    canonical_head = dk.canonical_hash_input(Message(head), -1, _sig(c))
    variants = [head, head + b"\r\n", head + b"\r\n\r\n", head + b"\r\n\r\n\r\n\r\n"]
    if c == "nofws":
        variants.append(head + b"\r\n \t\r\n   \r\n")
    for data in variants:
        # no separator line when the body is empty or only empty lines
        assert dk.canonical_hash_input(Message(data), -1, _sig(c)) == canonical_head, data


def test_body_line_end_rules() -> None:
    head = b"From: joe@example.org\r\n\r\n"

    def body(raw: bytes, c: str) -> bytes:
        out = dk.canonical_hash_input(Message(head + raw), -1, _sig(c))
        return out[len(b"From:joe@example.org\r\n") if c == "nofws" else len(head) - 2 :]

    # trailing empty lines go, the unterminated last line stays as it is
    assert body(b"a\r\n\r\n\r\n", "simple") == b"\r\na\r\n"
    assert body(b"a\r\n\r\nlast", "simple") == b"\r\na\r\n\r\nlast"
    assert body(b"a\r\n\r\n  ", "nofws") == b"\r\na\r\n"
    # nofws drops a CR without LF and an LF without CR (Mail::DKIM's dk_nofws)
    assert body(b"x\ry\r\nu\nv\r\n", "nofws") == b"\r\nxy\r\nuv\r\n"
    assert body(b"x\ry\r\nu\nv\r\n", "simple") == b"\r\nx\ry\r\nu\nv\r\n"


# -- signature and policy parsing ------------------------------------------------------------


def test_parse_signature() -> None:
    b64 = base64.b64encode(b"\x01" * 128).decode()
    folded = (
        f"DomainKey-Signature: a=rsa-sha1; q=dns; c=nofws;\r\n\ts=sel; d=Example.ORG;\r\n"
        f"\th=From : To\r\n\t:subject:; b={b64[:40]}\r\n\t {b64[40:]} \r\n"
    ).encode()
    sig = dk.parse_signature(folded)
    assert (sig.d, sig.s, sig.c, sig.h, sig.b) == (
        "example.org",
        "sel",
        "nofws",
        ("from", "to", "subject"),
        b"\x01" * 128,
    )
    assert sig.key_name == "sel._domainkey.example.org"
    # the value alone (as Message.headers holds it) parses the same; defaults apply
    minimal = dk.parse_signature(f" d=example.org; s=x; b={b64}\r\n".encode())
    assert (minimal.a, minimal.c, minimal.q, minimal.h) == ("rsa-sha1", "simple", "dns", None)
    # names are case-sensitive: H= is not h=
    assert dk.parse_signature(f"d=e.org; s=x; H=from; b={b64}".encode()).h is None

    bad = {
        "d=e.org; s=x; b=AAAA; junk": "syntax error",
        "a=rsa-sha256; d=e.org; s=x; b=AAAA": "unsupported algorithm rsa-sha256",
        "c=relaxed; d=e.org; s=x; b=AAAA": "unsupported canonicalization relaxed",
        "q=dns/txt; d=e.org; s=x; b=AAAA": "unsupported query protocol",
        "s=x; b=AAAA": "missing d tag",
        "d=; s=x; b=AAAA": "invalid domain",
        "d=e.org; b=AAAA": "missing s tag",
        "d=e.org; s=x": "missing b tag",
        "d=e.org; s=x; b=A*A": "not base64",
    }
    for value, reason in bad.items():
        with pytest.raises(dk.DomainKeysError, match=reason) as info:
            dk.parse_signature(value.encode())
        assert info.value.reason.startswith("bad format: ")
        result = dk.signature_error_result(info.value)
        assert (result.result, result.status, result.code) == ("permerror", "bad format", "G")


def test_parse_policy_and_unsigned_results() -> None:
    assert dk.parse_policy("o=-") == dk.DKPolicy(o="-", testing=False, published=True)
    assert dk.parse_policy(" o = ~ ; t=y ; n=note") == dk.DKPolicy("~", True, True)
    assert dk.parse_policy(None) == dk.DKPolicy("~", False, False)
    assert dk.parse_policy("garbage") == dk.DKPolicy("~", False, True)
    assert dk.policy_name("Example.org.") == "_domainkey.Example.org"
    assert dk.parse_policy("o=-").apply(first_party_pass=False) == "reject"
    assert dk.parse_policy("o=-; t=y").apply(first_party_pass=False) == "neutral"
    assert dk.parse_policy("o=-").apply(first_party_pass=True) == "accept"
    assert dk.unsigned_result(dk.parse_policy("o=~")).status == "no signature"
    none = dk.unsigned_result(dk.parse_policy(None))
    assert (none.result, none.status, none.code) == ("none", "non-participant", "C")


def test_verify_with_key_record_variants(key: rsa.RSAPrivateKey) -> None:
    data = CORPUS["plain"]
    message = Message(dk.sign(Message(data), domain=DOMAIN, selector="s", key=key) + data)
    sig = dk.parse_signature(message.headers[0][1])
    p = public_p_value(key)
    quoted = f'v=DKIM1; k=rsa; p={p[:100]} "\r\n {p[100:]}'
    checks = {
        f"k=rsa; p={p}": ("pass", "good"),
        quoted: ("pass", "good"),
        f"k=rsa; h=sha256; p={p}": ("permerror", "bad format"),
        f"k=rsa; s=other; p={p}": ("permerror", "bad format"),
        f"v=DKIM2; p={p}": ("permerror", "bad format"),
        "k=rsa; p=!!!": ("permerror", "bad format"),
        "k=rsa; p=AAAA": ("permerror", "bad format"),
        "k=rsa": ("permerror", "bad format"),
        "": ("permerror", "no key"),
        f"k=rsa; p={public_p_value(_rsa(1024))}": ("fail", "bad"),
    }
    for record, want in checks.items():
        result = dk.verify_with_key(message, 0, sig, record)
        assert (result.result, result.status) == want, (record, result)
    assert dk.verify_with_key(message, 0, sig, f"k=rsa; p={public_p_value(_rsa(1024))}").detail == (
        "bad RSA signature"
    )
    ok = dk.verify_with_key(message, 0, sig, f"k=rsa; p={p}")
    assert ok.ar_property == ("header.from", "joe@example.org")
    assert (ok.domain, ok.selector) == (DOMAIN, "s")
    temp = dk.dns_error_result(sig, "timeout")
    assert (temp.result, temp.code) == ("temperror", "F")


def test_signing_speed(key: rsa.RSAPrivateKey, capsys: pytest.CaptureFixture[str]) -> None:
    body = (b"The quick brown fox jumps over the lazy dog.  \t 0123456789\r\n" * 50)[:3000]
    data = HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + body
    message = Message(data)
    key = _rsa(2048)  # the size a deployment uses
    rounds = 200
    fields = set()
    start = time.perf_counter()
    for _ in range(rounds):
        fields.add(dk.sign(message, domain=DOMAIN, selector="sel", key=key))
    elapsed = time.perf_counter() - start
    assert len(fields) == 1  # PKCS#1 v1.5 is deterministic
    with capsys.disabled():
        print(
            f"\nDomainKeys sign, {len(data)} byte message, RSA-{key.key_size}: "
            f"{elapsed / rounds * 1000:.3f} ms per message ({rounds} rounds)"
        )
