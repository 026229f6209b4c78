"""Cleancache: a file page cache for a guest process, with tmem as its second chance.

    with tmemclient.connect(path, name="vm1") as client:
        cache = PageCache(client.new_pool(), capacity=1024, block_pages=8)   # 1024 local pages
        f = cache.open("data.bin")
        cache.read(f, offset, length)

The cache holds up to ``capacity`` 4 KiB file pages in blocks of consecutive pages, in a local
LRU. A clean block that leaves the LRU is put to an ephemeral pool; a local miss asks the pool
before the file, for the pages the cache put and believes still there, when asking pays. When tmem
keeps little of what is put, the cache backs off to a sample; with ``borrow`` it also borrows
memory from tmemd to extend its own. If the daemon goes away the cache carries on with its local
pages and the file.

One concept per module, in reading order:

- ``state``: the settings, checked; the counters (``CacheStats``); the state every layer shares.
- ``costs``: what a file read and a lookup cost, and how often a lookup finds pages.
- ``shadow``: which pages we put and believe still in tmem; back-off when tmem keeps little.
- ``blocks``: the local LRU of blocks, pages in our own memory or in lent memory.
- ``lent``: borrowing memory from tmemd, and giving up what it takes back.
- ``puts``: evicted blocks put to tmem in batches, and what their answers say.
- ``coherency``: files and object ids; what a change to a file makes the cache forget.
- ``core``: the read path, and ``_CacheCore``, which the layers above stack into.
- ``requests``: the typed requests the logic (plans) makes of a driver.
- ``drivers``: ``PageCache`` (sync) and ``AsyncPageCache`` (trio) run the plans against a pool.
- ``fetcher``: the sync cache's helper thread, for a lookup made while the file is read.
"""

from tmemclient.apps.cleancache.coherency import CachedFile, object_id
from tmemclient.apps.cleancache.drivers import AsyncPageCache, PageCache
from tmemclient.apps.cleancache.puts import DENSE
from tmemclient.apps.cleancache.requests import Plan, Request
from tmemclient.apps.cleancache.state import (
    ASK_MAX,
    ASK_MIN,
    PAGE,
    CacheStats,
    DiskRead,
    DiskReadInto,
    Key,
    Page,
)

__all__ = [
    "ASK_MAX",
    "ASK_MIN",
    "DENSE",
    "PAGE",
    "AsyncPageCache",
    "CacheStats",
    "CachedFile",
    "DiskRead",
    "DiskReadInto",
    "Key",
    "Page",
    "PageCache",
    "Plan",
    "Request",
    "object_id",
]
