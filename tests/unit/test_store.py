"""Unit tests of the pure parts: the page store (round trips, eviction, weights and caps,
sub-page operations, teardown, statistics, a model-based test against a dict, mapped guests'
mirrors and lent memory, on a clock the test moves), the eviction policy, the client's frame
allocator and the size parser. No sockets, no daemon."""

from __future__ import annotations

import itertools
import mmap
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tmemclient.region import FrameAllocator
from tmemclient.wire.errors import InvalidArgument
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.units import format_size, parse_size
from tmemd.accounts import NIL, Guest, Pool, StoreError
from tmemd.memfiles import Mirror
from tmemd.policy import DEFAULT_WEIGHT, choose_victim, validate_weight
from tmemd.store import Store

# ------------------------------------------------------------------------------------ helpers

MakeStore = Callable[[int], Store]


def page(tag: int, order: int = 0) -> bytes:
    """A page whose every 4 KiB slot is different and which no other tag produces."""
    return random.Random(tag).randbytes(FRAME_SIZE << order)


def get(store: Store, pool: Pool, oid: int, index: int) -> bytes | None:
    """store.get into a fresh buffer; the page or None."""
    dst = bytearray(pool.page_size)
    return bytes(dst) if store.get(pool, oid, index, memoryview(dst)) else None


def put(store: Store, pool: Pool, oid: int, index: int, data: bytes) -> bool:
    """store.put of bytes."""
    return store.put(pool, oid, index, memoryview(data))


def present(store: Store, pool: Pool, oid: int, index: int) -> bool:
    """Whether the page is stored, without touching the LRU or the clock."""
    return store.page_slots(pool, oid, index) is not None


def peek(store: Store, pool: Pool, oid: int, index: int) -> bytes | None:
    """The stored bytes, with no side effect on the LRU, the clock or the statistics."""
    head = store.page_slots(pool, oid, index)
    if head is None:
        return None
    dst = bytearray(pool.page_size)
    if head < NIL:  # packed (tmemd/packing.py)
        store._unpack(pool, head, memoryview(dst))
    else:
        store._copy_out(store._mem_of(pool.guest), head, pool.order, memoryview(dst))
    return bytes(dst)


def slots_of(store: Store, pool: Pool, oid: int, index: int) -> tuple[int, ...]:
    """Every arena slot of a stored page."""
    head = store.page_slots(pool, oid, index)
    assert head is not None
    return store._slots_of(head, pool.order)


@pytest.fixture
def make_store() -> Iterator[MakeStore]:
    """Stores of ``slots`` 4 KiB slots; closed at teardown."""
    made: list[Store] = []

    def make(slots: int) -> Store:
        store = Store(slots * FRAME_SIZE)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("persistent", [False, True], ids=["ephemeral", "persistent"])
def test_put_then_get_returns_the_page(make_store: MakeStore, order: int, persistent: bool) -> None:
    store = make_store(64)
    pool = store.new_pool(store.add_guest("g"), persistent=persistent, order=order)
    data = page(1, order)
    assert put(store, pool, 7, 3, data)
    assert get(store, pool, 7, 3) == data


def test_ephemeral_get_is_exclusive(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    put(store, pool, 1, 0, page(1))
    assert get(store, pool, 1, 0) == page(1)
    assert get(store, pool, 1, 0) is None


def test_ephemeral_get_frees_the_slot(make_store: MakeStore) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=1)
    put(store, pool, 1, 0, page(1, 1))
    get(store, pool, 1, 0)
    assert (store.used_slots, guest.eph_slots, pool.pages) == (0, 0, 0)


def test_persistent_get_leaves_the_page(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    put(store, pool, 1, 0, page(1))
    assert get(store, pool, 1, 0) == page(1)
    assert get(store, pool, 1, 0) == page(1)


@pytest.mark.parametrize("persistent", [False, True], ids=["ephemeral", "persistent"])
def test_put_put_get_returns_the_newest_page(make_store: MakeStore, persistent: bool) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=persistent, order=0)
    put(store, pool, 1, 0, page(1))
    put(store, pool, 1, 0, page(2))
    assert get(store, pool, 1, 0) == page(2)


def test_put_of_existing_handle_takes_no_new_slot(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=1)
    put(store, pool, 1, 0, page(1, 1))
    put(store, pool, 1, 0, page(2, 1))
    assert (store.used_slots, pool.pages) == (2, 1)


@pytest.mark.parametrize("persistent", [False, True], ids=["ephemeral", "persistent"])
def test_flush_then_get_misses(make_store: MakeStore, persistent: bool) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=persistent, order=0)
    put(store, pool, 1, 0, page(1))
    assert store.flush(pool, 1, 0) is True
    assert get(store, pool, 1, 0) is None


def test_flush_is_idempotent(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    put(store, pool, 1, 0, page(1))
    store.flush(pool, 1, 0)
    assert store.flush(pool, 1, 0) is False
    assert store.flush(pool, 99, 99) is False
    assert (store.used_slots, pool.pages) == (0, 0)


def test_flush_object_removes_every_index_of_that_object_only(make_store: MakeStore) -> None:
    store = make_store(16)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    other_pool = store.new_pool(guest, persistent=True, order=0)
    for index in range(4):
        put(store, pool, 1, index, page(index))
        put(store, pool, 2, index, page(10 + index))
    put(store, other_pool, 1, 0, page(20))
    assert store.flush_object(pool, 1) == 4
    assert [present(store, pool, 1, i) for i in range(4)] == [False] * 4
    assert [peek(store, pool, 2, i) for i in range(4)] == [page(10 + i) for i in range(4)]
    assert peek(store, other_pool, 1, 0) == page(20)
    assert (store.used_slots, pool.pages, guest.pers_slots) == (5, 4, 5)


def test_flush_object_of_unknown_object_removes_nothing(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    put(store, pool, 1, 0, page(1))
    assert store.flush_object(pool, 2) == 0
    assert present(store, pool, 1, 0)


def test_object_ids_of_192_bits_are_distinct_keys(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    low, high = 5, (1 << 191) | 5
    put(store, pool, low, 0, page(1))
    put(store, pool, high, 0, page(2))
    assert (peek(store, pool, low, 0), peek(store, pool, high, 0)) == (page(1), page(2))


@pytest.mark.parametrize("persistent", [False, True], ids=["ephemeral", "persistent"])
def test_refused_put_of_existing_handle_flushes_the_old_copy(
    make_store: MakeStore, persistent: bool
) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=persistent, order=0)
    put(store, pool, 1, 0, page(1))
    guest.frozen = True
    assert put(store, pool, 1, 0, page(2)) is False
    assert get(store, pool, 1, 0) is None
    assert (store.used_slots, pool.pages, guest.held_slots) == (0, 0, 0)


def test_frozen_guest_can_still_get_and_flush(make_store: MakeStore) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    put(store, pool, 1, 0, page(1))
    put(store, pool, 1, 1, page(2))
    guest.frozen = True
    assert get(store, pool, 1, 0) == page(1)
    assert store.flush(pool, 1, 1) is True


# ------------------------------------------------------------------------------------ eviction


def test_persistent_pages_are_never_evicted(make_store: MakeStore) -> None:
    store = make_store(4)
    owner = store.new_pool(store.add_guest("a"), persistent=True, order=0)
    for index in range(4):
        assert put(store, owner, 1, index, page(index))
    other = store.add_guest("b")
    assert put(store, owner, 1, 4, page(4)) is False
    assert put(store, store.new_pool(other, persistent=True, order=0), 1, 0, page(5)) is False
    assert put(store, store.new_pool(other, persistent=False, order=0), 1, 0, page(6)) is False
    assert [peek(store, owner, 1, i) for i in range(4)] == [page(i) for i in range(4)]
    assert store.evictions == 0


def test_persistent_put_evicts_ephemeral_pages_to_make_room(make_store: MakeStore) -> None:
    store = make_store(2)
    eph = store.new_pool(store.add_guest("a"), persistent=False, order=0)
    pers = store.new_pool(store.add_guest("b"), persistent=True, order=0)
    put(store, eph, 1, 0, page(1))
    put(store, eph, 1, 1, page(2))
    assert put(store, pers, 1, 0, page(3)) is True
    assert (present(store, eph, 1, 0), present(store, eph, 1, 1)) == (False, True)


def test_ephemeral_put_evicts_the_least_recently_put_page(make_store: MakeStore) -> None:
    store = make_store(3)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    for index in range(4):
        assert put(store, pool, 1, index, page(index))
    assert [present(store, pool, 1, i) for i in range(4)] == [False, True, True, True]


def test_eviction_follows_lru_order_one_page_per_put(make_store: MakeStore) -> None:
    store = make_store(3)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    for index in range(3):
        put(store, pool, 1, index, page(index))
    put(store, pool, 1, 3, page(3))
    put(store, pool, 1, 4, page(4))
    assert [present(store, pool, 1, i) for i in range(5)] == [False, False, True, True, True]


@pytest.mark.parametrize("touch", ["read", "write", "xchg", "put"])
def test_touching_a_page_makes_it_most_recently_used(make_store: MakeStore, touch: str) -> None:
    store = make_store(3)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    for index in range(3):
        put(store, pool, 1, index, page(index))
    buf = memoryview(bytearray(8))
    if touch == "read":
        assert store.read(pool, 1, 0, 100, buf)
    elif touch == "write":
        assert store.write(pool, 1, 0, 100, buf)
    elif touch == "xchg":
        assert store.xchg(pool, 1, 0, 100, buf)
    else:
        assert put(store, pool, 1, 0, page(9))
    put(store, pool, 1, 3, page(3))
    assert [present(store, pool, 1, i) for i in range(4)] == [True, False, True, True]


def test_miss_does_not_disturb_lru_order(make_store: MakeStore) -> None:
    store = make_store(2)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    put(store, pool, 1, 0, page(0))
    put(store, pool, 1, 1, page(1))
    assert store.read(pool, 1, 5, 0, memoryview(bytearray(1))) is False
    put(store, pool, 1, 2, page(2))
    assert [present(store, pool, 1, i) for i in range(3)] == [False, True, True]


def test_eviction_counts_in_stats(make_store: MakeStore) -> None:
    store = make_store(1)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=False, order=0)
    put(store, pool, 1, 0, page(0))
    put(store, pool, 1, 1, page(1))
    assert (store.evictions, guest.stats.evictions, pool.stats.evictions) == (1, 1, 1)


def test_order_one_put_evicts_two_order_zero_pages(make_store: MakeStore) -> None:
    store = make_store(3)
    guest = store.add_guest("g")
    small = store.new_pool(guest, persistent=False, order=0)
    big = store.new_pool(guest, persistent=False, order=1)
    for index in range(3):
        put(store, small, 1, index, page(index))
    assert put(store, big, 1, 0, page(9, 1))
    assert [present(store, small, 1, i) for i in range(3)] == [False, False, True]
    assert peek(store, big, 1, 0) == page(9, 1)


def test_page_larger_than_budget_is_refused(make_store: MakeStore) -> None:
    store = make_store(4)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=3)
    assert put(store, pool, 1, 0, page(1, 3)) is False
    assert pool.stats.puts_refused == 1


def test_page_larger_than_budget_evicts_nothing(make_store: MakeStore) -> None:
    store = make_store(4)
    guest = store.add_guest("g")
    small = store.new_pool(guest, persistent=False, order=0)
    put(store, small, 1, 0, page(1))
    put(store, store.new_pool(guest, persistent=False, order=3), 1, 0, page(2, 3))
    assert present(store, small, 1, 0)
    assert store.evictions == 0


def test_eviction_is_a_global_lru_across_guests_with_equal_weights(make_store: MakeStore) -> None:
    store = make_store(3)
    a = store.new_pool(store.add_guest("a"), persistent=False, order=0)
    b = store.new_pool(store.add_guest("b"), persistent=False, order=0)
    put(store, a, 1, 0, page(1))  # oldest
    put(store, b, 1, 0, page(2))
    put(store, a, 1, 1, page(3))
    put(store, b, 1, 1, page(4))  # evicts a/0
    put(store, b, 1, 2, page(5))  # evicts b/0
    assert [present(store, a, 1, i) for i in range(2)] == [False, True]
    assert [present(store, b, 1, i) for i in range(3)] == [False, True, True]


def test_quiet_guest_pages_age_out_while_busy_guest_keeps_all_memory(make_store: MakeStore) -> None:
    store = make_store(4)
    quiet = store.new_pool(store.add_guest("quiet"), persistent=False, order=0)
    busy = store.new_pool(store.add_guest("busy"), persistent=False, order=0)
    put(store, quiet, 1, 0, page(0))
    put(store, quiet, 1, 1, page(1))
    for index in range(10):
        put(store, busy, 1, index, page(10 + index))
    assert quiet.guest.eph_slots == 0
    assert busy.guest.eph_slots == 4


def test_higher_weight_makes_an_older_page_survive(make_store: MakeStore) -> None:
    store = make_store(2)
    heavy = store.new_pool(store.add_guest("heavy", weight=300), persistent=False, order=0)
    light = store.new_pool(store.add_guest("light", weight=100), persistent=False, order=0)
    put(store, heavy, 1, 0, page(1))  # clock 1: idle 3 at clock 3, /300
    put(store, light, 1, 0, page(2))  # clock 2: idle 2 at clock 3, /100
    put(store, light, 1, 1, page(3))  # clock 3: must evict one of the two above
    assert present(store, heavy, 1, 0)
    assert not present(store, light, 1, 0)


def test_equal_weights_evict_the_older_page_of_another_guest(make_store: MakeStore) -> None:
    store = make_store(2)
    first = store.new_pool(store.add_guest("first"), persistent=False, order=0)
    second = store.new_pool(store.add_guest("second"), persistent=False, order=0)
    put(store, first, 1, 0, page(1))
    put(store, second, 1, 0, page(2))
    put(store, second, 1, 1, page(3))
    assert not present(store, first, 1, 0)
    assert present(store, second, 1, 0)


# ------------------------------------------------------------------------------------ policy


@dataclass
class FakeAccount:
    name: str
    weight: int
    oldest_stamp: int | None
    newest_stamp: int | None = None


def test_choose_victim_with_equal_weights_picks_the_oldest_page() -> None:
    accounts = [FakeAccount("a", 100, 5), FakeAccount("b", 100, 2), FakeAccount("c", 100, 8)]
    assert choose_victim(accounts, 10) is accounts[1]


def test_choose_victim_divides_idle_time_by_weight() -> None:
    # a: idle 11/300 < b: idle 6/100
    accounts = [FakeAccount("a", 300, 0), FakeAccount("b", 100, 5)]
    assert choose_victim(accounts, 10) is accounts[1]


def test_choose_victim_picks_the_heavier_guest_once_it_is_idle_long_enough() -> None:
    # a: idle 31/300 > b: idle 1/100
    accounts = [FakeAccount("a", 300, 0), FakeAccount("b", 100, 30)]
    assert choose_victim(accounts, 30) is accounts[0]


def test_choose_victim_skips_accounts_without_ephemeral_pages() -> None:
    accounts = [FakeAccount("a", 100, None), FakeAccount("b", 100, 9)]
    assert choose_victim(accounts, 10) is accounts[1]


def test_choose_victim_returns_none_when_nobody_has_ephemeral_pages() -> None:
    assert choose_victim([FakeAccount("a", 100, None)], 10) is None
    assert choose_victim([], 10) is None


def test_choose_victim_breaks_ties_by_iteration_order() -> None:
    accounts = [FakeAccount("a", 100, 4), FakeAccount("b", 100, 4)]
    assert choose_victim(accounts, 10) is accounts[0]


SLACK, ACTIVE = 0.125, 16

# (other account, mover, clock, who goes): FakeAccount(name, weight, oldest, newest stamp)
MOVER_CASES = [
    # a's oldest idles 9, the mover's 8 >= 9 * 7/8, and a touched a page 1 tick ago: the mover
    # gives up its own page rather than move memory from a's file to its own
    pytest.param(
        FakeAccount("a", 100, 2, 9), FakeAccount("m", 100, 3, 10), 10, "m", id="keeps-in-place"
    ),
    # memory follows demand: a last touched a page 38 ticks ago (>= active), so it goes
    pytest.param(
        FakeAccount("a", 100, 2, 2), FakeAccount("m", 100, 3, 39), 40, "a", id="idle-goes"
    ),
    # a's oldest idles 9, the mover's 2 < 9 * 7/8: the plain weighted LRU
    pytest.param(
        FakeAccount("a", 100, 2, 9), FakeAccount("m", 100, 9, 10), 10, "a", id="much-older"
    ),
    # the first case's idle times, but the mover weighs 3 times more: 8/300 < 9/100 * 7/8
    pytest.param(FakeAccount("a", 100, 2, 9), FakeAccount("m", 300, 3, 10), 10, "a", id="weighted"),
]


@pytest.mark.parametrize(("other", "mover", "clock", "goes"), MOVER_CASES)
def test_choose_victim_with_a_mover(
    other: FakeAccount, mover: FakeAccount, clock: int, goes: str
) -> None:
    """The mover's own page goes instead of a busy neighbour's within the slack; an idle
    neighbour's, or a much older one, goes as in the plain weighted LRU."""
    assert choose_victim([other, mover], clock) is other  # the plain weighted LRU
    chosen = choose_victim([other, mover], clock, mover=mover, slack=SLACK, active=ACTIVE)
    assert chosen is not None and chosen.name == goes


def test_choose_victim_without_slack_or_own_pages_is_the_plain_lru() -> None:
    busy, mover = FakeAccount("a", 100, 2, 9), FakeAccount("m", 100, 3, 10)
    assert choose_victim([busy, mover], 10, mover=mover, slack=0.0, active=16) is busy
    empty = FakeAccount("m", 100, None, None)
    assert choose_victim([busy, empty], 10, mover=empty, slack=SLACK, active=ACTIVE) is busy
    assert choose_victim([empty], 10, mover=empty, slack=SLACK, active=ACTIVE) is None


def test_choose_victim_considers_a_page_touched_this_tick() -> None:
    account = FakeAccount("a", 100, 10)
    assert choose_victim([account], 10) is account


@pytest.mark.parametrize("weight", [1, DEFAULT_WEIGHT, 10_000])
def test_validate_weight_accepts_weights_in_range(weight: object) -> None:
    assert validate_weight(weight) == weight


@pytest.mark.parametrize("weight", [0, -1, 10_001, True, 1.5, "100", None])
def test_validate_weight_rejects_bad_weights(weight: object) -> None:
    with pytest.raises(ValueError):
        validate_weight(weight)


# ------------------------------------------------------------------------------------ caps


def test_guest_at_its_cap_evicts_its_own_oldest_page(make_store: MakeStore) -> None:
    store = make_store(16)
    other = store.new_pool(store.add_guest("other"), persistent=False, order=0)
    put(store, other, 1, 0, page(0))  # globally the oldest page
    capped = store.new_pool(
        store.add_guest("capped", cap=2 * FRAME_SIZE), persistent=False, order=0
    )
    for index in range(3):
        assert put(store, capped, 1, index, page(10 + index))
    assert [present(store, capped, 1, i) for i in range(3)] == [False, True, True]
    assert present(store, other, 1, 0)
    assert capped.guest.held_slots == 2


def test_persistent_put_beyond_cap_is_refused(make_store: MakeStore) -> None:
    store = make_store(16)
    pool = store.new_pool(store.add_guest("g", cap=2 * FRAME_SIZE), persistent=True, order=0)
    assert put(store, pool, 1, 0, page(0))
    assert put(store, pool, 1, 1, page(1))
    assert put(store, pool, 1, 2, page(2)) is False
    assert [peek(store, pool, 1, i) for i in range(2)] == [page(0), page(1)]


def test_ephemeral_put_is_refused_when_persistent_pages_fill_the_cap(make_store: MakeStore) -> None:
    store = make_store(16)
    guest = store.add_guest("g", cap=2 * FRAME_SIZE)
    pers = store.new_pool(guest, persistent=True, order=0)
    put(store, pers, 1, 0, page(0))
    put(store, pers, 1, 1, page(1))
    eph = store.new_pool(guest, persistent=False, order=0)
    assert put(store, eph, 1, 0, page(2)) is False
    assert guest.pers_slots == 2


def test_persistent_put_under_cap_evicts_own_ephemeral_pages(make_store: MakeStore) -> None:
    store = make_store(16)
    guest = store.add_guest("g", cap=2 * FRAME_SIZE)
    eph = store.new_pool(guest, persistent=False, order=0)
    pers = store.new_pool(guest, persistent=True, order=0)
    put(store, eph, 1, 0, page(0))
    put(store, eph, 1, 1, page(1))
    assert put(store, pers, 1, 0, page(2))
    assert (guest.eph_slots, guest.pers_slots) == (1, 1)
    assert present(store, eph, 1, 1)


# ------------------------------------------------------------------------------------ eviction
# inside the object being written


@pytest.mark.parametrize("order", [0, 1])
def test_put_that_evicts_the_last_page_of_its_own_object_is_stored(
    make_store: MakeStore, order: int
) -> None:
    store = make_store(1 << order)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=order)
    put(store, pool, 1, 0, page(0, order))
    assert put(store, pool, 1, 1, page(1, order)) is True
    assert not present(store, pool, 1, 0)
    assert get(store, pool, 1, 1) == page(1, order)


def test_object_index_is_consistent_after_self_eviction(make_store: MakeStore) -> None:
    store = make_store(1)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    put(store, pool, 1, 0, page(0))
    put(store, pool, 1, 1, page(1))
    assert list(pool.objects) == [1]
    assert list(pool.objects[1]) == [1]
    assert store.flush_object(pool, 1) == 1
    assert pool.objects == {}


# ------------------------------------------------------------------------------------ sub-page


@pytest.fixture
def scattered(make_store: MakeStore) -> tuple[Store, Pool]:
    """A store holding one order-2 page (16 KiB) whose slots are not adjacent nor in order."""
    store = make_store(8)
    guest = store.add_guest("g")
    filler = store.new_pool(guest, persistent=True, order=0)
    for index in range(8):
        put(store, filler, 9, index, page(100 + index))
    for index in (0, 2, 4, 6):
        store.flush(filler, 9, index)
    pool = store.new_pool(guest, persistent=True, order=2)
    assert put(store, pool, 1, 0, page(1, 2))
    slots = slots_of(store, pool, 1, 0)
    assert all(abs(a - b) != 1 for a, b in itertools.pairwise(slots)), slots
    return store, pool


def test_read_across_slot_boundaries_returns_the_page_bytes(scattered: tuple[Store, Pool]) -> None:
    store, pool = scattered
    dst = bytearray(2 * FRAME_SIZE + 20)
    assert store.read(pool, 1, 0, FRAME_SIZE - 10, memoryview(dst))
    assert bytes(dst) == page(1, 2)[FRAME_SIZE - 10 : 3 * FRAME_SIZE + 10]


def test_write_across_slot_boundaries_changes_only_that_range(
    scattered: tuple[Store, Pool],
) -> None:
    store, pool = scattered
    data = bytes(range(256)) * 33  # 8448 bytes: spans three slots from offset 4000
    assert store.write(pool, 1, 0, 4000, memoryview(data))
    expected = bytearray(page(1, 2))
    expected[4000 : 4000 + len(data)] = data
    assert get(store, pool, 1, 0) == bytes(expected)


def test_xchg_across_slot_boundaries_swaps_the_bytes(scattered: tuple[Store, Pool]) -> None:
    store, pool = scattered
    new = b"\xaa" * 100
    buf = bytearray(new)
    offset = 3 * FRAME_SIZE - 50
    assert store.xchg(pool, 1, 0, offset, memoryview(buf))
    before = page(1, 2)
    assert bytes(buf) == before[offset : offset + 100]
    expected = bytearray(before)
    expected[offset : offset + 100] = new
    assert get(store, pool, 1, 0) == bytes(expected)


def test_write_of_the_whole_last_byte_of_a_large_page(scattered: tuple[Store, Pool]) -> None:
    store, pool = scattered
    assert store.write(pool, 1, 0, pool.page_size - 1, memoryview(b"\x01"))
    assert (peek(store, pool, 1, 0) or b"")[-1] == 1


@pytest.mark.parametrize("op", ["read", "write", "xchg"])
def test_sub_page_op_on_missing_page_returns_false(make_store: MakeStore, op: str) -> None:
    store = make_store(4)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    assert getattr(store, op)(pool, 1, 0, 0, memoryview(bytearray(4))) is False


def test_write_on_missing_page_does_not_create_it(make_store: MakeStore) -> None:
    store = make_store(4)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    store.write(pool, 1, 0, 0, memoryview(b"abcd"))
    assert (present(store, pool, 1, 0), store.used_slots) == (False, 0)


@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 4), (FRAME_SIZE - 3, 4), (FRAME_SIZE, 1), (0, FRAME_SIZE + 1)]
)
def test_sub_page_range_outside_the_page_is_a_store_error(
    make_store: MakeStore, offset: int, length: int
) -> None:
    store = make_store(4)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    put(store, pool, 1, 0, page(1))
    with pytest.raises(StoreError):
        store.read(pool, 1, 0, offset, memoryview(bytearray(length)))


def test_read_on_ephemeral_page_leaves_it_in_place(make_store: MakeStore) -> None:
    store = make_store(4)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=0)
    put(store, pool, 1, 0, page(1))
    store.read(pool, 1, 0, 0, memoryview(bytearray(16)))
    assert get(store, pool, 1, 0) == page(1)


# ------------------------------------------------------------------------------------ teardown


def test_destroy_pool_frees_every_page(make_store: MakeStore) -> None:
    store = make_store(16)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=1)
    kept = store.new_pool(guest, persistent=False, order=0)
    for index in range(4):
        put(store, pool, index % 2, index, page(index, 1))
    put(store, kept, 1, 0, page(9))
    assert store.destroy_pool(pool) == 4
    assert (store.used_slots, guest.pers_slots, guest.eph_slots) == (1, 0, 1)
    assert (pool.pages, pool.objects) == (0, {})
    assert guest.pools == {kept}


def test_destroy_pool_scrubs_its_slots(make_store: MakeStore) -> None:
    store = make_store(8)
    pool = store.new_pool(store.add_guest("g"), persistent=False, order=1)
    put(store, pool, 1, 0, page(1, 1))
    slots = slots_of(store, pool, 1, 0)
    store.destroy_pool(pool)
    for slot in slots:
        assert not any(store._mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE])


def test_remove_guest_frees_every_page_and_forgets_the_guest(make_store: MakeStore) -> None:
    store = make_store(16)
    guest = store.add_guest("g")
    eph = store.new_pool(guest, persistent=False, order=0)
    pers = store.new_pool(guest, persistent=True, order=2)
    put(store, eph, 1, 0, page(1))
    put(store, eph, 2, 0, page(2))
    put(store, pers, 1, 0, page(3, 2))
    assert store.remove_guest(guest) == 3
    assert store.used_slots == 0
    assert "g" not in store.guests
    assert guest.pools == set()


def test_remove_guest_scrubs_the_slots_it_held(make_store: MakeStore) -> None:
    store = make_store(16)
    guest = store.add_guest("g")
    eph = store.new_pool(guest, persistent=False, order=0)
    pers = store.new_pool(guest, persistent=True, order=2)
    put(store, eph, 1, 0, page(1))
    put(store, pers, 1, 0, page(2, 2))
    held = slots_of(store, eph, 1, 0) + slots_of(store, pers, 1, 0)
    assert any(store._mem[held[0] * FRAME_SIZE : (held[0] + 1) * FRAME_SIZE])
    store.remove_guest(guest)
    for slot in held:
        assert not any(store._mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE]), slot


def test_slots_of_a_removed_guest_serve_another_guest(make_store: MakeStore) -> None:
    store = make_store(4)
    first = store.add_guest("first")
    pool = store.new_pool(first, persistent=True, order=0)
    for index in range(4):
        put(store, pool, 1, index, page(index))
    store.remove_guest(first)
    second = store.new_pool(store.add_guest("second"), persistent=True, order=0)
    assert all(put(store, second, 1, i, page(10 + i)) for i in range(4))
    assert [peek(store, second, 1, i) for i in range(4)] == [page(10 + i) for i in range(4)]


def test_guest_name_can_be_reused_after_remove_guest(make_store: MakeStore) -> None:
    store = make_store(4)
    store.remove_guest(store.add_guest("g"))
    assert store.add_guest("g").name == "g"


def test_adding_a_guest_twice_is_a_store_error(make_store: MakeStore) -> None:
    store = make_store(4)
    store.add_guest("g")
    with pytest.raises(StoreError):
        store.add_guest("g")


@pytest.mark.parametrize("budget", [0, 1, FRAME_SIZE - 1])
def test_budget_smaller_than_one_page_is_rejected(budget: int) -> None:
    with pytest.raises(ValueError):
        Store(budget)


def test_budget_of_exactly_one_page_holds_one_page(make_store: MakeStore) -> None:
    store = make_store(1)
    pool = store.new_pool(store.add_guest("g"), persistent=True, order=0)
    assert put(store, pool, 1, 0, page(1))
    assert put(store, pool, 1, 1, page(2)) is False


# ------------------------------------------------------------------------------------ statistics


def test_stats_count_each_kind_of_operation(make_store: MakeStore) -> None:
    store = make_store(1)
    guest = store.add_guest("g")
    pool = store.new_pool(guest, persistent=True, order=0)
    put(store, pool, 1, 0, page(1))  # ok
    put(store, pool, 1, 1, page(2))  # refused: full of persistent pages
    get(store, pool, 1, 0)  # hit
    get(store, pool, 1, 1)  # miss
    store.flush(pool, 1, 0)
    store.flush_object(pool, 1)
    want = {
        "puts_ok": 1,
        "puts_refused": 1,
        "gets_hit": 1,
        "gets_miss": 1,
        "flushes": 2,
        "evictions": 0,
    }
    assert guest.stats.as_dict() == want
    assert pool.stats.as_dict() == want


# ------------------------------------------------------------------------------------ model test


def model_page(serial: int, order: int) -> bytes:
    """Distinct per put and per slot, cheap to make: every other one same-filled (packed by
    the store), the others not (their last word differs)."""
    if serial % 2:
        return serial.to_bytes(8, "big") * ((FRAME_SIZE << order) // 8)
    return b"".join(
        ((serial << 8) | k).to_bytes(8, "big") * (FRAME_SIZE // 8 - 1) + b"\xff" * 8
        for k in range(1 << order)
    )


def raw_slots(pool: Pool) -> int:
    """Slots of the pool's raw pages."""
    packed = 0 if pool.zpool is None else pool.zpool.objects
    return (pool.pages - packed) << pool.order


def pool_slots(pool: Pool) -> int:
    """Slots billed for the pool's pages: raw pages' and its packed pages' zspages."""
    return raw_slots(pool) + (0 if pool.zpool is None else pool.zpool.slots)


# (persistent, order) of the pools every guest of the model has.
MODEL_POOLS = [(False, 0), (False, 1), (True, 0)]
MODEL_BUDGET_SLOTS = 6
Key = tuple[int, int, int]  # pool number, oid, index


def lru_walk(head: int, tail: int, after: Any, stamp: Any, most: int) -> list[int]:
    """The entries of one LRU list from ``head`` (at most ``most`` + 1 of them), checked to be
    oldest first by ``stamp`` and to end at ``tail``."""
    found: list[int] = []
    while head != NIL and len(found) <= most:
        found.append(head)
        head = after[head]
    stamps = [stamp[x] for x in found]
    assert stamps == sorted(stamps)
    assert tail == (found[-1] if found else NIL)
    return found


class StoreModel(RuleBasedStateMachine):
    """Random operations against a tiny store, checked against a dict.

    The model may lose ephemeral pages (eviction), learned when the store misses; it must never
    see a wrong page, a page it did not put, or a missing persistent page.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0  # the store's clock, in ns: rules move it
        self.store = Store(MODEL_BUDGET_SLOTS * FRAME_SIZE, now_ns=lambda: self.now)
        self.guests = [
            self.store.add_guest("g0"),
            self.store.add_guest("g1", weight=300),
            self.store.add_guest("g2", cap=3 * FRAME_SIZE),
        ]
        for guest in self.guests[1:]:  # two of them borrow memory (PROTOCOL.md §4.8)
            self.store.map_guest(guest)
            self.store.open_loan(guest)
        self.pools: list[Pool] = []
        for guest in self.guests:
            for persistent, order in MODEL_POOLS:
                self.pools.append(self.store.new_pool(guest, persistent=persistent, order=order))
        self.model: dict[Key, bytearray] = {}
        self.serial = 0
        self.expected: dict[str, dict[str, int]] = {
            g.name: {"puts_ok": 0, "puts_refused": 0, "gets_hit": 0, "gets_miss": 0}
            for g in self.guests
        }

    def teardown(self) -> None:
        self.store.close()

    def _count(self, pool: Pool, counter: str) -> None:
        self.expected[pool.guest.name][counter] += 1

    def _learn_miss(self, key: Key) -> None:
        """The store missed: fine for an evicted ephemeral page, a bug otherwise."""
        pool = self.pools[key[0]]
        if key in self.model:
            assert not pool.persistent, f"persistent page {key} vanished"
            del self.model[key]

    pool_no = st.integers(0, len(MODEL_POOLS) * 3 - 1)
    oid = st.sampled_from([0, 1, (1 << 191) + 1])
    index = st.integers(0, 3)

    @rule(p=pool_no, oid=oid, index=index)
    def put(self, p: int, oid: int, index: int) -> None:
        pool = self.pools[p]
        self.serial += 1
        data = model_page(self.serial, pool.order)
        ok = self.store.put(pool, oid, index, memoryview(data))
        if ok:
            self.model[(p, oid, index)] = bytearray(data)
            self._count(pool, "puts_ok")
        else:
            self.model.pop((p, oid, index), None)  # a refused put flushes the old copy
            self._count(pool, "puts_refused")
            guest = pool.guest
            if not (guest.frozen or pool.persistent or guest.cap_slots is not None):
                # Room: all but persistent pages and lent memory a put may not take (its own
                # guest's, and busy guests' within their share).
                kept = guest.lent_slots + sum(
                    min(g.lent_slots, self.store._shares(self.now, guest)(g))
                    for g in self.guests
                    if g is not guest and not self.store._idle(g, self.now)
                )
                room = self.store.budget_slots - sum(g.pers_slots for g in self.guests) - kept
                assert 1 << pool.order > room, "ephemeral put refused though eviction makes room"

    @rule(g=st.integers(1, 2), want=st.integers(0, MODEL_BUDGET_SLOTS + 2))
    def lend(self, g: int, want: int) -> None:
        guest = self.guests[g]
        had = guest.lent_slots
        pers = sum(x.pers_slots for x in self.guests)
        answer = self.store.lend(guest, want)
        assert answer["lent"] == guest.lent_slots <= max(want, 0)
        if want <= had:
            assert guest.lent_slots == want  # gives back exactly what it does not want
        assert answer["low"] <= had
        assert answer["seq"] % 2 == 0
        assert guest.mirror is not None
        assert guest.mirror.published()[1] == guest.lent_slots == guest.mirror.published()[2]
        # Persistent pages are never taken for it.
        assert sum(x.pers_slots for x in self.guests) == pers

    @rule(ms=st.sampled_from([1, 50, 150]))
    def time_passes(self, ms: int) -> None:
        self.now += ms * 1_000_000

    @rule(g=st.integers(1, 2))
    def guest_uses_its_loan(self, g: int) -> None:
        loan = self.guests[g].loan
        assert loan is not None
        loan.mark_active(self.now)

    @rule(slots=st.integers(1, MODEL_BUDGET_SLOTS))
    def set_budget(self, slots: int) -> None:
        self.store.set_budget(slots * FRAME_SIZE)
        for p, oid, index in list(self.model):
            if self.store.page_slots(self.pools[p], oid, index) is None:
                self._learn_miss((p, oid, index))

    @rule(p=pool_no, oid=oid, count=st.integers(2, 4))
    def put_burst(self, p: int, oid: int, count: int) -> None:
        """Several puts in a row, so eviction happens often."""
        for index in range(count):
            self.put(p, oid, index)

    @rule(p=pool_no, oid=oid, index=index)
    def get(self, p: int, oid: int, index: int) -> None:
        pool = self.pools[p]
        key = (p, oid, index)
        dst = bytearray(pool.page_size)
        if self.store.get(pool, oid, index, memoryview(dst)):
            self._count(pool, "gets_hit")
            assert key in self.model, f"get of {key} returned a page never put"
            assert dst == self.model[key], f"get of {key} returned a wrong page"
            if not pool.persistent:
                del self.model[key]  # exclusive get
                assert self.store.page_slots(pool, oid, index) is None
        else:
            self._count(pool, "gets_miss")
            self._learn_miss(key)

    @rule(p=pool_no, oid=oid, index=index)
    def flush(self, p: int, oid: int, index: int) -> None:
        self.store.flush(self.pools[p], oid, index)
        self.model.pop((p, oid, index), None)

    @rule(p=pool_no, oid=oid)
    def flush_object(self, p: int, oid: int) -> None:
        before = {k for k in self.model if k[:2] == (p, oid)}
        removed = self.store.flush_object(self.pools[p], oid)
        assert removed <= len(before)
        for key in before:
            del self.model[key]

    def _draw_range(self, data: st.DataObject, page_size: int) -> tuple[int, int]:
        """An (offset, length) inside the page, often straddling a slot boundary."""
        near_boundary = [FRAME_SIZE * k + d for k in (1, 2, 3) for d in (-8, -1)]
        offsets = st.integers(0, page_size - 1) | st.sampled_from(
            [o for o in near_boundary if o < page_size] or [0]
        )
        offset = data.draw(offsets, label="offset")
        length = data.draw(st.integers(1, min(64, page_size - offset)), label="length")
        return offset, length

    @rule(p=pool_no, oid=oid, index=index, data=st.data())
    def write(self, p: int, oid: int, index: int, data: st.DataObject) -> None:
        pool = self.pools[p]
        key = (p, oid, index)
        offset, length = self._draw_range(data, pool.page_size)
        self.serial += 1
        src = bytes([self.serial % 256]) * length
        if self.store.write(pool, oid, index, offset, memoryview(src)):
            assert key in self.model
            self.model[key][offset : offset + length] = src
        else:
            self._learn_miss(key)

    @rule(p=pool_no, oid=oid, index=index, data=st.data())
    def read(self, p: int, oid: int, index: int, data: st.DataObject) -> None:
        pool = self.pools[p]
        key = (p, oid, index)
        offset, length = self._draw_range(data, pool.page_size)
        dst = bytearray(length)
        if self.store.read(pool, oid, index, offset, memoryview(dst)):
            assert key in self.model
            assert dst == self.model[key][offset : offset + length]
        else:
            self._learn_miss(key)

    @rule(p=pool_no, oid=oid, index=index, data=st.data())
    def xchg(self, p: int, oid: int, index: int, data: st.DataObject) -> None:
        pool = self.pools[p]
        key = (p, oid, index)
        offset, length = self._draw_range(data, pool.page_size)
        self.serial += 1
        new = bytes([self.serial % 256]) * length
        buf = bytearray(new)
        if self.store.xchg(pool, oid, index, offset, memoryview(buf)):
            assert key in self.model
            assert buf == self.model[key][offset : offset + length], "xchg returned wrong bytes"
            self.model[key][offset : offset + length] = new
        else:
            self._learn_miss(key)

    @rule(p=pool_no, oid=oid, index=index)
    def put_while_frozen(self, p: int, oid: int, index: int) -> None:
        """A frozen guest's put is refused and flushes the old copy."""
        guest = self.pools[p].guest
        guest.frozen = True
        try:
            self.put(p, oid, index)
        finally:
            guest.frozen = False
        assert self.store.page_slots(self.pools[p], oid, index) is None

    @precondition(lambda self: len(self.pools) < 40)
    @rule(p=pool_no)
    def destroy_and_recreate_pool(self, p: int) -> None:
        old = self.pools[p]
        self.store.destroy_pool(old)
        for key in [k for k in self.model if k[0] == p]:
            del self.model[key]
        self.pools[p] = self.store.new_pool(old.guest, persistent=old.persistent, order=old.order)

    # --------------------------------------------------------------------------- invariants

    @invariant()
    def stored_pages_match_the_model(self) -> None:
        for p, pool in enumerate(self.pools):
            for oid, pages in pool.objects.items():
                assert pages, f"empty object dict left for oid {oid}"
                for index in pages:
                    key = (p, oid, index)
                    assert key in self.model, f"store holds {key} that the model does not"
                    assert peek(self.store, pool, oid, index) == bytes(self.model[key]), key

    @invariant()
    def persistent_pages_are_all_there(self) -> None:
        for p, oid, index in self.model:
            pool = self.pools[p]
            if pool.persistent:
                assert self.store.page_slots(pool, oid, index) is not None

    @invariant()
    def slot_accounting_adds_up(self) -> None:
        store = self.store
        by_pools = sum(pool_slots(pool) for pool in self.pools)
        lent = sum(g.lent_slots for g in self.guests)
        by_guests = sum(g.held_slots for g in self.guests)
        assert store.used_slots == by_pools + lent == by_guests
        pers = sum(g.pers_slots for g in self.guests)
        assert store.used_slots <= max(store.budget_slots, pers)
        for guest in self.guests:
            mine = [pool for pool in self.pools if pool.guest is guest]
            assert guest.eph_slots == sum(pool_slots(p) for p in mine if not p.persistent)
            assert guest.pers_slots == sum(pool_slots(p) for p in mine if p.persistent)
            if guest.cap_slots is not None:
                assert guest.held_slots <= guest.cap_slots
        for pool in self.pools:
            assert pool.pages == sum(len(pages) for pages in pool.objects.values())

    @invariant()
    def slots_are_owned_once(self) -> None:
        used: list[int] = []
        for pool in self.pools:
            for pages in pool.objects.values():
                for head in pages.values():
                    if head >= 0:
                        used.extend(self.store._slots_of(head, pool.order))
            if pool.zpool is not None:
                for zspage in pool.zpool.zspages:
                    if zspage is not None:
                        used.extend(zspage.slots)
        free = list(self.store._free)
        assert len(set(used)) == len(used), "a slot belongs to two pages"
        assert len(set(free)) == len(free), "a slot is free twice"
        assert not set(used) & set(free), "a slot is both used and free"
        assert len(used) + len(free) == self.store._fresh, "a slot leaked"

    @invariant()
    def lru_lists_hold_exactly_the_ephemeral_pages_oldest_first(self) -> None:
        store = self.store
        for guest in self.guests:
            heads = {
                head
                for pool in self.pools
                if pool.guest is guest and not pool.persistent
                for pages in pool.objects.values()
                for head in pages.values()
            }
            most = len(heads)
            walked = lru_walk(guest.lru_head, guest.lru_tail, store._next, store._stamp, most)
            # packed pages: a list of their own (tmemd/packing.py)
            packed = lru_walk(guest.plru_head, guest.plru_tail, store._pnext, store._pstamp, most)
            walked += [-2 - p for p in packed]
            assert set(walked) == heads and len(walked) == len(heads)
            oldest = min(
                walked,
                key=lambda h: store._pstamp[-2 - h] if h < NIL else store._stamp[h],
                default=NIL,
            )
            assert guest.oldest == oldest

    @invariant()
    def statistics_match_the_operations(self) -> None:
        for guest in self.guests:
            got = guest.stats.as_dict()
            assert {k: got[k] for k in self.expected[guest.name]} == self.expected[guest.name]
        assert self.store.evictions == sum(g.stats.evictions for g in self.guests)


StoreModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, derandomize=True, database=None
)
test_store_agrees_with_a_dict_model = StoreModel.TestCase


# ------------------------------------------------------------------------------------ FrameAllocator


def test_allocator_hands_out_consecutive_runs_first_fit() -> None:
    alloc = FrameAllocator(8)
    assert [alloc.alloc(2), alloc.alloc(3), alloc.alloc(1)] == [0, 2, 5]
    assert alloc.free == 2


def test_allocator_exhaustion_returns_none() -> None:
    alloc = FrameAllocator(4)
    assert alloc.alloc(4) == 0
    assert alloc.alloc(1) is None


def test_allocator_returns_none_when_no_run_is_long_enough() -> None:
    alloc = FrameAllocator(4)
    alloc.alloc(1)
    second = alloc.alloc(1)
    alloc.alloc(2)
    alloc.release(0, 1)
    assert second is not None
    assert alloc.free == 1
    assert alloc.alloc(2) is None


def test_allocator_reuses_the_first_free_run_that_fits() -> None:
    alloc = FrameAllocator(10)
    a, b, c = alloc.alloc(2), alloc.alloc(4), alloc.alloc(2)
    assert (a, b, c) == (0, 2, 6)
    alloc.release(0, 2)
    alloc.release(2, 4)  # merged into 0..6 now
    assert alloc.alloc(5) == 0


def test_allocator_merges_a_released_run_with_both_neighbours() -> None:
    alloc = FrameAllocator(9)
    runs = [alloc.alloc(3) for _ in range(3)]
    assert runs == [0, 3, 6]
    alloc.release(0, 3)
    alloc.release(6, 3)
    assert alloc.largest() == 3
    alloc.release(3, 3)
    assert alloc.largest() == 9
    assert alloc.alloc(9) == 0


def test_allocator_largest_reports_the_longest_free_run() -> None:
    alloc = FrameAllocator(10)
    alloc.alloc(10)
    assert alloc.largest() == 0
    alloc.release(1, 2)
    alloc.release(5, 4)
    assert alloc.largest() == 4
    assert alloc.free == 6


@pytest.mark.parametrize(
    ("start", "count"),
    [(2, 2), (2, 1), (3, 1), (1, 2), (3, 2), (0, 6)],
    ids=["same-run", "first-frame", "last-frame", "overlaps-start", "overlaps-end", "covers"],
)
def test_allocator_release_of_free_frames_raises(start: int, count: int) -> None:
    alloc = FrameAllocator(6)
    alloc.alloc(6)
    alloc.release(2, 2)
    with pytest.raises(InvalidArgument):
        alloc.release(start, count)


def test_allocator_double_release_leaves_it_consistent() -> None:
    alloc = FrameAllocator(4)
    alloc.alloc(4)
    alloc.release(0, 2)
    with pytest.raises(InvalidArgument):
        alloc.release(0, 2)
    assert alloc.free == 2


@pytest.mark.parametrize(("start", "count"), [(-1, 1), (3, 2), (0, 0), (4, 1)])
def test_allocator_release_outside_the_region_raises(start: int, count: int) -> None:
    alloc = FrameAllocator(4)
    alloc.alloc(4)
    with pytest.raises(InvalidArgument):
        alloc.release(start, count)


@pytest.mark.parametrize("count", [0, -1])
def test_allocator_alloc_of_less_than_one_frame_raises(count: int) -> None:
    with pytest.raises(InvalidArgument):
        FrameAllocator(4).alloc(count)


def test_allocator_survives_a_random_alloc_release_sequence() -> None:
    rng = random.Random(1234)
    alloc = FrameAllocator(64)
    taken: dict[int, int] = {}
    for _ in range(2000):
        if taken and rng.random() < 0.5:
            victim = rng.choice(list(taken))
            alloc.release(victim, taken.pop(victim))
        else:
            count = rng.randint(1, 8)
            start = alloc.alloc(count)
            if start is None:
                continue
            frames = set(range(start, start + count))
            for s, c in taken.items():
                assert not frames & set(range(s, s + c)), "allocator handed out a taken frame"
            taken[start] = count
        assert alloc.free == 64 - sum(taken.values())
    for start, count in taken.items():
        alloc.release(start, count)
    assert alloc.largest() == 64


# ------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("64K", 64 << 10),
        ("64KiB", 64 << 10),
        ("64KB", 64 << 10),
        ("256MiB", 256 << 20),
        ("256mib", 256 << 20),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("0.5K", 512),
        (" 16 MiB ", 16 << 20),
        ("100B", 100),
    ],
)
def test_parse_size_reads_sizes_as_people_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", " ", "K", "MiB", "-1", "-1K", "1.5", "0.1K", "12X", "1e3", "1,000", "10iB", "1 2", "0x10"],
)
def test_parse_size_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_of_a_large_plain_byte_count_is_exact() -> None:
    assert parse_size(str((1 << 53) + 1)) == (1 << 53) + 1


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (512, "512B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (256 << 20, "256.0MiB"),
        (3 << 29, "1.5GiB"),
        (1 << 40, "1.0TiB"),
        (1 << 50, "1024.0TiB"),
    ],
)
def test_format_size_gives_a_short_binary_form(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [0, 1, 4096, 64 << 10, 256 << 20, 3 << 29, 1 << 40])
def test_format_size_output_parses_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


# ------------------------------------------------------------------------- mapped guests (§4.7)


def mapped_read(mirror: Mirror, token: list[int], order: int) -> bytes | None:
    """What a guest's mapped read of ``token`` sees, done on the daemon's view of the mirror."""
    head, generation = token
    if mirror.gen[head] != generation:
        return None
    parts, slot = [], head
    for _ in range(1 << order):
        parts.append(bytes(mirror.mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE]))
        slot = mirror.link[slot]
    return b"".join(parts) if mirror.gen[head] == generation else None


def test_generations_cost_nothing_until_a_guest_maps_its_pages(make_store: MakeStore) -> None:
    """The store's private copy of mapped pages' generations (``_gen``, 8 bytes a slot) exists
    only once a guest maps its pages; from then on it covers every slot, old and new."""
    store = make_store(16)
    plain = store.add_guest("plain")
    pool = store.new_pool(plain, persistent=False, order=0)
    for i in range(5):
        assert put(store, pool, 1, i, page(i))
    assert len(store._gen) == 0
    mapped = store.add_guest("mapped")
    store.map_guest(mapped)
    assert len(store._gen) == len(store._index) > 0
    mpool = store.new_pool(mapped, persistent=False, order=0)
    for i in range(12):  # past the slots the plain guest's pages made
        assert put(store, mpool, 1, i, page(i))
        token = store.token(mpool, 1, i)
        assert token is not None and store._gen[token[0]] == token[1] > 0
    assert len(store._gen) == len(store._index)


@pytest.mark.parametrize("order", [0, 2])
def test_a_mapped_guests_pages_are_in_its_mirror_under_their_tokens(
    make_store: MakeStore, order: int
) -> None:
    store = make_store(16)
    guest = store.add_guest("g")
    mirror = store.map_guest(guest)
    assert store.map_guest(guest) is mirror  # one per guest
    pool = store.new_pool(guest, persistent=False, order=order)
    data = {i: page(i, order) for i in range(3)}
    for i, d in data.items():
        assert put(store, pool, 1, i, d)
    tokens: dict[int, list[int]] = {}
    for i in data:
        token = store.token(pool, 1, i)
        assert token is not None
        tokens[i] = token
    for i, token in tokens.items():
        assert mapped_read(mirror, token, order) == data[i]
    assert not any(store._mem[: 16 * FRAME_SIZE])  # nothing went to the arena
    # Replaced: the old token reads nothing, the new one the new page.
    assert put(store, pool, 1, 0, page(99, order))
    assert mapped_read(mirror, tokens[0], order) is None
    new = store.token(pool, 1, 0)
    assert new is not None and new[1] > tokens[0][1]
    assert mapped_read(mirror, new, order) == page(99, order)
    # Flushed, got (exclusive), or changed in place: gone for mapped reads.
    store.flush(pool, 1, 1)
    assert mapped_read(mirror, tokens[1], order) is None
    assert get(store, pool, 1, 2) == data[2]
    assert mapped_read(mirror, tokens[2], order) is None
    last = store.token(pool, 1, 0)
    assert last is not None
    assert store.write(pool, 1, 0, 10, memoryview(b"xyz"))
    assert mapped_read(mirror, last, order) is None
    assert store.read(pool, 1, 0, 10, memoryview(dst := bytearray(3))) and dst == b"xyz"


def test_only_an_empty_guest_can_be_mapped(make_store: MakeStore) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    assert put(store, store.new_pool(guest, persistent=True, order=0), 1, 0, page(1))
    with pytest.raises(StoreError, match="map it before any put"):
        store.map_guest(guest)


def test_a_slot_moving_to_another_owner_leaves_nothing_in_the_old_file(
    make_store: MakeStore,
) -> None:
    """Guests evict each other: a slot's bytes stay in its last owner's file only until the
    slot is given to someone else (then they are punched out), whoever that is: another mapped
    guest, or an unmapped one (the arena)."""
    store = make_store(4)
    a, b, c = store.add_guest("a"), store.add_guest("b"), store.add_guest("c")
    ma, mb = store.map_guest(a), store.map_guest(b)
    pa = store.new_pool(a, persistent=False, order=0)
    pb = store.new_pool(b, persistent=False, order=0)
    pc = store.new_pool(c, persistent=False, order=0)
    for i in range(4):
        assert put(store, pa, 1, i, page(i))
    a_slots = {store.page_slots(pa, 1, i) for i in range(4)}
    for i in range(2):
        assert put(store, pb, 1, i, page(100 + i))  # evicts a's two oldest
    for i in range(2):
        assert put(store, pc, 1, i, page(200 + i))  # and the other two
    assert a.held_slots == 0
    for slot in a_slots:
        assert slot is not None
        assert not any(ma.mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE])
        assert ma.gen[slot] == 0
    for i in range(2):
        head = store.page_slots(pb, 1, i)
        assert head is not None and head in a_slots
        assert bytes(mb.mem[head * FRAME_SIZE : (head + 1) * FRAME_SIZE]) == page(100 + i)
        assert peek(store, pc, 1, i) == page(200 + i)


def churn(store: Store, pools: list[Pool], puts: int, seed: int = 0) -> None:
    """``puts`` new pages, each by a pool picked at random (busy guests at the same rate, in no
    fixed order)."""
    rng = random.Random(seed)
    for i in range(puts):
        n = rng.randrange(len(pools))
        assert put(store, pools[n], 2 + seed, i, page(1000 * n + i))


@pytest.mark.parametrize("slack", [0.0, 0.125])
def test_busy_mapped_guests_keep_their_memory_where_it_is(slack: float) -> None:
    """Two mapped guests putting in turn into a full store: the weighted LRU alone takes the
    page of one for the other nearly every time, moving memory between their files; with the
    move slack almost none moves, and the two still hold about the same."""
    store = Store(64 * FRAME_SIZE, move_slack=slack)
    try:
        guests = [store.add_guest("a"), store.add_guest("b")]
        pools = []
        for g in guests:
            store.map_guest(g)
            pools.append(store.new_pool(g, persistent=False, order=0))
        churn(store, pools, 64)  # full
        moved = store.moved_slots
        churn(store, pools, 400, seed=1)
        moves = store.moved_slots - moved
        if slack:
            assert moves <= 60, moves  # of 400 puts
        else:
            assert moves >= 150, moves
        assert all(20 <= g.held_slots <= 44 for g in guests), [g.held_slots for g in guests]
    finally:
        store.close()


def test_weights_still_set_the_shares_of_busy_mapped_guests() -> None:
    """Weights 3:1, equal put rates: holdings settle at 3:1 as with the plain weighted LRU
    (docs/design.md §3), while less memory moves than a tenth of the plain LRU's."""
    moved = {}
    for slack in (0.0, 0.125):
        store = Store(256 * FRAME_SIZE, move_slack=slack)
        try:
            guests = [store.add_guest("a", weight=300), store.add_guest("b", weight=100)]
            pools = []
            for g in guests:
                store.map_guest(g)
                pools.append(store.new_pool(g, persistent=False, order=0))
            churn(store, pools, 2000)  # settle
            ratios = []
            for n in range(40):
                churn(store, pools, 100, seed=10 + n)
                ratios.append(guests[0].held_slots / guests[1].held_slots)
            ratios.sort()
            assert 2.7 <= ratios[len(ratios) // 2] <= 3.3, ratios
            moved[slack] = store.moved_slots
        finally:
            store.close()
    assert moved[0.125] * 10 < moved[0.0], moved


def test_memory_still_follows_demand_to_a_busy_mapped_guest() -> None:
    """The slack keeps memory between busy guests only: a guest gone quiet loses its pages to
    the one putting, as with the plain weighted LRU."""
    store = Store(64 * FRAME_SIZE)
    try:
        a, b = store.add_guest("a"), store.add_guest("b")
        store.map_guest(a)
        store.map_guest(b)
        pa = store.new_pool(a, persistent=False, order=0)
        pb = store.new_pool(b, persistent=False, order=0)
        churn(store, [pa], 64)  # a fills the store, then goes quiet
        churn(store, [pb], 64, seed=1)
        assert (a.held_slots, b.held_slots) == (0, 64)
        assert store.moved_slots == 64
    finally:
        store.close()


def test_reported_mapped_reads_count_and_keep_pages_recent(make_store: MakeStore) -> None:
    """touch_many: a token whose page is still there as read moves it to the LRU's young end
    and counts as a get hit; tokens of pages gone or changed, of another pool or guest, of a
    tail slot or past the store are ignored."""
    store = make_store(8)
    a, b = store.add_guest("a"), store.add_guest("b")
    ma = store.map_guest(a)
    store.map_guest(b)
    pa = store.new_pool(a, persistent=False, order=0)
    big = store.new_pool(a, persistent=False, order=1)
    pb = store.new_pool(b, persistent=False, order=0)
    for i in range(4):
        assert put(store, pa, 1, i, page(i))
    assert put(store, big, 1, 0, page(9, 1))
    assert put(store, pb, 1, 0, page(10))
    maybe = [store.token(pa, 1, i) for i in range(4)]
    big_token, b_token = store.token(big, 1, 0), store.token(pb, 1, 0)
    tokens = [t for t in maybe if t is not None]
    assert len(tokens) == 4 and big_token is not None and b_token is not None
    tail = store._slots_of(big_token[0], 1)[1]  # the 2nd slot of the order-1 page
    hits = a.stats.gets_hit
    bad = [
        [tokens[1][0], tokens[1][1] + 1],  # a generation it never had
        [tokens[2][0], 0],  # 0 is never a generation
        b_token,  # another guest's page
        big_token,  # a page of another pool
        [store.capacity_slots + 5, 1],  # past the store
    ]
    bad.append([tail, ma.gen[big_token[0]]])  # a tail slot with the head's generation
    heads, gens = zip(tokens[0], *bad, strict=True)
    assert store.touch_many(pa, list(heads), list(gens)) == 1
    assert a.stats.gets_hit == hits + 1 and pa.stats.gets_hit == 1
    # Page 0 is now the most recent of a's: of the next puts (one into the free slot), the
    # evictions take 1, 2 and 3.
    for i in range(4):
        assert put(store, pa, 2, i, page(20 + i))
    assert [present(store, pa, 1, i) for i in range(4)] == [True, False, False, False]
    assert store.touch_many(pa, [tokens[1][0]], [tokens[1][1]]) == 0  # evicted: ignored


def test_removing_a_mapped_guest_frees_its_mirror(make_store: MakeStore) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    mirror = store.map_guest(guest)
    assert put(store, store.new_pool(guest, persistent=True, order=1), 1, 0, page(1, 1))
    store.remove_guest(guest)
    assert guest.mirror is None and mirror.ident not in store._mirrors
    with pytest.raises(ValueError):
        mirror.mem.tobytes()  # released
    again = store.add_guest("g")
    fresh = store.map_guest(again)
    # Numbers are never reused: a slot still tagged with the old one names no live mirror.
    assert fresh.ident != mirror.ident and fresh.owned == 0
    assert put(store, store.new_pool(again, persistent=True, order=1), 1, 0, page(2, 1))
    assert fresh.owned == 2  # the slots the gone mirror held are this one's now


class MappedStoreModel(StoreModel):
    """The same random operations with two of the three guests mapped: every page reads the
    same through its mirror as through the store, and no mirror holds bytes of a slot in use
    by anyone else."""

    def __init__(self) -> None:
        super().__init__()
        for guest in self.guests[:2]:
            self.store.map_guest(guest)

    @invariant()
    def mapped_reads_see_the_stored_pages(self) -> None:
        for p, pool in enumerate(self.pools):
            mirror = pool.guest.mirror
            if mirror is None:
                continue
            for oid, pages in pool.objects.items():
                for index in pages:
                    token = self.store.token(pool, oid, index)
                    assert token is not None
                    if token[1]:  # 0: changed in place since its put
                        data = mapped_read(mirror, token, pool.order)
                        assert data == bytes(self.model[(p, oid, index)])

    @invariant()
    def no_mirror_holds_another_owners_slot(self) -> None:
        for pool in self.pools:
            for pages in pool.objects.values():
                for head in pages.values():
                    for slot in self.store._slots_of(head, pool.order):
                        for guest in self.guests:
                            mirror = guest.mirror
                            if mirror is None or guest is pool.guest:
                                continue
                            chunk = mirror.mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE]
                            assert not any(chunk), f"{guest.name}'s mirror holds slot {slot}"


MappedStoreModel.TestCase.settings = StoreModel.TestCase.settings
test_mapped_store_agrees_with_a_dict_model = MappedStoreModel.TestCase


@pytest.mark.parametrize("mapped", [False, True])
def test_a_smaller_budget_gives_the_memory_of_free_slots_back(
    make_store: MakeStore, mapped: bool
) -> None:
    store = make_store(8)
    guest = store.add_guest("g")
    if mapped:
        store.map_guest(guest)
    mem = store._mem_of(guest)
    pool = store.new_pool(guest, persistent=False, order=0)
    for i in range(8):
        assert put(store, pool, 1, i, page(i))
    slots = [store.page_slots(pool, 1, i) for i in range(8)]
    assert store.set_budget(3 * FRAME_SIZE) == 5
    for i, slot in enumerate(slots):
        assert slot is not None
        chunk = bytes(mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE])
        if i < 5:  # evicted: the slot's memory is gone
            assert chunk == bytes(FRAME_SIZE)
        else:
            assert chunk == page(i) and peek(store, pool, 1, i) == page(i)
    assert store.set_budget(8 * FRAME_SIZE) == 0
    for i in range(8, 13):
        assert put(store, pool, 1, i, page(i))  # the freed slots serve again
    assert all(peek(store, pool, 1, i) == page(i) for i in range(5, 13))


def test_a_mirror_that_cannot_be_made_is_a_store_error(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No address space or memfds left: the guest is not mapped (the server grants no map)."""

    def fail(*_: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    store = make_store(8)
    guest = store.add_guest("g")
    # the mirror's memfd (patched in os: compiled, tmemd's own module globals are bound)
    monkeypatch.setattr(os, "memfd_create", fail)
    with pytest.raises(StoreError, match="cannot make a mirror"):
        store.map_guest(guest)
    assert guest.mirror is None and not store._mirrors


# ------------------------------------------------------------------------ lent memory (§4.8)


class Clock:
    """A store clock the test moves (CLOCK_MONOTONIC nanoseconds)."""

    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns

    def wait(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


def lender(store: Store, name: str, **kwargs: Any) -> Guest:
    """A mapped guest with a loan file."""
    guest = store.add_guest(name, **kwargs)
    store.map_guest(guest)
    store.open_loan(guest)
    return guest


def loan_map(guest: Guest) -> mmap.mmap:
    """The guest's own read-write mapping of its loan file (as a client would map it)."""
    assert guest.loan is not None
    fd = guest.loan.writable_fd()
    try:
        return mmap.mmap(fd, guest.loan.size)
    finally:
        os.close(fd)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_lending_gives_free_memory_and_bills_it(clock: Clock) -> None:
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a = lender(store, "a")
    answer = store.lend(a, 10)
    assert answer == {"lent": 10, "low": 0, "seq": 0, "room": 6}
    assert a.lent_slots == 10 and a.held_slots == 10 and store.used_slots == 10
    assert a.mirror is not None and a.mirror.published() == [0, 10, 10]
    # Asking for less gives the rest back; the guest asked, so it is not a recall.
    answer = store.lend(a, 4)
    assert answer["lent"] == 4 and answer["low"] == 4 and store.used_slots == 4
    assert store.recalled_slots == 0
    store.close()


def test_a_busy_guest_gets_its_share_of_another_busy_guests_loan(clock: Clock) -> None:
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), lender(store, "b", weight=300)
    assert store.lend(a, 16)["lent"] == 16  # alone: all of it
    clock.wait(0.01)  # both busy: a's last LEND was 10 ms ago
    answer = store.lend(b, 16)
    assert answer["lent"] == 12  # its share by weight, 300 / (100 + 300), and no more
    assert a.lent_slots == 4  # a keeps its own share
    assert a.mirror is not None and a.mirror.published() == [2, 4, 4]  # a recall: seq went round
    assert store.recalled_slots == 12
    clock.wait(0.01)
    assert store.lend(a, 16)["lent"] == 4  # at its share: nothing from b's
    store.close()


def test_an_idle_guests_loan_goes_first_and_whole(clock: Clock) -> None:
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), lender(store, "b")
    store.lend(a, 16)
    mem = loan_map(a)
    mem[FRAME_SIZE : FRAME_SIZE + 5] = b"hello"  # slot 0 of a's loan
    clock.wait(store.lend_idle + 0.01)  # a leaves it unused
    assert store.lend(b, 16)["lent"] == 16
    assert a.lent_slots == 0
    assert mem[FRAME_SIZE : FRAME_SIZE + 5] == bytes(5)  # punched: a reads zeros now
    # a learns it at its next LEND: it had 0 slots at the least since its last ask.
    assert store.lend(a, 0) == {"lent": 0, "low": 0, "seq": 2, "room": 0}
    mem.close()
    store.close()


def test_a_guest_that_uses_its_loan_keeps_it(clock: Clock) -> None:
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), lender(store, "b")
    store.lend(a, 8)
    clock.wait(store.lend_idle * 3)
    assert a.loan is not None
    a.loan.mark_active(clock())  # the guest's own word: it used the memory just now
    assert store.lend(b, 16)["lent"] == 8  # the free half only
    assert a.lent_slots == 8
    store.close()


def test_a_put_takes_a_busy_loan_down_to_its_share_and_an_idle_one_whole(clock: Clock) -> None:
    store = Store(4 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), store.add_guest("b")
    pool = store.new_pool(b, persistent=False, order=0)
    store.lend(a, 4)
    for i in range(4):
        assert put(store, pool, 1, i, page(i))  # never refused: b evicts its own at its share
    assert a.lent_slots == 2 and pool.pages == 2  # equal weights: half each
    clock.wait(store.lend_idle + 0.01)  # a stops using its memory
    for i in range(4, 8):
        assert put(store, pool, 1, i, page(i))
    assert a.lent_slots == 0 and pool.pages == 4
    assert store.recalled_slots == 4
    store.close()


def test_lending_evicts_ephemeral_pages_never_persistent(clock: Clock) -> None:
    store = Store(8 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), store.add_guest("b")
    eph = store.new_pool(b, persistent=False, order=0)
    pers = store.new_pool(b, persistent=True, order=0)
    for i in range(4):
        assert put(store, eph, 1, i, page(i))
        assert put(store, pers, 1, i, page(10 + i))
    assert store.lend(a, 8)["lent"] == 4  # the ephemeral half, by the LRU
    assert eph.pages == 0 and pers.pages == 4
    assert store.lend(a, 8)["room"] == 0
    store.close()


def test_caps_and_budget_cover_lent_memory(clock: Clock) -> None:
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a = lender(store, "a", cap=6 * FRAME_SIZE)
    pool = store.new_pool(a, persistent=True, order=0)
    assert put(store, pool, 1, 0, page(0))
    assert store.lend(a, 16)["lent"] == 5  # cap 6, one slot holds a page
    store.set_cap(a, 3 * FRAME_SIZE)
    assert a.lent_slots == 2 and a.held_slots == 3
    store.set_cap(a, None)
    store.lend(a, 15)
    store.set_budget(8 * FRAME_SIZE)  # an administrator shrinks it: lent memory comes back
    assert store.used_slots == 8 and a.lent_slots == 7
    store.close()


def test_memory_written_beyond_the_loan_is_punched_at_the_next_ask(clock: Clock) -> None:
    store = Store(64 * FRAME_SIZE, now_ns=clock)
    a = lender(store, "a")
    store.lend(a, 2)
    mem = loan_map(a)
    for slot in range(2, 40):  # far beyond its 2 slots
        mem[(slot + 1) * FRAME_SIZE] = 1
    assert a.loan is not None and a.loan.resident() >= 38 * FRAME_SIZE
    store.lend(a, 2)
    assert a.loan.resident() <= 3 * FRAME_SIZE  # the header and its own 2 slots
    assert mem[3 * FRAME_SIZE] == 0
    mem.close()
    store.close()


def test_closing_a_loan_returns_its_memory(clock: Clock) -> None:
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a = lender(store, "a")
    store.lend(a, 16)
    with pytest.raises(StoreError, match="borrows memory already"):
        store.open_loan(a)
    store.remove_guest(a)
    assert store.used_slots == 0 and not store.lenders
    b = store.add_guest("b")
    with pytest.raises(StoreError, match="no mirror"):
        store.open_loan(b)
    store.close()


def test_a_guest_that_never_borrows_still_gets_its_share_for_puts(clock: Clock) -> None:
    store = Store(8 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), store.add_guest("b")
    pool = store.new_pool(b, persistent=False, order=0)
    assert store.lend(a, 8)["lent"] == 8  # all of it, and a stays busy
    for i in range(8):
        put(store, pool, 1, i, page(i))
    assert pool.pages == 4 and a.lent_slots == 4  # b's half by weight, a keeps its own
    store.close()


def test_a_frozen_guest_may_give_back_but_not_borrow_more(clock: Clock) -> None:
    store = Store(8 * FRAME_SIZE, now_ns=clock)
    a = lender(store, "a")
    store.lend(a, 2)
    a.frozen = True
    assert store.lend(a, 8)["lent"] == 2
    assert store.lend(a, 1)["lent"] == 1
    store.close()
