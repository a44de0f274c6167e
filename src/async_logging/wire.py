"""Sans-I/O decoding of what clients send, and encoding of what the server answers.

This module turns the bytes of one WebSocket frame or one ``POST /log`` body into a
:class:`Frame` (docs/design.md §4). It imports no asyncio and no sockets: the server hands it
bytes and gets back log maps, or a :class:`~async_logging.exceptions.BadInput` naming what
is wrong.

Wire format
-----------
A payload is MessagePack (binary WebSocket frames, ``application/msgpack``) or JSON (text
frames, ``application/json``) and holds one of:

- one log map: ``{"clazz": "begin", "uuid": ..., ...}`` (a map *without* a ``logs`` key);
- an array of log maps: ``[{...}, {...}]``;
- an **envelope**: ``{"seq": 7, "logs": [{...}, ...]}``: a map whose ``logs`` is an array;
  ``seq``, optional, is a non-negative integer the server acknowledges with
  ``{"ack": 7}`` (:func:`encode_ack`) once the batch is accepted.

HTTP bodies may also be ``application/x-www-form-urlencoded``: either a ``logs`` field that
holds the JSON above, or the 2013 Node transport's bracket encoding
``logs[0][uuid]=...&logs[0][pid]=7627&logs[1][...]=...`` (every value a string; see
:func:`decode_form`). Errors are answered with ``{"error": reason, "detail": ..., "seq": ...}``
(:func:`encode_error`).

Items of ``logs`` that are not maps are passed through: the engine rejects them one by one,
so one bad item never costs the good ones.

Limits
------
Every payload is checked against named limits (:class:`WireLimits`, seed defaults):

=========================  ===========  =====================  ======
limit                      default      reason                 status
=========================  ===========  =====================  ======
``max_message_bytes``      4 MiB        ``message_too_big``    413
``max_events_per_frame``   10 000       ``too_many_events``    413
``max_depth``              32           ``too_deep``           400
``max_string_length``      65 536       ``string_too_long``    400
``max_keys_per_map``       256          ``too_many_keys``      400
``max_array_length``       10 000       ``array_too_long``     per event
``max_record_bytes``       8 MiB        ``record_too_big``     per event
=========================  ===========  =====================  ======

The size is checked before decoding. Depth, string length and keys per map are checked
inside log maps (keys and values, at every level) and reject the **whole frame**: a client
that sends such an event is misbehaving, and a per-frame check is what keeps the common
path cheap (below). The last two refuse **one event**: a log map holding an array longer
than ``max_array_length`` (at any level), or whose JSON (compact, as a sink writes it)
would be longer than ``max_record_bytes``, is replaced in ``logs`` by a
:class:`~async_logging.model.RefusedEvent`, which the engine refuses under its index while
it takes the events beside it. They are about size, not about a misbehaving client: a
MessagePack nil (1 byte) is ``null`` in JSON, so a 4 MiB frame of nils inside one event would
otherwise become a 20 MB record. No log map is measured unless the payload is large enough
to hold one over the limit (:data:`RECORD_EXPANSION`). Other reasons: ``bad_msgpack``,
``bad_json``, ``bad_utf8``,
``msgpack_ext`` (extension types, the MessagePack timestamp included), ``msgpack_bin``
(binary values, which a JSON sink cannot write), ``bad_key`` (a map key that is not a
string), ``bad_envelope``, ``bad_payload``, ``bad_form`` and ``unsupported_media_type``
(status 415).

How the checks stay cheap
-------------------------
The server's target is hundreds of thousands of events per second (docs/design.md §7), so a
Python walk over every value (which costs as much as the decode itself) is off the common
path. Each payload is first decoded by a *typed* msgspec decoder whose schema encodes the
limits: scalar values, string values bounded by ``max_string_length``, maps bounded by
``max_keys_per_map``, nesting unrolled to a few levels, and ``logs`` bounded by
``max_events_per_frame``. msgspec checks all that in C while it builds the very same dicts
it would build untyped. The one check left is the length of the log maps' own keys (those
are plain ``str`` in the schema because constraining them disables msgspec's key cache):
it is needed only when the payload is longer than ``max_string_length`` (for MessagePack,
only when it holds a long-string header that could announce such a key) and is done in C
over the union of the maps' key sets.

Anything the typed decoder refuses (a non-map item, a single bare log map, deeper nesting,
a timestamp, an over-limit value or array, a malformed payload) is decoded again untyped and
walked in Python (:func:`_decode_slow`), which is the reference behaviour: the fast path
only ever accepts a subset of what the slow path accepts, with the same result.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Final, NamedTuple, NoReturn, Union
from urllib.parse import parse_qsl

import msgspec
import orjson

from .exceptions import BadInput, ConfigError, DecodeError, InvalidEvent, LimitExceeded
from .model import RefusedEvent

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_ARRAY_LENGTH",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_EVENTS_PER_FRAME",
    "DEFAULT_MAX_KEYS_PER_MAP",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_STRING_LENGTH",
    "EVENT_REASONS",
    "FORM_INT_KEYS",
    "FRAME_REASONS",
    "MAX_SEQ",
    "RECORD_EXPANSION",
    "Frame",
    "WireLimits",
    "decode_form",
    "decode_http_body",
    "decode_json",
    "decode_msgpack",
    "decode_multipart_fields",
    "encode_ack",
    "encode_error",
    "is_msgpack_type",
    "peek_seq",
]

#: Largest message (WebSocket frame or HTTP body) in bytes; the seed's 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Largest number of items in one frame's ``logs``.
DEFAULT_MAX_EVENTS_PER_FRAME: Final = 10_000
#: Deepest nesting of maps and arrays in one log map (the log map itself is level 1).
DEFAULT_MAX_DEPTH: Final = 32
#: Longest string (key or value, in characters) anywhere in a log map.
DEFAULT_MAX_STRING_LENGTH: Final = 64 * 1024
#: Most keys in any one map of a log map (the log map itself included).
DEFAULT_MAX_KEYS_PER_MAP: Final = 256
#: Most items in any one array inside a log map.
DEFAULT_MAX_ARRAY_LENGTH: Final = 10_000
#: Longest log map once written as compact JSON, in bytes: twice the largest message, so
#: that any log map that fits in a message fits unless it is mostly values that grow in
#: JSON (nils, booleans, small numbers, control characters).
DEFAULT_MAX_RECORD_BYTES: Final = 2 * DEFAULT_MAX_MESSAGE_BYTES
#: No payload byte becomes more than this many bytes of compact JSON: a MessagePack false
#: (1 byte) is ``false,``, a control character ``\u0001``; a character of JSON text or of a
#: form never grows more. So a payload of ``n`` bytes (or characters) cannot hold a log map
#: longer than ``RECORD_EXPANSION * n`` bytes of JSON, and below the limit nothing is measured.
RECORD_EXPANSION: Final = 6

#: Keys of a bracket-encoded form event whose numeric strings become ints (the Node HTTP
#: transport sends every value as a string; docs/design.md §4 asks for ``duration``/``timestamp``).
FORM_INT_KEYS: Final = frozenset({"duration", "timestamp", "pid"})

#: How many levels of nesting below a log map the typed fast path covers; deeper events go
#: the slow way. The schema grows as 2**n (msgspec expands unions): 6 levels take ~6 ms
#: to build, once per distinct limits; 10 would take ~120 ms.
_FAST_NESTING: Final = 6


#: The largest envelope ``seq``: an unsigned 64-bit integer (what an ack can carry; a
#: larger one is refused before the batch is taken, never acked wrongly).
MAX_SEQ: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Named limits every decoded payload is checked against.

    Attributes:
        max_message_bytes: largest payload in bytes (checked before decoding);
            ``message_too_big``, status 413.
        max_events_per_frame: most items in one frame's ``logs`` (and largest bracket
            index + 1 in a form); ``too_many_events``, status 413.
        max_depth: deepest nesting of maps and arrays inside one log map, the log map
            itself being level 1; ``too_deep``, status 400.
        max_string_length: longest string, key or value, in characters, anywhere in a
            log map; ``string_too_long``, status 400.
        max_keys_per_map: most keys in any map inside a log map, the log map included;
            ``too_many_keys``, status 400.
        max_array_length: most items in any array inside a log map; the event is refused
            alone, ``array_too_long``.
        max_record_bytes: longest log map once written as compact JSON (as orjson writes
            it, before the engine maps it), in bytes; the event is refused alone,
            ``record_too_big``.

    Raises:
        ConfigError: when a limit is not a positive integer.
    """

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_events_per_frame: int = DEFAULT_MAX_EVENTS_PER_FRAME
    max_depth: int = DEFAULT_MAX_DEPTH
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH
    max_keys_per_map: int = DEFAULT_MAX_KEYS_PER_MAP
    max_array_length: int = DEFAULT_MAX_ARRAY_LENGTH
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"WireLimits.{name} must be a positive integer, not {value!r}")


#: The limits used when none are given.
DEFAULT_LIMITS: Final = WireLimits()


class Frame(NamedTuple):
    """One decoded payload.

    Attributes:
        seq: the envelope's sequence number, ``None`` when the payload is not an
            envelope or the envelope has no ``seq``.
        logs: the log items in order; each should be a ``dict`` but may not be (the
            engine rejects non-maps one by one), and a log map refused alone is a
            :class:`~async_logging.model.RefusedEvent` (the engine refuses it too).
    """

    seq: int | None
    logs: list[Any]


#: ``Frame(seq, logs)`` without the generated ``__new__``'s Python call (the hot path).
_new_frame: Final = tuple.__new__


# --------------------------------------------------------------------------- errors

#: Every reason this module refuses a whole frame or body with (``bad_input{reason}``,
#: exported at 0 from the start: docs/design.md §4).
FRAME_REASONS: Final = (
    "message_too_big",
    "too_many_events",
    "too_deep",
    "string_too_long",
    "too_many_keys",
    "bad_msgpack",
    "bad_json",
    "bad_utf8",
    "msgpack_ext",
    "msgpack_bin",
    "bad_key",
    "bad_envelope",
    "bad_payload",
    "bad_form",
    "unsupported_media_type",
)
#: Every reason this module refuses one event with, the others beside it taken.
EVENT_REASONS: Final = ("array_too_long", "record_too_big")


def _too_big(size: int, limits: WireLimits) -> LimitExceeded:
    return LimitExceeded(
        "message_too_big",
        f"message of {size} bytes is over the limit of {limits.max_message_bytes}",
    )


def _too_many_events(count: int, limits: WireLimits) -> LimitExceeded:
    return LimitExceeded(
        "too_many_events",
        f"{count} events in one frame, over the limit of {limits.max_events_per_frame}",
    )


def _too_deep(limits: WireLimits) -> LimitExceeded:
    return LimitExceeded(
        "too_deep", f"a log map nests deeper than {limits.max_depth} levels", status=400
    )


def _string_too_long(length: int, limits: WireLimits) -> LimitExceeded:
    return LimitExceeded(
        "string_too_long",
        f"a string of {length} characters is over the limit of {limits.max_string_length}",
        status=400,
    )


def _too_many_keys(count: int, limits: WireLimits) -> LimitExceeded:
    return LimitExceeded(
        "too_many_keys",
        f"a map of {count} keys is over the limit of {limits.max_keys_per_map}",
        status=400,
    )


def _array_too_long(length: int, limits: WireLimits) -> RefusedEvent:
    return RefusedEvent(
        InvalidEvent(
            "array_too_long",
            f"an array of {length} items is over the limit of {limits.max_array_length}",
        )
    )


def _record_too_big(size: int, limits: WireLimits) -> RefusedEvent:
    return RefusedEvent(
        InvalidEvent(
            "record_too_big",
            f"a log map of {size} bytes as JSON is over the limit of {limits.max_record_bytes}",
        )
    )


def _raise_ext(code: int, data: memoryview) -> NoReturn:
    # msgspec calls this for every extension type except the timestamp (-1), which it
    # decodes to a datetime; the walk catches that one.
    raise DecodeError("msgpack_ext", f"MessagePack extension type {code} is not accepted")


# --------------------------------------------------------------------------- decoders


class _Decoders(NamedTuple):
    fast_msgpack: msgspec.msgpack.Decoder[Any]
    fast_json: msgspec.json.Decoder[Any]


_ANY_MSGPACK: Final = msgspec.msgpack.Decoder(ext_hook=_raise_ext)
_ANY_JSON: Final = msgspec.json.Decoder()


#: Decoders by ``id(limits)``, the limits kept alive beside them: hashing the frozen
#: dataclass costs more than a small frame's share of decoding.
_DECODERS_BY_ID: dict[int, tuple[WireLimits, _Decoders]] = {}


def _decoders(limits: WireLimits) -> _Decoders:
    """The typed decoders for ``limits``, built once per distinct value."""
    entry = _DECODERS_BY_ID.get(id(limits))
    if entry is not None and entry[0] is limits:
        return entry[1]
    decoders = _build_decoders(limits)
    if len(_DECODERS_BY_ID) >= 64:
        _DECODERS_BY_ID.clear()
    _DECODERS_BY_ID[id(limits)] = (limits, decoders)
    return decoders


@lru_cache(maxsize=16)
def _build_decoders(limits: WireLimits) -> _Decoders:
    """Typed decoders whose schema enforces ``limits`` (the fast path, see module doc)."""
    bounded_str = Annotated[str, msgspec.Meta(max_length=limits.max_string_length)]
    scalar: Any = Union[None, bool, int, float, bounded_str]  # noqa: UP007 (a runtime type)
    value: Any = scalar
    for _ in range(min(limits.max_depth - 1, _FAST_NESTING)):
        nested_map = Annotated[
            dict[bounded_str, value],
            msgspec.Meta(max_length=limits.max_keys_per_map),
        ]
        array = Annotated[list[value], msgspec.Meta(max_length=limits.max_array_length)]
        value = Union[scalar, array, nested_map]  # noqa: UP007
    # The log map's own keys stay plain str: a constrained key type disables msgspec's key
    # cache and halves the decode rate; their length is checked after decoding instead.
    event = Annotated[
        dict[str, value],
        msgspec.Meta(max_length=limits.max_keys_per_map),
    ]
    logs = Annotated[list[event], msgspec.Meta(max_length=limits.max_events_per_frame)]
    # Unknown envelope keys send the payload down the slow path, which decodes them too
    # (and refuses an extension type there): the fast path must never accept what the
    # slow path refuses.
    envelope: Any = msgspec.defstruct(
        "_Envelope",
        [
            ("logs", logs),
            ("seq", Union[Annotated[int, msgspec.Meta(ge=0)], msgspec.UnsetType], msgspec.UNSET),  # noqa: UP007
        ],
        forbid_unknown_fields=True,
    )
    payload: Any = Union[logs, envelope]  # noqa: UP007
    return _Decoders(
        msgspec.msgpack.Decoder(payload, ext_hook=_raise_ext),
        msgspec.json.Decoder(payload),
    )


def _check_size(size: int, limits: WireLimits) -> None:
    if size > limits.max_message_bytes:
        raise _too_big(size, limits)


def _msgpack_may_hold_long_string(data: bytes, limit: int) -> bool:
    """Whether MessagePack ``data`` may hold a string longer than ``limit`` characters.

    Such a string takes more than ``limit`` bytes, so its header is str8 (0xd9), str16
    (0xda) or str32 (0xdb) with a length over ``limit`` that fits in the bytes that follow;
    with the default limit only str32 qualifies. Each candidate costs a ``find`` (memchr)
    and a slice: a byte that merely looks like a header (inside a number or a string) is
    rarely followed by a plausible length, and then only costs the exact check.
    """
    if limit < 31:  # a fixstr (up to 31 bytes) could already be too long
        return True
    size = len(data)
    for marker, width in ((0xD9, 1), (0xDA, 2), (0xDB, 4)):
        if limit >= (1 << (8 * width)) - 1:
            continue  # this header cannot announce a longer string
        pos = data.find(marker)
        while pos != -1:
            start = pos + 1 + width
            if limit < int.from_bytes(data[pos + 1 : start], "big") <= size - start:
                return True
            pos = data.find(marker, pos + 1)
    return False


def _fast(
    decode: Callable[[Any], Any],
    data: bytes | str,
    size: int,
    limits: WireLimits,
    is_msgpack: bool,
) -> Frame | None:
    """Decode ``data`` with a typed decoder; ``None`` when the slow path must decide."""
    try:
        obj = decode(data)
    except Exception:  # any refusal is re-examined by the slow path
        return None
    if type(obj) is list:
        logs: list[Any] = obj
        seq = None
    else:
        logs = obj.logs
        seq = None if obj.seq is msgspec.UNSET else obj.seq
        if seq is not None and seq > MAX_SEQ:  # msgspec bounds only 64-bit signed ints
            raise DecodeError(
                "bad_envelope", f"seq must be an integer from 0 to 2**64 - 1, not {seq!r:.40}"
            )
    limit = limits.max_string_length
    # The schema leaves the log maps' own keys unbounded (see module doc). A string cannot
    # be longer than the payload, and in MessagePack a long one needs a long-string header,
    # so the exact pass over the keys is rarely needed.
    if (
        size > limit
        and logs
        and (not is_msgpack or isinstance(data, str) or _msgpack_may_hold_long_string(data, limit))
        # The union of the key sets is built in C from the dicts' cached hashes (~5 ns a
        # key, four times cheaper than measuring every key); distinct keys are few.
        and max(map(len, set().union(*logs)), default=0) > limit
    ):
        return None
    if size * RECORD_EXPANSION > limits.max_record_bytes:
        _refuse_big_records(logs, limits)
    return _new_frame(Frame, (seq, logs))


def _json_size(obj: Any) -> int:
    """The length of ``obj`` as compact JSON, counted item by item (for what orjson cannot
    write whole: integers past 64 bits, nesting past its 254 levels)."""
    size = 0
    stack = [obj]
    while stack:
        obj = stack.pop()
        t = type(obj)
        if t is dict:
            n = len(obj)
            size += 2 * n + 1 if n else 2  # braces, colons, commas
            for key, value in obj.items():
                size += len(orjson.dumps(key))
                stack.append(value)
        elif t is list:
            size += len(obj) + 1 if obj else 2  # brackets, commas
            stack.extend(obj)
        elif t is int:
            size += len(str(obj))
        else:
            size += len(orjson.dumps(obj))
    return size


def _refuse_big_records(logs: list[Any], limits: WireLimits) -> None:
    """Replace each log map whose compact JSON is longer than ``max_record_bytes`` by a
    :class:`RefusedEvent` (called only when the payload could hold one)."""
    limit = limits.max_record_bytes
    try:
        if len(orjson.dumps(logs)) <= limit:
            return  # the whole batch fits: so does each of its log maps
    except orjson.JSONEncodeError:
        pass
    for i, item in enumerate(logs):
        if type(item) is dict:
            try:
                size = len(orjson.dumps(item))
            except orjson.JSONEncodeError:
                size = _json_size(item)
            if size > limit:
                logs[i] = _record_too_big(size, limits)


def _check_event(event: dict[Any, Any], limits: WireLimits) -> RefusedEvent | None:
    """Walk one log map (no recursion) and raise on the first limit or type it breaks, or
    return the refusal of the event alone (``array_too_long``: the rest is not walked)."""
    max_depth = limits.max_depth
    max_str = limits.max_string_length
    max_keys = limits.max_keys_per_map
    max_array = limits.max_array_length
    stack: list[tuple[Any, int]] = [(event, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(limits)
        if type(obj) is dict:
            if len(obj) > max_keys:
                raise _too_many_keys(len(obj), limits)
            for key in obj:
                if type(key) is not str:
                    if isinstance(key, datetime.datetime):
                        _refuse_value(key)
                    raise DecodeError(
                        "bad_key", f"map keys must be strings, not {type(key).__name__}"
                    )
                if len(key) > max_str:
                    raise _string_too_long(len(key), limits)
            values: Iterable[Any] = obj.values()
        elif len(obj) > max_array:
            return _array_too_long(len(obj), limits)
        else:
            values = obj
        for value in values:
            t = type(value)
            if t is str:
                if len(value) > max_str:
                    raise _string_too_long(len(value), limits)
            elif t is dict or t is list:
                stack.append((value, depth + 1))
            elif t is not int and t is not float and t is not bool and value is not None:
                _refuse_value(value)
    return None


def _refuse_value(value: Any) -> NoReturn:
    if isinstance(value, datetime.datetime):
        raise DecodeError(
            "msgpack_ext", "MessagePack timestamps (extension type -1) are not accepted"
        )
    if isinstance(value, bytes | bytearray | memoryview):
        raise DecodeError("msgpack_bin", "MessagePack binary values are not accepted")
    raise DecodeError("bad_payload", f"unexpected value of type {type(value).__name__}")


def _frame_from(obj: Any, size: int, limits: WireLimits) -> Frame:
    """Shape an untyped payload of ``size`` bytes into a :class:`Frame` and check every log
    map in it."""
    seq: int | None = None
    if type(obj) is list:
        logs: list[Any] = obj
    elif type(obj) is dict:
        if "logs" in obj:
            logs = obj["logs"]
            if type(logs) is not list:
                raise DecodeError(
                    "bad_envelope", f"logs must be an array, not {type(logs).__name__}"
                )
            if "seq" in obj:
                seq = obj["seq"]
                if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
                    raise DecodeError(
                        "bad_envelope",
                        f"seq must be an integer from 0 to 2**64 - 1, not {seq!r:.40}",
                    )
        else:
            logs = [obj]
    else:
        raise DecodeError(
            "bad_payload", f"a payload must be a map or an array, not {type(obj).__name__}"
        )
    if len(logs) > limits.max_events_per_frame:
        raise _too_many_events(len(logs), limits)
    for i, item in enumerate(logs):
        if type(item) is dict:
            refused = _check_event(item, limits)
            if refused is not None:
                logs[i] = refused
    if size * RECORD_EXPANSION > limits.max_record_bytes:
        _refuse_big_records(logs, limits)
    return Frame(seq, logs)


_UTF8_ERROR: Final = re.compile(r"utf-?8", re.IGNORECASE)


def _decode_slow(data: bytes | str, size: int, is_text: bool, limits: WireLimits) -> Frame:
    """The reference decoder: untyped decode, then a Python walk over every log map."""
    try:
        obj = (
            _ANY_JSON.decode(data)
            if is_text or isinstance(data, str)
            else _ANY_MSGPACK.decode(data)
        )
    except BadInput:
        raise
    except RecursionError as exc:
        raise _too_deep(limits) from exc
    except UnicodeError as exc:
        raise DecodeError("bad_utf8", f"invalid UTF-8: {exc}") from exc
    except (msgspec.MsgspecError, ValueError, TypeError) as exc:
        if is_text and isinstance(data, bytes):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as uexc:
                raise DecodeError("bad_utf8", f"invalid UTF-8: {uexc}") from exc
        if not is_text and _UTF8_ERROR.search(str(exc)):
            # msgspec 0.23 reports a bad MessagePack string as its own DecodeError
            # ("Invalid UTF-8 encoded string"); older releases raised UnicodeDecodeError.
            raise DecodeError("bad_utf8", f"invalid UTF-8: {exc}") from exc
        reason = "bad_json" if is_text else "bad_msgpack"
        raise DecodeError(reason, str(exc)) from exc
    return _frame_from(obj, size, limits)


# --------------------------------------------------------------------------- public API


def decode_msgpack(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """Decode one MessagePack payload (a binary WebSocket frame or HTTP body).

    Args:
        data: the payload bytes.
        limits: the limits to check.

    Returns:
        The frame: its envelope ``seq`` (or ``None``) and its log items in order.

    Raises:
        LimitExceeded: ``message_too_big`` (before decoding), ``too_many_events``,
            ``too_deep``, ``string_too_long``, ``too_many_keys``.
        DecodeError: ``bad_msgpack``, ``bad_utf8``, ``msgpack_ext``, ``msgpack_bin``,
            ``bad_key``, ``bad_envelope``, ``bad_payload``.

    A log map refused alone (``array_too_long``, ``record_too_big``) is replaced in the
    frame's logs by a :class:`~async_logging.model.RefusedEvent`, which the engine refuses.
    """
    size = len(data)
    if size > limits.max_message_bytes:
        raise _too_big(size, limits)
    frame = _fast(_decoders(limits).fast_msgpack.decode, data, size, limits, True)
    return frame if frame is not None else _decode_slow(data, size, False, limits)


def decode_json(data: bytes | str, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """Decode one JSON payload (a text WebSocket frame or HTTP body).

    Args:
        data: the JSON text, as UTF-8 bytes or as ``str``.
        limits: the limits to check; a ``str`` is measured in UTF-8 bytes.

    Returns:
        The frame: its envelope ``seq`` (or ``None``) and its log items in order.

    Raises:
        LimitExceeded: ``message_too_big`` (before decoding), ``too_many_events``,
            ``too_deep``, ``string_too_long``, ``too_many_keys``.
        DecodeError: ``bad_json``, ``bad_utf8``, ``bad_envelope``, ``bad_payload``.

    Log maps refused alone are replaced as :func:`decode_msgpack` says.
    """
    size = len(data)
    if type(data) is str and size * 4 > limits.max_message_bytes:
        # A character takes 1 to 4 bytes: measure only when the bound is inconclusive.
        size = len(data.encode("utf-8", "surrogatepass"))
    _check_size(size, limits)
    frame = _fast(_decoders(limits).fast_json.decode, data, size, limits, False)
    return frame if frame is not None else _decode_slow(data, size, True, limits)


_BRACKETS: Final = re.compile(r"logs((?:\[[^\[\]]*\])+)")
_SEGMENT: Final = re.compile(r"\[([^\[\]]*)\]")
_INT: Final = re.compile(r"-?[0-9]+")


def _bad_form(detail: str) -> DecodeError:
    return DecodeError("bad_form", detail)


def _decode_brackets(pairs: Iterable[tuple[str, str]], limits: WireLimits) -> Frame:
    """Build a frame from the Node transport's ``logs[i][key]=value`` form fields."""
    max_str = limits.max_string_length
    max_keys = limits.max_keys_per_map
    max_events = limits.max_events_per_frame
    events: dict[int, dict[str, Any]] = {}
    size = 0  # characters of the fields taken (RECORD_EXPANSION bounds their JSON too)
    for name, value in pairs:
        if not name.startswith("logs["):
            continue  # other fields are not ours
        size += len(name) + len(value)
        match = _BRACKETS.fullmatch(name)
        if match is None:
            raise _bad_form(f"malformed field name {name!r:.80}")
        path = _SEGMENT.findall(match.group(1))
        index_text = path[0]
        if not index_text.isascii() or not index_text.isdigit():
            raise _bad_form(f"log index must be a non-negative integer, not {index_text!r:.40}")
        if len(index_text) > len(str(max_events)) or int(index_text) >= max_events:
            # Compared before building anything: an index is never used to size a list.
            raise _too_many_events(int(index_text[:30]) + 1, limits)
        keys = path[1:]
        if not keys:
            raise _bad_form(f"field {name!r:.80} names no key of log {index_text}")
        if len(keys) > limits.max_depth:
            raise _too_deep(limits)
        for key in keys:
            if not key:
                raise _bad_form(f"empty key in field {name!r:.80}")
            if len(key) > max_str:
                raise _string_too_long(len(key), limits)
        if len(value) > max_str:
            raise _string_too_long(len(value), limits)
        node = events.get(int(index_text))
        if node is None:
            node = events[int(index_text)] = {}
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                if len(node) >= max_keys:
                    raise _too_many_keys(len(node) + 1, limits)
                child = node[key] = {}
            elif type(child) is not dict:
                raise _bad_form(f"field {name!r:.80} nests under a value")
            node = child
        last = keys[-1]
        if last in node:
            if type(node[last]) is dict:
                raise _bad_form(f"field {name!r:.80} overwrites a map")
        elif len(node) >= max_keys:
            raise _too_many_keys(len(node) + 1, limits)
        # Numeric strings become ints only for the known numeric keys of a log map;
        # ids (event, parent) and status stay strings, as docs/design.md §2 wants them.
        if len(keys) == 1 and last in FORM_INT_KEYS and _INT.fullmatch(value) and len(value) < 20:
            node[last] = int(value)
        else:
            node[last] = value
    if not events:
        raise _bad_form("no logs field and no logs[i][key] fields")
    logs: list[Any] = [events[i] for i in sorted(events)]
    if size * RECORD_EXPANSION > limits.max_record_bytes:
        _refuse_big_records(logs, limits)
    return Frame(None, logs)


def decode_multipart_fields(
    fields: Mapping[str, str], limits: WireLimits = DEFAULT_LIMITS
) -> Frame:
    """Decode already-parsed form fields (a multipart or URL-encoded form).

    A ``logs`` field holds JSON (see :func:`decode_json`) and wins over any other field;
    otherwise the ``logs[i][key]`` fields of the Node HTTP transport are assembled, see
    :func:`decode_form`. Fields not named ``logs...`` are ignored.

    Args:
        fields: field names to their string values.
        limits: the limits to check.

    Returns:
        The frame (``seq`` only when the ``logs`` field holds an envelope).

    Raises:
        DecodeError: ``bad_form`` when no field holds logs or a field name is malformed;
            the reasons of :func:`decode_json` for a JSON ``logs`` field.
        LimitExceeded: ``too_many_events``, ``too_deep``, ``string_too_long``,
            ``too_many_keys``.
    """
    if "logs" in fields:
        return decode_json(fields["logs"], limits)
    return _decode_brackets(fields.items(), limits)


def decode_form(body: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """Decode an ``application/x-www-form-urlencoded`` body.

    Two shapes are accepted: a ``logs`` field holding JSON (an array, an envelope or one
    log map), or the 2013 Node transport's bracket encoding
    ``logs[0][uuid]=r1&logs[0][pid]=7627&logs[1][...]=...``. In the latter every value is
    a string: numeric strings become ints for :data:`FORM_INT_KEYS` (``duration``,
    ``timestamp``, ``pid``), everything else stays a string. Deeper brackets build nested
    maps (``logs[0][data][k]=v`` gives ``{"data": {"k": "v"}}``; numeric keys stay string
    keys). Logs are ordered by index; indices need not be contiguous but must be below
    ``max_events_per_frame``.

    Args:
        body: the request body.
        limits: the limits to check.

    Returns:
        The frame, logs ordered by index.

    Raises:
        LimitExceeded: ``message_too_big`` (before parsing), ``too_many_events``,
            ``too_deep``, ``string_too_long``, ``too_many_keys``.
        DecodeError: ``bad_form``, ``bad_utf8`` (a value that is not UTF-8 once
            percent-decoded), and the reasons of :func:`decode_json` for a JSON field.
    """
    _check_size(len(body), limits)
    try:
        text = body.decode("utf-8")
        # A repeated field keeps its last value, as in most form parsers.
        fields = dict(parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict"))
    except UnicodeError as exc:
        raise DecodeError("bad_utf8", f"form body is not UTF-8: {exc}") from exc
    except ValueError as exc:
        raise _bad_form(str(exc)) from exc
    return decode_multipart_fields(fields, limits)


_JSON_TYPES: Final = frozenset({"application/json", "text/json"})
_MSGPACK_TYPES: Final = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
_FORM_TYPE: Final = "application/x-www-form-urlencoded"


def is_msgpack_type(content_type: str) -> bool:
    """Whether a ``Content-Type`` names MessagePack (parameters ignored)."""
    return content_type.partition(";")[0].strip().lower() in _MSGPACK_TYPES


def decode_http_body(body: bytes, content_type: str, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """Decode a ``POST /log`` body according to its media type.

    ``application/json``, ``text/json`` and any ``+json`` type go to :func:`decode_json`;
    ``application/msgpack``, ``application/x-msgpack`` and ``application/vnd.msgpack`` to
    :func:`decode_msgpack`; ``application/x-www-form-urlencoded`` to :func:`decode_form`.
    Parameters such as ``charset`` are ignored (JSON is UTF-8). Multipart forms are parsed
    by the server, which hands the fields to :func:`decode_multipart_fields`.

    Args:
        body: the request body.
        content_type: the ``Content-Type`` header value (parameters allowed).
        limits: the limits to check.

    Returns:
        The decoded frame.

    Raises:
        DecodeError: ``unsupported_media_type`` (with ``status`` 415) for any other media
            type, or what the chosen decoder raises.
        LimitExceeded: what the chosen decoder raises.
    """
    media = content_type.partition(";")[0].strip().lower()
    if media in _JSON_TYPES or media.endswith("+json"):
        return decode_json(body, limits)
    if media in _MSGPACK_TYPES:
        return decode_msgpack(body, limits)
    if media == _FORM_TYPE:
        return decode_form(body, limits)
    exc = DecodeError(
        "unsupported_media_type",
        f"content type {content_type!r:.80} is not JSON, MessagePack or a URL-encoded form",
    )
    exc.status = 415
    raise exc


def encode_ack(seq: int) -> str:
    """The acknowledgement of an accepted envelope: ``{"ack": seq}`` as JSON text."""
    return orjson.dumps({"ack": seq}).decode()


def encode_error(exc: BadInput, seq: int | None) -> str:
    """The answer to a refused frame: ``{"error": reason, "detail": ..., "seq": seq}``.

    Args:
        exc: what was wrong with the frame.
        seq: the frame's envelope ``seq`` when known (see :func:`peek_seq`), else ``None``.

    Returns:
        The JSON text.
    """
    return orjson.dumps({"error": exc.reason, "detail": exc.detail, "seq": seq}).decode()


class _SeqOnly(msgspec.Struct):
    seq: int | msgspec.UnsetType = msgspec.UNSET


_PEEK_MSGPACK: Final = msgspec.msgpack.Decoder(_SeqOnly, ext_hook=lambda code, data: None)
_PEEK_JSON: Final = msgspec.json.Decoder(_SeqOnly)
_SEQ_JSON: Final = re.compile(rb'"seq"\s*:\s*([0-9]{1,19})\b')
_SEQ_MSGPACK: Final = re.compile(rb"\xa3seq([\x00-\x7f]|\xcc.|\xcd..|\xce....|\xcf.{8})", re.DOTALL)


def peek_seq(data: bytes | str, is_text: bool) -> int | None:
    """Best-effort envelope ``seq`` of a frame that failed to decode, for its error answer.

    Tries a lenient decode of just the ``seq`` key, then a byte search for it (which can be
    fooled by a ``"seq"`` inside a log; the error answer is advisory).

    Args:
        data: the frame as received.
        is_text: whether it is JSON text (else MessagePack).

    Returns:
        The non-negative ``seq``, or ``None`` when none can be found.
    """
    try:
        found = (
            _PEEK_JSON.decode(data)
            if is_text or isinstance(data, str)
            else _PEEK_MSGPACK.decode(data)
        )
    except Exception:  # best effort: the frame is known to be bad
        pass
    else:
        seq = found.seq
        return seq if type(seq) is int and seq >= 0 else None
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    # Only a map can be an envelope: in an array, a "seq" would belong to a log.
    if is_text:
        if not raw.lstrip().startswith(b"{"):
            return None
        match = _SEQ_JSON.search(raw)
        return int(match.group(1)) if match else None
    if not raw or not (0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF)):
        return None
    match = _SEQ_MSGPACK.search(raw)
    if match is None:
        return None
    number = match.group(1)
    return number[0] if len(number) == 1 else int.from_bytes(number[1:], "big")
