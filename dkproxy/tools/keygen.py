"""`dkproxy keygen`: a signing key and the DNS records that make it verifiable.

Most failed DKIM set-ups fail in DNS, not in the signer: a 2048-bit key record is ~400
characters, more than one TXT character-string can hold (255 bytes), and a record pasted whole
into a zone file does not load. So keygen writes the records in BIND zone syntax already split
into quoted strings of at most 255 bytes, with absolute names (a zone-relative name is the
other classic mistake), and prints the same record as one value for web DNS panels, which do
the splitting themselves.

Choices:
* RSA keys are written as PKCS#1 ("BEGIN RSA PRIVATE KEY"), the one form every DKIM signer
  reads: DKIMproxy's Mail::DKIM re-wraps the key body as PKCS#1, so a PKCS#8 file would not
  load there if an administrator ever went back. Ed25519 has only PKCS#8.
* The key record is `v=DKIM1; k=rsa; p=...` with no h= or s= restriction, so the same record
  serves DomainKeys (RFC 4870 verifiers read k= and p= and ignore v=), and an h=sha256 tag
  cannot break DomainKeys' rsa-sha1.
* Files are created with O_EXCL (never clobbered without --force) and the key is mode 0600
  from its first byte: it is written to a temporary file in the same directory and linked
  into place, so no reader ever sees a partial or world-readable key.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import grp
import os
import pwd
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkproxy.config import check_selector, is_domain
from dkproxy.mailauth.keys import KeyKind, PrivateKey, public_p_value

#: RFC 1035: a TXT character-string holds at most 255 bytes.
MAX_TXT_STRING = 255
DEFAULT_TTL = 3600
DEFAULT_RSA_BITS = 2048
#: RFC 8301: signers use at least 1024 bits; verifiers need only handle up to 4096.
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096
#: Prefix of date-based selectors per key type, so an RSA and an Ed25519 key made in the
#: same month get different selectors (s202611 and e202611).
DATE_PREFIX: dict[str, str] = {"rsa": "s", "ed25519": "e"}


class KeygenError(Exception):
    """Something the operator must fix (a file in the way, a bad option); exit status 1."""


@dataclass(frozen=True)
class TxtRecord:
    """One TXT record to publish: absolute name (no final dot), data, and what it is for."""

    name: str
    value: str
    comment: str

    def relative_name(self, domain: str) -> str:
        """The name as a web panel for `domain` wants it ("s1._domainkey"; "@" for the apex)."""
        if self.name == domain:
            return "@"
        return self.name.removesuffix("." + domain)

    def zone_lines(self, ttl: int = DEFAULT_TTL) -> str:
        """BIND zone syntax: absolute owner name, one quoted string per <=255-byte piece."""
        parts = [zone_quote(part) for part in split_txt(self.value)]
        head = f"{self.name}.\t{ttl}\tIN\tTXT\t"
        if len(parts) == 1:
            return head + parts[0]
        # Parentheses let one record span lines (RFC 1035 5.1); NSD and BIND accept it.
        return head + "( " + "\n\t".join(parts) + " )"


def split_txt(value: str, limit: int = MAX_TXT_STRING) -> list[bytes]:
    """Cut TXT data into character-strings of at most `limit` bytes (verifiers rejoin them)."""
    raw = value.encode("utf-8")
    if not raw:
        return [b""]
    return [raw[i : i + limit] for i in range(0, len(raw), limit)]


def zone_quote(part: bytes) -> str:
    """One quoted character-string: `"` and `\\` escaped, non-printables as \\DDD."""
    out: list[str] = []
    for byte in part:
        if byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def key_record_value(kind: KeyKind, private: PrivateKey) -> str:
    """The DKIM key record; for RSA it is a valid DomainKeys record as well."""
    return f"v=DKIM1; k={kind}; p={public_p_value(private)}"


def date_selector(kind: KeyKind, today: datetime.date | None = None) -> str:
    """`s202611` (RSA) / `e202611` (Ed25519): sorts by age, tells when to rotate next."""
    day = today or datetime.datetime.now(datetime.UTC).date()
    return f"{DATE_PREFIX[kind]}{day:%Y%m}"


def generate_private_key(kind: KeyKind, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(private: PrivateKey) -> bytes:
    """PKCS#1 for RSA (readable by Mail::DKIM/DKIMproxy, OpenDKIM, dkimpy), PKCS#8 for Ed25519."""
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(private, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return private.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def build_records(
    domain: str,
    selector: str,
    kind: KeyKind,
    private: PrivateKey,
    dk_policy: str | None = None,
    dmarc: str | None = None,
    dmarc_rua: str | None = None,
) -> list[TxtRecord]:
    """The key record, and optionally the DomainKeys policy and a DMARC suggestion."""
    records = [
        TxtRecord(
            f"{selector}._domainkey.{domain}",
            key_record_value(kind, private),
            f"DKIM key, selector {selector}"
            + (" (also read by DomainKeys verifiers)" if kind == "rsa" else ""),
        )
    ]
    if dk_policy is not None:
        flag = "-" if dk_policy == "all" else "~"
        records.append(
            TxtRecord(
                f"_domainkey.{domain}",
                f"o={flag}",
                "DomainKeys sender policy: "
                + ("all mail from the domain is signed" if flag == "-" else "some mail is signed"),
            )
        )
    if dmarc is not None:
        value = f"v=DMARC1; p={dmarc}"
        if dmarc_rua:
            value += f"; rua=mailto:{dmarc_rua}"
        records.append(
            TxtRecord(
                f"_dmarc.{domain}",
                value,
                "DMARC policy (suggestion: start with p=none, read the reports, then tighten)",
            )
        )
    return records


def zone_text(
    records: Sequence[TxtRecord], domain: str, header: Sequence[str], ttl: int = DEFAULT_TTL
) -> str:
    """A zone-file fragment: comment lines, then each record; loads as-is in BIND or NSD."""
    lines = [f"; {line}" for line in header]
    lines.append(f"; Add to the zone of {domain}. Names are absolute (note the final dot).")
    for record in records:
        lines.append(f"; {record.comment}")
        lines.append(record.zone_lines(ttl))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _owner_ids(owner: str) -> tuple[int, int]:
    """USER or USER:GROUP -> (uid, gid); the user's primary group when no group is given."""
    user, _, group = owner.partition(":")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise KeygenError(f"--owner: no such user {user!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KeygenError(f"--owner: no such group {group!r}") from None
    return entry.pw_uid, gid


def write_file(
    path: str, data: bytes, mode: int, force: bool, owner: tuple[int, int] | None = None
) -> None:
    """Write `data` to `path` with exactly `mode`, atomically; refuse to replace a file
    unless `force`. The temporary file is created with `mode` already, never wider."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; state it exactly
            if owner is not None:
                os.fchown(fd, *owner)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never clobber
    except FileExistsError:
        raise KeygenError(f"{path} already exists (use --force to replace it)") from None
    except PermissionError as exc:
        raise KeygenError(f"{path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkproxy keygen",
        description="Generate a DKIM signing key and the DNS records to publish for it.",
        epilog="Writes DIR/DOMAIN.SELECTOR.key (mode 0600) and DIR/DOMAIN.SELECTOR.zone, and "
        "prints the records. Then publish them and run: dkproxy dnscheck --domain DOMAIN "
        "--selector SELECTOR --keyfile DIR/DOMAIN.SELECTOR.key",
    )
    parser.add_argument("--domain", "-d", required=True, help="the signing domain (d=)")
    parser.add_argument(
        "--selector",
        "-s",
        help="the selector (s=); 'auto' names it by date: s202611 (RSA), e202611 (Ed25519)",
    )
    parser.add_argument("--date-selector", action="store_true", help="same as --selector auto")
    parser.add_argument("--type", "-t", choices=("rsa", "ed25519"), default="rsa", dest="kind")
    parser.add_argument("--bits", "-b", type=int, help=f"RSA key size (default {DEFAULT_RSA_BITS})")
    parser.add_argument("--out", "-o", default=".", metavar="DIR", help="output directory")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument(
        "--owner",
        metavar="USER[:GROUP]",
        help="give the key file to the user the proxy runs as (needs root)",
    )
    parser.add_argument(
        "--domainkeys-policy",
        "--dk-policy",
        choices=("all", "some"),
        dest="dk_policy",
        help="also write the DomainKeys policy record _domainkey.DOMAIN: o=- (all) / o=~ (some)",
    )
    parser.add_argument(
        "--dmarc",
        choices=("none", "quarantine", "reject"),
        help="also suggest a DMARC record _dmarc.DOMAIN with this policy",
    )
    parser.add_argument("--dmarc-rua", metavar="ADDRESS", help="where DMARC reports go")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="TTL of the zone lines")
    return parser


def _normalise_domain(text: str) -> str:
    domain = text.strip().rstrip(".").lower()
    if not is_domain(domain):
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    if not is_domain(domain):
        raise KeygenError(f"--domain: {text!r} is not a valid domain name")
    return domain


def _pick_selector(args: argparse.Namespace, kind: KeyKind, domain: str, out: str) -> str:
    wanted = args.selector
    if args.date_selector:
        if wanted not in (None, "auto"):
            raise KeygenError("give either --selector or --date-selector, not both")
        wanted = "auto"
    if wanted is None:
        raise KeygenError("--selector is required (or --selector auto for a date selector)")
    if wanted != "auto":
        try:
            check_selector(wanted)
        except ValueError as exc:
            raise KeygenError(f"--selector: {exc}") from None
        return wanted.lower()
    base = date_selector(kind)
    if args.force:
        return base
    # A second rotation within a month gets s202611b, s202611c, ...
    for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        candidate = base + suffix
        if not any(os.path.exists(p) for p in _paths(out, domain, candidate)):
            return candidate
    raise KeygenError(f"every date selector for this month exists in {out}")


def _paths(out: str, domain: str, selector: str) -> tuple[str, str]:
    stem = os.path.join(out, f"{domain}.{selector}")
    return stem + ".key", stem + ".zone"


def _check_bits(kind: KeyKind, bits: int | None) -> int:
    if kind == "ed25519":
        if bits is not None:
            raise KeygenError("--bits applies to RSA keys only (Ed25519 keys are 256 bits)")
        return 256
    bits = DEFAULT_RSA_BITS if bits is None else bits
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise KeygenError(
            f"--bits {bits}: use {MIN_RSA_BITS} to {MAX_RSA_BITS} (RFC 8301: keys below "
            f"{MIN_RSA_BITS} are refused by verifiers, above {MAX_RSA_BITS} may not be verified)"
        )
    return bits


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    kind: KeyKind = args.kind
    domain = _normalise_domain(args.domain)
    bits = _check_bits(kind, args.bits)
    if args.dmarc_rua and not args.dmarc:
        raise KeygenError("--dmarc-rua needs --dmarc POLICY")
    if args.dmarc_rua and ("@" not in args.dmarc_rua or any(c in args.dmarc_rua for c in ";, ")):
        raise KeygenError(f"--dmarc-rua: {args.dmarc_rua!r} is not a plain mail address")
    if not 0 <= args.ttl <= 2**31 - 1:
        raise KeygenError("--ttl must be between 0 and 2147483647")
    owner = _owner_ids(args.owner) if args.owner else None
    out = args.out
    try:
        os.makedirs(out, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise KeygenError(f"--out {out}: {exc.strerror or exc}") from None
    selector = _pick_selector(args, kind, domain, out)
    key_path, zone_path = _paths(out, domain, selector)
    if not args.force:
        for path in (key_path, zone_path):
            if os.path.lexists(path):
                raise KeygenError(f"{path} already exists (use --force to replace it)")

    private = generate_private_key(kind, bits)
    records = build_records(
        domain, selector, kind, private, args.dk_policy, args.dmarc, args.dmarc_rua
    )
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    header = [
        f"dkproxy keygen {today}: {kind} {bits} bits, domain {domain}, selector {selector}",
        f"private key: {os.path.abspath(key_path)}",
    ]
    zone = zone_text(records, domain, header, args.ttl)
    write_file(key_path, private_key_pem(private), 0o600, args.force, owner)
    write_file(zone_path, zone.encode("ascii"), 0o644, args.force)

    print(f"private key:  {key_path}  ({kind} {bits} bits, mode 0600)", file=stdout)
    print(f"DNS records:  {zone_path}", file=stdout)
    print(f"\n--- BIND zone lines for {domain} ---", file=stdout)
    print(zone, end="", file=stdout)
    print("\n--- the same for a web DNS panel (type TXT, one value each) ---", file=stdout)
    for record in records:
        print(f"name:  {record.relative_name(domain)}   ({record.name})", file=stdout)
        print(f"value: {record.value}", file=stdout)
    dnscheck = f"dkproxy dnscheck --domain {domain} --selector {selector} --keyfile {key_path}"
    print(
        "\nNext: publish the records, wait for them to appear, then run\n"
        f"  {dnscheck}\n"
        f"and only then configure dkproxy with keyfile {key_path}, selector {selector}.",
        file=stdout,
    )
    if owner is None and os.geteuid() == 0:
        print(
            "note: the key belongs to root; if the proxy runs as another user, give it the "
            "key (--owner USER, or chown USER " + key_path + ")",
            file=stdout,
        )
    return 0


def main(argv: list[str], stdout: TextIO | None = None) -> int:
    """Entry point for `dkproxy keygen ARGS`; returns the exit status."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    try:
        return run(args, stdout or sys.stdout)
    except KeygenError as exc:
        print(f"dkproxy keygen: {exc}", file=sys.stderr)
        return 1
