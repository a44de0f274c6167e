"""The SQLite store's former home, kept so that configurations naming it keep working.

The store is :mod:`async_logging.store` now (schema, writer, follower, reader, summary).
``publisher = "async_logging.publishers.sqlite:SqliteStore"`` still plugs the store in as
an ordinary publisher (on the publisher thread); the server's own store follows the
JSON-lines file instead (``store``).
"""

from ..store.reader import (
    QUERY_TIMEOUT,
    SEARCH_DEFAULT_LIMIT,
    SEARCH_MAX_LIMIT,
    StoreError,
    StoreReader,
)
from ..store.schema import FLAGS, SCHEMA_VERSION
from ..store.summary import SUMMARY_MAX_GROUPS, SUMMARY_MAX_SPANS
from ..store.writer import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_PATH, SqliteStore

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PATH",
    "FLAGS",
    "QUERY_TIMEOUT",
    "SCHEMA_VERSION",
    "SEARCH_DEFAULT_LIMIT",
    "SEARCH_MAX_LIMIT",
    "SUMMARY_MAX_GROUPS",
    "SUMMARY_MAX_SPANS",
    "SqliteStore",
    "StoreError",
    "StoreReader",
]
