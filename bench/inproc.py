"""The CPU cost of one request on each side, in one process: no sockets, no scheduler.

    python -m bench.inproc [--ops 20000] [--profile]

A sync ``Client`` on rings and a daemon ``Session`` share one region (two mappings of one memfd,
as across processes); where the client would wait for its reply, the daemon side serves its ring
on the spot. What is left is the Python cost of a put, a get and a ping on both sides together:
the floor under any round trip, whatever the wakeups cost. Medians of 5 runs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tmemclient.client import Client
from tmemclient.region import create_region
from tmemclient.wire import layout, ring
from tmemclient.wire.codec import FrameDecoder
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Limits
from tmemd.config import GuestPolicy, Settings
from tmemd.config import Limits as DaemonLimits
from tmemd.host import Host
from tmemd.region import map_region
from tmemd.session import Session
from tmemd.store import Store

FRAMES = 256
RING = 16


def pair() -> tuple[Client, Any]:
    """A client and a function that serves the daemon's side of its ring once."""
    fd, region = create_region(FRAMES, layout.ring_bytes(RING))
    daemon_region = map_region(fd, FRAMES, 1 << 16, extra=layout.ring_bytes(RING))
    view = memoryview(daemon_region)
    store = Store(64 << 20)
    host = Host(store, Settings(socket=Path("/nonexistent"), budget=64 << 20))
    limits = DaemonLimits()
    session = Session(
        host, host.attach("bench", GuestPolicy()), view[: FRAMES * FRAME_SIZE], limits
    )
    host.join(session)
    rings = ring.Rings(view[FRAMES * FRAME_SIZE :], RING, "host")
    decoder = FrameDecoder(limits.max_frame)
    wire = Limits(1, "bench", FRAMES, limits.max_frame, limits.max_batch, limits.max_pools, RING)

    class _NoSocket:
        def sendall(self, data: bytes) -> None:
            raise AssertionError("nothing may take the socket here")

        def close(self) -> None:
            pass

    client = Client(_NoSocket(), region, wire)  # type: ignore[arg-type]

    def serve(_rings: ring.Rings | None = None) -> bool:
        decoder.feed(rings.take())
        for message in decoder.messages():
            reply = session.handle(message)
            assert isinstance(reply, bytes)  # single-page requests are never served in slices
            assert rings.write(reply)
        return True

    client._spin_for_reply = serve  # type: ignore[method-assign,assignment]
    client._gate.open = lambda: True  # type: ignore[method-assign]  # however busy the machine
    return client, serve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--profile", action="store_true", help="cProfile the put loop")
    args = p.parse_args()
    if not ring.supported():
        raise SystemExit("rings need x86-64")
    client, _ = pair()
    pool = client.new_pool(persistent=True)
    page = bytes(range(256)) * 16
    for i in range(1000):
        pool.put(1, i, page)
    ops: dict[str, Callable[[int], object]] = {
        "ping": lambda i: client.ping(),
        "put": lambda i: pool.put(1, i % 1000, page),
        "get": lambda i: pool.get(1, i % 1000),
    }
    for name, op in ops.items():
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(args.ops):
                op(i)
            runs.append((time.perf_counter() - start) / args.ops)
        print(f"{name:5} {statistics.median(runs) * 1e6:6.2f} us per op (client + daemon)")
    if args.profile:
        cProfile.runctx(
            "for i in range(n): put(i)", {}, {"n": args.ops, "put": ops["put"]}, "/tmp/inproc.prof"
        )
        pstats.Stats("/tmp/inproc.prof").sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
