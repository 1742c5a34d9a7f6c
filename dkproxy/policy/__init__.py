"""Signing policy (processing layer): which signatures, with which keys, a message gets.

`signing` holds `SigningPolicy` (built once from the configuration, asked per message);
`rules` prepares each configured signature at start-up, `maps` reads DKIMproxy's sender_map
and listid_map files and makes the look-up keys, `macros` fills d= and i= safely.
"""

from dkproxy.policy.signing import Selection, SignatureKind, SignatureSpec, SigningPolicy

__all__ = ["Selection", "SignatureKind", "SignatureSpec", "SigningPolicy"]
