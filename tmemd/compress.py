"""What a page packs to (docs/design.md §6.11): pure, no I/O.

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

import lz4.block
import zstandard

WORD: Final = 8
KEEP: Final = 0.75  # a compressed page is kept if at most this fraction of its size
COMPRESSORS: Final = ("off", "lz4", "zstd")
ZSTD_LEVEL: Final = 1  # zstd's fastest level: ~3x on source pages, twice lz4's put cost


def fill_word(page: memoryview | bytes) -> bytes | None:
    """The word a same-filled page repeats, or None."""
    head = bytes(page[: 2 * WORD])
    if head[:WORD] != head[WORD:]:  # most pages differ here: a cheap answer
        return None
    data = bytes(page)
    return data[:WORD] if data[WORD:] == data[:-WORD] else None


@dataclass(frozen=True)
class Codec:
    """A compressor: ``compress(page) -> bytes``; ``decompress(data, size) -> bytes`` of
    exactly ``size`` bytes (or an exception: the store's own bytes never fail)."""

    name: str
    compress: Callable[[memoryview | bytes], bytes]
    decompress: Callable[[memoryview | bytes, int], bytes]


def _lz4() -> Codec:
    # The block format: no frame header, no checksum, no stored size (the page size is known).
    def compress(page: memoryview | bytes) -> bytes:
        data: bytes = lz4.block.compress(page, store_size=False)
        return data

    def decompress(data: memoryview | bytes, size: int) -> bytes:
        page: bytes = lz4.block.decompress(data, uncompressed_size=size)
        return page

    return Codec("lz4", compress, decompress)


def _zstd() -> Codec:
    # One compressor and one decompressor for the store's life (they hold their tables); no
    # content size or checksum in the frame: the page size is known and the arena is ours.
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=False)
    zd = zstandard.ZstdDecompressor()

    def compress(page: memoryview | bytes) -> bytes:
        return zc.compress(page)

    def decompress(data: memoryview | bytes, size: int) -> bytes:
        return zd.decompress(data, max_output_size=size)

    return Codec("zstd", compress, decompress)


def codec(name: str) -> Codec | None:
    """The codec called ``name`` (one of COMPRESSORS); None for "off"."""
    if name == "off":
        return None
    if name == "lz4":
        return _lz4()
    if name == "zstd":
        return _zstd()
    raise ValueError(f"compress must be one of {', '.join(COMPRESSORS)}, got {name!r}")


def pack(page: memoryview, codec: Codec | None) -> tuple[bytes, int] | None:
    """(object bytes, length code) the page packs to, or None to store it raw. The length code
    is 0 for a same-filled page (the object is its word), else the compressed length."""
    head = bytes(page[: 2 * WORD])
    maybe_filled = head[:WORD] == head[WORD:]  # most pages differ here: a cheap answer
    if codec is None and not maybe_filled:
        return None
    # One copy, then everything is decided on it: the page is in the guest's region, which the
    # guest may change meanwhile, and what is stored must decompress to what was decided on.
    data = bytes(page)
    if maybe_filled and data[WORD:] == data[:-WORD]:
        return data[:WORD], 0
    if codec is None:
        return None
    packed = codec.compress(data)
    if len(packed) > len(data) * KEEP:
        return None
    return packed, len(packed)


def unpack(data: memoryview | bytes, code: int, dst: memoryview, codec: Codec | None) -> None:
    """Write the page an object holds into ``dst`` (the page's size). A length code of the
    page's size is a raw page (kept as an object to be shared, tmemd/dedup.py)."""
    if code == len(dst):
        dst[:] = data[:code]
        return
    if code == 0:
        dst[:] = bytes(data[:WORD]) * (len(dst) // WORD)
        return
    assert codec is not None, "a compressed page needs the codec it was stored with"
    out = codec.decompress(data, len(dst))
    if len(out) != len(dst):  # pragma: no cover - our own bytes, in our own arena
        raise ValueError(f"a packed page came back as {len(out)} bytes, not {len(dst)}")
    dst[:] = out
