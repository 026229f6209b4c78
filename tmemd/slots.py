"""Where pages' memory is: slots of 4 KiB, allocated from a free stack (warm memory first) or
fresh, each in the arena or a mapped guest's mirror (``_owner``), moved between files by punching
the old one; copying pages in and out across a page's slots; and each guest's LRU list of
ephemeral pages, linked through per-slot arrays."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Final

from mypy_extensions import trait

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemd.accounts import NIL, Guest, Pool, StoreError
from tmemd.deferred import runs
from tmemd.state import StoreState

_GROW: Final = 4096  # metadata arrays grow by this many slots at a time


@trait
class Slots(StoreState):
    """The store's slots and LRU lists (module docstring)."""

    def _release(self, slots: list[int]) -> None:
        self.used_slots -= len(slots)
        self._free.extend(slots)

    def _scrub(self, slots: list[int]) -> None:
        """Zero and give back to the kernel, wherever the slots' memory is (arena or a
        mirror), coalescing adjacent slots; then free the slots. A large scrub (deferred) keeps
        the slots in use until its punch is done, so nothing new can be written under it."""
        if not slots:
            return
        by_file: dict[int, list[int]] = {}
        for slot in slots:
            by_file.setdefault(self._owner[slot], []).append(slot)
        pending = [len(by_file)]

        def release() -> None:
            pending[0] -= 1
            if not pending[0]:
                self._release(slots)

        for owner, owned in by_file.items():
            file = self.arena if not owner else self._mirrors.get(owner)
            if file is None:  # that mirror is closed: its whole file was punched
                release()
                continue
            self._punch_later(file, runs(owned), release)

    def _give_back(self, held: list[tuple[int, int]]) -> None:
        """Free the memory of (owner, slot) pairs now: in the arena, or punched out of a
        mirror's file."""
        by_owner: dict[int, list[int]] = {}
        for owner, slot in held:
            by_owner.setdefault(owner, []).append(slot)
        for owner, slots in by_owner.items():
            file = self.arena if not owner else self._mirrors.get(owner)
            if file is not None:  # else: that mirror is closed and all its memory gone
                for start, length in runs(slots):
                    self._count_punch(file.punch(start, length))

    def _alloc(self, need: int, order: int, owner: int) -> int:
        slots = [self._alloc_slot() for _ in range(need)]
        self.used_slots += need
        owners = self._owner
        moved = [(owners[slot], slot) for slot in slots if owners[slot] != owner]
        if moved:
            # The slots' memory is in another file (or the arena): free it there, so the
            # memory of all files stays that of the slots in use.
            mirrors = self._mirrors
            for old, slot in moved:
                if old:
                    self.moved_slots += 1
                    was = mirrors.get(old)
                    if was is not None:
                        was.owned -= 1
                owners[slot] = owner
            if owner:
                self._mirrors[owner].owned += len(moved)
            self._give_back(moved)
        if order:
            self._tails[slots[0]] = array("i", slots[1:])  # 4 bytes a slot, no int objects
        return slots[0]

    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._fresh
        if slot >= self.capacity_slots:  # pragma: no cover - used_slots <= budget <= capacity
            raise StoreError("arena exhausted")
        self._fresh += 1
        if slot >= len(self._index):
            self._grow_slots(min(_GROW, self.capacity_slots - len(self._index)))
        return slot

    def _grow_slots(self, grow: int) -> None:
        """Every per-slot array, ``grow`` slots longer."""
        self._pool.extend([None] * grow)
        self._oid.extend([0] * grow)
        self._index.extend([0] * grow)
        self._prev.extend([NIL] * grow)
        self._next.extend([NIL] * grow)
        self._stamp.extend([0] * grow)
        if self._mirrors:  # only mapped guests' pages have generations (map_guest)
            self._gen.extend([0] * grow)
        self._owner.extend([0] * grow)

    def _mem_of(self, guest: Guest) -> memoryview:
        """Where the guest's pages live: its mirror, or the arena."""
        return self._mem if guest.mirror is None else guest.mirror.mem

    def _slots_of(self, head: int, order: int) -> tuple[int, ...]:
        return (head, *self._tails[head]) if order else (head,)

    def _copy_in(self, mem: memoryview, head: int, order: int, src: memoryview) -> None:
        if not order:
            off = head << FRAME_SHIFT
            mem[off : off + FRAME_SIZE] = src
            return
        for i, slot in enumerate(self._slots_of(head, order)):
            off = slot << FRAME_SHIFT
            mem[off : off + FRAME_SIZE] = src[i << FRAME_SHIFT : (i + 1) << FRAME_SHIFT]

    def _copy_out(self, mem: memoryview, head: int, order: int, dst: memoryview) -> None:
        if not order:
            off = head << FRAME_SHIFT
            dst[:] = mem[off : off + FRAME_SIZE]
            return
        for i, slot in enumerate(self._slots_of(head, order)):
            off = slot << FRAME_SHIFT
            dst[i << FRAME_SHIFT : (i + 1) << FRAME_SHIFT] = mem[off : off + FRAME_SIZE]

    def _spans(
        self, pool: Pool, head: int, offset: int, length: int
    ) -> Iterator[tuple[int, memoryview]]:
        """(position in the caller's buffer, arena view) for a byte range of a page."""
        mem = self._mem_of(pool.guest)
        slots = self._slots_of(head, pool.order)
        pos = 0
        while pos < length:
            page_off = offset + pos
            slot = slots[page_off >> FRAME_SHIFT]
            in_slot = page_off & (FRAME_SIZE - 1)
            n = min(FRAME_SIZE - in_slot, length - pos)
            base = (slot << FRAME_SHIFT) + in_slot
            yield pos, mem[base : base + n]
            pos += n

    def _lru_append(self, guest: Guest, slot: int) -> None:
        self._stamp[slot] = self.clock
        tail = guest.lru_tail
        self._prev[slot] = tail
        self._next[slot] = NIL
        if tail == NIL:
            guest.lru_head = slot
        else:
            self._next[tail] = slot
        guest.lru_tail = slot

    def _lru_unlink(self, guest: Guest, slot: int) -> None:
        prev, nxt = self._prev[slot], self._next[slot]
        if prev == NIL:
            guest.lru_head = nxt
        else:
            self._next[prev] = nxt
        if nxt == NIL:
            guest.lru_tail = prev
        else:
            self._prev[nxt] = prev

    def _touch(self, guest: Guest, slot: int) -> None:
        if guest.lru_tail != slot:
            self._lru_unlink(guest, slot)
            self._lru_append(guest, slot)
        else:
            self._stamp[slot] = self.clock
