"""`dkproxy dnscheck`: prove that DNS publishes the right key for every signature.

A signature is only as good as the record a verifier finds at `<selector>._domainkey.<d>`.
For each (domain, selector, key) the configuration signs with, this looks the record up and
judges it the way verifiers will: one line per key, a summary line, and a non-zero exit status
on any problem, so it can gate a deployment or a key rotation.

Statuses (the first that applies wins):
  dns error        the server did not answer (timeout, SERVFAIL): nothing was proven
  missing          no TXT record at the name (NXDOMAIN or no TXT data)
  several records  more than one TXT record at the name. Verifiers expect one; Mail::DKIM
                   (DKIMproxy, SpamAssassin) reads only the first in the answer, whose order
                   changes, so even one stray non-key record breaks verification at random
  bad syntax       not a key record: no p=, p= not base64 or not a key, v= other than DKIM1
                   (or not first), unknown k=, duplicate tags, literal quotes from a panel
  revoked          empty p=
  too short        published RSA key under 1024 bits (RFC 8301: verifiers refuse it)
  mismatch         the published key is not the public half of the private key file
  restricted       h= excludes sha256 or s= excludes email: signatures would not verify
  testing          t=y. RFC 6376 3.6.1: verifiers must treat such mail like unsigned mail,
                   so the setup is not finished; a problem unless --allow-testing
  ok               the record is usable and matches the key
  skipped          d= depends on the message ($senderdomain); not a failure. Name the
                   domains to check with --domain.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkproxy.config import ConfigError, OutboundConfig, is_domain, load_config_file
from dkproxy.mailauth.dnsresolver import Resolver, TxtResult
from dkproxy.mailauth.keys import MIN_RSA_BITS, KeyLoadError, SigningKey, load_signing_key

Status = Literal[
    "ok",
    "missing",
    "mismatch",
    "revoked",
    "too short",
    "bad syntax",
    "several records",
    "testing",
    "restricted",
    "dns error",
    "skipped",
]

#: Statuses that do not fail the check ("testing" is added by --allow-testing).
PASSING: frozenset[str] = frozenset({"ok", "skipped"})
STATUS_WIDTH = 16
DEFAULT_TIMEOUT = 5.0
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_MACRO = re.compile(r"\$(senderdomain|keydomain|key)\b")


@dataclass(frozen=True)
class KeyTarget:
    """One key that a configuration signs with: where its record must be, and the key."""

    domain: str
    selector: str
    key: SigningKey | None  # None: only the record is checked, not compared with a key
    source: str = ""

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class CheckResult:
    target: KeyTarget
    status: Status
    detail: str

    def line(self) -> str:
        """`STATUS  NAME  DETAIL`, one greppable line."""
        return f"{self.status:<{STATUS_WIDTH}}{self.target.name}  {self.detail}".rstrip()


class RecordError(ValueError):
    """A key record that does not parse; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------
# Judging one record
# ---------------------------------------------------------------------------------------------


def parse_tags(record: str) -> dict[str, str]:
    """RFC 6376 3.2 tag-list: `tag=value` separated by `;`, whitespace around them ignored.

    Keeps insertion order (v= must come first); duplicate tags are an error (3.2: "tags
    ... MUST NOT be duplicated").
    """
    tags: dict[str, str] = {}
    for part in record.split(";"):
        part = part.strip(" \t\r\n")
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip(" \t\r\n")
        if not eq or not _TAG_NAME.fullmatch(name):
            raise RecordError(f"{_short(part)!r} is not a tag=value pair")
        if name in tags:
            raise RecordError(f"tag {name}= appears twice")
        tags[name] = value.strip(" \t\r\n")
    return tags


def looks_like_key(record: str) -> bool:
    return record.lstrip().startswith("v=DKIM1") or re.search(r"(^|;)\s*p=", record) is not None


@dataclass(frozen=True)
class PublishedKey:
    kind: str
    bits: int
    public: rsa.RSAPublicKey | ed25519.Ed25519PublicKey | None  # None when revoked
    tags: dict[str, str]


def parse_key_record(record: str) -> PublishedKey:
    """Parse a DKIM/DomainKeys key record; raise RecordError with the reason."""
    if '"' in record or "\\" in record:
        raise RecordError(
            "the record contains quote or backslash characters: the DNS panel stored the "
            "zone-file quoting literally; enter the value without quotes"
        )
    tags = parse_tags(record)
    if "v" in tags:
        if tags["v"] != "DKIM1":
            raise RecordError(f"v={tags['v']}: only v=DKIM1 exists")
        if next(iter(tags)) != "v":
            raise RecordError("v=DKIM1 must be the first tag (RFC 6376 3.6.1)")
    kind = tags.get("k", "rsa")
    if kind not in ("rsa", "ed25519"):
        raise RecordError(f"unknown key type k={kind} (rsa or ed25519)")
    if "p" not in tags:
        raise RecordError("no p= tag (the public key)")
    text = re.sub(r"[ \t\r\n]", "", tags["p"])
    if not text:
        return PublishedKey(kind, 0, None, tags)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError("p= is not valid base64 (a character was lost or added)") from None
    if kind == "ed25519":
        if len(raw) != 32:
            raise RecordError(f"k=ed25519 needs a 32-byte p=, this one has {len(raw)} bytes")
        return PublishedKey(kind, 256, ed25519.Ed25519PublicKey.from_public_bytes(raw), tags)
    try:
        public = serialization.load_der_public_key(raw)
    except ValueError:
        if _is_pkcs1(raw):
            raise RecordError(
                "p= is a bare PKCS#1 RSA key; publish the SubjectPublicKeyInfo form "
                "(Mail::DKIM cannot read this one)"
            ) from None
        raise RecordError("p= does not decode to a public key (truncated?)") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise RecordError(f"k=rsa but p= holds a {type(public).__name__}")
    return PublishedKey(kind, public.key_size, public, tags)


def _is_pkcs1(raw: bytes) -> bool:
    pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(raw)
    pem += b"-----END RSA PUBLIC KEY-----\n"
    try:
        serialization.load_pem_public_key(pem)
    except ValueError:
        return False
    return True


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same_key(published: PublishedKey, key: SigningKey) -> bool:
    mine = key.private.public_key()
    if isinstance(published.public, rsa.RSAPublicKey) and isinstance(mine, rsa.RSAPublicKey):
        return published.public.public_numbers() == mine.public_numbers()
    if isinstance(published.public, ed25519.Ed25519PublicKey) and isinstance(
        mine, ed25519.Ed25519PublicKey
    ):
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return published.public.public_bytes(*raw) == mine.public_bytes(*raw)
    return False


def judge(target: KeyTarget, answer: TxtResult) -> tuple[Status, str]:
    """The verdict on one lookup, as (status, detail)."""
    if answer.status == "temperror":
        return "dns error", f"no answer from DNS ({answer.detail or 'timeout'}); nothing checked"
    records = answer.records if answer.status == "ok" else []
    if not records:
        why = "no such name" if answer.status == "nxdomain" else "no TXT record"
        return "missing", f"{why}: publish the key record here"
    if len(records) > 1:
        keys = sum(1 for r in records if looks_like_key(r))
        which = "all key records" if keys == len(records) else f"{keys} of them key records"
        return "several records", (
            f"{len(records)} TXT records ({which}); verifiers expect exactly one and may read "
            "any of them: remove all but the key record"
        )
    try:
        published = parse_key_record(records[0])
    except RecordError as exc:
        shown = _short(records[0])
        return "bad syntax", f"{exc} (published: {shown!r})"
    if published.public is None:
        return "revoked", "empty p=: the key was withdrawn; signatures with it fail"
    described = f"{published.kind} {published.bits} bits"
    if published.kind == "rsa" and published.bits < MIN_RSA_BITS:
        return "too short", (
            f"published RSA key has {published.bits} bits; verifiers refuse keys under "
            f"{MIN_RSA_BITS} (RFC 8301)"
        )
    key = target.key
    if key is not None:
        if key.kind != published.kind:
            return "mismatch", (
                f"published k={published.kind}, but {key.path} is an {key.kind} key"
            )
        if not _same_key(published, key):
            mine = f"{key.kind} {key.bits} bits"
            return "mismatch", (
                f"published key ({described}) is not the public half of {key.path} ({mine})"
            )
    hashes = [h.strip() for h in published.tags.get("h", "").split(":") if h.strip()]
    if hashes and "sha256" not in hashes:
        return "restricted", f"h={':'.join(hashes)} excludes sha256, which dkproxy signs with"
    services = [s.strip() for s in published.tags.get("s", "").split(":") if s.strip()]
    if services and not {"email", "*"} & set(services):
        return "restricted", f"s={':'.join(services)} does not include email"
    flags = [f.strip() for f in published.tags.get("t", "").split(":")]
    match = f", matches {key.path}" if key is not None else " (no key file given; not compared)"
    if "y" in flags:
        return "testing", (
            f"{described}{match}; t=y: receivers treat the mail as unsigned, remove t=y "
            "once tests are done"
        )
    return "ok", described + match


# ---------------------------------------------------------------------------------------------
# Running the checks
# ---------------------------------------------------------------------------------------------


async def check_targets(targets: Sequence[KeyTarget], resolver: Resolver) -> list[CheckResult]:
    """Look every name up (concurrently) and judge it; order of `targets` is kept."""

    async def one(target: KeyTarget) -> CheckResult:
        if "$" in target.domain:
            return CheckResult(
                target,
                "skipped",
                f"d={target.domain} depends on the message; check each domain with --domain DOMAIN",
            )
        answer = await resolver.txt(target.name)
        status, detail = judge(target, answer)
        if status == "missing":
            detail += await _misplaced_hint(target, resolver)
        return CheckResult(target, status, detail)

    return list(await asyncio.gather(*(one(t) for t in targets)))


async def _misplaced_hint(target: KeyTarget, resolver: Resolver) -> str:
    """Find the record where a web panel puts it when the full name is typed into a field
    that already appends the domain (s1._domainkey.example.org.example.org)."""
    doubled = f"{target.name}.{target.domain}"
    answer = await resolver.txt(doubled)
    if answer.status == "ok" and answer.records:
        return (
            f"; but a record exists at {doubled}: enter only "
            f"'{target.selector}._domainkey' as the name in the DNS panel"
        )
    return ""


def summary(results: Sequence[CheckResult], passing: Iterable[str] = PASSING) -> str:
    ok = frozenset(passing)
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    total = len(results)
    noun = "key" if total == 1 else "keys"
    if total and all(r.status == "ok" for r in results):
        return f"dnscheck: all {total} {noun} ok"
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    problems = sum(1 for r in results if r.status not in ok)
    verdict = f"{problems} with problems" if problems else "no problems"
    return f"dnscheck: {total} {noun}: {parts} ({verdict})"


def report(results: Sequence[CheckResult], stdout: TextIO, allow_testing: bool = False) -> int:
    """Print one line per key and the summary; return the exit status (0 = all usable)."""
    passing = PASSING | ({"testing"} if allow_testing else set())
    for result in results:
        print(result.line(), file=stdout)
    print(summary(results, passing), file=stdout)
    if not results:
        return 1
    return 0 if all(r.status in passing for r in results) else 1


def run_checks(
    targets: Sequence[KeyTarget],
    server: str | None,
    timeout: float,
    stdout: TextIO,
    allow_testing: bool = False,
) -> int:
    """Check `targets` against DNS (`server` "HOST:PORT", None = system resolver)."""

    async def go() -> list[CheckResult]:
        # No cache: each name is asked once, and a re-run must see the current data.
        return await check_targets(targets, Resolver(server, timeout=timeout, max_cache=0))

    return report(asyncio.run(go()), stdout, allow_testing)


# ---------------------------------------------------------------------------------------------
# Targets from a configuration or the command line
# ---------------------------------------------------------------------------------------------


def targets_from_keys(
    keys: Iterable[tuple[str, str, SigningKey, str]], domains: Sequence[str] = ()
) -> list[KeyTarget]:
    """Turn SigningPolicy.signing_keys() into targets; a d= macro is filled with each of
    `domains` (or left for a "skipped" line when none are given)."""
    targets: list[KeyTarget] = []
    seen: set[tuple[str, str, str]] = set()
    for domain, selector, key, source in keys:
        filled = [_MACRO.sub(d, domain) for d in domains] if "$" in domain and domains else [domain]
        for name in filled:
            marker = (name, selector, key.path)
            if marker not in seen:
                seen.add(marker)
                targets.append(KeyTarget(name, selector, key, source))
    return targets


def targets_from_config(path: str, domains: Sequence[str] = ()) -> list[KeyTarget]:
    """Every key an outbound configuration signs with; raises ConfigError."""
    from dkproxy.policy import SigningPolicy

    cfg = load_config_file(path)
    if not isinstance(cfg, OutboundConfig):
        raise ConfigError(path, None, "an inbound (verifying) configuration signs with no keys")
    policy = SigningPolicy.from_config(cfg)
    return targets_from_keys(policy.signing_keys(), domains)


def parse_domains(values: Sequence[str]) -> list[str]:
    domains: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip().rstrip(".").lower()
            if not item:
                continue
            if not is_domain(item):
                raise ValueError(f"--domain: {item!r} is not a valid domain name")
            if item not in domains:
                domains.append(item)
    return domains


def check_signing_keys(
    keys: Iterable[tuple[str, str, SigningKey, str]], args: argparse.Namespace, out: TextIO
) -> int:
    """check-config --dns: check the published record of every key a configuration signs
    with (`keys`: SigningPolicy.signing_keys()), with the options of `add_dns_options` and
    `--domain`. Returns the exit status (run_checks'; 2 for a bad --domain)."""
    try:
        domains = parse_domains(args.domain)
    except ValueError as exc:
        print(f"dkproxy check-config: {exc}", file=sys.stderr)
        return 2
    targets = targets_from_keys(keys, domains)
    print("", file=out)
    return run_checks(targets, args.dns_server, args.timeout, out, args.allow_testing)


def add_dns_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dns-server",
        metavar="HOST:PORT",
        help="ask this DNS server (default: the system resolver from /etc/resolv.conf)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per lookup (default 5)"
    )
    parser.add_argument(
        "--allow-testing",
        action="store_true",
        help="accept records in testing mode (t=y) without a non-zero exit status",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkproxy dnscheck",
        description="Check that DNS publishes the right key for every key a configuration "
        "signs with (or for one --domain/--selector/--keyfile). Exit status 0 only when "
        "every record is ok; 1 when any is not; 2 on usage or configuration errors.",
    )
    parser.add_argument(
        "--config",
        "-c",
        "--conf_file",
        "--conf-file",
        dest="config",
        metavar="FILE",
        help="outbound configuration (DKIMproxy style or TOML)",
    )
    parser.add_argument(
        "--domain",
        "-d",
        action="append",
        default=[],
        help="domain to check (repeat or comma-separate); with --config it fills d=$senderdomain",
    )
    parser.add_argument("--selector", "-s", help="selector (without --config)")
    parser.add_argument("--keyfile", "-k", help="private key to compare with (without --config)")
    add_dns_options(parser)
    return parser


def main(argv: list[str], stdout: TextIO | None = None) -> int:
    """Entry point for `dkproxy dnscheck ARGS`; returns the exit status."""
    out = stdout or sys.stdout
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    def fail(message: str) -> int:
        print(f"dkproxy dnscheck: {message}", file=sys.stderr)
        return 2

    try:
        domains = parse_domains(args.domain)
    except ValueError as exc:
        return fail(str(exc))
    if args.timeout <= 0:
        return fail("--timeout must be positive")
    if args.config:
        if args.selector or args.keyfile:
            return fail("--selector/--keyfile cannot be combined with --config")
        try:
            targets = targets_from_config(args.config, domains)
        except ConfigError as exc:
            return fail(str(exc))
        if not targets:
            print("dnscheck: the configuration signs with no keys", file=out)
            return 1
    else:
        if not domains or not args.selector:
            return fail("give --config FILE, or --domain D --selector S [--keyfile K]")
        selector = args.selector.lower()
        if not is_domain(selector):
            return fail(f"--selector: {args.selector!r} is not a valid DNS label")
        key: SigningKey | None = None
        if args.keyfile:
            try:
                key = load_signing_key(args.keyfile)
            except KeyLoadError as exc:
                return fail(f"key file {exc}")
        targets = [KeyTarget(d, selector, key, "command line") for d in domains]
    try:
        return run_checks(targets, args.dns_server, args.timeout, out, args.allow_testing)
    except ValueError as exc:  # a malformed --dns-server
        return fail(str(exc))
