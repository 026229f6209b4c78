"""Daemon settings: every limit is a parameter here, never a literal in a handler."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tmemclient.protocol import FRAME_SIZE, HELLO_MAX_FRAME


@dataclass(frozen=True)
class Limits:
    """Bounds on what one guest may ask of the daemon (DESIGN.md §4)."""

    max_frame: int = 1 << 20  # bytes of one request frame
    max_batch: int = 4096  # pages in one PUT_MANY/GET_MANY/FLUSH_MANY
    max_pools: int = 64  # live pools per guest
    max_region_frames: int = 1 << 16  # 256 MiB of guest region at most
    max_connections: int = 1024  # guest connections in all
    max_connections_per_uid: int = 256
    handshake_timeout: float = 5.0  # seconds to complete HELLO after connecting
    send_timeout: float = 30.0  # seconds a guest may leave replies unread before it is dropped

    def __post_init__(self) -> None:
        if not HELLO_MAX_FRAME <= self.max_frame <= 64 << 20:
            raise ValueError(f"max_frame must be {HELLO_MAX_FRAME}..{64 << 20} bytes")
        for name in ("max_batch", "max_pools", "max_region_frames", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connections_per_uid < 1:
            raise ValueError("max_connections_per_uid must be at least 1")
        if self.handshake_timeout <= 0 or self.send_timeout <= 0:
            raise ValueError("timeouts must be positive")


@dataclass(frozen=True)
class Settings:
    """Everything tmemd needs to start."""

    socket: Path
    budget: int
    socket_mode: int = 0o660
    log_format: str = "auto"  # json | console | auto (console on a tty)
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.budget < FRAME_SIZE:
            raise ValueError(f"memory budget must be at least {FRAME_SIZE} bytes (one page)")
        if self.log_format not in ("json", "console", "auto"):
            raise ValueError("log format must be json, console or auto")
