"""What a page packs to (docs/design.md §6.10): pure, no I/O.

A *same-filled* page (one 8-byte word repeated: all zeros, a poisoned or a pattern-filled page)
is kept as that word, whatever compression is set to; Linux's zswap and zram do the same. Other
pages are compressed when the daemon is told to (``--compress lz4|zstd``), and kept only if
they shrink to at most ``KEEP`` of their size: a page that compresses worse is stored raw, since
the saving would not pay for the decompression (nor for the packing's own waste).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

WORD: Final = 8
KEEP: Final = 0.75  # a compressed page is kept if at most this fraction of its size


def fill_word(page: memoryview | bytes) -> bytes | None:
    """The word a same-filled page repeats, or None."""
    head = bytes(page[: 2 * WORD])
    if head[:WORD] != head[WORD:]:  # most pages differ here: a cheap answer
        return None
    data = bytes(page)
    return head[:WORD] if data[WORD:] == data[:-WORD] else None


@dataclass(frozen=True)
class Codec:
    """A compressor: ``compress(page) -> bytes``; ``decompress(data, size) -> bytes`` of
    exactly ``size`` bytes (or an exception: the store's own bytes never fail)."""

    name: str
    compress: Callable[[memoryview | bytes], bytes]
    decompress: Callable[[memoryview | bytes, int], bytes]


def pack(page: memoryview, codec: Codec | None) -> tuple[bytes, int] | None:
    """(object bytes, length code) the page packs to, or None to store it raw. The length code
    is 0 for a same-filled page (the object is its word), else the compressed length."""
    word = fill_word(page)
    if word is not None:
        return word, 0
    if codec is None:
        return None
    data = codec.compress(page)
    if len(data) > len(page) * KEEP:
        return None
    return data, len(data)


def unpack(data: memoryview | bytes, code: int, dst: memoryview, codec: Codec | None) -> None:
    """Write the page an object holds into ``dst`` (the page's size)."""
    if code == 0:
        dst[:] = bytes(data[:WORD]) * (len(dst) // WORD)
        return
    assert codec is not None, "a compressed page needs the codec it was stored with"
    out = codec.decompress(data, len(dst))
    if len(out) != len(dst):  # pragma: no cover - our own bytes, in our own arena
        raise ValueError(f"a packed page came back as {len(out)} bytes, not {len(dst)}")
    dst[:] = out
