"""The swap store (tmemclient.apps.frontswap) with no tmem at all: its swap file alone keeps
every page, and bad arguments are refused before anything is stored. With a real tmemd:
tests/integration/test_frontswap.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from swap_churn import all_read_back, churn, page

from tmemclient import InvalidArgument
from tmemclient.apps.frontswap import SwappedMemory, SwapStore


def test_a_swap_file_alone_keeps_every_page(tmp_path: Path) -> None:
    with SwapStore(None, tmp_path / "swap", batch=8) as store:
        memory = SwappedMemory(store, ram_pages=8)
        versions = churn(memory, 64, 200)
        assert all_read_back(memory, versions)
        assert store.stats.swap_reads > 0 and store.stats.tmem_gets == 0


def test_bad_arguments_are_refused() -> None:
    with SwapStore(None) as store:
        with pytest.raises(InvalidArgument):
            store.store(0, b"short")
        with pytest.raises(InvalidArgument):
            store.store(-1, page(0))
        with pytest.raises(InvalidArgument):
            SwappedMemory(store, ram_pages=4).read_many(list(range(5)))
        assert 0 not in store  # nothing was stored
