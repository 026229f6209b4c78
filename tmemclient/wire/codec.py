"""Framing, the first layer of the wire protocol (PROTOCOL.md §2-3): length-prefixed msgpack.

A frame is a 4-byte big-endian length N followed by N bytes holding exactly one msgpack object.
Nothing here touches a socket, a clock or trio: bytes go in, decoded objects come out, and
objects go in, bytes come out (the h11 shape). What those objects mean is messages.py.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any, Final

import msgpack

from tmemclient.wire.errors import ProtocolError

HEADER: Final = struct.Struct(">I")


_local = threading.local()


def encode_frame(message: Any) -> bytes:
    """One length-prefixed msgpack frame."""
    # msgpack.packb builds a Packer per call (3.5x the cost of packing a small request); keep
    # one per thread instead.
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    body: bytes = packer.pack(message)
    return HEADER.pack(len(body)) + body


NEED_DATA: Final[Any] = type("NeedData", (), {"__repr__": lambda self: "NEED_DATA"})()


class FrameDecoder:
    """Splits a byte stream into decoded msgpack messages, bounding everything the peer controls.

    ``feed`` takes raw bytes; ``next_message`` returns one complete message or ``NEED_DATA``.
    A frame longer than ``max_frame`` raises ProtocolError as soon as its header arrives, before
    its body is buffered, so a peer cannot make us hold more than ``max_frame`` plus one read.
    After a ProtocolError the decoder stays broken (the connection must be closed).
    """

    def __init__(self, max_frame: int) -> None:
        if max_frame < 16:
            raise ValueError("max_frame must be at least 16 bytes")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # consumed bytes at the front of _buf, dropped lazily
        self._broken = False

    def has_message(self) -> bool:
        """Will ``next_message`` give a message, or an error, rather than NEED_DATA? (A frame
        header outside 1..max_frame counts: it is an error as soon as it is seen.)"""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return False
        length: int = HEADER.unpack_from(buf, pos)[0]
        return not 0 < length <= self.max_frame or len(buf) >= pos + 4 + length

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> Any:
        """The next complete message, or NEED_DATA; ProtocolError on a malformed frame."""
        if self._broken:
            raise ProtocolError("connection is in an error state")
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return NEED_DATA
        (length,) = HEADER.unpack_from(buf, pos)
        if length == 0 or length > self.max_frame:
            self._broken = True
            raise ProtocolError(
                f"frame of {length} bytes is outside 1..{self.max_frame} (max_frame)"
            )
        end = pos + 4 + length
        if len(buf) < end:
            return NEED_DATA
        body = bytes(buf[pos + 4 : end])
        if end == len(buf):  # all consumed: drop it now, not at the next feed
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        try:
            return decode_body(body)
        except ProtocolError:
            self._broken = True
            raise

    def rest(self) -> bytes:
        """The bytes received and not yet consumed (taken: the decoder is empty afterwards), to
        hand to another decoder, as a client does with what came after the HELLO reply."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def messages(self) -> Iterator[Any]:
        """Every complete message buffered so far."""
        while (message := self.next_message()) is not NEED_DATA:
            yield message


def decode_body(body: bytes) -> Any:
    """Decode one frame body; any malformation is a ProtocolError.

    ``unpackb`` bounds every declared length by the body's own length, refuses non-string map
    keys (strict_map_key) and raises on nesting deeper than its fixed stack.
    """
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData as exc:
        raise ProtocolError("frame holds more than one msgpack object") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers FormatError, StackError, OutOfData and bad UTF-8.
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    except RecursionError as exc:  # pragma: no cover - unpackb's own stack stops this first
        raise ProtocolError("frame nests too deeply") from exc
