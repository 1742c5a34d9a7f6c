"""DKIM verification through OpenSSL (dkim_verify, dkim_canon) gives dkimpy's verdicts.

Every case is signed by dkimpy (or by our signer), changed or not, and then judged twice: by
`dkim.verify` (dkimpy alone: its own key parsing, canonicalization and pure-Python RSA) and by
`dkim_verify.verify` with the key from the cache. The two must agree on every message.
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Callable

import dkim
import pytest

from dkproxy.mailauth import dkim_verify
from dkproxy.mailauth.dkim_canon import MessageHashes, strip_b
from dkproxy.mailauth.dkim_signer import DKIMParams, sign
from dkproxy.mailauth.keys import load_signing_key
from dkproxy.mailauth.message import Message
from tests.support.testkeys import KeySet, TestKey
from tests.test_verifier import dkimpy_sign

DOMAIN = "equal.test"
MESSAGE = (
    b"Received: from mx.equal.test by mx.verify.test\r\n"
    b"From: Alice <alice@equal.test>\r\n"
    b"To: Bob <bob@example.net>,\r\n  Carol <carol@example.net>\r\n"
    b"Subject:  several   spaces\tand a tab \r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <equal-1@equal.test>\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n"
    b"\r\n"
    b"a line with  inner   spaces\t\r\n"
    b"-- \r\n"
    b"Alice\r\n"
    b"\r\n"
)

#: Changes made to a signed message (name -> function on the wire form).
CHANGES: dict[str, Callable[[bytes], bytes]] = {
    "unchanged": lambda m: m,
    "body text": lambda m: m.replace(b"Hello Bob", b"Hello Eve"),
    "body whitespace": lambda m: m.replace(b"inner   spaces", b"inner spaces"),
    "trailing empty lines": lambda m: m + b"\r\n\r\n",
    "signed header text": lambda m: m.replace(b"several   spaces", b"several   SPACES"),
    "signed header whitespace": lambda m: m.replace(b"several   spaces", b"several spaces"),
    "header refolded": lambda m: m.replace(b",\r\n  Carol", b",\r\n\tCarol"),
    "unsigned header": lambda m: m.replace(b"by mx.verify.test", b"by other.test"),
    "From added on top": lambda m: b"From: Mallory <m@evil.test>\r\n" + m,
    "body appended": lambda m: m + b"appended line\r\n",
    "b= changed": lambda m: re.sub(rb"\bb=([A-Za-z0-9+/])", rb"b=A", m, count=1),
}


def _dnsfunc(records: dict[bytes, bytes]) -> Callable[..., bytes]:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes:
        key = name.encode() if isinstance(name, str) else name
        return records.get(key.rstrip(b".") + b".", b"")

    return lookup


def _ours(message: bytes, record: bytes, position: int = 0) -> bool:
    """Our verdict on the `position`-th DKIM-Signature (False where dkimpy would raise)."""
    parsed = Message(message)
    hashes = MessageHashes(parsed)
    tags = dkim.util.parse_tag_value(hashes.signatures[position][1])
    key = dkim_verify.key_for("sel", record)
    assert key.tags is not None and key.error is None
    try:
        return dkim_verify.verify(hashes, position, tags, key)
    except dkim.DKIMException:
        return False


def _dkimpy(message: bytes, records: dict[bytes, bytes]) -> bool:
    return bool(dkim.verify(message, dnsfunc=_dnsfunc(records), minkey=0))


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize(
    ("key_name", "algorithm", "canonicalization", "length"),
    [
        ("rsa2048", b"rsa-sha256", (b"relaxed", b"simple"), False),
        ("rsa2048", b"rsa-sha256", (b"simple", b"simple"), False),
        ("rsa1024", b"rsa-sha1", (b"relaxed", b"relaxed"), False),
        ("rsa2048", b"rsa-sha256", (b"simple", b"relaxed"), True),
        ("ed25519", b"ed25519-sha256", (b"relaxed", b"relaxed"), False),
    ],
)
def test_same_verdict_as_dkimpy(
    key_dir: KeySet,
    key_name: str,
    algorithm: bytes,
    canonicalization: tuple[bytes, bytes],
    length: bool,
    change: str,
) -> None:
    key: TestKey = getattr(key_dir, key_name)
    signed = dkimpy_sign(
        MESSAGE,
        key,
        DOMAIN,
        signature_algorithm=algorithm,
        canonicalize=canonicalization,
        length=length,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    record = key.dns_record.encode()
    records = {f"{key.selector}._domainkey.{DOMAIN}.".encode(): record}
    message = CHANGES[change](signed)
    expected = _dkimpy(message, records)
    assert _ours(message, record) == expected
    if change == "unchanged":
        assert expected  # the matrix must contain passes, not only failures


def test_several_signatures_share_one_canonicalization(key_dir: KeySet) -> None:
    """Two signatures (Ed25519 on top of RSA) on one message: each index verifies on its own,
    and a broken one does not affect the other."""
    rsa_signed = dkimpy_sign(MESSAGE, key_dir.rsa2048, DOMAIN)
    both = dkimpy_sign(rsa_signed, key_dir.ed25519, DOMAIN)
    assert _ours(both, key_dir.ed25519.dns_record.encode(), 0)
    assert _ours(both, key_dir.rsa2048.dns_record.encode(), 1)
    assert not _ours(both, key_dir.rsa2048.dns_record.encode(), 0)  # wrong key for index 0


def test_signature_read_as_an_integer_like_dkimpy(key_dir: KeySet) -> None:
    """A b= whose leading zero octet was dropped is, for dkimpy, the same integer: it passes
    there, so it must pass here too (OpenSSL alone wants exactly the modulus length)."""
    key = load_signing_key(key_dir.rsa2048.path)
    params = DKIMParams(DOMAIN, key_dir.rsa2048.selector, key)
    record = key_dir.rsa2048.dns_record.encode()
    records = {f"{key_dir.rsa2048.selector}._domainkey.{DOMAIN}.".encode(): record}
    for n in range(4000):  # about 1 in 256 signatures starts with a zero octet
        data = MESSAGE.replace(b"equal-1@", f"equal-{n}@".encode())
        field = sign(Message(data), params, now=1_790_000_000)
        raw = base64.b64decode(re.sub(rb"\s+", b"", field.split(b"b=")[-1]))
        if raw[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero octet")
    short = base64.b64encode(raw.lstrip(b"\0"))
    tampered = field.rsplit(b"b=", 1)[0] + b"b=" + short + b"\r\n" + data
    assert _dkimpy(tampered, records)
    assert _ours(tampered, record)


def test_key_record_parsed_once(key_dir: KeySet) -> None:
    record = key_dir.rsa1024.dns_record.encode() + b" "  # a record no other test uses
    before = dkim_verify.KEYS.parsed
    first = dkim_verify.key_for("a", record)
    assert dkim_verify.key_for("b", record) is first
    assert dkim_verify.KEYS.parsed == before + 1
    assert first.openssl is not None and first.bits == 1024


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (b"v=DKIM1; k=rsa; p=", False),
        (b"v=DKIM1; k=rsa; p=QUJD", False),
        (b"not a tag list", False),
    ],
)
def test_unusable_records_are_reported_not_raised(record: bytes, usable: bool) -> None:
    key = dkim_verify.key_for("x", record)
    assert (key.tags is not None and key.error is None) == usable


def test_strip_b_matches_dkimpy() -> None:
    """dkimpy's RE_BTAG and our pattern on many random signature-like strings (seeded)."""
    rng = random.Random(15)
    alphabet = "bB=; \t\r\nhA+/09:"
    for _ in range(3000):
        prefix, value = ("".join(rng.choices(alphabet, k=rng.randrange(40))) for _ in "pv")
        for text in (f"{prefix}; b={value}".encode(), value.encode()):
            assert strip_b(text) == dkim.RE_BTAG.sub(b"\\1", text), text
