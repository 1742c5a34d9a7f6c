"""Key files for tests, written the way operators' tools write them.

`openssl genrsa` (OpenSSL 3, which DKIMproxy's docs tell users to run) writes PKCS#8
"BEGIN PRIVATE KEY"; OpenSSL 1.x wrote PKCS#1 "BEGIN RSA PRIVATE KEY". Both must load, so
`make_rsa_key` can write either. Keys are generated with `cryptography` (no subprocess), which
also allows the 512-bit key the "too short" tests need.
"""

from __future__ import annotations

import math
import os
import pathlib
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


def _write_private(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _small_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key below cryptography's 1024-bit generation floor (it still loads them), for
    the tests that must see short keys refused."""
    e = 65537
    while True:
        p = _random_prime(bits // 2)
        q = _random_prime(bits - bits // 2)
        n = p * q
        phi = (p - 1) * (q - 1)
        if p != q and n.bit_length() == bits and math.gcd(e, phi) == 1:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=d % (p - 1),
        dmq1=d % (q - 1),
        iqmp=pow(q, -1, p),
        public_numbers=rsa.RSAPublicNumbers(e, n),
    )
    return numbers.private_key()


def _is_probable_prime(n: int) -> bool:
    if n < 2:
        return False
    for small in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % small == 0:
            return n == small
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(40):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _random_prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if _is_probable_prime(candidate):
            return candidate


def make_rsa_key(path: str, bits: int = 2048, *, traditional: bool = False) -> str:
    """Write an RSA private key PEM (PKCS#8, or PKCS#1 with traditional=True); return path."""
    if bits < 1024:
        key = _small_rsa_key(bits)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional
        else serialization.PrivateFormat.PKCS8
    )
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return _write_private(path, pem)


def make_ed25519_key(path: str) -> str:
    """Write an Ed25519 private key as PKCS#8 PEM (what `openssl genpkey -algorithm ed25519`
    writes); return path."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _write_private(path, pem)


def dns_record(path: str) -> str:
    """The TXT data to publish for the key in `path` ("v=DKIM1; k=...; p=...").

    Goes through dkproxy's own loader so tests publish exactly what dkproxy would print. The
    loader refuses keys under 1024 bits, so those (deliberately short test keys) are encoded
    with dkproxy's `public_p_value` directly, in the same record format.
    """
    from dkproxy.mailauth.keys import KeyLoadError, load_signing_key, public_p_value

    try:
        return load_signing_key(path).dns_record
    except KeyLoadError:
        with open(path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise
        return f"v=DKIM1; k=rsa; p={public_p_value(key)}"


@dataclass(frozen=True)
class TestKey:
    """A key file with the selector it is published under."""

    __test__ = False  # not a pytest test class

    name: str
    selector: str
    path: str
    kind: str
    bits: int

    @property
    def dns_record(self) -> str:
        return dns_record(self.path)

    def dns_name(self, domain: str) -> str:
        return f"{self.selector}._domainkey.{domain}"

    def publish(self, dns: object, domain: str, ttl: int = 60) -> str:
        """Publish this key for `domain` on a DNSServer; return the record name."""
        name = self.dns_name(domain)
        dns.publish({name: [self.dns_record]}, ttl=ttl)  # type: ignore[attr-defined]
        return name


@dataclass(frozen=True)
class KeySet:
    """The session's keys (see tests/conftest.py `key_dir`)."""

    __test__ = False

    dir: str
    rsa2048: TestKey
    rsa1024: TestKey
    ed25519: TestKey
    rsa512: TestKey
    rsa2048_pkcs1: TestKey

    def __fspath__(self) -> str:
        return self.dir

    def __str__(self) -> str:
        return self.dir

    def __truediv__(self, name: str) -> pathlib.Path:
        return pathlib.Path(self.dir) / name

    def all(self) -> list[TestKey]:
        return [self.rsa2048, self.rsa1024, self.ed25519, self.rsa512, self.rsa2048_pkcs1]


def make_key_set(directory: str) -> KeySet:
    """Generate the standard test keys into `directory`."""

    def rsa_key(name: str, selector: str, bits: int, traditional: bool = False) -> TestKey:
        path = make_rsa_key(os.path.join(directory, f"{name}.pem"), bits, traditional=traditional)
        return TestKey(name, selector, path, "rsa", bits)

    ed_path = make_ed25519_key(os.path.join(directory, "ed25519.pem"))
    return KeySet(
        dir=directory,
        rsa2048=rsa_key("rsa2048", "sel2048", 2048),
        rsa1024=rsa_key("rsa1024", "sel1024", 1024),
        ed25519=TestKey("ed25519", "seled", ed_path, "ed25519", 256),
        rsa512=rsa_key("rsa512", "sel512", 512),
        rsa2048_pkcs1=rsa_key("rsa2048-pkcs1", "selpkcs1", 2048, traditional=True),
    )
