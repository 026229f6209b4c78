"""Request rings in the shared region: the socket's frames, without the socket (PROTOCOL.md §4.6).

A guest that asks for rings in HELLO gets, after its page frames, one header frame and two byte
rings of ``ring`` frames each: requests (guest to daemon) and replies (daemon to guest). They carry
exactly the frames the socket would (4-byte length + msgpack), so both ends reuse their codecs.
While both sides are busy, a request and its reply cross no syscall at all; a side that sleeps
says so in the header, and the other rings its doorbell on the socket (the virtio trick).

Each ring is single-producer single-consumer with free-running 64-bit byte counters: the producer
writes the bytes and then publishes its counter; the consumer reads the counter and then the bytes.
On x86-64 (total store order) that is enough for the data; the one reordering TSO allows, a load
passing an earlier store, is what the sleep/doorbell handshake must not suffer (each side stores
"I sleep" or "more data" and then loads the other's word: Dekker's pattern), so those two places
call ``fence()``, a locked instruction. Rings are offered only on x86-64 for that reason.

Everything the peer wrote is untrusted: counters are checked against the ring size and bytes are
copied out before they are decoded, so a guest rewriting its ring under the daemon can only
garble its own requests.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import Any, Final

from tmemclient.wire.errors import ProtocolError
from tmemclient.wire.layout import (
    CQ_HEAD,
    CQ_TAIL,
    FRAME_SIZE,
    GUEST_WAITING,
    HOST_CROWDED,
    HOST_IDLE,
    MAX_RING_FRAMES,
    SQ_HEAD,
    SQ_TAIL,
    ring_bytes,
    valid_ring_frames,
)

DEFAULT_RING_FRAMES: Final = 16  # 64 KiB each way


def supported() -> bool:
    """Rings need total store order (x86-64) and a libc with a locked-instruction spinlock."""
    return (
        sys.platform == "linux"
        and platform.machine() in ("x86_64", "AMD64")
        and sys.byteorder == "little"
        and _FENCE is not None
    )


def _make_fence() -> tuple[Any, int, ctypes.c_int] | None:
    try:
        trylock = ctypes.CDLL(None).pthread_spin_trylock
    except (OSError, AttributeError):
        return None
    trylock.argtypes = [ctypes.c_void_p]
    trylock.restype = ctypes.c_int
    lock = ctypes.c_int(1)  # held: every call fails, and every call is a locked xchg/cmpxchg
    return trylock, ctypes.addressof(lock), lock


_FENCE = _make_fence()


def fence() -> None:
    """A full memory barrier: glibc's and musl's pthread_spin_trylock on x86-64 are one locked
    instruction whether or not they take the lock."""
    if _FENCE is not None:
        _FENCE[0](_FENCE[1])


class Rings:
    """One side's view of a connection's rings. ``side`` is "guest" or "host".

    The producer's counter and the consumer's counter each side owns are kept here and only
    published to the shared header, never read back from it.
    """

    def __init__(self, area: memoryview, ring_frames: int, side: str) -> None:
        if side not in ("guest", "host"):
            raise ValueError("side must be 'guest' or 'host'")
        if not valid_ring_frames(ring_frames) or not ring_frames:
            raise ValueError(f"ring frames must be a power of two 1..{MAX_RING_FRAMES}")
        if len(area) != ring_bytes(ring_frames):
            raise ValueError("ring area has the wrong size")
        self.size = ring_frames * FRAME_SIZE
        self._mask = self.size - 1
        self._area = area
        self.words = area[:FRAME_SIZE].cast("Q")
        sq = area[FRAME_SIZE : FRAME_SIZE + self.size]
        cq = area[FRAME_SIZE + self.size :]
        guest = side == "guest"
        # What this side writes and what it reads.
        self._out, self._in = (sq, cq) if guest else (cq, sq)
        self._out_tail, self._out_head = (SQ_TAIL, SQ_HEAD) if guest else (CQ_TAIL, CQ_HEAD)
        self._in_tail, self._in_head = (CQ_TAIL, CQ_HEAD) if guest else (SQ_TAIL, SQ_HEAD)
        self._sleep_word, self._peer_sleep_word = (
            (GUEST_WAITING, HOST_IDLE) if guest else (HOST_IDLE, GUEST_WAITING)
        )
        self.written = 0  # our producer counter
        self.read = 0  # our consumer counter
        if not guest:
            for word in (
                SQ_TAIL,
                SQ_HEAD,
                CQ_TAIL,
                CQ_HEAD,
                HOST_IDLE,
                GUEST_WAITING,
                HOST_CROWDED,
            ):
                self.words[word] = 0

    def release(self) -> None:
        """Drop the views of the shared area (before the region is unmapped)."""
        self.words.release()
        self._out.release()
        self._in.release()
        self._area.release()

    # ------------------------------------------------------------------ producing

    def free(self) -> int:
        """Bytes that can be written now."""
        used = self.written - self.words[self._out_head]
        if not 0 <= used <= self.size:
            raise ProtocolError(f"ring consumer counter is corrupt ({used} bytes in use)")
        return self.size - used

    def write(self, data: bytes) -> bool:
        """Append ``data`` whole and publish it; False (nothing written) if it does not fit."""
        n = len(data)
        if n > self.free():
            return False
        pos = self.written & self._mask
        first = min(n, self.size - pos)
        out = self._out
        out[pos : pos + first] = data[:first] if first < n else data
        if first < n:
            out[: n - first] = data[first:]
        self.written += n
        self.words[self._out_tail] = self.written
        return True

    # ------------------------------------------------------------------ consuming

    def pending(self) -> bool:
        """Has the peer published bytes we have not taken?"""
        return self.words[self._in_tail] != self.read

    def take(self, limit: int | None = None) -> bytes:
        """The bytes the peer has published (at most ``limit`` of them), copied out; the space
        is given back at once."""
        tail = self.words[self._in_tail]
        n = tail - self.read
        if not n:
            return b""
        if not 0 < n <= self.size:
            raise ProtocolError(f"ring producer counter is corrupt ({n} bytes claimed)")
        if limit is not None and n > limit:
            n = limit
            tail = self.read + n
        pos = self.read & self._mask
        first = min(n, self.size - pos)
        data = bytes(self._in[pos : pos + first])
        if first < n:
            data += bytes(self._in[: n - first])
        self.read = tail
        self.words[self._in_head] = tail
        return data

    # ------------------------------------------------------------------ sleeping

    def sleeping(self, flag: bool) -> None:
        """Say whether this side is about to sleep on the socket (or has woken)."""
        self.words[self._sleep_word] = int(flag)

    def peer_sleeping(self) -> bool:
        """Does the other side sleep on the socket (so it needs a doorbell)?"""
        return self.words[self._peer_sleep_word] != 0

    def crowded(self, flag: bool) -> None:
        """(The daemon) say whether it is serving other guests' rings too."""
        self.words[HOST_CROWDED] = int(flag)

    def host_crowded(self) -> bool:
        """(The guest) is the daemon serving other guests too? Then a reply takes a round of
        theirs, and watching for it would only take a CPU from them and from the daemon: sleep
        and let the doorbell wake us. Advice only: a wrong value costs time, never a reply."""
        return self.words[HOST_CROWDED] != 0
