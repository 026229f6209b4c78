"""Binding the daemon's Unix sockets safely."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import trio


class SocketInUse(Exception):
    """Another live daemon answers on the socket path."""


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a daemon that is gone; refuse to touch a live one or a
    non-socket file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise _in_use(path)


def _in_use(path: Path) -> SocketInUse:
    return SocketInUse(f"another daemon is listening on {path}; stop it or choose another path")


SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path holds 108, with the NUL)


async def bind_unix(
    path: Path, mode: int, backlog: int = 128, *, gid: int | None = None
) -> trio.socket.SocketType:
    """A listening socket at ``path`` with permissions ``mode`` from the start (no window in which
    the socket exists with wider permissions).

    The socket is bound, given its mode and made to listen under a staging name beside ``path``,
    then linked in: ``path`` appears only once it accepts connections. So a client that waits
    for the file never finds it refusing them, and another daemon's stale-socket probe never
    takes a starting daemon's socket for a dead one's and removes it. (A path too long for a
    staging name is bound in place, as before.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path)
    staging: Path | None = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(path)) + len(f"..{os.getpid()}") > SUN_PATH_MAX:
        staging = None
    where = staging or path
    if staging is not None:
        unlink_quietly(staging)  # left by a daemon that had our pid and died here
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(str(where))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        if gid is not None:
            os.chown(where, -1, gid)
        os.chmod(where, mode)
        sock.listen(backlog)
        if staging is not None:
            try:
                os.link(staging, path)  # fails if something took the path meanwhile
            except FileExistsError:
                raise _in_use(path) from None
    except BaseException:
        sock.close()
        raise
    finally:
        if staging is not None:
            unlink_quietly(staging)
    return sock


def check_private_dir(path: Path, group: bool) -> None:
    """Make sure ``path`` exists and only we (and our group, if ``group``) can write in it: the
    admin socket must not sit where another user could replace it."""
    path.mkdir(mode=0o750 if group else 0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid not in (0, os.getuid()):
        raise SocketInUse(
            f"admin socket directory {path} belongs to uid {st.st_uid}; use a directory of ours"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SocketInUse(
            f"admin socket directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            "use a directory only tmemd writes, e.g. /run/tmemd"
        )


def unlink_quietly(path: Path) -> None:
    """Remove our socket file at exit."""
    with contextlib.suppress(OSError):
        path.unlink()
