"""The requests a cache's plans make of its driver, one small frozen dataclass per kind.

The cache's logic is written as sans-I/O *plans*: generators that yield one request at a time to
a driver (``PageCache`` or ``AsyncPageCache``, drivers.py), which makes it against the pool and
sends the answer back in. Each request's docstring says what it is answered with. A driver
handles every kind here; anything else is a bug in a plan and raises (``unknown``).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Never, NoReturn, TypeAlias

from tmemclient.apps.cleancache.state import Key, Page
from tmemclient.core import OnAnswer


@dataclass(frozen=True, slots=True)
class Get:
    """Get these tmem pages (exclusively: a page returned leaves tmem). Answered with a list of
    the pages, None where tmem no longer holds one."""

    keys: list[Key]


@dataclass(frozen=True, slots=True)
class GetStart:
    """Send this get and go on (answered with None): the plan reads the file meanwhile, then
    collects the answer with ``GetWait`` for the same keys."""

    keys: list[Key]


@dataclass(frozen=True, slots=True)
class GetWait:
    """Collect the answer to ``GetStart``: answered with ``(pages, seconds)``, the pages as
    ``Get``'s and the round trip's time (None when not measured)."""

    keys: list[Key]


@dataclass(frozen=True, slots=True)
class Put:
    """Put these ``(oid, index, page)`` items. Answered with a flag per item, or None when the
    answers are not known yet (``Pool.put_many_nowait``): each is then handed to ``on_answer``,
    if any, as it comes."""

    items: list[tuple[int, int, Page]]
    on_answer: OnAnswer | None


@dataclass(frozen=True, slots=True)
class Answers:
    """Wait until every answer to puts sent without waiting is in (a mapped client's answers
    say where its pages went). Answered with nothing useful."""


@dataclass(frozen=True, slots=True)
class Lend:
    """Ask tmemd to lend ``nbytes`` in all (PROTOCOL.md §4.8). Answered with its reply
    (``lent``, ``room``, ...), or None when tmem is not there."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class Flush:
    """Drop these tmem pages. Answered with None."""

    keys: list[Key]


@dataclass(frozen=True, slots=True)
class FlushObject:
    """Drop every tmem page of object ``oid``. Answered with None."""

    oid: int


Request: TypeAlias = Get | GetStart | GetWait | Put | Answers | Lend | Flush | FlushObject
Plan: TypeAlias = Generator[Request, Any, Any]


def failed(request: Request) -> Any:
    """The answer a request gets when tmem is not there: every get misses, no put lands."""
    match request:
        case Get(keys):
            return [None] * len(keys)
        case GetWait(keys):
            return [None] * len(keys), None
        case Put(items):
            return [False] * len(items)
        case GetStart() | Answers() | Lend() | Flush() | FlushObject():
            return None
        case _:
            unknown(request)


def unknown(request: Never) -> NoReturn:
    """A request of no known kind: a plan's bug, an error rather than a guess (mypy checks that
    every ``match`` over ``Request`` that ends here has handled every kind)."""
    raise TypeError(f"not a page cache request: {request!r}")
