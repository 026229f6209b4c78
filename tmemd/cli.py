"""``tmemd``: the host daemon's command line, and its life as a service.

    tmemd --socket PATH [--admin-socket PATH] [--memory SIZE] [--config FILE] ...
    tmemd check-config FILE

Under systemd the sockets come from socket activation (LISTEN_FDS, names ``guest`` and
``admin``), readiness and status go to NOTIFY_SOCKET, and the watchdog is petted from the event
loop. SIGTERM stops accepting, sends every guest a SHUTDOWN notice and drains for at most
``shutdown_grace`` seconds; SIGHUP reloads the config (weights, caps, guest policy, log level)
and keeps the old one if the new one is invalid.

Exit codes: 0 stopped cleanly; 2 what was asked cannot work (a bad option or config, a missing
admin group, a budget the host cannot reserve memory for): one line on stderr, ``tmemd: ...``,
saying what to do; 1 a socket cannot be listened on, logged as its own event
(``socket_in_use``, ``socket_dir_missing``, ``admin_socket_dir_unsafe``, ``permission_denied``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog
import trio

from tmemclient._build import build
from tmemclient.wire.layout import FRAME_SHIFT
from tmemclient.wire.units import format_size, size_arg
from tmemd import __version__, logs
from tmemd.admin import AdminServer, NoSuchGroup, admin_gid
from tmemd.compress import COMPRESSORS, codec
from tmemd.config import ConfigError, Settings, load_config, parse_mode, settings_from_doc
from tmemd.host import Host
from tmemd.listen import ListenError, bind_unix, check_private_dir, require_dir, unlink_quietly
from tmemd.memfiles import MemFile
from tmemd.persist import FD_NAMES, Adoption, Found, StateDir, StateError, adopt
from tmemd.server import GuestServer
from tmemd.store import Store
from tmemd.systemd import (
    ActivationError,
    Notifier,
    activated_sockets,
    listen_fds,
    stored_state,
)

log = structlog.get_logger("tmemd")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's options; each one given overrides the config file."""
    p = argparse.ArgumentParser(
        prog="tmemd",
        description="Transcendent memory daemon: lends a memory budget to guests. "
        "`tmemd check-config FILE` validates a config and prints the effective settings.",
    )
    p.add_argument(
        "--version",
        action="version",
        # compiled: the hot modules are mypyc extensions; pure: Python (docs/performance.md)
        version=f"tmemd {__version__} ({build()})",
    )
    p.add_argument("--config", type=Path, help="TOML config (see systemd/tmemd.toml)")
    p.add_argument(
        "--socket", type=Path, help="guest socket path (not needed when socket-activated)"
    )
    p.add_argument(
        "--admin-socket", type=Path, help="admin socket path (0600, or 0660 with --admin-group)"
    )
    p.add_argument("--admin-group", help="group whose members may administer (name or gid)")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="keep named pools' pages here across restarts and crashes (a tmpfs directory "
        "only tmemd's user can write, e.g. /run/tmemd-state)",
    )
    p.add_argument(
        "--state-fdstore",
        action="store_const",
        const=True,
        help="keep named pools' pages across restarts in memfds held by systemd's fd store "
        "(FDSTORE=1; the unit needs FileDescriptorStoreMax=), instead of --state-dir",
    )
    p.add_argument(
        "--memory", type=size_arg, dest="budget", help="page budget, e.g. 256MiB (default 256MiB)"
    )
    p.add_argument("--socket-mode", type=_mode, help="octal, default 660")
    p.add_argument(
        "--compress",
        choices=COMPRESSORS,
        help="compress pages that compress well (lz4: fast; zstd: tighter); same-filled pages "
        "are packed either way (default: off)",
    )
    p.add_argument(
        "--dedup",
        action=argparse.BooleanOptionalAction,
        help="store identical pages of one pool once (never across guests; default: off)",
    )
    p.add_argument("--log-format", choices=("json", "console", "auto"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--max-region-frames", type=int)
    p.add_argument("--max-pools", type=int)
    p.add_argument("--max-named-pools", type=int, help="named pools per uid, held or kept")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--handshake-timeout", type=float)
    p.add_argument(
        "--reattach-seconds",
        type=float,
        help="seconds a named pool is kept for its guest after its connection ends (60)",
    )
    p.add_argument(
        "--shutdown-grace", type=float, help="seconds guests are served after SIGTERM (5)"
    )
    p.add_argument(
        "--max-ring-frames",
        type=int,
        help="largest request/reply ring a guest may have, in frames (64; 0: sockets only)",
    )
    p.add_argument(
        "--ring-poll-us",
        type=int,
        help="microseconds to watch a busy guest's ring before sleeping (50; 0: never)",
    )
    p.add_argument(
        "--ring-poll-max-us",
        type=int,
        help="microseconds that watch may grow to for a guest whose requests come in short "
        "gaps (1000; as KVM's halt polling)",
    )
    p.add_argument(
        "--map-pages",
        action=argparse.BooleanOptionalAction,
        help="let guests that ask read their own pages through a read-only mapping, with no "
        "round trip (default: on)",
    )
    p.add_argument(
        "--lend-memory",
        action=argparse.BooleanOptionalAction,
        help="let mapped guests that ask borrow memory from the budget to use as their own, "
        "taken back when others need it (default: on)",
    )
    return p


def _mode(text: str) -> int:
    try:
        return parse_mode(text, "--socket-mode")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


LIMIT_OPTIONS = (
    "max_region_frames",
    "max_pools",
    "max_named_pools",
    "max_batch",
    "handshake_timeout",
    "shutdown_grace",
    "reattach_seconds",
    "max_ring_frames",
    "ring_poll_us",
    "ring_poll_max_us",
    "map_pages",
    "lend_memory",
)
SETTING_OPTIONS = (
    "socket",
    "state_dir",
    "state_fdstore",
    "admin_socket",
    "admin_group",
    "budget",
    "socket_mode",
    "log_format",
    "log_level",
    "compress",
    "dedup",
)


def settings_from_args(args: argparse.Namespace, *, activated: bool = False) -> Settings:
    """Validated settings from the config file (if any) and the command line."""
    overrides: dict[str, Any] = {k: getattr(args, k) for k in SETTING_OPTIONS}
    overrides["limits"] = {
        k: getattr(args, k) for k in LIMIT_OPTIONS if getattr(args, k) is not None
    }
    if activated and overrides["socket"] is None:
        overrides["socket"] = Path("(socket-activated)")
    if args.config is not None:
        return load_config(args.config, overrides)
    return settings_from_doc({}, overrides)


def physical_memory() -> int:
    """Bytes of RAM, so the arena's address space lets the budget grow to it at run time."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Descriptors a guest costs tmemd: its socket and mmap's copy of its region memfd; with a
# mirror (map_pages), the mirror's memfd and mmap's copy of it; with a loan (lend_memory), the
# loan file's two. (The arena's two are tmemd's own.)
FDS_PER_GUEST = {"plain": 2, "mapped": 4, "mapped_lending": 6}


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each guest costs tmemd up to six fds,
    FDS_PER_GUEST). Returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # the kernel caps NOFILE at fs.nr_open anyway
        target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return target, hard


def status_line(host: Host) -> str:
    """The one-line summary systemd shows (STATUS=)."""
    store = host.store
    return f"{len(host.sessions)} guests, {format_size(store.used)} of {format_size(store.budget)} used"


class StartError(Exception):
    """tmemd cannot start as asked; the message says what failed and what to do."""


def arena_failure(exc: OSError, budget: int, capacity: int, ram: int) -> str:
    """What to tell an administrator whose budget tmemd could not reserve memory for."""
    what = f"cannot reserve {format_size(capacity)} of memory for the page arena"
    reason = exc.strerror or str(exc)
    if budget > ram:
        return (
            f"{what} (--memory {format_size(budget)}): {reason}; this host has "
            f"{format_size(ram)} of RAM: give a smaller --memory (daemon.memory in the config)"
        )
    return (
        f"{what} (the budget, {format_size(budget)}, may grow up to this host's RAM at run "
        f"time): {reason}; raise tmemd's address-space limit (ulimit -v, LimitAS=) or the "
        "kernel's overcommit limit (vm.overcommit_memory)"
    )


class Daemon:
    """The daemon's lifetime: sockets, servers, signals, systemd notifications."""

    def __init__(
        self,
        settings: Settings,
        args: argparse.Namespace,
        activated: dict[str, int],
        stored: dict[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.args = args
        self.activated = activated
        self.notifier = Notifier()
        ram = physical_memory()
        capacity = max(settings.budget, ram)
        self.state: StateDir | None = None
        arena: MemFile | None = None
        found: Found | str = ""
        stored = dict(stored or {})
        if settings.state_fdstore:
            self.state = self._fd_store_state(stored, capacity >> FRAME_SHIFT)
        elif stored:  # the fd store kept state this start was not asked to use
            log.warning("state_fds_unused", names=sorted(stored), hint="set state_fdstore")
            for fd in stored.values():
                os.close(fd)
        if settings.state_dir is not None:
            try:
                self.state = StateDir(settings.state_dir, capacity >> FRAME_SHIFT)
            except (StateError, OSError) as exc:
                raise StartError(f"state directory: {exc}") from exc
        if self.state is not None:
            try:
                arena, found = self.state.open()
            except OSError as exc:
                raise StartError(f"state ({self.state.where}): {exc}") from exc
            # Handed to systemd every start (it keeps one copy of each): the next start gets
            # them back in LISTEN_FDS.
            if settings.state_fdstore:
                self.notifier.store_fds(self.state.fds())
        self.store = self._make_store(settings, capacity, ram, arena)
        self.host = Host(self.store, settings)
        if self.state is not None:
            self._adopt(found)
        self.guest_server = GuestServer(self.host, settings.limits)
        self._owned: list[Path] = []  # socket files we created (and remove at exit)

    def _fd_store_state(self, stored: dict[str, int], capacity_slots: int) -> StateDir:
        """State in memfds of systemd's fd store: those it handed back, or new ones."""
        if not self.notifier.enabled:
            raise StartError(
                "state_fdstore needs systemd's fd store (no NOTIFY_SOCKET: not started by "
                "systemd); without systemd keep state in a directory: --state-dir DIR"
            )
        if set(stored) != set(FD_NAMES):
            for fd in stored.values():
                os.close(fd)
            if stored:
                log.warning("state_fds_incomplete", names=sorted(stored), action="started empty")
            try:
                stored = StateDir.memfds()
            except OSError as exc:
                raise StartError(f"cannot make memfds for the state: {exc}") from exc
        return StateDir(None, capacity_slots, stored)

    def _make_store(
        self, settings: Settings, capacity: int, ram: int, arena: MemFile | None
    ) -> Store:
        try:
            store = Store(
                settings.budget,
                capacity=capacity,
                move_slack=settings.limits.move_slack,
                lend_idle=settings.limits.lend_idle_ms / 1000,
                deferred=True,  # heavy frees in slices and worker threads (GuestServer.maintain)
                arena=arena,
                codec=codec(settings.compress),
                dedup=settings.dedup,
            )
        except OSError as exc:  # the arena's address space (mmap: ENOMEM), or its memfd
            raise StartError(arena_failure(exc, settings.budget, capacity, ram)) from exc
        store.journal = self.state
        return store

    def _adopt(self, found: Found | str) -> None:
        """Adopt what the state directory holds, or start empty and say why; never half."""
        state = self.state
        assert state is not None
        where = state.where
        if isinstance(found, Found):
            try:
                adoption = adopt(state, found, self.store, self.host)
            except Exception as exc:  # a bug: never serve half of it
                log.exception("state_adoption_failed", dir=where)
                state.discard()
                self.store = self._make_store(
                    self.settings, self.store.capacity, physical_memory(), self.store.arena
                )
                self.host = Host(self.store, self.settings)
                found = f"adoption failed: {type(exc).__name__}: {exc}"
            else:
                self.host.adoption = adoption
                log.info("state_adopted", **adoption.as_dict())
                return
        self.host.adoption = Adoption(where, False, reason=found)
        if state.fresh and found == "no state yet":
            log.info("state_started_empty", dir=where, reason=found)
        else:
            log.warning("state_discarded", dir=where, reason=found, action="started empty")

    async def _listener(
        self, role: str, path: Path | None, mode: int, gid: int | None
    ) -> trio.socket.SocketType | None:
        fd = self.activated.get(role)
        if fd is not None:
            return trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        if path is None:
            return None
        if role == "admin":
            check_private_dir(path.parent, gid)
        sock = await bind_unix(path, mode, gid=gid)
        self._owned.append(path)
        return sock

    def _release(self, *listeners: trio.socket.SocketType | None) -> None:
        """Close the listeners and remove the socket files this daemon created."""
        for listener in listeners:
            if listener is not None:
                listener.close()
        for path in self._owned:
            unlink_quietly(path)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""
        settings = self.settings
        gid = admin_gid(settings.admin_group)
        if "guest" not in self.activated:
            # Before the admin socket (and the directory made for it): nothing to undo.
            require_dir(settings.socket)
        signals_wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals_wanted) as signals:
            # The admin socket first: once the guest socket takes connections, tmemd is whole
            # (a script that waits for the guest socket and then runs tmemctl finds it too).
            admin_path = settings.admin_socket
            admin_listener = await self._listener(
                "admin", admin_path, 0o660 if gid is not None else 0o600, gid
            )
            try:
                listener = await self._listener(
                    "guest", settings.socket, settings.socket_mode, None
                )
            except BaseException:
                self._release(admin_listener)
                raise
            assert listener is not None
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.guest_server.maintain)
                    await nursery.start(self.guest_server.poller.run)
                    await nursery.start(self.guest_server.run, listener)
                    admin_scope = trio.CancelScope()
                    if admin_listener is not None:
                        admin = AdminServer(self.host, gid=gid)
                        self.guest_server.admin_gate = admin
                        nursery.start_soon(self._admin, admin, admin_listener, admin_scope)
                    log.info(
                        "daemon_ready",
                        socket=str(settings.socket)
                        if "guest" not in self.activated
                        else "activated",
                        admin_socket=str(admin_path)
                        if "admin" not in self.activated
                        else "activated",
                        budget=settings.budget,
                        budget_human=format_size(settings.budget),
                        compress=settings.compress,
                        dedup=settings.dedup,
                        guests_configured=len(settings.guests),
                        pid=os.getpid(),
                    )
                    self.notifier.ready(status_line(self.host))
                    nursery.start_soon(self._report_status)
                    if self.notifier.watchdog_interval:
                        nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            self.reload()
                            continue
                        self._stop(signal.Signals(signum).name, admin_scope)
                        break
                    # The guest server returns once every connection drained; then we go.
                    # self.settings, not settings: a reload may have changed the grace.
                    with trio.move_on_after(self.settings.limits.shutdown_grace + 2):
                        while self.guest_server.connections:
                            await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            finally:
                self._release(listener, admin_listener)
                self.notifier.close()
                log.info("daemon_stopped", guests=len(self.host.sessions), used=self.store.used)

    async def _admin(
        self, server: AdminServer, listener: trio.socket.SocketType, scope: trio.CancelScope
    ) -> None:
        with scope:
            await server.run(listener)

    def _stop(self, signame: str, admin_scope: trio.CancelScope) -> None:
        grace = self.settings.limits.shutdown_grace
        log.info("daemon_stopping", signal=signame, guests=len(self.host.sessions), grace=grace)
        self.notifier.stopping()
        admin_scope.cancel()
        self.guest_server.shutdown(grace)

    def reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one if the new one is invalid."""
        if self.args.config is None:
            log.warning("config_reload_skipped", reason="tmemd was started without --config")
            return
        self.notifier.reloading()
        try:
            new = settings_from_args(self.args, activated=bool(self.activated))
            logs.configure(new.log_format, new.log_level)
        except (ConfigError, ValueError) as exc:
            log.error(
                "config_reload_failed",
                config=str(self.args.config),
                error=str(exc),
                kept="old config",
            )
            self.notifier.ready(status_line(self.host))
            return
        restart_needed = [
            key
            for key in (
                "socket",
                "admin_socket",
                "admin_group",
                "socket_mode",
                "budget",
                "compress",  # pages stored compressed need the codec they were stored with
                "dedup",
            )
            if getattr(new, key) != getattr(self.settings, key)
        ]
        if new.limits != self.settings.limits:
            # Connections keep the limits they were served under; shutdown_grace applies now.
            restart_needed.append("limits (for connections made before the reload)")
        changed = self.host.reload(new)
        self.settings = new
        self.guest_server.limits = new.limits  # new connections get the new limits
        self.store.move_slack = new.limits.move_slack  # arbitration: at once
        self.store.lend_idle = new.limits.lend_idle_ms / 1000
        log.info(
            "config_reloaded",
            config=str(self.args.config),
            guests_changed=changed,
            needs_restart=restart_needed or None,
        )
        self.notifier.ready(status_line(self.host))

    async def _report_status(self) -> None:
        last = ""
        while True:
            line = status_line(self.host)
            if line != last:
                self.notifier.status(line)
                last = line
            await trio.sleep(1)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


def check_config(path: Path) -> int:
    """``tmemd check-config FILE``: validate the file and print the effective settings.

    Exit 2 if the file is invalid. A fact of this host rather than of the file, an admin group
    that does not exist (yet: the install steps create it after copying the config), is a
    warning naming what to do: the file passes, and tmemd still refuses to start without it."""
    try:
        settings = load_config(path, {"limits": {}})
    except (ConfigError, ValueError) as exc:
        print(f"tmemd: {path}: {exc}", file=sys.stderr)
        return 2
    warnings = []
    try:
        admin_gid(settings.admin_group)
    except NoSuchGroup as exc:
        warnings.append(f"{exc}; until then tmemd refuses to start with this config")
    effective = asdict(settings)
    effective["budget_human"] = format_size(settings.budget)
    effective["socket_mode"] = f"{settings.socket_mode:04o}"
    for policy in effective["guests"].values():
        policy["uids"] = sorted(policy["uids"])
    print(json.dumps(effective, indent=2, default=str))
    for warning in warnings:
        print(f"tmemd: warning: {path}: {warning}", file=sys.stderr)
    print(f"tmemd: {path} is valid", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tmemd`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-config"]:
        if len(argv) != 2:
            print("usage: tmemd check-config FILE", file=sys.stderr)
            return 2
        return check_config(Path(argv[1]))
    args = build_parser().parse_args(argv)
    try:
        passed = listen_fds()
        stored = stored_state(passed)  # what the fd store kept of the last run's state
        guest_fd, admin_fd = activated_sockets(passed)
    except ActivationError as exc:
        print(f"tmemd: socket activation: {exc}", file=sys.stderr)
        return 2
    activated = {k: v for k, v in (("guest", guest_fd), ("admin", admin_fd)) if v is not None}
    try:
        if "guest" not in activated and args.socket is None and args.config is None:
            raise ConfigError(
                "no guest socket: pass --socket PATH, --config FILE, or start via tmemd.socket"
            )
        settings = settings_from_args(args, activated="guest" in activated)
        logs.configure(settings.log_format, settings.log_level)
        admin_gid(settings.admin_group)
    except (ConfigError, ValueError) as exc:
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2
    soft, hard = raise_fd_limit()
    try:
        daemon = Daemon(settings, args, activated, stored)
    except StartError as exc:
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2
    log.info("daemon_build", version=__version__, build=build())
    log.info(
        "fd_limit",
        soft=soft,
        hard=hard,
        fds_per_guest=FDS_PER_GUEST,
        guests_at_most=soft // FDS_PER_GUEST["mapped_lending"],
    )
    try:
        trio.run(daemon.run)
    except ListenError as exc:  # socket_in_use, socket_dir_missing, admin_socket_dir_unsafe
        log.error(exc.event, error=str(exc), **exc.fields)
        return 1
    except PermissionError as exc:
        log.error("permission_denied", error=str(exc), hint="check the socket directory's owner")
        return 1
    return 0
