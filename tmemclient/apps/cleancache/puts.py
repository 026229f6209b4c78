"""Puts: evicted blocks offered to tmem, in batches, and what their answers teach.

A clean block that leaves the local LRU is offered to an ephemeral pool, gathered in batches of
``put_batch`` pages sent without waiting for the answer (``put_many_nowait``). In tmem a block is
stored as pages of the pool's page size (4096 << order, at most the block): a block read in part
costs tmem only the pool pages that hold something, so a pool of 4 KiB pages stores exactly the
pages the block held (with 32 KiB pool pages, random reads leave blocks two-thirds full and a
third of tmem holds zeros), at the price of more pages per request for the client and the daemon
to handle. The cache remembers which file pages each tmem page carried (the shadow, shadow.py).
While tmem is under pressure (it dropped our pages before we came back: a lookup hit rate below
90%), a tmem page is put only if it carries at least ``DENSE`` of its size, so the shared memory
goes to the pages that bring the most file pages back.

A mapped client (``map_pages``) learns from each put's answer where the page went; a block read
through the mapping and evicted unchanged is still in tmem, and is not put again.
"""

from __future__ import annotations

import time
from typing import Any

from tmemclient.apps.cleancache.requests import Plan, Put
from tmemclient.apps.cleancache.shadow import _Shadow
from tmemclient.apps.cleancache.state import Key, Page
from tmemclient.core import OnAnswer
from tmemclient.mapping import Token, token_of

DENSE = 0.75  # under pressure, a tmem page is put only if it carries this much of its size


class _Puts(_Shadow):
    """Sending the put batch, and keeping the shadow true to the answers."""

    def _dense_pages(self) -> int:
        """Pages a tmem page must carry to be put. Any while tmem keeps what we put (a lookup
        hit rate of 90% or more); under pressure, at least ``DENSE`` of it: tmem's memory then
        goes to the pages that bring the most file pages back."""
        if self._costs.hit_rate >= 0.9:
            return 0
        return int(self.part_pages * DENSE)

    def _put_pending(self, *, force: bool) -> Plan:
        """Send the put batch, once it holds a batch's worth of pages (now, with ``force``)."""
        if not self._pending or (not force and self._pending_pages < self._batch_pages()):
            return
        batch = list(self._pending.items())
        self._pending.clear()
        self._pending_pages = 0
        if not self.tmem:
            return
        zero, pp, parts = self._zero, self.part_pages, self._parts
        dense = self._dense_pages()
        full = (1 << pp) - 1
        items: list[tuple[int, int, Page]] = []
        masks: list[int] = []
        dropped = put = 0
        shadow, mapping = self._shadow, self._mapping
        for (oid, b), block in batch:
            if parts == 1:  # the block is one tmem page
                if mapping is not None and self._still_held(shadow.get((oid, b)), block.mask):
                    self.stats.puts_skipped += 1
                    continue
                if block.held < dense:
                    dropped += 1
                    continue
                put += block.held
                items.append((oid, b, b"".join([x or zero for x in block.pages])))
                masks.append(block.mask)
                continue
            for p in range(parts):
                mask = block.mask >> p * pp & full
                if not mask:
                    continue  # only the pages held go to tmem: no memory spent on holes
                if mapping is not None and self._still_held(shadow.get((oid, b * parts + p)), mask):
                    self.stats.puts_skipped += 1
                    continue
                held = mask.bit_count()
                if held < dense:
                    dropped += 1
                    continue
                put += held
                group = block.pages[p * pp : (p + 1) * pp]
                one = group[0]
                data = one if pp == 1 and one is not None else b"".join([x or zero for x in group])
                items.append((oid, b * parts + p, data))
                masks.append(mask)
        self.stats.sparse_dropped += dropped
        self.stats.pages_put += put
        if not items:
            return
        # Every page goes into the shadow before the put is sent: a trio client may hand us
        # its answer (where the page went) before the send returns.
        shadow = self._shadow
        seqs: list[int] = []
        for n, (oid, index, _) in enumerate(items):
            key = (oid, index)
            shadow.pop(key, None)
            self._ghost.pop(key, None)
            self._seq += 1
            shadow[key] = (self._seq, masks[n], None)
            seqs.append(self._seq)
        on_answer = None
        if mapping is not None:
            on_answer = self._answered([(oid, index) for oid, index, _ in items], seqs)
        started = time.perf_counter()
        flags = yield Put(items, on_answer)
        took = time.perf_counter() - started
        self.stats.tmem_seconds += took
        self.stats.put_seconds += took
        self.stats.put_batches += 1
        self.stats.puts += len(items)
        if flags is not None:  # answered now: a page refused is not in tmem
            for n, (oid, index, _) in enumerate(items):
                if flags[n]:
                    continue
                entry = shadow.get((oid, index))
                if entry is not None and entry[0] == seqs[n]:
                    del shadow[(oid, index)]
                self.stats.puts_refused += 1
                self._outcome(hit=False)
        limit = self.shadow_limit // self.sample if self.sampling else self.shadow_limit
        while len(shadow) > limit:  # not wanted while this many newer blocks were put: a scan
            shadow.popitem(last=False)
            self._outcome(hit=False)

    def _still_held(self, entry: tuple[int, int, Token | None] | None, mask: int) -> bool:
        """Does tmem still hold, as the shadow entry says, every page of ``mask``?"""
        if entry is None or entry[2] is None or mask & ~entry[1]:
            return False
        assert self._mapping is not None
        return self._mapping.valid(entry[2])

    def _answered(self, keys: list[Key], seqs: list[int]) -> OnAnswer:
        """What to do with the answer to a put sent without waiting: remember where a mapped
        guest's pages were put; forget the pages tmem refused."""

        def answered(first: int, results: Any) -> None:
            if results is None:
                return
            shadow = self._shadow
            for n, result in enumerate(results[: len(keys) - first], first):
                key = keys[n]
                entry = shadow.get(key)
                if entry is None or entry[0] != seqs[n]:
                    continue  # put again since, or forgotten
                if not result:
                    del shadow[key]  # refused: a lookup would miss
                elif (token := token_of(result)) is not None:
                    shadow[key] = (entry[0], entry[1], token)

        return answered
