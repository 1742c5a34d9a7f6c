"""The proxy above the SMTP layer: the transaction's envelope, the processor, the verdict,
the log line.

The listener (dkproxy.smtp.listener) relays MAIL, RCPT and the end of DATA to the downstream
and passes its replies back; this module decides what happens to a received message: the
processor (signer or verifier) turns it into header fields or a refusal, and the message is
relayed with those fields, or refused before the downstream has accepted anything (signing
error with reject_error, a verification policy, a message over the size limit). When the
downstream cannot be reached or fails, the listener gives the upstream a 4xx, so its queue
keeps the mail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from dkproxy import metrics
from dkproxy.smtp.downstream import Downstream, DownstreamError, Part, Reply, local_reply
from dkproxy.smtp.limits import Refusal
from dkproxy.smtp.spool import Spool
from dkproxy.util.buffer import Buffer

log = logging.getLogger("dkproxy.session")


@dataclass
class Envelope:
    """What the SMTP dialogue says about one message, for processors and the log line."""

    peer: str
    helo: str | None = None
    mail_from: str | None = None
    mail_line: bytes = b""
    rcpt_to: list[str] = field(default_factory=list)
    xforward: dict[str, str] = field(default_factory=dict)

    @property
    def client_address(self) -> str:
        """The original client: XFORWARD ADDR when an MTA in front told us, else our peer."""
        addr = self.xforward.get("ADDR", "")
        if addr and addr.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            return addr[5:] if addr.upper().startswith("IPV6:") else addr
        return self.peer

    @property
    def client_helo(self) -> str | None:
        helo = self.xforward.get("HELO", "")
        return helo if helo and not helo.startswith("[") else self.helo


@dataclass
class Outcome:
    """What a processor decided: the header fields to add, or a reply that refuses the mail."""

    prepend: list[bytes] = field(default_factory=list)
    reject: Reply | None = None
    summary: str = ""
    #: (start, end) byte ranges of header fields to drop (forged Authentication-Results).
    remove_ranges: list[tuple[int, int]] = field(default_factory=list)


#: A processor turns (message bytes, envelope) into an Outcome: the signer or the verifier.
Processor = Callable[[Buffer, Envelope], Awaitable[Outcome]]
#: The message sent downstream, as parts in order, from the spooled message and the outcome.
Assembler = Callable[[Spool, Outcome], Sequence[Part]]


class Proxy:
    """The proxy logic the listener calls: one per worker, shared by its sessions."""

    def __init__(self, processor: Processor, assembler: Assembler, max_message_size: int) -> None:
        #: Replaced on reload; a session in progress keeps the one it started DATA with.
        self.processor = processor
        self.assembler = assembler
        self.max_message_size = max_message_size

    def begin(self, peer: str, helo: str | None) -> Envelope:
        """A new transaction for a session whose client is `peer` (after HELO `helo`)."""
        return Envelope(peer=peer, helo=helo)

    async def deliver(
        self, downstream: Downstream, envelope: Envelope, spool: Spool | None, started: float
    ) -> Reply:
        """Process the received message and relay it, or refuse it; the reply for the client.

        `spool` is None when the message exceeded the size limit. DownstreamError when the
        downstream fails (logged here, answered with 421 by the listener).
        """
        if spool is None:
            await self._abort(downstream)
            log.info("from=<%s> rejected: message exceeds %d bytes",
                     envelope.mail_from, self.max_message_size)  # fmt: skip
            metrics.message_done(None, 552, time.monotonic() - started)
            return local_reply(552, "5.3.4 Error: message too big")
        metrics.message_received(len(spool))
        try:
            outcome = await self.processor(spool.buffer(), envelope)
        except Exception:
            log.exception("from=<%s> processing failed", envelope.mail_from)
            outcome = Outcome(reject=local_reply(451, "4.3.0 Error: internal processing error"),
                              summary="processing failed")  # fmt: skip
        finally:
            spool.release()
        if outcome.reject is not None:
            await self._abort(downstream)
            self._log_message(envelope, outcome, outcome.reject, started)
            return outcome.reject
        try:
            reply = await downstream.send_message(self.assembler(spool, outcome))
        except DownstreamError as exc:
            self._log_message(envelope, outcome, local_reply(421, f"downstream failed: {exc}"),
                              started)  # fmt: skip
            raise
        self._log_message(envelope, outcome, reply, started)
        return reply

    def refuse_declared(self, refusal: Refusal) -> None:
        """A MAIL refused at once for its declared SIZE (RFC 1870 6.1): one message refused."""
        code, _, _text = refusal.reply.partition(" ")
        metrics.message_done(None, int(code), 0.0)

    async def refuse(self, downstream: Downstream, envelope: Envelope, refusal: Refusal) -> Reply:
        """Refuse the received message ourselves (a limit, the spool): the downstream's
        MAIL/RCPT are undone and the client gets `refusal.reply` (the caller logs why)."""
        await self._abort(downstream)
        code, _, text = refusal.reply.partition(" ")
        metrics.message_done(None, int(code), 0.0)
        return local_reply(int(code), text)

    async def _abort(self, downstream: Downstream) -> None:
        """Undo MAIL/RCPT downstream after refusing a message ourselves."""
        reply = await downstream.command(b"RSET")
        if reply.code != 250:
            raise DownstreamError(f"RSET refused by downstream: {reply}")

    def _log_message(
        self, envelope: Envelope, outcome: Outcome, reply: Reply, started: float
    ) -> None:
        elapsed_ms = (time.monotonic() - started) * 1000
        metrics.message_done(outcome, reply, elapsed_ms / 1000)
        log.info(
            "client=%s from=<%s> rcpts=%d %s relay=%r time=%.1fms",
            envelope.client_address, envelope.mail_from, len(envelope.rcpt_to),
            outcome.summary, str(reply), elapsed_ms,
        )  # fmt: skip
