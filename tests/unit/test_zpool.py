"""Unit tests of what a page packs to (tmemd/compress.py) and of the size-class allocator packed
pages live in (tmemd/zpool.py, and tmemd/dedup.py's shared objects): pure, no store, no socket."""

from __future__ import annotations

import random

import pytest

from tmemclient.wire.layout import FRAME_SIZE, MAX_ORDER
from tmemd.compress import fill_word, pack, unpack
from tmemd.dedup import DedupZPool
from tmemd.zpool import CLASSES, MAX_OBJECT, OBJ_MIN, ZPool, class_of


def filled(word: int, order: int = 0) -> bytes:
    """A page of one repeated 8-byte word."""
    return word.to_bytes(8, "little") * ((FRAME_SIZE << order) // 8)


# ------------------------------------------------------------------------- what packs, and how


@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
@pytest.mark.parametrize("word", [0, 1, 0xFFFF_FFFF_FFFF_FFFF, 0x0102_0304_0506_0708])
def test_a_same_filled_page_packs_to_its_word_and_back(order: int, word: int) -> None:
    data = filled(word, order)
    packed = pack(memoryview(data), None)
    assert packed == (word.to_bytes(8, "little"), 0)
    dst = bytearray(len(data))
    unpack(packed[0], packed[1], memoryview(dst), None)
    assert dst == data


@pytest.mark.parametrize(
    "data",
    [
        filled(7)[:-1] + b"\x08",  # the last byte differs
        b"\x01" + filled(0)[1:],  # the first byte differs
        (b"\x00" * 4 + b"\x01" * 4) * 511 + b"\x00" * 8,  # a 4-byte period broken at the end
        b"ab" * (FRAME_SIZE // 2 - 8) + b"abcdefghabcdefgh",
    ],
)
def test_a_page_that_is_almost_same_filled_is_not(data: bytes) -> None:
    assert len(data) == FRAME_SIZE
    assert fill_word(data) is None
    assert pack(memoryview(data), None) is None


# ---------------------------------------------------------------------------------- the zpool


def test_classes_grow_and_hold_what_they_say() -> None:
    sizes = [size for size, _, _ in CLASSES]
    assert sizes == sorted(sizes) and sizes[0] == OBJ_MIN and sizes[-1] == MAX_OBJECT
    for size, slots, objects in CLASSES:
        assert 1 <= slots <= 16 and objects >= 1
        assert objects * size <= slots * FRAME_SIZE
    for length in (1, OBJ_MIN, OBJ_MIN + 1, 1000, FRAME_SIZE, FRAME_SIZE + 1, MAX_OBJECT):
        size = CLASSES[class_of(length)][0]
        assert size >= length
        smaller = class_of(length) - 1
        assert smaller < 0 or CLASSES[smaller][0] < length


@pytest.mark.parametrize("length", [0, MAX_OBJECT + 1])
def test_an_object_outside_the_classes_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="packed objects are"):
        class_of(length)


class Arena:
    """Slots for a ZPool to live in, handed out in order, and the objects' owners' handles."""

    def __init__(self, slots: int) -> None:
        self.mem = memoryview(bytearray(slots * FRAME_SIZE))
        self.free = list(range(slots - 1, -1, -1))
        self.handles: dict[int, int] = {}
        self.zpool = ZPool(self.mem, self.relocate)

    def relocate(self, owner: int, handle: int) -> None:
        self.handles[owner] = handle

    def store(self, owner: int, data: bytes) -> None:
        handle = self.zpool.alloc(len(data), owner)
        if handle < 0:
            need = self.zpool.slots_needed(len(data))
            self.zpool.grow(len(data), [self.free.pop() for _ in range(need)])
            handle = self.zpool.alloc(len(data), owner)
        self.zpool.write(handle, data)
        self.handles[owner] = handle

    def drop(self, owner: int, length: int) -> None:
        self.free.extend(self.zpool.free(self.handles.pop(owner), length))


@pytest.mark.parametrize("length", [8, 100, 1365, 3000, 5000, 20_000])
def test_zpool_objects_come_back_byte_for_byte_across_slot_boundaries(length: int) -> None:
    arena = Arena(64)
    objects = {owner: random.Random(owner).randbytes(length) for owner in range(10)}
    for owner, data in objects.items():
        arena.store(owner, data)
    for owner, data in objects.items():
        assert bytes(arena.zpool.read(arena.handles[owner], length)) == data
    assert arena.zpool.stored == 10 * length and arena.zpool.objects == 10


def test_zpool_compacts_a_class_once_its_holes_make_a_zspage() -> None:
    arena = Arena(8)
    _, slots, per = CLASSES[class_of(1000)]
    assert slots == 1 and per == 4  # 4 objects of <= 1024 bytes a slot
    data = {owner: random.Random(owner).randbytes(1000) for owner in range(8)}
    for owner, d in data.items():
        arena.store(owner, d)
    assert arena.zpool.slots == 2
    # One object out of each zspage: 2 holes, not yet a zspage's worth.
    arena.drop(0, 1000)
    arena.drop(4, 1000)
    assert arena.zpool.slots == 2
    # Two more: 4 holes, one zspage is emptied into the other's holes and given back.
    arena.drop(1, 1000)
    arena.drop(5, 1000)
    assert arena.zpool.slots == 1 and len(arena.free) == 7
    for owner in (2, 3, 6, 7):
        assert bytes(arena.zpool.read(arena.handles[owner], 1000)) == data[owner]


def test_zpool_gives_back_every_slot_when_emptied_in_any_order() -> None:
    arena = Arena(1024)
    rng = random.Random(5)
    lengths = {owner: rng.randrange(1, 6000) for owner in range(300)}
    for owner, length in lengths.items():
        arena.store(owner, rng.randbytes(length))
    owners = list(lengths)
    rng.shuffle(owners)
    for owner in owners:
        arena.drop(owner, lengths[owner])
    assert arena.zpool.slots == 0 and arena.zpool.objects == 0 and arena.zpool.stored == 0
    assert sorted(arena.free) == list(range(1024))


def test_zpool_waste_stays_below_one_zspage_a_class() -> None:
    arena = Arena(512)
    rng = random.Random(9)
    lengths: dict[int, int] = {}
    for owner in range(2000):
        if lengths and rng.random() < 0.45:
            victim = rng.choice(list(lengths))
            arena.drop(victim, lengths.pop(victim))
        else:
            lengths[owner] = rng.randrange(1, 3000)
            arena.store(owner, bytes(lengths[owner]))
    by_class: dict[int, int] = {}
    for length in lengths.values():
        by_class[class_of(length)] = by_class.get(class_of(length), 0) + 1
    for cls, count in by_class.items():
        _, slots, per = CLASSES[cls]
        zspages = -(-count // per)
        # what the class holds needs `zspages`; at most one more is tolerated
        held = sum(len(z.slots) for z in arena.zpool.zspages if z is not None and z.cls == cls)
        assert held <= (zspages + 1) * slots


def test_compaction_moves_a_shared_object_for_every_page_that_shares_it() -> None:
    arena = Arena(8)
    arena.zpool = DedupZPool(arena.mem, arena.relocate)
    data = {n: random.Random(n).randbytes(1000) for n in range(8)}
    for n, d in data.items():  # owners 0..7 own the objects, 100+n and 200+n share them
        arena.store(n, d)
        assert isinstance(arena.zpool, DedupZPool)
        arena.zpool.remember(arena.handles[n], d, len(d))
        for extra in (100 + n, 200 + n):
            same = arena.zpool.find(d, len(d))
            assert same == arena.handles[n]
            arena.zpool.share(same, extra)
            arena.handles[extra] = same
    assert arena.zpool.slots == 2 and arena.zpool.objects == 24
    for n in (0, 1, 4, 5):  # every copy of four objects: 4 holes, one zspage compacted away
        for owner in (n, 100 + n, 200 + n):
            arena.drop(owner, 1000)
    assert arena.zpool.slots == 1
    for n in (2, 3, 6, 7):
        for owner in (n, 100 + n, 200 + n):
            assert bytes(arena.zpool.read(arena.handles[owner], 1000)) == data[n]
        assert arena.zpool.find(data[n], 1000) == arena.handles[n]
