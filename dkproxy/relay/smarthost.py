"""The hop to the smarthost: the SMTP layer's downstream (aiosmtplib) with verified TLS and AUTH.

`dkproxy.smtp.downstream.Downstream` passes `client_options` to `aiosmtplib.SMTP`: here
`use_tls` (implicit TLS, RFC 8314) or `start_tls` (RFC 3207, required: a smarthost that does
not offer STARTTLS is not used), our `tls_context` (relay.tls: system store or a CA
file, host name checked, TLS 1.2+) and `username`/`password`, so aiosmtplib's `connect()`
does TLS, EHLO and AUTH before anything of the client's is sent.

The session is opened at the client's first MAIL, after the client has authenticated and
passed the sender checks (not at the greeting, as `dkproxy out` does: an unauthenticated
client must not make us log in to the smarthost). When the smarthost cannot be reached,
fails TLS verification, does not offer STARTTLS or refuses our login, the client gets a 451
and keeps its mail (dkproxy has no queue), and the log says why; the reason never holds the
password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiosmtplib

from dkproxy.config.relay import SmarthostConfig
from dkproxy.relay.tls import client_context, describe_failure
from dkproxy.smtp.downstream import DownstreamError, DownstreamSettings, local_reply


class Secret(str):
    """A password that does not show itself in a repr (settings objects, tracebacks)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'********'"


class HopFailed(Exception):
    """The smarthost session could not be opened; str() is the reason for the log, `reply`
    the 451 for the client."""

    def __init__(self, reason: str, reply: str) -> None:
        super().__init__(reason)
        self.reply = reply


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 6:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


@dataclass(frozen=True)
class Smarthost:
    """Where signed mail goes: the downstream settings and how to explain a failure."""

    cfg: SmarthostConfig
    settings: DownstreamSettings

    @classmethod
    def build(cls, cfg: SmarthostConfig, local_hostname: str) -> Smarthost:
        options: dict[str, object] = {}
        if cfg.tls != "none":
            context: ssl.SSLContext = client_context(cfg.ca_file, cfg.tls_verify)
            options["tls_context"] = context
            options["use_tls" if cfg.tls == "implicit" else "start_tls"] = True
        if cfg.username is not None and cfg.password is not None:
            options["username"] = cfg.username
            options["password"] = Secret(cfg.password)
        settings = DownstreamSettings(
            host=cfg.address.host,
            port=cfg.address.port,
            timeout=cfg.timeout,
            connect_timeout=cfg.connect_timeout,
            local_hostname=local_hostname,
            client_options=options,
        )
        return cls(cfg, settings)

    @property
    def target(self) -> str:
        return str(self.cfg.address)

    def explain(self, exc: DownstreamError) -> HopFailed:
        """The reason (for the log) and the 451 (for the client) of a failed connect."""
        target = self.target
        tls_reason = None
        login_refused: aiosmtplib.SMTPResponseException | None = None
        for cause in _causes(exc):
            tls_reason = tls_reason or describe_failure(cause)
            if isinstance(cause, aiosmtplib.SMTPAuthenticationError):
                login_refused = cause
        if tls_reason is not None:
            return HopFailed(
                f"smarthost {target}: {tls_reason}",
                "451 4.7.5 smarthost TLS failure, try again later",
            )
        if login_refused is not None:
            text = " ".join(login_refused.message.splitlines())
            return HopFailed(
                f"smarthost {target} refused our login {self.cfg.username!r}: "
                f"{login_refused.code} {text}",
                "451 4.7.0 smarthost refused our login, try again later",
            )
        if "STARTTLS" in str(exc) and self.cfg.tls == "starttls":
            return HopFailed(
                f"smarthost {target} does not offer STARTTLS: {exc}",
                "451 4.7.4 smarthost does not offer STARTTLS, try again later",
            )
        if "AUTH" in str(exc) and self.cfg.username is not None:
            return HopFailed(
                f"smarthost {target}: login {self.cfg.username!r} failed: {exc}",
                "451 4.7.0 smarthost login failed, try again later",
            )
        return HopFailed(
            f"smarthost {target} unreachable: {exc}",
            f"451 4.4.1 smarthost {target} unreachable, try again later",
        )

    def refused(self, greeting: str) -> HopFailed:
        return HopFailed(
            f"smarthost {self.target} refused the session: {greeting}",
            str(local_reply(451, f"4.4.1 smarthost {self.target} busy, try again later")),
        )
