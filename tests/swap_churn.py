"""What the swap store tests share: pages that differ by number and version, and a churn of
writes and reads through SwappedMemory with what was last written to each page."""

from __future__ import annotations

import random

from tmemclient.apps.frontswap import SwappedMemory

PAGE = 4096


def page(n: int, version: int = 0) -> bytes:
    """The content of guest page ``n`` at ``version``: no two are alike."""
    return random.Random(n * 1000 + version).randbytes(PAGE)


def churn(memory: SwappedMemory, pages: int, rounds: int, seed: int = 1) -> dict[int, int]:
    """Write every page, then read and rewrite random runs of them; the versions written."""
    rng = random.Random(seed)
    versions = {}
    for n in range(pages):
        memory.write(n, page(n))
        versions[n] = 0
    for _ in range(rounds):
        first = rng.randrange(pages - 4)
        run = list(range(first, first + 4))
        for n, data in zip(run, memory.read_many(run), strict=True):
            assert data == page(n, versions[n])
        if rng.random() < 0.3:
            for n in run:
                versions[n] += 1
            memory.write_many([(n, page(n, versions[n])) for n in run])
    return versions


def all_read_back(memory: SwappedMemory, versions: dict[int, int]) -> bool:
    """Every page holds what was last written to it."""
    return all(memory.read(n) == page(n, v) for n, v in versions.items())
