"""Settings of one upstream session: the listener's limits and the downstream to relay to."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dkproxy.daemon import AccessList
from dkproxy.smtp.downstream import DownstreamSettings


@dataclass(frozen=True)
class SessionSettings:
    """Everything a listener session needs to know; one instance per worker.

    Sizes are in bytes, times in seconds. `listener_options` go to `aiosmtpd.smtp.SMTP`
    unchanged (`tls_context`, `require_starttls`, `authenticator`, `auth_required`,
    `auth_require_tls`, `auth_exclude_mechanism`, `proxy_protocol_timeout`);
    `downstream_options` go to `aiosmtplib.SMTP` (see `DownstreamSettings`).
    """

    hostname: str
    relay_host: str
    relay_port: int
    relay_timeout: float = 300.0
    command_timeout: float = 300.0
    #: 0: no limit of our own (the downstream's SIZE still applies).
    max_message_size: int = 64 << 20
    ident: str = "dkproxy"
    #: Log every command and reply (DKIMproxy's debugtrace); message bodies are not logged.
    debugtrace: bool = False
    #: Longest command line accepted, without CRLF (Postfix: line_length_limit 2048).
    max_command_line: int = 4096
    #: Protocol errors (5xx answers of our own) before the session ends with 421.
    max_errors: int = 20
    #: Commands served from already-received input before yielding to other sessions.
    fairness_batch: int = 16
    #: Limits (README "Security notes"); see dkproxy.config for the defaults' reasons.
    max_recipients: int = 1000
    max_messages_per_session: int = 1000
    #: Concurrent sessions per worker; the next one gets 421 at once.
    max_sessions: int = 500
    max_header_size: int = 1 << 20
    max_header_fields: int = 1000
    #: Seconds without a byte while a message is being received.
    data_timeout: float = 300.0
    #: Networks (CIDR) whose clients may send XFORWARD; empty: nobody.
    xforward_hosts: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    listener_options: Mapping[str, Any] = field(default_factory=dict)
    downstream_options: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def xforward_access(self) -> AccessList:
        """Who may send XFORWARD, as an access list (built once per worker)."""
        return AccessList.build(cidr_allow=self.xforward_hosts)

    def downstream(self) -> DownstreamSettings:
        return DownstreamSettings(
            host=self.relay_host,
            port=self.relay_port,
            timeout=self.relay_timeout,
            # A downstream that accepts the connection and never greets must give 4xx within
            # the configured relay_timeout too, not only after the 30 s connect allowance.
            connect_timeout=min(DownstreamSettings.connect_timeout, self.relay_timeout),
            local_hostname=self.hostname,
            client_options=self.downstream_options,
        )
