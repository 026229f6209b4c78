"""tmemd's service glue without a socket or a process: Notifier without a notify socket,
the watchdog interval, listen_fds's reading of the environment, activated_sockets on an fd that
is no socket, the example config (systemd/tmemd.toml) and check-config, and a bad config
refused before start. With real sockets and tmemd started as systemd does:
tests/integration/test_systemd.py."""

from __future__ import annotations

import grp
import json
import os
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from tmemd import cli, config
from tmemd.config import Limits
from tmemd.systemd import ActivationError, Notifier, activated_sockets, listen_fds, stored_state

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "systemd" / "tmemd.toml"
NO_SUCH_GROUP = "tmem-test-no-such-group"


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Notifier, with no notify socket


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}])
def test_notifier_without_a_notify_socket_does_nothing(env: dict[str, str]) -> None:
    notifier = Notifier(env)
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    notifier.close()


def test_notifier_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None
) -> None:
    assert Notifier(env).watchdog_interval == interval


# ---------------------------------------------------------------------------------------------
# listen_fds / activated_sockets, in this process (nothing here touches an fd)


ME = str(os.getpid())


def test_listen_fds_without_variables_is_empty() -> None:
    assert listen_fds({}) == {}
    assert listen_fds({"LISTEN_FDS": "2"}) == {}  # no LISTEN_PID: not for us


def test_listen_fds_for_another_pid_is_empty_and_unset() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "guest:admin", "PATH": "/x"}
    assert listen_fds(env) == {}
    assert env == {"PATH": "/x"}  # children must not inherit them either way


def test_listen_fds_can_leave_the_variables_set() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(env, unset=False) == {}
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    ("count", "names", "message"),
    [
        ("two", None, "not a number"),
        ("0", None, "out of range"),
        ("-1", None, "out of range"),
        ("65", None, "out of range"),
        ("2", "guest", "1 names for 2 fds"),
        ("1", "guest:admin", "2 names for 1 fds"),
    ],
)
def test_listen_fds_refuses_inconsistent_variables(
    count: str, names: str | None, message: str
) -> None:
    env = {"LISTEN_PID": ME, "LISTEN_FDS": count}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    with pytest.raises(ActivationError, match=message):
        listen_fds(env)
    assert env == {}


def test_activated_sockets_refuses_an_fd_that_is_not_a_socket() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ActivationError, match=f"fd {r} is not a socket"):
            activated_sockets({"guest": [r]})
        os.fstat(r)  # not closed by the check
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------------------------
# The example config and check-config


def test_the_example_config_shows_every_key_and_the_default_limits() -> None:
    """systemd/tmemd.toml is documented as an example of every key: it sets each key of each
    table tmemd reads (the lists tmemd/config.py checks a file against), and its [limits] are
    the defaults, so copying it changes no limit."""
    doc = tomllib.loads(EXAMPLE.read_text())
    assert set(doc) == {"daemon", "limits", "guests", "uids"}
    assert set(doc["daemon"]) == set(config.DAEMON_KEYS)
    assert set(doc["limits"]) == set(config.LIMIT_KEYS) == {f.name for f in fields(Limits)}
    assert set().union(*(set(t) for t in doc["guests"].values())) == set(config.GUEST_KEYS)
    assert set().union(*(set(t) for t in doc["uids"].values())) == set(config.UID_KEYS)
    defaults = asdict(Limits())
    differ = {k: (v, defaults[k]) for k, v in doc["limits"].items() if v != defaults[k]}
    assert not differ, f"example [limits] (value, default) that differ: {differ}"


def test_check_config_of_the_example_passes_on_any_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    settings = json.loads(out)
    assert settings["budget"] == 4 << 30
    assert settings["budget_human"] == "4.0GiB"
    assert settings["socket"] == "/run/tmemd/tmemd.sock"
    assert settings["admin_socket"] == "/run/tmemd/admin.sock"
    assert settings["admin_group"] == "tmem-admin"
    assert settings["socket_mode"] == "0660"
    assert settings["guests"]["db"] == {
        "uids": [1001],
        "weight": 300,
        "cap": 2 << 30,
        "sessions": 1,
    }
    assert settings["limits"] == asdict(Limits())
    assert err.endswith(f"tmemd: {EXAMPLE} is valid\n")
    warned = "admin group 'tmem-admin' does not exist" in err
    assert warned != group_exists("tmem-admin"), err


def test_a_missing_admin_group_is_a_warning_to_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config passes the file, with a warning that says how to make the group and that
    tmemd refuses to start without it (tests/integration/test_systemd.py starts it)."""
    assert not group_exists(NO_SUCH_GROUP)
    path = tmp_path / "tmemd.toml"
    path.write_text(EXAMPLE.read_text().replace('"tmem-admin"', f'"{NO_SUCH_GROUP}"', 1))
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["admin_group"] == NO_SUCH_GROUP
    warning, valid = err.splitlines()
    assert warning.startswith(f"tmemd: warning: {path}: admin group '{NO_SUCH_GROUP}' does not")
    assert f"groupadd --system {NO_SUCH_GROUP}" in warning
    assert "refuses to start" in warning
    assert valid == f"tmemd: {path} is valid"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[daemon]\nsokcet = "/run/x.sock"\n', "'sokcet'"),
        ('[daemon]\nsocket = "/x"\nmemory = "lots"\n', "daemon.memory"),
        ('[daemon]\nsocket = "/x"\ncompress = "gzip"\n', "compress must be one of off, lz4, zstd"),
        ('[daemon]\nsocket = "/x"\n[guests.db]\nuids = [1]\nweight = 0\n', "guests.db"),
        ('[daemon]\nsocket = "/x"\n[limits]\nshutdown_grace = "long"\n', "limits.shutdown_grace"),
        ("[daemon\n", "not valid TOML"),
        ("[daemon]\n", "no guest socket"),
    ],
)
def test_check_config_of_a_bad_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert named in err
    assert err.startswith(f"tmemd: {path}: ")


def test_check_config_usage_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config"]) == 2
    assert capsys.readouterr().err == "usage: tmemd check-config FILE\n"
    assert cli.main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_daemon_refuses_to_start_with_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything else is done (no logging set up, no socket made)."""
    path = tmp_path / "bad.toml"
    path.write_text(f'[daemon]\nsocket = "{tmp_path / "s.sock"}"\n[guests.db]\nuids = "root"\n')
    assert cli.main(["--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("tmemd: ") and "guests.db.uids" in err
    assert list(tmp_path.iterdir()) == [path]


def test_stored_state_takes_the_state_fds_out_and_leaves_the_sockets() -> None:
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    fds = {"guest": [3], "state-arena": [spare[0]], "state-index": [spare[1], spare[2]]}
    state = stored_state(fds)
    assert fds == {"guest": [3]}  # the sockets, for activated_sockets
    assert state == {"state-arena": spare[0], "state-index": spare[1]}
    with pytest.raises(OSError):
        os.fstat(spare[2])  # a second copy of one name is closed, never leaked
    for fd in spare[:2]:
        os.close(fd)


@pytest.mark.parametrize("compress", ["off", "lz4", "zstd"])
def test_compress_comes_from_the_file_and_the_command_line_wins(
    tmp_path: Path, compress: str
) -> None:
    path = tmp_path / "tmemd.toml"
    path.write_text(f'[daemon]\nsocket = "/x"\ncompress = "{compress}"\n')
    args = cli.build_parser().parse_args(["--config", str(path)])
    assert cli.settings_from_args(args).compress == compress
    args = cli.build_parser().parse_args(["--config", str(path), "--compress", "zstd"])
    assert cli.settings_from_args(args).compress == "zstd"
    assert cli.settings_from_args(cli.build_parser().parse_args(["--socket", "/x"])).compress == (
        "off"
    )


def test_dedup_comes_from_the_file_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "tmemd.toml"
    path.write_text('[daemon]\nsocket = "/x"\ndedup = true\n')
    parse = cli.build_parser().parse_args
    assert cli.settings_from_args(parse(["--config", str(path)])).dedup is True
    assert cli.settings_from_args(parse(["--config", str(path), "--no-dedup"])).dedup is False
    assert cli.settings_from_args(parse(["--socket", "/x"])).dedup is False
    path.write_text('[daemon]\nsocket = "/x"\ndedup = "yes"\n')
    with pytest.raises(config.ConfigError, match=r"daemon\.dedup has the wrong type"):
        cli.settings_from_args(parse(["--config", str(path)]))
