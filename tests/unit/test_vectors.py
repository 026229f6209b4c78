"""The golden vectors of proto/vectors/ against the Python codec and the daemon's own checks.

Each valid frame must decode to its JSON message and re-encode to the same bytes; each request
must pass the daemon's validation (and a real Session must answer it OK); each invalid frame must
be refused with the status the vector names. See proto/vectors/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tmemclient._plans import lend_reply
from tmemclient.wire.codec import HEADER, NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.errors import (
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
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import (
    HELLO_MAX_FRAME,
    INDEX_BITS,
    MAX_NAME_LEN,
    PROTOCOL_VERSION,
    UUID_BYTES,
    Hello,
    Limits,
    Op,
    PoolSpec,
    Status,
    check_uint,
    decode_oid,
    encode_oid,
    error_for_status,
    split_reply,
    split_request,
    status_for_error,
)
from tmemclient.wire.requests import ARGS, OPTIONAL
from tmemd.config import GuestPolicy, Settings
from tmemd.config import Limits as DaemonLimits
from tmemd.host import Host
from tmemd.session import Session
from tmemd.store import Store

VECTORS = Path(__file__).resolve().parents[2] / "proto" / "vectors"
FRAMES: list[dict[str, Any]] = json.loads((VECTORS / "frames.json").read_text())
INVALID: list[dict[str, Any]] = json.loads((VECTORS / "invalid.json").read_text())
REQUESTS = [c for c in FRAMES if c["direction"] == "request"]
REPLIES = [c for c in FRAMES if c["direction"] == "reply"]
DEFAULTS = DaemonLimits()

# The made-up pool handles the request vectors use, and what they stand for.
H_EPHEMERAL, H_PERSISTENT_8K, H_SHARED = 0x6A09E667, 0xBB67AE85, 0x3C6EF372
SHARED_UUID = bytes.fromhex("5f1d3a7e9c2b4e8ab6d01a2b3c4d5e6f")

# PROTOCOL.md §6: the argument list of every op but HELLO (which has its own shape, §4.2).
SPEC_ARGS: dict[int, tuple[str, ...]] = {
    Op.NEW_POOL: ("flags", "uuid", "name"),
    Op.DESTROY_POOL: ("pool",),
    Op.PUT: ("pool", "oid", "index", "frame"),
    Op.GET: ("pool", "oid", "index", "frame"),
    Op.FLUSH: ("pool", "oid", "index"),
    Op.FLUSH_OBJECT: ("pool", "oid"),
    Op.READ: ("pool", "oid", "index", "offset", "length", "frame"),
    Op.WRITE: ("pool", "oid", "index", "offset", "length", "frame"),
    Op.XCHG: ("pool", "oid", "index", "offset", "length", "frame"),
    Op.PUT_MANY: ("pool", "entries"),
    Op.GET_MANY: ("pool", "entries"),
    Op.FLUSH_MANY: ("pool", "entries"),
    Op.TOUCH_MANY: ("pool", "entries"),
    Op.LEND: ("want",),
    Op.PING: (),
    Op.DOORBELL: (),
}
# Trailing arguments a request may leave out (PROTOCOL.md §6.1: NEW_POOL's name).
SPEC_OPTIONAL: dict[int, int] = {Op.NEW_POOL: 1}

ERROR_CLASS: dict[int, type[TmemError]] = {
    Status.INVALID: InvalidArgument,
    Status.NO_POOL: UnknownPool,
    Status.PERMISSION: PermissionDenied,
    Status.PROTOCOL: ProtocolError,
    Status.VERSION: VersionMismatch,
    Status.LIMIT: LimitExceeded,
    Status.CONFLICT: GuestConflict,
    Status.SHUTDOWN: DaemonShuttingDown,
    Status.NOT_FOUND: NotFound,
}


def from_json(value: Any) -> Any:
    """A vector's JSON message as the Python value msgpack decodes to."""
    if isinstance(value, dict):
        if list(value) == ["bin"]:
            return bytes.fromhex(value["bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def to_json(value: Any) -> Any:
    """The inverse of from_json."""
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def same(decoded: Any, expected_json: Any) -> bool:
    """Equal including types and key order (json.dumps tells true from 1 and 1 from 1.0)."""
    return json.dumps(to_json(decoded)) == json.dumps(expected_json)


def frame_bytes(case: dict[str, Any]) -> bytes:
    return bytes.fromhex(case["hex"])


def ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in cases]


def served(session: Session, message: Any) -> bytes:
    """A session's reply to a request it serves at once (no Job: the vectors' are small)."""
    reply = session.handle(message)
    assert isinstance(reply, bytes), reply
    return reply


def decode_one(data: bytes, max_frame: int = DEFAULTS.max_frame) -> Any:
    decoder = FrameDecoder(max_frame)
    decoder.feed(data)
    messages = list(decoder.messages())
    assert len(messages) == 1, messages
    assert decoder.buffered == 0
    return messages[0]


def check_arguments(op: int, m: list[Any]) -> None:
    """PROTOCOL.md §6's argument rules, checked with the codec's own validators (the pool handle
    is assumed to name a live order-0 pool; the region to be large enough)."""
    if op not in SPEC_ARGS:
        raise InvalidArgument(f"unknown op {op}")
    if not 2 + len(SPEC_ARGS[op]) - SPEC_OPTIONAL.get(op, 0) <= len(m) <= 2 + len(SPEC_ARGS[op]):
        raise InvalidArgument("wrong number of arguments")
    args = dict(zip(SPEC_ARGS[op], m[2:], strict=False))
    if op == Op.NEW_POOL:
        PoolSpec.decode(args["flags"], args["uuid"], args.get("name"))
    if "oid" in args:
        decode_oid(args["oid"])
    for name in ("index", "offset", "length", "frame"):
        if name in args:
            check_uint(args[name], INDEX_BITS, name)
    if "want" in args:
        check_uint(args["want"], 64, "want")
    if "length" in args and (args["length"] < 1 or args["offset"] + args["length"] > FRAME_SIZE):
        raise InvalidArgument("offset + length outside the page")
    if "entries" in args:
        entries = args["entries"]
        width = 2 if op in (Op.FLUSH_MANY, Op.TOUCH_MANY) else 3
        if type(entries) is not list or len(entries) % width:
            raise InvalidArgument("entries must be a flat array")
        if len(entries) // width > DEFAULTS.max_batch:
            raise LimitExceeded("too many entries")
        for i in range(0, len(entries), width):
            if op == Op.TOUCH_MANY:  # a token: head slot, generation
                check_uint(entries[i], 32, "slot")
                check_uint(entries[i + 1], 64, "generation")
                continue
            decode_oid(entries[i])
            for value in entries[i + 1 : i + width]:
                check_uint(value, 32, "index or frame")


def verdict(data: bytes, *, hello: bool) -> str:
    """What the codec says of one frame: OK, or the name of the status it is refused with."""
    decoder = FrameDecoder(HELLO_MAX_FRAME if hello else DEFAULTS.max_frame)
    decoder.feed(data)
    try:
        message = decoder.next_message()
        if message is NEED_DATA:
            return "NEED_DATA"
        if hello:
            Hello.decode(message)
        else:
            op, _req_id, m = split_request(message)
            check_arguments(op, m)
    except TmemError as exc:
        return status_for_error(exc).name
    return "OK"


class VectorSession:
    """A real daemon Session whose pools answer to the vectors' made-up handles.

    ``lend``: granted ``map`` and ``lend`` as by the hello_lend vector (a real mirror and loan
    file: PUT_MANY answers with tokens; LEND is served), as the request vectors assume. Else
    only marked mapped (TOUCH_MANY needs it) with no mirror: PUT_MANY answers with bools and
    LEND is INVALID."""

    BUDGET = 1 << 23  # 8 MiB: what the lend vector asks for, all of it free

    def __init__(self, *, lend: bool = False) -> None:
        store = Store(self.BUDGET)
        self.host = Host(
            store, Settings(socket=Path("/nonexistent/tmemd.sock"), budget=self.BUDGET)
        )
        guest = self.host.attach("1000/cache", GuestPolicy())
        region = memoryview(bytearray(256 * FRAME_SIZE))  # the HELLO vector's 256 frames
        self.session = Session(self.host, guest, region, DEFAULTS)
        self.session.mapped = True
        if lend:  # what the server grants for hello_lend (PROTOCOL.md §4.7, §4.8)
            store.map_guest(guest)
            store.open_loan(guest)
            self.session.lending = True
        self.host.join(self.session)
        self.host.grant(SHARED_UUID, "1000/cache")
        for alias, flags, uuid in (
            (H_EPHEMERAL, 0x01000000, None),
            (H_PERSISTENT_8K, 0x01000011, None),
            (H_SHARED, 0x01000002, SHARED_UUID),
        ):
            req_id, status, (handle, _size) = self.ask([Op.NEW_POOL, 1, flags, uuid])
            assert (req_id, status) == (1, Status.OK)
            self.session.pools[alias] = self.session.pools.pop(handle)

    def ask(self, message: Any) -> list[Any]:
        """Serve ``message`` as it would arrive: encoded, then decoded by the daemon's codec."""
        reply = decode_one(served(self.session, decode_one(encode_frame(message))), 1 << 26)
        assert isinstance(reply, list)
        return reply


# ------------------------------------------------------------------------------ the files


def test_vector_files_are_well_formed() -> None:
    names = ids(FRAMES) + ids(INVALID)
    assert len(names) == len(set(names)), "vector names must be unique"
    for case in FRAMES:
        assert set(case) == {"name", "direction", "hex", "message", "note"}, case["name"]
        assert case["direction"] in ("request", "reply")
    for case in INVALID:
        assert set(case) == {"name", "hex", "status", "note"}, case["name"]
        assert case["status"] in ("PROTOCOL", "INVALID")
    for case in FRAMES + INVALID:
        assert case["hex"] == case["hex"].lower()
        frame_bytes(case)  # valid hex


@pytest.mark.parametrize("case", FRAMES, ids=ids(FRAMES))
def test_length_prefix_counts_the_body(case: dict[str, Any]) -> None:
    data = frame_bytes(case)
    (length,) = HEADER.unpack_from(data)
    assert length == len(data) - 4 > 0


def test_every_op_and_every_status_has_a_vector() -> None:
    ops = {c["message"][0] for c in REQUESTS}
    assert ops == {int(op) for op in Op}
    statuses = {c["message"][1] for c in REPLIES}
    assert statuses == {int(s) for s in Status}


# ------------------------------------------------------------------------------ decode / encode


@pytest.mark.parametrize("case", FRAMES, ids=ids(FRAMES))
def test_decode(case: dict[str, Any]) -> None:
    message = decode_one(frame_bytes(case))
    assert same(message, case["message"])


@pytest.mark.parametrize("case", FRAMES, ids=ids(FRAMES))
def test_decode_byte_by_byte(case: dict[str, Any]) -> None:
    data = frame_bytes(case)
    decoder = FrameDecoder(DEFAULTS.max_frame)
    for i in range(len(data) - 1):
        decoder.feed(data[i : i + 1])
        assert decoder.next_message() is NEED_DATA
    decoder.feed(data[-1:])
    assert same(decoder.next_message(), case["message"])
    assert decoder.next_message() is NEED_DATA


@pytest.mark.parametrize("case", FRAMES, ids=ids(FRAMES))
def test_encode(case: dict[str, Any]) -> None:
    assert encode_frame(from_json(case["message"])).hex() == case["hex"]


def test_all_vectors_as_one_stream() -> None:
    decoder = FrameDecoder(DEFAULTS.max_frame)
    decoder.feed(b"".join(frame_bytes(c) for c in FRAMES))
    messages = list(decoder.messages())
    assert len(messages) == len(FRAMES)
    for message, case in zip(messages, FRAMES, strict=True):
        assert same(message, case["message"]), case["name"]


# ------------------------------------------------------------------------------ requests


def test_spec_argument_lists_match_the_daemon() -> None:
    assert {op: len(a) for op, a in SPEC_ARGS.items()} == {op: len(a) for op, a in ARGS.items()}
    assert SPEC_OPTIONAL == OPTIONAL


@pytest.mark.parametrize("case", REQUESTS, ids=ids(REQUESTS))
def test_request_passes_validation(case: dict[str, Any]) -> None:
    message = from_json(case["message"])
    data = frame_bytes(case)
    if message[0] == Op.HELLO:
        assert len(data) - 4 <= HELLO_MAX_FRAME
        hello = Hello.decode(message)
        assert hello.version == PROTOCOL_VERSION
        assert 1 <= hello.frames <= DEFAULTS.max_region_frames
        assert len(hello.name) <= MAX_NAME_LEN
        assert hello.encode() == data
        assert verdict(data, hello=True) == "OK"
        return
    op, req_id, _ = split_request(message)
    assert 1 <= req_id < 1 << 32  # 0 is reserved for notices
    assert 0 <= 2 + len(SPEC_ARGS[op]) - len(message) <= SPEC_OPTIONAL.get(op, 0)
    assert verdict(data, hello=False) == "OK"


@pytest.mark.parametrize("case", REQUESTS, ids=ids(REQUESTS))
def test_request_oids_are_canonical(case: dict[str, Any]) -> None:
    message = from_json(case["message"])
    op = message[0]
    oids: list[Any] = []
    if op in SPEC_ARGS and "oid" in SPEC_ARGS[op]:
        oids.append(message[2 + SPEC_ARGS[op].index("oid")])
    if op in (Op.PUT_MANY, Op.GET_MANY, Op.FLUSH_MANY):
        oids.extend(message[3][:: 2 if op == Op.FLUSH_MANY else 3])
    for oid in oids:
        assert encode_oid(decode_oid(oid)) == oid


@pytest.mark.parametrize(
    "case", [c for c in REQUESTS if c["message"][0] == Op.NEW_POOL], ids=lambda c: c["name"]
)
def test_new_pool_reply_matches_its_request(case: dict[str, Any]) -> None:
    _, req_id, flags, uuid, *name = from_json(case["message"])
    spec = PoolSpec.decode(flags, uuid, *name)
    (reply,) = [c for c in REPLIES if c["name"] == case["name"] + "_reply"]
    r_id, status, (handle, page_size, *reopened) = from_json(reply["message"])
    assert (r_id, status) == (req_id, Status.OK)
    assert len(reopened) == (spec.name is not None)  # a named pool's reply says if reopened
    assert all(type(flag) is bool for flag in reopened)
    assert page_size == spec.page_size == FRAME_SIZE << spec.order
    assert check_uint(handle, 32, "handle") == handle
    if spec.shared:
        assert spec.uuid is not None and len(spec.uuid) == UUID_BYTES


def test_requests_are_served_ok_by_a_real_session() -> None:
    vs = VectorSession(lend=True)
    for case in REQUESTS:
        message = from_json(case["message"])
        if message[0] == Op.HELLO:
            continue
        if message[0] == Op.DOORBELL:
            assert vs.session.handle(message) == b""  # never answered
            continue
        req_id, status, result = vs.ask(message)
        assert (req_id, status) == (message[1], Status.OK), (case["name"], result)
    vs.session.close()


def test_lend_is_answered_exactly_as_the_vector() -> None:
    """A fresh lending session with 8 MiB free answers the lend vector with lend_reply's bytes:
    the keys in the order tmemd builds them (PROTOCOL.md §6.10)."""
    (request,) = [c for c in REQUESTS if c["name"] == "lend"]
    (reply,) = [c for c in REPLIES if c["name"] == "lend_reply"]
    vs = VectorSession(lend=True)
    assert served(vs.session, from_json(request["message"])).hex() == reply["hex"]
    vs.session.close()


def test_lend_needs_a_loan() -> None:
    (request,) = [c for c in REQUESTS if c["name"] == "lend"]
    vs = VectorSession()  # mapped, but granted no loan
    message = from_json(request["message"])
    req_id, status, result = vs.ask(message)
    assert (req_id, status) == (message[1], Status.INVALID)
    assert "loan" in result
    vs.session.close()


@pytest.mark.parametrize(
    "case", [c for c in INVALID if c["name"].startswith("lend_")], ids=lambda c: c["name"]
)
def test_invalid_lend_is_refused_for_its_argument(case: dict[str, Any]) -> None:
    """On a connection with a loan, so that the refusal is the argument's, not the loan's."""
    vs = VectorSession(lend=True)
    message = decode_one(frame_bytes(case))
    req_id, status, result = vs.ask(message)
    assert (req_id, status) == (message[1], Status.INVALID)
    assert "want" in result, result
    vs.session.close()


def test_batch_results_have_one_flag_per_entry() -> None:
    vs = VectorSession()
    for case in REQUESTS:
        message = from_json(case["message"])
        if message[0] in (Op.PUT_MANY, Op.GET_MANY):
            _, status, flags = vs.ask(message)
            assert status == Status.OK
            assert [type(f) for f in flags] == [bool] * (len(message[3]) // 3)
    vs.session.close()


def test_mapped_put_many_over_budget_answers_a_token_per_stored_page() -> None:
    """A mapped guest's batch bigger than the budget: every page was stored, so every entry
    gets the token its put gave it (never nil), as put_many_reply_mapped_over_budget shows;
    the token of a page a later entry evicted simply no longer reads."""
    (case,) = [c for c in REPLIES if c["name"] == "put_many_reply_mapped_over_budget"]
    shape = from_json(case["message"])[2]
    store = Store(2 * FRAME_SIZE)  # two pages
    host = Host(store, Settings(socket=Path("/nonexistent/tmemd.sock"), budget=2 * FRAME_SIZE))
    guest = host.attach("1000/cache", GuestPolicy())
    session = Session(host, guest, memoryview(bytearray(4 * FRAME_SIZE)), DEFAULTS)
    mirror = store.map_guest(guest)
    session.mapped = True
    host.join(session)
    _, _, (handle, _) = decode_one(
        served(session, [int(Op.NEW_POOL), 1, 0x01000000, None]), 1 << 16
    )
    entries = [oid for i in range(len(shape)) for oid in (i, 0, i)]
    req_id, status, tokens = decode_one(
        served(session, [int(Op.PUT_MANY), 12, handle, entries]), 1 << 16
    )
    assert (req_id, status) == (12, Status.OK)
    assert [type(t) for t in tokens] == [type(t) for t in shape] == [list] * 3
    assert tokens[2][0] == tokens[0][0]  # the third page took the first one's slot
    assert [gen for _, gen in tokens] == sorted({gen for _, gen in tokens})  # each its own
    assert mirror.gen[tokens[0][0]] == tokens[2][1] != tokens[0][1]  # the first no longer reads
    session.close()
    store.close()


# ------------------------------------------------------------------------------ replies


@pytest.mark.parametrize("case", REPLIES, ids=ids(REPLIES))
def test_reply_shape(case: dict[str, Any]) -> None:
    req_id, status, result = split_reply(from_json(case["message"]))
    assert status in set(Status)
    if req_id == 0:  # a notice: only these statuses are ever sent on their own
        assert status in (Status.OK, Status.PROTOCOL, Status.LIMIT, Status.SHUTDOWN)
        assert status != Status.OK or result is None  # OK: the ring doorbell
    if status == Status.OK:
        return
    exc = error_for_status(status, result)
    assert type(exc) is ERROR_CLASS[status]
    assert str(exc) == result
    assert status_for_error(exc) == status


def test_hello_reply_carries_the_default_limits() -> None:
    (case,) = [c for c in REPLIES if c["name"] == "hello_reply"]
    req_id, status, result = split_reply(from_json(case["message"]))
    assert (req_id, status) == (1, Status.OK)
    limits = Limits.from_wire(result)
    assert limits.version == PROTOCOL_VERSION
    assert (limits.max_frame, limits.max_batch, limits.max_pools) == (
        DEFAULTS.max_frame,
        DEFAULTS.max_batch,
        DEFAULTS.max_pools,
    )
    assert encode_frame([1, 0, limits.to_wire()]) == frame_bytes(case)


@pytest.mark.parametrize(
    "case", [c for c in REPLIES if c["name"].startswith("hello")], ids=lambda c: c["name"]
)
def test_hello_replies_round_trip_through_limits(case: dict[str, Any]) -> None:
    """Limits keeps every key the HELLO replies carry, in their order (``map``, ``lend`` only
    when granted)."""
    _, _, result = split_reply(from_json(case["message"]))
    assert encode_frame([1, 0, Limits.from_wire(result).to_wire()]) == frame_bytes(case)


def test_hello_lend_reply_answers_the_hello_lend_vector() -> None:
    (hello,) = [c for c in REQUESTS if c["name"] == "hello_lend"]
    (reply,) = [c for c in REPLIES if c["name"] == "hello_lend_reply"]
    asked = Hello.decode(from_json(hello["message"]))
    assert asked.map and asked.lend
    limits = Limits.from_wire(from_json(reply["message"])[2])
    assert limits.map > 0 and limits.lend == limits.map  # tmemd: the loan has the mirror's slots


@pytest.mark.parametrize(
    "case", [c for c in REPLIES if c["name"].startswith("lend_reply")], ids=lambda c: c["name"]
)
def test_lend_reply_shape(case: dict[str, Any]) -> None:
    (request,) = [c for c in REQUESTS if c["name"] == "lend"]
    req_id, status, result = split_reply(from_json(case["message"]))
    assert (req_id, status) == (request["message"][1], Status.OK)  # answers the lend vector
    assert list(result) == ["lent", "low", "seq", "room"]
    assert lend_reply(result) == result  # the client's own check
    assert all(result[key] % FRAME_SIZE == 0 for key in ("lent", "low", "room"))
    assert result["seq"] % 2 == 0  # never answered while a recall is under way


def test_hello_reply_answers_the_hello_vector() -> None:
    (hello,) = [c for c in REQUESTS if c["name"] == "hello"]
    (reply,) = [c for c in REPLIES if c["name"] == "hello_reply"]
    asked = Hello.decode(from_json(hello["message"]))
    limits = Limits.from_wire(from_json(reply["message"])[2])
    assert limits.frames == asked.frames
    assert limits.guest.endswith("/" + asked.name)  # an unlisted name, namespaced as UID/NAME


# ------------------------------------------------------------------------------ invalid frames


@pytest.mark.parametrize("case", INVALID, ids=ids(INVALID))
def test_invalid_frame_is_refused_by_the_codec(case: dict[str, Any]) -> None:
    hello = case["name"].startswith("hello_") and case["name"] != "hello_after_handshake"
    assert verdict(frame_bytes(case), hello=hello) == case["status"]


@pytest.mark.parametrize(
    "case", [c for c in INVALID if not c["name"].startswith("hello_")], ids=lambda c: c["name"]
)
def test_invalid_frame_is_refused_by_a_real_session(case: dict[str, Any]) -> None:
    """The daemon's Session agrees with the vector: PROTOCOL raises (the server then closes the
    connection), INVALID is answered and the session goes on serving."""
    vs = VectorSession(lend=True)
    decoder = FrameDecoder(DEFAULTS.max_frame)
    decoder.feed(frame_bytes(case))
    if case["status"] == "PROTOCOL":
        with pytest.raises(ProtocolError):
            vs.session.handle(decoder.next_message())
        return
    message = decoder.next_message()
    req_id, status, result = vs.ask(message)
    assert (req_id, status) == (message[1], Status.INVALID), result
    assert isinstance(result, str) and result
    assert vs.host.store.used == 0  # nothing was stored: not even a batch's valid entries
    assert vs.ask([Op.PING, 99]) == [99, Status.OK, None]
    vs.session.close()
