"""systemd glue in plain Python: sd_notify and socket activation, no libsystemd.

Both protocols are small and stable (sd_notify(3), sd_listen_fds(3)):
- notify: one datagram per message to ``$NOTIFY_SOCKET`` (a path, or an abstract socket when it
  starts with ``@``), e.g. ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``;
- activation: listening sockets arrive as fds 3.. with ``LISTEN_FDS`` (how many), ``LISTEN_PID``
  (must be our pid, else they are meant for someone else) and ``LISTEN_FDNAMES`` (one name per
  fd, colon-separated, from ``FileDescriptorName=``);
- the fd store: ``FDSTORE=1`` with ``FDNAME=`` and the descriptor (SCM_RIGHTS) keeps it in
  systemd across a restart; it comes back with the sockets, named, in ``LISTEN_FDS``.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3

# FileDescriptorName= of our socket units; a unit without one is named after the unit itself.
GUEST_NAMES = frozenset({"guest", "tmemd.socket"})
ADMIN_NAMES = frozenset({"admin", "tmemd-admin.socket"})


class ActivationError(Exception):
    """The environment's socket-activation variables are inconsistent."""


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self._sock: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if not under systemd or it failed."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                # Non-blocking: a notify socket whose reader fell behind must never stall the
                # event loop; a status line dropped then is replaced by the next one.
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, kind)
            self._sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        """READY=1 with a first STATUS= line."""
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A new STATUS= line."""
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        """Pet the watchdog."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd we are shutting down."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """Tell systemd a reload started (READY=1 follows when done)."""
        return self.send("RELOADING=1")

    def store_fds(self, fds: Mapping[str, int]) -> bool:
        """Hand descriptors to systemd's fd store, one message each (``FDSTORE=1``,
        ``FDNAME=``): the service gets them back in ``LISTEN_FDS`` when it starts again
        (with ``FileDescriptorStoreMax=`` in the unit; systemd ignores one it already holds).
        False if not under systemd or a send failed."""
        if self.address is None:
            return False
        ok = True
        for name, fd in fds.items():
            message = f"FDSTORE=1\nFDNAME={name}".encode()
            try:
                if self._sock is None:
                    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                    self._sock = socket.socket(socket.AF_UNIX, kind)
                self._sock.sendmsg(
                    [message],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                    0,
                    self.address,
                )
            except OSError:
                ok = False
        return ok

    def close(self) -> None:
        """Close our datagram socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, as sd_watchdog_enabled advises."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


def listen_fds(
    env: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> dict[str, list[int]]:
    """Sockets passed by systemd, by name; {} when none were passed to this process.

    With ``unset`` the variables are removed so that children do not inherit them.
    """
    env = os.environ if env is None else env
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid or not count:
        return {}
    if pid != str(os.getpid()):
        return {}  # meant for another process (we were exec'd by it, or forked)
    try:
        n = int(count)
    except ValueError as exc:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from exc
    if not 0 < n <= 64:
        raise ActivationError(f"LISTEN_FDS={n} is out of range")
    fd_names = names.split(":") if names else []
    if fd_names and len(fd_names) != n:
        raise ActivationError(f"LISTEN_FDNAMES has {len(fd_names)} names for {n} fds")
    result: dict[str, list[int]] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={n} but fd {fd} is not open") from exc
        name = fd_names[i] if fd_names else "unknown"
        result.setdefault(name, []).append(fd)
    return result


STATE_PREFIX = "state-"  # FDNAME= of the state kept in the fd store (tmemd/persist.py)


def stored_state(fds: dict[str, list[int]]) -> dict[str, int]:
    """Take the state descriptors the fd store handed back out of ``fds`` (the rest are
    sockets); by name."""
    state: dict[str, int] = {}
    for name in [n for n in fds if n.startswith(STATE_PREFIX)]:
        numbers = fds.pop(name)
        for extra in numbers[1:]:  # one of each is ever stored; more would be a stale copy
            os.close(extra)
        state[name] = numbers[0]
    return state


def activated_sockets(fds: dict[str, list[int]]) -> tuple[int | None, int | None]:
    """(guest fd, admin fd) from ``listen_fds``; checks each is a listening Unix stream socket."""
    guest = admin = None
    for name, numbers in fds.items():
        if name in GUEST_NAMES:
            role = "guest"
        elif name in ADMIN_NAMES:
            role = "admin"
        elif name == "unknown" and len(fds) == 1 and len(numbers) == 1:
            role = "guest"  # a single unnamed socket can only be the guest socket
        else:
            raise ActivationError(
                f"socket named {name!r} is not ours: name them with FileDescriptorName=guest "
                "and FileDescriptorName=admin"
            )
        if len(numbers) != 1:
            raise ActivationError(f"{len(numbers)} sockets named {name!r}; want one")
        fd = numbers[0]
        check_listening_unix(fd)
        if role == "guest":
            guest = fd
        else:
            admin = fd
    return guest, admin


def check_listening_unix(fd: int) -> None:
    """Raise ActivationError unless ``fd`` is a listening AF_UNIX stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"fd {fd} is not a socket: {exc}") from exc
    try:
        ok = (
            sock.family == socket.AF_UNIX
            and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
    finally:
        sock.detach()
    if not ok:
        raise ActivationError(f"fd {fd} is not a listening Unix stream socket")
