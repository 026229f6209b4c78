"""``tmemd``: the host daemon's command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from tmemclient.units import format_size, parse_size
from tmemd import logs
from tmemd.admin import AdminServer, admin_gid
from tmemd.config import ConfigError, Settings, load_config, parse_mode, settings_from_doc
from tmemd.host import Host
from tmemd.listen import SocketInUse, bind_unix, check_private_dir, unlink_quietly
from tmemd.server import GuestServer
from tmemd.store import Store

log = structlog.get_logger("tmemd")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's options; each one given overrides the config file."""
    p = argparse.ArgumentParser(
        prog="tmemd", description="Transcendent memory daemon: lends a memory budget to guests."
    )
    p.add_argument("--config", type=Path, help="TOML config (see systemd/tmemd.toml)")
    p.add_argument("--socket", type=Path, help="guest socket path")
    p.add_argument(
        "--admin-socket", type=Path, help="admin socket path (0600, or 0660 with --admin-group)"
    )
    p.add_argument("--admin-group", help="group whose members may administer (name or gid)")
    p.add_argument(
        "--memory", type=_size, dest="budget", help="page budget, e.g. 256MiB (default 256MiB)"
    )
    p.add_argument("--socket-mode", type=_mode, help="octal, default 660")
    p.add_argument("--log-format", choices=("json", "console", "auto"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--max-region-frames", type=int)
    p.add_argument("--max-pools", type=int)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--handshake-timeout", type=float)
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _mode(text: str) -> int:
    try:
        return parse_mode(text, "--socket-mode")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated settings from the config file (if any) and the command line."""
    limit_keys = ("max_region_frames", "max_pools", "max_batch", "handshake_timeout")
    overrides: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "socket",
            "admin_socket",
            "admin_group",
            "budget",
            "socket_mode",
            "log_format",
            "log_level",
        )
    }
    overrides["limits"] = {k: getattr(args, k) for k in limit_keys if getattr(args, k) is not None}
    if args.config is not None:
        return load_config(args.config, overrides)
    return settings_from_doc({}, overrides)


def physical_memory() -> int:
    """Bytes of RAM, so the arena's address space lets the budget grow to it at run time."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    gid = admin_gid(settings.admin_group)
    store = Store(settings.budget, capacity=max(settings.budget, physical_memory()))
    host = Host(store, settings)
    listener = await bind_unix(settings.socket, settings.socket_mode)
    admin_listener = None
    try:
        if settings.admin_socket is not None:
            check_private_dir(settings.admin_socket.parent, gid is not None)
            mode = 0o660 if gid is not None else 0o600
            admin_listener = await bind_unix(settings.admin_socket, mode, gid=gid)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(GuestServer(host, settings.limits).run, listener)
                if admin_listener is not None:
                    await nursery.start(AdminServer(host, gid=gid).run, admin_listener)
                log.info(
                    "daemon_ready",
                    socket=str(settings.socket),
                    admin_socket=str(settings.admin_socket) if settings.admin_socket else None,
                    budget=settings.budget,
                    budget_human=format_size(settings.budget),
                    guests_configured=len(settings.guests),
                    pid=os.getpid(),
                )
                async for signum in signals:
                    log.info("daemon_stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        listener.close()
        unlink_quietly(settings.socket)
        if admin_listener is not None and settings.admin_socket is not None:
            admin_listener.close()
            unlink_quietly(settings.admin_socket)
        log.info("daemon_stopped", guests=len(host.sessions), used=store.used)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tmemd`` command."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        logs.configure(settings.log_format, settings.log_level)
        admin_gid(settings.admin_group)
    except (ConfigError, ValueError) as exc:
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(serve, settings)
    except SocketInUse as exc:
        log.error("socket_in_use", error=str(exc))
        return 1
    except PermissionError as exc:
        log.error("permission_denied", error=str(exc), hint="check the socket directory's owner")
        return 1
    return 0
