"""State that survives the daemon: ``tmemd --state-dir DIR`` (docs/design.md §6.10, issue #17).

What is kept: the pages of *named* pools (design.md §2.6), the only pools a guest can come back
to, with what names them. Unnamed pools die with their connection anyway, and every connection
dies with the daemon. Mapped guests' pages live in their mirrors, which are not kept (their
named pools come back empty).

Files in DIR (a tmpfs such as /run/tmemd/state: the point is memory that outlives a process,
not a disk; a directory others can write is refused):

- ``arena``: the page arena itself, a sparse file of the arena's capacity that the daemon maps
  shared (instead of an anonymous memfd), so a page written there is in the page cache, and
  survives the process, the moment the copy is done.
- ``index``: a header page, then a 48-byte row for every slot: ``gen`` (u64, 0: no record;
  else the record's generation, unique and increasing), ``key`` (u32, the named pool),
  ``index`` (u32), ``next`` (i32, the page's next slot, -1 at its last), a pad, ``oid0..2``
  (u64 x 3: the 192-bit object id). Only a page's head slot has a record; ``next`` chains its
  other slots. One row is one cache line or two, written with one store of all but ``gen``.
- ``pools``: an append-only log of named pools, one line each, ``JSON<TAB>crc32``: created
  (key, guest, name, uid, kind, order) or destroyed (key).

**Crash consistency** (SIGKILL at any instant): the order of the writes makes every state the
next start can see a consistent one.

1. A named pool's ``created`` line is written before NEW_POOL is answered; ``destroyed`` before
   any of its pages is freed.
2. A put writes the page into its slots first, then the record's fields and ``next`` chain, then
   ``gen`` last (one aligned 8-byte store: the commit), then the answer goes out. A record
   whose ``gen`` is 0 does not exist; so a put in flight is whole or absent.
3. A persistent page being replaced is written to new slots (copy on write) and committed with a
   higher ``gen`` before the old record is cleared, so an answered page is never torn; the next
   start keeps the highest ``gen`` of a handle. (An ephemeral page is cleared, rewritten in place
   and committed again: absent if killed meanwhile, as ephemeral pages may be.)
4. A page leaves (flush, eviction, exclusive get, its pool destroyed) by clearing ``gen``
   first; only then can its slots be reused.

Sub-page WRITE and XCHG change a page in place: a kill in the middle of one may leave that byte
range partly written (the rest of the page, and every other page, is intact).

**Adopt or start empty.** A start reads everything and checks it before changing anything: the
header (magic, version, the arena's capacity), the log (a torn last line is a write the kill cut
short and is ignored; any other bad line is corruption), and every record of a live pool (slots
in range, chains of the pool's page size, no slot claimed twice). Any doubt and it starts empty,
wiping the files, and says why (``state_discarded``); otherwise it adopts all of it
(``state_adopted``): the pools are kept for their guests as after a disconnect, for
``reattach_seconds`` from the start. Records not adopted (stale, superseded) are cleared.
"""

from __future__ import annotations

import fcntl
import gc
import json
import mmap
import os
import stat
import struct
import time
import zlib
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress, pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemd.accounts import Pool
from tmemd.memfiles import MemFile, data_extents

if TYPE_CHECKING:
    from tmemd.host import Host
    from tmemd.store import Store

MAGIC: Final = b"TMEMST01"
VERSION: Final = 1
HEADER: Final = struct.Struct("<8sIQ")  # magic, version, capacity in slots
HEADER_BYTES: Final = 4096
# One row per slot: gen (the commit word, written last), then the rest of the record.
ROW: Final = struct.Struct("<QIIiIQQQ")  # gen, key, index, next, (pad), oid0, oid1, oid2
ROW_REST: Final = struct.Struct("<IIiIQQQ")  # the row after gen, written in one go
ROW_BYTES: Final = ROW.size  # 48
FILE_MODE: Final = 0o600
# FDNAME= of the state's descriptors in systemd's fd store (FDSTORE=1; LISTEN_FDNAMES).
FD_NAMES: Final = ("state-arena", "state-index", "state-pools")
_U64: Final = (1 << 64) - 1


class StateError(Exception):
    """The state directory cannot be used, or what it holds cannot be trusted (the message
    says which and what to do)."""


def check_state_dir(path: Path) -> None:
    """Make ``path`` (0700) if it is missing; refuse one that is not a directory, belongs to
    another user or is writable by group or others (anyone who can write there can forge
    pages the next start would hand to guests)."""
    if path.exists() and not path.is_dir():
        raise StateError(f"state directory {path} is not a directory")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise StateError(f"cannot use state directory {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StateError(
            f"state directory {path} belongs to uid {st.st_uid}, not tmemd's ({os.geteuid()}): "
            f"chown {os.geteuid()} {path}"
        )
    if st.st_mode & 0o022:
        raise StateError(
            f"state directory {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); anyone who can write there can forge pages: "
            f"chmod 0700 {path}"
        )


def index_size(capacity: int) -> int:
    """Bytes of the index file for an arena of ``capacity`` slots."""
    return -(-(HEADER_BYTES + ROW_BYTES * capacity) // FRAME_SIZE) * FRAME_SIZE


class StateArena(MemFile):
    """The arena as a file of the state directory, mapped shared (not a sealed memfd: it is
    never handed to a guest)."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        self.view = memoryview(self._map)
        self.closed = False
        self.queued = 0


@dataclass
class PoolRecord:
    """One named pool as the log has it."""

    key: int
    guest: str
    name: str
    uid: int
    persistent: bool
    order: int


# One page as the index has it: (gen, pool key, oid, index, slots).
PageRecord = tuple[int, int, int, int, tuple[int, ...]]


@dataclass
class Found:
    """What a start found in the state directory, checked."""

    pools: dict[int, PoolRecord] = field(default_factory=dict)
    pages: list[PageRecord] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)  # heads of records not to adopt
    max_gen: int = 0
    max_key: int = 0


@dataclass
class Adoption:
    """What a start did with the state directory (``tmemctl status``: ``state``)."""

    dir: str
    adopted: bool
    pools: int = 0
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reason: str | None = None  # why it started empty

    def as_dict(self) -> dict[str, Any]:
        """The row for ``tmemctl status``."""
        return {
            "dir": self.dir,
            "adopted": self.adopted,
            "pools": self.pools,
            "pages": self.pages,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "reason": self.reason,
        }


class StateDir:
    """The files of a state directory, open and mapped, and the journal the store and host
    write through (module docstring)."""

    def __init__(
        self, path: Path | None, capacity_slots: int, fds: dict[str, int] | None = None
    ) -> None:
        """The files of directory ``path``; or, with ``fds`` (``FD_NAMES`` -> fd: memfds made
        by ``memfds``, or handed back by systemd's fd store), those, and no directory."""
        self.capacity = capacity_slots
        self.path = path
        if fds is not None:
            self.arena_fd, self.index_fd = fds["state-arena"], fds["state-index"]
            # Appends go to the end whoever wrote last: the log is re-opened O_APPEND.
            self.log_fd = os.open(
                f"/proc/self/fd/{fds['state-pools']}", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
            )
            os.close(fds["state-pools"])
        else:
            assert path is not None
            check_state_dir(path)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self.arena_fd = os.open(path / "arena", flags, FILE_MODE)
            self.index_fd = os.open(path / "index", flags, FILE_MODE)
            try:
                # One tmemd per directory: a second one adopting (and compacting, or wiping)
                # under a running one would corrupt its state. Released when we die.
                fcntl.flock(self.index_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.arena_fd)
                os.close(self.index_fd)
                raise StateError(
                    f"another tmemd uses state directory {path}; stop it first, or give this "
                    "one a directory of its own"
                ) from None
            self.log_fd = os.open(path / "pools", flags | os.O_APPEND, FILE_MODE)
        self.fresh = False  # set when the files are (re)made empty
        self._map: mmap.mmap | None = None
        self.next_gen = 1
        self.next_key = 1

    @staticmethod
    def memfds() -> dict[str, int]:
        """Three new, empty memfds for a state kept in systemd's fd store (``FD_NAMES``)."""
        fds: dict[str, int] = {}
        try:
            for name in FD_NAMES:
                fds[name] = os.memfd_create(f"tmem-{name}", os.MFD_CLOEXEC)
        except OSError:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def fds(self) -> dict[str, int]:
        """The state's descriptors by their fd-store names (to hand to systemd)."""
        return {
            "state-arena": self.arena_fd,
            "state-index": self.index_fd,
            "state-pools": self.log_fd,
        }

    @property
    def where(self) -> str:
        """The directory, or "fd store"."""
        return "fd store" if self.path is None else str(self.path)

    # ------------------------------------------------------------------ opening

    def open(self) -> tuple[StateArena, Found | str]:
        """Map the files; what they hold, checked (Found), or why it cannot be adopted."""
        arena_size = self.capacity << FRAME_SHIFT
        verdict: Found | str
        try:
            verdict = self._check_header(arena_size)
        except StateError as exc:
            verdict = str(exc)
        if isinstance(verdict, str):
            self._make_empty(arena_size)
        self._map_index()
        if not isinstance(verdict, str):
            try:
                verdict = self.read()
            except StateError as exc:
                verdict = str(exc)
                self._wipe()
        return StateArena(self.arena_fd, arena_size), verdict

    def _check_header(self, arena_size: int) -> Found | str:
        size = os.fstat(self.index_fd).st_size
        if size == 0 and os.fstat(self.log_fd).st_size == 0:
            self.fresh = True
            return "no state yet"
        head = os.pread(self.index_fd, HEADER.size, 0)
        if len(head) < HEADER.size:
            raise StateError("the index file is cut short")
        magic, version, capacity = HEADER.unpack(head)
        if magic != MAGIC or version != VERSION:
            raise StateError(f"the index file is not tmemd state version {VERSION}")
        if capacity != self.capacity:
            raise StateError(
                f"the state was kept for an arena of {capacity << FRAME_SHIFT} bytes, this start "
                f"has {self.capacity << FRAME_SHIFT} (its capacity follows --memory and the "
                "host's RAM): start with the same to adopt it"
            )
        if size != index_size(self.capacity) or os.fstat(self.arena_fd).st_size != arena_size:
            raise StateError("the state files have the wrong sizes")
        return Found()

    def _make_empty(self, arena_size: int) -> None:
        for fd in (self.index_fd, self.arena_fd, self.log_fd):
            os.ftruncate(fd, 0)
        os.ftruncate(self.arena_fd, arena_size)
        os.ftruncate(self.index_fd, index_size(self.capacity))
        os.pwrite(self.index_fd, HEADER.pack(MAGIC, VERSION, self.capacity), 0)
        self.fresh = True

    def discard(self) -> None:
        """Start empty after all (an adoption that failed): see ``_wipe``."""
        self._wipe()

    def _wipe(self) -> None:
        """Start empty after all: every record and pool gone, the arena's memory freed."""
        self.close_columns()
        self._make_empty(self.capacity << FRAME_SHIFT)
        self._map_index()

    def _map_index(self) -> None:
        self._map = mmap.mmap(self.index_fd, index_size(self.capacity))
        view = memoryview(self._map)
        rows: Any = view[HEADER_BYTES : HEADER_BYTES + ROW_BYTES * self.capacity]
        u64, u32, i32 = rows.cast("Q"), rows.cast("I"), rows.cast("i")
        # Each field as a strided view over the rows (a row is 6 u64 or 12 u32).
        self._cols: dict[str, Any] = {
            "rows": rows,
            "u64": u64,
            "u32": u32,
            "i32": i32,
            "gen": u64[0::6],
            "key": u32[2::12],
            "index": u32[3::12],
            "next": i32[4::12],
            "oid0": u64[3::6],
            "oid1": u64[4::6],
            "oid2": u64[5::6],
        }
        self._view = view
        self._rows = rows
        self.gen = self._cols["gen"]
        self.key = self._cols["key"]
        self.index = self._cols["index"]
        self.next = self._cols["next"]
        self.oid0, self.oid1, self.oid2 = self._cols["oid0"], self._cols["oid1"], self._cols["oid2"]

    def close_columns(self) -> None:
        """Release the index mapping."""
        if self._map is None:
            return
        for name in ("gen", "key", "index", "next", "oid0", "oid1", "oid2", "u64", "u32", "i32"):
            self._cols[name].release()
        self._cols["rows"].release()
        self._view.release()
        self._map.close()
        self._map = None

    # ------------------------------------------------------------------ reading (adoption)

    def read(self) -> Found:
        """Every live pool and page record, checked (StateError: corruption). The loop runs
        once per page held, so it is written for speed: locals, tuples, a bitmap of slots, and
        no cyclic garbage collection while it makes millions of objects that all stay."""
        with _no_gc():
            return self._read()

    def _read(self) -> Found:
        found = Found()
        found.pools = pools = self._read_log()
        found.max_key = max(pools, default=0)
        gen_off = HEADER_BYTES
        capacity = self.capacity
        gen, keys, indexes = self.gen, self.key, self.index
        oid0, oid1, oid2 = self.oid0, self.oid1, self.oid2
        orders = {key: rec.order for key, rec in pools.items()}
        claimed = bytearray(capacity)  # slots some page holds
        best: dict[tuple[int, int, int], PageRecord] = {}
        stale = found.stale
        max_gen = 0
        for head in self._heads(gen_off):
            g = gen[head]
            if g > max_gen:
                max_gen = g
            key = keys[head]
            order = orders.get(key)
            if order is None:
                stale.append(head)  # its pool was destroyed: the record is dead
                continue
            slots = self._chain(head, 1 << order) if order else (head,)
            oid = oid0[head]
            if oid1[head] or oid2[head]:
                oid |= oid1[head] << 64 | oid2[head] << 128
            page = (g, key, oid, indexes[head], slots)
            handle = (key, oid, page[3])
            other = best.get(handle)
            if other is not None:  # a copy on write the kill interrupted: the newer one wins
                if other[0] > g:
                    stale.append(head)
                    continue
                stale.append(other[4][0])
                for slot in other[4]:
                    claimed[slot] = 0
            best[handle] = page
            for slot in slots:
                if claimed[slot]:
                    raise StateError(f"slot {slot} is claimed by two pages")
                claimed[slot] = 1
        found.max_gen = max_gen
        found.pages = list(best.values())
        return found

    def _chain(self, head: int, n: int) -> tuple[int, ...]:
        """The ``n`` slots of the page at ``head``, by its ``next`` links, checked."""
        nxt = self.next
        slots = [head]
        while len(slots) < n:
            after = nxt[slots[-1]]
            if not 0 <= after < self.capacity:
                raise StateError(f"page at slot {head}: its chain leaves the arena")
            slots.append(after)
        if nxt[slots[-1]] != -1:
            raise StateError(f"page at slot {head}: its chain is longer than the page")
        if len(set(slots)) != n:
            raise StateError(f"page at slot {head}: its chain loops")
        return tuple(slots)

    def _heads(self, gen_off: int) -> list[int]:
        """Slots whose gen is not 0, found through the parts of the gen column that hold
        memory (a sparse file: pages never written are holes, skipped for free), and within
        them in C (``compress``)."""
        gen = self.gen
        end = gen_off + ROW_BYTES * self.capacity
        heads: list[int] = []
        for start, stop in data_extents(self.index_fd, gen_off, end, 1 << 30):
            first = (start - gen_off) // ROW_BYTES
            last = min(self.capacity, -(-(stop - gen_off) // ROW_BYTES))
            heads.extend(compress(range(first, last), gen[first:last]))
        return heads

    def _read_log(self) -> dict[int, PoolRecord]:
        data = os.pread(self.log_fd, os.fstat(self.log_fd).st_size, 0)
        lines = data.split(b"\n")
        pools: dict[int, PoolRecord] = {}
        for n, line in enumerate(lines):
            if not line:
                continue
            record = _decode_line(line)
            if record is None:
                if n == len(lines) - 1:  # the last line, cut short by a kill: never answered
                    continue
                raise StateError(f"line {n + 1} of the pools log is damaged")
            if record.get("op") == "new":
                rec = PoolRecord(
                    int(record["key"]),
                    str(record["guest"]),
                    str(record["name"]),
                    int(record["uid"]),
                    bool(record["persistent"]),
                    int(record["order"]),
                )
                if not 0 <= rec.order <= 4 or not 0 < rec.key < 1 << 32:
                    raise StateError(f"line {n + 1} of the pools log is out of range")
                pools[rec.key] = rec
            elif record.get("op") == "del":
                pools.pop(int(record["key"]), None)
            else:
                raise StateError(f"line {n + 1} of the pools log has an unknown op")
        return pools

    # ------------------------------------------------------------------ writing (the journal)

    def _append(self, record: dict[str, Any]) -> None:
        body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        line = body + b"\t" + f"{zlib.crc32(body):08x}".encode() + b"\n"
        os.write(self.log_fd, line)

    def pool_created(self, guest: str, name: str, uid: int, *, persistent: bool, order: int) -> int:
        """Record a new named pool (before NEW_POOL is answered); its key."""
        key = self.next_key
        self.next_key += 1
        self._append(
            {
                "op": "new",
                "key": key,
                "guest": guest,
                "name": name,
                "uid": uid,
                "persistent": persistent,
                "order": order,
            }
        )
        return key

    def pool_destroyed(self, key: int) -> None:
        """Record that a named pool is gone (before any of its pages is freed)."""
        self._append({"op": "del", "key": key})

    def stored(self, slots: tuple[int, ...], key: int, oid: int, index: int) -> None:
        """Make a page visible: fields and chain first, ``gen`` last (the commit)."""
        head = slots[0]
        after = -1
        if len(slots) > 1:
            nxt = self.next
            for a, b in pairwise(slots):
                nxt[a] = b
            nxt[slots[-1]] = -1
            after = slots[1]
        # The row but its gen in one store, then gen: the commit.
        if oid >> 64:
            ROW_REST.pack_into(
                self._rows,
                ROW_BYTES * head + 8,
                *(key, index, after, 0, oid & _U64, (oid >> 64) & _U64, oid >> 128),
            )
        else:
            ROW_REST.pack_into(self._rows, ROW_BYTES * head + 8, key, index, after, 0, oid, 0, 0)
        self.gen[head] = self.next_gen
        self.next_gen += 1

    def removed(self, head: int) -> None:
        """A page leaves: its record is gone before its slots can be reused."""
        self.gen[head] = 0

    def compact_log(self, pools: dict[int, PoolRecord]) -> None:
        """Rewrite the log with the live pools only (after an adoption). Not in the fd store,
        where no rename can swap a new file in at once: there the log keeps its lines (one per
        named pool made or destroyed)."""
        if self.path is None:
            return
        self.log_path = self.path / "pools"
        tmp = self.path / "pools.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            for rec in pools.values():
                body = json.dumps(
                    {
                        "op": "new",
                        "key": rec.key,
                        "guest": rec.guest,
                        "name": rec.name,
                        "uid": rec.uid,
                        "persistent": rec.persistent,
                        "order": rec.order,
                    },
                    separators=(",", ":"),
                    sort_keys=True,
                ).encode()
                os.write(fd, body + b"\t" + f"{zlib.crc32(body):08x}".encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, self.log_path)
        os.close(self.log_fd)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        self.log_fd = os.open(self.log_path, flags, FILE_MODE)

    def close(self) -> None:
        """Close everything but the arena (the store owns and closes that)."""
        self.close_columns()
        os.close(self.index_fd)
        os.close(self.log_fd)


def _decode_line(line: bytes) -> dict[str, Any] | None:
    body, sep, crc = line.rpartition(b"\t")
    if not sep:
        return None
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------- adoption


def adopt(state: StateDir, found: Found, store: Store, host: Host) -> Adoption:
    """Put what ``found`` holds into an empty store and host: accounts, named pools (kept for
    their guests for ``reattach_seconds``), pages in the very slots they occupy. Persistent pages
    are adopted whatever the budget (design.md §2.5: kept, and new puts refused until they
    fit); ephemeral ones while they fit."""
    started = time.monotonic()
    with _no_gc():
        return _adopt(state, found, store, host, started)


@contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic GC meanwhile (every object made is kept: collecting finds nothing, and its
    passes over millions of new objects cost more than the work)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _adopt(state: StateDir, found: Found, store: Store, host: Host, started: float) -> Adoption:
    pools: dict[int, Pool] = {}
    until = host.clock() + host.settings.limits.reattach_seconds
    for rec in found.pools.values():
        guest = store.guests.get(rec.guest)
        if guest is None:
            policy = host.settings.guests.get(rec.guest)
            guest = host.account_for(rec.guest, policy, rec.uid)
        pool = store.new_pool(guest, persistent=rec.persistent, order=rec.order)
        pool.key = rec.key
        pools[rec.key] = pool
        host.named.adopt(rec.guest, rec.name, rec.uid, pool, until)
    # Persistent pages first (kept whatever the budget), then ephemeral ones oldest first,
    # so that their LRU order is their puts' and the budget keeps the newest.
    persistent = [p for p in found.pages if pools[p[1]].persistent]
    ephemeral = sorted((p for p in found.pages if not pools[p[1]].persistent), reverse=True)
    room = store.budget_slots - sum(len(p[4]) for p in persistent)
    kept_ephemeral = []
    for page in ephemeral:  # newest first, while they fit
        if len(page[4]) > room:
            found.stale.append(page[4][0])
            continue
        room -= len(page[4])
        kept_ephemeral.append(page)
    kept_ephemeral.reverse()
    pages = persistent + kept_ephemeral
    top = max((max(p[4]) for p in pages), default=-1) + 1
    _grow(store, top)
    used = _place_all(store, pools, pages)
    for head in found.stale:
        state.gen[head] = 0
    _rebuild_free(store, used, top)
    state.next_gen = found.max_gen + 1
    state.next_key = found.max_key + 1
    state.compact_log(found.pools)
    return Adoption(
        state.where,
        True,
        pools=len(pools),
        pages=len(pages),
        bytes=used << FRAME_SHIFT,
        seconds=time.monotonic() - started,
    )


def _place_all(store: Store, pools: dict[int, Pool], pages: list[PageRecord]) -> int:
    """Every page into the store's index and accounting, at its own slots; slots used."""
    s_pool, s_oid, s_index, tails = store._pool, store._oid, store._index, store._tails
    ints = store._index_ints
    small = len(ints)
    used = 0
    for _gen, key, oid, index, slots in pages:
        pool = pools[key]
        head = slots[0]
        s_pool[head] = pool
        s_oid[head] = oid
        s_index[head] = index
        n = len(slots)
        if n > 1:
            tails[head] = array("i", slots[1:])
        objects = pool.objects.get(oid)
        if objects is None:
            objects = pool.objects[oid] = {}
        objects[ints[index] if index < small else index] = head
        pool.pages += 1
        used += n
        if pool.persistent:
            pool.guest.pers_slots += n
        else:
            pool.guest.eph_slots += n
            store._lru_append(pool.guest, head)
    store.used_slots += used
    return used


def _grow(store: Store, slots: int) -> None:
    """The store's per-slot arrays, long enough for ``slots`` slots."""
    have = len(store._index)
    if slots > have:
        store._grow_slots(slots - have)


def _rebuild_free(store: Store, used: int, top: int) -> None:
    """Every slot below ``top`` (one past the highest in use) that no page holds is free;
    from ``top`` on, slots are fresh."""
    if not used:
        return
    held = store._pool
    tails = bytearray(top)
    for rest in store._tails.values():
        for slot in rest:
            tails[slot] = 1
    store._fresh = top
    store._free = array(
        "i", (s for s in range(top - 1, -1, -1) if held[s] is None and not tails[s])
    )
