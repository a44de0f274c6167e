"""The JetStream side of the bus: settings, connecting, the two streams, pipelined publishes.

A thin shell over nats-py (``nats.connect``, ``js.add_stream``, ``js.add_consumer``,
pull subscriptions). What it adds:

- :class:`BusSettings`: the bus options of :class:`~async_logging.server.ServerConfig`;
- :func:`connect`: a connection that reconnects forever, counting what goes wrong;
- :func:`ensure_streams`: the events stream (work queue: a message is gone once its
  reassembler acked it; ``alog.events.<p>``) and the trees stream (kept by age and size,
  each sink with its own durable consumer; ``alog.trees.<kind>``), created when missing with
  the configured replicas and limits;
- :class:`Publisher`: many messages published at once, each with its ``Nats-Msg-Id``,
  waiting for all their acks (JetStream's publish protocol, as ``js.publish_async`` speaks
  it, with one future per batch instead of one per message: a tree is one message, and a
  future per message cost more than the rest of the reassembler's work per tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

from ..exceptions import ConfigError, LimitExceeded
from .codec import Compressor
from .partition import EVENTS_SUBJECT, TREES_SUBJECT

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from ..server.config import ServerConfig

__all__ = [
    "EVENTS_STREAM",
    "MSG_ID",
    "TREES_STREAM",
    "BusLink",
    "BusSettings",
    "BusUnavailable",
    "Outgoing",
    "Publisher",
    "connect",
    "ensure_streams",
    "with_id",
]

log = logging.getLogger("async_logging.bus")

#: The stream of accepted events, one subject per partition.
EVENTS_STREAM: Final = "ALOG_EVENTS"
#: The stream of published records (trees and records of their own).
TREES_STREAM: Final = "ALOG_TREES"
#: Seconds between two tries to reach the bus when it cannot be reached.
RECONNECT_WAIT: Final = 0.5
#: Seconds between two log lines about the bus's errors (each is counted).
ERROR_LOG_EVERY: Final = 30.0
#: Bytes nats-py may buffer while the connection is down (then publishing fails at once).
PENDING_BYTES: Final = 64 * 1024 * 1024
#: The header JetStream drops copies by (within its duplicate window).
MSG_ID: Final = "Nats-Msg-Id"


class BusUnavailable(LimitExceeded):
    """The bus did not take a batch: unreachable, no quorum, full, or too slow (503).

    On the wire the refusal's reason is ``overloaded``, one every client already keeps and
    resends the frame for (a reason it did not know would make it split the frame as if its
    content were bad); :attr:`bus_reason` (``bus_unavailable``, ``bus_full``) is in the
    detail, the bus's counters and ``/ecv``.
    """

    def __init__(self, bus_reason: str, detail: str) -> None:
        super().__init__("overloaded", f"{bus_reason}: {detail}", status=503)
        self.bus_reason = bus_reason


@dataclass(frozen=True, slots=True)
class BusSettings:
    """The bus options (docs/design.md §8, §10), from the server's.

    Attributes:
        servers: NATS URLs (any member of the cluster; the client learns the rest).
        partitions: subjects ``alog.events.0`` .. ``alog.events.<partitions - 1>``; fixed
            when the events stream is created (recorded in its description).
        replicas: copies of each stream in the JetStream cluster (1, 3 or 5).
        max_bytes: size of each stream; past it the events stream refuses new batches
            (``bus_full``, the client resends) and the trees stream drops its oldest trees.
        max_age: seconds the trees stream keeps a tree for its sinks (the events stream
            keeps an event until its reassembler acks it).
        ack_wait: seconds JetStream waits for a reassembler's ack before it delivers a
            message again; held messages get in-progress acks every third of it.
        max_ack_pending: unacked messages per partition; past it JetStream delivers no more
            to that partition's reassembler until some are acked.
        duplicate_window: seconds JetStream remembers message ids to drop copies.
        timeout: seconds a publish may wait for JetStream's ack before the batch is refused.
        compression: what this node's messages are published with: ``zstd`` or ``none``
            (:mod:`async_logging.bus.codec`; every node reads both).
    """

    servers: tuple[str, ...]
    partitions: int = 16
    replicas: int = 1
    max_bytes: int = 1024 * 1024 * 1024
    max_age: float = 24 * 3600.0
    ack_wait: float = 30.0
    max_ack_pending: int = 20_000
    duplicate_window: float = 120.0
    timeout: float = 5.0
    compression: str = "zstd"

    @classmethod
    def from_config(cls, c: ServerConfig) -> BusSettings:
        """The bus options of ``c`` (``c.bus`` must be set)."""
        servers = tuple(s.strip() for s in c.bus.split(",") if s.strip())
        if not servers:
            raise ConfigError("option bus needs at least one nats:// URL")
        return cls(
            servers=servers,
            partitions=c.partitions,
            replicas=c.bus_replicas,
            max_bytes=c.bus_max_bytes,
            max_age=c.bus_max_age,
            ack_wait=c.bus_ack_wait,
            max_ack_pending=c.bus_max_ack_pending,
            duplicate_window=c.bus_duplicate_window,
            timeout=c.bus_timeout,
            compression=c.bus_compression,
        )


async def connect(
    settings: BusSettings, name: str, errors: Counter[str], closing: asyncio.Event | None = None
) -> Client:
    """Connect to the bus, trying again every :data:`RECONNECT_WAIT` seconds until it answers;
    the connection then reconnects by itself, forever.

    ``errors`` counts what goes wrong, by kind (``connect``, ``disconnected``, ``error``).
    Cancel the caller to give up. Once ``closing`` is set, a disconnection is not one.
    """
    import nats

    last_logged = -ERROR_LOG_EVERY

    async def on_error(exc: Exception) -> None:
        # Each failed reconnect is an error here: counted, logged once per interval.
        nonlocal last_logged
        errors["error"] += 1
        now = time.monotonic()
        if now - last_logged >= ERROR_LOG_EVERY:
            last_logged = now
            log.warning("bus: %s (%d errors so far)", exc, errors["error"])

    async def on_disconnect() -> None:
        if closing is not None and closing.is_set():
            return  # our own close
        errors["disconnected"] += 1
        log.warning("bus: disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.warning("bus: reconnected")

    warned = False
    while True:
        try:
            return await nats.connect(
                list(settings.servers),
                name=name,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                connect_timeout=max(1, int(settings.timeout)),
                reconnect_time_wait=RECONNECT_WAIT,
                max_reconnect_attempts=-1,
                pending_size=PENDING_BYTES,
                allow_reconnect=True,
            )
        except Exception as exc:  # nats-py raises its own errors and OSErrors alike
            errors["connect"] += 1
            if not warned:
                log.error(
                    "bus: cannot reach %s (%s); trying again", ", ".join(settings.servers), exc
                )
                warned = True
            await asyncio.sleep(RECONNECT_WAIT)


async def ensure_streams(js: JetStreamContext, settings: BusSettings) -> None:
    """Create the events and trees streams when missing; check the partitions of one that
    exists.

    Raises:
        ConfigError: the events stream was made for another number of partitions.
        nats.js.errors.Error: JetStream refused (not enabled, no quorum yet...).
    """
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    described = f"async-logging events; partitions={settings.partitions}"
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=EVENTS_STREAM,
                description=described,
                subjects=[f"{EVENTS_SUBJECT}.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                discard=DiscardPolicy.NEW,
                max_bytes=settings.max_bytes,
                storage=StorageType.FILE,
                num_replicas=settings.replicas,
                duplicate_window=settings.duplicate_window,
            )
        )
    else:
        if info.config.description != described:
            raise ConfigError(
                f"the bus's stream {EVENTS_STREAM} was made for other partitions "
                f"({info.config.description!r}); this node has partitions={settings.partitions}"
            )
    try:
        await js.stream_info(TREES_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=TREES_STREAM,
                description="async-logging published trees",
                subjects=[f"{TREES_SUBJECT}.*"],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_bytes=settings.max_bytes,
                max_age=settings.max_age,
                storage=StorageType.FILE,
                num_replicas=settings.replicas,
                duplicate_window=settings.duplicate_window,
            )
        )


async def stream_partitions(js: JetStreamContext) -> int | None:
    """The partitions the events stream was made for (None: no stream yet)."""
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(EVENTS_STREAM)
    except NotFoundError:
        return None
    _, sep, n = (info.config.description or "").partition("partitions=")
    return int(n) if sep and n.isdigit() else None


class Outgoing(NamedTuple):
    """One message to publish: its subject, payload and headers (``Nats-Msg-Id``...)."""

    subject: str
    payload: bytes
    headers: dict[str, str] | None


def with_id(subject: str, payload: bytes, msg_id: str) -> Outgoing:
    """A message named ``msg_id`` (JetStream drops another of the same name)."""
    return Outgoing(subject, payload, {MSG_ID: msg_id})


class Published(NamedTuple):
    """What JetStream answered for a batch: each message's stream sequence, and how many it
    dropped as duplicates of messages it already had."""

    seqs: list[int]
    duplicates: int


class _Batch:
    __slots__ = ("done", "duplicates", "error", "left", "seqs")

    def __init__(self, n: int) -> None:
        self.left = n
        self.seqs = [0] * n
        self.duplicates = 0
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Publisher:
    """Publishes batches of messages to JetStream and waits until every one is stored.

    Each message is a plain publish with a reply subject under one inbox of this publisher;
    JetStream answers each with a publish ack (or an error) there. Messages of one batch are
    sent back to back, so they are stored in order.

    Args:
        nc: a connected client.
        compression: ``zstd`` or ``none``: what payloads are published with
            (:class:`~async_logging.bus.codec.Compressor`).
    """

    def __init__(self, nc: Client, compression: str = "none") -> None:
        self._nc = nc
        #: Compresses each message.
        self.compressor = Compressor(compression)
        #: Plain bytes of the messages stored, and the bytes sent for them (``/metrics``;
        #: counted once JetStream stored them: a retried batch counts once).
        self.payload_bytes = 0
        self.sent_bytes = 0
        self._prefix = nc.new_inbox()
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count()
        self._started = False

    async def _start(self) -> None:
        await self._nc.subscribe(self._prefix + ".*.*", cb=self._on_ack)
        self._started = True

    async def publish(self, messages: Sequence[Outgoing], timeout: float) -> Published:
        """Publish ``messages`` and wait for JetStream to store (or drop as duplicates) all.

        Raises:
            BusUnavailable: ``bus_unavailable`` (no ack within ``timeout``, no stream, no
                connection) or ``bus_full`` (the stream is at its limit). Some messages
                may have been stored: publishing the batch again is safe (message ids).
        """
        if not messages:
            return Published([], 0)
        if not self._started:
            await self._start()
        token = str(next(self._ids))
        batch = self._batches[token] = _Batch(len(messages))
        reply = f"{self._prefix}.{token}."
        nc = self._nc
        encoded = [self.compressor.encode(m) for m in messages]
        try:
            for i, (subject, payload, headers) in enumerate(encoded):
                await nc.publish(subject, payload, reply=reply + str(i), headers=headers)
            async with asyncio.timeout(timeout):
                await batch.done
        except TimeoutError:
            raise BusUnavailable(
                "bus_unavailable", f"the bus did not store the batch within {timeout:g} s"
            ) from None
        except BusUnavailable:
            raise
        except Exception as exc:  # nats-py: connection closed, outbound buffer full...
            raise BusUnavailable("bus_unavailable", f"the bus refused the batch: {exc}") from exc
        finally:
            self._batches.pop(token, None)
        if batch.error is not None:
            reason = (
                "bus_full"
                if "maximum" in batch.error or "exceeded" in batch.error
                else ("bus_unavailable")
            )
            raise BusUnavailable(reason, f"the bus refused the batch: {batch.error}")
        self.payload_bytes += sum(len(m.payload) for m in messages)
        self.sent_bytes += sum(len(m.payload) for m in encoded)
        return Published(batch.seqs, batch.duplicates)

    async def _on_ack(self, msg: Msg) -> None:
        token, _, index = msg.subject[len(self._prefix) + 1 :].partition(".")
        batch = self._batches.get(token)
        if batch is None or batch.done.done():
            return  # answered after its batch timed out: the resend is a duplicate
        if not msg.data:  # a status without a body: no responders (no stream), 503
            status = (msg.headers or {}).get("Status", "")
            batch.error = f"no stream answered (status {status or 'unknown'})"
            batch.done.set_result(None)
            return
        try:
            answer: Any = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            answer = {"error": {"description": "an unreadable publish ack"}}
        error = answer.get("error") if isinstance(answer, dict) else None
        if error is not None:
            batch.error = str(error.get("description") or error)
            batch.done.set_result(None)
            return
        batch.seqs[int(index)] = int(answer.get("seq", 0))
        if answer.get("duplicate"):
            batch.duplicates += 1
        batch.left -= 1
        if batch.left == 0:
            batch.done.set_result(None)


class BusLink:
    """One node's connection to the bus, made in the background: connect (trying again
    until the bus answers), make sure the streams exist, then :attr:`ready` is set.

    While it is not ready, or while the connection is down, :attr:`up` is False: an ingest
    node refuses batches, and every node's ``/ecv`` says ``bus_unavailable``.

    Args:
        settings: the bus options.
        name: the client name the NATS servers show for this node.
        streams: make the streams when missing (ingest nodes and reassemblers); a sink
            only waits for them.
    """

    def __init__(self, settings: BusSettings, name: str, *, streams: bool = True) -> None:
        self.settings = settings
        self.name = name
        self._streams = streams
        #: What went wrong with the bus, by kind (``connect``, ``disconnected``, ``error``,
        #: ``streams``): ``async_logging_bus_errors_total``.
        self.errors: Counter[str] = Counter()
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.publisher: Publisher | None = None
        self.ready = asyncio.Event()
        #: Set when the streams could not be made as configured (a fatal setup error).
        self.failure: ConfigError | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    @property
    def up(self) -> bool:
        """Whether the bus can be used now (ready and connected)."""
        nc = self.nc
        return self.ready.is_set() and nc is not None and nc.is_connected

    def byte_counts(self) -> dict[str, int]:
        """Payload bytes this node published, before and after compression (``/metrics``)."""
        publisher = self.publisher
        if publisher is None:
            return {"payload_bytes": 0, "sent_bytes": 0}
        return {"payload_bytes": publisher.payload_bytes, "sent_bytes": publisher.sent_bytes}

    def start(self) -> None:
        """Begin connecting (in a task of the running loop)."""
        self._task = asyncio.create_task(self._run(), name=f"bus-link-{self.name}")

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until ready.

        Raises:
            ConfigError: the streams exist with other settings.
            TimeoutError: not ready within ``timeout``.
        """
        async with asyncio.timeout(timeout):
            while not self.ready.is_set():
                if self.failure is not None:
                    raise self.failure
                task = self._task
                if task is not None and task.done():
                    task.result()
                await asyncio.sleep(0.05)

    async def _run(self) -> None:
        nc = self.nc = await connect(self.settings, self.name, self.errors, self._closing)
        js = self.js = nc.jetstream(timeout=self.settings.timeout)
        self.publisher = Publisher(nc, self.settings.compression)
        warned = False
        while True:
            try:
                if self._streams:
                    await ensure_streams(js, self.settings)
                else:
                    await js.stream_info(TREES_STREAM)
                break
            except ConfigError as exc:
                self.failure = exc
                log.error("bus: %s", exc)
                return
            except Exception as exc:  # no JetStream quorum yet, stream not made yet...
                self.errors["streams"] += 1
                if not warned:
                    log.warning("bus: the streams are not ready (%s); trying again", exc)
                    warned = True
                await asyncio.sleep(RECONNECT_WAIT)
        self.ready.set()

    async def close(self) -> None:
        """Flush what is buffered (acks, naks) and close the connection."""
        self._closing.set()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        nc = self.nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=max(1, int(self.settings.timeout)))
            with contextlib.suppress(Exception):
                await nc.close()
