"""Daemon settings: every limit is a parameter here, never a literal in a handler."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tmemclient.wire.layout import FRAME_SIZE, MAX_RING_FRAMES
from tmemclient.wire.messages import HELLO_MAX_FRAME, valid_guest_name
from tmemclient.wire.units import parse_size
from tmemd.compress import COMPRESSORS
from tmemd.policy import DEFAULT_WEIGHT, MOVE_SLACK, validate_weight


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is accepted."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one guest may ask of the daemon (docs/design.md §4)."""

    max_frame: int = 1 << 20  # bytes of one request frame
    max_batch: int = 4096  # pages in one PUT_MANY/GET_MANY/FLUSH_MANY
    max_pools: int = 64  # live pools per guest
    max_named_pools: int = 256  # named pools per uid, held or kept for reattaching (§2.6)
    max_region_frames: int = 1 << 16  # 256 MiB of guest region at most
    max_connections: int = 1024  # guest connections in all
    max_connections_per_uid: int = 256  # for uids without their own [uids.N] connections
    handshake_timeout: float = 5.0  # seconds to complete HELLO after connecting
    send_timeout: float = 30.0  # seconds a guest may leave replies unread before it is dropped
    shutdown_grace: float = 5.0  # seconds guests are served after SIGTERM, at most
    drain_idle: float = 0.5  # ...and a guest silent this long after the notice is closed
    max_ring_frames: int = 64  # request/reply rings in the region (PROTOCOL.md §4.6); 0: none
    ring_poll_us: int = 50  # after ring work, watch every ring this long before sleeping
    ring_poll_max_us: int = 1000  # ...growing to this while requests come in short gaps
    map_pages: bool = True  # a guest may read its pages through a mapping (PROTOCOL.md §4.7)
    lend_memory: bool = True  # a mapped guest may borrow memory as its own (PROTOCOL.md §4.8)
    lend_idle_ms: int = 100  # lent memory unused this long is taken back before anything else
    # A mapped guest's put takes its own oldest page rather than a busy neighbour's unless
    # that one is older by more than this fraction: saves moving memory between their files
    # (policy.py). 0: the plain weighted LRU.
    move_slack: float = MOVE_SLACK
    # Fairness (one guest must not keep the others waiting): a connection serves requests for
    # at most this long before the others get their turn; a batch is served in slices of this
    # many bytes of pages between looks at that clock.
    turn_us: int = 200
    slice_bytes: int = 256 << 10
    # Backpressure: replies a guest has not read, held per connection at most; past this the
    # daemon reads nothing more from it until they are sent.
    max_unsent: int = 64 << 10
    # How often the memory a guest can fill on its own (its loan, its mirror's holes) is
    # measured and held to what it was granted.
    audit_ms: int = 250
    # A named pool (NEW_POOL with a name) whose connection ended is kept, with its pages, this
    # many seconds for its guest to reopen (a reconnect, a restarted client); 0: freed at once.
    reattach_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not HELLO_MAX_FRAME <= self.max_frame <= 64 << 20:
            raise ValueError(f"max_frame must be {HELLO_MAX_FRAME}..{64 << 20} bytes")
        for name in (
            "max_batch",
            "max_pools",
            "max_named_pools",
            "max_region_frames",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connections_per_uid < 1:
            raise ValueError("max_connections_per_uid must be at least 1")
        if min(self.handshake_timeout, self.send_timeout, self.drain_idle) <= 0:
            raise ValueError("timeouts must be positive")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must not be negative")
        if not 0 <= self.max_ring_frames <= MAX_RING_FRAMES:
            raise ValueError(f"max_ring_frames must be 0..{MAX_RING_FRAMES}")
        for name in ("ring_poll_us", "ring_poll_max_us"):
            if not 0 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name} must be 0..10000 (microseconds)")
        if not 1 <= self.lend_idle_ms <= 60_000:
            raise ValueError("lend_idle_ms must be 1..60000 (milliseconds)")
        if not 0 <= self.move_slack <= 0.5:
            raise ValueError("move_slack must be 0..0.5 (a fraction of a page's idle time)")
        if not 20 <= self.turn_us <= 100_000:
            raise ValueError("turn_us must be 20..100000 (microseconds)")
        if not FRAME_SIZE <= self.slice_bytes <= 64 << 20:
            raise ValueError(f"slice_bytes must be {FRAME_SIZE}..{64 << 20}")
        if not 4096 <= self.max_unsent <= 64 << 20:
            raise ValueError("max_unsent must be 4096..67108864 bytes")
        if not 10 <= self.audit_ms <= 60_000:
            raise ValueError("audit_ms must be 10..60000 (milliseconds)")
        if not 0 <= self.reattach_seconds <= 86_400:
            raise ValueError("reattach_seconds must be 0..86400 (seconds)")


@dataclass(frozen=True)
class GuestPolicy:
    """What the config says of one guest name: who may be it, and its share of memory."""

    uids: frozenset[int] | None = None  # None: any uid (only for unlisted, namespaced names)
    weight: int = DEFAULT_WEIGHT
    cap: int | None = None  # bytes
    sessions: int = 1  # connections of this name allowed at once


@dataclass(frozen=True)
class UidPolicy:
    """What the config says of one uid, a tenant: limits that hold across every guest name it
    uses (a uid that caps its listed name cannot escape the cap by connecting under another)."""

    cap: int | None = None  # bytes held by all its guests together
    max_connections: int | None = None  # None: [limits] max_connections_per_uid


UNLISTED = ("namespaced", "deny")


@dataclass(frozen=True)
class Settings:
    """Everything tmemd needs to start."""

    socket: Path
    budget: int
    admin_socket: Path | None = None
    admin_group: str | None = None
    socket_mode: int = 0o660
    log_format: str = "auto"  # json | console | auto (console on a tty)
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    # Where named pools' pages and their index are kept across restarts (tmemd/persist.py);
    # None: they die with the daemon.
    state_dir: Path | None = None
    # ...or in memfds kept in systemd's fd store (FDSTORE=1), given back on the next start.
    state_fdstore: bool = False
    guests: dict[str, GuestPolicy] = field(default_factory=dict)
    uids: dict[int, UidPolicy] = field(default_factory=dict)
    # A uid without its own [uids.N] table: the cap on all its guests together (None: none).
    uid_cap: int | None = None
    # Names not in [guests]: "namespaced" serves them as UID/NAME (the embedded default, so no
    # user can impersonate another's guest); "deny" refuses them.
    unlisted_guests: str = "namespaced"
    # Pages are compressed with this (docs/design.md §6.11): "off", "lz4" or "zstd".
    # Same-filled pages are packed whatever it says.
    compress: str = "off"
    # Identical pages of one pool are stored once (docs/design.md §6.11); never across guests.
    dedup: bool = False

    def uid_policy(self, uid: int) -> UidPolicy:
        """The limits of uid ``uid``: its [uids.N] table, else the defaults."""
        return self.uids.get(uid) or UidPolicy(cap=self.uid_cap)

    def __post_init__(self) -> None:
        if self.budget < FRAME_SIZE:
            raise ValueError(f"memory budget must be at least {FRAME_SIZE} bytes (one page)")
        if self.log_format not in ("json", "console", "auto"):
            raise ValueError("log format must be json, console or auto")
        if self.unlisted_guests not in UNLISTED:
            raise ValueError(f"unlisted_guests must be one of {UNLISTED}")
        if self.state_dir is not None and self.state_fdstore:
            raise ValueError("state_dir and state_fdstore exclude each other: keep state in one")
        if self.compress not in COMPRESSORS:
            raise ValueError(
                f"compress must be one of {', '.join(COMPRESSORS)}, got {self.compress!r}"
            )


# The keys each table accepts, with their TOML types; [limits] accepts Limits' fields
# (LIMIT_KEYS). systemd/tmemd.toml shows every one of them (tests/unit/test_systemd_config.py
# checks it).
DAEMON_KEYS = {
    "socket": str,
    "admin_socket": str,
    "admin_group": str,
    "memory": (str, int),
    "socket_mode": (str, int),
    "log_format": str,
    "log_level": str,
    "unlisted_guests": str,
    "uid_cap": (str, int),
    "state_dir": str,
    "state_fdstore": bool,
    "compress": str,
    "dedup": bool,
}
GUEST_KEYS = {"uids": list, "weight": int, "cap": (str, int), "sessions": int}
UID_KEYS = {"cap": (str, int), "max_connections": int}
LIMIT_KEYS = {
    f.name: {"float": (int, float), "bool": bool}.get(str(f.type), int) for f in fields(Limits)
}


def _check_keys(table: Any, allowed: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} in [{where}]; known: {', '.join(sorted(allowed))}"
            )
        if not isinstance(value, allowed[key]) or (
            isinstance(value, bool) and allowed[key] is not bool
        ):
            raise ConfigError(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return table


def _size(value: str | int, where: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def parse_mode(value: str | int, where: str) -> int:
    """Socket permissions: an octal string ("0660") or an integer, 0..0o777."""
    try:
        mode = int(value, 8) if isinstance(value, str) else value
    except ValueError as exc:
        raise ConfigError(f'{where} must be octal permissions like "0660", got {value!r}') from exc
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where} must be between 0000 and 0777, got {value!r}")
    return mode


def parse_guest(name: str, table: Any) -> GuestPolicy:
    """One [guests.NAME] table."""
    where = f"guests.{name}"
    if not valid_guest_name(name):
        raise ConfigError(f"[{where}]: guest names are 1..64 characters of A-Z a-z 0-9 . _ -")
    t = _check_keys(table, GUEST_KEYS, where)
    if "uids" not in t:
        raise ConfigError(f"[{where}] needs uids = [...]: the users allowed to act as this guest")
    uids = t["uids"]
    if not all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 1 << 32 for u in uids):
        raise ConfigError(f"{where}.uids must be a list of numeric uids")
    try:
        weight = validate_weight(t.get("weight", DEFAULT_WEIGHT))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    cap = None if "cap" not in t else _size(t["cap"], f"{where}.cap")
    if cap is not None and cap < 0:
        raise ConfigError(f"{where}.cap must not be negative")
    sessions = t.get("sessions", 1)
    if not 1 <= sessions <= 1024:
        raise ConfigError(f"{where}.sessions must be 1..1024")
    return GuestPolicy(frozenset(uids), weight, cap, sessions)


def parse_uid(key: str, table: Any) -> tuple[int, UidPolicy]:
    """One [uids.N] table."""
    where = f"uids.{key}"
    if not key.isdigit() or int(key) >= 1 << 32:
        raise ConfigError(f"[{where}]: a uid is a number (0..4294967295), e.g. [uids.1000]")
    t = _check_keys(table, UID_KEYS, where)
    cap = None if "cap" not in t else _size(t["cap"], f"{where}.cap")
    if cap is not None and cap < 0:
        raise ConfigError(f"{where}.cap must not be negative")
    connections = t.get("max_connections")
    if connections is not None and not 1 <= connections <= 1 << 20:
        raise ConfigError(f"{where}.max_connections must be 1..1048576")
    return int(key), UidPolicy(cap, connections)


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from a TOML file; ``overrides`` (from the command line) win over the file."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return settings_from_doc(doc, overrides or {})


def settings_from_doc(doc: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    """Settings from a parsed config document plus command-line overrides."""
    for key in doc:
        if key not in ("daemon", "limits", "guests", "uids"):
            raise ConfigError(
                f"unknown table [{key}]; known: [daemon], [limits], [guests.NAME], [uids.N]"
            )
    daemon = _check_keys(doc.get("daemon", {}), DAEMON_KEYS, "daemon")
    limits_table = _check_keys(doc.get("limits", {}), LIMIT_KEYS, "limits")
    guests_table = doc.get("guests", {})
    if not isinstance(guests_table, dict):
        raise ConfigError("[guests] must hold one table per guest: [guests.NAME]")
    guests = {name: parse_guest(name, t) for name, t in guests_table.items()}
    uids_table = doc.get("uids", {})
    if not isinstance(uids_table, dict):
        raise ConfigError("[uids] must hold one table per uid: [uids.N]")
    uids = dict(parse_uid(key, t) for key, t in uids_table.items())
    values: dict[str, Any] = {}
    for key in ("socket", "admin_socket", "state_dir"):
        if key in daemon:
            values[key] = Path(daemon[key])
    if "memory" in daemon:
        values["budget"] = _size(daemon["memory"], "daemon.memory")
    if "uid_cap" in daemon:
        values["uid_cap"] = _size(daemon["uid_cap"], "daemon.uid_cap")
    if "socket_mode" in daemon:
        values["socket_mode"] = parse_mode(daemon["socket_mode"], "daemon.socket_mode")
    for key in (
        "admin_group",
        "log_format",
        "log_level",
        "unlisted_guests",
        "state_fdstore",
        "compress",
        "dedup",
    ):
        if key in daemon:
            values[key] = daemon[key]
    values.update({k: v for k, v in overrides.items() if v is not None and k != "limits"})
    limit_values = {**limits_table, **(overrides.get("limits") or {})}
    if "socket" not in values:
        raise ConfigError("no guest socket: set daemon.socket in the config or pass --socket")
    values.setdefault("budget", 256 << 20)
    try:
        return Settings(limits=Limits(**limit_values), guests=guests, uids=uids, **values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
