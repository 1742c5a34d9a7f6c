"""The DKIM signer's pieces against dkimpy, the reference for what is hashed."""

from __future__ import annotations

import hashlib
import random

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from dkproxy.mailauth import dkim_verify
from dkproxy.mailauth.dkim_canon import MessageHashes
from dkproxy.mailauth.dkim_signer import DKIMParams, DKIMSignError, body_hash, header_list, sign
from dkproxy.mailauth.keys import SigningKey, load_signing_key
from dkproxy.mailauth.message import Message
from tests.support.testkeys import make_ed25519_key, make_rsa_key

PIECES = [b"a", b"b ", b" ", b"\t", b"  x", b"\r\n", b"\r\n", b"\r\n\r\n", b".", b"\n", b"\r",
          b"\xc3\xa9", b"long" * 20]  # fmt: skip


def random_bodies(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    bodies = [b"", b"\r\n", b"\r\n\r\n\r\n", b"x", b"x\r\n", b" \r\n \r\n", b"a \t\r\n\r\n"]
    for _ in range(count):
        bodies.append(b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60))))
    return bodies


@pytest.mark.parametrize("c", ["simple", "relaxed"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 18])
def test_chunked_body_hash_equals_dkimpy(c: str, chunk_size: int) -> None:
    policy = CanonicalizationPolicy.from_c_value(f"simple/{c}".encode())
    for body in random_bodies(150):
        message = Message(b"From: a@example.org\r\n\r\n" + body)
        expected = hashlib.sha256(policy.canonicalize_body(body)).digest()
        assert body_hash(message, c == "relaxed", chunk_size) == expected, body


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return load_signing_key(make_rsa_key(str(tmp_path_factory.mktemp("k") / "r.pem"), 1024))


def test_signatures_verify_with_dkimpy_for_every_canonicalization(
    rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ed_key = load_signing_key(make_ed25519_key(str(tmp_path_factory.mktemp("e") / "e.pem")))
    records = {b"r._domainkey.example.org.": rsa_key.dns_record.encode(),
               b"e._domainkey.example.org.": ed_key.dns_record.encode()}  # fmt: skip
    # dkimpy's verifier reads bare CR/LF as line ends (it re-parses the message), so the
    # bodies here stick to CRLF lines; bare CR/LF are covered by the hash test above.
    bodies = [b for b in random_bodies(60, seed=3) if not set(b.replace(b"\r\n", b"")) & {10, 13}]
    for body in bodies:
        data = (b"From: A <a@example.org>\r\nTo: b@example.net,\r\n c@example.net\r\n"
                b"Subject:  odd   spacing \r\n\r\n" + body)  # fmt: skip
        message = Message(data)
        for c in ("relaxed/simple", "simple/simple", "relaxed/relaxed", "simple/relaxed"):
            signed = sign(message, DKIMParams("example.org", "r", rsa_key, canonicalization=c))
            signed += sign(message, DKIMParams("example.org", "e", ed_key, "ed25519-sha256", c))
            verifier = dkim.DKIM(signed + data)
            for index in (0, 1):
                assert verifier.verify(idx=index, dnsfunc=lambda n, timeout=5: records.get(n))


def test_header_list_oversigns_and_skips_never_signed(rsa_key: SigningKey) -> None:
    message = Message(b"Received: x\r\nFrom: a@example.org\r\nSubject: s\r\nTo: b@c\r\n"
                      b"To: d@e\r\nX-Other: y\r\n\r\n")  # fmt: skip
    names = header_list(message, DKIMParams("example.org", "s", rsa_key))
    assert names[:4] == [b"from", b"subject", b"to", b"to"]
    assert names[4:] == [b"from", b"subject", b"date", b"to", b"cc", b"reply-to", b"message-id"]
    assert b"received" not in names and b"x-other" not in names


def test_refusals_are_clear(rsa_key: SigningKey) -> None:
    with pytest.raises(DKIMSignError, match="RFC 8301"):
        DKIMParams("example.org", "s", rsa_key, algorithm="rsa-sha1")
    with pytest.raises(DKIMSignError, match="needs an ed25519 key"):
        DKIMParams("example.org", "s", rsa_key, algorithm="ed25519-sha256")
    with pytest.raises(DKIMSignError, match="no From"):
        sign(Message(b"Subject: x\r\n\r\nbody\r\n"), DKIMParams("example.org", "s", rsa_key))


@pytest.mark.parametrize(
    "head",
    [
        b"From\t:a@example.org\r\nFrom: A <a@example.org>\r\nFrom : \r\n",
        b"From : x@example.org\r\nFrom: A <a@example.org>\r\n",
        b"From: A <a@example.org>\r\nFROM :b@example.org\r\n",
        b"Subject : one\r\nFrom: A <a@example.org>\r\nSubject: two\r\nSubject\t: three\r\n",
        b"From: A <a@example.org>\r\nTo : b@example.net\r\nTo: c@example.net\r\nTo  : d\r\n",
    ],
)
@pytest.mark.parametrize("c", ["relaxed/simple", "simple/simple", "relaxed/relaxed"])
def test_obsolete_name_syntax_signs_what_our_verifier_checks(
    rsa_key: SigningKey, head: bytes, c: str
) -> None:
    """A field written "Name :" (RFC 5322 4.5) is that name for relaxed selection, so h=
    must count it: otherwise an oversigned entry, or the extra "from" dkimpy's verifier
    appends, selects a field the signer did not hash and our own `dkproxy in` says fail."""
    data = head + b"\r\nbody\r\n"
    message = Message(data)
    signed = sign(message, DKIMParams("example.org", "r", rsa_key, canonicalization=c)) + data
    hashes = MessageHashes(Message(signed))
    tags = dkim.util.parse_tag_value(hashes.signatures[0][1])
    key = dkim_verify.key_for("r", rsa_key.dns_record.encode())
    assert dkim_verify.verify(hashes, 0, tags, key), (c, head)
