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
from dkim.util import InvalidTagValueList, parse_tag_value

from . import dkim_verify
from . import domainkeys as dk
from .addresses import canonical_domain_or_none
from .bodylength import uncovered_body
from .dnsresolver import TxtResult
from .message import Message
from .verify_report import Method, SignatureResult, SigValue, VerifySettings, _finish, _replace

log = logging.getLogger("dkproxy.verifier")

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
    return re.sub(rb"\s+", b"", value)[:8].decode("ascii", "replace") or None


def _tidy(exc: Exception) -> str:
    """dkimpy's message without Python bytes reprs (b'h' -> h), short enough for a header."""
    return re.sub(r"b'([^']*)'", r"\1", str(exc))[:200]


def _internal(exc: Exception) -> str:
    return f"internal error ({exc.__class__.__name__})"


def _dkim_base(index: int, tags: dict[bytes, bytes]) -> SignatureResult:
    d = _text(tags.get(b"d"))
    identity = _text(tags.get(b"i")) or (f"@{d}" if d else None)
    return SignatureResult(
        method="dkim",
        result="none",
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
        tags = parse_tag_value(value)
    except InvalidTagValueList as exc:
        base = SignatureResult("dkim", "permerror", index)
        return _finish(base, "permerror", f"malformed signature: {exc.__class__.__name__}")
    base = _dkim_base(index, tags)
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as exc:
        return _finish(base, "permerror", _tidy(exc))
    except Exception as exc:  # dkimpy raises IndexError on some i=/d= combinations
        return _finish(base, "permerror", f"invalid signature fields ({exc.__class__.__name__})")
    for name in (b"b", b"bh"):
        try:
            base64.b64decode(re.sub(rb"\s+", b"", tags[name]), validate=True)
        except (binascii.Error, ValueError):
            return _finish(base, "permerror", f"{name.decode()}= is not valid base64")
    signed = {h.strip().lower() for h in tags[b"h"].split(b":")}
    if b"from" not in signed:
        return _finish(base, "permerror", "From field not signed")
    try:
        CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        return _finish(base, "permerror", f"invalid c= value {exc}")
    try:
        domain = tags[b"d"].decode("ascii").rstrip(".")
        selector = tags[b"s"].decode("ascii")
    except UnicodeDecodeError:
        return _finish(base, "permerror", "non-ASCII d= or s=")
    if not domain or not selector:
        return _finish(base, "permerror", "empty d= or s=")
    return _Pending(
        "dkim",
        index,
        f"{selector}._domainkey.{domain}",
        base,
        dkim_tags=tags,
        dkim_position=position,
    )


def _prepare_dk(index: int, value: bytes) -> SignatureResult | _Pending:
    base = SignatureResult("domainkeys", "none", index, algorithm="rsa-sha1")
    try:
        sig = dk.parse_signature(value)
    except dk.DomainKeysError as exc:
        res = dk.signature_error_result(exc)
        tags = _loose_tags(value)
        return _replace(
            base,
            result=res.result,
            reason=res.detail,
            dk_status=res.status,
            domain=(tags.get("d") or "").lower() or None,
            selector=tags.get("s") or None,
            b_prefix=_b_prefix((tags.get("b") or "").encode()),
        )
    base = _replace(
        base,
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
        return _finish(base, "temperror", f"key lookup failed: {answer.detail}")
    if answer.status != "ok" or not answer.raw:
        return _finish(base, "permerror", f"no key for signature ({pending.key_name})")
    records, note = _key_records(answer, settings.max_key_records)
    outcomes = []
    for record in records:
        outcomes.append(_verify_dkim_record(message, pending, record, settings))
        if outcomes[-1].result == "pass":
            break
    best = _best(outcomes)
    return _replace(best, reason=best.reason + note) if note else best


def _check_key_tags(key: dict[bytes, bytes], sig: dict[bytes, bytes]) -> str | None:
    """RFC 6376 3.6.1 / 6.1.2 checks dkimpy leaves out; a reason if the key is unusable."""
    version = key.get(b"v")
    if version is not None and version != b"DKIM1":
        return "key record has unsupported version"
    p = key.get(b"p")
    if p is None:
        return "key record has no p= tag"
    if not re.sub(rb"\s+", b"", p):
        return "key revoked"
    ktype = key.get(b"k", b"rsa").lower()
    if ktype not in (b"rsa", b"ed25519"):
        return f"unsupported key type k={ktype.decode('ascii', 'replace')}"
    algorithm = sig[b"a"].lower()
    if not algorithm.startswith(ktype + b"-"):
        return "key type does not match signature algorithm"
    hashes = key.get(b"h")
    if hashes is not None:
        wanted = algorithm.split(b"-", 1)[1]
        if wanted not in {h.strip().lower() for h in hashes.split(b":")}:
            return f"key does not allow hash {wanted.decode('ascii', 'replace')}"
    services = key.get(b"s")
    if services is not None:
        names = {s.strip().lower() for s in services.split(b":")}
        if not names & {b"*", b"email"}:
            return "key is not for email"
    flags = {f.strip().lower() for f in key.get(b"t", b"").split(b":")}
    if b"s" in flags:
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
        return _finish(base, "permerror", "key record syntax error")
    key = parsed.tags
    problem = _check_key_tags(key, tags)
    if problem:
        return _finish(base, "permerror", problem)
    if parsed.error is not None:
        return _finish(base, "permerror", f"unusable key ({parsed.error})")
    bits = parsed.bits
    testing = b"y" in {f.strip().lower() for f in key.get(b"t", b"").split(b":")}
    base = _replace(base, key_bits=bits, testing=testing)
    try:
        valid = dkim_verify.verify(pending.hashes, pending.dkim_position, tags, parsed)
    except dkim.ValidationError as exc:
        text = _tidy(exc)
        if "body hash mismatch" in text:
            return _finish(base, "fail", "body hash mismatch")
        return _finish(base, "permerror", text)
    except dkim.DKIMException as exc:
        return _finish(base, "permerror", _tidy(exc))
    except Exception as exc:
        log.warning("DKIM verification failed on signature by %s: %r", base.domain, exc)
        return _finish(base, "permerror", f"verification error ({exc.__class__.__name__})")
    if not valid:
        return _finish(base, "fail", "signature did not verify")
    ktype = key.get(b"k", b"rsa").lower()
    if ktype == b"rsa" and bits is not None and bits < settings.min_key_bits:
        log.warning(
            "DKIM key %s is %d bits, below the minimum of %d: result policy",
            pending.key_name,
            bits,
            settings.min_key_bits,
        )
        return _finish(
            base, "policy", f"key too short ({bits} bits, {settings.min_key_bits} required)"
        )
    if tags[b"a"].lower() == b"rsa-sha1" and not settings.allow_sha1:
        return _finish(base, "policy", "rsa-sha1 signatures are not accepted (RFC 8301)")
    uncovered = uncovered_body(message.body_bytes(), tags)
    if uncovered is not None and not settings.allow_body_length:
        limit, length = uncovered
        return _replace(
            base,
            result="policy",
            reason=f"l={limit} leaves {length - limit} of {length} body bytes unsigned",
            body_length=uncovered,
        )
    return _finish(base, "pass", "good signature" + (" (key in testing mode)" if testing else ""))


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
        result = _from_dk(pending.base, dk.verify_with_key(message, pending.index, sig, text))
        bits = _rsa_bits(text)
        result = _replace(result, key_bits=bits)
        if result.result == "pass" and bits is not None and bits < settings.min_key_bits:
            log.warning(
                "DomainKeys key %s is %d bits, below the minimum of %d: result policy",
                sig.key_name,
                bits,
                settings.min_key_bits,
            )
            result = _finish(
                result, "policy", f"key too short ({bits} bits, {settings.min_key_bits} required)"
            )
        outcomes.append(result)
        if result.result == "pass":
            break
    best = _best(outcomes)
    return _replace(best, reason=best.reason + note) if note else best


def _from_dk(base: SignatureResult, res: dk.DKResult) -> SignatureResult:
    value: SigValue = res.result
    return _replace(
        base,
        result=value,
        reason=res.detail,
        identity=res.identity,
        identity_header=res.identity_header,
        testing=res.testing,
        dk_status=res.status,
    )
