"""What the relay runs with: the loaded configuration (replaced whole on SIGHUP) and the
long-lived parts (the listener's TLS context, the client counters, the smarthost sessions).

`RelayService` is the worker the SMTP layer's listener expects (dkproxy.smtp.listener.Worker):
session settings, the proxy logic, the downstream pool, and the session open/close hooks,
where the per-client limits are applied.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dkproxy.config import ConfigError
from dkproxy.config.relay import RelayConfig, load_relay_config
from dkproxy.outbound import OutboundSigner
from dkproxy.relay.credentials import Credentials, SenderLoginMap
from dkproxy.relay.guard import ClientGuard
from dkproxy.relay.listener import RelayLogic
from dkproxy.relay.smarthost import Smarthost
from dkproxy.relay.tls import load_certificate, server_context
from dkproxy.smtp.downstream import DownstreamPool
from dkproxy.smtp.settings import SessionSettings

if TYPE_CHECKING:
    from dkproxy.smtp.listener import Listener

log = logging.getLogger("dkproxy.relay")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RelayState:
    """A configuration with every file it names loaded: credentials, map, keys."""

    cfg: RelayConfig
    credentials: Credentials | None
    login_map: SenderLoginMap | None
    signer: OutboundSigner
    smarthost: Smarthost
    networks: tuple[Network, ...]

    @classmethod
    def load(cls, cfg: RelayConfig, hostname: str) -> RelayState:
        """Load the credentials, the sender-login map and the signing keys and maps (through
        `dkproxy out`'s OutboundSigner); ConfigError naming the file on any problem."""
        credentials = Credentials.load(cfg.credentials) if cfg.credentials else None
        login_map = (
            SenderLoginMap.load(cfg.sender_login_map, credentials) if cfg.sender_login_map else None
        )
        return cls(
            cfg=cfg,
            credentials=credentials,
            login_map=login_map,
            signer=OutboundSigner.from_config(cfg.signing),
            smarthost=Smarthost.build(cfg.smarthost, hostname),
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.relay_without_auth),
        )

    def may_relay_without_auth(self, client: str) -> bool:
        """Whether an unauthenticated client may relay: from an allowed network, or anyone
        when neither AUTH nor an allow list is configured (the start check allows that on
        loopback listeners only)."""
        if self.credentials is None and not self.networks:
            return True
        try:
            address = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def login_may_use(self, login: str, address: str) -> bool:
        """Whether `login` may use `address` as envelope or header sender."""
        if self.login_map is None:
            return self.cfg.any_sender
        return self.login_map.permits(login, address)


class RelayService:
    """Shared by every connection of the process."""

    def __init__(self, cfg: RelayConfig) -> None:
        self.hostname = cfg.hostname or socket.getfqdn() or "localhost"
        self.state = RelayState.load(cfg, self.hostname)
        self.tls_context: ssl.SSLContext | None = None
        if cfg.certificate and cfg.key:
            self.tls_context = server_context(
                cfg.certificate, cfg.key, f"{cfg.path}: listen.certificate"
            )
        self.settings = SessionSettings(
            hostname=self.hostname,
            relay_host=cfg.smarthost.address.host,
            relay_port=cfg.smarthost.address.port,
            relay_timeout=cfg.smarthost.timeout,
            command_timeout=cfg.command_timeout,
            max_message_size=cfg.max_message_size,
        )
        # One smarthost session per client session (see relay.smarthost): the pool only
        # counts them and QUITs them when given back.
        self.pool = DownstreamPool(self.state.smarthost.settings, size=0)
        self.logic = RelayLogic(self)
        self.guard = ClientGuard(
            max_sessions=cfg.max_sessions,
            max_connections_per_minute=cfg.max_connections_per_minute,
            max_auth_failures=cfg.max_auth_failures,
            failure_window=cfg.failure_window,
            failure_delay=cfg.failure_delay,
        )

    def reload(self) -> None:
        """SIGHUP: re-read the file, credentials, map, keys, certificate and password; a
        broken new configuration is logged and the running one kept. Addresses to listen
        on and limits stay as they were started."""
        path = self.state.cfg.path
        try:
            cfg = load_relay_config(path)
            state = RelayState.load(cfg, self.hostname)
            if self.tls_context is not None and cfg.certificate and cfg.key:
                load_certificate(
                    self.tls_context, cfg.certificate, cfg.key, f"{path}: listen.certificate"
                )
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        self.state = state
        self.pool = DownstreamPool(state.smarthost.settings, size=0)
        for warning in cfg.warnings:
            log.warning("%s", warning)
        log.info("configuration reloaded (credentials, sender-login map, keys, certificate)")

    # -- the Worker interface of dkproxy.smtp.listener ---------------------------------------

    def session_opened(self, listener: Listener) -> str | None:
        """Before the greeting: the 421 that refuses the client (limits), or None."""
        refusal = self.guard.admit(listener.peer)
        listener.admitted = refusal is None  # type: ignore[attr-defined]
        if refusal is not None:
            log.warning("client=%s refused: %s", listener.peer, refusal[10:])
        return refusal

    def session_closed(self, listener: Listener) -> None:
        if getattr(listener, "admitted", False):
            listener.admitted = False  # type: ignore[attr-defined]
            self.guard.release()

    def downstream_failed(self, kind: str) -> None:
        """The listener has logged the details."""
