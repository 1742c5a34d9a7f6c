"""Private key loading and checking.

Keys are parsed once, at start-up, and kept as `cryptography` objects: per-message parsing
would cost more than the signature itself, and a bad key must stop the daemon before it
accepts mail, not on the first message.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

#: RFC 8301: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024

KeyKind = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyLoadError(Exception):
    """A key file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and what DNS must publish for it."""

    path: str
    kind: KeyKind
    bits: int
    private: PrivateKey = field(repr=False, compare=False)

    @property
    def public_p(self) -> str:
        """The `p=` value of the key record (base64 SubjectPublicKeyInfo, or raw ed25519)."""
        return public_p_value(self.private)

    @property
    def dns_record(self) -> str:
        """The TXT data to publish at `<selector>._domainkey.<domain>`."""
        return f"v=DKIM1; k={self.kind}; p={self.public_p}"


def public_p_value(key: PrivateKey) -> str:
    """Encode the public half as RFC 6376 (rsa) / RFC 8463 (ed25519) expect in `p=`."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def _parse_private_key(path: str, data: bytes) -> PrivateKey:
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(stripped, password=None)
        except TypeError as exc:
            raise KeyLoadError(path, "key is encrypted; dkproxy needs an unencrypted key") from exc
        except ValueError as exc:
            raise KeyLoadError(path, f"not a valid PEM private key ({exc})") from exc
    else:
        # dkimpy's dknewkey writes ed25519 keys as a bare base64 seed of 32 bytes.
        try:
            raw = base64.b64decode(stripped, validate=True)
        except ValueError as exc:
            raise KeyLoadError(path, "neither PEM nor a base64 ed25519 seed") from exc
        if len(raw) != 32:
            raise KeyLoadError(path, "neither PEM nor a base64 ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise KeyLoadError(path, f"unsupported key type {type(key).__name__}; use RSA or Ed25519")
    return key


def load_signing_key(path: str, min_rsa_bits: int = MIN_RSA_BITS) -> SigningKey:
    """Load and check a private key file; raise KeyLoadError naming the file on any problem."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        raise KeyLoadError(path, f"cannot read key file ({exc.strerror or exc})") from exc
    if not data.strip():
        raise KeyLoadError(path, "key file is empty")
    key = _parse_private_key(path, data)
    if isinstance(key, rsa.RSAPrivateKey):
        bits = key.key_size
        if bits < max(min_rsa_bits, MIN_RSA_BITS):
            raise KeyLoadError(
                path,
                f"RSA key has {bits} bits; at least {max(min_rsa_bits, MIN_RSA_BITS)} are "
                "required for signing (RFC 8301)",
            )
        return SigningKey(path=os.fspath(path), kind="rsa", bits=bits, private=key)
    return SigningKey(path=os.fspath(path), kind="ed25519", bits=256, private=key)


class KeyCache:
    """Loads each key file once, so many rules naming one key share one object."""

    def __init__(self, min_rsa_bits: int = MIN_RSA_BITS) -> None:
        self._keys: dict[str, SigningKey] = {}
        self._min_rsa_bits = min_rsa_bits

    def get(self, path: str) -> SigningKey:
        real = os.path.realpath(path)
        key = self._keys.get(real)
        if key is None:
            key = load_signing_key(path, self._min_rsa_bits)
            self._keys[real] = key
        return key
