"""Small adapters that fit a `Listener` into aiosmtpd's `SMTP` (aiosmtpd 1.4.6, <1.5).

aiosmtpd looks commands up in a verb table, command length limits in a per-verb dict and
event hooks on a handler object found with `dir()`; these classes give it the listener's
answers cheaply (the table and limits are consulted once per command, `__init__` scans
`dir()` once per connection).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any


class Verbs(dict[str, Any]):
    """aiosmtpd's verb table (`SMTP._smtp_methods`, consulted once per command line).

    A command method of the listener is bound on its first use and kept: binding all of them
    for every connection, as aiosmtpd's own table does, cost more than a session uses.
    Unknown verbs are answered by `fallback` (so that they count as protocol errors, as every
    other error does) and not kept, so that random verbs cannot grow the table.
    """

    #: The session is ending: commands still buffered are not served (cancelling the
    #: command loop takes effect only at its next wait, after it has read on).
    closed = False

    def __init__(
        self,
        owner: object,
        commands: Mapping[str, Callable[..., Awaitable[None]]],
        fallback: Callable[[str, str | None], Awaitable[None]],
    ) -> None:
        super().__init__()
        self.owner = owner
        self.commands = commands
        self.fallback = fallback

    def get(self, verb: str, default: Any = None) -> Any:  # type: ignore[override]
        if self.closed:
            return ignore
        method = dict.get(self, verb)
        if method is None:
            function = self.commands.get(verb)
            if function is None:
                return functools.partial(self.fallback, verb)
            method = self[verb] = function.__get__(self.owner)
        return method


async def ignore(arg: str | None) -> None:
    return None


class NoHooks:
    """The aiosmtpd "handler" of a Listener: it has no handle_* hooks (dir() is empty)."""

    __slots__ = ()

    def __dir__(self) -> list[str]:
        return []


NO_HOOKS = NoHooks()
SCANNED_NAMES: dict[type, list[str]] = {}
#: Listener class -> its command methods by verb (see Listener._commands).
COMMANDS: dict[type, dict[str, Callable[..., Awaitable[None]]]] = {}


class SameLimit(dict[str, int]):
    """aiosmtpd's per-verb command length limits, one value for every verb."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, verb: str) -> int:
        return self.limit
