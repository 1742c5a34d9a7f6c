"""ARC (RFC 8617 section 5.2) verification, split like the DKIM verifier so DNS never blocks
the event loop: `collect` (chain.py) checks the structure first; the keys are then looked up
concurrently through the shared caching resolver; `evaluate` checks the signatures. RSA is
OpenSSL's; each body canonicalization and each chain prefix is hashed once, which bounds the
work a hostile chain can cause. `trusted_override` is the DMARC local override of RFC 8617
section 7.2 for chains sealed by a trusted domain.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import authres
import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import select_headers
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from dkproxy.mailauth import dmarc as dmarc_mod
from dkproxy.mailauth.arc.chain import (
    AAR,
    AMS,
    MAX_SIGNED_FIELDS,
    RELAXED,
    SEAL,
    ArcResult,
    ArcSet,
    Chain,
    ascii_text,
    collect,
    failed_chain,
    header_digest,
    key_name,
    sealers_of,
    set_fields,
)
from dkproxy.mailauth.dkim_signer import body_hash
from dkproxy.mailauth.dnsresolver import Resolver, TxtResult
from dkproxy.mailauth.message import Message

log = logging.getLogger("dkproxy.arc")


class _Keys(dict[str, rsa.RSAPublicKey | str]):
    """Key name -> RSA public key from the fetched records (or why there is none), each
    parsed once per message."""

    def __init__(self, answers: Mapping[str, TxtResult], min_bits: int) -> None:
        super().__init__()
        self.answers = answers
        self.min_bits = min_bits

    def get_key(self, tags: Mapping[bytes, bytes]) -> rsa.RSAPublicKey | str:
        return self[key_name(tags)]

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


def _ams_valid(hashes: _Hashes, keys: _Keys, item: ArcSet) -> tuple[bool, str]:
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
    if not _signature_ok(key, tags, header_digest(selected, policy, (own[0], own[1]))):
        return False, f"{name} did not verify"
    return True, ""


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
        return failed_chain(sets, why)
    # Seal i covers sets 1..i: hash the common prefix once, so a long chain costs linear time.
    fields = set_fields(message, sets)
    canonical = RELAXED.canonicalize_headers(fields)
    prefix, digests = hashlib.sha256(), []
    for n in range(0, len(fields), 3):
        for name, value in canonical[n : n + 2]:
            prefix.update(name + b":" + value)
        digests.append(header_digest([], RELAXED, fields[n + 2], prefix))
        prefix.update(canonical[n + 2][0] + b":" + canonical[n + 2][1])
    for item in reversed(sets):
        key = keys.get_key(item.seal_tags)
        if isinstance(key, str):
            return failed_chain(sets, f"ARC-Seal i={item.instance}: {key}")
        if not _signature_ok(key, item.seal_tags, digests[item.instance - 1]):
            return failed_chain(sets, f"ARC-Seal i={item.instance} did not verify")
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
        sealers=sealers_of(sets),
        selectors=tuple(ascii_text(s.seal_tags[b"s"]) for s in sets),
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
