"""Layout facts both sides must agree on: sizes, and where things are in shared memory.

Frames of a guest's region, slots of the daemon's arena, mirrors and loan files are all
``FRAME_SIZE`` (4 KiB) units; a page of order k spans 2**k of them. The rings (PROTOCOL.md §4.6)
follow a region's page frames; a mirror (§4.7) holds page slots, then a generation and a link
word per slot, then a control page (§4.8); a loan file holds a header page, then lent slots.
Pure arithmetic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

FRAME_SHIFT: Final = 12
FRAME_SIZE: Final = 1 << FRAME_SHIFT  # bytes of a region frame, an arena slot, a mirror slot
MAX_ORDER: Final = 4  # page sizes 4 KiB .. 64 KiB: a page of order k spans 2**k frames
MAX_RING_FRAMES: Final = 256  # frames per request/reply ring (1 MiB each way)

# Ring header words (u64, native byte order, each on its own 64-byte cache line), by index.
SQ_TAIL: Final = 0  # guest: request bytes written
SQ_HEAD: Final = 8  # daemon: request bytes consumed
CQ_TAIL: Final = 16  # daemon: reply bytes written
CQ_HEAD: Final = 24  # guest: reply bytes consumed
HOST_IDLE: Final = 32  # daemon: 1 while it sleeps on the socket (a request needs a doorbell)
GUEST_WAITING: Final = 40  # guest: 1 while it sleeps on the socket (a reply needs a doorbell)
HOST_CROWDED: Final = 48  # daemon: 1 while it serves other guests' rings too (do not spin)

CTL_WORDS: Final = 3  # a mirror's control words for lent memory: seq, lent slots, low slots


def valid_ring_frames(value: int) -> bool:
    """0 (no rings) or a power of two up to MAX_RING_FRAMES."""
    return value == 0 or (0 < value <= MAX_RING_FRAMES and value & (value - 1) == 0)


def ring_bytes(ring_frames: int) -> int:
    """Bytes of region the rings take after the page frames (header + both rings)."""
    return (1 + 2 * ring_frames) * FRAME_SIZE if ring_frames else 0


@dataclass(frozen=True)
class MirrorLayout:
    """Where things are in a mirror of ``slots`` slots (PROTOCOL.md §4.7): page data, then a u64
    generation word per slot, a u32 link per slot, then the control page at ``ctl_offset``."""

    slots: int

    @property
    def gen_offset(self) -> int:
        """Byte offset of GEN[0] (the end of the page data)."""
        return self.slots * FRAME_SIZE

    @property
    def link_offset(self) -> int:
        """Byte offset of LINK[0]."""
        return self.gen_offset + 8 * self.slots

    @property
    def ctl_offset(self) -> int:
        """Byte offset of the control page: after the links, rounded up to a frame."""
        return -(-(self.link_offset + 4 * self.slots) // FRAME_SIZE) * FRAME_SIZE

    @property
    def size(self) -> int:
        """Bytes of the whole file."""
        return self.ctl_offset + FRAME_SIZE


def loan_size(slots: int) -> int:
    """Bytes of a loan file of ``slots`` lent slots: a header page (ACTIVE), then the slots."""
    return (slots + 1) * FRAME_SIZE
