"""Arbitration, administration and identity against a real tmemd with real guest processes.

Each guest here is its own process: an *agent* (the script ``AGENT`` below, run with the venv's
python) that holds tmemclient connections and pools and obeys one JSON command per line on stdin,
answering one JSON line on stdout. The test process is the administrator: it talks to the
daemon's admin socket (in a 0700 directory under tmp_path) with ``AdminClient``.

Everything is bounded: each agent command has a deadline, every loop has a fixed count, and
every process started here is stopped at teardown. No assertion depends on timing; the
fairness figures are deterministic because one agent drives the competing connections in a
fixed alternation, so the daemon sees the same sequence of operations on every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon

import tmemclient.wire.errors as errors
from tmemclient.wire.errors import (
    GuestConflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    UnknownPool,
)
from tmemclient.wire.messages import Status
from tmemd.ctl.client import AdminClient

PAGE = 4096
MiB = 1 << 20
UID = os.getuid()
STRANGER = 65534 if UID != 65534 else 65533  # a uid that is neither root nor ours
CALL_TIMEOUT = 30.0

# ----------------------------------------------------------------------------- guest agent

AGENT = r"""
import json, struct, sys
import tmemclient
import tmemclient.client
from tmemclient.wire.errors import TmemError

PATH = sys.argv[1]
clients = {}
pools = {}
counters = {}

def page(seed, oid, index):
    return struct.pack("<QQQQ", seed, oid, index, 0x7E3A9C51) * 128

def op_connect(conn, name, frames=256):
    clients[conn] = tmemclient.connect(PATH, name=name, frames=frames, timeout=10.0)
    return clients[conn].name

def op_close(conn):
    clients.pop(conn).close()

def op_new_pool(conn, pool, persistent=False, shared=False, uuid=None):
    pools[pool] = clients[conn].new_pool(persistent=persistent, shared=shared, uuid=uuid)
    return pools[pool].handle

def op_alias(conn, pool, of):
    # A handle made by another connection, presented on this one.
    info = pools[of].info
    pools[pool] = tmemclient.client.Pool(
        clients[conn],
        type(info)(info.handle, info.page_size, info.persistent, info.shared, info.uuid),
    )
    return info.handle

def op_destroy(pool):
    pools.pop(pool).destroy()

def op_put(pool, start, count, seed=0, oid=1):
    items = [(oid, i, page(seed, oid, i)) for i in range(start, start + count)]
    return pools[pool].put_many(items)

def op_get(pool, start, count, seed=0, oid=1):
    got = pools[pool].get_many([(oid, i) for i in range(start, start + count)])
    hits = [g is not None for g in got]
    exact = [g == page(seed, oid, start + k) for k, g in enumerate(got)]
    return {"hits": sum(hits), "exact": sum(exact), "hit_list": hits}

def op_churn(pools_, rounds, batch, seed=0):
    # Fresh pages into each pool in turn, `rounds` times: equal, interleaved pressure.
    stored = {p: 0 for p in pools_}
    for _ in range(rounds):
        for p in pools_:
            n = counters.get(p, 0)
            counters[p] = n + batch
            ok = pools[p].put_many([(9, i, page(seed, 9, i)) for i in range(n, n + batch)])
            stored[p] += sum(ok)
    return stored

for line in sys.stdin:
    req = json.loads(line)
    try:
        result = globals()["op_" + req["op"]](**req["args"])
        reply = {"ok": result}
    except TmemError as exc:
        reply = {"error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:
        reply = {"error": "crash", "message": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply), flush=True)
for c in clients.values():
    c.close()
"""


class AgentError(AssertionError):
    """The agent failed in a way that is not a tmem error."""


class Agent:
    """One guest process; ``call`` runs a command in it and returns its result or raises the
    tmem error it raised."""

    def __init__(self, socket_path: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT, str(socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self._buf = b""

    def send(self, op: str, **args: Any) -> None:
        """Start a command without waiting for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = CALL_TIMEOUT) -> Any:
        """The answer to the oldest command sent."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"agent gave no answer within {timeout}s: {self.stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise AgentError(f"agent exited: {self.stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            cls = getattr(errors, reply["error"], None)
            if isinstance(cls, type) and issubclass(cls, errors.TmemError):
                raise cls(reply["message"])
            raise AgentError(reply["message"])
        return reply["ok"]

    def call(self, op: str, **args: Any) -> Any:
        """Run one command in the agent."""
        self.send(op, **args)
        return self.recv()

    def stderr(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: the guest vanishes without closing anything."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """EOF on stdin (the agent closes its connections), then SIGKILL after a bounded wait."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._log.close()


class Bed:
    """A tmemd with an admin socket, the admin connection and the agents of one test."""

    def __init__(self, daemon: Daemon, admin_path: Path, tmp_path: Path) -> None:
        self.daemon = daemon
        self.admin_path = admin_path
        self.tmp_path = tmp_path
        self.agents: list[Agent] = []
        self._admin: AdminClient | None = None

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self.admin_path)
        return self._admin

    def agent(self) -> Agent:
        a = Agent(self.daemon.socket, self.tmp_path / f"agent{len(self.agents)}.log")
        self.agents.append(a)
        return a

    def guests(self) -> dict[str, dict[str, Any]]:
        """Admin ``guests``, by name."""
        return {row["name"]: row for row in self.admin.call("guests")}

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.admin.call("status")
        return result

    def wait_gone(self, name: str, tries: int = 500) -> None:
        """Poll (bounded) until the daemon has dropped guest ``name``'s account."""
        for _ in range(tries):
            if name not in self.guests():
                return
            time.sleep(0.01)
        raise AssertionError(f"guest {name!r} still listed: {self.guests().get(name)}")

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        if self._admin is not None:
            self._admin.close()


@pytest.fixture
def bed(start_daemon: Any, tmp_path: Path) -> Iterator[Any]:
    """``bed(memory="8MiB", config=None)`` starts tmemd with an admin socket in a 0700
    directory (and ``config`` as a TOML file); all of it is stopped at teardown."""
    beds: list[Bed] = []

    def start(memory: str = "8MiB", config: str | None = None) -> Bed:
        n = len(beds)
        admin_dir = tmp_path / f"adm{n}"
        admin_dir.mkdir(mode=0o700)
        args = ["--memory", memory, "--admin-socket", str(admin_dir / "admin.sock")]
        if config is not None:
            path = tmp_path / f"tmemd{n}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        b = Bed(start_daemon(*args, name=f"d{n}"), admin_dir / "admin.sock", tmp_path)
        # tmemd binds its admin socket before its guest socket, which the start waited for.
        assert b.admin_path.exists(), "the guest socket took connections before the admin one"
        beds.append(b)
        return b

    yield start
    for b in beds:
        b.close()
        assert b.daemon.alive, f"tmemd died during the test:\n{b.daemon.log_text()}"


def guest_table(name: str, **keys: Any) -> str:
    """A [guests.NAME] table for our own uid."""
    lines = [f"[guests.{name}]", f"uids = [{keys.pop('uids', UID)}]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 1. fairness


@pytest.mark.parametrize(
    "weights",
    [(300, 100), (100, 100), (300, 200, 100)],
    ids=["3to1", "1to1", "3to2to1"],
)
def test_fair(bed: Any, weights: tuple[int, ...]) -> None:
    """Under equal, continuous pressure on a full 8 MiB budget, ephemeral holdings settle in
    proportion to the weights (docs/design.md §3). Tolerance: each ratio within ±10% of the ratio
    of the weights."""
    names = [f"g{i}" for i in range(len(weights))]
    b = bed("8MiB", "".join(guest_table(n, weight=w) for n, w in zip(names, weights, strict=True)))
    budget_pages = 8 * MiB // PAGE
    agent = b.agent()
    for n in names:
        agent.call("connect", conn=n, name=n)
        agent.call("new_pool", conn=n, pool=n)
    # Five budgets' worth of fresh pages in all, 16 per guest per round, in a fixed rotation.
    # (Bigger bursts skew the snapshot toward whoever put last: with 64-page bursts 3:2:1
    # reads 2.66:1.83:1.)
    rounds = 5 * budget_pages // (16 * len(names))
    stored = agent.call("churn", pools_=names, rounds=rounds, batch=16)
    assert all(stored[n] == rounds * 16 for n in names), stored  # eviction makes room: no refusal
    rows = b.guests()
    held = [rows[n]["ephemeral_bytes"] for n in names]
    assert sum(held) == 8 * MiB, held  # the budget is used whole
    last = held[-1]
    for n, h, w in zip(names, held, weights, strict=True):
        ratio = h / last
        want = w / weights[-1]
        print(
            f"\nfairness weights={weights}: {n} (weight {w}) holds {h // PAGE} pages; "
            f"ratio to {names[-1]} = {ratio:.3f} (ideal {want:.3f}, tolerance ±10%)"
        )
        assert abs(ratio - want) <= 0.10 * want, (weights, held)
    assert rows[names[-1]]["evictions"] > 0


# ----------------------------------------------------------------------------- 2. demand


def test_quiet_guest_yields_memory(bed: Any) -> None:
    """Memory follows demand: the pages of a guest that went quiet age out while a busy guest
    takes the whole budget."""
    b = bed("8MiB")
    budget_pages = 8 * MiB // PAGE
    quiet, busy = b.agent(), b.agent()
    qname = quiet.call("connect", conn="q", name="quiet")
    bname = busy.call("connect", conn="b", name="busy")
    assert (qname, bname) == (f"{UID}/quiet", f"{UID}/busy")
    quiet.call("new_pool", conn="q", pool="p")
    busy.call("new_pool", conn="b", pool="p")
    assert all(quiet.call("put", pool="p", start=0, count=budget_pages, seed=1))
    assert b.guests()[qname]["ephemeral_bytes"] == 8 * MiB
    # The busy guest puts a budget's worth, in bounded rounds; nobody refuses it anything.
    for r in range(budget_pages // 256):
        assert all(busy.call("put", pool="p", start=r * 256, count=256, seed=2))
    rows = b.guests()
    print(
        f"\nquiet guest holds {rows[qname]['ephemeral_bytes']} bytes, "
        f"busy guest {rows[bname]['ephemeral_bytes']} bytes"
    )
    assert rows[qname]["ephemeral_bytes"] == 0
    assert rows[qname]["evictions"] == budget_pages
    assert rows[bname]["ephemeral_bytes"] == 8 * MiB
    assert rows[bname]["evictions"] == 0
    assert quiet.call("get", pool="p", start=0, count=64, seed=1)["hits"] == 0
    got = busy.call("get", pool="p", start=0, count=64, seed=2)
    assert got["exact"] == 64


# ----------------------------------------------------------------------------- 3. caps


def test_caps_hold(bed: Any) -> None:
    """A cap set at run time bounds what a guest holds, lowering it evicts at once, and a
    persistent put past it is refused while the persistent pages under it stay."""
    b = bed("8MiB")
    a, other = b.agent(), b.agent()
    name = a.call("connect", conn="a", name="capped")
    oname = other.call("connect", conn="o", name="other")
    a.call("new_pool", conn="a", pool="e")
    other.call("new_pool", conn="o", pool="e")
    assert all(other.call("put", pool="e", start=0, count=256, seed=5))

    cap = 1 * MiB
    row = b.admin.call("set", guest=name, cap=cap)
    assert row["cap"] == cap
    most = 0
    for r in range(12):  # 12 x 64 pages = 3 x the cap
        assert all(a.call("put", pool="e", start=r * 64, count=64, seed=6))  # own oldest go
        g = b.guests()[name]
        held = g["ephemeral_bytes"] + g["persistent_bytes"]
        most = max(most, held)
        assert held <= cap, (r, g)
    assert most == cap
    assert b.guests()[name]["evictions"] == 768 - 256
    # The newest cap-worth is what stayed.
    assert a.call("get", pool="e", start=768 - 256, count=256, seed=6)["exact"] == 256
    assert all(a.call("put", pool="e", start=0, count=256, seed=6))
    # Nobody else paid for the capped guest.
    assert (b.guests()[oname]["ephemeral_bytes"], b.guests()[oname]["evictions"]) == (MiB, 0)
    assert other.call("get", pool="e", start=0, count=256, seed=5)["exact"] == 256

    # Lowering the cap evicts down to it at once.
    row = b.admin.call("set", guest=name, cap=cap // 2)
    assert row["evicted"] == 128
    assert b.guests()[name]["ephemeral_bytes"] == cap // 2

    # Persistent pages: up to the cap they are stored (evicting the guest's own ephemeral
    # pages); past it the put is refused; those under it stay.
    a.call("new_pool", conn="a", pool="p", persistent=True)
    results = a.call("put", pool="p", start=0, count=160, seed=7)
    assert results == [True] * 128 + [False] * 32
    g = b.guests()[name]
    assert (g["persistent_bytes"], g["ephemeral_bytes"]) == (cap // 2, 0)
    assert a.call("put", pool="e", start=1000, count=1, seed=6) == [False]
    got = a.call("get", pool="p", start=0, count=160, seed=7)
    assert got["exact"] == 128 and got["hit_list"] == [True] * 128 + [False] * 32
    # Lifting the cap lets puts through again.
    b.admin.call("set", guest=name, cap=None)
    assert all(a.call("put", pool="p", start=128, count=32, seed=7))
    assert all(a.call("put", pool="e", start=1000, count=64, seed=6))


# ----------------------------------------------------------------------------- 4. persistence


def test_persistent_pages_survive_every_admin_action(bed: Any) -> None:
    """Flush, a budget below persistent usage, a cap below it, freeze/thaw and grant/revoke
    never drop a persistent page; once the budget grows back, puts work again."""
    b = bed("8MiB")
    a, other = b.agent(), b.agent()
    name = a.call("connect", conn="a", name="keeper")
    other.call("connect", conn="o", name="bystander")
    a.call("new_pool", conn="a", pool="p", persistent=True)
    a.call("new_pool", conn="a", pool="e")
    other.call("new_pool", conn="o", pool="e")
    assert all(a.call("put", pool="p", start=0, count=256, seed=11))  # 1 MiB persistent
    assert all(a.call("put", pool="e", start=0, count=128, seed=12))
    assert all(other.call("put", pool="e", start=0, count=512, seed=13))

    assert b.admin.call("flush", guest=name) == {"pages_flushed": 128}
    assert b.guests()[name]["persistent_bytes"] == 1 * MiB

    shrunk = b.admin.call("budget", bytes=MiB // 2)
    assert "warning" in shrunk and shrunk["budget"] == MiB // 2
    print(f"\nbudget below persistent usage: {shrunk['warning']}")
    assert shrunk["used"] == 1 * MiB  # the bystander's ephemeral pages went, nothing else
    assert b.guests()[f"{UID}/bystander"]["ephemeral_bytes"] == 0
    assert a.call("put", pool="e", start=500, count=1, seed=12) == [False]
    assert a.call("put", pool="p", start=500, count=1, seed=11) == [False]
    assert other.call("put", pool="e", start=500, count=1, seed=13) == [False]

    row = b.admin.call("set", guest=name, cap=256 * 1024)
    assert row["evicted"] == 0 and row["persistent_bytes"] == 1 * MiB
    assert b.admin.call("freeze", guest=name) == [name]
    assert a.call("get", pool="p", start=0, count=8, seed=11)["exact"] == 8  # gets proceed
    assert b.admin.call("thaw", guest=name) == [name]
    assert b.admin.call("freeze") and b.admin.call("thaw")
    u = str(uuid_module.uuid4())
    b.admin.call("grant", uuid=u, guest=name)
    assert b.admin.call("revoke", uuid=u, guest=name) == {"detached": 0}

    got = a.call("get", pool="p", start=0, count=256, seed=11)
    assert got["exact"] == 256
    assert b.guests()[name]["persistent_bytes"] == 1 * MiB

    b.admin.call("set", guest=name, cap=None)
    assert a.call("put", pool="e", start=600, count=1, seed=12) == [False]  # budget still short
    grown = b.admin.call("budget", bytes=8 * MiB)
    assert "warning" not in grown
    assert all(a.call("put", pool="p", start=256, count=64, seed=11))
    assert all(a.call("put", pool="e", start=0, count=64, seed=12))
    assert all(other.call("put", pool="e", start=0, count=64, seed=13))
    assert a.call("get", pool="p", start=0, count=320, seed=11)["exact"] == 320


# ----------------------------------------------------------------------------- 5. shared pools


def test_a_shared_pools_cap_bounds_what_its_members_put_there(bed: Any) -> None:
    """Pages a member puts into a shared pool are billed to the pool's account, so the member's
    own cap (0 here) does not bound them: the account's cap, set by an administrator, does. A
    member flooding the pool then evicts only the pool's own pages, never another guest's."""
    b = bed("256KiB")  # 64 pages
    flooder, bystander = b.agent(), b.agent()
    fn = flooder.call("connect", conn="c", name="flood")
    bystander.call("connect", conn="c", name="calm")
    bystander.call("new_pool", conn="c", pool="p")  # ephemeral: evictable
    assert all(bystander.call("put", pool="p", start=0, count=32, seed=3))
    u = str(uuid_module.uuid4())
    b.admin.call("set", guest=fn, cap=0)
    b.admin.call("grant", uuid=u, guest=fn)
    row = b.admin.call("set", guest=f"shared:{u}", cap=16 * PAGE)
    assert (row["connected"], row["cap"]) == (False, 16 * PAGE)  # no member has opened it yet
    flooder.call("new_pool", conn="c", pool="s", shared=True, uuid=u)
    for start in range(0, 200, 50):
        assert all(flooder.call("put", pool="s", start=start, count=50, seed=4))
    rows = b.guests()
    assert rows[f"shared:{u}"]["ephemeral_bytes"] == 16 * PAGE
    assert rows[fn]["ephemeral_bytes"] == 0
    assert bystander.call("get", pool="p", start=0, count=32, seed=3)["exact"] == 32
    assert flooder.call("get", pool="s", start=184, count=16, seed=4)["exact"] == 16


def test_shared_pool_needs_a_grant(bed: Any) -> None:
    """Deny by default; a grant lets two guests (two processes) see each other's pages;
    revoke detaches at once; the pages go with the last member; a grant may precede the
    guest's first connection."""
    b = bed("8MiB")
    x, y, z = b.agent(), b.agent(), b.agent()
    xn = x.call("connect", conn="c", name="sx")
    yn = y.call("connect", conn="c", name="sy")
    u = str(uuid_module.uuid4())

    with pytest.raises(PermissionDenied, match="no grant"):
        x.call("new_pool", conn="c", pool="s", shared=True, uuid=u)
    assert b.daemon.wait_event("shared_pool_refused")[0]["guest"] == xn

    b.admin.call("grant", uuid=u, guest=xn)
    b.admin.call("grant", uuid=u, guest=yn)
    x.call("new_pool", conn="c", pool="s", shared=True, uuid=u)
    y.call("new_pool", conn="c", pool="s", shared=True, uuid=u)
    assert all(x.call("put", pool="s", start=0, count=32, seed=21))
    assert all(y.call("put", pool="s", start=32, count=32, seed=21))
    for who in (x, y, y):  # get does not remove in a shared pool
        assert who.call("get", pool="s", start=0, count=64, seed=21)["exact"] == 64
    shares = b.admin.call("shares")
    assert shares["pools"] == [{"uuid": u, "members": sorted([xn, yn]), "pages": 64}]
    rows = b.guests()
    account = rows[f"shared:{u}"]
    assert (account["kind"], account["ephemeral_bytes"]) == ("shared", 64 * PAGE)
    assert rows[xn]["ephemeral_bytes"] == rows[yn]["ephemeral_bytes"] == 0  # billed to the pool

    # A grant for a guest that has not connected yet works when it connects.
    zn = f"{UID}/sz"
    b.admin.call("grant", uuid=u, guest=zn)
    assert z.call("connect", conn="c", name="sz") == zn
    z.call("new_pool", conn="c", pool="s", shared=True, uuid=u)
    assert z.call("get", pool="s", start=0, count=64, seed=21)["exact"] == 64

    # Revoke detaches at once; the other members are unaffected.
    assert b.admin.call("revoke", uuid=u, guest=yn) == {"detached": 1}
    with pytest.raises(UnknownPool):
        y.call("get", pool="s", start=0, count=1, seed=21)
    with pytest.raises(PermissionDenied):
        y.call("new_pool", conn="c", pool="s2", shared=True, uuid=u)
    assert x.call("get", pool="s", start=0, count=64, seed=21)["exact"] == 64
    assert b.admin.call("shares")["pools"][0]["members"] == sorted([xn, zn])

    # The pages go when the last member leaves.
    x.call("destroy", pool="s")
    assert b.admin.call("shares")["pools"][0]["members"] == [zn]
    z.call("close", conn="c")
    b.wait_gone(zn)
    assert b.admin.call("shares")["pools"] == []
    assert f"shared:{u}" not in b.guests()
    assert b.status()["used"] == 0

    with pytest.raises(InvalidArgument):
        b.admin.call("grant", uuid="not-a-uuid", guest=xn)
    with pytest.raises(InvalidArgument):
        b.admin.call("revoke", uuid="1234", guest=xn)
    with pytest.raises(NotFound):
        b.admin.call("revoke", uuid=str(uuid_module.uuid4()), guest=xn)
    with pytest.raises(NotFound):
        b.admin.call("revoke", uuid=u, guest=yn)  # already revoked


# ----------------------------------------------------------------------------- 6. identity


def test_identity(bed: Any) -> None:
    """Config names belong to their uids; unlisted names can be denied; a name connects as
    many times as its ``sessions`` allow, sharing one account, each session with its own
    pools. (Two guest processes: connections of one process are told apart just the same, and
    the second process is the one that vanishes.)"""
    config = (
        '[daemon]\nunlisted_guests = "deny"\n'
        + guest_table("vm1", uids=12345)
        + guest_table("solo")
        + guest_table("duo", sessions=2)
    )
    b = bed("8MiB", config)
    g = b.agent()

    with pytest.raises(PermissionDenied):
        g.call("connect", conn="c", name="vm1")  # another uid's name
    refused = b.daemon.wait_event("guest_name_refused")
    assert refused[0]["name"] == "vm1" and refused[0]["uid"] == UID
    with pytest.raises(PermissionDenied):
        g.call("connect", conn="c", name="stranger")  # unlisted: denied
    assert b.daemon.wait_event("guest_name_refused", count=2)[1]["name"] == "stranger"

    assert g.call("connect", conn="c1", name="solo") == "solo"
    with pytest.raises(GuestConflict):
        g.call("connect", conn="c2", name="solo")
    g.call("close", conn="c1")
    b.wait_gone("solo")
    assert g.call("connect", conn="c2", name="solo") == "solo"  # free again
    g.call("close", conn="c2")
    b.wait_gone("solo")

    d1 = b.agent()
    assert d1.call("connect", conn="c", name="duo") == "duo"
    assert g.call("connect", conn="d2", name="duo") == "duo"
    with pytest.raises(GuestConflict):
        g.call("connect", conn="d3", name="duo")
    row = b.guests()["duo"]
    assert row["sessions"] == 2
    d1.call("new_pool", conn="c", pool="p")
    g.call("new_pool", conn="d2", pool="p")
    assert all(d1.call("put", pool="p", start=0, count=16, seed=31))
    assert all(g.call("put", pool="p", start=100, count=8, seed=32))
    row = b.guests()["duo"]
    assert (row["pools"], row["pages"], row["ephemeral_bytes"]) == (2, 24, 24 * PAGE)
    # One account, separate pools: each session sees only its own pages.
    assert g.call("get", pool="p", start=0, count=16, seed=31)["hits"] == 0
    assert d1.call("get", pool="p", start=100, count=8, seed=32)["hits"] == 0
    assert d1.call("get", pool="p", start=0, count=8, seed=31)["exact"] == 8  # and removes
    assert b.guests()["duo"]["pages"] == 16
    d1.kill()  # vanishes: its private pages go, the account stays with the other session
    for _ in range(500):
        if b.guests()["duo"]["sessions"] == 1:
            break
        time.sleep(0.01)
    row = b.guests()["duo"]
    assert (row["sessions"], row["pages"]) == (1, 8)
    assert g.call("get", pool="p", start=100, count=8, seed=32)["exact"] == 8
    # A pool handle of one session means nothing on another session of the same guest.
    assert g.call("connect", conn="d4", name="duo") == "duo"
    g.call("alias", conn="d4", pool="foreign", of="p")
    with pytest.raises(UnknownPool):
        g.call("get", pool="foreign", start=100, count=1, seed=32)
    assert b.guests()["duo"]["sessions"] == 2


# ----------------------------------------------------------------------------- 7. admin socket


def _connect_as_stranger(path: Path) -> int:
    """Fork a child that drops to uid/gid STRANGER and connects to ``path``; its errno (0 if
    the connect worked)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.setgroups([])
            os.setgid(STRANGER)
            os.setuid(STRANGER)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(path))
                code = 0
            except OSError as exc:
                code = exc.errno or 98
        finally:
            os._exit(code)
    for _ in range(1000):  # bounded: 10 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the unprivileged child did not finish")


def test_admin_socket_is_private(bed: Any) -> None:
    """The admin socket is 0600 in a 0700 directory: another uid cannot even open it."""
    b = bed("8MiB")
    st = os.stat(b.admin_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == UID
    assert stat.S_IMODE(os.stat(b.admin_path.parent).st_mode) == 0o700
    if UID != 0:
        pytest.skip("dropping to another uid needs root")
    import errno

    assert _connect_as_stranger(b.admin_path) == errno.EACCES
    assert b.status()["budget"] == 8 * MiB  # and we, the daemon's uid, may


def test_second_daemon_on_a_taken_socket_fails_and_leaves_nothing(bed: Any, tmp_path: Path) -> None:
    """A tmemd whose guest socket another tmemd listens on says so and exits 1, and removes
    the admin socket it had already bound; the first daemon and its guests go on."""
    b = bed("8MiB")
    g = b.agent()
    g.call("connect", conn="c", name="first")
    g.call("new_pool", conn="c", pool="p", persistent=True)
    assert all(g.call("put", pool="p", start=0, count=8, seed=7))
    admin_dir = tmp_path / "second-admin"
    admin_dir.mkdir(mode=0o700)
    second = subprocess.run(
        [
            *(sys.executable, "-m", "tmemd", "--socket", str(b.daemon.socket)),
            *("--admin-socket", str(admin_dir / "admin.sock"), "--log-format", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert second.returncode == 1, second.stdout + second.stderr
    events = [json.loads(line) for line in second.stderr.splitlines() if line.startswith("{")]
    errors_logged = [e for e in events if e.get("event") == "socket_in_use"]
    assert errors_logged and "another daemon is listening" in errors_logged[0]["error"]
    assert list(admin_dir.iterdir()) == []
    assert b.daemon.socket.exists()  # the first daemon's socket was not touched
    assert g.call("get", pool="p", start=0, count=8, seed=7)["exact"] == 8
    assert b.status()["budget"] == 8 * MiB


READ_REFUSAL = """
import json, socket, sys
from tmemclient.wire.codec import NEED_DATA, FrameDecoder
from tmemclient.wire.messages import split_reply
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
decoder = FrameDecoder(1 << 16)
while (message := decoder.next_message()) is NEED_DATA:
    data = s.recv(1 << 16)
    if not data:
        sys.exit("EOF before any reply")
    decoder.feed(data)
req_id, status, result = split_reply(message)
closed = s.recv(1 << 16) == b""
print(json.dumps({"req_id": req_id, "status": status, "result": result, "closed": closed}))
"""

ADMIN_CLIENT_AFTER_REFUSAL = """
import select, sys
from tmemd.ctl.client import AdminClient
from tmemclient.wire.errors import TmemError
client = AdminClient(sys.argv[1])
poll = select.poll()
poll.register(client._sock, select.POLLRDHUP)
if not poll.poll(10_000):  # the daemon has answered and closed its end
    sys.exit("the daemon kept the connection open")
try:
    print(client.call("status"))
except TmemError as exc:
    print(type(exc).__name__, exc)
"""


def _run_as_stranger_with_dac_override(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as uid/gid STRANGER with CAP_DAC_OVERRIDE: not root, not our uid, but
    able to open a 0600 socket, so the daemon's own credential check is what stands."""
    setpriv = shutil.which("setpriv")
    if UID != 0 or setpriv is None:
        pytest.skip("needs root and util-linux setpriv")
    cmd = [
        setpriv,
        f"--reuid={STRANGER}",
        f"--regid={STRANGER}",
        "--clear-groups",
        "--inh-caps=+dac_override",
        "--ambient-caps=+dac_override",
        sys.executable,
        "-c",
        script,
        *args,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=30, env=env, cwd=ROOT, check=False
    )
    if "setpriv:" in proc.stderr:
        pytest.skip(f"setpriv cannot do it here: {proc.stderr.strip()}")
    return proc


def test_admin_refuses_a_stranger_who_gets_through_the_file_mode(bed: Any) -> None:
    """Even a peer that bypasses the file mode (CAP_DAC_OVERRIDE, not root) is refused by the
    daemon's own SO_PEERCRED check: a PERMISSION reply, the connection closed, an audit line."""
    b = bed("8MiB")
    proc = _run_as_stranger_with_dac_override(READ_REFUSAL, str(b.admin_path))
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["status"] == Status.PERMISSION and reply["closed"], reply
    assert f"uid {STRANGER} is not an administrator" in reply["result"]
    event = b.daemon.wait_event("admin_refused")[0]
    assert event["uid"] == STRANGER
    assert b.status()["guests"] == 0  # the daemon carries on


def test_admin_client_reports_the_refusal(bed: Any) -> None:
    """AdminClient shows the daemon's refusal even when the daemon closed before the request
    was sent (deterministic form of a race seen with a plain ``call``)."""
    b = bed("8MiB")
    proc = _run_as_stranger_with_dac_override(ADMIN_CLIENT_AFTER_REFUSAL, str(b.admin_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PermissionDenied"), proc.stdout


def test_guest_vanishing_while_frozen_or_flushed(bed: Any) -> None:
    """A guest killed while frozen, or while the admin flushes it mid-put, leaves the daemon
    running and its memory free."""
    b = bed("8MiB")
    frozen = b.agent()
    name = frozen.call("connect", conn="c", name="frozen")
    frozen.call("new_pool", conn="c", pool="e")
    frozen.call("new_pool", conn="c", pool="p", persistent=True)
    assert all(frozen.call("put", pool="e", start=0, count=256, seed=41))
    assert all(frozen.call("put", pool="p", start=0, count=64, seed=42))
    assert b.admin.call("freeze", guest=name) == [name]
    assert frozen.call("put", pool="e", start=256, count=1, seed=41) == [False]
    frozen.kill()
    b.wait_gone(name)
    assert b.status()["used"] == 0
    assert b.admin.call("thaw", guest=name) == [name]  # the override outlives the guest

    for i in range(3):  # bounded: three guests, each flushed mid-churn and then killed
        g = b.agent()
        gname = g.call("connect", conn="c", name=f"flushed{i}")
        g.call("new_pool", conn="c", pool="e")
        g.call("new_pool", conn="c", pool="p", persistent=True)
        assert all(g.call("put", pool="p", start=0, count=32, seed=43))
        g.send("churn", pools_=["e"], rounds=200, batch=64)  # busy; not awaited
        for _ in range(1000):  # bounded: 10 s
            if b.guests()[gname]["ephemeral_bytes"] > 0:
                break  # the churn is under way
            time.sleep(0.01)
        else:
            raise AssertionError(f"{gname}'s churn stored no page")
        # It holds ephemeral pages now (the churn only adds more): the flush drops some.
        assert b.admin.call("flush", guest=gname)["pages_flushed"] > 0
        for _ in range(2):  # and again while the churn goes on
            b.admin.call("flush", guest=gname)
        assert b.guests()[gname]["persistent_bytes"] == 32 * PAGE  # a flush keeps those
        g.kill()
        b.wait_gone(gname)
    assert b.daemon.alive
    status = b.status()
    assert (status["used"], status["guests"]) == (0, 0)
    assert not b.daemon.events("connection_failed")
    assert not b.daemon.events("admin_connection_failed")
    # And the daemon still serves guests.
    after = b.agent()
    after.call("connect", conn="c", name="after")
    after.call("new_pool", conn="c", pool="e")
    assert all(after.call("put", pool="e", start=0, count=64, seed=44))


# ----------------------------------------------------------------------------- 8. bad input


def test_bad_admin_input(bed: Any) -> None:
    """Every malformed admin request gets a clear error and changes nothing."""
    b = bed("8MiB", guest_table("cfg", weight=200))
    adm = b.admin
    g = b.agent()
    name = g.call("connect", conn="c", name="live")
    g.call("new_pool", conn="c", pool="p", persistent=True)
    capacity = b.status()["capacity"]

    unknown: list[tuple[str, dict[str, Any]]] = [
        ("set", {"guest": "nobody", "weight": 100}),
        ("set", {"guest": "0/nobody", "cap": MiB}),
        ("flush", {"guest": "nobody"}),
        ("freeze", {"guest": "nobody"}),
        ("thaw", {"guest": "nobody"}),
        ("pools", {"guest": "nobody"}),
        ("set", {"guest": f"shared:{uuid_module.uuid4()}", "weight": 100}),  # no grant names it
    ]
    for op, args in unknown:
        with pytest.raises(NotFound):
            adm.call(op, **args)
    for weight in (0, -1, 10**9, "x", True, 1.5, [1]):
        with pytest.raises(InvalidArgument):
            adm.call("set", guest=name, weight=weight)
    for cap in (-1, -(4 << 20), capacity + PAGE, 2**63, "1MiB", True, 1.5):
        with pytest.raises(InvalidArgument):
            adm.call("set", guest=name, cap=cap)
    for budget in (0, -1, -(8 << 20), PAGE - 1, capacity + PAGE, 2**63, "8MiB", None, 1.5):
        with pytest.raises(InvalidArgument):
            adm.call("budget", bytes=budget)
    malformed: list[tuple[str, dict[str, Any]]] = [
        ("set", {"guest": name}),  # neither weight nor cap
        ("set", {"weight": 100}),  # no guest
        ("flush", {}),
        ("flush", {"guest": ""}),
        ("grant", {"uuid": str(uuid_module.uuid4())}),
        ("grant", {"uuid": str(uuid_module.uuid4()), "guest": "shared:x"}),
        ("grant", {"uuid": 12, "guest": name}),
        ("set", {"guest": "shared:not-a-uuid", "weight": 100}),
        ("no-such-op", {}),
    ]
    for op, args in malformed:
        with pytest.raises(InvalidArgument):
            adm.call(op, **args)
    # Nothing changed.
    row = b.guests()[name]
    assert (row["weight"], row["cap"], row["frozen"]) == (100, None, False)
    assert b.status()["budget"] == 8 * MiB

    # Good input still works: a configured guest that is not connected; then a budget below
    # persistent usage is accepted with a warning.
    assert adm.call("set", guest="cfg", weight=300) == {
        "name": "cfg",
        "connected": False,
        "weight": 300,
        "cap": None,
    }
    assert adm.call("set", guest=name, weight=10_000, cap=0)["weight"] == 10_000
    adm.call("set", guest=name, cap=None)
    assert all(g.call("put", pool="p", start=0, count=64, seed=51))
    result = adm.call("budget", bytes=128 * 1024)
    assert result["budget"] == 128 * 1024 and "warning" in result
    assert g.call("get", pool="p", start=0, count=64, seed=51)["exact"] == 64
    assert adm.call("budget", bytes=capacity)["budget"] == capacity  # the very top is fine
