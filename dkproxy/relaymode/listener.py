"""The relay's listener: aiosmtpd's SMTP with its own STARTTLS and AUTH, and relay rules.

aiosmtpd does the protocol: the command loop, STARTTLS (`tls_context`, `require_starttls`:
530 before STARTTLS when TLS is required), AUTH (`auth_require_tls`: 538 before TLS, 503
when already authenticated, 504 for other mechanisms), SIZE (`data_size_limit`: advertised,
552 beyond) and the DATA phase. This module adds what a submission relay decides:

* AUTH PLAIN and LOGIN (RFC 4616, the LOGIN draft) as `auth_<NAME>` methods of the subclass,
  aiosmtpd's extension point for mechanisms: they read the exchange with the library's
  `challenge_auth` and return its AuthResult, but check the password without blocking the
  event loop (argon2id takes tens of milliseconds by design; aiosmtpd's `authenticator`
  hook is synchronous). A failure is answered 535 after a per-client delay; too many
  failures get 421 and close the session (ClientGuard).
* who may relay: an authenticated client, a client in `clients.relay_without_auth`, or
  anyone when neither AUTH nor an allow list is configured (loopback listeners only, see
  relaymode.config); others get 530 at MAIL.
* who may send as whom: the sender-login map checks MAIL FROM (553 at MAIL) and every
  From and Sender header address (553 at the end of DATA; Sender too, because the signer
  takes the Sender address when there is one).
* limits: sessions and connection rate at the greeting (421), recipients (452).
* proxy semantics: MAIL, RCPT and the end of DATA are answered with the smarthost's own
  replies; a hop that fails gives 4xx (relaymode.smarthost).
* signing with `dkproxy out`'s signer, and a Received field (RFC 5321 4.4) for the client,
  with the RFC 3848 protocol name (ESMTPSA when TLS and AUTH) and the login, as Postfix
  writes it.

aiosmtpd logs every command line and DATA line on the `mail.log` logger; the relay keeps that
logger at WARNING so that no message content or credential reaches the log, even at debug.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import ipaddress
import logging
import re
import secrets
import time
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from dkproxy.message import Message, MessageFormatError
from dkproxy.relaymode.smarthost import HopFailed, HopReply, HopSession
from dkproxy.relaymode.state import RelayService

log = logging.getLogger("dkproxy.relay")

_HELO_SAFE = re.compile(r"[A-Za-z0-9.\-_:\[\]]{1,255}")
REPLY_AUTH_REQUIRED = "530 5.7.0 Error: authentication required"
REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Error: too many authentication failures"


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else "unknown"


def received_field(
    *,
    helo: str | None,
    client_ip: str,
    tls: str | None,
    login: str | None,
    extended: bool,
    hostname: str,
    queue_id: str,
    recipients: list[str],
) -> bytes:
    """The Received field for the submitting client, folded, with CRLF (RFC 5321 4.4).

    `with` is SMTP/ESMTP plus S for TLS and A for AUTH (RFC 3848); the login appears as
    "(Authenticated sender: LOGIN)", the TLS parameters as "(using TLSv1.3 with cipher
    ...)", as Postfix writes them.
    """
    name = helo if helo and _HELO_SAFE.fullmatch(helo) else "unknown"
    address = ipaddress.ip_address(client_ip.split("%", 1)[0]) if client_ip != "unknown" else None
    literal = f"[IPv6:{address}]" if address and address.version == 6 else f"[{address}]"
    protocol = ("ESMTP" if extended else "SMTP") + ("S" if tls else "") + ("A" if login else "")
    lines = [f"Received: from {name} ({literal})"]
    if tls:
        lines.append(f"\t(using {tls})")
    if login:
        lines.append(f"\t(Authenticated sender: {login})")
    lines.append(f"\tby {hostname} (dkproxy) with {protocol} id {queue_id}")
    date = email.utils.format_datetime(email.utils.localtime())
    if len(recipients) == 1 and _address_safe(recipients[0]):
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _address_safe(address: str) -> bool:
    return not any(c in address for c in "<>\r\n\t ;()")


def header_addresses(message: Message, name: str) -> list[str]:
    """Every address in the header fields called `name` (all of them, e.g. several From)."""
    values = [raw.decode("utf-8", "replace") for raw in message.get_all(name)]
    return [address for _display, address in email.utils.getaddresses(values) if address]


class RelaySMTP(SMTP):
    """One client connection: aiosmtpd's protocol with the relay's AUTH mechanisms."""

    def __init__(self, service: RelayService, implicit_tls: bool) -> None:
        cfg = service.state.cfg
        self.service = service
        self.implicit_tls = implicit_tls
        self._admitted = False
        handler = RelayHandler(service, self)
        super().__init__(
            handler,
            hostname=service.hostname,
            ident="dkproxy",
            data_size_limit=cfg.max_message_size or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            # Implicit TLS (RFC 8314): the socket is TLS from the first byte, so there is no
            # STARTTLS to offer and AUTH needs no further TLS check.
            tls_context=None if implicit_tls else service.tls_context,
            require_starttls=cfg.require_tls and not implicit_tls,
            auth_require_tls=not implicit_tls,
            timeout=cfg.command_timeout,
        )
        self.handler = handler

    @property
    def tls_description(self) -> str | None:
        """The TLS in use, e.g. "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"."""
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        if not cipher:
            return ssl_object.version()
        return f"{ssl_object.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"

    async def _handle_client(self) -> None:
        # Limits are checked before the greeting: a refused client gets 421 and nothing else.
        assert self.session is not None
        refusal = self.service.guard.admit(_peer_ip(self.session))
        if refusal is not None:
            log.warning("client=%s refused: %s", _peer_ip(self.session), refusal[10:])
            await self.push(refusal)
            assert self.transport is not None
            self.transport.close()
            return
        self._admitted = True
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.service.guard.release()
            self.handler.close_hop()
        super().connection_lost(error)

    # -- AUTH mechanisms (aiosmtpd calls auth_<NAME>(server, args)) -------------------------

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: authzid NUL authcid NUL password, initial response or after 334."""
        blob = await self._auth_blob(args[1] if len(args) > 1 else None, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Error: cannot split the PLAIN response")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting for another identity is not offered: that would bypass the map.
            await self.push("535 5.7.8 Error: authorization identity not allowed")
            return AuthResult(success=False, handled=True)
        return await self._authenticate_async("PLAIN", login, password)

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""
        login = await self._auth_blob(args[1] if len(args) > 1 else None, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._auth_blob(None, "Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._authenticate_async("LOGIN", login, password)

    async def _auth_blob(self, initial: str | None, challenge: str) -> bytes | None:
        """The client's decoded response: the initial response, else after a 334 challenge.
        None when the client aborted or sent bad base64 (the reply has been sent)."""
        if initial is None:
            answer = await self.challenge_auth(challenge)
            return None if answer is MISSING else answer  # type: ignore[return-value]
        if initial == "=":  # RFC 4954 4: an empty initial response
            return b""
        try:
            return b64decode(initial.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Error: cannot decode base64")
            return None

    async def _authenticate_async(
        self, mechanism: str, login: bytes, password: bytes
    ) -> AuthResult:
        assert self.session is not None
        client = _peer_ip(self.session)
        guard = self.service.guard
        credentials = self.service.state.credentials
        if guard.locked_out(client):
            return await self._too_many_failures(client)
        try:
            name, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            name, secret = "", ""
        ok = bool(name) and credentials is not None and await credentials.verify_async(name, secret)
        if ok:
            guard.auth_succeeded(client)
            log.info("client=%s login=%s authenticated (%s)", client, name, mechanism)
            # auth_data is the login only: aiosmtpd logs the AuthResult at debug level.
            return AuthResult(success=True, auth_data=name)
        delay = guard.auth_failed(client)
        # Name only logins that exist: a password typed into the user name field must not
        # end up in the log.
        known = credentials is not None and credentials.knows(name)
        log.warning("client=%s AUTH %s failed for %s (delay %.1fs)", client, mechanism,
                    f"login={name}" if known else "an unknown login", delay)  # fmt: skip
        await asyncio.sleep(delay)
        if guard.locked_out(client):
            return await self._too_many_failures(client)
        return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)

    async def _too_many_failures(self, client: str) -> AuthResult:
        log.warning("client=%s too many authentication failures; closing", client)
        await self.push(REPLY_TOO_MANY_FAILURES)
        assert self.transport is not None
        self.transport.close()
        return AuthResult(success=False, handled=True)


class RelayHandler:
    """aiosmtpd handler hooks of one connection; holds its smarthost session."""

    def __init__(self, service: RelayService, server: RelaySMTP) -> None:
        self.service = service
        self.server = server
        self.hop: HopSession | None = None
        self.in_transaction = False

    def close_hop(self) -> None:
        if self.hop is not None:
            hop, self.hop = self.hop, None
            asyncio.get_running_loop().create_task(hop.quit())

    def _login(self, session: Session) -> str | None:
        return session.auth_data if session.authenticated else None  # type: ignore[no-any-return]

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        if self.service.state.credentials is None:
            responses = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        state = self.service.state
        client = _peer_ip(session)
        login = self._login(session)
        if login is None and not state.may_relay_without_auth(client):
            log.warning("client=%s from=<%s> refused: not authenticated", client, address)
            return REPLY_AUTH_REQUIRED
        if login is not None and address and not state.login_may_use(login, address):
            log.warning("client=%s login=%s from=<%s> refused: sender not owned by the login",
                        client, login, address)  # fmt: skip
            return f"553 5.7.1 <{address}>: Sender address rejected: not owned by user {login}"
        if self.hop is None or not self.hop.connected:
            self.hop = state.smarthost.session()
            try:
                await self.hop.open()
            except HopFailed as exc:
                log.warning("client=%s from=<%s> deferred: %s", client, address, exc)
                self.hop = None
                return exc.reply.render()
        reply = await self._hop_command(b"MAIL", f"FROM:<{address}>", *mail_options)
        if reply.code == 250:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            self.in_transaction = True
        return reply.render()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if len(envelope.rcpt_tos) >= self.service.state.cfg.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        if self.hop is None or not self.in_transaction:
            return "503 5.5.1 Error: need MAIL command"
        reply = await self._hop_command(b"RCPT", f"TO:<{address}>", *rcpt_options)
        if reply.code == 250:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply.render()

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._end_transaction()
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self.close_hop()
        return MISSING

    async def _hop_command(self, verb: bytes, *words: str) -> HopReply:
        assert self.hop is not None
        try:
            return await self.hop.command(
                verb, *(w.encode("utf-8", "surrogateescape") for w in words)
            )
        except HopFailed as exc:
            log.warning("client=%s %s", _peer_ip(self.server.session), exc)  # type: ignore[arg-type]
            self.hop, self.in_transaction = None, False
            return exc.reply

    async def _end_transaction(self) -> None:
        """RSET the smarthost when a transaction is open there (refused at DATA, RSET)."""
        if self.hop is not None and self.in_transaction:
            self.in_transaction = False
            await self._hop_command(b"RSET")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        state = self.service.state
        client = _peer_ip(session)
        login = self._login(session)
        data: bytes = envelope.original_content or b""
        context = f"client={client}" + (f" login={login}" if login else "")
        context += f" from=<{envelope.mail_from}> rcpts={len(envelope.rcpt_tos)}"
        if login is not None:
            refusal = self._header_refusal(login, data)
            if refusal is not None:
                log.warning("%s refused: %s", context, refusal)
                await self._end_transaction()
                return f"553 5.7.1 Error: {refusal}"
        outcome = state.signer.sign(data)
        if outcome.reject is not None:
            log.warning("%s %s refused: %s", context, outcome.summary, outcome.reject)
            await self._end_transaction()
            return str(outcome.reject)
        queue_id = secrets.token_hex(5).upper()
        received = received_field(
            helo=session.host_name,
            client_ip=client,
            tls=self.server.tls_description,
            login=login,
            extended=session.extended_smtp,
            hostname=self.service.hostname,
            queue_id=queue_id,
            recipients=envelope.rcpt_tos,
        )
        message = b"".join([*outcome.prepend, received, data])
        if self.hop is None:
            return "451 4.4.2 Error: smarthost connection lost, try again later"
        self.in_transaction = False
        try:
            reply = await self.hop.data(message)
        except HopFailed as exc:
            log.warning("%s id=%s deferred: %s", context, queue_id, exc)
            self.hop = None
            return exc.reply.render()
        elapsed = (time.monotonic() - started) * 1000
        log.info("%s id=%s %s relay=%r time=%.1fms", context, queue_id, outcome.summary,
                 str(reply), elapsed)  # fmt: skip
        return reply.render()

    def _header_refusal(self, login: str, data: bytes) -> str | None:
        """Why the From/Sender header addresses are not the login's to use, or None."""
        state = self.service.state
        if state.login_map is None:
            return None
        try:
            message = Message(data)
        except MessageFormatError as exc:
            return f"unreadable header ({exc})"
        for name in ("from", "sender"):
            for address in header_addresses(message, name):
                if not state.login_may_use(login, address):
                    label = "From" if name == "from" else "Sender"
                    return f"{label} address <{address}> not owned by user {login}"
        return None
