"""The fetcher: a helper thread that makes a sync cache's lookup while the cache reads the file.

With ``overlap``, when a read needs pages from both tmem and the file, the sync cache reads the
file while the lookup is on its way (as a kernel would have both I/Os in flight), so the round
trip costs only what the file reads do not cover. Off by default: on a busy 2-core machine the
thread's handoffs and its wait for the answer cost the guest more than they hide. The trio cache
does not overlap.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from tmemclient.apps.cleancache.state import Key
from tmemclient.pool import Pool


class _Fetcher:
    """A thread that makes one ``get_many`` at a time for a cache, so that the cache can read the
    file while the answer is on its way (a kernel would have both I/Os in flight at once). The
    pool's client is used by this thread only between ``start`` and ``wait``, and by the cache
    only outside that window: one user at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._requests: queue.SimpleQueue[list[Key] | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[Any, float | None, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="tmem-get", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (keys := self._requests.get()) is not None:
            started = time.perf_counter()
            try:
                found = self._pool.get_many(keys)
            except BaseException as exc:  # handed to the cache's thread, raised there
                self._answers.put((None, None, exc))
            else:
                self._answers.put((found, time.perf_counter() - started, None))

    def start(self, keys: list[Key]) -> None:
        """Send the get (from the thread)."""
        if self.busy:  # an answer nobody collected (an interrupted wait): not ours to use
            with contextlib.suppress(Exception):
                self.wait()
        self.busy = True
        self._requests.put(keys)

    def wait(self) -> tuple[list[bytes | None], float | None]:
        """The get's answer and how long its round trip took."""
        found, took, exc = self._answers.get()
        self.busy = False
        if exc is not None:
            raise exc
        return found, took

    def stop(self) -> None:
        """End the thread."""
        self._requests.put(None)
        self._thread.join(timeout=10)
