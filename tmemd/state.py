"""What every part of the store shares: its state, set by ``Store.__init__``, and (for the
type checker only) the methods one part calls in another. The store is one class made of parts,
each in its own module: the pages and their index (store.py), packed pages (packing.py),
mapped guests (mirroring.py), where their memory is (slots.py),
the budget and caps (budget.py), lent memory (lending.py), the audit of guests' files
(audit.py) and the work done off the event loop (deferred.py)."""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from mypy_extensions import trait

from tmemd.accounts import NIL, Guest, Pool, Tenant
from tmemd.memfiles import MemFile, Mirror

if TYPE_CHECKING:
    from tmemd.deferred import Later


@trait
class StoreState:
    """The attributes of a Store (see ``Store.__init__`` for what each means)."""

    move_slack: float
    lend_idle: float
    now_ns: Callable[[], int]
    deferred: bool
    capacity_slots: int
    budget_slots: int
    arena: MemFile
    _mem: memoryview
    used_slots: int
    clock: int
    guests: dict[str, Guest]
    tenants: dict[int, Tenant]
    _next_pool_id: int
    _free: array[int]
    _fresh: int
    _pool: list[Pool | None]
    _oid: list[int]
    _index: array[int]
    _prev: array[int]
    _next: array[int]
    _stamp: array[int]
    _gen: array[int]
    _tails: dict[int, array[int]]
    _owner: array[int]
    _mirrors: dict[int, Mirror]
    _next_ident: int
    _index_ints: list[int]
    evictions: int
    moved_slots: int
    lenders: dict[str, Guest]
    recalled_slots: int
    punch_failures: int
    overdrawn_slots: int
    _dying: deque[Pool]
    _later: deque[Later]
    _put_head: int

    # Defined in another part (store.py, slots.py, ...), which comes before this one in the
    # Store's method resolution order; declared here so each part can call them.

    def _close_file(self, file: MemFile) -> None:
        raise NotImplementedError

    def _count_punch(self, ok: bool) -> None:
        raise NotImplementedError

    def _evict(self, head: int) -> None:
        raise NotImplementedError

    def _make_room(
        self,
        guest: Guest,
        need: int,
        persistent: bool,
        found: Callable[[], bool] | None = None,
    ) -> bool:
        raise NotImplementedError

    def _put_raw(
        self,
        pool: Pool,
        oid: int,
        index: int,
        src: memoryview,
        force: bool = False,
        old: int = NIL,
    ) -> bool:
        raise NotImplementedError

    def _remove(self, pool: Pool, oid: int, index: int) -> list[int]:
        raise NotImplementedError

    def _give_back(self, held: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def _punch_later(
        self,
        file: MemFile,
        ranges: list[tuple[int, int]],
        done: Callable[[], None] | None,
        cost: int | None = None,
    ) -> None:
        raise NotImplementedError

    def _reap_for(self, short: Callable[[], int]) -> None:
        raise NotImplementedError

    def _recall(self, guest: Guest, keep: int, *, asked: bool = False, punch: bool = True) -> None:
        raise NotImplementedError

    def _recall_idle(self, short: Callable[[], int], now: int, keep: Guest | None) -> bool:
        raise NotImplementedError

    def _scrub(self, slots: list[int]) -> None:
        raise NotImplementedError

    def _unlink(self, pool: Pool, head: int) -> list[int]:
        raise NotImplementedError

    def reap(self, max_pages: int) -> int:
        raise NotImplementedError

    def _lookup(self, pool: Pool, oid: int, index: int) -> int:
        raise NotImplementedError

    def _touch(self, guest: Guest, slot: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _count_gets(pool: Pool, n: int, hits: int) -> None:
        raise NotImplementedError
