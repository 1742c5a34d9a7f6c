"""Per-client limits of the relay listener: sessions, connection rate, AUTH failures.

In the spirit of Postfix's anvil (smtpd_client_connection_rate_limit,
smtpd_client_auth_rate_limit) and smtpd_hard_error_limit: counted per client IP address in
this process (the relay runs as one process, so the counts are exact), in sliding windows.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

#: Counters of addresses not seen for this long are dropped when the tables grow large.
_PRUNE_AT = 10_000


class ClientGuard:
    """Admission and AUTH-failure bookkeeping; times in seconds (monotonic clock)."""

    def __init__(
        self,
        max_sessions: int,
        max_connections_per_minute: int,
        max_auth_failures: int,
        failure_window: float,
        failure_delay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_connections_per_minute = max_connections_per_minute
        self.max_auth_failures = max_auth_failures
        self.failure_window = failure_window
        self.failure_delay = failure_delay
        self.sessions = 0
        self._clock = clock
        self._connections: dict[str, deque[float]] = {}
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, table: dict[str, deque[float]], address: str, window: float) -> deque[float]:
        now = self._clock()
        if len(table) > _PRUNE_AT:
            for key in [k for k, v in table.items() if not v or v[-1] < now - window]:
                del table[key]
        events = table.setdefault(address, deque())
        while events and events[0] < now - window:
            events.popleft()
        return events

    def admit(self, address: str) -> str | None:
        """None when a new session from `address` may start (then counted until `release`),
        else the 421 reply that refuses it (RFC 5321 4.2.3: service not available)."""
        if self.sessions >= self.max_sessions:
            return "421 4.7.0 Error: too many sessions, try again later"
        if self.locked_out(address):
            return "421 4.7.0 Error: too many authentication failures, try again later"
        if self.max_connections_per_minute:
            events = self._recent(self._connections, address, 60.0)
            if len(events) >= self.max_connections_per_minute:
                return f"421 4.7.0 Error: too many connections from {address}, try again later"
            events.append(self._clock())
        self.sessions += 1
        return None

    def release(self) -> None:
        self.sessions -= 1

    def locked_out(self, address: str) -> bool:
        """True while `address` has `max_auth_failures` failures in the window."""
        events = self._recent(self._failures, address, self.failure_window)
        return len(events) >= self.max_auth_failures

    def auth_failed(self, address: str) -> float:
        """Count a failure; the delay (s) before answering 535, longer with each recent
        failure of this client (one `failure_delay` per failure, at most ten)."""
        events = self._recent(self._failures, address, self.failure_window)
        events.append(self._clock())
        return self.failure_delay * min(len(events), 10)

    def auth_succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
