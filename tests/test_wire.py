"""Tests for the sans-I/O wire decoding (docs/design.md §4): shapes, limits, errors, golden vectors."""

from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import urlencode

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_logging import wire
from async_logging.exceptions import BadInput, ConfigError, DecodeError, LimitExceeded
from async_logging.wire import (
    DEFAULT_LIMITS,
    Frame,
    WireLimits,
    decode_form,
    decode_http_body,
    decode_json,
    decode_msgpack,
    decode_multipart_fields,
    encode_ack,
    encode_error,
    peek_seq,
)
from conftest import vector, vector_http_body

EVENT: dict[str, Any] = {"uuid": "r1", "clazz": "begin", "event": "1", "parent": "0", "pid": 7}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def roundtrip(fmt: str, payload: Any, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """``payload`` encoded as ``fmt`` (``msgpack`` or ``json``), then through its decoder."""
    if fmt == "msgpack":
        return decode_msgpack(pack(payload), limits)
    return decode_json(orjson.dumps(payload), limits)


def nested(depth: int) -> dict[str, Any]:
    """A log map whose nesting is exactly ``depth`` levels (the map itself is level 1)."""
    value: Any = 1
    for level in range(depth - 1):
        value = {"k": value} if level % 2 else [value]
    return {"uuid": "r1", "data": value} if depth > 1 else {"uuid": "r1"}


def test_exported_names() -> None:
    """The names other modules import from wire are exported, and nothing else."""
    assert sorted(wire.__all__) == sorted(
        [
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
    )
    assert all(hasattr(wire, name) for name in wire.__all__)


# --------------------------------------------------------------------------- golden vectors


def test_golden_ws_frame_1_is_one_standalone_event_with_float_timestamp() -> None:
    """The Node client's first frame decodes to one log whose float64 timestamp survives."""
    frame = decode_msgpack(vector("ws-frame-1.msgpack"))
    assert frame.seq is None
    assert len(frame.logs) == 1
    (log,) = frame.logs
    assert log["name"] == "standalone"
    assert log["timestamp"] == 1795463406040.0
    assert type(log["timestamp"]) is float


def test_golden_ws_frame_2_is_a_transaction_and_a_heartbeat() -> None:
    """The Node client's second frame decodes to the 6 events of orig-ws-1 then a heartbeat."""
    frame = decode_msgpack(vector("ws-frame-2.msgpack"))
    assert frame.seq is None
    assert len(frame.logs) == 7
    assert [log["uuid"] for log in frame.logs] == ["orig-ws-1"] * 6 + ["hb-1"]
    assert [log["clazz"] for log in frame.logs] == [
        "begin",
        "begin",
        "atomicEvent",
        "end",
        "atomicEvent",
        "end",
        "heartbeat",
    ]
    assert frame.logs[0]["timestamp"] == 1795463406040.0
    assert frame.logs[5]["duration"] == 7


def test_golden_http_post_decodes_like_the_ws_transaction() -> None:
    """The Node HTTP form post gives the ws transaction's 6 logs, numbers coerced, ids strings."""
    ctype, body = vector_http_body("http-post-1.txt")
    frame = decode_form(body)
    assert frame.seq is None
    assert len(frame.logs) == 6
    ws_logs = decode_msgpack(vector("ws-frame-2.msgpack")).logs[:6]
    for got, ws in zip(frame.logs, ws_logs, strict=True):
        expected = {**ws, "uuid": "orig-http-1", "timestamp": int(ws["timestamp"])}
        assert got == expected  # dict equality: field order is irrelevant
        for key in ("duration", "timestamp", "pid"):
            if key in got:
                assert type(got[key]) is int
        for key in ("status", "parent", "event"):
            if key in got:
                assert type(got[key]) is str
    assert decode_http_body(body, ctype) == frame


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (EVENT, Frame(None, [EVENT])),
        ([EVENT, EVENT], Frame(None, [EVENT, EVENT])),
        ({"seq": 5, "logs": [EVENT]}, Frame(5, [EVENT])),
        ({"logs": [EVENT]}, Frame(None, [EVENT])),
        ({"seq": 0, "logs": []}, Frame(0, [])),
        ([], Frame(None, [])),
        ({"seq": 9, "logs": [EVENT], "extra": {"x": [1]}}, Frame(9, [EVENT])),
    ],
    ids=["map", "array", "envelope", "envelope-no-seq", "empty-envelope", "empty", "extra-key"],
)
def test_payload_shapes(fmt: str, payload: Any, expected: Frame) -> None:
    """A single map, an array and an envelope (seq optional, extra keys ignored) all decode."""
    assert roundtrip(fmt, payload) == expected


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_non_map_items_pass_through(fmt: str) -> None:
    """Items that are not maps stay in logs, in place, so the engine can reject them alone."""
    payload = {"seq": 3, "logs": [EVENT, 1, "x", [1, [2]], None, EVENT]}
    assert roundtrip(fmt, payload) == Frame(3, [EVENT, 1, "x", [1, [2]], None, EVENT])


def test_json_accepts_str_and_bytes() -> None:
    """decode_json takes the text of a WebSocket text frame as str as well as bytes."""
    assert decode_json('[{"msg": "héllo"}]') == decode_json('[{"msg": "héllo"}]'.encode())


def test_nested_values_survive() -> None:
    """Nested maps and arrays within the limits come through unchanged (fast and slow path)."""
    deep = nested(DEFAULT_LIMITS.max_depth)
    logs = [{"data": {"a": [1, {"b": None}]}, "tags": ["x", 2.5]}, deep]
    assert decode_msgpack(pack(logs)).logs == logs
    assert decode_json(orjson.dumps(logs)).logs == logs


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1a"])
def test_bad_msgpack(data: bytes) -> None:
    """Undecodable MessagePack is refused as bad_msgpack."""
    with pytest.raises(DecodeError) as info:
        decode_msgpack(data)
    assert info.value.reason == "bad_msgpack"
    assert info.value.status == 400


@pytest.mark.parametrize("data", [b"", b'{"a":', b"[1,]", b"NaN", b"[1e400]", "[{'a': 1}]"])
def test_bad_json(data: bytes | str) -> None:
    """Undecodable JSON text is refused as bad_json."""
    with pytest.raises(DecodeError) as info:
        decode_json(data)
    assert info.value.reason == "bad_json"


@pytest.mark.parametrize("data", [b'[{"msg": "\xff"}]', b'[{"m\xc3": 1}]', '[{"msg": "\ud800"}]'])
def test_bad_utf8_json(data: bytes | str) -> None:
    """JSON text that is not valid UTF-8 (or a str with a lone surrogate) is bad_utf8."""
    with pytest.raises(DecodeError) as info:
        decode_json(data)
    assert info.value.reason == "bad_utf8"


def test_bad_utf8_msgpack_string() -> None:
    """A MessagePack string that is not valid UTF-8 is bad_utf8."""
    with pytest.raises(DecodeError) as info:
        decode_msgpack(b"\x91\x81\xa1a\xa1\xff")
    assert info.value.reason == "bad_utf8"


@pytest.mark.parametrize(
    "value",
    [msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)],
    ids=["ext", "timestamp"],
)
@pytest.mark.parametrize("where", ["value", "nested", "key"])
def test_msgpack_ext(value: Any, where: str) -> None:
    """Extension types, the timestamp included, are refused as msgpack_ext wherever they sit."""
    if where == "value":
        payload: Any = [{"a": value}]
    elif where == "nested":
        payload = {"seq": 1, "logs": [{"a": [{"b": value}]}]}
    else:
        payload = [{value: 1}]
    with pytest.raises(DecodeError) as info:
        decode_msgpack(pack(payload))
    assert info.value.reason == "msgpack_ext"


def test_msgpack_bin() -> None:
    """Binary values, which a JSON sink cannot write, are refused as msgpack_bin."""
    with pytest.raises(DecodeError) as info:
        decode_msgpack(pack([{"a": b"raw"}]))
    assert info.value.reason == "msgpack_bin"


@pytest.mark.parametrize(
    "data",
    [pack([{1: "x"}]), pack([{"a": {None: 1}}]), b"\x91\x81\x92\x01\x02\x01"],
    ids=["int", "nested-nil", "array"],
)
def test_bad_key(data: bytes) -> None:
    """Map keys that are not strings (ints, nil, arrays) are refused as bad_key."""
    with pytest.raises(DecodeError) as info:
        decode_msgpack(data)
    assert info.value.reason == "bad_key"


@pytest.mark.parametrize(
    "payload",
    [
        {"seq": "1", "logs": []},
        {"seq": -1, "logs": []},
        {"seq": True, "logs": []},
        {"seq": None, "logs": []},
        {"seq": 1.0, "logs": []},
        {"seq": 1, "logs": {"a": 1}},
        {"logs": "x"},
    ],
)
@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_bad_envelope(payload: Any, fmt: str) -> None:
    """An envelope whose seq is not a non-negative int or whose logs is not an array is refused."""
    with pytest.raises(DecodeError) as info:
        roundtrip(fmt, payload)
    assert info.value.reason == "bad_envelope"


@pytest.mark.parametrize("payload", [5, "x", None, True, 1.5])
@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_bad_payload(payload: Any, fmt: str) -> None:
    """A payload that is neither a map nor an array is refused as bad_payload."""
    with pytest.raises(DecodeError) as info:
        roundtrip(fmt, payload)
    assert info.value.reason == "bad_payload"


# --------------------------------------------------------------------------- limits


def test_message_too_big_is_checked_before_decoding() -> None:
    """A payload over max_message_bytes is refused (413) before it is decoded at all."""
    limits = WireLimits(max_message_bytes=10)
    cases = [
        lambda: decode_msgpack(b"\xc1" * 11, limits),
        lambda: decode_json(b"{" * 11, limits),
        lambda: decode_json("é" * 6, limits),  # 6 characters, 12 UTF-8 bytes
        lambda: decode_form(b"%" * 11, limits),
        lambda: decode_http_body(b"x" * 11, "application/json", limits),
    ]
    for case in cases:
        with pytest.raises(LimitExceeded) as info:
            case()
        assert info.value.reason == "message_too_big"
        assert info.value.status == 413
    assert decode_msgpack(pack([{}]), WireLimits(max_message_bytes=2)).logs == [{}]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("envelope", [False, True])
def test_too_many_events(fmt: str, envelope: bool) -> None:
    """More logs than max_events_per_frame is refused (413); exactly the limit is accepted."""
    limits = WireLimits(max_events_per_frame=3)

    def decode(logs: list[Any]) -> Frame:
        return roundtrip(fmt, {"seq": 1, "logs": logs} if envelope else logs, limits)

    assert len(decode([EVENT] * 3).logs) == 3
    with pytest.raises(LimitExceeded) as info:
        decode([EVENT, 1, EVENT, 2])
    assert info.value.reason == "too_many_events"
    assert info.value.status == 413


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("max_depth", [1, 3, 32])
def test_too_deep(fmt: str, max_depth: int) -> None:
    """A log map nested deeper than max_depth is refused (400); exactly max_depth is accepted."""
    limits = WireLimits(max_depth=max_depth)
    ok = nested(max_depth)
    assert roundtrip(fmt, [EVENT, ok], limits).logs == [EVENT, ok]
    with pytest.raises(LimitExceeded) as info:
        roundtrip(fmt, [EVENT, nested(max_depth + 1)], limits)
    assert info.value.reason == "too_deep"
    assert info.value.status == 400


def test_too_deep_beyond_the_recursion_limit() -> None:
    """Nesting deep enough to exhaust the decoder's recursion is refused as too_deep."""
    with pytest.raises(LimitExceeded) as info:
        decode_msgpack(b"\x91\x81\xa1a" + b"\x91" * 100_000 + b"\x00")
    assert info.value.reason == "too_deep"
    with pytest.raises(LimitExceeded) as info:
        decode_json(b'[{"a":' + b"[" * 100_000)
    assert info.value.reason == "too_deep"


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize(
    "make",
    [
        lambda s: [{"msg": s}],
        lambda s: [{s: 1}],
        lambda s: [{"a": {s: 1}}],
        lambda s: [{"a": [1, [s]]}],
        lambda s: {"seq": 1, "logs": [EVENT, {"a": {"b": {"c": {"d": {"e": {"f": s}}}}}}]},
    ],
    ids=["value", "key", "nested-key", "in-array", "deep-value"],
)
@pytest.mark.parametrize("padding", [0, 100], ids=["small-frame", "large-frame"])
def test_string_too_long(fmt: str, make: Any, padding: int) -> None:
    """A key or value longer than max_string_length is refused (400); the limit itself is fine."""
    limits = WireLimits(max_string_length=10)

    def payload(s: str) -> Any:
        obj = make(s)
        logs = obj["logs"] if isinstance(obj, dict) else obj
        logs.extend([{"p": "x"}] * padding)  # a frame larger than the limit, or not
        return obj

    ok = payload("é" * 10)
    assert roundtrip(fmt, ok, limits).logs == (ok["logs"] if isinstance(ok, dict) else ok)
    with pytest.raises(LimitExceeded) as info:
        roundtrip(fmt, payload("é" * 11), limits)
    assert info.value.reason == "string_too_long"
    assert info.value.status == 400


@pytest.mark.parametrize("limit", [40, 300, 65_536], ids=["str8", "str16", "str32"])
@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_long_log_map_key_in_a_large_frame(limit: int, fmt: str) -> None:
    """A log map key over the limit is caught whatever string header MessagePack gives it."""
    limits = WireLimits(max_string_length=limit)
    padding = [{"p": "x" * 30}] * (limit // 30 + 1)  # the frame outgrows the limit
    ok = [*padding, {"k" * limit: 1}]
    assert roundtrip(fmt, ok, limits).logs == ok
    with pytest.raises(LimitExceeded) as info:
        roundtrip(fmt, [*padding, {"k" * (limit + 1): 1}], limits)
    assert info.value.reason == "string_too_long"


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("where", ["event", "nested", "deep"])
def test_too_many_keys(fmt: str, where: str) -> None:
    """A map with more than max_keys_per_map keys is refused (400); exactly the limit is fine."""

    def payload(n: int) -> Any:
        big = {f"k{i}": i for i in range(n)}
        if where == "event":
            return [big]
        if where == "nested":
            return [{"data": big}]
        return [{"a": [{"b": {"c": {"d": {"e": big}}}}]}]

    assert roundtrip(fmt, payload(256)).logs == payload(256)
    with pytest.raises(LimitExceeded) as info:
        roundtrip(fmt, payload(257))
    assert info.value.reason == "too_many_keys"
    assert info.value.status == 400


def test_limits_validate() -> None:
    """WireLimits refuses a limit that is not a positive integer, and has the seed defaults."""
    assert WireLimits(4 * 1024 * 1024, 10_000, 32, 64 * 1024, 256) == DEFAULT_LIMITS
    with pytest.raises(ConfigError):
        WireLimits(max_depth=0)
    with pytest.raises(ConfigError):
        WireLimits(max_message_bytes=1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- forms


def form(**fields: str) -> bytes:
    return urlencode(fields).encode()


def test_form_logs_field_holds_json() -> None:
    """A form whose logs field holds JSON decodes it (array, envelope or single map)."""
    assert decode_form(form(logs=orjson.dumps([EVENT]).decode())) == Frame(None, [EVENT])
    assert decode_form(form(logs='{"seq": 4, "logs": []}', other="x")) == Frame(4, [])
    assert decode_form(form(logs='{"a": "1"}')) == Frame(None, [{"a": "1"}])
    with pytest.raises(DecodeError) as info:
        decode_form(form(logs="[1,"))
    assert info.value.reason == "bad_json"


def test_form_brackets_nest_coerce_and_order_by_index() -> None:
    """Bracket fields build nested maps, order logs by index and coerce only the numeric keys."""
    body = (
        "logs[10][uuid]=b&logs[2][uuid]=a&logs[2][duration]=12&logs[2][timestamp]=-5"
        "&logs[2][pid]=x7&logs[2][status]=0&logs[2][event]=3&logs[2][data][k]=1"
        "&logs[2][data][m][n]=v&logs[2][msg]=&ignored=1&logs[10][duration]=1.5"
    )
    frame = decode_form(body.encode())
    assert frame == Frame(
        None,
        [
            {
                "uuid": "a",
                "duration": 12,
                "timestamp": -5,
                "pid": "x7",
                "status": "0",
                "event": "3",
                "data": {"k": "1", "m": {"n": "v"}},
                "msg": "",
            },
            {"uuid": "b", "duration": "1.5"},
        ],
    )


def test_form_huge_numeric_string_is_not_coerced() -> None:
    """A numeric string too long for an int64 stays a string instead of failing the int() call."""
    digits = "9" * 5000
    frame = decode_form(f"logs[0][timestamp]={digits}".encode())
    assert frame.logs == [{"timestamp": digits}]


@pytest.mark.parametrize(
    "body",
    [
        "foo=bar",
        "",
        "logs[x][a]=1",
        "logs[-1][a]=1",
        "logs[0]=1",
        "logs[0][a]=1&logs[0][a][b]=2",
        "logs[0][a][b]=2&logs[0][a]=1",
        "logs[0][]=1",
        "logs[0]x[a]=1",
        "logs[0][a[b]]=1",
    ],
)
def test_bad_form(body: str) -> None:
    """Forms with no logs, a non-integer index, no key, or conflicting keys are bad_form."""
    with pytest.raises(DecodeError) as info:
        decode_form(body.encode())
    assert info.value.reason == "bad_form"


@pytest.mark.parametrize("body", [b"logs=%FF", b"logs[0][a]=%C3", b"logs=\xff"])
def test_form_bad_utf8(body: bytes) -> None:
    """A form value that is not UTF-8 once percent-decoded is refused as bad_utf8."""
    with pytest.raises(DecodeError) as info:
        decode_form(body)
    assert info.value.reason == "bad_utf8"


@pytest.mark.parametrize("index", ["3", "99999999", "9" * 40])
def test_form_index_over_the_limit(index: str) -> None:
    """An index at or past max_events_per_frame is too_many_events, without allocating for it."""
    limits = WireLimits(max_events_per_frame=3)
    assert len(decode_form(b"logs[2][a]=1", limits).logs) == 1
    with pytest.raises(LimitExceeded) as info:
        decode_form(f"logs[{index}][a]=1".encode(), limits)
    assert info.value.reason == "too_many_events"
    assert info.value.status == 413


def test_form_limits() -> None:
    """Bracket forms obey the depth, string length and keys-per-map limits."""
    limits = WireLimits(max_depth=2, max_string_length=5, max_keys_per_map=2)
    assert decode_form(b"logs[0][a][b]=12345&logs[0][c]=1", limits).logs == [
        {"a": {"b": "12345"}, "c": "1"}
    ]
    for body, reason in [
        (b"logs[0][a][b][c]=1", "too_deep"),
        (b"logs[0][a]=123456", "string_too_long"),
        (b"logs[0][abcdef]=1", "string_too_long"),
        (b"logs[0][a]=1&logs[0][b]=1&logs[0][c]=1", "too_many_keys"),
        (b"logs[0][a][x]=1&logs[0][a][y]=1&logs[0][a][z]=1", "too_many_keys"),
        (b"logs[0][a]=1&logs[0][b]=1&logs[0][c][d]=1", "too_many_keys"),
    ]:
        with pytest.raises(LimitExceeded) as info:
            decode_form(body, limits)
        assert info.value.reason == reason, body
        assert info.value.status == 400


def test_multipart_fields() -> None:
    """Already-parsed fields decode like a URL-encoded form (logs JSON wins over brackets)."""
    assert decode_multipart_fields({"logs[0][pid]": "7", "logs[0][uuid]": "u"}) == Frame(
        None, [{"pid": 7, "uuid": "u"}]
    )
    fields = {"logs[0][pid]": "7", "logs": '{"seq": 2, "logs": [{"a": 1}]}'}
    assert decode_multipart_fields(fields, DEFAULT_LIMITS) == Frame(2, [{"a": 1}])
    with pytest.raises(DecodeError) as info:
        decode_multipart_fields({"file": "x"})
    assert info.value.reason == "bad_form"


# --------------------------------------------------------------------------- HTTP dispatch


@pytest.mark.parametrize(
    ("ctype", "encode"),
    [
        ("application/json", orjson.dumps),
        ("Application/JSON; charset=utf-8", orjson.dumps),
        ("text/json", orjson.dumps),
        ("application/vnd.logs+json", orjson.dumps),
        ("application/msgpack", pack),
        ("application/x-msgpack", pack),
        (
            "application/x-www-form-urlencoded; charset=UTF-8",
            lambda o: form(logs=orjson.dumps(o).decode()),
        ),
    ],
)
def test_http_body_dispatches_on_media_type(ctype: str, encode: Any) -> None:
    """decode_http_body picks the decoder from the media type, ignoring parameters and case."""
    payload = {"seq": 1, "logs": [EVENT]}
    assert decode_http_body(encode(payload), ctype) == Frame(1, [EVENT])


@pytest.mark.parametrize("ctype", ["text/plain", "", "multipart/form-data; boundary=x", "json"])
def test_http_body_unsupported_media_type(ctype: str) -> None:
    """An unknown media type is refused as unsupported_media_type with status 415."""
    with pytest.raises(DecodeError) as info:
        decode_http_body(b"[]", ctype)
    assert info.value.reason == "unsupported_media_type"
    assert info.value.status == 415
    assert DecodeError.status == 400  # set on the instance, not the class


# --------------------------------------------------------------------------- answers


def test_encode_ack_and_error() -> None:
    """Acks and error answers are the JSON maps of docs/design.md §4."""
    assert orjson.loads(encode_ack(7)) == {"ack": 7}
    err = LimitExceeded("too_deep", "too deep here", status=400)
    assert orjson.loads(encode_error(err, 7)) == {
        "error": "too_deep",
        "detail": "too deep here",
        "seq": 7,
    }
    assert orjson.loads(encode_error(DecodeError("bad_json"), None)) == {
        "error": "bad_json",
        "detail": "bad json",
        "seq": None,
    }


@pytest.mark.parametrize(
    ("data", "is_text", "expected"),
    [
        (pack({"seq": 42, "logs": [nested(40)]}), False, 42),
        (pack({"logs": [{"a": msgpack.ExtType(1, b"")}], "seq": 2**40}), False, 2**40),
        (pack({"seq": 300, "logs": [1]})[:-1], False, 300),
        (pack({"seq": 7, "logs": [1, 2]})[:-1], False, 7),
        (pack({"seq": 70000, "logs": [1, 2]})[:-1], False, 70000),
        (pack({"logs": [1, 2]}), False, None),
        (pack([{"seq": 5}]), False, None),
        (b"\xc1", False, None),
        ('{"seq": 12, "logs": [{"a": 1}], ', True, 12),
        (b'{"logs": [{"a": "\xff"}], "seq": 13}', True, 13),
        (b'[{"seq": 5}]', True, None),
        (b'{"seq": -1, "logs": []', True, None),
        (b"garbage", True, None),
    ],
)
def test_peek_seq(data: bytes | str, is_text: bool, expected: int | None) -> None:
    """peek_seq finds an envelope's seq in a frame that failed to decode, and only there."""
    assert peek_seq(data, is_text) == expected


# --------------------------------------------------------------------------- properties

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
keys = st.text(max_size=10)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)
log_maps = st.dictionaries(keys, values, max_size=12)


@settings(max_examples=150, deadline=None)
@given(logs=st.lists(log_maps, max_size=8), seq=st.integers(min_value=0, max_value=2**63 - 1))
def test_round_trip(logs: list[dict[str, Any]], seq: int) -> None:
    """Any list of valid log maps round-trips through msgpack and JSON, bare and in an envelope."""
    assert decode_msgpack(msgpack.packb(logs)) == Frame(None, logs)
    assert decode_msgpack(msgpack.packb({"seq": seq, "logs": logs})) == Frame(seq, logs)
    assert decode_json(orjson.dumps(logs)) == Frame(None, logs)
    assert decode_json(orjson.dumps({"seq": seq, "logs": logs})) == Frame(seq, logs)
    assert decode_json(orjson.dumps({"seq": seq, "logs": logs}).decode()) == Frame(seq, logs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_bad_input(data: bytes) -> None:
    """Arbitrary bytes fed to every decoder either decode or raise a BadInput subclass."""
    for decode in (decode_msgpack, decode_json, decode_form):
        try:
            frame = decode(data)
        except BadInput:
            continue
        assert isinstance(frame, Frame)
        assert isinstance(frame.logs, list)
        assert frame.seq is None or (type(frame.seq) is int and frame.seq >= 0)
    peek_seq(data, True)
    peek_seq(data, False)


any_msgpack = st.recursive(
    st.one_of(
        scalars,
        st.binary(max_size=4),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
        st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)),
        st.sampled_from(["seq", "logs", "x" * 12]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(keys, st.sampled_from(["seq", "logs"]), st.integers(-(2**63), 2**64 - 1)),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=25,
)
SMALL = WireLimits(
    max_events_per_frame=3,
    max_depth=3,
    max_string_length=8,
    max_keys_per_map=3,
    max_array_length=3,
    max_record_bytes=40,
)


@settings(max_examples=300, deadline=None)
@given(obj=any_msgpack)
def test_structured_input_raises_only_bad_input_and_fast_path_agrees(obj: Any) -> None:
    """Any MessagePack structure decodes or raises BadInput, and the fast path never disagrees."""
    data = msgpack.packb(obj, use_bin_type=True)
    for limits in (DEFAULT_LIMITS, SMALL):
        try:
            slow: Frame | BadInput = wire._decode_slow(data, len(data), False, limits)
        except BadInput as exc:
            slow = exc
        fast = wire._fast(wire._decoders(limits).fast_msgpack.decode, data, len(data), limits, True)
        if fast is not None:  # what the fast path accepts, the reference accepts identically
            assert fast == slow
        try:
            public: Frame | BadInput = decode_msgpack(data, limits)
        except BadInput as exc:
            public = exc
        if isinstance(slow, BadInput):
            assert isinstance(public, BadInput)
            assert public.reason == slow.reason
        else:
            assert public == slow


def test_timestamp_key_in_slow_path_is_msgpack_ext() -> None:
    """A timestamp used as a map key is refused as msgpack_ext, not as bad_key."""
    key = msgpack.Timestamp.from_datetime(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(DecodeError) as info:
        decode_msgpack(msgpack.packb([{key: 1}], datetime=False))
    assert info.value.reason == "msgpack_ext"


@pytest.mark.parametrize("decode", [wire.decode_json, wire.decode_msgpack])
def test_a_seq_past_64_bits_is_refused_before_the_batch_is_taken(decode: Any) -> None:
    """An envelope's seq beyond 2**64 - 1 cannot be acked: the frame is refused as a bad
    envelope (before the buffer sees it), while 2**64 - 1 itself is taken."""
    ok = {"seq": wire.MAX_SEQ, "logs": []}
    too_big_json = b'{"seq": 18446744073709551616, "logs": []}'
    if decode is wire.decode_json:
        assert decode(orjson.dumps(ok)).seq == wire.MAX_SEQ
        payload = too_big_json
    else:
        assert decode(msgpack.packb(ok)).seq == wire.MAX_SEQ
        # MessagePack cannot hold a larger integer: an out-of-range float is the closest.
        payload = msgpack.packb({"seq": 2.0**64, "logs": []})
    with pytest.raises(DecodeError) as info:
        decode(payload)
    assert info.value.reason in ("bad_envelope", "bad_payload")
