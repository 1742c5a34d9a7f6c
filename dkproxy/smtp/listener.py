"""The upstream side: an `aiosmtpd.smtp.SMTP` subclass, one instance per connection.

aiosmtpd keeps the command loop, timeouts, STARTTLS, AUTH and the PROXY protocol. This
subclass replaces the commands whose stock behaviour a transparent proxy cannot accept:
stock MAIL upper-cases parameter values (ENVID and ORCPT are case-sensitive xtext) and stock
RCPT answers 555 to NOTIFY/ORCPT, while here MAIL, RCPT, RSET, XFORWARD and EHLO/HELO go to
the downstream verbatim and the downstream's own reply comes back; DATA streams into a
`Spool` instead of a list of lines. Every reply that commits mail is the downstream's.

Command arguments are decoded by aiosmtpd as UTF-8 with surrogateescape
(`enable_SMTPUTF8=True`), so `arg.encode("utf-8", "surrogateescape")` gives back the octets
the client sent: an argument is carried downstream as sent, or refused with 501 when it holds
a control octet (which no SMTP argument may, and which would inject a command).

Non-public aiosmtpd interfaces relied on (aiosmtpd 1.4.6, pinned <1.5 in pyproject.toml):
`SMTP._handle_client` (wrapped: the downstream is opened before the greeting and released
after the session), `SMTP._smtp_methods` (its verb table, given a fallback for unknown
verbs), `SMTP._reader` / `SMTP._writer` and the reader's `_buffer` (to know whether pipelined
commands are waiting; data_in puts back there what follows the end of DATA),
`SMTP._reset_timeout()` (the idle timer, re-armed while DATA flows),
`SMTP._handler_coroutine` (cancelled to end a session, as aiosmtpd's QUIT does),
`SMTP._tls_protocol`, `SMTP._auth_require_tls` and `SMTP._auth_methods` (EHLO offers
STARTTLS and AUTH as the stock EHLO does), and that `SMTP.__init__` finds commands and AUTH
mechanisms through `dir(self)` (`Listener.__dir__` narrows that scan to AUTH mechanisms; the
verb table is ours).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr, TypeVar

from aiosmtpd.smtp import SMTP

from dkproxy.smtp.aiosmtpd_glue import COMMANDS, NO_HOOKS, SCANNED_NAMES, SameLimit, Verbs
from dkproxy.smtp.data_in import SCAN_CHUNK, ClientGone, receive_message
from dkproxy.smtp.downstream import CONTROL_OCTETS, Downstream, DownstreamError, Reply
from dkproxy.smtp.limits import check_declared_size, check_received
from dkproxy.smtp.roles import ProxyLogic, Transaction, Worker
from dkproxy.smtp.spool import Spool

__all__ = ["MAIL_FROM_PATH", "Listener", "ProxyLogic", "Transaction", "Worker", "path_address"]

log = logging.getLogger("dkproxy.session")
T = TypeVar("T")

MAIL_FROM_PATH = re.compile(r"FROM:\s*(<[^>]*>|[^\s<>]*)(.*)$", re.IGNORECASE | re.DOTALL)
RCPT_TO_PATH = re.compile(r"TO:\s*(<[^>]*>|[^\s<>]+)(.*)$", re.IGNORECASE | re.DOTALL)
#: Extensions passed upstream when the downstream has them; everything else is withheld.
RELAYED_EXTENSIONS = ("8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES", "XFORWARD")


def path_address(token: str) -> str:
    """The address of a MAIL/RCPT path, without angle brackets."""
    text = token.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def _octets(arg: str | None) -> bytes:
    return arg.encode("utf-8", "surrogateescape") if arg else b""


def _has_control(octets: bytes) -> bool:
    return not CONTROL_OCTETS.isdisjoint(octets)


class Listener(SMTP):
    """Serves one upstream connection, relaying to its own downstream session."""

    def __init__(self, worker: Worker, **aiosmtpd_options: Any) -> None:
        settings = worker.settings
        # The stream's limit is also its flow-control mark; command lines are held to
        # max_command_line by command_size_limit below.
        self.line_length_limit = max(settings.max_command_line + 2, SCAN_CHUNK)
        self.command_size_limit = settings.max_command_line
        self.command_size_limits = SameLimit(settings.max_command_line)
        options = {**settings.listener_options, **aiosmtpd_options}
        self._auth_offered = bool(options.get("authenticator") or options.get("auth_callback"))
        super().__init__(
            NO_HOOKS,  # the proxy logic is called directly, not through handle_* hooks
            hostname=settings.hostname,
            ident=settings.ident,
            data_size_limit=settings.max_message_size or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=settings.command_timeout,
            loop=asyncio.get_running_loop(),  # (aiosmtpd's own look-up costs more)
            **options,
        )
        self._verbs = Verbs(self, self._commands(), self._unknown_verb)
        self._smtp_methods = self._verbs
        self.worker = worker
        self.settings = settings
        self.logic = worker.logic
        self.peer = "unknown"
        self.downstream: Downstream | None = None
        #: The downstream session came from the pool and has not answered yet.
        self._untested = False
        #: The downstream said 421 or failed: never pool it.
        self._spent = False
        self._extended = False
        self.helo: str | None = None
        self.tx: Transaction = self.logic.begin(self.peer, None)
        self._errors = 0
        #: Transactions that reached the end of DATA (max_messages_per_session).
        self._messages = 0
        #: Why the spool could not keep the message being received (disk full...).
        self._spool_error: OSError | None = None
        self._replies: list[bytes] = []
        self._unyielded = 0

    def __dir__(self) -> list[str]:
        """Only the names aiosmtpd scans in every new instance that it must see: the auth_*
        mechanisms. Its smtp_* scan binds every command of every connection; `Verbs` binds
        a command on its first use instead (`_commands`)."""
        names = SCANNED_NAMES.get(type(self))
        if names is None:
            names = [n for n in super().__dir__() if n.startswith("auth_")]
            SCANNED_NAMES[type(self)] = names
        return list(names)

    @classmethod
    def _commands(cls) -> dict[str, Callable[..., Awaitable[None]]]:
        """verb -> smtp_<VERB> function of this class, found once per class (VRFY, EXPN and
        HELP, aiosmtpd's, are left to the verb fallback)."""
        commands = COMMANDS.get(cls)
        if commands is None:
            stock = {"smtp_VRFY", "smtp_EXPN", "smtp_HELP"}
            names = [n for n in dir(cls) if n.startswith("smtp_") and n not in stock]
            commands = COMMANDS[cls] = {name[5:]: getattr(cls, name) for name in names}
        return commands

    # -- session ---------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session is not None else None
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        self.tx = self.logic.begin(self.peer, None)
        refusal = self.worker.session_opened(self)
        try:
            if refusal is not None:
                await self._close_with(refusal)
            elif await self._open_downstream():
                await super()._handle_client()
        except ConnectionError as exc:  # aiosmtpd re-raises a reset after closing
            log.debug("client=%s gone: %s", self.peer, exc)
        finally:
            self._release_downstream()
            self.worker.session_closed(self)

    async def _open_downstream(self) -> bool:
        """Take a pooled downstream session or open one; if neither works, tell the client
        to come back later (4xx) and end the session."""
        pool = self.worker.pool
        pooled = pool.take()
        if pooled is not None:
            self.downstream, self._untested = pooled, True
            return True
        host = self.settings.hostname
        try:
            self.downstream, greeting = await pool.open()
        except DownstreamError as exc:
            self.worker.downstream_failed(exc.kind)
            log.warning("client=%s downstream unavailable: %s", self.peer, exc)
            await self._close_with(f"421 4.4.1 {host} downstream unavailable, try again later")
            return False
        if greeting.code != 220:
            # The downstream refuses sessions (e.g. overloaded): say so with a temporary code.
            self._spent = True
            self.worker.downstream_failed("refused")
            code = 421 if greeting.code < 500 else 554
            await self._close_with(f"{code} {host} downstream said: {greeting}")
            return False
        return True

    def _release_downstream(self) -> None:
        """Pool the downstream session if it is between transactions, else end it."""
        downstream, self.downstream = self.downstream, None
        if downstream is not None:
            clean = self.tx.mail_from is None and not self._spent
            self.worker.pool.give_back(downstream, clean)

    async def _close_with(self, status: str) -> None:
        self._replies.append(status.encode("utf-8", "surrogateescape") + b"\r\n")
        self._flush()
        self._hang_up()

    async def _downstream_failed(self, exc: DownstreamError) -> None:
        """The downstream is gone: tell the client to try later and end the session."""
        self._spent = True
        self.worker.downstream_failed(exc.kind)
        log.warning("client=%s downstream failure: %s", self.peer, exc)
        host = self.settings.hostname
        await self._close_with(f"421 4.4.2 {host} downstream failed, try again later")

    def _timeout_cb(self) -> None:
        """No command (command_timeout) or no data (data_timeout) for too long: say so with
        421, as Postfix does, before aiosmtpd closes the connection."""
        log.info("client=%s timeout; closing the session", self.peer)
        self._spent = True  # a transaction may be open downstream: never pool it
        if self.transport is not None and not self.transport.is_closing():
            host = self.settings.hostname
            self.transport.write(f"421 4.4.2 {host} Error: timeout exceeded\r\n".encode())
        super()._timeout_cb()

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's command loop failed: a client gone mid-command ends the session; a bug
        of ours is logged and answered with 421, which ends it too (never a traceback to the
        client, never a half-done transaction).

        The loop calls this and goes round again. A reader at EOF makes `readuntil()` raise
        again at once, without waiting: if nothing here waited either, the loop would never
        give control back to the event loop, so the cancellation that ends the session,
        connection_lost and the signal handlers would never run (a worker was found at 100%
        CPU, deaf to SIGTERM, after aiosmtpd's cancellation on EOF had been lost). So a
        client that is gone is hung up on here and the cancellation awaited: the session
        ends in this call, whatever state the reader is in.
        """
        self._spent = True  # a transaction may be open downstream: never pool it
        if isinstance(error, asyncio.IncompleteReadError | ConnectionError) or (
            self._reader.at_eof()
        ):
            log.debug("client=%s gone: %r", self.peer, error)
            self._hang_up()
            await asyncio.sleep(0)  # _hang_up cancelled this task: the cancellation lands here
            raise asyncio.CancelledError  # the cancellation did not land: end the loop anyway
        log.exception("client=%s internal error; closing the session", self.peer)
        return "421 4.3.0 internal error, try again later"

    # -- replies ---------------------------------------------------------------------------

    def _input_waiting(self) -> bool:
        """A complete command line has been received and not yet served (pipelining)."""
        return b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    def _flush(self) -> None:
        if self._replies:
            data = b"".join(self._replies)
            self._replies.clear()
            if self.settings.debugtrace:
                log.info("client=%s < %r", self.peer, data)
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(data)

    async def push(self, status: AnyStr | None) -> None:
        """Queue one reply; replies to pipelined commands go out in one write (RFC 2920, as
        Postfix does), and after `fairness_batch` of them the session lets the others run."""
        if status is None:
            return  # aiosmtpd's command loop after handle_exception ended the session
        data = status if isinstance(status, bytes) else status.encode("utf-8", "surrogateescape")
        if data[:1] == b"5":
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                await self._close_with("421 4.7.0 Error: too many errors")
                return
        await self.send(data + b"\r\n")

    async def send(self, data: bytes) -> None:
        """Queue wire-ready reply lines (CRLF included) and flush them when due."""
        if self._verbs.closed:
            return
        self._replies.append(data)
        closing = data[:3] in (b"221", b"421")
        if not closing and self._input_waiting():
            self._unyielded += 1
            if self._unyielded < self.settings.fairness_batch:
                return
            self._flush()
            self._unyielded = 0
            await asyncio.sleep(0)  # fairness: a pipelining client must not starve others
            return
        self._unyielded = 0
        self._flush()
        if closing:
            self._hang_up()  # nothing the client pipelined after QUIT or a 421 is served
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            log.debug("client=%s gone", self.peer)
            self._hang_up()
        elif transport.get_write_buffer_size() > SCAN_CHUNK:  # type: ignore[attr-defined]
            # A client that does not read its replies is waited for, not buffered for.
            try:
                await self._writer.drain()
            except ConnectionError:
                log.debug("client=%s gone", self.peer)
                self._hang_up()

    async def send_reply(self, reply: Reply) -> None:
        """A downstream reply, passed upstream line by line as it came."""
        await self.send(reply.render())
        if reply.code == 421:
            self._spent = True

    # -- downstream calls --------------------------------------------------------------------

    async def _relay(self, call: Callable[[Downstream], Awaitable[T]]) -> T | None:
        """Run a downstream call; None after telling the client the downstream failed.

        A pooled session that turns out dead on its first use is replaced by a fresh one
        (nothing was committed on it), so pooling never costs mail.
        """
        try:
            return await self._call(call)
        except DownstreamError as exc:
            await self._downstream_failed(exc)
            return None

    async def _call(self, call: Callable[[Downstream], Awaitable[T]]) -> T:
        assert self.downstream is not None
        if not self._untested:
            return await call(self.downstream)
        self._untested = False
        try:
            return await call(self.downstream)
        except DownstreamError as exc:
            log.debug("client=%s pooled downstream session unusable (%s); reconnecting",
                      self.peer, exc)  # fmt: skip
        pool = self.worker.pool
        pool.give_back(self.downstream, False)
        self.downstream = None
        self.downstream, greeting = await pool.open()
        if greeting.code != 220:
            raise DownstreamError(f"downstream refused a new session: {greeting}", "refused")
        if self.helo is not None:
            name = self.helo.encode("utf-8", "surrogateescape")
            hello = self.downstream.ehlo if self._extended else self.downstream.helo
            reply = await hello(name)
            if reply.code != 250:
                raise DownstreamError(f"downstream refused {self.helo!r}: {reply}", "refused")
        return await call(self.downstream)

    def reset_transaction(self) -> None:
        """A new transaction; XFORWARD attributes end with the old one, as in Postfix's smtpd
        (its client sends them again before each MAIL)."""
        self.tx = self.logic.begin(self.peer, self.helo)

    # -- commands ------------------------------------------------------------------------------

    async def _unknown_verb(self, verb: str, arg: str | None) -> None:
        """Verbs without an smtp_* method: rare ones are answered here rather than as
        methods, since aiosmtpd binds every smtp_* method anew for each connection."""
        if verb in ("VRFY", "EXPN"):
            await self.send(b"502 5.5.1 VRFY command is disabled\r\n")
        elif verb == "HELP":
            await self.send(b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT\r\n")
        elif verb in ("BDAT", "ETRN", "TURN"):
            await self._not_implemented(arg)
        else:
            await self.push("500 5.5.2 Error: command not recognized")

    async def _not_implemented(self, arg: str | None) -> None:
        await self.push("502 5.5.1 Error: command not implemented")

    async def smtp_EHLO(self, arg: str | None) -> None:
        name = _octets(arg)
        if not name or _has_control(name):
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        reply = await self._relay(lambda downstream: downstream.ehlo(name))
        if reply is None:
            return
        if reply.code != 250:
            await self.send_reply(reply)
            return
        assert self.downstream is not None and self.session is not None and arg
        self._hello(arg, extended=True)
        lines = [self.settings.hostname, "PIPELINING"]
        size_limit = self._size_limit()
        lines.append(f"SIZE {size_limit}" if size_limit else "SIZE")
        for ext in RELAYED_EXTENSIONS:
            if ext == "XFORWARD" and not self._xforward_permitted():
                continue  # as Postfix: offered only to smtpd_authorized_xforward_hosts
            if self.downstream.supports(ext):
                lines.append(f"{ext} {self.downstream.extensions[ext]}".rstrip())
        if self.tls_context and not self._tls_protocol:
            lines.append("STARTTLS")
        if self._auth_offered and (not self._auth_require_tls or self._tls_protocol):
            lines.append("AUTH " + " ".join(sorted(self._auth_methods)))
        await self.send_reply(Reply(250, tuple(lines)))

    def _hello(self, arg: str, extended: bool) -> None:
        assert self.session is not None
        self.session.host_name = arg
        self.session.extended_smtp = extended
        self._extended = extended
        self.helo = _octets(arg).decode("utf-8", "replace")
        self.reset_transaction()

    def _size_limit(self) -> int:
        """Offer the smaller of our limit and the downstream's SIZE (0 means no limit)."""
        assert self.downstream is not None
        ours = self.settings.max_message_size
        theirs_text = self.downstream.extensions.get("SIZE", "")
        theirs = int(theirs_text) if theirs_text.isdigit() else 0
        limits = [value for value in (ours, theirs) if value > 0]
        return min(limits) if limits else 0

    async def smtp_HELO(self, arg: str | None) -> None:
        name = _octets(arg)
        if not name or _has_control(name):
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        reply = await self._relay(lambda downstream: downstream.helo(name))
        if reply is None:
            return
        if reply.code == 250 and arg:
            self._hello(arg, extended=False)
        await self.send_reply(reply)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_auth_needed("MAIL"):
            return
        if self.tx.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if self._messages >= self.settings.max_messages_per_session:
            log.info("client=%s sent %d messages in one session; closing it", self.peer,
                     self._messages)  # fmt: skip
            host = self.settings.hostname
            await self._close_with(f"421 4.7.0 {host} Error: too many messages in one session")
            return
        match = MAIL_FROM_PATH.match(arg or "")
        line = b"MAIL " + _octets(arg)
        if match is None or _has_control(line):
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        if match.group(2).strip() and not self._extended:
            await self.push("501 5.5.4 Error: MAIL parameters need EHLO")
            return
        too_big = check_declared_size(match.group(2), self.settings.max_message_size)
        if too_big is not None:
            log.info("client=%s MAIL refused: %s", self.peer, too_big.reason)
            self.logic.refuse_declared(too_big)
            await self.push(too_big.reply)
            return
        reply = await self._relay(lambda downstream: downstream.command(line))
        if reply is None:
            return
        if reply.code == 250:
            self.tx.mail_from = path_address(match.group(1))
            self.tx.mail_line = line
            self.tx.helo = self.helo
        await self.send_reply(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_auth_needed("RCPT"):
            return
        if self.tx.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if len(self.tx.rcpt_to) >= self.settings.max_recipients:
            # RFC 5321 4.5.3.1.8: a temporary 452, so the client sends the rest later.
            await self.send(b"452 4.5.3 Error: too many recipients\r\n")
            return
        match = RCPT_TO_PATH.match(arg or "")
        line = b"RCPT " + _octets(arg)
        if match is None or _has_control(line):
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        reply = await self._relay(lambda downstream: downstream.command(line))
        if reply is None:
            return
        if reply.code in (250, 251):
            self.tx.rcpt_to.append(path_address(match.group(1)))
        await self.send_reply(reply)

    async def smtp_RSET(self, arg: str | None) -> None:
        self.reset_transaction()
        reply = await self._relay(lambda downstream: downstream.command(b"RSET"))
        if reply is not None:
            await self.send_reply(reply)

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.send(b"250 2.0.0 Ok\r\n")

    async def smtp_QUIT(self, arg: str | None) -> None:
        # The downstream session goes back to the pool when _handle_client ends.
        await self.send(b"221 2.0.0 Bye\r\n")

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """XFORWARD (Postfix XFORWARD_README): passed on verbatim when the downstream offers
        it; the attributes are kept for the verifier and the log line."""
        assert self.downstream is not None
        if not self._xforward_permitted():
            # XFORWARD overrides the client address SPF and the log line use: only the MTA
            # in front of us may say who its client was.
            log.warning("client=%s XFORWARD refused: not in xforward_hosts", self.peer)
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if not self.downstream.supports("XFORWARD"):
            await self.push("502 5.5.1 Error: XFORWARD not supported")
            return
        octets = _octets(arg)
        if not octets or _has_control(octets):
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        reply = await self._relay(lambda downstream: downstream.command(b"XFORWARD " + octets))
        if reply is None:
            return
        if reply.code == 250:
            for item in octets.decode("utf-8", "replace").split():
                key, _, value = item.partition("=")
                self.tx.xforward[key.upper()] = value
        await self.send_reply(reply)

    def _xforward_permitted(self) -> bool:
        return bool(self.settings.xforward_hosts) and self.settings.xforward_access.permits(
            self.peer
        )

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if not self.tls_context:
            await self._not_implemented(arg)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str | None) -> None:
        if not self._auth_offered:
            await self._not_implemented(arg)
            return
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.tx.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.tx.rcpt_to:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        await self.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        started = time.monotonic()
        spool: Spool | None = Spool()
        self._spool_error = None
        # data_timeout: the longest wait for the next byte of the message.
        self._timeout_duration = self.settings.data_timeout
        self._reset_timeout()
        try:
            kept, self._spool_error = await receive_message(
                self._fill, self._reader, spool, self.settings.max_message_size
            )
            if not kept:
                spool.close()
                spool = None
        except ClientGone:
            spool.close()
            self._hang_up()
            return
        except BaseException:
            spool.close()  # the client went away mid-DATA
            raise
        finally:
            self._timeout_duration = self.settings.command_timeout
            self._reset_timeout()
        self._messages += 1
        tx = self.tx
        assert self.downstream is not None
        # The client waits for us now, not we for it: its idle timer must not run out while
        # the message is processed and relayed (the relay has its own timeout).
        self._reset_timeout(self.settings.command_timeout + self.settings.relay_timeout)
        try:
            refusal = check_received(spool, self._spool_error, self.settings)
            if refusal is not None:
                log.info("client=%s from=<%s> rejected: %s", self.peer, tx.mail_from,
                         refusal.reason)  # fmt: skip
                reply = await self.logic.refuse(self.downstream, tx, refusal)
            else:
                reply = await self.logic.deliver(self.downstream, tx, spool, started)
        except DownstreamError as exc:
            await self._downstream_failed(exc)
            return
        finally:
            if spool is not None:
                spool.close()
        self.reset_transaction()
        await self.send_reply(reply)

    def _hang_up(self) -> None:
        """End the session now, as aiosmtpd's own QUIT does."""
        self._verbs.closed = True
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def _fill(self) -> bytes:
        """What has arrived from the client (waiting for it if nothing has)."""
        self._flush()
        chunk = await self._reader.read(SCAN_CHUNK)
        if not chunk:
            raise ClientGone("connection closed in DATA")
        self._reset_timeout()
        return chunk
