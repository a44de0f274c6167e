"""The queryable store behind the viewer: published trees in SQLite (docs/design.md §5).

A sink that can fall behind, so it follows published records instead of sitting on the
ingest path: the server writes JSON lines, and the store's follower, a process of its
own, reads them into the store.

- :mod:`.schema`: the file (tables, indexes, versions and migration) and the named rows
  made from a record (:class:`TreeRow`, :class:`SpanRow`);
- :mod:`.writer`: :class:`SqliteStore`, which writes rows in batches and applies
  retention;
- :mod:`.follower`: :class:`StoreFollower`, the process that tails the JSON-lines file
  into the store and reports its lag;
- :mod:`.reader` and :mod:`.summary`: the query side the viewer uses.
"""

from .follower import FollowerStatus, StoreFollower
from .reader import StoreError, StoreReader
from .schema import SCHEMA_VERSION, SpanRow, TreeRow
from .writer import FollowPosition, SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "FollowPosition",
    "FollowerStatus",
    "SpanRow",
    "SqliteStore",
    "StoreError",
    "StoreFollower",
    "StoreReader",
    "TreeRow",
]
