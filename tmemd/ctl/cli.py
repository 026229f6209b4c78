"""``tmemctl``: the administrator's command line for tmemd (its admin socket).

Read commands (``status``, ``guests``, ``uids``, ``pools``, ``share list``) print aligned
tables (tmemd/ctl/render.py), or with ``--json`` the daemon's result unchanged (its field names
are the daemon's keys, listed in docs/operations.md "tmemctl"). Write commands print one
line saying what happened. ``top`` refreshes a table of guests with per-interval rates, or with
``--json`` prints one JSON document per refresh (tmemd/ctl/top.py).

Exit codes: 0 done; 1 the daemon refused or did not know the guest/grant, or no daemon answered;
2 usage error (caught here, before anything is sent). Errors go to stderr as ``tmemctl: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO

from tmemclient.wire.errors import DaemonGone, PermissionDenied, TmemError
from tmemclient.wire.units import size_arg
from tmemd.ctl import render, top
from tmemd.ctl.client import ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET, AdminClient, NotAdminSocket

PROG: Final = "tmemctl"
EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
# Mirrors tmemd.policy.MAX_WEIGHT (tmemclient never imports tmemd); the daemon checks it again.
MAX_WEIGHT: Final = 10_000
DEFAULT_TIMEOUT: Final = 10.0


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

    p = command(
        "top",
        "a refreshing view of guests with per-interval rates (Ctrl-C quits); with --json, one "
        "JSON document per refresh, one per line",
    )
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
        help="print the daemon's result as JSON (field names: docs/operations.md); top prints "
        "one JSON document per refresh (JSON lines)",
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


# ------------------------------------------------------------------------------ commands


def run_command(args: argparse.Namespace, admin: AdminClient, out: TextIO, err: TextIO) -> int:
    """Send the command's request and print its result; TmemError propagates."""
    command: str = args.command
    guest = {} if getattr(args, "guest", None) is None else {"guest": args.guest}
    if command in _READS:
        op, as_text = _READS[command]
        result = admin.call(op, **guest)
        text = as_text(result)
    elif command == "set":
        request: dict[str, Any] = dict(guest)
        if args.weight is not None:
            request["weight"] = args.weight
        if "cap" in args:
            request["cap"] = args.cap
        result = admin.call("set", **request)
        text = render.describe_set(result)
    elif command in ("freeze", "thaw"):
        result = admin.call(command, **guest)
        text = render.describe_freeze(result, args.guest, command == "freeze")
    elif command == "flush":
        result = admin.call("flush", **guest)
        text = f"flushed {result.get('pages_flushed')} ephemeral pages of {args.guest}"
    elif command == "budget":
        result = admin.call("budget", bytes=args.size)
        if result.get("warning"):
            err.write(f"{PROG}: warning: {result['warning']}\n")
        text = render.describe_budget(result)
    elif command == "share":
        result, text = _share(args, admin)
    else:  # pragma: no cover - argparse only lets known commands through
        raise AssertionError(command)
    out.write((json.dumps(result, indent=2) if args.json else text) + "\n")
    return EXIT_OK


# Read commands: the admin op, and how its result reads as text.
_READS: Final[dict[str, tuple[str, Callable[[Any], str]]]] = {
    "status": ("status", render.render_status),
    "guests": ("guests", render.render_guests),
    "uids": ("uids", render.render_uids),
    "pools": ("pools", render.render_pools),
}


def _share(args: argparse.Namespace, admin: AdminClient) -> tuple[Any, str]:
    action: str = args.share_command
    if action == "list":
        result = admin.call("shares")
        return result, render.render_shares(result)
    if action == "grant":
        result = admin.call("grant", uuid=args.uuid, guest=args.guest)
        return result, f"granted shared pool {args.uuid} to {args.guest}"
    result = admin.call("revoke", uuid=args.uuid, guest=args.guest)
    return result, (
        f"revoked shared pool {args.uuid} from {args.guest}; "
        f"detached {result.get('detached', 0)} connections"
    )


def _error_message(exc: TmemError, path: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, NotAdminSocket):
        return (
            f"{path} is tmemd's guest socket, not its admin socket; use --admin-socket PATH or "
            f"{ADMIN_SOCKET_ENV} (default {DEFAULT_ADMIN_SOCKET})"
        )
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


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run tmemctl with ``argv`` (default: sys.argv[1:]), printing to ``out`` and ``err``
    (default: sys.stdout, sys.stderr); returns the exit code (0, 1, 2; 130 on Ctrl-C) and never
    exits the process, so it can be called in-process."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "set" and args.weight is None and "cap" not in args:
        err.write(
            f"{PROG}: set needs --weight N and/or --cap SIZE|none "
            f"(e.g. {PROG} set {args.guest} --weight 2)\n"
        )
        return EXIT_USAGE
    path = admin_socket_path(args.admin_socket)
    try:
        if args.command == "top":
            sample = top.sampler(path, args.timeout)
            top.run_top(sample, args.interval, args.iterations, out, as_json=args.json)
            return EXIT_OK
        with AdminClient(path, timeout=args.timeout) as admin:
            return run_command(args, admin, out, err)
    except TmemError as exc:
        err.write(f"{PROG}: {_error_message(exc, path)}\n")
        return EXIT_REFUSED
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        _silence(out)
        return EXIT_OK
    except OSError as exc:  # e.g. a socket error AdminClient did not wrap
        err.write(f"{PROG}: cannot talk to tmemd at {path}: {exc}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def _silence(out: TextIO) -> None:
    """Point ``out``'s descriptor at /dev/null, so flushing it at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
