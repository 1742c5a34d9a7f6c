"""ARC sealing (RFC 8617 section 5.1): the next ARC Set on top of a message. The hashes are
computed as for verifying (chain.py) and the digest is signed with OpenSSL, as `dkim_signer`
does: dkimpy's `arc_sign` would do the RSA in pure Python.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import select_headers

from dkproxy.config import ArcSealConfig, ConfigError
from dkproxy.mailauth.arc.chain import (
    AAR,
    AMS,
    MAX_INSTANCES,
    RELAXED,
    SEAL,
    ArcResult,
    ArcValue,
    Chain,
    collect,
    header_digest,
    seal_digest,
    set_fields,
)
from dkproxy.mailauth.dkim_signer import DEFAULT_SIGNED_HEADERS, body_hash
from dkproxy.mailauth.keys import KeyLoadError, SigningKey, load_signing_key
from dkproxy.mailauth.message import Message

#: Width of the base64 lines of b= (folded with CRLF TAB).
_B64_FOLD = 72


class ArcSealError(Exception):
    """The message cannot be sealed as configured (the reason is the message)."""


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
    selected = select_headers(RELAXED.canonicalize_headers(message.headers), names)
    digest = header_digest(selected, RELAXED, (b"ARC-Message-Signature", ams_unsigned))
    ams_value = ams_unsigned + _sign(params.key, digest) + b"\r\n"

    seal_tags = [
        f"i={instance};", "a=rsa-sha256;", f"cv={cv};", f"d={params.domain};",
        f"s={params.selector};", f"t={timestamp};",
    ]  # fmt: skip
    seal_unsigned = (" " + _fold_tags(seal_tags, 10) + "\r\n\tb=").encode("ascii")
    # A failed chain is not extended: the seal covers only its own set (RFC 8617 5.1.2).
    fields = set_fields(message, previous) if cv == "pass" else []
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
