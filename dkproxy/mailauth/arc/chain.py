"""ARC (RFC 8617): verifying the Authenticated Received Chain and sealing the next instance.

Verification follows RFC 8617 section 5.2, split like the DKIM verifier so DNS never blocks
the event loop: `collect` ends a malformed chain (gaps, duplicates, over 50 instances,
newest cv=fail) before any key is fetched; the keys are then looked up concurrently through
the shared caching resolver; `evaluate` checks the signatures. Canonicalization and header
selection are dkimpy's, RSA is OpenSSL's; each body canonicalization and each chain prefix
is hashed once, which bounds the work a hostile chain can cause.

Sealing (RFC 8617 section 5.1) computes the hashes the same way and signs the digest with
OpenSSL, as `dkim_signer` does: dkimpy's `arc_sign` would do the RSA in pure Python.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import authres
import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import select_headers
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from dkproxy.config import ArcSealConfig, ConfigError

from . import dmarc as dmarc_mod
from .dkim_signer import DEFAULT_SIGNED_HEADERS, body_hash
from .dnsresolver import Resolver, TxtResult
from .keys import KeyLoadError, SigningKey, load_signing_key
from .message import Message

log = logging.getLogger("dkproxy.arc")
ArcValue = Literal["pass", "fail", "none"]

#: RFC 8617 4.2.1: at most 50 ARC Sets; a chain with more fails without any crypto.
MAX_INSTANCES = 50
#: Signed header field names one ARC-Message-Signature may list before it is refused (work cap).
MAX_SIGNED_FIELDS = 200

AAR = b"arc-authentication-results"
AMS = b"arc-message-signature"
SEAL = b"arc-seal"
_KINDS = {AAR: "ARC-Authentication-Results", AMS: "ARC-Message-Signature", SEAL: "ARC-Seal"}
_AAR_INSTANCE = re.compile(rb"\s*i\s*=\s*(\d{1,6})\s*;")
_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_B64_FOLD = 72


class ArcSealError(Exception):
    """The message cannot be sealed as configured (the reason is the message)."""


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
class _Set:
    """Indexes into message.headers of one instance's three fields, and their tags."""

    instance: int
    fields: dict[bytes, int] = field(default_factory=dict)
    seal_tags: dict[bytes, bytes] = field(default_factory=dict)
    ams_tags: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Chain:
    """The ARC Sets of a message after the offline checks (RFC 8617 5.2 steps 1-3)."""

    sets: list[_Set]

    @property
    def key_names(self) -> list[str]:
        return sorted({_key_name(t) for s in self.sets for t in (s.seal_tags, s.ams_tags)})


def _key_name(tags: Mapping[bytes, bytes]) -> str:
    return f"{tags[b's'].decode('ascii')}._domainkey.{tags[b'd'].decode('ascii').rstrip('.')}"


def _ascii(value: bytes) -> str:
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
        raise ValueError(f"malformed {_KINDS[name]} ({exc.__class__.__name__})") from None
    raw = tags.get(b"i", b"")
    if not raw.isdigit() or len(raw) > 6:
        raise ValueError(f"{_KINDS[name]} without a valid i= tag")
    return int(raw), tags


def collect(message: Message) -> Chain | ArcResult:
    """Group the ARC fields into sets and check their structure; an ArcResult ends the chain.

    No ARC field: none. Any structural fault (RFC 8617 5.2 steps 2-3): fail, naming it.
    """
    sets: dict[int, _Set] = {}
    highest = 0
    problem = ""
    count = 0
    for index, (raw_name, value) in enumerate(message.headers):
        name = raw_name.rstrip(b" \t").lower()
        if name not in _KINDS:
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
        item = sets.setdefault(instance, _Set(instance))
        if name in item.fields:
            problem = problem or f"duplicate {_KINDS[name]} i={instance}"
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
            missing = [_KINDS[k] for k in (AAR, AMS, SEAL) if item is None or k not in item.fields]
            if missing:
                problem = f"missing {', '.join(missing)} i={instance}"
                break
    if problem:
        return ArcResult("fail", problem, instances=highest)
    ordered = [sets[i] for i in range(1, highest + 1)]
    problem = _check_tags(ordered)
    if problem:
        return _failed(ordered, problem)
    return Chain(ordered)


def _check_tags(sets: list[_Set]) -> str:
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
            _key_name(seal)
            _key_name(ams)
        except (dkim.ValidationError, UnicodeDecodeError) as exc:
            return f"instance {item.instance}: {_tidy(exc)}"
        except Exception as exc:  # dkimpy raises IndexError on some malformed values
            return f"instance {item.instance}: invalid tags ({exc.__class__.__name__})"
        if b"h" in seal:
            return f"ARC-Seal i={item.instance} has an h= tag"
        for tags, kind in ((seal, "ARC-Seal"), (ams, "ARC-Message-Signature")):
            if tags[b"a"].lower() != b"rsa-sha256":
                return f"{kind} i={item.instance}: unsupported a={_ascii(tags[b'a'])}"
        expected = b"none" if item.instance == 1 else b"pass"
        if seal[b"cv"].lower() != expected:
            return f"ARC-Seal i={item.instance} has cv={_ascii(seal[b'cv'])}"
    return ""


def _tidy(exc: Exception) -> str:
    return re.sub(r"b'([^']*)'", r"\1", str(exc))[:160]


def _failed(sets: list[_Set], reason: str) -> ArcResult:
    return ArcResult("fail", reason, instances=len(sets), sealers=_sealers(sets))


def _sealers(sets: list[_Set]) -> tuple[str, ...]:
    return tuple(_ascii(s.seal_tags.get(b"d", b"?")).lower() for s in sets)


# --------------------------------------------------------------------------------------------
# Verification with fetched key records (no network)


class _Keys(dict[str, rsa.RSAPublicKey | str]):
    """Key name -> RSA public key from the fetched records (or why there is none), each
    parsed once per message."""

    def __init__(self, answers: Mapping[str, TxtResult], min_bits: int) -> None:
        super().__init__()
        self.answers = answers
        self.min_bits = min_bits

    def get_key(self, tags: Mapping[bytes, bytes]) -> rsa.RSAPublicKey | str:
        return self[_key_name(tags)]

    def __missing__(self, name: str) -> rsa.RSAPublicKey | str:
        self[name] = self._load(name)
        return self[name]

    def _load(self, name: str) -> rsa.RSAPublicKey | str:
        answer = self.answers.get(name)
        if answer is None or answer.status == "temperror":
            return f"DNS error for {name}"
        if answer.status != "ok" or not answer.raw:
            return f"no key at {name}"
        try:
            pk, bits, ktag, _ = dkim.evaluate_pk(name.encode(), answer.raw[0])
        except Exception as exc:  # KeyFormatError, binascii.Error, ASN.1 errors
            return f"unusable key at {name} ({exc.__class__.__name__})"
        if ktag != b"rsa":
            return f"key at {name} is not RSA"
        if bits < self.min_bits:
            return f"key at {name} has {bits} bits"
        return rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()


def _signature_ok(key: rsa.RSAPublicKey, tags: Mapping[bytes, bytes], digest: bytes) -> bool:
    try:
        signature = base64.b64decode(re.sub(rb"\s+", b"", tags[b"b"]), validate=True)
        key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class _Hashes:
    """Canonical headers and body hashes of one message, computed at most once each."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self._cache: dict[tuple[str, bytes], Any] = {}

    def headers(self, policy: CanonicalizationPolicy) -> list[tuple[bytes, bytes]]:
        key = ("headers", policy.header_algorithm.name)
        if key not in self._cache:
            self._cache[key] = policy.canonicalize_headers(self.message.headers)
        return self._cache[key]

    def body(self, policy: CanonicalizationPolicy) -> bytes:
        key = ("body", policy.body_algorithm.name)
        if key not in self._cache:
            self._cache[key] = body_hash(self.message, relaxed=key[1] == b"relaxed")
        return self._cache[key]


def _ams_valid(hashes: _Hashes, keys: _Keys, item: _Set) -> tuple[bool, str]:
    """RFC 8617 5.2 step 4 for one ARC-Message-Signature: (valid, why not)."""
    tags = item.ams_tags
    name = f"ARC-Message-Signature i={item.instance}"
    if b"l" in tags:
        return False, f"{name} has l="
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"relaxed/relaxed"))
    except InvalidCanonicalizationPolicyError:
        return False, f"{name} has an invalid c="
    signed = [n.strip().lower() for n in tags[b"h"].split(b":")]
    if len(signed) > MAX_SIGNED_FIELDS or SEAL in signed:
        return False, f"{name} has an unacceptable h= list"
    try:
        wanted = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]), validate=True)
    except ValueError:
        return False, f"{name} has an invalid bh="
    if hashes.body(policy) != wanted:
        return False, f"{name}: body hash mismatch"
    key = keys.get_key(tags)
    if isinstance(key, str):
        return False, f"{name}: {key}"
    own = hashes.message.headers[item.fields[AMS]]
    selected = select_headers(hashes.headers(policy), signed)
    if not _signature_ok(key, tags, _digest(selected, policy, (own[0], own[1]))):
        return False, f"{name} did not verify"
    return True, ""


#: The value of the b= tag (RFC 6376 3.7: hashed with it deleted). Tags are known to parse,
#: so this simple pattern suffices; dkimpy's general RE_BTAG backtracks over long base64.
_B_VALUE = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")


def _digest(canonical: list[tuple[bytes, bytes]], policy: CanonicalizationPolicy,
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
    return _digest(_RELAXED.canonicalize_headers(fields[:-1]), _RELAXED, fields[-1])


def _set_fields(message: Message, sets: Iterable[_Set]) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for item in sets:
        for kind in (AAR, AMS, SEAL):
            name, value = message.headers[item.fields[kind]]
            out.append((name, value))
    return out


def evaluate(
    message: Message, chain: Chain, answers: Mapping[str, TxtResult], min_bits: int
) -> ArcResult:
    """RFC 8617 5.2 steps 4-6 with the fetched key records: pass or fail, and oldest-pass."""
    sets = chain.sets
    keys = _Keys(answers, min_bits)
    hashes = _Hashes(message)
    newest = sets[-1]
    ok, why = _ams_valid(hashes, keys, newest)
    if not ok:
        return _failed(sets, why)
    # Seal i covers sets 1..i: hash the common prefix once, so a long chain costs linear time.
    fields = _set_fields(message, sets)
    canonical = _RELAXED.canonicalize_headers(fields)
    prefix, digests = hashlib.sha256(), []
    for n in range(0, len(fields), 3):
        for name, value in canonical[n : n + 2]:
            prefix.update(name + b":" + value)
        digests.append(_digest([], _RELAXED, fields[n + 2], prefix))
        prefix.update(canonical[n + 2][0] + b":" + canonical[n + 2][1])
    for item in reversed(sets):
        key = keys.get_key(item.seal_tags)
        if isinstance(key, str):
            return _failed(sets, f"ARC-Seal i={item.instance}: {key}")
        if not _signature_ok(key, item.seal_tags, digests[item.instance - 1]):
            return _failed(sets, f"ARC-Seal i={item.instance} did not verify")
    oldest_pass = 0
    for item in reversed(sets[:-1]):
        if not _ams_valid(hashes, keys, item)[0]:
            oldest_pass = item.instance + 1
            break
    aar = []
    for item in sets:
        value = message.headers[item.fields[AAR]][1].decode("utf-8", "replace")
        aar.append(re.sub(r"\s+", " ", value.split(";", 1)[1]).strip())
    return ArcResult(
        "pass",
        "",
        instances=len(sets),
        sealers=_sealers(sets),
        selectors=tuple(_ascii(s.seal_tags[b"s"]) for s in sets),
        oldest_pass=oldest_pass,
        aar=tuple(aar),
    )


def start_verify(
    message: Message, resolver: Resolver, min_bits: int = 1024
) -> asyncio.Future[ArcResult]:
    """`verify` started now: an already-finished future when the chain needs no key (no ARC
    field at all, the usual case, or a structural fault), so that it costs no task and no
    trip through the event loop; else a task checking the chain."""
    try:
        chain = collect(message)
    except Exception as exc:  # a bug must cost the chain its verdict, never the message
        log.exception("cannot verify the ARC chain")
        chain = ArcResult("fail", f"internal error ({exc.__class__.__name__})")
    if isinstance(chain, ArcResult):
        done: asyncio.Future[ArcResult] = asyncio.get_running_loop().create_future()
        done.set_result(chain)
        return done
    return asyncio.ensure_future(_verify_chain(message, chain, resolver, min_bits))


async def verify(message: Message, resolver: Resolver, min_bits: int = 1024) -> ArcResult:
    """Check the message's ARC chain; keys come through `resolver` (shared cache). Never raises
    for bad input: a DNS failure on a key makes the chain fail, as RFC 8617 5.2 leaves no
    temperror result for arc=."""
    return await start_verify(message, resolver, min_bits)


async def _verify_chain(
    message: Message, chain: Chain, resolver: Resolver, min_bits: int
) -> ArcResult:
    try:
        names = chain.key_names
        answers = await asyncio.gather(*(resolver.txt(name) for name in names))
        return evaluate(message, chain, dict(zip(names, answers, strict=True)), min_bits)
    except Exception as exc:  # a bug must cost the chain its verdict, never the message
        log.exception("cannot verify the ARC chain")
        return ArcResult("fail", f"internal error ({exc.__class__.__name__})")


# --------------------------------------------------------------------------------------------
# DMARC local override (RFC 7489 6.7 "local_policy", RFC 8617 7.2)


def trusted_override(result: ArcResult, trusted: Iterable[str], from_domain: str | None) -> str:
    """The override evidence when a passing chain vouches for the author domain, else "".

    Applies when the chain passes and an instance sealed by a trusted domain, whose message
    signature and all newer ones still validate (instance >= oldest-pass), recorded in its
    ARC-Authentication-Results dmarc=pass for header.from, or dkim=pass for header.d, aligned
    (relaxed) with the From domain.
    """
    wanted = {d.lower().rstrip(".") for d in trusted}
    if result.result != "pass" or not wanted or not from_domain:
        return ""
    first = max(result.oldest_pass or 1, 1)
    for instance in range(result.instances, first - 1, -1):
        if result.sealers[instance - 1] in wanted and _vouches(
            result.aar[instance - 1], from_domain
        ):
            return f"arc=pass {result.describe()}; trusted sealer {result.sealers[instance - 1]}"
    return ""


def _vouches(aar: str, from_domain: str) -> bool:
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(aar)
    except Exception:  # authres raises several kinds on sender-made text
        return False
    for res in parsed.results:
        props = {p.name: p.value for p in res.properties}
        domain = props.get({"dmarc": "from", "dkim": "d"}.get(res.method, ""), "")
        if res.result == "pass" and domain and dmarc_mod.aligned(domain, from_domain, "r"):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Sealing


@dataclass(frozen=True)
class SealParams:
    """Who seals: d=, s=, the RSA key, and whose Authentication-Results go into the AAR."""

    domain: str
    selector: str
    key: SigningKey
    #: None: the results of our own inbound pass (dkproxy in).
    authserv_id: str | None = None
    headers: tuple[str, ...] | None = None


def _fold_tags(tags: list[str], first: int) -> str:
    lines, current, width = [], "", first
    for tag in tags:
        if current and width + len(current) + 1 + len(tag) > 76:
            lines.append(current)
            current, width = tag, 8
        else:
            current = f"{current} {tag}" if current else tag
    lines.append(current)
    return "\r\n\t".join(lines)


def _signed_names(message: Message, wanted: tuple[str, ...] | None) -> list[bytes]:
    """h= for the AMS: the wanted fields present (DKIM-Signatures too, which a later hop must
    not drop unnoticed); never ARC-Seal or Authentication-Results (receivers change those)."""
    names = {n.encode() for n in wanted or (*DEFAULT_SIGNED_HEADERS, "dkim-signature")}
    names -= {SEAL, AMS, AAR, b"authentication-results"}
    chosen = [n for n in (h.rstrip(b" \t").lower() for h, _ in message.headers) if n in names]
    if b"from" not in chosen:
        raise ArcSealError("message has no From header field")
    return chosen


def _sign(key: SigningKey, digest: bytes) -> bytes:
    """The b= value: OpenSSL's RSA signature of the digest, base64, folded."""
    if not isinstance(key.private, rsa.RSAPrivateKey):
        raise ArcSealError(f"{key.path}: ARC needs an RSA key")
    signature = key.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    text = base64.b64encode(signature)
    return b"\r\n\t".join(text[i : i + _B64_FOLD] for i in range(0, len(text), _B64_FOLD))


def seal(
    message: Message,
    params: SealParams,
    results: str,
    cv: ArcValue,
    chain: Chain | ArcResult,
    now: int | None = None,
) -> list[bytes]:
    """The next ARC Set [ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results], each
    a CRLF-terminated field to put on top (RFC 8617 5.1). `results`: the Authentication-Results
    value to copy ("authserv-id; ..."); `chain`: `collect(message)`; `cv`: the chain's state.
    Raises ArcSealError when there is no room for another instance or nothing to seal."""
    previous = chain.sets if isinstance(chain, Chain) else []
    seen = len(previous) if isinstance(chain, Chain) else chain.instances
    if seen and cv == "none":
        cv = "fail"  # a chain is present but nobody vouched for it
    if not seen:
        cv = "none"
    instance = seen + 1
    if instance > MAX_INSTANCES:
        raise ArcSealError(f"the chain already has {seen} instances")
    timestamp = int(time.time()) if now is None else now
    results = re.sub(r"\s+", " ", results).strip().rstrip(";")
    if not results or re.search(r"[^\x20-\x7e\t]", results):
        raise ArcSealError("no usable Authentication-Results to seal")
    aar = f"ARC-Authentication-Results: i={instance}; {results}\r\n".encode("ascii")
    aar_field = (b"ARC-Authentication-Results", aar.split(b":", 1)[1])

    names = _signed_names(message, params.headers)
    bh = body_hash(message, relaxed=True)
    ams_tags = [
        f"i={instance};", "a=rsa-sha256;", "c=relaxed/relaxed;", f"d={params.domain};",
        f"s={params.selector};", f"t={timestamp};",
        "h=" + ":".join(n.decode("ascii") for n in names) + ";",
        f"bh={base64.b64encode(bh).decode('ascii')};",
    ]  # fmt: skip
    ams_unsigned = (" " + _fold_tags(ams_tags, 23) + "\r\n\tb=").encode("ascii")
    selected = select_headers(_RELAXED.canonicalize_headers(message.headers), names)
    digest = _digest(selected, _RELAXED, (b"ARC-Message-Signature", ams_unsigned))
    ams_value = ams_unsigned + _sign(params.key, digest) + b"\r\n"

    seal_tags = [
        f"i={instance};", "a=rsa-sha256;", f"cv={cv};", f"d={params.domain};",
        f"s={params.selector};", f"t={timestamp};",
    ]  # fmt: skip
    seal_unsigned = (" " + _fold_tags(seal_tags, 10) + "\r\n\tb=").encode("ascii")
    # A failed chain is not extended: the seal covers only its own set (RFC 8617 5.1.2).
    fields = _set_fields(message, previous) if cv == "pass" else []
    fields += [aar_field, (b"ARC-Message-Signature", ams_value), (b"ARC-Seal", seal_unsigned)]
    seal_value = seal_unsigned + _sign(params.key, seal_digest(fields)) + b"\r\n"
    return [b"ARC-Seal:" + seal_value, b"ARC-Message-Signature:" + ams_value, aar]


def results_of(message: Message, authserv_id: str) -> tuple[str, ArcValue | None] | None:
    """The topmost Authentication-Results of `authserv_id` (older ones are earlier passes'
    or forged) as (value, its arc= result: None if absent, fail if conflicting), or None."""
    wanted = authserv_id.strip().rstrip(".").lower()
    merged = None
    for name, value in message.headers:
        if name.rstrip(b" \t").lower() != b"authentication-results":
            continue
        text = re.sub(r"\r?\n(?=[ \t])", "", value.decode("utf-8", "replace")).strip()
        head, _, rest = text.partition(";")
        claimed = (head.split() or [""])[0]  # RFC 8601: authserv-id [version]
        if claimed.strip('"').rstrip(".").lower() == wanted:
            merged = rest.strip() or "none"
            break
    if merged is None:
        return None
    found = re.findall(r"(?:^|;)\s*arc\s*=\s*(pass|fail|none)\b", merged, re.IGNORECASE)
    verdicts: set[ArcValue] = {v.lower() for v in found}  # type: ignore[misc]
    # Conflicting verdicts on one chain: trust none of them.
    cv = verdicts.pop() if len(verdicts) == 1 else ("fail" if verdicts else None)
    return f"{authserv_id}; {merged}", cv


def seal_message(
    message: Message, params: SealParams, own: tuple[str, ArcValue] | None = None
) -> list[bytes]:
    """Seal with the results of `params.authserv_id`, or with `own` (results text, arc=
    verdict) from our inbound pass. Raises ArcSealError when sealing is not possible."""
    chain = collect(message)
    if own is None:
        found = results_of(message, params.authserv_id or "")
        if found is None:
            raise ArcSealError(f"no Authentication-Results from {params.authserv_id}")
        results, cv = found
    else:
        results, cv = own
    if isinstance(chain, ArcResult) and chain.result == "fail":
        cv = "fail"  # structurally broken, whatever an earlier pass said
    elif isinstance(chain, Chain) and cv is None:
        raise ArcSealError(f"Authentication-Results from {params.authserv_id} have no arc=")
    return seal(message, params, results, cv or "none", chain)


def load_seal_params(cfg: ArcSealConfig, min_rsa_bits: int = 1024) -> SealParams:
    """`[arc_seal]` with its key loaded; ConfigError naming the file when the key is unusable."""
    try:
        key = load_signing_key(cfg.key, min_rsa_bits)
    except KeyLoadError as exc:
        raise ConfigError.at(cfg.source, f"key file {exc}") from None
    if key.kind != "rsa":
        raise ConfigError.at(cfg.source, f"key: ARC needs an RSA key, {key.path} is not")
    headers = tuple(cfg.headers) if cfg.headers else None
    return SealParams(cfg.domain, cfg.selector, key, cfg.authserv_id, headers)
