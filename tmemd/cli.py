"""``tmemd``: the host daemon's command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import structlog
import trio

from tmemclient.units import format_size, parse_size
from tmemd import logs
from tmemd.config import Limits, Settings
from tmemd.listen import SocketInUse, bind_unix, unlink_quietly
from tmemd.server import GuestServer
from tmemd.store import Store

log = structlog.get_logger("tmemd")


def guest_name(uid: int, name: str) -> str:
    """With no policy configured, guests are namespaced by uid so users cannot impersonate each
    other's guests."""
    return f"{uid}/{name}"


def build_parser() -> argparse.ArgumentParser:
    """The daemon's options."""
    p = argparse.ArgumentParser(
        prog="tmemd", description="Transcendent memory daemon: lends a memory budget to guests."
    )
    p.add_argument("--socket", type=Path, required=True, help="guest socket path")
    p.add_argument(
        "--memory", type=_size, default=256 << 20, help="page budget, e.g. 256MiB (default 256MiB)"
    )
    p.add_argument(
        "--socket-mode", type=lambda s: int(s, 8), default=0o660, help="octal, default 660"
    )
    p.add_argument("--log-format", choices=("json", "console", "auto"), default="auto")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--max-region-frames", type=int, default=Limits.max_region_frames)
    p.add_argument("--max-pools", type=int, default=Limits.max_pools)
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--handshake-timeout", type=float, default=Limits.handshake_timeout)
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated settings; ValueError says what is wrong."""
    limits = Limits(
        max_region_frames=args.max_region_frames,
        max_pools=args.max_pools,
        max_batch=args.max_batch,
        handshake_timeout=args.handshake_timeout,
    )
    return Settings(
        socket=args.socket,
        budget=args.memory,
        socket_mode=args.socket_mode,
        log_format=args.log_format,
        log_level=args.log_level,
        limits=limits,
    )


def physical_memory() -> int:
    """Bytes of RAM, so the arena's address space lets the budget grow to it at run time."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    store = Store(settings.budget, capacity=max(settings.budget, physical_memory()))
    listener = await bind_unix(settings.socket, settings.socket_mode)
    server = GuestServer(store, settings.limits, name_for=guest_name)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run, listener)
                log.info(
                    "daemon_ready",
                    socket=str(settings.socket),
                    budget=settings.budget,
                    budget_human=format_size(settings.budget),
                    pid=os.getpid(),
                )
                async for signum in signals:
                    log.info("daemon_stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        listener.close()
        unlink_quietly(settings.socket)
        log.info("daemon_stopped", guests=len(store.guests), used=store.used)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tmemd`` command."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        logs.configure(settings.log_format, settings.log_level)
    except ValueError as exc:
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
