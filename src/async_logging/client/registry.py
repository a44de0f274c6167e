"""Which clients are open, and which one is the *default client*.

Module-level functions (``event()``, ``transaction()``, …), :class:`LogHandler` and the
other bridges log through the default client, the way ``logging.info`` uses the root
logger: the first :class:`~async_logging.client.LogClient` created, or the one given to
:func:`~async_logging.client.configure`. The set of open clients is what the exit-time
flush and the fork handler walk.

This module only holds the two; it imports nothing of the client at run time, so every
module of the package can read it without an import cycle.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .client import LogClient

__all__ = ["DefaultClient", "clients", "default"]


class DefaultClient:
    """A cell holding the default client (``None``: there is none, logging does nothing).

    A cell, not a function, because the module-level ``event()`` reads it on every call
    (docs/design.md §7): one attribute load.
    """

    __slots__ = ("client",)

    def __init__(self) -> None:
        self.client: LogClient | None = None


#: The default client of the module-level API.
default: Final = DefaultClient()

#: Every client not closed yet (weakly: a client nobody holds can go).
clients: Final[weakref.WeakSet[LogClient]] = weakref.WeakSet()
