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

from cryptography.exceptions import UnsupportedAlgorithm
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


#: PEM labels of the private keys DKIMproxy (Mail::DKIM) and OpenDKIM load: PKCS#1 and PKCS#8.
_PEM_PRIVATE = (b"RSA PRIVATE KEY", b"PRIVATE KEY")
_FORMATS = (
    "PEM 'RSA PRIVATE KEY' (PKCS#1) or 'PRIVATE KEY' (PKCS#8), the same without its BEGIN/END "
    "lines (base64), or a base64 ed25519 seed"
)


def _parse_private_key(path: str, data: bytes) -> PrivateKey:
    """Load the key formats DKIMproxy and OpenDKIM accept; KeyLoadError naming what was found.

    Accepted: PEM PKCS#1 (`BEGIN RSA PRIVATE KEY`) and PKCS#8 (`BEGIN PRIVATE KEY`, RSA or
    Ed25519); the base64 body of either without its BEGIN/END lines (Mail::DKIM and OpenDKIM
    read keys handed out that way); a base64 32-byte Ed25519 seed (dkimpy's dknewkey, RFC
    8463). LF, CRLF or CR line ends, a UTF-8 byte order mark, white space at the end of lines (as
    OpenSSL's PEM reader, which OpenDKIM and Mail::DKIM use, tolerates).
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte order mark, as Windows editors write
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    text = b"\n".join(line.rstrip() for line in lines).strip()
    if b"-----BEGIN " in text:
        return _parse_pem(path, _pem_block(text))
    compact = b"".join(text.split())
    try:
        raw = base64.b64decode(compact, validate=True)
    except ValueError:
        raise KeyLoadError(path, f"found {_describe(data)}; expected {_FORMATS}") from None
    if len(raw) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    try:
        key = serialization.load_der_private_key(raw, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        try:
            serialization.load_der_public_key(raw)
        except (ValueError, UnsupportedAlgorithm):
            found = f"{len(raw)} bytes of base64 data that are no PKCS#1 or PKCS#8 private key"
        else:
            found = "a base64 public key (the private key is needed for signing)"
        raise KeyLoadError(path, f"found {found}; expected {_FORMATS}") from None
    return _checked_type(path, key)


def _pem_block(text: bytes) -> bytes:
    """From the first private-key PEM block on, else from the first block: like OpenSSL's
    PEM_read_bio_PrivateKey (OpenDKIM), skip text before it (`Bag Attributes` from a PKCS#12
    export) and blocks of other kinds (a certificate kept in the same file)."""
    labels = (*_PEM_PRIVATE, b"ENCRYPTED PRIVATE KEY")
    starts = [text.find(b"-----BEGIN " + label + b"-----") for label in labels]
    found = [start for start in starts if start >= 0]
    return text[min(found) if found else text.find(b"-----BEGIN ") :]


def _parse_pem(path: str, text: bytes) -> PrivateKey:
    label = text.split(b"\n", 1)[0][len(b"-----BEGIN ") :].rstrip(b"-").strip()
    shown = label.decode("ascii", "replace")
    if label == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in text:
        raise KeyLoadError(path, "key is encrypted; dkproxy needs an unencrypted key")
    if label not in _PEM_PRIVATE:
        raise KeyLoadError(path, f"found a PEM '{shown}' block; expected {_FORMATS}")
    try:
        key = serialization.load_pem_private_key(text, password=None)
    except TypeError as exc:
        raise KeyLoadError(path, "key is encrypted; dkproxy needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyLoadError(path, f"not a valid PEM '{shown}' ({exc})") from exc
    return _checked_type(path, key)


def _checked_type(path: str, key: object) -> PrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise KeyLoadError(path, f"unsupported key type {type(key).__name__}; use RSA or Ed25519")
    return key


def _describe(data: bytes) -> str:
    """What a key file that is neither PEM nor base64 looks like, without quoting key bytes."""
    if data[:1] == b"\x30":
        return "binary DER data (convert it: openssl pkey -inform DER -in FILE -out FILE.pem)"
    if data.lstrip().startswith(b"PuTTY-User-Key-File"):
        return "a PuTTY key file"
    if b"\0" in data or any(byte > 0x7E for byte in data):
        return "binary data"
    return "text that is neither PEM nor base64"


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
