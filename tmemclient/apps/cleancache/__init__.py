"""The page cache: a process's own cache of file pages in front of tmem (see core.py)."""

from tmemclient.apps.cleancache.core import AsyncPageCache, CachedFile, PageCache, object_id

__all__ = ["AsyncPageCache", "CachedFile", "PageCache", "object_id"]
