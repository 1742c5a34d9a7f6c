"""DomainKeys (RFC 4870): signing, canonicalization, signature parsing, verification with a key.

No maintained Python library speaks DomainKeys, and the verifier that matters in practice is
Perl's Mail::DKIM (DKIMproxy, SpamAssassin). Where RFC 4870 and Mail::DKIM disagree this module
follows Mail::DKIM 1.20230212, down to its quirks: which fields are hashed under h=, how bare CR
and LF in the body are dropped by nofws, and that it only reads an unfolded From/Sender field as
the signing identity.

There is no network I/O here: callers look up `<s>._domainkey.<d>` (key) and `_domainkey.<domain>`
(policy) themselves and pass the TXT text in, so the module serves the outbound signer and the
inbound verifier alike.

Input is a `Message` in CRLF wire form. Messages stored with LF line ends (qmail) must be turned
into CRLF by the caller first; a bare LF in the header block makes `sign` refuse the message.
"""

# The package is split by job (tags, canon, signer, verify); callers keep importing from here.
from .canon import canonical_hash_input, domain_matches, sender_identity
from .signer import sign
from .tags import (
    CANONICALIZATIONS,
    DEFAULT_SIGNED_HEADERS,
    FIELD_NAME,
    FOLD_COLUMN,
    DKSignature,
    DomainKeysError,
    _parse_tag_list,
    parse_signature,
    signature_positions,
)
from .verify import (
    KEY_CACHE_SIZE,
    DKPolicy,
    DKResult,
    Result,
    Status,
    _KeyProblem,
    _load_public_key,
    dns_error_result,
    parse_policy,
    policy_name,
    signature_error_result,
    unsigned_result,
    verify_with_key,
)

__all__ = [
    "CANONICALIZATIONS",
    "DEFAULT_SIGNED_HEADERS",
    "FIELD_NAME",
    "FOLD_COLUMN",
    "KEY_CACHE_SIZE",
    "DKPolicy",
    "DKResult",
    "DKSignature",
    "DomainKeysError",
    "Result",
    "Status",
    "_KeyProblem",
    "_load_public_key",
    "_parse_tag_list",
    "canonical_hash_input",
    "dns_error_result",
    "domain_matches",
    "parse_policy",
    "parse_signature",
    "policy_name",
    "sender_identity",
    "sign",
    "signature_error_result",
    "signature_positions",
    "unsigned_result",
    "verify_with_key",
]
