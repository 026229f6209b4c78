"""CPU per request, each side apart, counted in instructions (callgrind), not seconds.

    python -m bench.opcost [--ops 5000] [--only get,put,put_many,get_many,ping]

For each operation it runs, under ``valgrind --tool=callgrind``, a program that does it
``--ops`` times and the same program doing it 0 times, and reports the difference per op:

  daemon   what tmemd's Session spends serving one request frame (decode, check, store,
           encode the reply): the frames are made once, then served over and over;
  client   what the guest library spends on one call (argument checks, staging, the request
           frame, matching the reply), against a daemon stubbed to answer at once; the
           stub's own instructions (measured alone on the frames the call sent) taken off.

No sockets and no scheduler: the floor each side pays per request, whatever the wakeups cost.
Instruction counts are deterministic (the same binary and input give the same count, whatever
else the machine does), so before/after comparisons need no medians. valgrind is installed by
``apt-get install -y valgrind`` when missing (root) or named in the error.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

OPS = ("get", "put", "put_many", "get_many", "ping")
PAGE = 4096
BATCH = 64


def _session() -> tuple[Any, Any, int]:
    """A daemon Session on a fresh store, with one persistent pool; and the pool's handle."""
    from tmemd.config import GuestPolicy, Settings
    from tmemd.config import Limits as DaemonLimits
    from tmemd.host import Host
    from tmemd.session import Session
    from tmemd.store import Store

    store = Store(64 << 20)
    host = Host(store, Settings(socket=Path("/nonexistent"), budget=64 << 20))
    # Pages of random bytes: a zero page would be packed (same-filled, docs/design.md §6.11),
    # a different path from the pages a guest usually puts.
    region = memoryview(bytearray(random.Random(1).randbytes(256 * PAGE)))
    session = Session(host, host.attach("bench", GuestPolicy()), region, DaemonLimits())
    host.join(session)
    session.handle([1, 1, 0x01000001, None])  # NEW_POOL, persistent, 4 KiB pages
    (handle,) = session.pools
    return session, store, handle


def daemon_side(op: str, n: int) -> None:
    """Serve ``n`` request frames of ``op`` (decoded, as the connection hands them on)."""
    from tmemclient.wire.codec import FrameDecoder, encode_frame
    from tmemclient.wire.messages import Op

    PUT, GET, PUT_MANY, PING = int(Op.PUT), int(Op.GET), int(Op.PUT_MANY), int(Op.PING)
    GET_MANY = int(Op.GET_MANY)
    session, _store, handle = _session()
    for i in range(BATCH):  # pages to get
        session.handle([PUT, 2, handle, 1, i, 0])
    requests = {
        "get": [GET, 7, handle, 1, 3, 0],
        "put": [PUT, 7, handle, 1, 3, 0],
        "put_many": [PUT_MANY, 7, handle, [x for i in range(BATCH) for x in (1, i, i)]],
        "get_many": [GET_MANY, 7, handle, [x for i in range(BATCH) for x in (1, i, i)]],
        "ping": [PING, 7],
    }
    frame = encode_frame(requests[op])
    decoder = FrameDecoder(1 << 20)
    handle_message = session.handle
    for _ in range(n):
        decoder.feed(frame)
        handle_message(decoder.next_message())


def client_side(op: str, n: int, stub_only: bool = False) -> None:
    """``n`` calls of ``op`` on a sync client whose daemon answers at once (a stub, in C as
    far as it can be: msgpack does the work). With ``stub_only``, the stub's part alone: it
    answers, ``n`` times, the frames one call sent (subtracted from the client's count)."""
    import msgpack

    from tmemclient.client import Client
    from tmemclient.region import create_region
    from tmemclient.wire.codec import HEADER
    from tmemclient.wire.messages import Limits, Op

    frames = 256
    _fd, region = create_region(frames)
    wire = Limits(1, "bench", frames, 1 << 20, 4096, 64, 0)
    results: dict[int, Any] = {int(Op.NEW_POOL): [77, PAGE], int(Op.PUT): True, int(Op.GET): True}
    packer = msgpack.Packer()

    class Stub:
        """A socket whose peer answers every request at once (OK, with the op's result)."""

        def __init__(self) -> None:
            self.replies = bytearray()
            self.sent: list[bytes] = []

        def sendall(self, data: bytes) -> None:
            self.sent.append(data)
            pos = 0
            while pos < len(data):
                (length,) = HEADER.unpack_from(data, pos)
                m = msgpack.unpackb(data[pos + 4 : pos + 4 + length])
                pos += 4 + length
                op = m[0]
                many = op in (Op.PUT_MANY, Op.GET_MANY)
                result = [True] * (len(m[3]) // 3) if many else results.get(op)
                body = packer.pack([m[1], 0, result])
                self.replies += HEADER.pack(len(body)) + body

        def recv_into(self, buf: bytearray) -> int:
            k = len(self.replies)
            buf[:k] = self.replies
            self.replies.clear()
            return k

        def close(self) -> None:
            pass

    stub = Stub()
    client = Client(stub, region, wire)  # type: ignore[arg-type]
    pool = client.new_pool(persistent=True)
    page = random.Random(2).randbytes(PAGE)  # not same-filled (see _session)
    items = [(1, i, page) for i in range(BATCH)]
    keys = [(1, i) for i in range(BATCH)]
    calls = {
        "get": lambda: pool.get(1, 3),
        "put": lambda: pool.put(1, 3, page),
        "put_many": lambda: pool.put_many(items),
        "get_many": lambda: pool.get_many(keys),
        "ping": client.ping,
    }
    call = calls[op]
    if stub_only:
        stub.sent.clear()
        call()
        sent, buf = list(stub.sent), bytearray(1 << 20)
        for _ in range(n):
            for data in sent:
                stub.sendall(data)
            stub.recv_into(buf)
        return
    for _ in range(n):
        call()


def _valgrind() -> str:
    found = shutil.which("valgrind")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench.opcost: installing valgrind (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "valgrind"], check=True)
        found = shutil.which("valgrind")
    if not found:
        raise SystemExit("bench.opcost needs valgrind: apt-get install -y valgrind (Debian/Ubuntu)")
    return found


def instructions(side: str, op: str, n: int) -> int:
    """Instructions (Ir) of a child running ``side``'s ``op`` ``n`` times, under callgrind."""
    valgrind = _valgrind()
    with tempfile.TemporaryDirectory(prefix="tmem-opcost-") as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.opcost",
                "--child",
                side,
                op,
                str(n),
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        if proc.returncode:
            raise SystemExit(f"callgrind run failed:\n{proc.stderr[-2000:]}")
        match = re.search(r"^summary:\s+(\d+)", out.read_text(), re.M)
        if match is None:
            raise SystemExit("no summary in callgrind's output")
        return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    """Print instructions per op, each side."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", type=int, default=5000, help="calls per measurement")
    p.add_argument("--only", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        side, op, n = args.child
        if side == "daemon":
            daemon_side(op, int(n))
        else:
            client_side(op, int(n), stub_only=side == "stub")
        return 0
    ops = [o for o in args.only.split(",") if o]
    print(f"{'op':<10} {'daemon':>12} {'client':>12}   (instructions per call, {args.ops} calls)")
    for op in ops:
        cost = {}
        for side in ("daemon", "client", "stub"):
            base = instructions(side, op, 0)
            full = instructions(side, op, args.ops)
            cost[side] = (full - base) / args.ops
            print(f"  {op} {side}: {cost[side]:,.0f}", file=sys.stderr, flush=True)
        client = cost["client"] - cost["stub"]
        print(f"{op:<10} {cost['daemon']:>12,.0f} {client:>12,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
