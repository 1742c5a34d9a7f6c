"""Who may relay: the credentials file (hashed passwords) and the sender-login map.

Credentials file format (one login per line, like an htpasswd file)::

    # comment
    webapp:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$...
    printer:$2b$12$....................................

`LOGIN:HASH`, where LOGIN is 1-64 characters without `:`, whitespace or control characters,
and HASH is an argon2id PHC string (argon2-cffi) or a bcrypt hash ($2a$/$2b$/$2y$, the
`htpasswd -B` kind). Anything else, a plaintext password in particular, stops the start with
FILE:LINE. `dkproxy passwd FILE LOGIN` adds or replaces a line.

Sender-login map format (Postfix's smtpd_sender_login_maps, read from a file)::

    alice@example.org     webapp
    @example.org          webapp, monitoring
    @news.example.org     newsletter

The key is an address or `@domain`; the value is the logins (comma or space separated) that
may use it in MAIL FROM and in the From (and Sender) header. Look-up order: the address, the
address without its +extension, then `@domain`. Keys are compared in lower case.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2
import bcrypt

from dkproxy.config import ConfigError

_LOGIN_RE = re.compile(r"[^\s:\x00-\x1f\x7f]{1,64}")
_BCRYPT_RE = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_HASHER = argon2.PasswordHasher()  # argon2id with the library's current RFC 9106 parameters
#: Password checks run here: two at a time at most, because each argon2id check takes 64 MiB
#: and a burst of AUTH attempts must not take the machine's memory (or all its cores).
_VERIFIERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkproxy-auth")


@functools.cache
def _dummy_hash() -> str:
    """Verified when the login is unknown, so that an unknown login costs as much time as a
    known one with a wrong password (no login enumeration by timing)."""
    return _HASHER.hash("dkproxy-no-such-login")


def is_valid_login(login: str) -> bool:
    return _LOGIN_RE.fullmatch(login) is not None


def hash_password(password: str, scheme: str = "argon2id") -> str:
    """A new hash for `password`: "argon2id" (default) or "bcrypt" (cost 12).

    bcrypt reads only the first 72 bytes of a password; ValueError for a longer one there.
    """
    if scheme == "bcrypt":
        raw = password.encode()
        if len(raw) > 72:
            raise ValueError("bcrypt uses only 72 bytes of a password; use argon2id")
        return bcrypt.hashpw(raw, bcrypt.gensalt(12)).decode()
    return _HASHER.hash(password)


def _check_hash(value: str) -> bool:
    if _BCRYPT_RE.fullmatch(value):
        return True
    if not value.startswith("$argon2id$"):
        return False
    try:
        argon2.extract_parameters(value)
    except argon2.exceptions.InvalidHashError:
        return False
    return True


def _verify(stored: str, password: str) -> bool:
    if stored.startswith("$2"):
        raw = password.encode("utf-8", "surrogateescape")
        return len(raw) <= 72 and bcrypt.checkpw(raw, stored.encode())
    try:
        return _HASHER.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


class Credentials:
    """The logins and their hashes from a credentials file."""

    def __init__(self, hashes: dict[str, str], path: str) -> None:
        self._hashes = hashes
        self.path = path

    @classmethod
    def load(cls, path: str) -> Credentials:
        """Read `path`; ConfigError "FILE:LINE: ..." for a malformed line, an unknown hash
        scheme (a plaintext password) or a login given twice."""
        hashes: dict[str, str] = {}
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, None, f"cannot read credentials: {exc}") from None
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            login, colon, stored = text.partition(":")
            if not colon or not is_valid_login(login):
                raise ConfigError(path, number, "expected LOGIN:HASH")
            if not _check_hash(stored):
                raise ConfigError(
                    path, number, f"{login}: not an argon2id or bcrypt hash (plaintext "
                    "passwords are refused); make one with `dkproxy passwd`")  # fmt: skip
            if login in hashes:
                raise ConfigError(path, number, f"{login}: login given twice")
            hashes[login] = stored
        return cls(hashes, path)

    def __len__(self) -> int:
        return len(self._hashes)

    def knows(self, login: str) -> bool:
        return login in self._hashes

    def verify(self, login: str, password: str) -> bool:
        """True when `password` is `login`'s; as slow for an unknown login (CPU-bound: run it
        in an executor, see `verify_async`)."""
        stored = self._hashes.get(login)
        if stored is None:
            _verify(_dummy_hash(), password)
            return False
        return _verify(stored, password)

    async def verify_async(self, login: str, password: str) -> bool:
        """`verify` in a worker thread: argon2id takes tens of milliseconds by design."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_VERIFIERS, self.verify, login, password)


def set_password(path: str, login: str, password_hash: str | None) -> bool:
    """Add or replace `login` in the credentials file (or remove it when the hash is None).

    The file is rewritten through a temporary file and a rename, keeping its mode (0600 for
    a new file); comments and other lines stay. Returns True when the login existed before.
    """
    lines: list[str] = []
    mode = 0o600
    if os.path.exists(path):
        mode = os.stat(path).st_mode & 0o777
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    existed = False
    out: list[str] = []
    for line in lines:
        if line.strip().partition(":")[0] == login and not line.lstrip().startswith("#"):
            existed = True
            if password_hash is not None:
                out.append(f"{login}:{password_hash}")
                password_hash = None
            continue
        out.append(line)
    if password_hash is not None:
        out.append(f"{login}:{password_hash}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".passwd-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write("".join(line + "\n" for line in out))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return existed


@dataclass(frozen=True)
class SenderLoginMap:
    """Which logins may use which envelope or header sender addresses."""

    owners: dict[str, frozenset[str]]
    path: str

    @classmethod
    def load(cls, path: str, known_logins: Credentials | None = None) -> SenderLoginMap:
        """Read `path`; ConfigError "FILE:LINE: ..." for a malformed key, no login, a key
        given twice, or (with `known_logins`) a login the credentials file does not have."""
        owners: dict[str, frozenset[str]] = {}
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, None, f"cannot read sender-login map: {exc}") from None
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            key, *rest_list = re.split(r"\s+", text, maxsplit=1)
            key, rest = key.lower(), rest_list[0] if rest_list else ""
            logins = [login for login in re.split(r"[\s,]+", rest.strip()) if login]
            _local, at, domain = key.rpartition("@")
            if not at or not domain or "." not in domain or any(c in key for c in "<>\"'"):
                raise ConfigError(
                    path, number, f"{key!r}: expected an address or @domain as the key"
                )
            if not logins:
                raise ConfigError(path, number, f"{key}: no login given")
            for login in logins:
                if not is_valid_login(login):
                    raise ConfigError(path, number, f"{login!r} is not a valid login")
                if known_logins is not None and not known_logins.knows(login):
                    raise ConfigError(
                        path, number, f"{login}: no such login in {known_logins.path}"
                    )
            if key in owners:
                raise ConfigError(path, number, f"{key}: given twice")
            owners[key] = frozenset(logins)
        return cls(owners, path)

    def logins_for(self, address: str) -> frozenset[str]:
        """The logins that may use `address` (empty when the map does not list it)."""
        address = address.strip().lower()
        local, at, domain = address.rpartition("@")
        if not at:
            return frozenset()
        keys = [address]
        if "+" in local:
            keys.append(f"{local.split('+', 1)[0]}@{domain}")
        keys.append(f"@{domain}")
        for key in keys:
            found = self.owners.get(key)
            if found is not None:
                return found
        return frozenset()

    def permits(self, login: str, address: str) -> bool:
        return login in self.logins_for(address)
