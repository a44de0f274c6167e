"""The module-level API: log through the default client (docs/design.md §6).

These functions work like ``logging.info`` does with the root logger: they use the
*default client*, the first :class:`LogClient` created or the one given to
:func:`configure`. With no client at all they do nothing. The client itself is
:mod:`async_logging.client.client`, transactions are :mod:`async_logging.client.scopes`;
both are re-exported here.

Example::

    from async_logging.client import LogClient, transaction, event

    LogClient(url="ws://proxy:3000/")          # the first client becomes the default

    @transaction("API", "fetch_user")
    async def fetch_user(uid):
        event("DB", "cache-miss", msg=uid, level="INFO", key=uid)
        ...

    with transaction("URL", "/checkout") as tx:
        ...
        tx.status = "402"                       # a failure status of your own
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..exceptions import UsageError
from ..model import ATOMIC
from .client import ClientStats, LogClient
from .context import _scope
from .items import make_item, placement
from .registry import default as _default
from .scopes import Bound, Transaction

__all__ = [
    "ClientStats",
    "LogClient",
    "Transaction",
    "bind",
    "close",
    "configure",
    "event",
    "flush",
    "get_client",
    "heartbeat",
    "log",
    "transaction",
]

_get_scope = _scope.get


def configure(client: LogClient | None = None, **options: Any) -> LogClient:
    """Set the default client used by the module-level functions.

    Args:
        client: the client to use; when omitted one is created from ``options``.
        **options: :class:`LogClient` arguments (``url=``, ``transport=``, …).

    Returns:
        The default client.
    """
    if client is None:
        client = LogClient(default=True, **options)
    elif options:
        raise UsageError("configure() takes a client or options, not both")
    _default.client = client
    return client


def get_client() -> LogClient | None:
    """The default client (``None`` when no client was created)."""
    return _default.client


#: A transaction, as a context manager (sync and async) or a decorator (sync and async):
#: ``transaction(type="URL", name=None, *, uuid=None, parent=None, msg=None, level=None,
#: client=None, **data)``, see :class:`Transaction`. It is the class itself, not a function
#: that makes one: a call less for every transaction on the hot path (docs/design.md §7).
transaction = Transaction


def event(
    type: str,
    name: str | None = None,
    msg: Any = None,
    level: str | None = None,
    *,
    uuid: str | None = None,
    parent: int | str | None = None,
    **data: Any,
) -> None:
    """Log an atomic event through the default client (see :meth:`LogClient.event`)."""
    # The body of LogClient.event, repeated: one call less on the hot path (docs/design.md §7).
    c = _default.client
    if c is None:
        return
    if uuid is None and parent is None:
        item = make_item(ATOMIC, _get_scope(), type, name, level, msg, data)
    else:
        item = make_item(ATOMIC, placement(uuid), type, name, level, msg, data, None, parent)
    c.inbox.put(item)


def heartbeat(
    type: str = "heartbeat",
    name: str | None = None,
    msg: Any = None,
    level: str | None = None,
    **data: Any,
) -> None:
    """Log a heartbeat through the default client (see :meth:`LogClient.heartbeat`)."""
    c = _default.client
    if c is not None:
        c.heartbeat(type, name, msg, level, **data)


def log(event: Mapping[str, Any]) -> None:
    """Enqueue a raw log map through the default client (see :meth:`LogClient.log`)."""
    c = _default.client
    if c is not None:
        c.log(event)


def bind(uuid: str, parent: int | str | None = None, *, client: LogClient | None = None) -> Bound:
    """A scope continuing tree ``uuid`` that started elsewhere.

    Inside the block, events and transactions join ``uuid`` under ``parent`` (default ``0``,
    top level) with ids that cannot collide with the other process's; leaving the block
    sends what was held for ``uuid`` at once (its root ends elsewhere).

    Example::

        with bind(message.headers["uuid"], message.headers["parent"]):
            with transaction("QUEUE", "consume"):
                ...
    """
    return Bound(uuid, parent, client)


def flush(timeout: float | None = 5.0, *, spooled: bool = False) -> bool:
    """Flush the default client (see :meth:`LogClient.flush`); ``True`` with no client."""
    c = _default.client
    return True if c is None else c.flush(timeout, spooled=spooled)


def close(timeout: float | None = 5.0) -> bool:
    """Close the default client (see :meth:`LogClient.close`); ``True`` with no client."""
    c = _default.client
    return True if c is None else c.close(timeout)
