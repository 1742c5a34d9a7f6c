"""The hop to the smarthost: aiosmtplib with verified TLS and AUTH, replies passed back as given.

One smarthost session per client session, opened at the client's first MAIL (after the
client has authenticated and passed the sender checks) and kept for the client's further
transactions. Every reply that commits mail is the smarthost's own; when the smarthost
cannot be reached, refuses our login, fails TLS verification or drops the connection, the
client gets a 4xx and keeps the message (dkproxy has no queue: see the README).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

import aiosmtplib

from dkproxy.relaymode.config import SmarthostConfig
from dkproxy.relaymode.tls import client_context, describe_failure

log = logging.getLogger("dkproxy.relay.smarthost")


@dataclass(frozen=True)
class HopReply:
    """An SMTP reply: the smarthost's own, or ours when the hop failed."""

    code: int
    message: str

    def render(self) -> str:
        """The reply as aiosmtpd's push() sends it: multi-line replies stay multi-line."""
        lines = self.message.split("\n") or [""]
        head = "".join(f"{self.code}-{line}\r\n" for line in lines[:-1])
        return f"{head}{self.code} {lines[-1]}".rstrip()

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.message.splitlines())}".rstrip()


class HopFailed(Exception):
    """The smarthost session could not be opened or broke; `reply` is the 4xx for the client
    and str() the reason for the log (never a password)."""

    def __init__(self, reason: str, reply: HopReply) -> None:
        super().__init__(reason)
        self.reply = reply


def _unreachable(target: str) -> HopReply:
    return HopReply(451, f"4.4.1 smarthost {target} unreachable, try again later")


class Smarthost:
    """Settings shared by every session: the configuration and the client TLS context."""

    def __init__(self, cfg: SmarthostConfig, local_hostname: str) -> None:
        self.cfg = cfg
        self.local_hostname = local_hostname
        self.tls_context: ssl.SSLContext | None = (
            None if cfg.tls == "none" else client_context(cfg.ca_file, cfg.tls_verify)
        )

    @property
    def target(self) -> str:
        return str(self.cfg.address)

    def session(self) -> HopSession:
        return HopSession(self)


class HopSession:
    """One SMTP session with the smarthost."""

    def __init__(self, hop: Smarthost) -> None:
        self.hop = hop
        self.client: aiosmtplib.SMTP | None = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def open(self) -> None:
        """Connect, TLS (implicit or STARTTLS, verified), EHLO and AUTH; HopFailed if any
        step fails, with the reason logged by the caller and a 4xx for the client."""
        cfg = self.hop.cfg
        target = self.hop.target
        client = aiosmtplib.SMTP(
            hostname=cfg.address.host,
            port=cfg.address.port,
            local_hostname=self.hop.local_hostname,
            timeout=cfg.timeout,
            use_tls=cfg.tls == "implicit",
            start_tls=cfg.tls == "starttls",
            tls_context=self.hop.tls_context,
        )
        try:
            await client.connect(timeout=cfg.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise HopFailed(
                f"smarthost {target} refused the session: {exc.code} {exc.message}",
                HopReply(451, f"4.4.1 smarthost {target} refused the session, try again later"),
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            tls_reason = describe_failure(exc)
            if tls_reason is not None:
                raise HopFailed(
                    f"smarthost {target}: {tls_reason}",
                    HopReply(451, "4.7.5 smarthost TLS failure, try again later"),
                ) from None
            if cfg.tls == "starttls" and "STARTTLS" in str(exc):
                raise HopFailed(
                    f"smarthost {target} does not offer STARTTLS: {exc}",
                    HopReply(451, "4.7.4 smarthost does not offer STARTTLS, try again later"),
                ) from None
            raise HopFailed(
                f"smarthost {target} unreachable: {exc}", _unreachable(target)
            ) from None
        if cfg.username is not None and cfg.password is not None:
            try:
                await client.login(cfg.username, cfg.password)
            except aiosmtplib.SMTPResponseException as exc:
                client.close()
                raise HopFailed(
                    f"smarthost {target} refused our login {cfg.username!r}: {exc.code} "
                    f"{' '.join(exc.message.splitlines())}",
                    HopReply(451, "4.7.0 smarthost refused our login, try again later"),
                ) from None
            except (aiosmtplib.SMTPException, OSError) as exc:
                client.close()
                raise HopFailed(
                    f"smarthost {target}: login {cfg.username!r} failed: {exc}",
                    HopReply(451, "4.7.0 smarthost login failed, try again later"),
                ) from None
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except (aiosmtplib.SMTPException, OSError) as exc:
                client.close()
                raise HopFailed(
                    f"smarthost {target}: EHLO failed: {exc}", _unreachable(target)
                ) from None
        self.client = client

    async def command(self, *words: bytes) -> HopReply:
        """Send one command line (MAIL, RCPT, RSET) verbatim; the smarthost's reply."""
        assert self.client is not None
        try:
            response = await self.client.execute_command(*words)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            raise HopFailed(
                f"smarthost {self.hop.target} failed: {exc}",
                HopReply(451, "4.4.2 smarthost connection failed, try again later"),
            ) from None
        if response.code == 421:
            self.close()
        return HopReply(response.code, response.message)

    async def data(self, message: bytes) -> HopReply:
        """DATA with `message` (dot-stuffed by aiosmtplib); the smarthost's final reply."""
        assert self.client is not None
        try:
            response = await self.client.data(message)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                self.close()
            return HopReply(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            raise HopFailed(
                f"smarthost {self.hop.target} failed during DATA: {exc}",
                HopReply(451, "4.4.2 smarthost connection failed, try again later"),
            ) from None
        return HopReply(response.code, response.message)

    async def quit(self) -> None:
        if self.client is None:
            return
        client, self.client = self.client, None
        if client.is_connected:
            try:
                await client.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError):
                client.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
