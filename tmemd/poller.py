"""One poller for every guest's request rings (PROTOCOL.md §4.6).

A guest with rings stores its requests in shared memory and rings no doorbell while the daemon
is awake. One task, the poller, serves every such ring: each *round* it visits every tenant (a
uid) with ring work and serves its connections' rings, one after the other, for at most a
*quantum* (``turn_us``) per tenant, so a tenant with 64 connections gets what a tenant with one
gets, and nobody waits for more than a round. Between tenants, once a quantum of work has gone
by, it lets every other task run (socket guests, the admin socket, maintenance).

When a round finds nothing to do it *watches* the rings a while (``PollWindow``: one window
for the whole daemon, grown while requests keep coming soon after a watch begins and dropped
back after a silence, as KVM's halt polling) and then *sleeps*: it stores HOST_IDLE = 1 in every
ring, so the guests ring their doorbell on the socket, looks at every ring once more, and waits
until a doorbell (or a new connection) wakes it. It watches only while the machine has a CPU to
spare (``SpinGate``): otherwise it would hold a CPU from the guests it waits for.

There is no per-connection spinning, so the cost of watching does not grow with the number of
guests, and a busy guest's request is found in the next round whichever connection carried it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from tmemclient.wire.ring import fence

if TYPE_CHECKING:
    from tmemd.connection import Connection
    from tmemd.server import GuestServer

LET_OTHERS_RUN = 50e-6  # seconds of watching between two turns for every other task
CROWD_MEMORY = 2e-3  # seconds the rings say "crowded" after a round served two connections
CROWD_GAP = 30e-6  # a socket request of another guest this soon after one ended was waiting


class PollWindow:
    """How long the daemon watches the rings before it sleeps: adaptive, as KVM's halt
    polling (``halt_poll_ns``, grown and shrunk in virt/kvm/kvm_main.c).

    A request that came while the daemon slept, but less than ``most`` seconds after it began
    watching, would have been caught by a longer watch: the window grows to cover that gap
    (doubling at least). A silence longer than ``most`` means the guests are idle or thinking,
    and watching was wasted: the window drops back to ``base``. Seconds throughout."""

    def __init__(self, base: float, most: float) -> None:
        self.base = base
        self.most = max(base, most)
        self.window = base
        self.started: float | None = None  # when the current watch began

    def woke(self, now: float) -> None:
        """The next request came at ``now``, after a watch and then a sleep."""
        if self.started is None:
            return  # no watch before this sleep (not allowed, or not needed): nothing learnt
        idle = now - self.started
        self.started = None
        if idle > self.most:
            self.window = self.base
        elif idle > self.window:
            self.window = min(self.most, max(2 * self.window, 1.25 * idle))


class RingPoller:
    """Serves, watches and sleeps for every connection with rings (module docstring)."""

    def __init__(self, server: GuestServer) -> None:
        limits = server.limits
        self.server = server
        self.tenants: dict[int, deque[Connection]] = {}  # uid -> its connections with rings
        self.quantum = limits.turn_us / 1e6
        self.watch = PollWindow(limits.ring_poll_us / 1e6, limits.ring_poll_max_us / 1e6)
        self.asleep = False
        self._wakeup = trio.Event()
        self._yield_at = 0.0  # when the others get their next turn (perf_counter)
        self.rounds = 0
        self.sleeps = 0
        # HOST_CROWDED, as every ring shows it: set for CROWD_MEMORY seconds after a round
        # found requests in more than one connection's ring (then a guest sleeps rather than
        # watch its reply ring: the CPU it would spin on is the others' and ours). One process
        # using several connections in turn is not a crowd: each round finds one request.
        self.crowded = False
        self._crowded_until = 0.0
        self._socket_last: Connection | None = None  # whose socket request ended last...
        self._socket_done = 0.0  # ...and when (perf_counter)

    # ------------------------------------------------------------------ membership

    def add(self, conn: Connection) -> None:
        """Serve ``conn``'s rings from now on."""
        assert conn.rings is not None
        self.tenants.setdefault(conn.session.uid, deque()).append(conn)
        conn.rings.sleeping(self.asleep)
        conn.rings.crowded(self.crowded)
        self.wake()

    def remove(self, conn: Connection) -> None:
        """Stop serving ``conn`` (its connection is ending; its rings are released after)."""
        uid = conn.session.uid
        conns = self.tenants.get(uid)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.tenants[uid]

    def wake(self) -> None:
        """A doorbell, or a new connection: look at the rings now."""
        self._wakeup.set()

    def tenant_released(self, uid: int) -> None:
        """A connection of tenant ``uid`` let go of the tenant's turn: while the poller sleeps,
        ring work of the tenant that it skipped for the turn wakes it."""
        if self.asleep:
            conns = self.tenants.get(uid)
            if conns and any(conn.ring_ready() for conn in conns):
                self.wake()

    def socket_request(self, conn: Connection) -> None:
        """``conn`` is about to serve requests from its socket. If another guest's socket
        request ended less than CROWD_GAP ago, this one was already waiting then (no guest
        answers a reply that fast): the daemon is crowded on its sockets too. The rings say
        so, so that the guests stay on them: their requests are served together in the
        poller's rounds, where on the sockets each costs a wakeup and a turn of its own.
        One thread using several connections in turn is no crowd: each of its requests
        comes a round trip after the last."""
        now = time.perf_counter()
        if conn is not self._socket_last and now - self._socket_done < CROWD_GAP:
            self._saw_crowd(now)
            if not self.crowded:
                self._publish_crowded(True)
                if self.asleep:
                    self.wake()  # it goes back to sleep with the word's memory on a timer

    def socket_done(self, conn: Connection) -> None:
        """``conn`` has served the requests its socket held (``socket_request``)."""
        self._socket_last = conn
        self._socket_done = time.perf_counter()

    def _saw_crowd(self, now: float) -> None:
        """Guests' requests came at once (they wait for each other's turns): the rings say
        "crowded" until CROWD_MEMORY from ``now``."""
        self._crowded_until = now + CROWD_MEMORY

    def _ready(self) -> bool:
        return any(conn.ring_ready() for conns in self.tenants.values() for conn in conns)

    # ------------------------------------------------------------------ the loop

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve, watch, sleep, until cancelled."""
        task_status.started()
        while True:
            if self.tenants and (await self._round() or await self._watch()):
                continue
            await self._sleep()

    async def _round(self) -> bool:
        """Serve every tenant's ready rings once, each tenant for at most a quantum; True if
        anything was served."""
        clock = time.perf_counter
        uids = list(self.tenants)
        self.rounds += 1
        first = self.rounds % len(uids)  # who goes first changes every round
        served = 0  # connections served this round
        for uid in uids[first:] + uids[:first]:
            conns = self.tenants.get(uid)  # (it may have gone while others ran)
            if not conns:
                continue
            deadline = clock() + self.quantum
            for _ in range(len(conns)):
                conn = conns[0]
                conns.rotate(-1)  # the tenant's next connection goes first next time
                if conn.ring_ready() and conn.serve_ring(deadline):
                    served += 1
                if clock() > deadline:
                    break
            if clock() > self._yield_at:
                await self._let_others_run()
        now = clock()
        if served > 1:
            self._saw_crowd(now)
        self._publish_crowded(now < self._crowded_until)
        return served > 0

    def _publish_crowded(self, flag: bool) -> None:
        if flag != self.crowded:
            self.crowded = flag
            for conns in self.tenants.values():
                for conn in conns:
                    assert conn.rings is not None
                    conn.rings.crowded(flag)

    async def _watch(self) -> bool:
        """Watch the rings for up to the window before sleeping; True if a request came."""
        watch = self.watch
        if not watch.window or not self.server.gate.open():
            watch.started = None
            return False
        clock = time.perf_counter
        now = watch.started = clock()
        deadline = now + watch.window
        while True:
            if self._ready():
                return True
            now = clock()
            if now > deadline:
                return False
            os.sched_yield()  # a guest waiting for our CPU gets it
            if now > self._yield_at:
                await self._let_others_run()

    async def _let_others_run(self) -> None:
        await self.server.yield_turn()
        # With other guests connected, they (their sockets) go often; with one, only the
        # admin socket and the maintenance task wait, and a turn's quantum is soon enough:
        # a pass of trio's run loop costs as much as serving a small request.
        gap = LET_OTHERS_RUN if self.server.connections > 1 else self.quantum
        self._yield_at = time.perf_counter() + gap

    async def _sleep(self) -> None:
        """Tell every guest we sleep (so it rings its doorbell), look once more, and wait for
        a doorbell. How long the guests kept us waiting sizes the next watch. The rings stop
        saying "crowded" once its memory runs out, asleep or not (a guest that sleeps for its
        answers takes the socket while we sleep, and no round of ours would say it)."""
        crowd_left = self._crowded_until - time.perf_counter()
        self._publish_crowded(crowd_left > 0)
        self._wakeup = trio.Event()  # before the words: a wake from now on is not lost
        self.asleep = True
        for conns in self.tenants.values():
            for conn in conns:
                assert conn.rings is not None
                conn.rings.sleeping(True)
        fence()  # a guest stores its tail then loads our word; we the reverse
        try:
            if not self._ready():
                self.sleeps += 1
                if crowd_left > 0:
                    with trio.move_on_after(crowd_left) as memory:
                        await self._wakeup.wait()
                    if memory.cancelled_caught:
                        self._publish_crowded(False)
                await self._wakeup.wait()
        finally:
            self.asleep = False
            for conns in self.tenants.values():
                for conn in conns:
                    assert conn.rings is not None
                    conn.rings.sleeping(False)
            now = time.perf_counter()
            self.watch.woke(now)
            self._yield_at = now + self.quantum
