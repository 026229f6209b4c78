"""The admin server: a privileged Unix socket, separate from the guest socket (docs/design.md §4).

Only root, the daemon's own uid, or members of the configured admin group may talk to it; the
kernel's SO_PEERCRED (and SO_PEERGROUPS) say who the peer is, checked on every connection, and a
refusal is an audit log line. Requests are ``[op, req_id, {args}]``; each op maps to one Host
method, so every decision an administrator can make lives, testable, in tmemd/host.py, or (what
they read) to one view in tmemd/views.py.
"""

from __future__ import annotations

import array
import contextlib
import errno
import grp
import os
import select
import socket
import uuid as uuid_module
from collections.abc import Callable
from typing import Any

import structlog
import trio

from tmemclient.wire.codec import FrameDecoder
from tmemclient.wire.errors import InvalidArgument, ProtocolError, TmemError
from tmemclient.wire.messages import Status, encode_reply, status_for_error
from tmemd import views
from tmemd.host import Host
from tmemd.region import peer_credentials
from tmemd.server import ACCEPT_BACKOFF, send_all

log = structlog.get_logger("tmemd.admin")
audit = structlog.get_logger("tmemd.audit")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
MAX_ADMIN_FRAME = 64 << 10
ADMIN_IDLE_TIMEOUT = 300.0


class NoSuchGroup(ValueError):
    """The configured admin group does not exist on this host."""


def admin_gid(group: str | None) -> int | None:
    """The admin group's gid (a name or a number); None without one. NoSuchGroup if the name
    is not a group of this host."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise NoSuchGroup(
            f"admin group {group!r} does not exist on this host; create it (groupadd --system "
            f"{group}) or set admin_group (--admin-group) to an existing group"
        ) from exc


def peer_groups(sock: socket.socket) -> list[int]:
    """Supplementary groups of the peer (Linux >= 4.13); empty if the kernel cannot say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
    except OSError:
        return []
    return list(array.array("I", raw[: len(raw) - len(raw) % 4]))


def _uuid(args: dict[str, Any]) -> bytes:
    try:
        return uuid_module.UUID(str(args["uuid"])).bytes
    except (KeyError, ValueError) as exc:
        raise InvalidArgument(f"malformed pool uuid {args.get('uuid')!r}") from exc


def _str(args: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = args.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{key!r} must be a non-empty string")
    return value


class AdminServer:
    """Serves administrators against a Host. Its requests go ahead of guests': a guest that
    used up its turn first asks ``waiting`` and, if an administrator's request is ready, waits
    (briefly) for ``served`` (GuestServer.yield_turn)."""

    def __init__(self, host: Host, *, gid: int | None) -> None:
        self.host = host
        self.gid = gid
        self._ready = select.poll()  # the listener and every admin connection
        self._fds: set[int] = set()
        self._served = trio.Event()
        # What an administrator reads (tmemd/views.py), and what they change (Host's
        # decisions; each of those is an audit line).
        self.reads: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": lambda a: views.status(host),
            "guests": lambda a: views.guests(host),
            "uids": lambda a: views.uids(host),
            "pools": lambda a: views.pools(host, _str(a, "guest", optional=True)),
            "shares": lambda a: views.shares(host),
        }
        self.ops: dict[str, Callable[[dict[str, Any]], Any]] = {
            **self.reads,
            "set": self._set,
            "freeze": lambda a: host.freeze(_str(a, "guest", optional=True), True),
            "thaw": lambda a: host.freeze(_str(a, "guest", optional=True), False),
            "flush": lambda a: {"pages_flushed": host.flush(_str(a, "guest"))},
            "budget": lambda a: host.set_budget(a.get("bytes")),
            "grant": lambda a: host.grant(_uuid(a), _str(a, "guest")),
            "revoke": lambda a: {"detached": host.revoke(_uuid(a), _str(a, "guest"))},
        }

    def _set(self, args: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        if "weight" in args:
            kwargs["weight"] = args["weight"]
        if "cap" in args:
            kwargs["cap"] = args["cap"]
        if not kwargs:
            raise InvalidArgument("set needs weight and/or cap")
        return self.host.set_guest(_str(args, "guest"), **kwargs)

    def allowed(self, uid: int, gid: int, groups: list[int]) -> bool:
        """Root, the daemon's own uid, or the admin group."""
        if uid in (0, os.getuid()):
            return True
        return self.gid is not None and (gid == self.gid or self.gid in groups)

    def waiting(self) -> bool:
        """Is an administrator's connection or request ready to be served?"""
        return bool(self._fds) and bool(self._ready.poll(0))

    async def served(self) -> None:
        """Until the admin server next served something."""
        await self._served.wait()

    def _done(self) -> None:
        self._served.set()
        self._served = trio.Event()

    def _watch(self, fd: int) -> None:
        self._ready.register(fd, select.POLLIN)
        self._fds.add(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            self._ready.unregister(fd)

    async def run(
        self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept admin connections until cancelled."""
        lfd = listener.fileno()
        self._watch(lfd)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:
                        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                            raise
                        log.warning("admin_accept_failed", error=str(exc), retry=ACCEPT_BACKOFF)
                        self._done()
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    nursery.start_soon(self._serve, sock)
        finally:
            self._unwatch(lfd)

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        fd = sock.fileno()
        self._watch(fd)
        try:
            await self._serve_peer(sock)
        finally:
            self._unwatch(fd)
            self._done()

    async def _serve_peer(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = peer_credentials(sock)  # type: ignore[arg-type]
                groups = peer_groups(sock)  # type: ignore[arg-type]
            except OSError:
                return
            if not self.allowed(uid, gid, groups):
                audit.warning("admin_refused", pid=pid, uid=uid, gid=gid)
                with trio.move_on_after(1):
                    with contextlib.suppress(OSError):
                        await send_all(
                            sock,
                            encode_reply(
                                0,
                                Status.PERMISSION,
                                f"uid {uid} is not an administrator of this tmemd (root, its own uid, or its admin group)",
                            ),
                        )
                return
            try:
                await self._session(sock, pid, uid)
            except Exception:
                log.exception("admin_connection_failed", pid=pid, uid=uid)

    async def _session(self, sock: trio.socket.SocketType, pid: int, uid: int) -> None:
        decoder = FrameDecoder(MAX_ADMIN_FRAME)
        while True:
            with trio.move_on_after(ADMIN_IDLE_TIMEOUT) as idle:
                data = await sock.recv(MAX_ADMIN_FRAME)
            if idle.cancelled_caught or not data:
                return
            decoder.feed(data)
            replies = []
            try:
                for message in decoder.messages():
                    replies.append(self.handle(message, uid))
            except ProtocolError as exc:
                replies.append(encode_reply(0, Status.PROTOCOL, str(exc)))
                await send_all(sock, b"".join(replies))
                return
            finally:
                self._done()
            if replies:
                await send_all(sock, b"".join(replies))

    def handle(self, message: Any, uid: int) -> bytes:
        """One admin request to its reply."""
        if (
            not isinstance(message, list)
            or len(message) != 3
            or not isinstance(message[0], str)
            or not isinstance(message[1], int)
            or not isinstance(message[2], dict)
        ):
            raise ProtocolError("an admin request is [op, req_id, {args}]")
        op, req_id, args = message
        handler = self.ops.get(op)
        try:
            if handler is None:
                raise InvalidArgument(f"unknown admin op {op!r}; known: {', '.join(self.ops)}")
            result = handler(args)
        except TmemError as exc:
            return encode_reply(req_id, status_for_error(exc), str(exc))
        if op not in self.reads:
            audit.info("admin_op", op=op, uid=uid, args=args)
        return encode_reply(req_id, Status.OK, result)
