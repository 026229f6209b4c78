"""Unit tests of the store's side of the trust boundary (tmemd/memfiles.py): what a guest writes
into the files it maps never changes a decision of the daemon's, memory it brings in on its own
is found and punched, a uid's cap holds across its names, and heavy work can be deferred without
ever letting a punch hit new data. No sockets, no daemon: the hostile guests of
tests/integration/test_hostile.py do the same over real connections."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import pytest
from test_store import Clock, lender, loan_map, page, put

from tmemclient.wire.layout import FRAME_SIZE
from tmemd import views
from tmemd.audit import OVERDRAW_CLOSE_SLOTS
from tmemd.config import ConfigError, GuestPolicy, Settings, load_config
from tmemd.deferred import BIG_PUNCH, REAP_INLINE
from tmemd.host import Host
from tmemd.lending import LOAN_SLACK_SLOTS
from tmemd.store import Store

MIB = 1 << 20


def writable(file_fd: int, size: int) -> mmap.mmap:
    """What a guest of tmemd's own uid can do with any descriptor it was handed: re-open it
    read-write through /proc/self/fd and map it."""
    fd = os.open(f"/proc/self/fd/{file_fd}", os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ words the daemon relies on


def test_control_words_written_by_the_guest_change_no_recall() -> None:
    clock = Clock()
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), lender(store, "b")
    assert store.lend(a, 16)["lent"] == 16
    mirror = a.mirror
    assert mirror is not None
    poison = writable(mirror.fd, mirror.size)
    ctl = memoryview(poison)[mirror.ctl_offset : mirror.ctl_offset + 24].cast("Q")
    ctl[0], ctl[1], ctl[2] = 2**64 - 1, 2**64 - 1, 7  # what the attacker wrote
    clock.wait(1)  # a's loan is idle now: b's LEND takes it back
    answer = store.lend(b, 8)
    assert answer["lent"] == 8 and a.lent_slots == 8
    # The daemon's own words went on from its own seq (one recall: +2), and are published.
    assert (mirror.seq, mirror.lent, mirror.low) == (2, 8, 8)
    assert list(ctl) == [2, 8, 8]
    store.close_loan(a)
    store.remove_guest(a)
    assert "a" not in store.guests and "a" not in store.lenders
    ctl.release()
    poison.close()
    store.close()


def test_generations_written_by_the_guest_are_never_trusted() -> None:
    store = Store(8 * FRAME_SIZE)
    g = store.add_guest("g")
    mirror = store.map_guest(g)
    pool = store.new_pool(g, persistent=False, order=0)
    (token,) = store.put_many(pool, [1], [0], [0], memoryview(page(1)), tokens=True)
    assert isinstance(token, list)
    head, gen = token
    poison = writable(mirror.fd, mirror.size)
    gens = memoryview(poison)[mirror.gen_offset : mirror.link_offset].cast("Q")
    gens[head] = 999  # the guest claims a generation it was never given
    assert store.token(pool, 1, 0) == [head, gen]  # the store answers from its own copy
    assert store.touch_many(pool, [head], [999]) == 0  # a forged token counts for nothing
    assert store.touch_many(pool, [head], [gen]) == 1
    gens.release()
    poison.close()
    store.close()


def test_files_handed_to_guests_are_mode_0400() -> None:
    store = Store(8 * FRAME_SIZE)
    g = lender(store, "g")
    assert g.mirror is not None and g.loan is not None
    for fd in (g.mirror.fd, g.loan.fd, store.arena.fd):
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o400
    store.close()


def test_an_active_word_from_the_future_only_keeps_a_loan_busy() -> None:
    clock = Clock()
    store = Store(16 * FRAME_SIZE, now_ns=clock)
    a, b = lender(store, "a"), lender(store, "b")
    assert store.lend(a, 16)["lent"] == 16
    mem = loan_map(a)
    memoryview(mem)[:8].cast("Q")[0] = 2**64 - 1
    assert a.loan is not None and a.loan.active_ns(clock()) == clock()  # clamped to now
    clock.wait(10)
    # Busy (it claims so): b still gets its share, half, and no more.
    assert store.lend(b, 16)["lent"] == 8 and a.lent_slots == 8
    mem.close()
    store.close()


# ------------------------------------------------------------------ memory a guest brings in


def test_the_audit_punches_a_loan_written_beyond_what_was_lent() -> None:
    store = Store(64 * FRAME_SIZE)
    g = lender(store, "g")
    assert store.lend(g, 4)["lent"] == 4
    mem = loan_map(g)
    assert not store.audit(g)  # nothing written: nothing found
    mem[FRAME_SIZE : FRAME_SIZE + 4 * FRAME_SIZE] = b"x" * (4 * FRAME_SIZE)  # its own: fine
    assert not store.audit(g)
    extra = LOAN_SLACK_SLOTS + 40
    start = (1 + 4) * FRAME_SIZE
    mem[start : start + extra * FRAME_SIZE] = b"y" * (extra * FRAME_SIZE)  # not lent
    found = store.audit(g)
    assert found.loan >= 40 and not found.close
    assert g.loan is not None
    assert g.loan.resident() <= (1 + 4) * FRAME_SIZE
    assert mem[FRAME_SIZE : 2 * FRAME_SIZE] == b"x" * FRAME_SIZE  # what is lent stays
    assert g.overdrawn == found.loan and store.overdrawn_slots == found.loan
    mem.close()
    store.close()


def test_the_audit_closes_a_guest_far_beyond_its_loan() -> None:
    store = Store(64 * FRAME_SIZE, capacity=8 * MIB)
    g = lender(store, "g")
    mem = loan_map(g)
    many = OVERDRAW_CLOSE_SLOTS + LOAN_SLACK_SLOTS + 64
    mem[FRAME_SIZE : (1 + many) * FRAME_SIZE] = b"z" * (many * FRAME_SIZE)
    found = store.audit(g)
    assert found.close and found.loan > OVERDRAW_CLOSE_SLOTS
    assert g.overdrawn == found.loan
    loan = g.loan
    assert loan is not None and loan.resident() >= many * FRAME_SIZE  # left for the close
    store.remove_guest(g)  # what closing its connection does: the file is punched whole
    assert loan.closed and store.lenders == {}
    mem.close()
    store.close()


def test_the_audit_punches_mirror_pages_the_guest_holds_nothing_in() -> None:
    store = Store(32 * FRAME_SIZE, capacity=4 * MIB)
    g = store.add_guest("g")
    mirror = store.map_guest(g)
    pool = store.new_pool(g, persistent=True, order=0)
    for i in range(8):
        assert put(store, pool, 1, i, page(i))
    assert not store.audit(g)
    # Reading holes through its read-only mapping makes the kernel allocate them.
    fd = mirror.read_only_fd()
    view = mmap.mmap(fd, mirror.size, prot=mmap.PROT_READ)
    os.close(fd)
    touched = sum(view[i * FRAME_SIZE] for i in range(100, 100 + 600))
    assert touched == 0
    found = store.audit(g)
    assert found.mirror > OVERDRAW_CLOSE_SLOTS and found.close
    for i in range(8):  # its own pages are all there
        head = store.page_slots(pool, 1, i)
        assert head is not None
        assert view[head * FRAME_SIZE : (head + 1) * FRAME_SIZE] == page(i)
    view.close()
    store.close()


def test_the_audit_punches_a_few_stray_mirror_pages_and_keeps_the_guest() -> None:
    store = Store(32 * FRAME_SIZE, capacity=4 * MIB)
    g = store.add_guest("g")
    mirror = store.map_guest(g)
    pool = store.new_pool(g, persistent=True, order=0)
    for i in range(8):
        assert put(store, pool, 1, i, page(i))
    fd = mirror.read_only_fd()
    view = mmap.mmap(fd, mirror.size, prot=mmap.PROT_READ)
    os.close(fd)
    assert sum(view[i * FRAME_SIZE] for i in range(100, 100 + 200)) == 0  # 200 stray pages
    found = store.audit(g)
    assert not found.close and found.mirror == 200
    assert mirror.resident() < 64 * FRAME_SIZE  # punched again
    for i in range(8):
        head = store.page_slots(pool, 1, i)
        assert head is not None
        assert view[head * FRAME_SIZE : (head + 1) * FRAME_SIZE] == page(i)
    view.close()
    store.close()


# ------------------------------------------------------------------ tenants (uids)


def test_a_uid_cap_holds_across_every_name_it_uses() -> None:
    store = Store(64 * FRAME_SIZE)
    tenant = store.tenant(1000)
    store.set_tenant_cap(tenant, 8 * FRAME_SIZE)
    listed = store.add_guest("vm1", tenant=tenant)
    renamed = store.add_guest("1000/evil", tenant=tenant)
    other = store.add_guest("2000/x", tenant=store.tenant(2000))
    p1 = store.new_pool(listed, persistent=True, order=0)
    p2 = store.new_pool(renamed, persistent=True, order=0)
    e2 = store.new_pool(renamed, persistent=False, order=0)
    assert all(put(store, p1, 1, i, page(i)) for i in range(4))
    assert all(put(store, p2, 1, i, page(i)) for i in range(3))
    assert put(store, e2, 1, 0, page(9))  # the 8th slot
    assert tenant.held_slots == 8
    # Full: a put under either name evicts the tenant's ephemeral page, then nothing fits.
    assert put(store, p2, 1, 3, page(3)) and renamed.eph_slots == 0
    assert store.evictions == 1 and tenant.held_slots == 8
    assert not put(store, p1, 1, 4, page(4)) and not put(store, e2, 1, 1, page(10))
    assert tenant.held_slots == 8
    po = store.new_pool(other, persistent=True, order=0)
    assert all(put(store, po, 1, i, page(i)) for i in range(20))  # other uids: unaffected
    store.close()


def test_lowering_a_uid_cap_evicts_its_guests_ephemeral_pages_only() -> None:
    store = Store(64 * FRAME_SIZE)
    tenant = store.tenant(7)
    a = store.add_guest("a", tenant=tenant)
    b = store.add_guest("b", tenant=tenant)
    pa = store.new_pool(a, persistent=True, order=0)
    eb = store.new_pool(b, persistent=False, order=0)
    assert all(put(store, pa, 1, i, page(i)) for i in range(4))
    assert all(put(store, eb, 1, i, page(i)) for i in range(6))
    assert store.set_tenant_cap(tenant, 5 * FRAME_SIZE) == 5  # down to the cap, oldest first
    assert a.pers_slots == 4 and b.eph_slots == 1 and tenant.held_slots == 5
    assert store.set_tenant_cap(tenant, 2 * FRAME_SIZE) == 1  # persistent pages always stay
    assert a.pers_slots == 4 and b.eph_slots == 0
    store.close()


def test_the_host_bills_each_new_account_to_its_uid(tmp_path: Path) -> None:
    config = tmp_path / "tmemd.toml"
    config.write_text(
        '[daemon]\nsocket = "/x/t.sock"\nuid_cap = "1MiB"\n'
        '[uids.1000]\ncap = "64KiB"\nmax_connections = 3\n'
        '[guests.vm1]\nuids = [1000]\ncap = "1MiB"\n'
    )
    settings = load_config(config)
    store = Store(4 * MIB)
    host = Host(store, settings)
    name, policy = host.guest_name(1000, "vm1")
    vm1 = host.attach(name, policy, uid=1000)
    evil = host.attach(*host.guest_name(1000, "evil"), uid=1000)
    stranger = host.attach(*host.guest_name(2000, "x"), uid=2000)
    assert vm1.tenant is evil.tenant is store.tenants[1000]
    assert vm1.tenant is not None and vm1.tenant.cap_slots == 16
    assert stranger.tenant is not None and stranger.tenant.cap_slots == 256  # uid_cap
    assert host.max_connections(1000, 256) == 3 and host.max_connections(2000, 256) == 256
    row = {r["uid"]: r for r in views.uids(host)}[1000]
    assert row["guests"] == ["1000/evil", "vm1"] and row["cap"] == 64 << 10
    changed = host.set_guest("uid:1000", cap=32 << 10)
    assert changed["cap"] == 32 << 10 and vm1.tenant.cap_slots == 8
    store.close()


@pytest.mark.parametrize(
    "table, needle",
    [
        ("[uids.alice]\ncap = 1", "a uid is a number"),
        ("[uids.1000]\ncap = -1", "must not be negative"),
        ("[uids.1000]\nmax_connections = 0", "max_connections must be"),
        ("[uids.1000]\nweight = 5", "unknown key 'weight'"),
    ],
)
def test_bad_uid_tables_are_refused_with_the_key_named(
    tmp_path: Path, table: str, needle: str
) -> None:
    config = tmp_path / "tmemd.toml"
    config.write_text(f'[daemon]\nsocket = "/x/t.sock"\n{table}\n')
    with pytest.raises(ConfigError, match=needle):
        load_config(config)


# ------------------------------------------------------------------ deferred heavy work


def test_a_big_pool_dies_at_once_and_frees_its_pages_in_steps() -> None:
    store = Store(4 * MIB, deferred=True)
    g = store.add_guest("g")
    other = store.add_guest("o")
    pool = store.new_pool(g, persistent=True, order=0)
    pages = REAP_INLINE * 3
    for i in range(pages):
        assert put(store, pool, 1, i, page(i % 7))
    assert store.destroy_pool(pool) == pages
    assert pool.dead and store.busy and store.used_slots == pages  # still freeing
    assert store.reap(REAP_INLINE) == REAP_INLINE and store.used_slots == pages - REAP_INLINE
    # A put that needs room takes the dying pages first, not a live guest's.
    store.set_budget(pages * FRAME_SIZE)
    eph = store.new_pool(other, persistent=False, order=0)
    assert put(store, eph, 1, 0, page(1)) and store.evictions == 0
    store.drain()
    assert not store.busy and store.used_slots == 1
    store.close()


def test_a_deferred_scrub_holds_its_slots_until_the_punch_ran() -> None:
    store = Store(4 * MIB, deferred=True)
    g = store.add_guest("g")
    pool = store.new_pool(g, persistent=True, order=0)
    n = BIG_PUNCH // FRAME_SIZE
    for i in range(n):
        assert put(store, pool, 1, i, page(i % 5))
    store.destroy_pool(pool)
    store.reap(1 << 30)  # bookkeeping done; the punch is queued
    later = store.later_work()
    assert later is not None and store.used_slots == n  # the slots are not free yet
    later.run()
    store.finish(later)
    assert store.used_slots == 0 and not store.busy
    assert store.arena.resident() == 0
    store.close()


def test_a_loan_grows_no_more_while_a_recall_punch_is_pending() -> None:
    clock = Clock()
    store = Store(8 * MIB, now_ns=clock, deferred=True)
    g = lender(store, "g")
    slots = 2 * BIG_PUNCH // FRAME_SIZE
    assert store.lend(g, slots)["lent"] == slots
    mem = loan_map(g)
    mem[FRAME_SIZE : (1 + slots) * FRAME_SIZE] = b"q" * (slots * FRAME_SIZE)
    assert store.lend(g, 0)["lent"] == 0  # gives it all back: a big punch, queued
    assert g.loan is not None and g.loan.pending == 1
    assert store.lend(g, 10)["lent"] == 0  # not while the punch may still hit the file
    later = store.later_work()
    assert later is not None
    later.run()
    store.finish(later)
    assert g.loan.pending == 0 and g.loan.resident() <= FRAME_SIZE
    assert store.lend(g, 10)["lent"] == 10
    mem.close()
    store.close()


def test_the_host_drops_an_account_even_when_leaving_a_shared_pool_fails() -> None:
    store = Store(MIB)
    host = Host(store, Settings(socket=Path("/x/t.sock"), budget=MIB))

    class Member:
        uid = 0

        def __init__(self, guest: object) -> None:
            self.guest = guest

        def detach_pool(self, pool: object) -> None:  # pragma: no cover - not revoked here
            pass

    guest = host.attach("g", GuestPolicy(), uid=0)
    member = Member(guest)
    host.join(member)  # type: ignore[arg-type]

    def broken(entry: object, who: object) -> None:
        raise RuntimeError("boom")

    host.grant(b"u" * 16, "g")
    host.open_shared(member, b"u" * 16, 0)  # type: ignore[arg-type]
    host._leave = broken  # type: ignore[method-assign, assignment]
    with pytest.raises(RuntimeError):
        host.detach(member)  # type: ignore[arg-type]
    assert "g" not in store.guests and "g" not in host.sessions
    store.close()
