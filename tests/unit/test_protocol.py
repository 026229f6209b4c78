"""Unit tests of the sans-I/O codec in tmemclient.wire (codec, messages) (PROTOCOL.md §2, §3, §5, §7, §8).

Plain synchronous tests: bytes in, messages or exceptions out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tmemclient.wire.codec import HEADER, NEED_DATA, FrameDecoder, decode_body, encode_frame
from tmemclient.wire.errors import (
    DaemonGone,
    DaemonShuttingDown,
    GuestConflict,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ProtocolError,
    TmemError,
    UnknownPool,
    VersionMismatch,
)
from tmemclient.wire.layout import FRAME_SIZE, MAX_ORDER
from tmemclient.wire.messages import (
    FLAG_PERSISTENT,
    FLAG_SHARED,
    MAX_NAME_LEN,
    OID_BYTES,
    PROTOCOL_VERSION,
    Hello,
    Limits,
    Op,
    PoolSpec,
    Status,
    check_oid,
    check_uint,
    decode_oid,
    encode_oid,
    encode_reply,
    error_for_status,
    make_pool_flags,
    split_reply,
    split_request,
    status_for_error,
    valid_guest_name,
)

MAX_FRAME = 1 << 16
SPEC = Path(__file__).resolve().parents[2] / "proto" / "PROTOCOL.md"


def frame(body: bytes) -> bytes:
    """A frame around raw body bytes (which need not be valid msgpack)."""
    return HEADER.pack(len(body)) + body


def decoder(max_frame: int = MAX_FRAME) -> FrameDecoder:
    return FrameDecoder(max_frame)


def decode_all(data: bytes, max_frame: int = MAX_FRAME) -> list[Any]:
    d = decoder(max_frame)
    d.feed(data)
    return list(d.messages())


# ====================================================================================== framing


def test_encode_frame_is_a_big_endian_length_and_one_msgpack_object() -> None:
    data = encode_frame([Op.PING, 7])
    assert data == b"\x00\x00\x00\x03" + b"\x92\x1f\x07"
    assert encode_frame(b"\x00" * 300) == b"\x00\x00\x01\x2f" + b"\xc5\x01\x2c" + b"\x00" * 300
    assert encode_frame("x") == b"\x00\x00\x00\x02\xa1x"  # str stays str, bytes become bin


MESSAGES: list[Any] = [
    [Op.PING, 1],
    [1, 0, {"version": 1, "guest": "0/a"}],
    [4, 2, 0x6A09E667, b"\x01" * OID_BYTES, 7, 3],
    [20, 3, 9, list(range(3 * 50))],
    [0, 8, "going away"],
]
EXPECTED: list[Any] = [msgpack.unpackb(msgpack.packb(m)) for m in MESSAGES]


def test_split_across_feeds_byte_by_byte() -> None:
    stream = b"".join(encode_frame(m) for m in MESSAGES)
    d = decoder()
    got = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        while (message := d.next_message()) is not NEED_DATA:
            got.append(message)
    assert got == EXPECTED
    assert d.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_many_frames_in_one_feed(kind: Any) -> None:
    stream = b"".join(encode_frame(m) for m in MESSAGES * 100)
    d = decoder()
    d.feed(kind(stream))
    assert list(d.messages()) == EXPECTED * 100
    assert d.buffered == 0
    assert d.next_message() is NEED_DATA


def test_need_data_until_the_frame_is_complete() -> None:
    data = encode_frame([Op.PING, 5])
    d = decoder()
    assert d.next_message() is NEED_DATA
    for i in range(len(data) - 1):
        d.feed(data[i : i + 1])
        assert d.next_message() is NEED_DATA
        assert d.buffered == i + 1
    d.feed(data[-1:])
    assert d.next_message() == [31, 5]


def test_a_partial_frame_stays_buffered_behind_complete_ones() -> None:
    one, two = encode_frame([31, 1]), encode_frame([31, 2])
    d = decoder()
    d.feed(one + two[:5])
    assert list(d.messages()) == [[31, 1]]
    assert d.buffered == 5
    d.feed(two[5:])
    assert list(d.messages()) == [[31, 2]]


@pytest.mark.parametrize(
    "header",
    [
        HEADER.pack(0),
        HEADER.pack(MAX_FRAME + 1),
        HEADER.pack(0xFFFFFFFF),
        b"GET ",  # a foreign protocol: 0x47455420 bytes
    ],
    ids=["zero", "max_frame+1", "4GiB", "http"],
)
def test_bad_length_is_refused_from_the_header_alone(header: bytes) -> None:
    d = decoder()
    d.feed(header)  # no body byte at all
    with pytest.raises(ProtocolError, match="max_frame"):
        d.next_message()


def test_a_frame_of_exactly_max_frame_is_accepted() -> None:
    body = msgpack.packb(b"\x00" * (MAX_FRAME - 3))  # bin 16 header: 3 bytes
    assert len(body) == MAX_FRAME
    assert decode_all(frame(body)) == [b"\x00" * (MAX_FRAME - 3)]


def test_header_is_checked_before_earlier_bad_state_is_forgotten() -> None:
    """An oversize frame behind a good one: the good one is delivered, then the error."""
    d = decoder()
    d.feed(encode_frame([31, 1]) + HEADER.pack(MAX_FRAME + 1))
    assert d.next_message() == [31, 1]
    with pytest.raises(ProtocolError):
        d.next_message()


@pytest.mark.parametrize(
    "bad",
    [
        HEADER.pack(0),
        frame(b"\xc1"),
        frame(b"\x92\x01"),
        frame(b"\x01\x02"),
    ],
    ids=["zero-length", "0xc1", "truncated", "trailing"],
)
def test_decoder_stays_broken_after_an_error(bad: bytes) -> None:
    d = decoder()
    d.feed(bad)
    with pytest.raises(ProtocolError):
        d.next_message()
    d.feed(encode_frame([31, 1]))
    for _ in range(2):
        with pytest.raises(ProtocolError, match="error state"):
            d.next_message()


def test_max_frame_below_16_is_refused() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(15)
    assert FrameDecoder(16).max_frame == 16


BAD_BODIES = {
    "never-used-0xc1": b"\xc1",
    "garbage-text": b"hello world",  # 'h' is fixmap 8 without its pairs
    "truncated-array": b"\x94\x1f\x01",
    "truncated-str": b"\xa5ab",
    "truncated-uint64": b"\xcf\x00\x00",
    "trailing-byte": b"\x92\x1f\x01\xc0",
    "two-objects": b"\x01\x02",
    "array32-4G-items": b"\xdd\xff\xff\xff\xff",
    "array16-64K-items": b"\xdc\xff\xff",
    "map32-4G-pairs": b"\xdf\xff\xff\xff\xff",
    "map16-64K-pairs": b"\xde\xff\xff",
    "bin32-4GiB": b"\xc6\xff\xff\xff\xff",
    "str32-4GiB": b"\xdb\xff\xff\xff\xff",
    "ext32-4GiB": b"\xc9\xff\xff\xff\xff\x01",
    "invalid-utf8": b"\xa2\xff\xfe",
    "utf8-surrogate": b"\xa3\xed\xa0\x80",
    "overlong-utf8": b"\xa2\xc0\xaf",
    "int-map-key": b"\x81\x01\x02",
    "nil-map-key": b"\x81\xc0\x02",
    "array-map-key": b"\x81\x90\x02",
    "nesting-1025": b"\x91" * 1025 + b"\xc0",
    "nesting-100000-maps": b"\x81\xa1k" * 100_000 + b"\xc0",
    "timestamp-bad-length": b"\xd5\xff\x00\x01",
    "timestamp-bad-nanoseconds": b"\xd7\xff" + b"\xff" * 8,
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_malformed_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(body)
    d = decoder(1 << 20)
    d.feed(frame(body))
    with pytest.raises(ProtocolError):
        d.next_message()


def test_nesting_up_to_the_decoder_stack_decodes() -> None:
    """PROTOCOL.md §10 says tmemd refuses more than 1024 nested containers: 1024 still decode."""
    value = decode_body(b"\x91" * 1024 + b"\xc0")
    depth = 0
    while isinstance(value, list):
        (value,) = value
        depth += 1
    assert depth == 1024 and value is None


def test_bin_and_str_stay_distinct() -> None:
    assert decode_body(b"\xc4\x02\xff\xfe") == b"\xff\xfe"  # the same bytes as bin are fine
    assert decode_body(b"\xa2hi") == "hi"
    assert type(decode_body(b"\xc4\x00")) is bytes


def test_str_and_bin_map_keys() -> None:
    assert decode_body(b"\x81\xa1k\x01") == {"k": 1}
    # Not normative (PROTOCOL.md §12): msgpack's strict_map_key lets bin keys through.
    assert decode_body(b"\x81\xc4\x01k\x01") == {b"k": 1}


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b"\x05", 5),
        (b"\xcc\x05", 5),
        (b"\xcd\x00\x05", 5),
        (b"\xce\x00\x00\x00\x05", 5),
        (b"\xcf" + b"\x00" * 7 + b"\x05", 5),
        (b"\xd0\x05", 5),
        (b"\xd3" + b"\x00" * 7 + b"\x05", 5),
        (b"\xcf" + b"\xff" * 8, (1 << 64) - 1),
    ],
)
def test_every_integer_format_decodes_to_its_value(body: bytes, value: int) -> None:
    decoded = decode_body(body)
    assert type(decoded) is int and decoded == value


def test_bools_floats_and_ext_decode_as_themselves() -> None:
    """The codec does not refuse them; the field checks do (tests below)."""
    assert decode_body(b"\xc3") is True
    assert type(decode_body(b"\xcb" + b"\x00" * 8)) is float
    ext = decode_body(b"\xd4\x05\x00")
    assert isinstance(ext, msgpack.ExtType) and ext.code == 5
    assert isinstance(decode_body(b"\xd6\xff\x00\x00\x00\x01"), msgpack.Timestamp)


# ====================================================================================== field codecs


@pytest.mark.parametrize(
    ("oid", "wire"),
    [
        (0, 0),
        (1, 1),
        ((1 << 64) - 1, (1 << 64) - 1),
        (1 << 64, b"\x00" * 15 + b"\x01" + b"\x00" * 8),
        ((1 << 192) - 1, b"\xff" * 24),
        (
            0x8000000000000000FEDCBA98765432100123456789ABCDEF,
            bytes.fromhex("80" + "00" * 7 + "fedcba98765432100123456789abcdef"),
        ),
    ],
)
def test_oid_encoding(oid: int, wire: Any) -> None:
    encoded = encode_oid(oid)
    assert encoded == wire and type(encoded) is type(wire)
    assert decode_oid(encoded) == oid
    assert decode_oid(msgpack.unpackb(msgpack.packb(encoded, use_bin_type=True))) == oid


def test_a_24_byte_bin_below_2_64_names_the_same_object() -> None:
    assert decode_oid((5).to_bytes(OID_BYTES, "big")) == decode_oid(5) == 5


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -(1 << 63),
        1 << 64,  # cannot come off the wire as an int, but must not pass either
        True,
        False,
        0.0,
        1.5,
        "1",
        None,
        [1],
        b"",
        b"\x00" * 8,
        b"\x00" * 23,
        b"\x00" * 25,
        bytearray(24),
        msgpack.ExtType(1, b"\x00" * 24),
    ],
    ids=repr,
)
def test_decode_oid_refuses(value: Any) -> None:
    with pytest.raises(InvalidArgument, match="oid"):
        decode_oid(value)


@pytest.mark.parametrize("value", [-1, 1 << 192, True, 1.0, "1", None, b"\x00" * 24])
def test_check_oid_refuses(value: Any) -> None:
    with pytest.raises(InvalidArgument):
        check_oid(value)


@pytest.mark.parametrize("value", [0, 1, (1 << 64) - 1, 1 << 64, (1 << 192) - 1])
def test_check_oid_accepts(value: int) -> None:
    assert check_oid(value) == value


@pytest.mark.parametrize(
    ("value", "bits"),
    [(0, 32), (1, 32), ((1 << 32) - 1, 32), (255, 8), ((1 << 64) - 1, 64)],
)
def test_check_uint_accepts(value: int, bits: int) -> None:
    assert check_uint(value, bits, "x") == value


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (1 << 32, 32),
        (-1, 32),
        (256, 8),
        (1 << 64, 64),
        (True, 32),
        (False, 32),
        (1.0, 32),
        ("1", 32),
        (b"\x01", 32),
        (None, 32),
        ([1], 32),
        (msgpack.ExtType(0, b""), 32),
    ],
    ids=repr,
)
def test_check_uint_refuses(value: Any, bits: int) -> None:
    with pytest.raises(InvalidArgument, match="frame"):
        check_uint(value, bits, "frame")


# ====================================================================================== NEW_POOL flags


UUID = bytes(range(16))


@pytest.mark.parametrize(
    ("flags", "uuid", "persistent", "shared", "order"),
    [
        (0x01000000, None, False, False, 0),
        (0x00000000, None, False, False, 0),  # spec version 0 reads as 1
        (0x01000001, None, True, False, 0),
        (0x01000011, None, True, False, 1),
        (0x01000040, None, False, False, 4),
        (0x01000002, UUID, False, True, 0),
        (0x01000032, UUID, False, True, 3),
        (0x01000003, UUID, True, True, 0),  # decodes; the session refuses shared persistent
    ],
)
def test_pool_spec_decode(
    flags: int, uuid: bytes | None, persistent: bool, shared: bool, order: int
) -> None:
    spec = PoolSpec.decode(flags, uuid)
    assert (spec.persistent, spec.shared, spec.order) == (persistent, shared, order)
    assert spec.page_size == FRAME_SIZE << order
    assert spec.uuid == (uuid if shared else None)


def test_a_private_pool_ignores_a_valid_uuid() -> None:
    assert PoolSpec.decode(0x01000000, UUID).uuid is None


@pytest.mark.parametrize(
    ("flags", "uuid", "needle"),
    [
        (0x01000004, None, "unknown bits"),  # Xen's PRECOMPRESSED
        (0x01000008, None, "unknown bits"),
        (0x01000100, None, "unknown bits"),
        (0x01800000, None, "unknown bits"),
        (0x00FFFF00, None, "unknown bits"),
        (0x01000050, None, "page order 5"),
        (0x010000F0, None, "page order 15"),
        (0x02000000, None, "version 2"),
        (0xFF000000, None, "version 255"),
        (1 << 32, None, "32-bit"),
        (-1, None, "unsigned"),
        (True, None, "unsigned"),
        (1.0, None, "unsigned"),
        ("0x01000000", None, "unsigned"),
        (None, None, "unsigned"),
        (0x01000002, None, "shared pool needs"),
        (0x01000002, b"\x00" * 15, "16 bytes"),
        (0x01000002, b"\x00" * 17, "16 bytes"),
        (0x01000000, b"", "16 bytes"),
        (0x01000000, "00010203-0405-0607-0809-0a0b0c0d0e0f", "16 bytes"),
        (0x01000000, 0, "16 bytes"),
        (0x01000000, [0] * 16, "16 bytes"),
    ],
    ids=repr,
)
def test_pool_spec_decode_refuses(flags: Any, uuid: Any, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        PoolSpec.decode(flags, uuid)


def test_pool_flag_layout_is_xens() -> None:
    assert (FLAG_PERSISTENT, FLAG_SHARED) == (1, 2)
    assert make_pool_flags(persistent=False, shared=False, order=0) == 0x01000000
    assert make_pool_flags(persistent=True, shared=False, order=1) == 0x01000011
    assert make_pool_flags(persistent=False, shared=True, order=4) == 0x01000042


@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_make_pool_flags_round_trips(order: int, persistent: bool, shared: bool) -> None:
    flags = make_pool_flags(persistent=persistent, shared=shared, order=order)
    spec = PoolSpec.decode(flags, UUID)
    assert (spec.persistent, spec.shared, spec.order) == (persistent, shared, order)


@pytest.mark.parametrize("order", [-1, MAX_ORDER + 1])
def test_make_pool_flags_refuses_bad_orders(order: int) -> None:
    with pytest.raises(InvalidArgument):
        make_pool_flags(persistent=False, shared=False, order=order)


# ====================================================================================== HELLO


def test_hello_encode_and_decode() -> None:
    data = Hello(1, "cache", 256).encode()
    assert data.hex() == "0000000d951e0101a56361636865cd0100"  # proto/vectors: "hello"
    (message,) = decode_all(data)
    assert Hello.decode(message) == Hello(1, "cache", 256)


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * MAX_NAME_LEN, "..", "-"])
def test_hello_accepts_names(name: str) -> None:
    assert Hello.decode([30, 1, 1, name, 1]).name == name
    assert valid_guest_name(name)


@pytest.mark.parametrize(
    "message",
    [
        None,
        {"op": 30},
        [],
        [30],
        [30, 1, 1, "a"],
        [30, 1, 1, "a", 1, 0],
        [31, 1, 1, "a", 1],
        [True, 1, 1, "a", 1],
        ["30", 1, 1, "a", 1],
    ],
    ids=repr,
)
def test_hello_decode_refuses_other_shapes_as_protocol_errors(message: Any) -> None:
    with pytest.raises(ProtocolError):
        Hello.decode(message)


@pytest.mark.parametrize(
    "message",
    [
        [30, 1, 1, "", 1],
        [30, 1, 1, "x" * (MAX_NAME_LEN + 1), 1],
        [30, 1, 1, "a b", 1],
        [30, 1, 1, "a/b", 1],
        [30, 1, 1, "é", 1],
        [30, 1, 1, "a\n", 1],
        [30, 1, 1, b"cache", 1],
        [30, 1, 1, None, 1],
        [30, 1, "1", "a", 1],
        [30, 1, -1, "a", 1],
        [30, 1, 1 << 32, "a", 1],
        [30, 1, True, "a", 1],
        [30, 1, 1, "a", -1],
        [30, 1, 1, "a", 1 << 32],
        [30, 1, 1, "a", 1.0],
    ],
    ids=repr,
)
def test_hello_decode_refuses_bad_fields_as_invalid(message: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        Hello.decode(message)
    assert not isinstance(info.value, ProtocolError)


@pytest.mark.parametrize(
    ("hello", "options"),
    [
        (Hello(1, "cache", 256, ring=16), {"ring": 16}),
        (Hello(1, "cache", 256, map=True), {"map": True}),
        (Hello(1, "cache", 256, map=True, lend=True), {"map": True, "lend": True}),
        (
            Hello(1, "cache", 256, ring=8, map=True, lend=True),
            {"ring": 8, "map": True, "lend": True},
        ),
    ],
    ids=repr,
)
def test_hello_options_round_trip(hello: Hello, options: dict[str, Any]) -> None:
    (message,) = decode_all(hello.encode())
    assert message == [30, 1, 1, "cache", 256, options]
    assert list(message[5]) == list(options)  # key order: ring, map, lend
    assert Hello.decode(message) == hello


def test_hello_lend_is_the_vector() -> None:
    data = Hello(1, "cache", 256, map=True, lend=True).encode()
    assert data.hex() == "00000019961e0101a56361636865cd010082a36d6170c3a46c656e64c3"  # hello_lend


def test_hello_without_options_asks_for_nothing() -> None:
    hello = Hello.decode([30, 1, 1, "a", 1, {}])
    assert (hello.ring, hello.map, hello.lend) == (0, False, False)
    assert Hello.decode([30, 1, 1, "a", 1, {"future": [1]}]) == Hello(1, "a", 1)


def test_hello_lend_without_map_decodes() -> None:
    """The daemon grants no loan without a mirror (PROTOCOL.md §4.8); the codec lets it be."""
    assert Hello.decode([30, 1, 1, "a", 1, {"lend": True}]) == Hello(1, "a", 1, lend=True)


@pytest.mark.parametrize("option", ["map", "lend"])
@pytest.mark.parametrize("value", [1, 0, "true", None, [True], 1.0, b"\x01"], ids=repr)
def test_hello_bool_options_refuse_non_bools_as_invalid(option: str, value: Any) -> None:
    with pytest.raises(InvalidArgument, match=option) as info:
        Hello.decode([30, 1, 1, "a", 1, {"map": True, option: value}])
    assert not isinstance(info.value, ProtocolError)


def test_hello_leaves_version_and_frames_ranges_to_the_daemon() -> None:
    """Version 2 is VERSION and frames 0 is LIMIT, decided after decoding (PROTOCOL.md §4.4)."""
    assert Hello.decode([30, 1, 2, "a", 0]) == Hello(2, "a", 0)


def test_hello_op_must_be_an_integer() -> None:
    with pytest.raises(ProtocolError):
        Hello.decode([30.0, 1, 1, "a", 1])


# ====================================================================================== limits


WIRE_LIMITS = {
    "version": 1,
    "guest": "1000/cache",
    "frames": 256,
    "max_frame": 1 << 20,
    "max_batch": 4096,
    "max_pools": 64,
    "ring": 0,
}


def test_limits_round_trip() -> None:
    limits = Limits.from_wire(WIRE_LIMITS)
    assert limits == Limits(1, "1000/cache", 256, 1 << 20, 4096, 64)
    assert limits.to_wire() == WIRE_LIMITS
    assert list(limits.to_wire()) == list(WIRE_LIMITS)  # key order is the vectors'


def test_limits_with_a_mirror_and_a_loan() -> None:
    wire = {**WIRE_LIMITS, "map": 1 << 22, "lend": 1 << 22}
    limits = Limits.from_wire(wire)
    assert (limits.map, limits.lend) == (1 << 22, 1 << 22)
    assert limits.to_wire() == wire
    assert list(limits.to_wire()) == list(wire)  # key order is hello_lend_reply's


def test_limits_omit_map_and_lend_when_not_granted() -> None:
    limits = Limits(1, "1000/cache", 256, 1 << 20, 4096, 64, map=1 << 22)
    assert limits.lend == 0 and "lend" not in limits.to_wire()
    assert Limits.from_wire(limits.to_wire()) == limits
    limits = Limits(1, "1000/cache", 256, 1 << 20, 4096, 64)
    assert not {"map", "lend"} & set(limits.to_wire())
    assert Limits.from_wire(WIRE_LIMITS).lend == 0  # absent: no loan


def test_limits_ignore_unknown_keys() -> None:
    assert Limits.from_wire({**WIRE_LIMITS, "future": [1, 2]}) == Limits.from_wire(WIRE_LIMITS)


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        [1, 0, WIRE_LIMITS],
        # Every key is required but "ring" (a daemon from before rings grants none).
        *(
            {k: v for k, v in WIRE_LIMITS.items() if k != key}
            for key in WIRE_LIMITS
            if key != "ring"
        ),
        {**WIRE_LIMITS, "ring": -1},
        {**WIRE_LIMITS, "map": True},
        {**WIRE_LIMITS, "lend": -1},
        {**WIRE_LIMITS, "lend": True},
        {**WIRE_LIMITS, "lend": 1 << 32},
        {**WIRE_LIMITS, "max_frame": -1},
        {**WIRE_LIMITS, "max_batch": True},
        {**WIRE_LIMITS, "max_pools": "64"},
        {**WIRE_LIMITS, "frames": 1 << 32},
        {**WIRE_LIMITS, "version": 1.0},
    ],
    ids=repr,
)
def test_limits_from_wire_refuses(value: Any) -> None:
    with pytest.raises(ProtocolError):
        Limits.from_wire(value)


@pytest.mark.parametrize("guest", [5, None, b"1000/cache"])
def test_limits_guest_must_be_a_str(guest: Any) -> None:
    with pytest.raises(ProtocolError):
        Limits.from_wire({**WIRE_LIMITS, "guest": guest})


# ====================================================================================== requests and replies


@pytest.mark.parametrize(
    ("message", "op", "req_id"),
    [
        ([31, 1], 31, 1),
        ([31, (1 << 32) - 1], 31, (1 << 32) - 1),
        ([4, 9, "pool", "oid", None, 1.5], 4, 9),  # arguments are the handler's business
        ([99, 5], 99, 5),  # so is an unknown op
        ([(1 << 64) - 1, 5], (1 << 64) - 1, 5),
    ],
)
def test_split_request(message: list[Any], op: int, req_id: int) -> None:
    got_op, got_req_id, _ = split_request(message)
    assert (got_op, got_req_id) == (op, req_id)


@pytest.mark.parametrize(
    "message",
    [
        None,
        31,
        "ping",
        {"op": 31, "req_id": 1},
        [],
        [31],
        [-1, 1],
        [31, -1],
        [31, 1 << 32],
        [True, 1],
        [31, False],
        [31.0, 1],
        [31, 1.0],
        ["31", 1],
        [31, "1"],
        [None, 1],
        [31, b"\x01"],
        [msgpack.ExtType(0, b""), 1],
    ],
    ids=repr,
)
def test_split_request_refuses(message: Any) -> None:
    with pytest.raises(ProtocolError):
        split_request(message)


def test_split_request_refuses_req_id_zero() -> None:
    with pytest.raises(ProtocolError):
        split_request([31, 0])


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ([1, 0, None], (1, 0, None)),
        ([2, 0, [7, 4096]], (2, 0, [7, 4096])),
        ([3, 0, True], (3, 0, True)),
        ([0, 8, "bye"], (0, 8, "bye")),
        ([4, 1, "bad index"], (4, 1, "bad index")),
        ([5, 99, "from the future"], (5, 99, "from the future")),
    ],
)
def test_split_reply(message: list[Any], expected: tuple[int, int, Any]) -> None:
    assert split_reply(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        None,
        {"req_id": 1},
        [],
        [1, 0],
        [1, 0, None, None],
        ["1", 0, None],
        [1, "0", None],
        [1, 0.0, None],
        [1.0, 0, None],
        [1, 1, None],  # an error must say why
        [1, 1, b"bytes"],
        [1, 4, 42],
    ],
    ids=repr,
)
def test_split_reply_refuses(message: Any) -> None:
    with pytest.raises(ProtocolError):
        split_reply(message)


def test_encode_reply() -> None:
    assert encode_reply(5, Status.OK, True) == b"\x00\x00\x00\x04\x93\x05\x00\xc3"
    assert decode_all(encode_reply(0, Status.SHUTDOWN, "bye")) == [[0, 8, "bye"]]


def test_op_and_status_numbers_are_the_spec_tables() -> None:
    assert {op.name: int(op) for op in Op} == {
        "NEW_POOL": 1,
        "DESTROY_POOL": 2,
        "PUT": 4,
        "GET": 5,
        "FLUSH": 6,
        "FLUSH_OBJECT": 7,
        "READ": 8,
        "WRITE": 9,
        "XCHG": 10,
        "PUT_MANY": 20,
        "GET_MANY": 21,
        "FLUSH_MANY": 22,
        "TOUCH_MANY": 23,
        "LEND": 24,
        "HELLO": 30,
        "PING": 31,
        "DOORBELL": 32,
    }
    assert {s.name: int(s) for s in Status} == {
        "OK": 0,
        "INVALID": 1,
        "NO_POOL": 2,
        "PERMISSION": 3,
        "PROTOCOL": 4,
        "VERSION": 5,
        "LIMIT": 6,
        "CONFLICT": 7,
        "SHUTDOWN": 8,
        "NOT_FOUND": 9,
    }
    assert PROTOCOL_VERSION == 1


def spec_table(heading: str) -> dict[str, int]:
    """``Name: number`` of the first table under ``heading`` in PROTOCOL.md whose rows start
    with a number and a name (§6's op table, §8's status table)."""
    text = SPEC.read_text()
    section = text[text.index(heading) :]
    rows: dict[str, int] = {}
    for line in section.splitlines()[1:]:
        match = re.match(r"\| *(\d+) *\| *([A-Z_]+) *\|", line)
        if match:
            rows[match[2]] = int(match[1])
        elif rows:
            break
    return rows


def test_the_spec_tables_are_the_codes() -> None:
    assert spec_table("## 6. Operations") == {op.name: int(op) for op in Op}
    assert spec_table("## 8. Status codes") == {s.name: int(s) for s in Status}
    headings = re.findall(r"^### 6\.\d+ (.*)$", SPEC.read_text(), re.M)
    for op in Op:  # and every op but HELLO (§4.2) has a section of §6
        if op != Op.HELLO:
            assert [h for h in headings if re.search(rf"\b{op.name}\b", h)], op.name


# ====================================================================================== statuses and errors


STATUS_ERRORS: list[tuple[Status, type[TmemError]]] = [
    (Status.INVALID, InvalidArgument),
    (Status.NO_POOL, UnknownPool),
    (Status.PERMISSION, PermissionDenied),
    (Status.PROTOCOL, ProtocolError),
    (Status.VERSION, VersionMismatch),
    (Status.LIMIT, LimitExceeded),
    (Status.CONFLICT, GuestConflict),
    (Status.SHUTDOWN, DaemonShuttingDown),
    (Status.NOT_FOUND, NotFound),
]


def test_every_error_status_has_an_exception() -> None:
    assert {s for s, _ in STATUS_ERRORS} == set(Status) - {Status.OK}


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS, ids=[s.name for s, _ in STATUS_ERRORS])
def test_status_error_round_trip(status: Status, cls: type[TmemError]) -> None:
    exc = error_for_status(status, "why")
    assert type(exc) is cls
    assert str(exc) == "why"
    assert status_for_error(exc) == status
    assert status_for_error(cls("x")) == status


@pytest.mark.parametrize("status", [0, 10, 99, -1, 1 << 40])
def test_unknown_status_is_a_protocol_error(status: int) -> None:
    exc = error_for_status(status, "?")
    assert type(exc) is ProtocolError and str(exc) == "?"


@pytest.mark.parametrize("exc", [TmemError("x"), DaemonGone("x")], ids=repr)
def test_an_unmapped_error_is_answered_as_protocol(exc: TmemError) -> None:
    assert status_for_error(exc) == Status.PROTOCOL


def test_error_classes_keep_their_meaning() -> None:
    """VersionMismatch is a ProtocolError (the connection ends) yet has its own status."""
    assert issubclass(VersionMismatch, ProtocolError)
    assert status_for_error(VersionMismatch("v")) == Status.VERSION
    assert issubclass(DaemonShuttingDown, DaemonGone)
    assert issubclass(InvalidArgument, ValueError)
