"""Packed objects in arena slots, by size class, as Linux's zsmalloc does: pure, no I/O.

A *packed* page (docs/design.md §6.11: a same-filled page's word, a compressed page, or with
dedup a raw page to share) is an object of a few bytes to a few KiB. Giving each a 4 KiB slot
would waste what packing saved, so objects are kept in *zspages*: a zspage is 1..16 slots (not
necessarily adjacent) holding ``k`` objects of one *size class* laid end to end, an object
possibly straddling two slots. A class's size and slots per zspage are chosen so that little of
a zspage is left over, and classes that would pack the same number of objects into the same
number of slots are merged (the larger size serves both).

What the budget counts is slots: a zspage's slots are in use while it holds any object. An
object freed leaves a hole; holes cost memory that no page uses (*fragmentation*). So a class
is compacted as soon as its holes add up to a whole zspage: the objects of its emptiest zspage
move into the holes of the others and that zspage's slots are given back. Each class then
wastes less than one zspage, and freeing objects (evicting pages) always gives memory back.
Moving an object changes its handle; ``relocate(owner, handle)`` tells the store.

One ``ZPool`` serves one tmem pool, so a zspage holds the objects of one pool only: its slots
are billed to that pool's account, and freeing a pool frees whole zspages.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Final

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE, MAX_ORDER

OBJ_MIN: Final = 32  # bytes: the smallest class (zsmalloc's too): what a same-filled page costs
MAX_OBJECT: Final = FRAME_SIZE << MAX_ORDER  # the largest object (a raw page, with dedup)
_IDX_BITS: Final = 10  # a handle is (zspage number << _IDX_BITS) | object number
_IDX_MASK: Final = (1 << _IDX_BITS) - 1


def _shape(size: int) -> tuple[int, int]:
    """(slots per zspage, objects per zspage) for objects of ``size`` bytes: the fewest slots
    among those that waste the least."""
    least = -(-size // FRAME_SIZE)
    best: tuple[float, int, int] | None = None
    for n in range(least, least + 4):
        k = (n << FRAME_SHIFT) // size
        waste = ((n << FRAME_SHIFT) - k * size) / (n << FRAME_SHIFT)
        if best is None or waste < best[0] - 1e-9:
            best = (waste, n, k)
    assert best is not None
    return best[1], best[2]


def _classes() -> list[tuple[int, int, int]]:
    """(size, slots, objects) of every class, by size: 32-byte steps up to a slot, 512-byte
    steps above (only pages of order > 0 compress to more than a slot)."""
    sizes = [*range(OBJ_MIN, FRAME_SIZE + 1, 32), *range(FRAME_SIZE + 512, MAX_OBJECT + 1, 512)]
    classes: list[tuple[int, int, int]] = []
    for size in sizes:
        n, k = _shape(size)
        if classes and classes[-1][1:] == (n, k):
            classes[-1] = (size, n, k)  # same packing: the larger size serves both
        else:
            classes.append((size, n, k))
    return classes


CLASSES: Final = _classes()
_SIZES: Final = [c[0] for c in CLASSES]


def class_of(length: int) -> int:
    """The index in CLASSES of the class that holds objects of ``length`` bytes."""
    if not 0 < length <= MAX_OBJECT:
        raise ValueError(f"object of {length} bytes: packed objects are 1..{MAX_OBJECT} bytes")
    return bisect_left(_SIZES, length)


class ZsPage:
    """Some slots holding objects of one class; ``owners[i]`` is object i's owner, or -1."""

    __slots__ = ("cls", "free", "owners", "slots")

    def __init__(self, cls: int, slots: list[int]) -> None:
        self.cls = cls
        self.slots = slots
        k = CLASSES[cls][2]
        self.owners = [-1] * k
        self.free = list(range(k - 1, -1, -1))  # a stack: object 0 first

    @property
    def used(self) -> int:
        """Objects held."""
        return len(self.owners) - len(self.free)


class _Class:
    """One class's zspages that have room, and its holes in all."""

    __slots__ = ("holes", "open", "zspages")

    def __init__(self) -> None:
        self.open: dict[int, None] = {}  # zspage numbers with a free object, in insertion order
        self.holes = 0  # free objects in all of this class's zspages
        self.zspages = 0


class ZPool:
    """Objects of one tmem pool in zspages of arena slots (module docstring). The caller gives
    the slots (``grow``) and takes back those ``free`` returns; ``relocate(owner, handle)`` is
    called for each object compaction moves."""

    def __init__(self, mem: memoryview, relocate: Callable[[int, int], None]) -> None:
        self.mem = mem
        self.relocate = relocate
        self.zspages: list[ZsPage | None] = []
        self._spare: list[int] = []  # zspage numbers free for reuse
        self._classes: dict[int, _Class] = {}
        self.slots = 0  # slots in all zspages
        self.objects = 0
        self.stored = 0  # bytes of the objects themselves (what fragmentation is measured on)

    # ---------------------------------------------------------------------------- allocation

    def alloc(self, length: int, owner: int) -> int:
        """A handle for an object of ``length`` bytes owned by ``owner``, or -1 if its class
        has no room: then ``grow`` it with ``slots_needed(length)`` slots and ask again."""
        cls = class_of(length)
        state = self._classes.get(cls)
        if state is None or not state.open:
            return -1
        number = next(iter(state.open))
        zspage = self.zspages[number]
        assert zspage is not None
        obj = zspage.free.pop()
        if not zspage.free:
            del state.open[number]
        zspage.owners[obj] = owner
        state.holes -= 1
        self.objects += 1
        self.stored += length
        return number << _IDX_BITS | obj

    def has_room(self, length: int) -> bool:
        """Is there a hole for an object of ``length`` bytes?"""
        state = self._classes.get(class_of(length))
        return state is not None and bool(state.open)

    @staticmethod
    def slots_needed(length: int) -> int:
        """Slots of a zspage of the class of objects of ``length`` bytes."""
        return CLASSES[class_of(length)][1]

    def grow(self, length: int, slots: list[int]) -> None:
        """Add a zspage of ``slots`` (``slots_needed(length)`` of them) to the class of
        objects of ``length`` bytes."""
        cls = class_of(length)
        if len(slots) != CLASSES[cls][1]:
            raise ValueError(f"a zspage of class {cls} has {CLASSES[cls][1]} slots")
        zspage = ZsPage(cls, slots)
        number = self._spare.pop() if self._spare else len(self.zspages)
        if number == len(self.zspages):
            self.zspages.append(zspage)
        else:
            self.zspages[number] = zspage
        state = self._classes.setdefault(cls, _Class())
        state.open[number] = None
        state.holes += len(zspage.owners)
        state.zspages += 1
        self.slots += len(slots)

    def free(self, handle: int, length: int, *, owner: int = -1, compact: bool = True) -> list[int]:
        """Free an object of ``length`` bytes (``owner``'s: tmemd/dedup.py's objects have
        several); return the slots no longer used (of its zspage, or of one that compaction
        emptied). ``compact=False``: no objects move (the pool is dying: every object will be
        freed anyway)."""
        number, obj = handle >> _IDX_BITS, handle & _IDX_MASK
        zspage = self.zspages[number]
        assert zspage is not None and zspage.owners[obj] != -1
        zspage.owners[obj] = -1
        zspage.free.append(obj)
        self.objects -= 1
        self.stored -= length
        state = self._classes[zspage.cls]
        state.holes += 1
        state.open[number] = None
        if len(zspage.free) == len(zspage.owners):
            return self._drop(number)
        if compact and state.holes >= len(zspage.owners):
            return self._compact(state)
        return []

    def _drop(self, number: int) -> list[int]:
        zspage = self.zspages[number]
        assert zspage is not None
        state = self._classes[zspage.cls]
        del state.open[number]
        state.holes -= len(zspage.owners)
        state.zspages -= 1
        if not state.zspages:
            del self._classes[zspage.cls]
        self.zspages[number] = None
        self._spare.append(number)
        self.slots -= len(zspage.slots)
        return zspage.slots

    def _compact(self, state: _Class) -> list[int]:
        """Empty the class's emptiest zspage into the others' holes and give back its slots.
        The holes add up to a whole zspage, so the others have room for all it holds; fewer
        than a zspage of holes (at most k open zspages) are scanned."""
        zspages = self.zspages
        source = min(state.open, key=lambda n: zspages[n].used)  # type: ignore[union-attr]
        src = zspages[source]
        assert src is not None
        size = CLASSES[src.cls][0]
        for obj, owner in enumerate(src.owners):
            if owner == -1:
                continue
            target = next(n for n in state.open if n != source)
            dst = zspages[target]
            assert dst is not None
            new = dst.free.pop()
            if not dst.free:
                del state.open[target]
            dst.owners[new] = owner
            self._copy(src, obj, dst, new, size)
            src.owners[obj] = -1
            src.free.append(obj)
            self._moved(source << _IDX_BITS | obj, target << _IDX_BITS | new, owner)
        return self._drop(source)

    def _moved(self, old: int, new: int, owner: int) -> None:
        """Compaction moved ``owner``'s object from handle ``old`` to ``new``."""
        self.relocate(owner, new)

    # --------------------------------------------------------------------------------- bytes

    def _spans(self, zspage: ZsPage, obj: int, length: int) -> list[tuple[int, int]]:
        """(arena offset, length) of the pieces of object ``obj``'s first ``length`` bytes."""
        pos = obj * CLASSES[zspage.cls][0]
        spans = []
        end = pos + length
        while pos < end:
            slot = zspage.slots[pos >> FRAME_SHIFT]
            in_slot = pos & (FRAME_SIZE - 1)
            n = min(FRAME_SIZE - in_slot, end - pos)
            spans.append(((slot << FRAME_SHIFT) + in_slot, n))
            pos += n
        return spans

    def write(self, handle: int, data: bytes | memoryview) -> None:
        """Store ``data`` as the object ``handle`` (as long as its class allows)."""
        zspage = self.zspages[handle >> _IDX_BITS]
        assert zspage is not None
        mem, pos = self.mem, 0
        start = (handle & _IDX_MASK) * CLASSES[zspage.cls][0]
        if (start & (FRAME_SIZE - 1)) + len(data) <= FRAME_SIZE:  # in one slot: most objects
            off = (zspage.slots[start >> FRAME_SHIFT] << FRAME_SHIFT) + (start & (FRAME_SIZE - 1))
            mem[off : off + len(data)] = data
            return
        for off, n in self._spans(zspage, handle & _IDX_MASK, len(data)):
            mem[off : off + n] = data[pos : pos + n]
            pos += n

    def read(self, handle: int, length: int) -> bytes | memoryview:
        """The object's first ``length`` bytes (a view of the arena when in one slot)."""
        zspage = self.zspages[handle >> _IDX_BITS]
        assert zspage is not None
        mem = self.mem
        start = (handle & _IDX_MASK) * CLASSES[zspage.cls][0]
        if (start & (FRAME_SIZE - 1)) + length <= FRAME_SIZE:  # in one slot: most objects
            off = (zspage.slots[start >> FRAME_SHIFT] << FRAME_SHIFT) + (start & (FRAME_SIZE - 1))
            return mem[off : off + length]
        spans = self._spans(zspage, handle & _IDX_MASK, length)
        if len(spans) == 1:
            off, n = spans[0]
            return mem[off : off + n]
        return b"".join(mem[off : off + n] for off, n in spans)

    def _copy(self, src: ZsPage, obj: int, dst: ZsPage, new: int, size: int) -> None:
        data = bytes(b"".join(self.mem[o : o + n] for o, n in self._spans(src, obj, size)))
        mem, pos = self.mem, 0
        for off, n in self._spans(dst, new, size):
            mem[off : off + n] = data[pos : pos + n]
            pos += n

    def replace(self, handle: int, length: int, data: bytes) -> bool:
        """Store ``data`` in place of the object ``handle`` of ``length`` bytes if it is of the
        same class (True), else change nothing (False)."""
        zspage = self.zspages[handle >> _IDX_BITS]
        assert zspage is not None
        if class_of(len(data)) != zspage.cls:
            return False
        self.write(handle, data)
        self.stored += len(data) - length
        return True

    def class_size(self, handle: int) -> int:
        """Bytes of the class of the object ``handle``."""
        zspage = self.zspages[handle >> _IDX_BITS]
        assert zspage is not None
        return CLASSES[zspage.cls][0]
