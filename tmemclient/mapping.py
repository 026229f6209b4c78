"""Reading one's own tmem pages with no round trip (PROTOCOL.md §4.7).

A guest that asks for it in HELLO gets, with the reply, a read-only descriptor of its *mirror*:
the daemon keeps every page billed to this guest there, at the page's slot numbers, with a
generation word per head slot (the daemon's clock when the put stored it; 0 while the slot holds
nothing of ours or is being rewritten) and a link from each slot of a bigger page to the next.
A PUT_MANY of such a guest answers each stored page with its ``[head, generation]`` token.

A mapped read checks the generation, copies the page, and checks the generation again: the page
is the one the token names only if both match (the daemon zeroes the word before it changes or
frees the slot, and a generation is never reused). That needs the loads to stay in order, as
they do on x86-64 (the rings need it too). The page stays in tmem: a mapped read is READ of the
whole page, not GET (not exclusive). The daemon sees it only when the pool reports it
(TOUCH_MANY, sent by the pool with its next no-wait put): then it counts as a get hit and the page
becomes recently used.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from tmemclient.errors import ProtocolError

SLOT = 4096

Token = tuple[int, int]  # (head slot, generation)


def token_of(result: Any) -> Token | None:
    """The token a PUT_MANY answer gives one page: None for a page refused (false), or a plain
    true (a connection without a mapping)."""
    if type(result) is list and len(result) == 2:
        return (result[0], result[1])
    return None


class Mapping:
    """The guest's read-only view of its mirror."""

    def __init__(self, fd: int, slots: int) -> None:
        self.slots = slots
        gen_offset = slots * SLOT
        link_offset = gen_offset + 8 * slots
        size = -(-(link_offset + 4 * slots) // SLOT) * SLOT
        if os.fstat(fd).st_size < size:
            raise ProtocolError(f"tmemd's page mirror is smaller than {slots} slots need")
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        view = memoryview(self._map)
        self._view = view
        self._mem = view[:gen_offset]
        self._gen = view[gen_offset:link_offset].cast("Q")
        self._link = view[link_offset : link_offset + 4 * slots].cast("I")
        self.reads = self.misses = 0

    def read(self, token: Token, order: int) -> bytes | None:
        """The page the token names, or None if tmem no longer holds it as it was put."""
        head, generation = token
        gen, slots = self._gen, self.slots
        if not 0 <= head < slots or gen[head] != generation:
            self.misses += 1
            return None
        mem = self._mem
        if not order:
            data = bytes(mem[head * SLOT : (head + 1) * SLOT])
        else:
            parts = []
            slot = head
            for _ in range(1 << order):
                if slot >= slots:  # a link read while the page was being replaced
                    self.misses += 1
                    return None
                parts.append(mem[slot * SLOT : (slot + 1) * SLOT])
                slot = self._link[slot]
            data = b"".join(parts)
        if gen[head] != generation:  # changed under us: what we copied may be torn
            self.misses += 1
            return None
        self.reads += 1
        return data

    def valid(self, token: Token) -> bool:
        """Does tmem still hold the page as the token names it (a moment ago)?"""
        head, generation = token
        return 0 <= head < self.slots and self._gen[head] == generation

    def close(self) -> None:
        """Unmap."""
        for view in (self._mem, self._gen, self._link, self._view):
            view.release()
        self._map.close()
