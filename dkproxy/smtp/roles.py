"""What the SMTP listener needs from the layers around it, as typing Protocols.

The listener (dkproxy.smtp.listener) speaks SMTP; the proxy logic above it (transaction
state, the processor, verdicts, the log line) and the worker process it runs in are given to
it through these interfaces, so data flows one way: session -> message -> signer/verifier ->
downstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dkproxy.smtp.downstream import Downstream, DownstreamPool, Reply
    from dkproxy.smtp.limits import Refusal
    from dkproxy.smtp.listener import Listener
    from dkproxy.smtp.settings import SessionSettings
    from dkproxy.smtp.spool import Spool


class Transaction(Protocol):
    """What the listener records about the current mail transaction (the proxy's Envelope)."""

    helo: str | None
    mail_from: str | None
    mail_line: bytes
    rcpt_to: list[str]
    xforward: dict[str, str]


class ProxyLogic(Protocol):
    """The proxy above the listener: transactions, the processor, verdicts, the log line."""

    def begin(self, peer: str, helo: str | None) -> Transaction: ...

    async def deliver(
        self, downstream: Downstream, tx: Transaction, spool: Spool | None, started: float
    ) -> Reply: ...

    def refuse_declared(self, refusal: Refusal) -> None: ...

    async def refuse(self, downstream: Downstream, tx: Transaction, refusal: Refusal) -> Reply: ...


class Worker(Protocol):
    """What a worker process shares with its sessions (see dkproxy.smtp.server)."""

    settings: SessionSettings
    logic: ProxyLogic
    pool: DownstreamPool

    def session_opened(self, listener: Listener) -> str | None:
        """None, or the reply that refuses the session (e.g. the access list)."""

    def session_closed(self, listener: Listener) -> None: ...

    def downstream_failed(self, kind: str) -> None: ...
