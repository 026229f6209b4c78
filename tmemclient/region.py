"""The guest's shared region: a sealed memfd the daemon maps, and a frame allocator over it."""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
from collections.abc import Callable

from tmemclient.wire.errors import InvalidArgument
from tmemclient.wire.layout import FRAME_SIZE

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_region(frames: int, extra: int = 0) -> tuple[int, mmap.mmap]:
    """A memfd of ``frames`` frames (and ``extra`` bytes after them, for the rings), sealed
    against resizing, and our shared mapping of it.

    MFD_ALLOW_SEALING is required: without it the memfd is born with F_SEAL_SEAL and can never
    get the seals the daemon insists on.
    """
    if frames < 1:
        raise InvalidArgument("a region needs at least one frame")
    fd = os.memfd_create("tmem-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, frames * FRAME_SIZE + extra)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        region = mmap.mmap(fd, frames * FRAME_SIZE + extra, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
    return fd, region


class FrameAllocator:
    """First-fit allocator of contiguous frame runs. Pure; O(free runs) per call.

    The client's copying helpers stage page data in frames taken from here, so frames a user
    reserves for put_frame/get_frame are never overwritten behind their back.
    """

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self._starts: list[int] = [0]  # sorted starts of free runs
        self._lengths: dict[int, int] = {0: frames}

    @property
    def free(self) -> int:
        """Free frames in all."""
        return sum(self._lengths.values())

    def largest(self) -> int:
        """The longest free run."""
        return max(self._lengths.values(), default=0)

    def alloc(self, count: int) -> int | None:
        """Start of a free run of ``count`` frames, now taken; None if no run is long enough."""
        if count < 1:
            raise InvalidArgument("allocate at least one frame")
        for i, start in enumerate(self._starts):
            length = self._lengths[start]
            if length >= count:
                del self._lengths[start]
                if length == count:
                    del self._starts[i]
                else:
                    self._starts[i] = start + count
                    self._lengths[start + count] = length - count
                return start
        return None

    def release(self, start: int, count: int) -> None:
        """Give back a run taken with ``alloc`` (merging with free neighbours)."""
        if start < 0 or count < 1 or start + count > self.frames:
            raise InvalidArgument(f"frames {start}..{start + count} are outside the region")
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] < start + count:
            raise InvalidArgument(f"frames {start}..{start + count} are already free")
        if i and self._starts[i - 1] + self._lengths[self._starts[i - 1]] > start:
            raise InvalidArgument(f"frames {start}..{start + count} are already free")
        # merge with the following run
        if i < len(self._starts) and self._starts[i] == start + count:
            count += self._lengths.pop(self._starts[i])
            del self._starts[i]
        # merge with the preceding run
        if i and self._starts[i - 1] + self._lengths[self._starts[i - 1]] == start:
            self._lengths[self._starts[i - 1]] += count
            return
        self._starts.insert(i, start)
        self._lengths[start] = count


class FrameRun:
    """Frames of the region reserved for the caller's own use with put_frame/get_frame.

    The copying helpers never stage data in reserved frames. Release with ``release()`` or use
    it as a context manager.
    """

    def __init__(
        self,
        allocator: FrameAllocator,
        region: memoryview,
        start: int,
        count: int,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self._allocator = allocator
        self._on_release = on_release
        self.start = start
        self.count = count
        self.view = region[start * FRAME_SIZE : (start + count) * FRAME_SIZE]

    def frame(self, i: int) -> memoryview:
        """The bytes of the i-th reserved frame."""
        if not 0 <= i < self.count:
            raise IndexError(f"frame {i} is outside this run of {self.count}")
        return self.view[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]

    def release(self) -> None:
        """Give the frames back to the staging pool."""
        if self.count:
            self.view.release()
            self._allocator.release(self.start, self.count)
            self.count = 0
            if self._on_release is not None:
                self._on_release()

    def __enter__(self) -> FrameRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
