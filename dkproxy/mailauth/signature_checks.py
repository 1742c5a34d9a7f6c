"""Per-signature checks: offline preparation of DKIM-Signature / DomainKey-Signature fields
(RFC 6376 6.1.1, RFC 4870) and their verification against fetched key records (no network).
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import re
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList

from . import dkim_verify
from . import domainkeys as dk
from .addresses import canonical_domain_or_none
from .bodylength import uncovered_body
from .dkim_tags import parse_tag_list, validate_signature_fields
from .dnsresolver import TxtResult
from .message import Message
from .verify_report import (
    Method,
    SignatureResult,
    SigValue,
    VerifySettings,
    finish_result,
    replace_result,
)

log = logging.getLogger("dkproxy.verifier")

#: What `\s` matches in a bytes pattern (RFC 6376 FWS inside b= and bh=, unfolded or not):
#: bytes.translate drops them without a regular expression.
_WSP_BYTES = b" \t\n\r\x0b\x0c"
_BYTES_TIDY = re.compile(r"b'([^']*)'")

# --------------------------------------------------------------------------------------------
# Signature preparation (no network)


@dataclass
class _Pending:
    """A signature that passed the offline checks and now needs its key record(s)."""

    method: Method
    index: int
    key_name: str
    base: SignatureResult
    dkim_tags: dict[bytes, bytes] | None = None
    dkim_position: int = 0
    #: DKIM: b= and bh= decoded (once, by the offline checks).
    dkim_b: bytes = b""
    dkim_bh: bytes = b""
    dk_sig: dk.DKSignature | None = None
    #: Canonical header fields and body hashes shared by the message's DKIM signatures.
    hashes: dkim_verify.MessageHashes | None = None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace")


def _b_prefix(value: bytes | None) -> str | None:
    if not value:
        return None
    return value.translate(None, _WSP_BYTES)[:8].decode("ascii", "replace") or None


def _tidy(exc: Exception) -> str:
    """dkimpy's message without Python bytes reprs (b'h' -> h), short enough for a header."""
    return _BYTES_TIDY.sub(r"\1", str(exc))[:200]


def _internal(exc: Exception) -> str:
    return f"internal error ({exc.__class__.__name__})"


#: Templates the per-signature results are made from (`replace_result` is cheaper than __init__).
_BLANK_DKIM = SignatureResult("dkim", "none", 0)
_BLANK_DK = SignatureResult("domainkeys", "none", 0, algorithm="rsa-sha1")


def _dkim_base(index: int, tags: dict[bytes, bytes]) -> SignatureResult:
    d = _text(tags.get(b"d"))
    identity = _text(tags.get(b"i")) or (f"@{d}" if d else None)
    return replace_result(
        _BLANK_DKIM,
        header_index=index,
        domain=d.lower() if d else None,
        selector=_text(tags.get(b"s")),
        identity=identity,
        algorithm=_text(tags.get(b"a")),
        b_prefix=_b_prefix(tags.get(b"b")),
    )


def _prepare_dkim(index: int, value: bytes, position: int) -> SignatureResult | _Pending:
    """Offline checks of one DKIM-Signature (RFC 6376 6.1.1); a result if it fails them."""
    try:
        tags = parse_tag_list(value)
    except InvalidTagValueList as exc:
        base = SignatureResult("dkim", "permerror", index)
        return finish_result(base, "permerror", f"malformed signature: {exc.__class__.__name__}")
    base = _dkim_base(index, tags)
    try:
        validate_signature_fields(tags)
    except dkim.ValidationError as exc:
        return finish_result(base, "permerror", _tidy(exc))
    except Exception as exc:  # dkimpy raises IndexError on some i=/d= combinations
        return finish_result(
            base, "permerror", f"invalid signature fields ({exc.__class__.__name__})"
        )
    decoded = []
    for name in (b"b", b"bh"):
        try:
            decoded.append(base64.b64decode(tags[name].translate(None, _WSP_BYTES), validate=True))
        except (binascii.Error, ValueError):
            return finish_result(base, "permerror", f"{name.decode()}= is not valid base64")
    if not _signs_from(tags[b"h"]):
        return finish_result(base, "permerror", "From field not signed")
    problem = _c_value_problem(tags.get(b"c", b"simple/simple"))
    if problem:
        return finish_result(base, "permerror", problem)
    try:
        domain = tags[b"d"].decode("ascii").rstrip(".")
        selector = tags[b"s"].decode("ascii")
    except UnicodeDecodeError:
        return finish_result(base, "permerror", "non-ASCII d= or s=")
    if not domain or not selector:
        return finish_result(base, "permerror", "empty d= or s=")
    return _Pending(
        "dkim",
        index,
        f"{selector}._domainkey.{domain}",
        base,
        dkim_tags=tags,
        dkim_position=position,
        dkim_b=decoded[0],
        dkim_bh=decoded[1],
    )


@functools.lru_cache(maxsize=1024)  # a pure function of h=; signers reuse a few lists
def _signs_from(h_value: bytes) -> bool:
    """Whether an h= list names From (RFC 6376 5.4: it must)."""
    return b"from" in {h.strip().lower() for h in h_value.split(b":")}


@functools.lru_cache(maxsize=64)  # a pure function of c=; there are four valid values
def _c_value_problem(c_value: bytes) -> str:
    """Why c= is not a canonicalization dkimpy knows, or "" when it is one."""
    try:
        CanonicalizationPolicy.from_c_value(c_value)
    except InvalidCanonicalizationPolicyError as exc:
        return f"invalid c= value {exc}"
    return ""


def _prepare_dk(index: int, value: bytes) -> SignatureResult | _Pending:
    try:
        sig = dk.parse_signature(value)
    except dk.DomainKeysError as exc:
        res = dk.signature_error_result(exc)
        tags = _loose_tags(value)
        return SignatureResult(
            "domainkeys",
            res.result,
            index,
            domain=(tags.get("d") or "").lower() or None,
            selector=tags.get("s") or None,
            algorithm="rsa-sha1",
            b_prefix=_b_prefix((tags.get("b") or "").encode()),
            reason=res.detail,
            dk_status=res.status,
        )
    base = replace_result(
        _BLANK_DK,
        header_index=index,
        domain=sig.d,
        selector=sig.s,
        b_prefix=_b_prefix(sig.tags.get("b", "").encode("latin-1")),
    )
    return _Pending("domainkeys", index, sig.key_name, base, dk_sig=sig)


def _loose_tags(value: bytes) -> dict[str, str]:
    """Best-effort tag split for reporting signatures we will not (or cannot) verify."""
    tags: dict[str, str] = {}
    for part in value.decode("latin-1").split(";"):
        name, sep, val = part.partition("=")
        if sep:
            tags.setdefault(name.strip(), re.sub(r"\s+", "", val))
    return tags


def _unchecked(method: Method, index: int, value: bytes, limit: int) -> SignatureResult:
    tags = _loose_tags(value)
    d = (tags.get("d") or "").lower() or None
    return SignatureResult(
        method=method,
        result="policy",
        header_index=index,
        domain=d,
        selector=tags.get("s") or None,
        identity=(tags.get("i") or (f"@{d}" if d else None)) if method == "dkim" else None,
        algorithm=tags.get("a") or ("rsa-sha1" if method == "domainkeys" else None),
        b_prefix=_b_prefix((tags.get("b") or "").encode()),
        reason=f"not checked: more than {limit} signatures",
        checked=False,
    )


# --------------------------------------------------------------------------------------------
# Verification with key records (no network)


_RANK: dict[str, int] = {"pass": 0, "policy": 1, "fail": 2, "permerror": 3, "neutral": 4}


def _best(results: list[SignatureResult]) -> SignatureResult:
    if len(results) == 1:
        return results[0]  # one key record, the usual case
    return min(results, key=lambda r: _RANK.get(r.result, 9))


def _key_records(answer: TxtResult, limit: int) -> tuple[list[bytes], str]:
    note = ""
    records = list(answer.raw)
    if len(records) > 1:
        note = f" ({len(records)} TXT records at selector)"
    return records[:limit], note


def _verify_dkim(
    message: Message, pending: _Pending, answer: TxtResult, settings: VerifySettings
) -> SignatureResult:
    base = pending.base
    if answer.status == "temperror":
        return finish_result(base, "temperror", f"key lookup failed: {answer.detail}")
    if answer.status != "ok" or not answer.raw:
        return finish_result(base, "permerror", f"no key for signature ({pending.key_name})")
    records, note = _key_records(answer, settings.max_key_records)
    outcomes = []
    for record in records:
        outcomes.append(_verify_dkim_record(message, pending, record, settings))
        if outcomes[-1].result == "pass":
            break
    best = _best(outcomes)
    return replace_result(best, reason=best.reason + note) if note else best


def _check_key_tags(facts: dkim_verify.KeyFacts, sig: dict[bytes, bytes]) -> str | None:
    """RFC 6376 3.6.1 / 6.1.2 checks dkimpy leaves out; a reason if the key is unusable.

    The record-only checks were done once per record (`dkim_verify.key_facts`); here only
    what depends on the signature (a=, i=, d=) is looked at, in the same order as before.
    """
    if facts.problem:
        return facts.problem
    ktype = facts.ktype
    algorithm = sig[b"a"].lower()
    if not algorithm.startswith(ktype + b"-"):
        return "key type does not match signature algorithm"
    if facts.hashes is not None:
        wanted = algorithm.split(b"-", 1)[1]
        if wanted not in facts.hashes:
            return f"key does not allow hash {wanted.decode('ascii', 'replace')}"
    if facts.not_for_email:
        return "key is not for email"
    if facts.strict_identity:
        identity = sig.get(b"i", b"@" + sig[b"d"])
        if not _same_domain(identity.rpartition(b"@")[2], sig[b"d"]):
            return "key forbids subdomain identities (t=s)"
    return None


def _same_domain(a: bytes, b: bytes) -> bool:
    """Domain names from tags compared as A-labels (RFC 8616), e.g. i= against d=."""
    first, second = a.decode("utf-8", "replace"), b.decode("utf-8", "replace")
    return (canonical_domain_or_none(first) or first.lower()) == (
        canonical_domain_or_none(second) or second.lower()
    )


def _verify_dkim_record(
    message: Message, pending: _Pending, record: bytes, settings: VerifySettings
) -> SignatureResult:
    base = pending.base
    tags = pending.dkim_tags
    assert tags is not None and pending.hashes is not None
    # Parsed once per distinct record (dkim_verify's cache), not once per message.
    parsed = dkim_verify.key_for(pending.key_name, record)
    if parsed.tags is None:
        return finish_result(base, "permerror", "key record syntax error")
    facts = parsed.facts
    assert facts is not None
    problem = _check_key_tags(facts, tags)
    if problem:
        return finish_result(base, "permerror", problem)
    if parsed.error is not None:
        return finish_result(base, "permerror", f"unusable key ({parsed.error})")
    bits = parsed.bits
    testing = facts.testing

    def verdict(result: SigValue, reason: str, **more: object) -> SignatureResult:
        # One new result per signature, not one per step: the key's facts go in with it.
        return replace_result(
            base, result=result, reason=reason, key_bits=bits, testing=testing, **more
        )

    try:
        valid = dkim_verify.verify(
            pending.hashes,
            pending.dkim_position,
            tags,
            parsed,
            decoded=(pending.dkim_b, pending.dkim_bh),
        )
    except dkim.ValidationError as exc:
        text = _tidy(exc)
        if "body hash mismatch" in text:
            return verdict("fail", "body hash mismatch")
        return verdict("permerror", text)
    except dkim.DKIMException as exc:
        return verdict("permerror", _tidy(exc))
    except Exception as exc:
        log.warning("DKIM verification failed on signature by %s: %r", base.domain, exc)
        return verdict("permerror", f"verification error ({exc.__class__.__name__})")
    if not valid:
        return verdict("fail", "signature did not verify")
    if facts.ktype == b"rsa" and bits is not None and bits < settings.min_key_bits:
        log.warning(
            "DKIM key %s is %d bits, below the minimum of %d: result policy",
            pending.key_name,
            bits,
            settings.min_key_bits,
        )
        return verdict("policy", f"key too short ({bits} bits, {settings.min_key_bits} required)")
    if tags[b"a"].lower() == b"rsa-sha1" and not settings.allow_sha1:
        return verdict("policy", "rsa-sha1 signatures are not accepted (RFC 8301)")
    uncovered = uncovered_body(message.body_bytes(), tags)
    if uncovered is not None and not settings.allow_body_length:
        limit, length = uncovered
        return verdict(
            "policy",
            f"l={limit} leaves {length - limit} of {length} body bytes unsigned",
            body_length=uncovered,
        )
    return verdict("pass", "good signature" + (" (key in testing mode)" if testing else ""))


@functools.lru_cache(maxsize=1024)  # once per distinct record, not per message
def _rsa_bits(record: str) -> int | None:
    """Size of the RSA key in a key record, or None when it cannot be read."""
    match = re.search(r"(?:^|;)\s*p\s*=\s*([A-Za-z0-9+/=\s]+)", record)
    if not match:
        return None
    data = re.sub(r"\s+", "", match.group(1))
    try:
        public = serialization.load_der_public_key(base64.b64decode(data + "=" * (-len(data) % 4)))
    except Exception:
        return None
    return public.key_size if isinstance(public, rsa.RSAPublicKey) else None


def _verify_dk(
    message: Message, pending: _Pending, answer: TxtResult, settings: VerifySettings
) -> SignatureResult:
    sig = pending.dk_sig
    assert sig is not None
    if answer.status == "temperror":
        res = dk.dns_error_result(sig, answer.detail)
        return _from_dk(pending.base, res)
    if answer.status != "ok" or not answer.raw:
        return _from_dk(pending.base, dk.verify_with_key(message, pending.index, sig, None))
    records, note = _key_records(answer, settings.max_key_records)
    outcomes = []
    for raw in records:
        text = raw.decode("utf-8", "replace")
        bits = _rsa_bits(text)
        res = dk.verify_with_key(message, pending.index, sig, text)
        result = _from_dk(pending.base, res, key_bits=bits)
        if result.result == "pass" and bits is not None and bits < settings.min_key_bits:
            log.warning(
                "DomainKeys key %s is %d bits, below the minimum of %d: result policy",
                sig.key_name,
                bits,
                settings.min_key_bits,
            )
            result = finish_result(
                result, "policy", f"key too short ({bits} bits, {settings.min_key_bits} required)"
            )
        outcomes.append(result)
        if result.result == "pass":
            break
    best = _best(outcomes)
    return replace_result(best, reason=best.reason + note) if note else best


def _from_dk(base: SignatureResult, res: dk.DKResult, **more: object) -> SignatureResult:
    value: SigValue = res.result
    return replace_result(
        base,
        result=value,
        reason=res.detail,
        identity=res.identity,
        identity_header=res.identity_header,
        testing=res.testing,
        dk_status=res.status,
        **more,
    )
