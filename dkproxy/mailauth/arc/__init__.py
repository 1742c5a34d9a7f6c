"""ARC (RFC 8617): verifying the Authenticated Received Chain and sealing the next instance.

`chain` groups a message's ARC Sets and checks their structure (and holds the hashing both
sides share), `verify` checks the signatures with keys fetched through the caching resolver,
`seal` adds the next ARC Set. Callers use this package's names: `arc.collect`, `arc.verify`,
`arc.start_verify`, `arc.evaluate`, `arc.trusted_override`, `arc.seal_message`, ...
"""

from dkproxy.mailauth.arc.chain import (
    AAR,
    AMS,
    MAX_INSTANCES,
    MAX_SIGNED_FIELDS,
    SEAL,
    ArcResult,
    ArcValue,
    Chain,
    collect,
    instance_of,
    seal_digest,
)
from dkproxy.mailauth.arc.seal import (
    ArcSealError,
    SealParams,
    load_seal_params,
    results_of,
    seal,
    seal_message,
)
from dkproxy.mailauth.arc.verify import evaluate, start_verify, trusted_override, verify

__all__ = [
    "AAR",
    "AMS",
    "MAX_INSTANCES",
    "MAX_SIGNED_FIELDS",
    "SEAL",
    "ArcResult",
    "ArcSealError",
    "ArcValue",
    "Chain",
    "SealParams",
    "collect",
    "evaluate",
    "instance_of",
    "load_seal_params",
    "results_of",
    "seal",
    "seal_digest",
    "seal_message",
    "start_verify",
    "trusted_override",
    "verify",
]
