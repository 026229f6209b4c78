"""Unit tests of packed pages in the store (docs/design.md §6.11): same-filled pages kept as their
word, compressed pages (lz4, zstd) and identical pages kept once (dedup): round trips byte for
byte of every kind of page and order, slots and caps in real memory, accounting that adds up,
eviction by the weighted LRU, sub-page changes and copy on write, mapped guests' pages kept raw,
and the dict model of test_store.py on compressing and deduplicating stores. The allocator
itself: test_zpool.py. No sockets, no daemon."""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule
from test_store import StoreModel

from tmemclient.wire.layout import FRAME_SIZE, MAX_ORDER
from tmemd.accounts import NIL, Pool
from tmemd.compress import Codec, codec, fill_word, pack
from tmemd.store import Store
from tmemd.zpool import ZPool

MakeStore = Callable[..., Store]


@pytest.fixture
def make_store() -> Iterator[MakeStore]:
    """Stores of ``slots`` 4 KiB slots (keywords go to Store); closed at teardown."""
    made: list[Store] = []

    def make(slots: int, **kwargs: object) -> Store:
        store = Store(slots * FRAME_SIZE, **kwargs)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def filled(word: int, order: int = 0) -> bytes:
    """A page of one repeated 8-byte word."""
    return word.to_bytes(8, "little") * ((FRAME_SIZE << order) // 8)


def rand(tag: int, order: int = 0) -> bytes:
    return random.Random(tag).randbytes(FRAME_SIZE << order)


def put(store: Store, pool: Pool, oid: int, index: int, data: bytes) -> bool:
    return store.put(pool, oid, index, memoryview(data))


def get(store: Store, pool: Pool, oid: int, index: int) -> bytes | None:
    dst = bytearray(pool.page_size)
    return bytes(dst) if store.get(pool, oid, index, memoryview(dst)) else None


def is_packed(store: Store, pool: Pool, oid: int, index: int) -> bool:
    head = store.page_slots(pool, oid, index)
    assert head is not None
    return head < NIL


# ---------------------------------------------------------------------------------- the store


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
def test_same_filled_pages_round_trip_and_share_slots(
    make_store: MakeStore, order: int, persistent: bool
) -> None:
    store = make_store(2)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=persistent, order=order)
    for i in range(100):
        assert put(store, pool, 1, i, filled(i * 0x0101_0101, order))
    assert store.used_slots == 1 and guest.held_slots == 1  # 100 words, one 32-byte class
    assert pool.pages == 100
    for i in range(100):
        assert get(store, pool, 1, i) == filled(i * 0x0101_0101, order)
    if not persistent:  # exclusive gets: all gone, and the slot with them
        assert pool.pages == 0 and store.used_slots == 0 and guest.held_slots == 0


def test_a_budget_of_one_slot_holds_128_same_filled_pages(make_store: MakeStore) -> None:
    store = make_store(1)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    assert all(put(store, pool, 0, i, filled(i)) for i in range(128))
    assert not put(store, pool, 0, 128, filled(128))  # the next needs a slot: refused
    assert not put(store, pool, 0, 129, rand(1))
    assert pool.pages == 128 and store.used_slots == 1


def test_replacing_pages_across_kinds_keeps_one_copy_and_the_slots_right(
    make_store: MakeStore,
) -> None:
    store = make_store(4)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=0)
    kinds = [filled(0), rand(1), filled(3), filled(3), rand(2), rand(3), filled(0)]
    for data in kinds:
        assert put(store, pool, 5, 5, data)
        assert pool.pages == 1
        packed = fill_word(data) is not None
        assert is_packed(store, pool, 5, 5) == packed
        assert store.used_slots == 1 == guest.eph_slots
    assert get(store, pool, 5, 5) == kinds[-1]
    assert store.used_slots == 0 and pool.zpool is not None and pool.zpool.slots == 0


def test_a_refused_put_over_a_packed_page_leaves_no_stale_copy(make_store: MakeStore) -> None:
    store = make_store(1)
    guest = store.add_guest("g")
    pers = store.new_pool(guest, persistent=True, order=0)
    assert put(store, pers, 0, 0, filled(1))
    assert put(store, pers, 0, 1, filled(2))
    assert not put(store, pers, 0, 1, rand(1))  # needs a slot of its own: none
    assert get(store, pers, 0, 1) is None
    assert get(store, pers, 0, 0) == filled(1)
    guest.frozen = True
    assert not put(store, pers, 0, 0, filled(1))
    assert get(store, pers, 0, 0) is None


def test_flush_and_flush_object_free_the_zspage(make_store: MakeStore) -> None:
    store = make_store(4)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=2)
    for i in range(10):
        put(store, pool, i % 2, i, filled(i, 2))
    assert store.used_slots == 1
    assert store.flush(pool, 0, 0)
    assert not store.flush(pool, 0, 0)
    assert store.flush_object(pool, 1) == 5
    assert store.flush_object(pool, 0) == 4
    assert pool.pages == 0 and store.used_slots == 0 and guest.eph_slots == 0


def test_destroying_a_pool_frees_its_packed_pages(make_store: MakeStore) -> None:
    store = make_store(128)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    for i in range(300):
        put(store, pool, i, 0, filled(i) if i % 3 else rand(i))
    assert store.used_slots == 100 + 2  # 100 raw pages, 200 words in two slots
    store.destroy_pool(pool)
    assert store.used_slots == 0 and guest.held_slots == 0 and store.packed_pages == 0


def test_a_cap_counts_real_slots_and_evicts_only_what_a_packed_page_needs(
    make_store: MakeStore,
) -> None:
    store = make_store(16)
    guest = store.add_guest("g", cap=FRAME_SIZE)
    pool = store.new_pool(guest, persistent=False, order=0)
    for i in range(128):
        assert put(store, pool, 0, i, filled(i))
    assert guest.held_slots == 1 and pool.pages == 128
    # The 129th needs a hole, not a slot: one page (the oldest) goes, not 128.
    assert put(store, pool, 0, 128, filled(128))
    assert guest.stats.evictions == 1 and pool.pages == 128
    assert get(store, pool, 0, 0) is None
    assert get(store, pool, 0, 1) == filled(1)
    # A raw page needs a whole slot within the cap: every packed page goes.
    assert put(store, pool, 1, 0, rand(1))
    assert guest.held_slots == 1 and pool.pages == 1


def test_the_weighted_lru_takes_raw_and_packed_pages_oldest_first(make_store: MakeStore) -> None:
    store = make_store(3)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=0)
    put(store, pool, 0, 0, rand(0))  # oldest
    put(store, pool, 0, 1, filled(1))
    put(store, pool, 0, 2, rand(2))
    put(store, pool, 0, 3, filled(3))
    assert store.used_slots == 3
    # A raw page needs a slot: the oldest page (raw) goes, nothing else.
    assert put(store, pool, 0, 4, rand(4))
    assert [store.page_slots(pool, 0, i) is not None for i in range(5)] == [
        False,
        True,
        True,
        True,
        True,
    ]
    # Then page 1 (packed) is the oldest: it goes, but its slot holds page 3 still, so the
    # next oldest goes too (page 2, raw), and page 3 stays.
    assert put(store, pool, 0, 5, rand(5))
    present = [store.page_slots(pool, 0, i) is not None for i in range(6)]
    assert present == [False, False, False, True, True, True]
    assert store.used_slots == 3


def test_oldest_is_the_older_of_the_raw_and_packed_heads(make_store: MakeStore) -> None:
    store = make_store(4)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=0)
    put(store, pool, 0, 0, filled(0))
    put(store, pool, 0, 1, rand(1))
    assert guest.oldest == store.page_slots(pool, 0, 0)
    store.read(pool, 0, 0, 0, memoryview(bytearray(8)))  # touched: now the newest
    assert guest.oldest == store.page_slots(pool, 0, 1)
    assert guest.newest_stamp == store._pstamp[-2 - store.page_slots(pool, 0, 0)]  # type: ignore[operator]


@pytest.mark.parametrize("persistent", [False, True])
def test_sub_page_access_to_a_packed_page(make_store: MakeStore, persistent: bool) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=persistent, order=1)
    data = bytearray(filled(0xAB, 1))
    put(store, pool, 0, 0, bytes(data))
    out = bytearray(100)
    assert store.read(pool, 0, 0, 4000, memoryview(out)) and out == data[4000:4100]
    # A write of the same word keeps it packed.
    assert store.write(pool, 0, 0, 8, memoryview(filled(0xAB)[:16]))
    assert is_packed(store, pool, 0, 0)
    # One that breaks the pattern makes it raw: 2 slots.
    assert store.write(pool, 0, 0, 5000, memoryview(b"hello"))
    data[5000:5005] = b"hello"
    assert not is_packed(store, pool, 0, 0) and store.used_slots == 2
    # xchg on another packed page returns the old bytes and keeps the new.
    put(store, pool, 0, 1, filled(7, 1))
    buf = bytearray(b"x" * 10)
    assert store.xchg(pool, 0, 1, 8180, memoryview(buf))
    assert buf == filled(7, 1)[8180:8190]
    other = bytearray(filled(7, 1))
    other[8180:8190] = b"x" * 10
    assert get(store, pool, 0, 1) == bytes(other)
    assert get(store, pool, 0, 0) == bytes(data)


def test_a_persistent_packed_page_changed_beyond_the_budget_is_kept(
    make_store: MakeStore,
) -> None:
    # Budget of one slot, all of it the zspage of the persistent words; the arena has two.
    store = Store(FRAME_SIZE, capacity=2 * FRAME_SIZE)
    try:
        guest = store.add_guest("g")
        pool = store.new_pool(guest, persistent=True, order=0)
        put(store, pool, 0, 0, filled(1))
        put(store, pool, 0, 1, filled(2))
        assert store.write(pool, 0, 0, 0, memoryview(b"raw now"))
        assert get(store, pool, 0, 0) == b"raw now" + filled(1)[7:]
        assert get(store, pool, 0, 1) == filled(2)
        assert store.used_slots == 2 > store.budget_slots  # over the budget, as §2.5 allows
        assert not put(store, pool, 0, 2, rand(3))  # so puts needing a slot are refused
    finally:
        store.close()


def test_a_persistent_packed_page_is_unchanged_when_the_arena_is_full(
    make_store: MakeStore,
) -> None:
    store = make_store(1)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    put(store, pool, 0, 0, filled(1))
    assert not store.write(pool, 0, 0, 0, memoryview(b"raw now"))
    assert get(store, pool, 0, 0) == filled(1)
    buf = bytearray(b"abc")
    assert not store.xchg(pool, 0, 0, 0, memoryview(buf))
    assert buf == b"abc" and get(store, pool, 0, 0) == filled(1)


def test_an_ephemeral_packed_page_changed_without_room_is_gone(make_store: MakeStore) -> None:
    store = make_store(2)
    guest = store.add_guest("g")
    pers = store.new_pool(guest, persistent=True, order=0)
    eph = store.new_pool(guest, persistent=False, order=1)
    assert put(store, pers, 0, 0, rand(1))  # one slot nobody can take
    assert put(store, eph, 0, 0, filled(2, 1))  # a zspage: the other slot
    # Changed, it needs two slots of its own: there is one. The write is done, and the page
    # is gone right after, as an ephemeral page may be at any time (an eviction).
    assert store.write(eph, 0, 0, 0, memoryview(b"changed"))
    assert get(store, eph, 0, 0) is None
    assert guest.stats.evictions == 1 and store.evictions == 1
    assert store.used_slots == 1 == guest.held_slots


def test_a_mapped_guests_pages_are_kept_raw(make_store: MakeStore) -> None:
    store = make_store(4)
    guest = store.add_guest("g")
    store.map_guest(guest)
    pool = store.new_pool(guest, persistent=False, order=0)
    assert put(store, pool, 0, 0, filled(0))
    assert not is_packed(store, pool, 0, 0) and store.used_slots == 1
    token = store.token(pool, 0, 0)
    assert token is not None and token[0] >= 0 and token[1] > 0
    assert get(store, pool, 0, 0) == filled(0)


def test_shared_pool_packed_pages_stay_after_get_and_are_billed_to_the_pool(
    make_store: MakeStore,
) -> None:
    store = make_store(4)
    account = store.add_guest("shared:x")
    pool = store.new_pool(account, persistent=False, order=0, shared=True)
    assert put(store, pool, 0, 0, filled(5))
    assert get(store, pool, 0, 0) == filled(5)
    assert get(store, pool, 0, 0) == filled(5)
    assert account.eph_slots == 1 and pool.pages == 1


# -------------------------------------------------------------------------------- compression

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "typing.py").read_bytes()


def text(tag: int, order: int = 0) -> bytes:
    """A page of real source text (it compresses 2-4x)."""
    size = FRAME_SIZE << order
    start = (tag * 977) % (len(TEXT) - size)
    return TEXT[start : start + size]


def kinds(order: int) -> dict[str, bytes]:
    """Every kind of page: random (grows when compressed), text, zeros, repeated words, a page
    that compresses too little (7/8 random, then text), and one just short of same-filled."""
    size = FRAME_SIZE << order
    half = rand(7, order)[: size * 7 // 8] + text(3, order)[: size // 8]
    return {
        "random": rand(1, order),
        "text": text(2, order),
        "zeros": bytes(size),
        "words": filled(0xDEAD_BEEF_0BAD_F00D, order),
        "half": half,
        "almost": filled(5, order)[:-1] + b"\x06",
    }


@pytest.fixture(params=["lz4", "zstd"])
def compressor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
def test_every_kind_of_page_round_trips_compressed(
    make_store: MakeStore, compressor: str, order: int
) -> None:
    store = make_store(256, codec=codec(compressor))
    guest = store.add_guest("g")
    pers = store.new_pool(guest, persistent=True, order=order)
    eph = store.new_pool(guest, persistent=False, order=order)
    pages = kinds(order)
    for i, data in enumerate(pages.values()):
        assert put(store, pers, 0, i, data) and put(store, eph, 0, i, data)
    packed = {name: is_packed(store, pers, 0, i) for i, name in enumerate(pages)}
    assert packed == {
        "random": False,  # grows when compressed: kept raw
        "text": True,
        "zeros": True,
        "words": True,
        "half": False,  # shrinks, but not to 3/4 of its size: raw
        "almost": True,  # compresses to nothing
    }
    for i, data in enumerate(pages.values()):
        assert get(store, pers, 0, i) == data
        assert get(store, pers, 0, i) == data  # persistent: still there
        assert get(store, eph, 0, i) == data
        assert get(store, eph, 0, i) is None  # ephemeral: the get took it
    raw = sum(not p for p in packed.values()) << order
    assert guest.pers_slots == raw + (pers.zpool.slots if pers.zpool else 0)
    assert guest.eph_slots == 0 and store.used_slots == guest.pers_slots


def test_text_pages_take_a_fraction_of_their_slots(make_store: MakeStore, compressor: str) -> None:
    store = make_store(64, codec=codec(compressor))
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    stored = 0
    while stored < 1000 and put(store, pool, 0, stored, text(stored)):
        stored += 1
    assert stored > 64 * 3 // 2  # the budget of 64 raw slots held half as many again, or more
    assert store.used_slots <= 64 and guest.pers_slots == store.used_slots
    assert pool.zpool is not None and pool.zpool.stored < pool.zpool.slots * FRAME_SIZE
    assert all(get(store, pool, 0, i) == text(i) for i in range(stored))


def test_a_cap_holds_in_real_slots_with_compression(make_store: MakeStore, compressor: str) -> None:
    store = make_store(256, codec=codec(compressor))
    guest = store.add_guest("g", cap=32 * FRAME_SIZE)
    pool = store.new_pool(guest, persistent=False, order=0)
    for i in range(300):
        assert put(store, pool, 0, i, text(i))
        assert guest.held_slots <= 32
    assert pool.pages > 32  # more pages than raw slots the cap allows
    for i in range(300, 400):  # with pages that do not compress among them
        assert put(store, pool, 0, i, text(i) if i % 3 else rand(i))
        assert guest.held_slots <= 32
    assert guest.stats.evictions == 400 - pool.pages > 0
    for i in range(400):  # what is there is right; what is gone went by eviction
        got = get(store, pool, 0, i)
        assert got is None or got == (text(i) if i < 300 or i % 3 else rand(i))


def test_sub_page_changes_move_a_page_between_packed_and_raw(
    make_store: MakeStore, compressor: str
) -> None:
    store = make_store(64, codec=codec(compressor))
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=1)
    want = bytearray(text(9, 1))
    put(store, pool, 1, 1, bytes(want))
    assert is_packed(store, pool, 1, 1)
    noise = rand(3)[:3000]
    old = bytearray(noise)
    assert store.xchg(pool, 1, 1, 4000, memoryview(old))  # across the slot boundary
    assert old == want[4000:7000]
    want[4000:7000] = noise
    assert get(store, pool, 1, 1) == bytes(want)
    assert store.write(pool, 1, 1, 0, memoryview(rand(4, 1)))  # now incompressible: raw
    assert not is_packed(store, pool, 1, 1) and get(store, pool, 1, 1) == rand(4, 1)
    # A raw page is written in place: it stays raw until a put packs it again.
    assert store.write(pool, 1, 1, 0, memoryview(text(5, 1)))
    assert not is_packed(store, pool, 1, 1) and get(store, pool, 1, 1) == text(5, 1)
    assert put(store, pool, 1, 1, text(5, 1)) and is_packed(store, pool, 1, 1)
    assert store.packed_pages == 1 and pool.pages == 1


def test_accounting_adds_up_after_mixed_puts_flushes_and_evictions(
    make_store: MakeStore, compressor: str
) -> None:
    store = make_store(24, codec=codec(compressor))
    guests = [store.add_guest(f"g{i}", weight=100 * (i + 1)) for i in range(3)]
    pools = [
        store.new_pool(g, persistent=p, order=o)
        for g in guests
        for p, o in ((False, 0), (False, 2), (True, 0))
    ]
    rng = random.Random(18)
    makers = [rand, text, lambda t, o: filled(t, o)]
    for step in range(3000):
        pool = rng.choice(pools)
        key = (rng.randrange(3), rng.randrange(8))
        roll = rng.random()
        if roll < 0.6:
            put(store, pool, *key, rng.choice(makers)(step, pool.order))
        elif roll < 0.75:
            get(store, pool, *key)
        elif roll < 0.85:
            store.flush(pool, *key)
        elif roll < 0.9:
            store.flush_object(pool, key[0])
        else:
            store.write(pool, *key, 0, memoryview(rng.randbytes(rng.randrange(1, 600))))
        if step % 100 == 0 or step == 2999:
            for g in guests:
                mine = [p for p in pools if p.guest is g]
                slots = [
                    ((p.pages - (p.zpool.objects if p.zpool else 0)) << p.order)
                    + (p.zpool.slots if p.zpool else 0)
                    for p in mine
                ]
                assert g.eph_slots == sum(
                    s for p, s in zip(mine, slots, strict=True) if not p.persistent
                )
                assert g.pers_slots == sum(
                    s for p, s in zip(mine, slots, strict=True) if p.persistent
                )
            assert store.used_slots == sum(g.held_slots for g in guests)
            assert store.used_slots <= store.budget_slots
            assert store.packed_pages == sum(p.zpool.objects for p in pools if p.zpool)
    assert store.evictions == sum(g.stats.evictions for g in guests) > 0


class CompressedStoreModel(StoreModel):
    """The dict model of tests/unit/test_store.py on a store that compresses (lz4): the same
    rules and invariants, with most non-filled pages now packed too."""

    def __init__(self) -> None:
        super().__init__()
        self.store.set_packing(codec("lz4"), dedup=False)


CompressedStoreModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, derandomize=True, database=None
)
test_a_compressing_store_agrees_with_a_dict_model = CompressedStoreModel.TestCase


# ------------------------------------------------------------------------------------- dedup


def test_identical_pages_of_a_pool_are_stored_once(make_store: MakeStore) -> None:
    store = make_store(16, dedup=True)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    for i in range(100):
        assert put(store, pool, i % 3, i, rand(1))
    assert pool.pages == 100 and store.used_slots == 1 == guest.pers_slots
    assert all(get(store, pool, i % 3, i) == rand(1) for i in range(100))
    assert store.packing_stats()["deduped"] == 99


def test_identical_pages_are_never_shared_across_pools_or_guests(make_store: MakeStore) -> None:
    store = make_store(16, dedup=True)
    a, b = store.add_guest("a"), store.add_guest("b")
    pools = [
        store.new_pool(a, persistent=True, order=0),
        store.new_pool(a, persistent=True, order=0),
    ]
    pools.append(store.new_pool(b, persistent=True, order=0))
    for pool in pools:
        assert put(store, pool, 0, 0, rand(5)) and put(store, pool, 0, 1, rand(5))
    assert store.used_slots == 3 and a.pers_slots == 2 and b.pers_slots == 1


@pytest.mark.parametrize("compressor", [None, "lz4"])
def test_a_change_to_one_copy_never_shows_in_another(
    make_store: MakeStore, compressor: str | None
) -> None:
    store = make_store(16, dedup=True, codec=codec(compressor or "off"))
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=1)
    data = text(4, 1) if compressor else rand(4, 1)
    for i in range(4):
        put(store, pool, 0, i, data)
    assert store.write(pool, 0, 0, 100, memoryview(b"written"))
    buf = bytearray(b"exchanged")
    assert store.xchg(pool, 0, 1, 5000, memoryview(buf)) and buf == data[5000:5009]
    assert put(store, pool, 0, 2, rand(9, 1))
    assert get(store, pool, 0, 0) == data[:100] + b"written" + data[107:]
    assert get(store, pool, 0, 1) == data[:5000] + b"exchanged" + data[5009:]
    assert get(store, pool, 0, 2) == rand(9, 1)
    assert get(store, pool, 0, 3) == data


def test_a_shared_copy_goes_with_its_last_page(make_store: MakeStore) -> None:
    store = make_store(4, dedup=True)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=0)
    for i in range(5):
        put(store, pool, 0, i, rand(2))
    for i in range(4):
        assert store.flush(pool, 0, i)
        assert store.used_slots == 1
    assert get(store, pool, 0, 4) == rand(2)  # the last one, then gone
    assert store.used_slots == 0 and pool.zpool is not None and pool.zpool.objects == 0


def test_evicting_shared_pages_goes_by_the_lru_and_frees_only_the_last(
    make_store: MakeStore,
) -> None:
    store = make_store(2, dedup=True)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=0)
    for i in range(3):
        put(store, pool, 0, i, rand(1))  # one object, three pages
    put(store, pool, 0, 3, rand(2))  # the second slot
    assert store.used_slots == 2
    assert put(store, pool, 0, 4, rand(3))  # needs a slot: pages 0, 1, 2 go, oldest first
    assert [store.page_slots(pool, 0, i) is not None for i in range(5)] == [
        False,
        False,
        False,
        True,
        True,
    ]
    assert guest.stats.evictions == 3 and store.used_slots == 2


def test_an_object_is_shared_by_no_more_pages_than_a_slot_of_words(make_store: MakeStore) -> None:
    store = make_store(8, dedup=True)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    for i in range(300):
        assert put(store, pool, 0, i, rand(1))
    assert store.used_slots == 3  # 128 pages a copy at most (4096 // 32)
    for i in range(300):  # same-filled pages are never shared: 128 words a slot
        assert put(store, pool, 1, i, filled(1))
    assert store.used_slots == 3 + 3


# Only g0 packs (g1 and g2 are mapped: their pages stay raw): its pools are 0..2.
G0_POOL = st.integers(0, 2)


class DedupStoreModel(StoreModel):
    """The dict model on a store that compresses and dedups, with puts of a few random pages
    again and again (random pages are kept raw, as objects many pages may share), so pages
    share objects, and writes, evictions and compaction must keep them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.store.set_packing(codec("lz4"), dedup=True)

    @rule(pick=st.integers(0, 2), p=G0_POOL, oid=StoreModel.oid, index=StoreModel.index)
    def put_a_copy(self, p: int, oid: int, index: int, pick: int) -> None:
        pool = self.pools[p]
        data = random.Random(p * 10 + pick).randbytes(pool.page_size)
        if self.store.put(pool, oid, index, memoryview(data)):
            self.model[(p, oid, index)] = bytearray(data)
            self._count(pool, "puts_ok")
        else:
            self.model.pop((p, oid, index), None)
            self._count(pool, "puts_refused")

    @rule(pick=st.integers(0, 2), p=G0_POOL, oid=StoreModel.oid, index=StoreModel.index)
    def put_another_copy(self, p: int, oid: int, index: int, pick: int) -> None:
        self.put_a_copy(p, oid, index, pick)

    @rule(p=G0_POOL, oid=StoreModel.oid, index=StoreModel.index)
    def write_one_copy(self, p: int, oid: int, index: int) -> None:
        key = (p, oid, index)
        if key in self.model:
            if self.store.write(self.pools[p], oid, index, 64, memoryview(b"one copy")):
                self.model[key][64:72] = b"one copy"
            else:  # an ephemeral page another put evicted
                self._learn_miss(key)


DedupStoreModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, derandomize=True, database=None
)
test_a_deduplicating_store_agrees_with_a_dict_model = DedupStoreModel.TestCase


def slots_of_packed(page: bytes, compressor: Codec | None) -> int:
    """Slots of a zspage of the class the page packs to (0: it does not pack)."""
    packed = pack(memoryview(page), compressor)
    return 0 if packed is None else ZPool.slots_needed(len(packed[0]))


def test_a_page_whose_zspage_would_not_fit_a_small_cap_is_stored_raw(
    make_store: MakeStore,
) -> None:
    store = make_store(16, codec=codec("zstd"))
    guest = store.add_guest("g", cap=2 * FRAME_SIZE)
    pool = store.new_pool(guest, persistent=True, order=0)
    # A page that compresses to a class of zspages of 3 or 4 slots (e.g. 96 bytes: 3 slots).
    zstd = codec("zstd")
    candidates = (
        (random.Random(n).randbytes(n) * FRAME_SIZE)[:FRAME_SIZE] for n in range(20, 400, 3)
    )
    page = next(p for p in candidates if slots_of_packed(p, zstd) > 2)
    assert put(store, pool, 0, 0, page)  # its zspage would not fit the cap; 1 raw slot does
    assert not is_packed(store, pool, 0, 0) and guest.pers_slots == 1
    assert get(store, pool, 0, 0) == page
