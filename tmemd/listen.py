"""Binding the daemon's Unix sockets safely.

Every refusal is a ``ListenError`` whose message says what to do, and whose ``event`` and
``fields`` are what the daemon logs (one event name per cause, so an administrator can tell a
socket another daemon holds from a directory that is missing or unsafe).

Directories: the guest socket's directory must exist already. Who may reach the socket (a
group's search permission on that directory) is the administrator's to set, and a typo in the
path must not quietly make directories. The admin socket's own directory is the exception:
tmemd creates it if it is missing (not its parents), because it must be tmemd's and private
(0700, or 0750 with the admin group), which is easiest to get right by making it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any

import trio


class ListenError(Exception):
    """tmemd cannot, or must not, listen at a path. ``event`` names the cause in the log;
    ``fields`` are the facts to log with it."""

    event = "listen_failed"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.fields = fields


class SocketInUse(ListenError):
    """Another live daemon answers on the socket path (or a non-socket file is there)."""

    event = "socket_in_use"


class SocketDirMissing(ListenError):
    """The directory a socket should be in does not exist."""

    event = "socket_dir_missing"


class AdminDirUnsafe(ListenError):
    """The admin socket's directory is another user's, or others may write in it: whoever can
    could replace the socket and take the administrators' requests."""

    event = "admin_socket_dir_unsafe"


def require_dir(path: Path, role: str = "guest") -> None:
    """SocketDirMissing unless the directory of socket ``path`` exists."""
    if not path.parent.is_dir():
        raise SocketDirMissing(
            f"the directory {path.parent} of the {role} socket {path} does not exist; create it "
            "(with the permissions those who connect need to reach the socket) or choose "
            "another path",
            directory=str(path.parent),
            socket=str(path),
        )


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a daemon that is gone; refuse to touch a live one or a
    non-socket file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(
            f"{path} exists and is not a socket; remove it or choose another path", socket=str(path)
        )
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
    return SocketInUse(
        f"another daemon is listening on {path}; stop it or choose another path", socket=str(path)
    )


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
    staging name is bound in place, as before.) SocketDirMissing if ``path``'s directory does
    not exist: it is never created here."""
    require_dir(path)
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


def check_private_dir(path: Path, gid: int | None) -> None:
    """Make sure directory ``path`` (of the admin socket) exists and only we (and group
    ``gid``, if given) can write in it: the admin socket must not sit where another user could
    replace it. A missing ``path`` is created, 0700 (0750 and group ``gid`` with an admin
    group, so its members can reach the socket); its parent must exist. AdminDirUnsafe or
    SocketDirMissing otherwise."""
    mode = 0o700 if gid is None else 0o750
    try:
        path.mkdir(mode=mode)
    except FileNotFoundError:
        raise SocketDirMissing(
            f"the directory {path.parent} of the admin socket's directory {path} does not "
            "exist; tmemd creates only the admin socket's own directory: create its parent or "
            "choose another path",
            directory=str(path.parent),
        ) from None
    except FileExistsError:
        pass
    else:  # ours: its mode whatever the umask, its group the admin group
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise AdminDirUnsafe(
            f"admin socket directory {path} is not a directory; choose a directory only tmemd "
            "writes, e.g. /run/tmemd",
            directory=str(path),
        )
    if st.st_uid not in (0, os.getuid()):
        raise AdminDirUnsafe(
            f"admin socket directory {path} belongs to uid {st.st_uid}, not to tmemd (uid "
            f"{os.getuid()}) or root; chown it, or choose a directory only tmemd writes, e.g. "
            "/run/tmemd",
            directory=str(path),
            owner=st.st_uid,
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode_text = f"{stat.S_IMODE(st.st_mode):04o}"
        raise AdminDirUnsafe(
            f"admin socket directory {path} is writable by others (mode {mode_text}), who could "
            f"replace the socket; chmod {'0750' if gid is not None else '0700'} {path}, or "
            "choose a directory only tmemd writes, e.g. /run/tmemd",
            directory=str(path),
            mode=mode_text,
        )


def unlink_quietly(path: Path) -> None:
    """Remove our socket file at exit."""
    with contextlib.suppress(OSError):
        path.unlink()
