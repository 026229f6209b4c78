"""Shadow and back-off: which tmem pages are worth asking for, and whether tmem is worth using.

The shadow. Asking tmem costs a round trip even when it misses, so the cache asks only for tmem
pages it has put and believes still there: it keeps a *shadow* of its puts in put order. The
daemon evicts a guest's ephemeral pages least recently used first and a get removes the page, so
our pages leave tmem in the order we put them: when a lookup misses, every page put before it is
gone too and leaves the shadow (for the *ghost*: put once, dropped by tmem). A page never put (a
cold miss) goes straight to the file. A lookup is made only when it pays (costs.py).

Back-off. Each tmem page put has an outcome once it is wanted again: tmem returns it (a hit; a
page read ahead counts when it is read), or it does not have it any more (a miss); a page not
wanted while ``shadow_limit`` newer pages were put (8 times the capacity) counts as a miss too (a
scan). A lookup skipped for its cost is no outcome: it says what a round trip costs now, not
whether tmem keeps what we put. When the hit rate of a ``window`` of outcomes (``window`` blocks'
worth) stays near zero (below 1 in 8, two windows in a row), the cache *samples*: only blocks of a
fixed 1 in ``sample`` subset (by hash of the block) are put and looked up, in batches and a
reserve 1/``sample`` the size, so tmem traffic falls to 1/sample while the sample keeps measuring;
at 1 in 4 again it goes back to full use. Outcomes, not recent misses, are judged, so a cold start
(puts whose pages are not wanted yet) is not mistaken for waste.
"""

from __future__ import annotations

from tmemclient.apps.cleancache.state import Key, _CacheState


class _Shadow(_CacheState):
    """The shadow of our puts, the judging of their outcomes and the back-off it decides."""

    def _trim_through(self, key: Key) -> None:
        """``key`` was evicted from tmem: so was everything we put before it."""
        entry = self._shadow.pop(key, None)
        if entry is None:
            return
        shadow, ghost = self._shadow, self._ghost
        while shadow:
            old, old_entry = shadow.popitem(last=False)
            if old_entry[0] > entry[0]:
                shadow[old] = old_entry
                shadow.move_to_end(old, last=False)
                break
            ghost[old] = None
        while len(ghost) > self.shadow_limit:
            ghost.popitem(last=False)

    def _batch_pages(self) -> int:
        """Pages gathered before a put: fewer while sampling, as fewer blocks go to tmem."""
        if self.sampling:
            return max(self.block_pages, self.put_batch // self.sample)
        return self.put_batch

    def _eligible(self, key: Key, *, block: bool = False) -> bool:
        """Is this tmem page (or block) in the sample? Whole blocks are in or out."""
        if not self.sampling:
            return True
        oid, index = key
        return hash((oid, index if block else index // self._parts)) % self.sample == 0

    def _worth_asking(self, pages: int, hidden: int) -> bool:
        """Would asking for these pages save more file reading than the lookup costs? The
        lookup's time is hidden behind ``hidden`` page reads made meanwhile."""
        costs = self._costs
        disk, lookup = costs.disk.value, costs.lookup.value
        if (
            disk is None
            or lookup is None
            or pages * costs.hit_rate * disk >= lookup - hidden * disk
        ):
            return True
        self._skipped += 1
        return self._skipped % 4 == 0  # now and then, to keep measuring

    def _outcome(self, *, hit: bool) -> None:
        """A put block's fate is known; judge the window when it is full."""
        if hit:
            self._hits += 1
        else:
            self._misses += 1
        seen = self._hits + self._misses
        window = self.window * self._parts  # a window is ``window`` blocks' worth
        if seen < (window // 4 if self.sampling else window):
            return
        rate = self._hits / seen
        self._hits = self._misses = 0
        if not self.sampling:
            self._bad_windows = self._bad_windows + 1 if rate < 1 / 8 else 0
            if self._bad_windows >= 2:
                self._bad_windows = 0
                self.sampling = True
                self.stats.backoffs += 1
                # Only the sample is put and looked up from now on; forget the rest unjudged.
                for key in [k for k in self._pending if not self._eligible(k, block=True)]:
                    self._pending_pages -= self._pending.pop(key).held
                for key in [k for k in self._shadow if not self._eligible(k)]:
                    del self._shadow[key]
                self._ghost.clear()
        elif rate >= 1 / 4:
            self.sampling = False
            self.stats.resumes += 1
