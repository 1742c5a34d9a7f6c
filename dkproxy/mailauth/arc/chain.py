"""ARC (RFC 8617) chain structure: the ARC Sets of a message, their offline checks, and the
header hashing that verifying and sealing share.

`collect` ends a malformed chain (gaps, duplicates, over 50 instances, newest cv=fail) before
any key is fetched. Canonicalization and header selection are dkimpy's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value

from dkproxy.mailauth.message import Message

ArcValue = Literal["pass", "fail", "none"]

#: RFC 8617 4.2.1: at most 50 ARC Sets; a chain with more fails without any crypto.
MAX_INSTANCES = 50
#: Signed header field names one ARC-Message-Signature may list before it is refused (work cap).
MAX_SIGNED_FIELDS = 200

AAR = b"arc-authentication-results"
AMS = b"arc-message-signature"
SEAL = b"arc-seal"
KINDS = {AAR: "ARC-Authentication-Results", AMS: "ARC-Message-Signature", SEAL: "ARC-Seal"}
_AAR_INSTANCE = re.compile(rb"\s*i\s*=\s*(\d{1,6})\s*;")
RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


@dataclass(frozen=True)
class ArcResult:
    """The verdict on a message's ARC chain (RFC 8617 5.2) and what a report needs of it.

    `sealers`/`selectors`: ARC-Seal d=/s= per instance, oldest first. `oldest_pass`: RFC
    8617's header.oldest-pass, 0 when every ARC-Message-Signature still validates, else the
    lowest instance from which all newer ones do; None unless pass. `instances`: the highest
    instance seen (the next sealer adds one), also for a chain that failed.
    """

    result: ArcValue
    reason: str = ""
    instances: int = 0
    sealers: tuple[str, ...] = ()
    selectors: tuple[str, ...] = ()
    oldest_pass: int | None = None
    #: ARC-Authentication-Results values per instance (without "i=N;"), oldest first.
    aar: tuple[str, ...] = ()

    def describe(self) -> str:
        """RFC 8617 7.2.2 evidence, newest first: "as[2].d=b.example as[2].s=s1 as[1].d=..."."""
        pairs = zip(self.sealers, self.selectors, strict=True)
        parts = [f"as[{i}].d={d} as[{i}].s={s}" for i, (d, s) in enumerate(pairs, start=1)]
        return " ".join(reversed(parts))

    def summary(self) -> str:
        """For the per-message log line: arc=pass/2(a.example,b.example)."""
        text = f"arc={self.result}"
        if self.instances:
            text += f"/{self.instances}({','.join(self.sealers) or '?'})"
        return text


@dataclass
class ArcSet:
    """Indexes into message.headers of one instance's three fields, and their tags."""

    instance: int
    fields: dict[bytes, int] = field(default_factory=dict)
    seal_tags: dict[bytes, bytes] = field(default_factory=dict)
    ams_tags: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Chain:
    """The ARC Sets of a message after the offline checks (RFC 8617 5.2 steps 1-3)."""

    sets: list[ArcSet]

    @property
    def key_names(self) -> list[str]:
        return sorted({key_name(t) for s in self.sets for t in (s.seal_tags, s.ams_tags)})


def key_name(tags: Mapping[bytes, bytes]) -> str:
    """The DNS name of the key an ARC-Seal or ARC-Message-Signature names: s._domainkey.d."""
    return f"{tags[b's'].decode('ascii')}._domainkey.{tags[b'd'].decode('ascii').rstrip('.')}"


def ascii_text(value: bytes) -> str:
    """A tag value for a reason text (non-ASCII bytes replaced)."""
    return value.decode("ascii", "replace")


def instance_of(name: bytes, value: bytes) -> tuple[int, dict[bytes, bytes]]:
    """The i= of one ARC header field and, for AS/AMS, its tags; ValueError when unusable."""
    if name == AAR:
        match = _AAR_INSTANCE.match(value)
        if match is None:
            raise ValueError("ARC-Authentication-Results without a leading i= tag")
        return int(match.group(1)), {}
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as exc:
        raise ValueError(f"malformed {KINDS[name]} ({exc.__class__.__name__})") from None
    raw = tags.get(b"i", b"")
    if not raw.isdigit() or len(raw) > 6:
        raise ValueError(f"{KINDS[name]} without a valid i= tag")
    return int(raw), tags


def collect(message: Message) -> Chain | ArcResult:
    """Group the ARC fields into sets and check their structure; an ArcResult ends the chain.

    No ARC field: none. Any structural fault (RFC 8617 5.2 steps 2-3): fail, naming it.
    """
    sets: dict[int, ArcSet] = {}
    highest = 0
    problem = ""
    count = 0
    for index, (raw_name, value) in enumerate(message.headers):
        name = raw_name.rstrip(b" \t").lower()
        if name not in KINDS:
            continue
        count += 1
        if count > 3 * MAX_INSTANCES:
            # Work cap: a longer chain cannot be valid, so the rest is not even parsed.
            problem = f"more than {MAX_INSTANCES} ARC sets"
            highest = MAX_INSTANCES
            break
        try:
            instance, tags = instance_of(name, value)
        except ValueError as exc:
            problem = problem or str(exc)
            continue
        if not 1 <= instance <= MAX_INSTANCES:
            problem = problem or f"instance i={instance} outside 1..{MAX_INSTANCES} (RFC 8617)"
            highest = max(highest, min(instance, MAX_INSTANCES))
            continue
        highest = max(highest, instance)
        item = sets.setdefault(instance, ArcSet(instance))
        if name in item.fields:
            problem = problem or f"duplicate {KINDS[name]} i={instance}"
            continue
        item.fields[name] = index
        if name == SEAL:
            item.seal_tags = tags
        elif name == AMS:
            item.ams_tags = tags
    if not sets and not problem:
        return ArcResult("none")
    if not problem:
        for instance in range(1, highest + 1):
            item = sets.get(instance)
            missing = [KINDS[k] for k in (AAR, AMS, SEAL) if item is None or k not in item.fields]
            if missing:
                problem = f"missing {', '.join(missing)} i={instance}"
                break
    if problem:
        return ArcResult("fail", problem, instances=highest)
    ordered = [sets[i] for i in range(1, highest + 1)]
    problem = _check_tags(ordered)
    if problem:
        return failed_chain(ordered, problem)
    return Chain(ordered)


def _check_tags(sets: list[ArcSet]) -> str:
    """RFC 8617 5.2 steps 2-3 and the tag rules of 4.1: the first problem, or ""."""
    newest = sets[-1]
    if newest.seal_tags.get(b"cv", b"").lower() == b"fail":
        # A sealer already found the chain broken: it stays failed (RFC 8617 5.2 step 2).
        return f"ARC-Seal i={newest.instance} says cv=fail"
    for item in sets:
        seal, ams = item.seal_tags, item.ams_tags
        try:
            dkim.validate_signature_fields(seal, [b"i", b"a", b"b", b"cv", b"d", b"s"], True)
            dkim.validate_signature_fields(ams, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"], True)
            key_name(seal)
            key_name(ams)
        except (dkim.ValidationError, UnicodeDecodeError) as exc:
            return f"instance {item.instance}: {_tidy(exc)}"
        except Exception as exc:  # dkimpy raises IndexError on some malformed values
            return f"instance {item.instance}: invalid tags ({exc.__class__.__name__})"
        if b"h" in seal:
            return f"ARC-Seal i={item.instance} has an h= tag"
        for tags, kind in ((seal, "ARC-Seal"), (ams, "ARC-Message-Signature")):
            if tags[b"a"].lower() != b"rsa-sha256":
                return f"{kind} i={item.instance}: unsupported a={ascii_text(tags[b'a'])}"
        expected = b"none" if item.instance == 1 else b"pass"
        if seal[b"cv"].lower() != expected:
            return f"ARC-Seal i={item.instance} has cv={ascii_text(seal[b'cv'])}"
    return ""


def _tidy(exc: Exception) -> str:
    return re.sub(r"b'([^']*)'", r"\1", str(exc))[:160]


def failed_chain(sets: list[ArcSet], reason: str) -> ArcResult:
    """arc=fail for a chain of these sets, with the reason and the sealers (for the log)."""
    return ArcResult("fail", reason, instances=len(sets), sealers=sealers_of(sets))


def sealers_of(sets: list[ArcSet]) -> tuple[str, ...]:
    """The ARC-Seal d= of each set, oldest first, lower-case ("?" where it has none)."""
    return tuple(ascii_text(s.seal_tags.get(b"d", b"?")).lower() for s in sets)


#: The value of the b= tag (RFC 6376 3.7: hashed with it deleted). Tags are known to parse,
#: so this simple pattern suffices; dkimpy's general RE_BTAG backtracks over long base64.
_B_VALUE = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")


def header_digest(canonical: list[tuple[bytes, bytes]], policy: CanonicalizationPolicy,
            signature: tuple[bytes, bytes], prefix: Any = None) -> bytes:  # fmt: skip
    """SHA-256 of canonical header fields (after what `prefix` already hashed), then the
    signature field itself with its b= value and final CRLF removed (RFC 6376 3.7)."""
    hasher = prefix.copy() if prefix is not None else hashlib.sha256()
    for name, value in canonical:
        hasher.update(name + b":" + value)
    unsigned = (signature[0], _B_VALUE.sub(rb"\1", signature[1]))
    (name, value), *_ = policy.canonicalize_headers([unsigned])
    hasher.update(name + b":" + value.rstrip())
    return hasher.digest()


def seal_digest(fields: list[tuple[bytes, bytes]]) -> bytes:
    """The ARC-Seal hash: ARC fields in seal order (RFC 8617 5.1.1), relaxed, the last being
    the seal made or checked."""
    return header_digest(RELAXED.canonicalize_headers(fields[:-1]), RELAXED, fields[-1])


def set_fields(message: Message, sets: Iterable[ArcSet]) -> list[tuple[bytes, bytes]]:
    """The (name, value) of each set's AAR, AMS and AS, in seal order (RFC 8617 5.1.1)."""
    out: list[tuple[bytes, bytes]] = []
    for item in sets:
        for kind in (AAR, AMS, SEAL):
            name, value = message.headers[item.fields[kind]]
            out.append((name, value))
    return out
