"""The two classic users of tmem, built on the guest library: a page cache that keeps its evicted
pages in an ephemeral pool (cleancache) and a swap store that keeps swapped-out pages in a
persistent pool in front of a swap file (frontswap)."""
