"""``tmemctl``: the administrator's command line for tmemd (its admin socket).

Read commands (``status``, ``guests``, ``pools``, ``share list``) print aligned tables, or with
``--json`` the daemon's result unchanged (its field names are the daemon's keys, listed in
README.md "Administration: tmemctl"). Write commands print one line saying what happened.
``top`` refreshes a table of guests with per-interval rates.

Exit codes: 0 done; 1 the daemon refused or did not know the guest/grant, or no daemon answered;
2 usage error (caught here, before anything is sent). Errors go to stderr as ``tmemctl: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid as uuid_module
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, TextIO

from tmemclient.wire.errors import DaemonGone, PermissionDenied, TmemError
from tmemclient.wire.units import format_size, size_arg
from tmemd.ctl.client import ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET, AdminClient

PROG: Final = "tmemctl"
EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
# Mirrors tmemd.policy.MAX_WEIGHT (tmemclient never imports tmemd); the daemon checks it again.
MAX_WEIGHT: Final = 10_000
DEFAULT_TIMEOUT: Final = 10.0
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
NONE: Final = "-"


# ------------------------------------------------------------------------------ argument types


def _uuid_arg(text: str) -> str:
    try:
        return str(uuid_module.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"malformed pool uuid {text!r} (want e.g. 12345678-1234-5678-1234-567812345678)"
        ) from None


def _weight_arg(text: str) -> int:
    try:
        weight = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight must be an integer, got {text!r}") from None
    if not 1 <= weight <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"weight must be from 1 to {MAX_WEIGHT}, got {weight}")
    return weight


def _cap_arg(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    return size_arg(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of seconds, got {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"want a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a positive integer, got {value}")
    return value


def _guest_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a guest name cannot be empty")
    return text


# ------------------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    """The command line: global options (also accepted after the command) and the commands."""
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, suppress=True)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer tmemd through its admin socket.",
        epilog="Exit codes: 0 ok, 1 refused / not found / no daemon, 2 usage error.",
    )
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common], **kw)

    command("status", "global figures: budget, used, free, guests, evictions, uptime")
    command("guests", "one row per guest (and per shared pool's account)")
    command("uids", "one row per uid (tenant): what all of its guests hold, its cap")
    p = command("pools", "one row per pool, of one guest or of all")
    p.add_argument("guest", nargs="?", type=_guest_arg, metavar="GUEST")

    p = command(
        "set",
        "change a guest's weight and/or cap (now and when it reconnects); uid:N sets a uid's "
        "cap across all its guests",
    )
    p.add_argument("guest", type=_guest_arg, metavar="GUEST|shared:UUID|uid:N")
    p.add_argument("--weight", type=_weight_arg, metavar="N", help=f"1..{MAX_WEIGHT}")
    p.add_argument(
        "--cap",
        type=_cap_arg,
        default=argparse.SUPPRESS,
        metavar="SIZE|none",
        help="bytes or K/M/G (KiB/MiB/GiB); none removes the cap",
    )

    p = command("freeze", "refuse a guest's puts (no GUEST: every guest, and new ones)")
    p.add_argument("guest", nargs="?", type=_guest_arg, metavar="GUEST")
    p = command("thaw", "accept a guest's puts again (no GUEST: every guest)")
    p.add_argument("guest", nargs="?", type=_guest_arg, metavar="GUEST")
    p = command("flush", "drop every ephemeral page of a guest (persistent pages stay)")
    p.add_argument("guest", type=_guest_arg, metavar="GUEST")
    p = command("budget", "change the daemon's page budget now")
    p.add_argument("size", type=size_arg, metavar="SIZE", help="bytes or K/M/G (KiB/MiB/GiB)")

    share = command("share", "grants of shared pools")
    share_sub = share.add_subparsers(dest="share_command", required=True, metavar="ACTION")
    for action, text in (
        ("grant", "allow GUEST to open shared pool UUID"),
        ("revoke", "withdraw the grant and detach GUEST's connections from the pool"),
    ):
        p = share_sub.add_parser(action, help=text, description=text, parents=[common])
        p.add_argument("uuid", type=_uuid_arg, metavar="UUID")
        p.add_argument("guest", type=_guest_arg, metavar="GUEST")
    text = "grants and live shared pools"
    share_sub.add_parser("list", help=text, description=text, parents=[common])

    p = command("top", "a refreshing view of guests with per-interval rates (Ctrl-C quits)")
    p.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="SECONDS", help="default 1"
    )
    p.add_argument(
        "--iterations", type=_positive_int, default=None, metavar="N", help="default: until Ctrl-C"
    )
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--admin-socket",
        default=default(None),
        metavar="PATH",
        help=f"tmemd's admin socket (default: ${ADMIN_SOCKET_ENV}, else {DEFAULT_ADMIN_SOCKET})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the daemon's result as JSON (field names: README.md)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )


def admin_socket_path(option: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The admin socket: the option, else $TMEM_ADMIN_SOCKET, else the default path."""
    if option:
        return option
    env = os.environ if environ is None else environ
    return env.get(ADMIN_SOCKET_ENV) or DEFAULT_ADMIN_SOCKET


# ------------------------------------------------------------------------------ formatting


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[str] = ()
) -> str:
    """Aligned columns, two spaces apart: the ``left`` columns left-aligned, the others (figures)
    right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if headers[i] in left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def _size(value: Any) -> str:
    return NONE if value is None else format_size(int(value))


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _percent(hits: float, misses: float) -> str:
    total = hits + misses
    return NONE if total <= 0 else f"{100.0 * hits / total:.1f}%"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def _count(value: Any) -> str:
    return NONE if value is None else str(value)


_STATUS_FORMAT: Final[dict[str, Callable[[Any], str]]] = {
    "budget": _size,
    "used": _size,
    "free": _size,
    "capacity": _size,
    "moved": _size,
    "lent": _size,
    "recalled": _size,
    "resident": _size,
    "overdrawn": _size,
    "frozen_all": _yes,
    "uptime": lambda v: _duration(float(v)),
}


def render_status(status: Mapping[str, Any]) -> str:
    """``status`` as ``key  value`` lines (sizes human-readable)."""
    labels = {key: key.replace("_", " ") for key in status}
    width = max((len(label) for label in labels.values()), default=0)
    return "\n".join(
        f"{labels[key].ljust(width)}  {_STATUS_FORMAT.get(key, _count)(value)}"
        for key, value in status.items()
    )


def render_guests(rows: Sequence[Mapping[str, Any]]) -> str:
    """``guests`` as a table."""
    headers = (
        "NAME", "KIND", "SESS", "WEIGHT", "CAP", "FROZEN", "MAPPED", "EPHEMERAL", "PERSISTENT",
        "LENT", "PAGES", "POOLS", "PUTS", "REFUSED", "HIT%", "EVICTED",
    )  # fmt: skip
    body = [
        [
            str(r.get("name")),
            str(r.get("kind", NONE)),
            _count(r.get("sessions")),
            _count(r.get("weight")),
            _size(r.get("cap")),
            _yes(r.get("frozen")),
            _yes(r.get("mapped")),
            _size(r.get("ephemeral_bytes")),
            _size(r.get("persistent_bytes")),
            _size(r.get("lent_bytes")),
            _count(r.get("pages")),
            _count(r.get("pools")),
            _count(r.get("puts_ok")),
            _count(r.get("puts_refused")),
            _percent(r.get("gets_hit", 0), r.get("gets_miss", 0)),
            _count(r.get("evictions")),
        ]
        for r in rows
    ]
    return (
        format_table(headers, body, left={"NAME", "KIND", "FROZEN", "MAPPED"})
        if body
        else "no guests"
    )


def render_uids(rows: Sequence[Mapping[str, Any]]) -> str:
    """``uids`` as a table."""
    headers = (
        "UID", "GUESTS", "SESS", "CAP", "MAXCONN", "EPHEMERAL", "PERSISTENT", "LENT", "HELD",
    )  # fmt: skip
    body = [
        [
            str(r.get("uid")),
            ",".join(r.get("guests") or []) or NONE,
            _count(r.get("sessions")),
            _size(r.get("cap")),
            _count(r.get("max_connections")),
            _size(r.get("ephemeral_bytes")),
            _size(r.get("persistent_bytes")),
            _size(r.get("lent_bytes")),
            _size(r.get("held_bytes")),
        ]
        for r in rows
    ]
    return format_table(headers, body, left={"GUESTS"}) if body else "no uids"


def render_pools(rows: Sequence[Mapping[str, Any]]) -> str:
    """``pools`` as a table."""
    headers = (
        "POOL", "GUEST", "KIND", "UUID", "MEMBERS", "PAGE", "PAGES", "BYTES",
        "PUTS", "REFUSED", "HIT%", "EVICTED",
    )  # fmt: skip
    body = [
        [
            _count(r.get("pool")),
            str(r.get("guest")),
            str(r.get("kind")) + (" shared" if r.get("shared") else ""),
            str(r.get("uuid") or NONE),
            ",".join(r.get("members") or ()) if r.get("shared") else NONE,
            _size(r.get("page_size")),
            _count(r.get("pages")),
            _size(r.get("bytes")),
            _count(r.get("puts_ok")),
            _count(r.get("puts_refused")),
            _percent(r.get("gets_hit", 0), r.get("gets_miss", 0)),
            _count(r.get("evictions")),
        ]
        for r in rows
    ]
    return (
        format_table(headers, body, left={"GUEST", "KIND", "UUID", "MEMBERS"})
        if body
        else "no pools"
    )


def render_shares(shares: Mapping[str, Any]) -> str:
    """``share list``: the grants, then the live shared pools."""
    grants = [[str(g["uuid"]), str(g["guest"])] for g in shares.get("grants", [])]
    pools = [
        [str(p["uuid"]), ",".join(p.get("members") or ()) or NONE, _count(p.get("pages"))]
        for p in shares.get("pools", [])
    ]
    return "\n".join(
        [
            "grants:",
            format_table(("UUID", "GUEST"), grants, left={"UUID", "GUEST"}) if grants else "(none)",
            "",
            "shared pools:",
            format_table(("UUID", "MEMBERS", "PAGES"), pools, left={"UUID", "MEMBERS"})
            if pools
            else "(none)",
        ]
    )


# ------------------------------------------------------------------------------ top


_COUNTERS: Final = ("puts_ok", "puts_refused", "gets_hit", "gets_miss", "evictions")


class Rates:
    """Per-guest counter deltas between two ``guests`` samples."""

    def __init__(self) -> None:
        self.previous: dict[str, Mapping[str, Any]] = {}
        self.when: float | None = None

    def update(self, rows: Sequence[Mapping[str, Any]], now: float) -> list[list[str]]:
        """Table rows for ``top`` from this sample; rates are since the previous sample."""
        elapsed = None if self.when is None else max(now - self.when, 1e-9)
        out = []
        for r in rows:
            name = str(r.get("name"))
            before = self.previous.get(name)
            if before is not None and any(
                int(r.get(k, 0)) < int(before.get(k, 0)) for k in _COUNTERS
            ):
                before = {}  # the account was dropped and recreated: its counters restarted
            if elapsed is None:
                hit = evict = puts = NONE
            else:
                d = {k: int(r.get(k, 0)) - int((before or {}).get(k, 0)) for k in _COUNTERS}
                hit = _percent(d["gets_hit"], d["gets_miss"])
                evict = f"{d['evictions'] / elapsed:.1f}"
                puts = f"{(d['puts_ok'] + d['puts_refused']) / elapsed:.1f}"
            out.append(
                [
                    name,
                    _count(r.get("weight")),
                    _size(r.get("cap")),
                    _yes(r.get("frozen")),
                    _size(r.get("ephemeral_bytes")),
                    _size(r.get("persistent_bytes")),
                    _size(r.get("lent_bytes")),
                    hit,
                    evict,
                    puts,
                ]
            )
        self.previous = {str(r.get("name")): r for r in rows}
        self.when = now
        return out


TOP_HEADERS: Final = (
    "NAME", "WEIGHT", "CAP", "FROZEN", "EPHEMERAL", "PERSISTENT", "LENT", "HIT%", "EVICT/S",
    "PUTS/S",
)  # fmt: skip


def _sample(path: str, timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with AdminClient(path, timeout=timeout) as admin:
        return admin.call("status"), admin.call("guests")


def run_top(path: str, timeout: float, interval: float, iterations: int | None, out: TextIO) -> int:
    """Print ``iterations`` tables (None: until Ctrl-C), one per ``interval`` seconds.

    On a tty the screen is cleared before each table; otherwise tables are separated by a blank
    line. Rates (hit rate, evictions/s, puts/s counting refused puts too) cover the last interval.
    """
    tty = out.isatty()
    rates = Rates()
    try:
        _, rows = _sample(path, timeout)
        rates.update(rows, time.monotonic())
        shown = 0
        while iterations is None or shown < iterations:
            time.sleep(interval)
            status, rows = _sample(path, timeout)
            table = format_table(
                TOP_HEADERS, rates.update(rows, time.monotonic()), left={"NAME", "FROZEN"}
            )
            header = (
                f"tmemd  budget {_size(status.get('budget'))}  used {_size(status.get('used'))}"
                f"  free {_size(status.get('free'))}  guests {_count(status.get('guests'))}"
                f"  frozen all {_yes(status.get('frozen_all'))}"
                f"  every {interval:g}s  {time.strftime('%H:%M:%S')}"
            )
            if tty:
                out.write(CLEAR_SCREEN)
            elif shown:
                out.write("\n")
            out.write(f"{header}\n{table}\n")
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
    return EXIT_OK


# ------------------------------------------------------------------------------ commands


def _describe_set(result: Mapping[str, Any]) -> str:
    if "uid" in result:
        evicted = result.get("evicted", 0)
        return f"uid {result['uid']}: cap {_size(result.get('cap'))}" + (
            f"; evicted {evicted} pages to fit the cap" if evicted else ""
        )
    name = result.get("name")
    text = f"{name}: weight {_count(result.get('weight'))}, cap {_size(result.get('cap'))}"
    if result.get("connected") is False:
        if str(name).startswith("shared:"):
            return text + " (not open: applies when a member opens it)"
        return text + " (not connected: applies when it connects)"
    evicted = result.get("evicted", 0)
    return text + (f"; evicted {evicted} pages to fit the cap" if evicted else "")


def _describe_freeze(names: Sequence[str], guest: str | None, frozen: bool) -> str:
    verb = "frozen" if frozen else "thawed"
    if guest is not None:
        return f"{verb}: {guest}"
    listed = ", ".join(names) if names else "no guest connected"
    scope = " (and guests that connect from now on)" if frozen else ""
    return f"{verb} every guest{scope}: {listed}"


def run_command(args: argparse.Namespace, admin: AdminClient, out: TextIO, err: TextIO) -> int:
    """Send the command's request and print its result; TmemError propagates."""
    command: str = args.command
    if command == "status":
        result = admin.call("status")
        out.write((_dumps(result) if args.json else render_status(result)) + "\n")
    elif command == "guests":
        result = admin.call("guests")
        out.write((_dumps(result) if args.json else render_guests(result)) + "\n")
    elif command == "uids":
        result = admin.call("uids")
        out.write((_dumps(result) if args.json else render_uids(result)) + "\n")
    elif command == "pools":
        result = admin.call("pools", **({} if args.guest is None else {"guest": args.guest}))
        out.write((_dumps(result) if args.json else render_pools(result)) + "\n")
    elif command == "set":
        request: dict[str, Any] = {"guest": args.guest}
        if args.weight is not None:
            request["weight"] = args.weight
        if "cap" in args:
            request["cap"] = args.cap
        result = admin.call("set", **request)
        out.write((_dumps(result) if args.json else _describe_set(result)) + "\n")
    elif command in ("freeze", "thaw"):
        result = admin.call(command, **({} if args.guest is None else {"guest": args.guest}))
        text = _describe_freeze(result, args.guest, command == "freeze")
        out.write((_dumps(result) if args.json else text) + "\n")
    elif command == "flush":
        result = admin.call("flush", guest=args.guest)
        text = f"flushed {result.get('pages_flushed')} ephemeral pages of {args.guest}"
        out.write((_dumps(result) if args.json else text) + "\n")
    elif command == "budget":
        result = admin.call("budget", bytes=args.size)
        if result.get("warning"):
            err.write(f"{PROG}: warning: {result['warning']}\n")
        text = (
            f"budget {_size(result.get('budget'))}, used {_size(result.get('used'))}; "
            f"evicted {result.get('evicted', 0)} pages"
        )
        out.write((_dumps(result) if args.json else text) + "\n")
    elif command == "share":
        return _run_share(args, admin, out)
    else:  # pragma: no cover - argparse only lets known commands through
        raise AssertionError(command)
    return EXIT_OK


def _run_share(args: argparse.Namespace, admin: AdminClient, out: TextIO) -> int:
    action: str = args.share_command
    if action == "list":
        result = admin.call("shares")
        out.write((_dumps(result) if args.json else render_shares(result)) + "\n")
    elif action == "grant":
        result = admin.call("grant", uuid=args.uuid, guest=args.guest)
        text = f"granted shared pool {args.uuid} to {args.guest}"
        out.write((_dumps(result) if args.json else text) + "\n")
    else:
        result = admin.call("revoke", uuid=args.uuid, guest=args.guest)
        text = (
            f"revoked shared pool {args.uuid} from {args.guest}; "
            f"detached {result.get('detached', 0)} connections"
        )
        out.write((_dumps(result) if args.json else text) + "\n")
    return EXIT_OK


def _dumps(result: Any) -> str:
    return json.dumps(result, indent=2)


def _error_message(exc: TmemError, path: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, PermissionDenied):
        return f"permission denied by tmemd at {path}: {text}"
    if isinstance(exc, DaemonGone) and isinstance(
        exc.__cause__, BrokenPipeError | ConnectionResetError
    ):
        # tmemd refuses a non-administrator by answering at once and closing; if it closed
        # before our request went out, its answer is lost (EPIPE). Say what most likely happened.
        reason = _likely_not_admin(path)
        if reason is not None:
            return f"tmemd at {path} closed the connection without answering: {reason}"
    if isinstance(exc, DaemonGone) and path not in text:
        return f"{text} (admin socket {path})"
    return text


def _likely_not_admin(path: str) -> str | None:
    """Why this process is probably refused by tmemd at ``path`` (None if it should be allowed):
    tmemd admits root, its own uid (the socket's owner) and its admin group (the socket's group
    when the socket is group-accessible)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    euid = os.geteuid()
    if euid in (0, st.st_uid):
        return None
    if st.st_mode & 0o070 and st.st_gid in {os.getegid(), *os.getgroups()}:
        return None
    return (
        f"uid {euid} is not an administrator of this tmemd (root, its own uid {st.st_uid}, "
        "or its admin group)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run tmemctl with ``argv`` (default: sys.argv[1:]); the exit code (0, 1 or 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "set" and args.weight is None and "cap" not in args:
        sys.stderr.write(
            f"{PROG}: set needs --weight N and/or --cap SIZE|none "
            f"(e.g. {PROG} set {args.guest} --weight 2)\n"
        )
        return EXIT_USAGE
    if args.command == "top" and args.json:
        sys.stderr.write(f"{PROG}: top has no --json output; use '{PROG} guests --json'\n")
        return EXIT_USAGE
    path = admin_socket_path(args.admin_socket)
    try:
        if args.command == "top":
            return run_top(path, args.timeout, args.interval, args.iterations, sys.stdout)
        with AdminClient(path, timeout=args.timeout) as admin:
            return run_command(args, admin, sys.stdout, sys.stderr)
    except TmemError as exc:
        sys.stderr.write(f"{PROG}: {_error_message(exc, path)}\n")
        return EXIT_REFUSED
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        _silence_stdout()
        return EXIT_OK
    except OSError as exc:  # e.g. a socket error AdminClient did not wrap
        sys.stderr.write(f"{PROG}: cannot talk to tmemd at {path}: {exc}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
