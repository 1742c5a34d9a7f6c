"""Checks of the explicit limits on what one client may make a worker do.

The listener enforces the limits that belong to the dialogue itself (command line length,
recipients, messages per session, sessions per worker, timeouts); the checks here look at
what was received. Each returns None when the input is within its limit, else the reply
that refuses it, with the reason for the log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dkproxy.smtp.spool import Spool
from dkproxy.util.buffer import Buffer

if TYPE_CHECKING:
    from dkproxy.smtp.settings import SessionSettings

log = logging.getLogger("dkproxy.session")

#: SIZE=<n> among the MAIL parameters (RFC 1870 section 3); the value is digits only.
_SIZE_PARAMETER = re.compile(r"(?:^|\s)SIZE=(\d{1,20})(?=\s|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Refusal:
    """A reply line we send ourselves, and why (for the log)."""

    reply: str
    reason: str


def declared_size(parameters: str) -> int | None:
    """The SIZE= value of a MAIL command's parameters (octets), or None when absent."""
    match = _SIZE_PARAMETER.search(parameters)
    return int(match.group(1)) if match else None


def check_declared_size(parameters: str, max_message_size: int) -> Refusal | None:
    """RFC 1870 section 6.1: a MAIL whose SIZE= exceeds the fixed limit gets 552 at once,
    before the client sends the message. `max_message_size` 0 means no limit."""
    size = declared_size(parameters)
    if not max_message_size or size is None or size <= max_message_size:
        return None
    return Refusal(
        "552 5.3.4 Error: message size exceeds fixed limit",
        f"declared SIZE={size} exceeds {max_message_size} bytes",
    )


def check_header(message: Buffer, max_size: int, max_fields: int) -> Refusal | None:
    """The header block of a received message (CRLF line ends) against the limits.

    `max_size`: octets of the header block, up to and including the CRLF of its last field;
    `max_fields`: header fields (a folded field counts once). Only the first max_size + 4
    octets are looked at, so a huge header costs no more than a legal one.
    """
    # Searched in place: a copy of the window would cost a copy of up to max_size octets
    # (1 MiB by default) of every large message, and touch all its spooled pages.
    window = max_size + 4
    end = 0 if message[:2] == b"\r\n" else message.find(b"\r\n\r\n", 0, window)
    if end < 0:
        if len(message) > max_size:
            return Refusal(
                "552 5.3.4 Error: message header size exceeds limit",
                f"header block exceeds {max_size} bytes",
            )
        end = min(len(message), window)
    else:
        end = end + 2 if end else 0
        if end > max_size:
            return Refusal(
                "552 5.3.4 Error: message header size exceeds limit",
                f"header block of {end} bytes exceeds {max_size}",
            )
    block = bytes(message[:end])
    fields = sum(1 for line in block.split(b"\r\n") if line and line[:1] not in b" \t")
    if fields > max_fields:
        return Refusal(
            "552 5.3.4 Error: too many header fields",
            f"{fields} header fields exceed {max_fields}",
        )
    return None


def check_received(
    spool: Spool | None, spool_error: OSError | None, settings: SessionSettings
) -> Refusal | None:
    """What refuses a message just received: a spool that could not keep it (disk full),
    or a header block over the limits. `spool` None: over max_message_size, which the
    proxy answers itself (552)."""
    if spool_error is not None:
        # Like Postfix's queue file write errors: temporary, the client retries later.
        log.warning("cannot spool a message: %s", spool_error)
        return Refusal(
            "452 4.3.1 Error: insufficient system storage", f"spool write failed: {spool_error}"
        )
    if spool is None:
        return None
    try:
        return check_header(spool.buffer(), settings.max_header_size, settings.max_header_fields)
    finally:
        spool.release()
