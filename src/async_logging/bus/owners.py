"""One reassembler per partition: leases on a JetStream key-value bucket (docs/design.md §8).

Two processes feeding one partition would each hold part of its trees and publish them
broken, so a reassembler takes a *lease* on each partition before it binds the partition's
consumer: the key ``p<n>`` of the bucket ``ALOG_OWNERS``, created only if absent (JetStream
refuses a second create: no protocol of ours decides), naming its holder. The bucket's TTL
(``bus_ack_wait`` when it is made) drops a key nobody renewed; the holder renews every third
of it, each time checking that the key is still the one it wrote (the revision).

- A second process for a taken partition waits, says so in its log and ``/ecv``
  (``partition_owned``, with the holder), and takes the partition once it is free: at its
  next try (every third of the TTL) after the holder's SIGTERM, which deletes its keys; one
  TTL after a kill -9.
- A holder that cannot renew in time (cut off from the bus longer than two thirds of the
  TTL) no longer trusts its lease: before anything more is published (a retry included),
  carried or acked it renews or gives the partition up, handing its held messages back and
  dropping its engine's state; the next holder replays them.

:class:`Lease` is the bookkeeping (no I/O); :class:`Owners` speaks to the bucket.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from .jetstream import BusSettings

__all__ = ["OWNERS_BUCKET", "Lease", "Owners", "holder_name"]

log = logging.getLogger("async_logging.bus")

#: The key-value bucket of partition leases.
OWNERS_BUCKET: Final = "ALOG_OWNERS"
#: A lease is renewed every this share of the bucket's TTL...
RENEW_SHARE: Final = 1 / 3
#: ...and no longer trusted past this share of it without a renewal.
TRUST_SHARE: Final = 2 / 3


def holder_name(machine: str) -> str:
    """What a lease says of its holder: machine, pid and a random tag (two processes never
    write the same)."""
    return f"{machine or socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"


@dataclass(slots=True)
class Lease:
    """One partition's lease as its holder sees it.

    Attributes:
        revision: the key's revision this process wrote last (0: not held).
        renewed_at: when (monotonic seconds) that write was acknowledged.
        ttl: the bucket's TTL in seconds.
    """

    ttl: float
    revision: int = 0
    renewed_at: float = 0.0

    @property
    def held(self) -> bool:
        return self.revision > 0

    def due(self, now: float) -> bool:
        """Time to renew."""
        return self.held and now - self.renewed_at >= self.ttl * RENEW_SHARE

    def trusted(self, now: float) -> bool:
        """Whether the partition is surely still ours: renewed within :data:`TRUST_SHARE` of
        the TTL (the bucket drops the key only after the whole TTL)."""
        return self.held and now - self.renewed_at < self.ttl * TRUST_SHARE

    def took(self, revision: int, now: float) -> None:
        self.revision = revision
        self.renewed_at = now

    def lost(self) -> None:
        self.revision = 0


class Owners:
    """A reassembler's leases, one per partition it runs.

    Args:
        settings: the bus options (the TTL of a bucket this makes: ``ack_wait``).
        me: what the leases say of this process (:func:`holder_name`).
    """

    def __init__(self, settings: BusSettings, me: str) -> None:
        self.settings = settings
        self.me = me.encode()
        self._kv: KeyValue | None = None
        self.ttl = settings.ack_wait

    async def bucket(self, js: JetStreamContext) -> KeyValue:
        """The bucket, made when missing (its TTL, if another node made it, is used)."""
        if self._kv is not None:
            return self._kv
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError, NotFoundError

        try:
            kv = await js.key_value(OWNERS_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=OWNERS_BUCKET,
                    description="async-logging: which reassembler runs each partition",
                    history=1,
                    ttl=self.settings.ack_wait,
                    storage=StorageType.FILE,
                    replicas=self.settings.replicas,
                )
            )
        ttl = (await kv.status()).ttl
        if ttl:
            self.ttl = float(ttl)
        self._kv = kv
        return kv

    async def take(
        self, js: JetStreamContext, partition: int, lease: Lease, now: float
    ) -> str | None:
        """Try to take ``partition``: ``""`` when it is ours now, its holder's name when
        another process holds it, None when the key changed meanwhile (try again at once).

        Raises:
            nats errors: the bucket cannot be reached (the caller tries again).
        """
        from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError

        kv = await self.bucket(js)
        lease.ttl = self.ttl
        key = _key(partition)
        try:
            revision = await kv.create(key, self.me)
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):  # gone meanwhile: free now
                return None
            if entry.value != self.me or entry.revision is None:
                return (entry.value or b"").decode(errors="replace") or "someone"
            # Our own lease, given up when it could not be renewed: take it back.
            try:
                revision = await kv.update(key, self.me, last=entry.revision)
            except KeyWrongLastSequenceError:
                return None
        lease.took(revision, now)
        return ""

    async def renew(self, js: JetStreamContext, partition: int, lease: Lease, now: float) -> bool:
        """Renew the lease; False (and the lease is dropped) when the key is no longer the
        one this process wrote: taken by another, or expired.

        Raises:
            nats errors: the bucket cannot be reached (the lease stands until untrusted).
        """
        from nats.js.errors import KeyWrongLastSequenceError

        kv = await self.bucket(js)
        try:
            revision = await kv.update(_key(partition), self.me, last=lease.revision)
        except KeyWrongLastSequenceError:
            lease.lost()
            return False
        lease.took(revision, now)
        return True

    async def release(self, js: JetStreamContext, partition: int, lease: Lease) -> None:
        """Give the partition up at once (a stop): the next holder need not wait the TTL."""
        if not lease.held:
            return
        kv = await self.bucket(js)
        try:
            await kv.delete(_key(partition), last=lease.revision)
        except Exception as exc:  # taken meanwhile, or the bus is gone: it expires
            log.debug("partition %d: lease not released (%s)", partition, exc)
        lease.lost()


def _key(partition: int) -> str:
    return f"p{partition}"
