"""The messages of the wire protocol (PROTOCOL.md §4-8): what the frames of codec.py hold.

A request is ``[op, req_id, *args]``; a reply is ``[req_id, status, result_or_message]``. Replies
with ``req_id == 0`` are notices the daemon sends on its own. ``proto/PROTOCOL.md`` is the
normative text; this module is its Python rendering, and the golden vectors in
``proto/vectors/`` hold both to each other. No I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from tmemclient.wire.codec import encode_frame
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
from tmemclient.wire.layout import FRAME_SIZE, MAX_ORDER, MAX_RING_FRAMES, valid_ring_frames

PROTOCOL_VERSION: Final = 1
OID_BITS: Final = 192
OID_BYTES: Final = OID_BITS // 8
INDEX_BITS: Final = 32
UUID_BYTES: Final = 16
MAX_NAME_LEN: Final = 64
HELLO_MAX_FRAME: Final = 4096  # the handshake must fit in this before limits are negotiated
MAX_HELLO_OPTIONS: Final = 16

# Pool flags, laid out as in Xen's public/tmem.h.
FLAG_PERSISTENT: Final = 1 << 0
FLAG_SHARED: Final = 1 << 1
ORDER_SHIFT: Final = 4
ORDER_MASK: Final = 0xF
VERSION_SHIFT: Final = 24
VERSION_MASK: Final = 0xFF


class Op(enum.IntEnum):
    """Request opcodes; the page ops keep Xen's numbers."""

    NEW_POOL = 1
    DESTROY_POOL = 2
    PUT = 4
    GET = 5
    FLUSH = 6
    FLUSH_OBJECT = 7
    READ = 8
    WRITE = 9
    XCHG = 10
    PUT_MANY = 20
    GET_MANY = 21
    FLUSH_MANY = 22
    TOUCH_MANY = 23  # pages read through the mapping, reported afterwards (PROTOCOL.md §4.7)
    LEND = 24  # borrow memory to use as the guest's own, or give it back (PROTOCOL.md §4.8)
    HELLO = 30
    PING = 31
    DOORBELL = 32  # "look at the request ring"; never answered (PROTOCOL.md §4.6)


class Status(enum.IntEnum):
    """Reply status codes. Anything but OK carries a human-readable message as its result."""

    OK = 0
    INVALID = 1  # invalid argument; the connection goes on
    NO_POOL = 2  # unknown or destroyed pool handle
    PERMISSION = 3  # permission denied
    PROTOCOL = 4  # the peer broke the protocol; the daemon closes the connection after this
    VERSION = 5  # protocol version not supported (handshake only)
    LIMIT = 6  # a per-guest limit was reached (pools, ...)
    CONFLICT = 7  # the guest name is in use by another connection
    SHUTDOWN = 8  # the daemon is going away (notice, req_id 0)
    NOT_FOUND = 9  # admin: no such guest or grant


# Plain ints for the per-request paths: an IntEnum member is a class attribute lookup (about
# 200 ns on Python 3.11, a global 35 ns), and msgpack packs an int faster than an int subclass.
OK: Final = int(Status.OK)
SHUTDOWN: Final = int(Status.SHUTDOWN)
DOORBELL: Final = int(Op.DOORBELL)
PUT: Final = int(Op.PUT)


_STATUS_ERRORS: Final[dict[int, type[TmemError]]] = {
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
_ERROR_STATUS: Final[dict[type[TmemError], Status]] = {
    v: Status(k) for k, v in _STATUS_ERRORS.items()
}


def error_for_status(status: int, message: str) -> TmemError:
    """The exception a client raises for an error reply."""
    cls = _STATUS_ERRORS.get(status, ProtocolError)
    return cls(message)


def status_for_error(exc: TmemError) -> Status:
    """The status a daemon answers for an exception raised while serving a request."""
    # Walk the class hierarchy so a subclass of a known error keeps its parent's status.
    for cls in type(exc).__mro__:
        status = _ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return Status.PROTOCOL


# --------------------------------------------------------------------------------------------
# Field codecs


def encode_oid(oid: int) -> int | bytes:
    """An object id on the wire: a msgpack uint below 2**64, else 24 big-endian bytes."""
    if oid < 1 << 64:
        return oid
    return oid.to_bytes(OID_BYTES, "big")


def decode_oid(value: Any, what: str = "oid") -> int:
    """Validate and decode an object id (the inverse of ``encode_oid``)."""
    if type(value) is int:
        if value < 0 or value >= 1 << 64:
            raise InvalidArgument(f"{what} must be an unsigned integer, got {value}")
        return value
    if type(value) is bytes:
        if len(value) != OID_BYTES:
            raise InvalidArgument(
                f"{what} as bin must be exactly {OID_BYTES} bytes, got {len(value)}"
            )
        return int.from_bytes(value, "big")
    raise InvalidArgument(f"{what} must be an unsigned integer, got {type(value).__name__}")


def check_oid(oid: object) -> int:
    """Client-side check of an object id given by the user."""
    if isinstance(oid, bool) or not isinstance(oid, int):
        raise InvalidArgument(f"oid must be an int, got {type(oid).__name__}")
    if oid < 0 or oid >> OID_BITS:
        raise InvalidArgument(f"oid must be an unsigned {OID_BITS}-bit integer, got {oid}")
    return int(oid)


def check_uint(value: Any, bits: int, what: str) -> int:
    """Validate an unsigned integer of at most ``bits`` bits (bool is not an integer here)."""
    if type(value) is not int:
        raise InvalidArgument(f"{what} must be an unsigned integer, got {type(value).__name__}")
    if value < 0 or value >> bits:
        raise InvalidArgument(f"{what} must be an unsigned {bits}-bit integer, got {value}")
    return value


def check_ring_frames(value: Any) -> int:
    """HELLO's ``ring`` option: frames per ring, 0 or a power of two up to MAX_RING_FRAMES."""
    ring = check_uint(value, 32, "ring")
    if not valid_ring_frames(ring):
        raise InvalidArgument(
            f"ring must be 0 or a power of two up to {MAX_RING_FRAMES} frames, got {ring}"
        )
    return ring


def make_pool_flags(*, persistent: bool, shared: bool, order: int) -> int:
    """Pack NEW_POOL flags."""
    if not 0 <= order <= MAX_ORDER:
        raise InvalidArgument(f"page order must be 0..{MAX_ORDER}")
    flags = (PROTOCOL_VERSION << VERSION_SHIFT) | (order << ORDER_SHIFT)
    if persistent:
        flags |= FLAG_PERSISTENT
    if shared:
        flags |= FLAG_SHARED
    return flags


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What NEW_POOL asks for, decoded and validated."""

    persistent: bool
    shared: bool
    order: int
    uuid: bytes | None
    name: str | None = None  # a named private pool its guest can come back to (§6.1)

    @property
    def page_size(self) -> int:
        """Bytes per page in this pool."""
        return FRAME_SIZE << self.order

    @property
    def flags(self) -> int:
        """NEW_POOL's flags word for this spec."""
        return make_pool_flags(persistent=self.persistent, shared=self.shared, order=self.order)

    @classmethod
    def decode(cls, flags: Any, uuid: Any, name: Any = None) -> PoolSpec:
        """Validate NEW_POOL's arguments."""
        flags = check_uint(flags, 32, "pool flags")
        known = FLAG_PERSISTENT | FLAG_SHARED | (ORDER_MASK << ORDER_SHIFT)
        known |= VERSION_MASK << VERSION_SHIFT
        if flags & ~known:
            raise InvalidArgument(f"pool flags 0x{flags:08x} set unknown bits")
        version = (flags >> VERSION_SHIFT) & VERSION_MASK
        if version not in (0, PROTOCOL_VERSION):
            raise InvalidArgument(f"pool spec version {version} is not supported (want 1)")
        order = (flags >> ORDER_SHIFT) & ORDER_MASK
        if order > MAX_ORDER:
            raise InvalidArgument(
                f"page order {order} is too large: page size is 4096 << order, order 0..{MAX_ORDER}"
            )
        shared = bool(flags & FLAG_SHARED)
        if uuid is not None and (type(uuid) is not bytes or len(uuid) != UUID_BYTES):
            raise InvalidArgument(f"pool uuid must be nil or {UUID_BYTES} bytes")
        if shared and uuid is None:
            raise InvalidArgument("a shared pool needs a 16-byte uuid")
        if name is not None:
            if type(name) is not str or not valid_guest_name(name):
                raise InvalidArgument(
                    f"pool name must be nil or 1..{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -"
                )
            if shared:
                raise InvalidArgument("a shared pool is named by its uuid, not by a name")
        return cls(bool(flags & FLAG_PERSISTENT), shared, order, uuid if shared else None, name)


@dataclass(frozen=True, slots=True)
class Hello:
    """The handshake request: protocol version, the guest name asked for, region size in frames,
    and options: ``ring``, frames per request/reply ring, 0 for none (PROTOCOL.md §4.6); ``map``,
    true to read its pages through a mapping (§4.7); ``lend``, true to borrow memory (§4.8; needs
    ``map``)."""

    version: int
    name: str
    frames: int
    ring: int = 0
    map: bool = False
    lend: bool = False

    def encode(self) -> bytes:
        """The HELLO frame (req_id 1); the region fd travels with it as SCM_RIGHTS."""
        message: list[Any] = [Op.HELLO, 1, self.version, self.name, self.frames]
        options: dict[str, Any] = {}
        if self.ring:
            options["ring"] = self.ring
        if self.map:
            options["map"] = True
        if self.lend:
            options["lend"] = True
        if options:
            message.append(options)
        return encode_frame(message)

    @classmethod
    def decode(cls, message: Any) -> Hello:
        """Validate a decoded HELLO request; raise ProtocolError if it is not one."""
        if (
            type(message) is not list
            or len(message) not in (5, 6)
            or type(message[0]) is not int
            or message[0] != Op.HELLO
            or type(message[1]) is not int
            or message[1] != 1
        ):
            raise ProtocolError(
                "the first frame must be HELLO [30, 1, version, name, frames] or "
                "[30, 1, version, name, frames, options]"
            )
        _, _, version, name, frames, *rest = message
        version = check_uint(version, 32, "protocol version")
        if type(name) is not str or not valid_guest_name(name):
            raise InvalidArgument(
                f"guest name must be 1..{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -"
            )
        frames = check_uint(frames, 32, "region frames")
        ring = 0
        mapped = lend = False
        if rest:
            options = rest[0]
            if type(options) is not dict or len(options) > MAX_HELLO_OPTIONS:
                raise ProtocolError(
                    f"HELLO options must be a map of at most {MAX_HELLO_OPTIONS} entries"
                )
            # Unknown options are ignored (a newer guest may offer more); the reply says what
            # was granted.
            ring = check_ring_frames(options.get("ring", 0))
            # Checked as Any before they are bools: compiled (mypyc), assigning a guest's
            # non-bool to a bool variable would raise TypeError, not InvalidArgument.
            wanted: Any = options.get("map", False), options.get("lend", False)
            for option, value in zip(("map", "lend"), wanted, strict=True):
                if type(value) is not bool:
                    raise InvalidArgument(
                        f"{option} must be true or false, got {type(value).__name__}"
                    )
            mapped, lend = wanted
        return cls(version, name, frames, ring, mapped, lend)


_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def valid_guest_name(name: str) -> bool:
    """Guest names are short and plain so they are safe in logs, tables and config keys."""
    return 0 < len(name) <= MAX_NAME_LEN and all(c in _NAME_CHARS for c in name)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the daemon tells a guest in its HELLO reply."""

    version: int
    guest: str
    frames: int
    max_frame: int
    max_batch: int
    max_pools: int
    ring: int = 0  # frames per ring granted; 0: requests go over the socket only
    map: int = 0  # slots of the page mirror sent with the reply (§4.7); 0: none
    lend: int = 0  # slots of the loan file sent after the mirror (§4.8); 0: none

    def to_wire(self) -> dict[str, Any]:
        """The HELLO reply's result map (``map`` only when granted)."""
        wire = {
            "version": self.version,
            "guest": self.guest,
            "frames": self.frames,
            "max_frame": self.max_frame,
            "max_batch": self.max_batch,
            "max_pools": self.max_pools,
            "ring": self.ring,
        }
        if self.map:
            wire["map"] = self.map
        if self.lend:
            wire["lend"] = self.lend
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> Limits:
        """Decode and check a HELLO reply's result map."""
        if type(value) is not dict:
            raise ProtocolError("HELLO reply result must be a map")
        try:
            return cls(
                version=check_uint(value["version"], 32, "version"),
                guest=_str(value["guest"], "guest"),
                frames=check_uint(value["frames"], 32, "frames"),
                max_frame=check_uint(value["max_frame"], 32, "max_frame"),
                max_batch=check_uint(value["max_batch"], 32, "max_batch"),
                max_pools=check_uint(value["max_pools"], 32, "max_pools"),
                ring=check_uint(value.get("ring", 0), 32, "ring"),
                map=check_uint(value.get("map", 0), 32, "map"),
                lend=check_uint(value.get("lend", 0), 32, "lend"),
            )
        except (KeyError, InvalidArgument) as exc:
            raise ProtocolError(f"bad HELLO reply: {exc}") from exc


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise InvalidArgument(f"{what} must be a string")
    return value


def split_reply(message: Any) -> tuple[int, int, Any]:
    """Check a reply's shape and return (req_id, status, result)."""
    if type(message) is not list or len(message) != 3:
        raise ProtocolError("a reply must be an array [req_id, status, result]")
    req_id, status, result = message
    if type(req_id) is not int or type(status) is not int:
        raise ProtocolError("reply req_id and status must be integers")
    if status != OK and type(result) is not str:
        raise ProtocolError("an error reply must carry a message string")
    return req_id, status, result


def split_request(message: Any) -> tuple[int, int, list[Any]]:
    """Check a request's outer shape and return (op, req_id, the whole message).

    A request that is not an array starting with two unsigned integers is a ProtocolError: we
    could not even say which request a reply belongs to. Everything past that (unknown ops,
    argument types and ranges) is the handler's InvalidArgument, answered per request.
    """
    if type(message) is not list or len(message) < 2:
        raise ProtocolError("a request must be an array [op, req_id, *args]")
    op, req_id = message[0], message[1]
    if type(op) is not int or type(req_id) is not int or not 0 < req_id < 1 << 32 or op < 0:
        raise ProtocolError(
            "request op and req_id must be unsigned integers (req_id 1..2**32-1; 0 is for notices)"
        )
    return op, req_id, message


def encode_reply(req_id: int, status: int, result: Any) -> bytes:
    """One reply frame."""
    return encode_frame([req_id, status, result])
