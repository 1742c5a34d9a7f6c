"""Small adapters that fit a `Listener` into aiosmtpd's `SMTP` (aiosmtpd 1.4.6, <1.5).

aiosmtpd looks commands up in a verb table, command length limits in a per-verb dict and
event hooks on a handler object found with `dir()`; these classes give it the listener's
answers cheaply (the table and limits are consulted once per command, `__init__` scans
`dir()` once per connection).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any


class Verbs(dict[str, Any]):
    """aiosmtpd's verb table, answering unknown verbs with the listener's own handler (so
    that they count as protocol errors, as every other error does)."""

    fallback: Callable[[str, str | None], Awaitable[None]]
    #: The session is ending: commands still buffered are not served (cancelling the
    #: command loop takes effect only at its next wait, after it has read on).
    closed = False

    def get(self, verb: str, default: Any = None) -> Any:  # type: ignore[override]
        if self.closed:
            return ignore
        method = dict.get(self, verb)
        return method if method is not None else functools.partial(self.fallback, verb)


async def ignore(arg: str | None) -> None:
    return None


class NoHooks:
    """The aiosmtpd "handler" of a Listener: it has no handle_* hooks (dir() is empty)."""

    __slots__ = ()

    def __dir__(self) -> list[str]:
        return []


NO_HOOKS = NoHooks()
SCANNED_NAMES: dict[type, list[str]] = {}


class SameLimit(dict[str, int]):
    """aiosmtpd's per-verb command length limits, one value for every verb."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, verb: str) -> int:
        return self.limit
