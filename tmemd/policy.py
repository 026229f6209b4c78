"""Arbitration policy: which ephemeral page goes when memory is needed. Pure; no I/O.

DESIGN.md §3: a weighted global LRU. Each guest keeps its ephemeral pages in its own LRU list; the
victim is the head (least recently used page) of the list whose idle time on the logical clock,
divided by the guest's weight, is largest. With equal weights that is exactly one global LRU.

Cost: O(G) per eviction for G guests holding ephemeral pages (a scan of list heads, never of
pages); each put, get and flush is O(1) on the lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

DEFAULT_WEIGHT = 100
MAX_WEIGHT = 10_000


class Account(Protocol):
    """What the policy needs to know of a guest."""

    @property
    def weight(self) -> int: ...

    @property
    def oldest_stamp(self) -> int | None:
        """Logical time of the guest's least recently used ephemeral page, None if it has none."""
        ...


A = TypeVar("A", bound=Account)


def choose_victim(accounts: Iterable[A], clock: int) -> A | None:
    """The account whose oldest ephemeral page has the largest idle time / weight.

    Ties go to the first account in iteration order. A weight of 0 never happens (validated at
    the edge) but would make its pages go first, as the most expendable.
    """
    best: A | None = None
    best_score = -1.0
    for account in accounts:
        stamp = account.oldest_stamp
        if stamp is None:
            continue
        idle = clock - stamp + 1  # +1: a page touched this tick is still a candidate
        weight = account.weight
        score = float("inf") if weight <= 0 else idle / weight
        if score > best_score:
            best, best_score = account, score
    return best


def validate_weight(weight: object) -> int:
    """A weight is an integer in 1..MAX_WEIGHT."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}, got {weight!r}")
    return weight
