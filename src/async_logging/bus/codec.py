"""Bus message payloads, compressed or not (docs/design.md §8): sans-I/O.

Every message a node publishes to the bus (events to ``alog.events.<p>``, trees to
``alog.trees.<kind>``) may be compressed with Zstandard: it then carries the header
``Alog-Encoding: zstd`` and its payload is one Zstandard frame that records the size of
what it holds. A message without that header is plain. The option ``bus_compression``
(``zstd``, the default, or ``none``) says what a node publishes; every node reads both, so
a fleet can change it one node at a time.

Why: JetStream writes every byte it stores to its file store and reads it back for the
consumers, and that per-byte work was the largest part of what the bus cost per event
(``bench/scale.py``). Logs compress well (repeated keys, names and hosts): fewer bytes on
the wire, on disk and in JetStream's memory, for a little CPU at each end.

A message is compressed only when that makes it smaller. Its ``Nats-Msg-Id`` is named from
the plain payload (:func:`~async_logging.bus.partition.message_id`), so a copy is dropped
whatever the compression.

Reading is bounded: a frame must say its size and that size must be at most
:data:`MAX_DECODED_BYTES`, or the message is :class:`Unreadable` (counted by the reader,
never expanded).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import zstandard

from ..server.config import BUS_COMPRESSIONS

if TYPE_CHECKING:
    from .jetstream import Outgoing

__all__ = [
    "COMPRESSIONS",
    "ENCODING_HEADER",
    "LEVEL",
    "MAX_DECODED_BYTES",
    "Compressor",
    "Unreadable",
    "decode",
]

#: The header naming a payload's encoding (absent: plain).
ENCODING_HEADER: Final = "Alog-Encoding"
#: What ``bus_compression`` may be.
COMPRESSIONS: Final = BUS_COMPRESSIONS
#: Zstandard's level: its fastest regular one (logs still shrink several times).
LEVEL: Final = 1
#: The most a compressed payload may expand to: NATS's largest ``max_payload`` (64 MiB),
#: which bounds every plain payload a node publishes.
MAX_DECODED_BYTES: Final = 64 * 1024 * 1024


class Unreadable(ValueError):
    """A payload that cannot be decoded: an unknown encoding, a damaged frame, a frame that
    does not say its size or says more than :data:`MAX_DECODED_BYTES`."""


class Compressor:
    """Compresses outgoing messages as ``bus_compression`` says.

    Args:
        compression: ``zstd`` or ``none``.
    """

    def __init__(self, compression: str = "zstd") -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"bus_compression must be one of {', '.join(COMPRESSIONS)}")
        self.compression = compression
        self._zstd = zstandard.ZstdCompressor(level=LEVEL) if compression == "zstd" else None

    def encode(self, message: Outgoing) -> Outgoing:
        """``message`` with its payload compressed (and the header saying so), or as it is
        when compression is off or would not make it smaller."""
        payload = message.payload
        if self._zstd is None:
            return message
        packed = self._zstd.compress(payload)
        if len(packed) >= len(payload):
            return message
        headers = dict(message.headers) if message.headers else {}
        headers[ENCODING_HEADER] = "zstd"
        return message._replace(payload=packed, headers=headers)


_DECOMPRESSOR: Final = zstandard.ZstdDecompressor()


def decode(payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The plain payload of a message read from the bus.

    Raises:
        Unreadable: as the class says.
    """
    encoding = headers.get(ENCODING_HEADER) if headers else None
    if encoding is None:
        return payload
    if encoding != "zstd":
        raise Unreadable(f"unknown {ENCODING_HEADER}: {encoding!r}")
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise Unreadable(f"not a Zstandard frame: {exc}") from None
    if size < 0:
        raise Unreadable("a Zstandard frame that does not say its size")
    if size > MAX_DECODED_BYTES:
        raise Unreadable(f"a Zstandard frame of {size} bytes (at most {MAX_DECODED_BYTES})")
    try:
        plain = _DECOMPRESSOR.decompress(payload)
    except zstandard.ZstdError as exc:
        raise Unreadable(f"a damaged Zstandard frame: {exc}") from None
    if len(plain) != size:  # pragma: no cover - zstd checks the size it was told
        raise Unreadable("a Zstandard frame shorter or longer than it says")
    return plain
