"""Arbitration policy: which ephemeral page goes when memory is needed. Pure; no I/O.

docs/design.md §3: a weighted global LRU. Each guest keeps its ephemeral pages in its own LRU list; the
victim is the head (least recently used page) of the list whose idle time on the logical clock,
divided by the guest's weight, is largest. With equal weights that is exactly one global LRU.

Cost: O(G) per eviction for G guests holding ephemeral pages (a scan of list heads, never of
pages); each put, get and flush is O(1) on the lists.

Memory that would only change hands. A mapped guest's pages live in its own file (PROTOCOL.md
§4.7), so taking another guest's page for it moves memory between files: the old owner's copy is
punched out and the new one faults in zeroed pages, about 55 us for 32 KiB against 4 us to
overwrite memory the guest already has. While the guests are all busy (uniform demand) the weighted
LRU takes pages of each from the others in turn, and most of its moves are undone a moment later.
So the guest that needs room (the *mover*) gives up its own oldest page instead when that page is
nearly as expendable as the victim's (its score at least ``1 - slack`` of the victim's) and the
victim is busy too (it touched a page in the last ``active`` ticks). Memory still follows demand:
an idle guest's pages go as before, and between busy guests the shares stay within ``slack`` of
the weighted LRU's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

DEFAULT_WEIGHT = 100
MAX_WEIGHT = 10_000
MOVE_SLACK = 0.125  # default ``slack`` of choose_victim for a mapped guest (tmemd's move_slack)
ACTIVE_TICKS_PER_GUEST = 16  # a guest touched a page this recently (x guests) is busy


class Account(Protocol):
    """What the policy needs to know of a guest."""

    @property
    def weight(self) -> int: ...

    @property
    def oldest_stamp(self) -> int | None:
        """Logical time of the guest's least recently used ephemeral page, None if it has none."""
        ...

    @property
    def newest_stamp(self) -> int | None:
        """Logical time of the guest's most recently used ephemeral page, None if it has none."""
        ...


A = TypeVar("A", bound=Account)


def choose_victim(
    accounts: Iterable[A],
    clock: int,
    *,
    mover: A | None = None,
    slack: float = 0.0,
    active: int = 0,
) -> A | None:
    """The account whose oldest ephemeral page has the largest idle time / weight.

    Ties go to the first account in iteration order. A weight of 0 never happens (validated at
    the edge) but would make its pages go first, as the most expendable. With a ``mover`` (the
    account that needs the room, for which another's page would move memory), the mover itself
    when its oldest page scores at least ``1 - slack`` of the victim's and the victim touched a
    page within the last ``active`` ticks (see the module docstring).
    """
    best: A | None = None
    best_score = -1.0
    for account in accounts:
        score = _score(account, clock)
        if score is not None and score > best_score:
            best, best_score = account, score
    if best is None or mover is None or mover is best or slack <= 0:
        return best
    own = _score(mover, clock)
    newest = best.newest_stamp
    busy = newest is not None and clock - newest < active
    return mover if busy and own is not None and own >= best_score * (1.0 - slack) else best


def _score(account: Account, clock: int) -> float | None:
    """Idle time of the account's oldest ephemeral page / its weight; None without one."""
    stamp = account.oldest_stamp
    if stamp is None:
        return None
    idle = clock - stamp + 1  # +1: a page touched this tick is still a candidate
    weight = account.weight
    return float("inf") if weight <= 0 else idle / weight


def validate_weight(weight: object) -> int:
    """A weight is an integer in 1..MAX_WEIGHT."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}, got {weight!r}")
    return weight
