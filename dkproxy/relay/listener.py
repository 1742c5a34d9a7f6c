"""The relay's listener: the SMTP layer's Listener with aiosmtpd's STARTTLS and AUTH, and
the rules of a submission relay.

`dkproxy.smtp.listener.Listener` (an `aiosmtpd.smtp.SMTP` subclass) relays MAIL, RCPT and
the end of DATA to the downstream verbatim and passes its replies back; aiosmtpd does STARTTLS
(`tls_context`, `require_starttls`: 530 before STARTTLS when TLS is required) and AUTH
(`auth_require_tls`: 538 before TLS, 503 when already authenticated, 504 for other
mechanisms). `RelayListener` adds what a submission relay decides:

* AUTH PLAIN and LOGIN (RFC 4616, draft-murchison-sasl-login) as `auth_<NAME>` methods, the
  extension point aiosmtpd gives mechanisms: they read the exchange with the library's
  `challenge_auth` and return its AuthResult, but check the password in a thread (argon2id
  takes tens of milliseconds by design, and aiosmtpd's `authenticator` hook is synchronous:
  it would stop every session while one password is checked). A failure is answered 535
  after a per-client delay; too many failures get 421 and close the session (ClientGuard).
* EHLO is answered here, with our own name to the smarthost and our own capabilities to the
  client: the smarthost session opens only at the first MAIL (relay.smarthost).
* who may relay: an authenticated client, a client in `clients.relay_without_auth`, or
  anyone when neither AUTH nor an allow list is configured (loopback listeners only, see
  config.relay); others get 530 at MAIL.
* who may send as whom: the sender-login map checks MAIL FROM (553 at MAIL) and every
  From and Sender header address (553 at the end of DATA; Sender too, because the signer
  takes the Sender address when there is one).
* limits: sessions and connection rate before the greeting (421), recipients (452), size
  (SIZE advertised, 552 beyond, by the Listener).
* signing with `dkproxy out`'s signer and a Received field (RFC 5321 4.4) for the client,
  with the RFC 3848 protocol name (ESMTPSA for TLS and AUTH) and the login, as Postfix
  writes them (`RelayLogic`, the session.Proxy of the relay).

aiosmtpd logs command lines and DATA lines on the `mail.log` logger; the relay keeps that
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
from base64 import b64decode
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from dkproxy.mailauth.message import Buffer, Message, MessageFormatError
from dkproxy.outbound import assemble
from dkproxy.smtp.downstream import DownstreamError, Reply, local_reply
from dkproxy.smtp.listener import MAIL_FROM_PATH, Listener, path_address
from dkproxy.smtp.proxy import Envelope, Outcome, Proxy

if TYPE_CHECKING:
    from dkproxy.relay.state import RelayService, RelayState

log = logging.getLogger("dkproxy.relay")

_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d{1,20})(?:\s|$)", re.IGNORECASE)
_HELO_SAFE = re.compile(r"[A-Za-z0-9.\-_:\[\]]{1,255}")
REPLY_AUTH_REQUIRED = "530 5.7.0 Error: authentication required"
REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Error: too many authentication failures"


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


@dataclass
class RelayEnvelope(Envelope):
    """The transaction as the relay sees it: the Envelope plus who submitted it, and how."""

    login: str | None = None
    tls: str | None = None
    extended: bool = True


class RelayLogic(Proxy):
    """session.Proxy with the relay's processor: the header checks, `dkproxy out`'s signer,
    and the Received field under the signatures."""

    def __init__(self, service: RelayService) -> None:
        super().__init__(self.process, assemble, service.settings.max_message_size)
        self.service = service

    def begin(self, peer: str, helo: str | None) -> RelayEnvelope:
        return RelayEnvelope(peer=peer, helo=helo)

    async def process(self, data: Buffer, envelope: Envelope) -> Outcome:
        assert isinstance(envelope, RelayEnvelope)
        state = self.service.state
        login = envelope.login
        prefix = f"login={login} " if login else ""
        if login is not None:
            refusal = header_refusal(state, login, data)
            if refusal is not None:
                return Outcome(
                    reject=local_reply(553, f"5.7.1 Error: {refusal}"),
                    summary=f"{prefix}refused: {refusal}",
                )
        outcome = state.signer.sign(data)
        if outcome.reject is not None:
            outcome.summary = prefix + outcome.summary
            return outcome
        queue_id = secrets.token_hex(5).upper()
        received = received_field(
            helo=envelope.helo,
            client_ip=envelope.peer,
            tls=envelope.tls,
            login=login,
            extended=envelope.extended,
            hostname=self.service.hostname,
            queue_id=queue_id,
            recipients=envelope.rcpt_to,
        )
        outcome.prepend = [*outcome.prepend, received]
        outcome.summary = f"{prefix}id={queue_id} {outcome.summary}"
        return outcome


def header_refusal(state: RelayState, login: str, data: Buffer) -> str | None:
    """Why the From/Sender header addresses are not `login`'s to use, or None."""
    if state.login_map is None:
        return None if state.cfg.any_sender else "no sender-login map"
    try:
        message = Message(data)
    except MessageFormatError as exc:
        return f"unreadable header ({exc})"
    for name in ("from", "sender"):
        for address in header_addresses(message, name):
            if not state.login_may_use(login, address):
                label = "From" if name == "from" else "Sender"
                return f"{label} address <{address}> not owned by user {login}"
    # The address the signer will sign for, as the signer reads it: whatever the header
    # parsing above made of an odd field, no signature for a domain the login may not use.
    signer_sender = message.sender()
    if signer_sender is not None and not state.login_may_use(login, str(signer_sender)):
        return f"sender address <{signer_sender}> not owned by user {login}"
    return None


class RelayListener(Listener):
    """One client connection of `dkproxy relay`."""

    def __init__(self, service: RelayService, implicit_tls: bool) -> None:
        cfg = service.state.cfg
        self.service = service
        self.implicit_tls = implicit_tls
        self.admitted = False
        super().__init__(
            service,
            # Implicit TLS (RFC 8314): the socket is TLS from the first byte, so there is no
            # STARTTLS to offer and AUTH needs no further TLS check.
            tls_context=None if implicit_tls else service.tls_context,
            require_starttls=cfg.require_tls and not implicit_tls,
            auth_require_tls=not implicit_tls,
        )
        # AUTH is offered when there are credentials; the mechanisms are the methods below.
        self._auth_offered = service.state.credentials is not None
        self.tx: RelayEnvelope

    @property
    def login(self) -> str | None:
        session = self.session
        if session is None or not session.authenticated:
            return None
        return session.auth_data  # type: ignore[no-any-return]

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
            return str(ssl_object.version())
        return f"{ssl_object.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"

    # -- the smarthost session: opened at the first MAIL, QUIT at the end ---------------------

    async def _open_downstream(self) -> bool:
        return True  # not before the greeting: see relay.smarthost

    def _release_downstream(self) -> None:
        downstream, self.downstream = self.downstream, None
        if downstream is not None:
            self.worker.pool.give_back(downstream, False)

    async def _open_smarthost(self) -> str | None:
        """Connect, TLS, AUTH at the smarthost; None, or the 451 for the client."""
        hop = self.service.state.smarthost
        try:
            downstream, greeting = await self.worker.pool.open()
        except DownstreamError as exc:
            failure = hop.explain(exc)
            log.warning("client=%s deferred: %s", self.peer, failure)
            return failure.reply
        if greeting.code != 220:
            self.worker.pool.give_back(downstream, False)
            failure = hop.refused(str(greeting))
            log.warning("client=%s deferred: %s", self.peer, failure)
            return failure.reply
        self.downstream = downstream
        if downstream.client.is_ehlo_or_helo_needed:
            # No TLS and no login (a loopback smarthost): aiosmtplib has not said EHLO yet.
            reply = await self._relay(
                lambda d: d.ehlo(self.service.hostname.encode("ascii", "replace"))
            )
            if reply is None or reply.code != 250:
                return "451 4.4.1 smarthost refused our EHLO, try again later"
        return None

    # -- commands --------------------------------------------------------------------------------

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not arg or any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._hello(arg, extended=True)
        lines = [self.service.hostname, "PIPELINING"]
        size = self.service.state.cfg.max_message_size
        lines += [f"SIZE {size}" if size else "SIZE", "8BITMIME", "SMTPUTF8"]
        lines.append("ENHANCEDSTATUSCODES")
        if self.tls_context and not self._tls_protocol:
            lines.append("STARTTLS")
        if self._auth_offered and (not self._auth_require_tls or self._tls_protocol):
            lines.append("AUTH " + " ".join(sorted(self._auth_methods)))
        await self.send_reply(Reply(250, tuple(lines)))

    async def smtp_HELO(self, arg: str | None) -> None:
        if not arg or any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self._hello(arg, extended=False)
        await self.push(f"250 {self.service.hostname}")

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.tx.mail_from is not None:
            await super().smtp_MAIL(arg)  # 503 nested MAIL
            return
        if self.helo is None:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return
        # The address checked is the one the Listener records and relays (same parser).
        match = MAIL_FROM_PATH.match(arg or "")
        if match is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address = path_address(match.group(1))
        state = self.service.state
        login = self.login
        if login is None and not state.may_relay_without_auth(self.peer):
            log.warning("client=%s from=<%s> refused: not authenticated", self.peer, address)
            await self.push(REPLY_AUTH_REQUIRED)
            return
        if login is not None and address and not state.login_may_use(login, address):
            log.warning("client=%s login=%s from=<%s> refused: sender not owned by the login",
                        self.peer, login, address)  # fmt: skip
            await self.push(
                f"553 5.7.1 <{address}>: Sender address rejected: not owned by user {login}"
            )
            return
        size = self.service.state.cfg.max_message_size
        declared = _SIZE_PARAM.search(match.group(2))
        if size and declared and int(declared.group(1)) > size:
            # RFC 1870 6.1: refuse at MAIL what is declared too big.
            await self.push("552 5.3.4 Error: message size exceeds fixed limit")
            return
        if self.downstream is not None and not self.downstream.connected:
            # The smarthost ended the idle session between two of the client's messages.
            self._release_downstream()
        if self.downstream is None:
            refusal = await self._open_smarthost()
            if refusal is not None:
                await self.push(refusal)
                return
        self.tx.login = login
        self.tx.tls = self.tls_description
        self.tx.extended = self._extended
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self.tx.mail_from is not None and len(self.tx.rcpt_to) >= (
            self.service.state.cfg.max_recipients
        ):
            await self.push("452 4.5.3 Error: too many recipients")
            return
        await super().smtp_RCPT(arg)

    async def smtp_RSET(self, arg: str | None) -> None:
        if self.downstream is None:
            self.reset_transaction()
            await self.push("250 2.0.0 Ok")
            return
        await super().smtp_RSET(arg)

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        # Applications have no MTA in front of them to forward attributes for.
        await self.push("502 5.5.1 Error: XFORWARD not supported")

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
        client = self.peer
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
