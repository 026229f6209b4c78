"""Unit tests of the state directory (tmemd/persist.py) in the test's own process: a Store and
Host journaling into real files, "killed" by simply opening the directory again without closing
anything (what a SIGKILL leaves is exactly what was written), then adopted into a new Store and
Host; and the checks that make a start adopt all or nothing."""

from __future__ import annotations

import contextlib
import json
import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmemclient.wire.layout import FRAME_SIZE
from tmemd.accounts import Guest, Pool
from tmemd.config import GuestPolicy, Limits, Settings
from tmemd.host import Host
from tmemd.persist import Found, StateDir, StateError, adopt, check_state_dir
from tmemd.store import Store, StoreError

PAGE = FRAME_SIZE
SLOTS = 256


def page(n: int, version: int = 0, size: int = PAGE) -> bytes:
    return random.Random(n * 7919 + version).randbytes(size)


class Member:
    def __init__(self, guest: Guest, uid: int = 1000) -> None:
        self.guest = guest
        self.uid = uid

    def detach_pool(self, pool: Pool) -> None:  # pragma: no cover
        raise AssertionError


_RUNNING: dict[Path, Run] = {}


class Run:
    """One daemon's life on a state directory: store, host, journal. Making the next one on
    the same directory first "kills" this one: its descriptors are closed, nothing else (what
    SIGKILL leaves: the files as they were written, and the directory's lock free)."""

    def __init__(self, path: Path, budget_slots: int = SLOTS) -> None:
        last = _RUNNING.pop(path, None)
        if last is not None:
            last.kill()
        _RUNNING[path] = self
        self.state = StateDir(path, SLOTS)
        arena, self.found = self.state.open()
        self.store = Store(budget_slots * PAGE, capacity=SLOTS * PAGE, arena=arena)
        self.store.journal = self.state
        settings = Settings(
            socket=Path("/x"), budget=budget_slots * PAGE, limits=Limits(reattach_seconds=60)
        )
        self.host = Host(self.store, settings)
        self.adoption = None
        if isinstance(self.found, Found):
            self.adoption = adopt(self.state, self.found, self.store, self.host)

    def kill(self) -> None:
        self.state.close_columns()  # (mmap holds a copy of the index's descriptor)
        for fd in (self.state.index_fd, self.state.log_fd, self.state.arena_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def member(self, name: str = "1000/vm", uid: int = 1000) -> Member:
        guest = self.host.attach(name, GuestPolicy(sessions=1024), uid=uid)
        m = Member(guest, uid)
        self.host.join(m)
        return m

    def pool(self, name: str = "swap", *, persistent: bool = True, order: int = 0) -> Pool:
        pool, _ = self.host.open_named(self.member(), name, persistent=persistent, order=order)
        return pool

    def read(self, pool: Pool, oid: int, index: int) -> bytes | None:
        buf = bytearray(pool.page_size)
        if not self.store.read(pool, oid, index, 0, memoryview(buf)):
            return None
        return bytes(buf)

    def reopen(self, name: str = "swap", *, persistent: bool = True, order: int = 0) -> Pool:
        pool, reopened = self.host.open_named(
            self.member(), name, persistent=persistent, order=order
        )
        assert reopened
        return pool


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path


def test_pages_of_named_pools_are_adopted_byte_exact(state_dir: Path) -> None:
    one = Run(state_dir)
    assert one.found == "no state yet"
    swap = one.pool()
    big = one.pool("big", order=2)
    warm = one.pool("warm", persistent=False)
    plain = one.store.new_pool(one.member("1000/x").guest, persistent=True, order=0)
    for i in range(40):
        assert one.store.put(swap, 1 << 100, i, memoryview(page(i)))
    for i in range(0, 40, 2):  # replaced: copy on write
        assert one.store.put(swap, 1 << 100, i, memoryview(page(i, 1)))
    for i in range(0, 40, 5):
        one.store.flush(swap, 1 << 100, i)
    for i in range(5):
        assert one.store.put(big, 3, i, memoryview(page(i, 2, 4 * PAGE)))
    for i in range(5):
        assert one.store.put(warm, 4, i, memoryview(page(i, 3)))
    assert one.store.put(plain, 5, 0, memoryview(page(0)))
    # "SIGKILL": nothing closed, nothing flushed; the next start reads the files.
    two = Run(state_dir)
    assert two.adoption is not None and two.adoption.pools == 3
    assert two.adoption.pages == 32 + 5 + 5
    swap2, big2, warm2 = (
        two.reopen(),
        two.reopen("big", order=2),
        two.reopen("warm", persistent=False),
    )
    for i in range(40):
        want = None if i % 5 == 0 else page(i, 1 if i % 2 == 0 else 0)
        assert two.read(swap2, 1 << 100, i) == want, i
    assert [two.read(big2, 3, i) for i in range(5)] == [page(i, 2, 4 * PAGE) for i in range(5)]
    assert [two.read(warm2, 4, i) for i in range(5)] == [page(i, 3) for i in range(5)]
    # Accounting is true: what is adopted is used and billed.
    assert two.store.used_slots == 32 + 5 * 4 + 5
    assert two.store.guests["1000/vm"].pers_slots == 32 + 20
    # New puts go to free slots, never over adopted ones.
    other = two.store.new_pool(two.member("1000/y").guest, persistent=True, order=0)
    for i in range(100):
        assert two.store.put(other, 9, i, memoryview(page(i, 9)))
    assert two.read(swap2, 1 << 100, 1) == page(1)
    assert [two.read(big2, 3, i) for i in range(5)] == [page(i, 2, 4 * PAGE) for i in range(5)]


def test_same_filled_pages_of_kept_pools_are_stored_raw_and_survive(state_dir: Path) -> None:
    """A state record names the slots of its page, so a kept named pool's pages are never
    packed (design.md §6.11): zero and repeated-word pages take a slot each, and come back;
    an unnamed pool beside it packs them as usual."""
    one = Run(state_dir)
    swap = one.pool()
    plain = one.store.new_pool(one.member("1000/x").guest, persistent=True, order=0)
    filled = [bytes(PAGE), b"\xab" * PAGE, (7).to_bytes(8, "little") * (PAGE // 8)]
    for i, data in enumerate(filled):
        assert one.store.put(swap, 1, i, memoryview(data))
        assert one.store.put(plain, 1, i, memoryview(data))
    assert one.store.guests["1000/vm"].pers_slots == len(filled)  # raw: a slot each
    assert one.store.guests["1000/x"].pers_slots == 1  # packed: one zspage for all three
    two = Run(state_dir)
    assert two.adoption is not None and two.adoption.pages == len(filled)
    again = two.reopen()
    assert [two.read(again, 1, i) for i in range(len(filled))] == filled


def test_an_interrupted_copy_on_write_keeps_the_newer_page(state_dir: Path) -> None:
    one = Run(state_dir)
    swap = one.pool()
    assert one.store.put(swap, 1, 7, memoryview(page(7)))
    old = one.store.page_slots(swap, 1, 7)
    assert old is not None
    saved = one.state.gen[old]
    assert one.store.put(swap, 1, 7, memoryview(page(7, 1)))
    one.state.gen[old] = saved  # killed before the old record was cleared
    two = Run(state_dir)
    assert two.adoption is not None and two.adoption.pages == 1
    assert two.read(two.reopen(), 1, 7) == page(7, 1)
    assert two.state.gen[old] == 0  # the superseded record is cleared


def test_a_put_killed_before_its_commit_is_absent(state_dir: Path) -> None:
    one = Run(state_dir)
    swap = one.pool()
    assert one.store.put(swap, 1, 1, memoryview(page(1)))
    assert one.store.put(swap, 1, 2, memoryview(page(2)))
    head = one.store.page_slots(swap, 1, 2)
    assert head is not None
    one.state.gen[head] = 0  # data and fields written, the commit not yet
    two = Run(state_dir)
    pool = two.reopen()
    assert two.read(pool, 1, 1) == page(1) and two.read(pool, 1, 2) is None


def test_destroyed_and_expired_pools_do_not_come_back(state_dir: Path) -> None:
    one = Run(state_dir)
    gone, kept = one.pool("gone"), one.pool("kept")
    assert one.store.put(gone, 1, 1, memoryview(page(1)))
    assert one.store.put(kept, 1, 1, memoryview(page(2)))
    one.host.destroyed(gone)
    one.store.destroy_pool(gone)
    two = Run(state_dir)
    assert two.adoption is not None and two.adoption.pools == 1
    two.host.clock = lambda: 1e12  # long after reattach_seconds
    assert two.host.expire_named() == 1
    three = Run(state_dir)
    assert three.adoption is not None and three.adoption.pools == 0 and three.adoption.pages == 0


def test_budget_below_adopted_keeps_persistent_and_drops_ephemeral(state_dir: Path) -> None:
    one = Run(state_dir)
    swap, warm = one.pool(), one.pool("warm", persistent=False)
    for i in range(10):
        assert one.store.put(swap, 1, i, memoryview(page(i)))
        assert one.store.put(warm, 1, i, memoryview(page(i)))
    two = Run(state_dir, budget_slots=8)
    assert two.store.used_slots == 10  # persistent pages kept whatever the budget
    assert two.reopen().pages == 10 and two.reopen("warm", persistent=False).pages == 0
    swap2 = two.host.named.of(two.store.guests["1000/vm"].pools.copy().pop())
    assert swap2 is not None
    other = two.store.new_pool(two.member("1000/z").guest, persistent=True, order=0)
    assert not two.store.put(other, 1, 1, memoryview(page(1)))  # refused until they fit


def _log_line(record: dict[str, object]) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return body + b"\t" + f"{zlib.crc32(body):08x}".encode() + b"\n"


def test_a_torn_last_log_line_is_ignored_and_a_damaged_one_discards_everything(
    state_dir: Path,
) -> None:
    one = Run(state_dir)
    assert one.store.put(one.pool(), 1, 1, memoryview(page(1)))
    with (state_dir / "pools").open("ab") as log:
        log.write(_log_line({"op": "new", "key": 9})[:-9])  # cut short by the kill
    two = Run(state_dir)
    assert two.adoption is not None and two.adoption.pages == 1
    with (state_dir / "pools").open("ab") as log:
        log.write(b"garbage\n" + _log_line({"op": "del", "key": 5}))
    three = Run(state_dir)
    assert three.found == "line 2 of the pools log is damaged"
    assert three.store.used_slots == 0 and not three.host.named.kept("1000/vm")
    four = Run(state_dir)  # the files were wiped: nothing, and nothing damaged, is left
    assert four.found == Found() or isinstance(four.found, Found)
    assert four.adoption is not None and four.adoption.pages == 0


def test_a_corrupt_chain_discards_everything(state_dir: Path) -> None:
    one = Run(state_dir)
    big = one.pool("big", order=1)
    assert one.store.put(big, 1, 1, memoryview(page(1, 0, 2 * PAGE)))
    head = one.store.page_slots(big, 1, 1)
    assert head is not None
    one.state.next[head] = head  # loops
    two = Run(state_dir)
    assert isinstance(two.found, str) and "its chain" in two.found
    assert two.store.used_slots == 0


def test_state_for_another_capacity_is_not_adopted(state_dir: Path) -> None:
    one = Run(state_dir)
    assert one.store.put(one.pool(), 1, 1, memoryview(page(1)))
    one.kill()
    other = StateDir(state_dir, SLOTS * 2)
    _, found = other.open()
    assert isinstance(found, str) and "start with the same" in found


def test_unsafe_state_directories_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(0o775)
    with pytest.raises(StateError, match="chmod 0700"):
        check_state_dir(path)
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(StateError, match="not a directory"):
        check_state_dir(file)
    made = tmp_path / "new"
    check_state_dir(made)
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        os.chown(made, 1234, 1234)
        with pytest.raises(StateError, match="belongs to uid 1234"):
            check_state_dir(made)


def test_one_tmemd_per_state_directory(state_dir: Path) -> None:
    one = Run(state_dir)
    with pytest.raises(StateError, match="another tmemd uses state directory"):
        StateDir(state_dir, SLOTS)
    one.kill()  # the lock goes with the descriptor: with a killed process too
    StateDir(state_dir, SLOTS).close()


def test_a_guest_with_kept_pools_is_not_mapped(state_dir: Path) -> None:
    one = Run(state_dir)
    pool = one.pool()
    with pytest.raises(StoreError, match="kept in the state"):
        one.store.map_guest(pool.guest)
