"""Binding the daemon's Unix sockets (tmemd.listen): the socket file appears only once it
listens, with its mode from the start, and a path another daemon holds is never taken."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tmemd import listen
from tmemd.listen import (
    AdminDirUnsafe,
    SocketDirMissing,
    SocketInUse,
    bind_unix,
    check_private_dir,
)


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


async def test_the_socket_file_appears_only_once_it_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that waits for the file must not find it refusing connections: the file is not
    at its path while the socket is being set up (its mode set, before it listens)."""
    path = tmp_path / "tmemd.sock"
    seen: list[bool] = []
    chmod = os.chmod

    def spy(where: Any, mode: int) -> None:
        seen.append(path.exists())
        chmod(where, mode)

    monkeypatch.setattr(os, "chmod", spy)
    sock = await bind_unix(path, 0o660)
    try:
        assert seen == [False]
        assert accepts(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert [p.name for p in tmp_path.iterdir()] == ["tmemd.sock"]  # no staging name left
    finally:
        sock.close()


async def test_a_daemon_that_takes_the_path_meanwhile_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another daemon comes up on the path between our stale-socket check and our link: we
    give up with SocketInUse, and its socket is untouched."""
    path = tmp_path / "tmemd.sock"
    rival = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    check = listen.remove_stale_socket

    def check_then_rival_binds(p: Path) -> None:
        check(p)
        rival.bind(str(p))
        rival.listen()

    monkeypatch.setattr(listen, "remove_stale_socket", check_then_rival_binds)
    try:
        with pytest.raises(SocketInUse, match="another daemon is listening"):
            await bind_unix(path, 0o600)
        assert accepts(path)
        assert [p.name for p in tmp_path.iterdir()] == ["tmemd.sock"]
    finally:
        rival.close()


async def test_a_live_socket_is_refused_and_a_dead_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "tmemd.sock"
    first = await bind_unix(path, 0o600)
    with pytest.raises(SocketInUse):
        await bind_unix(path, 0o600)
    assert accepts(path)
    first.close()  # gone, its file left behind
    assert path.exists() and not accepts(path)
    second = await bind_unix(path, 0o600)
    try:
        assert accepts(path)
    finally:
        second.close()


async def test_a_path_too_long_for_a_staging_name_is_bound_in_place(tmp_path: Path) -> None:
    name = "s" * (listen.SUN_PATH_MAX - len(str(tmp_path)) - 1)  # the longest path there is
    path = tmp_path / name
    assert len(str(path)) == listen.SUN_PATH_MAX
    sock = await bind_unix(path, 0o600)
    try:
        assert accepts(path)
    finally:
        sock.close()


async def test_a_socket_whose_directory_is_missing_is_refused_and_nothing_made(
    tmp_path: Path,
) -> None:
    path = tmp_path / "missing" / "tmemd.sock"
    with pytest.raises(SocketDirMissing, match="does not exist; create it") as caught:
        await bind_unix(path, 0o660)
    assert caught.value.event == "socket_dir_missing"
    assert caught.value.fields == {"directory": str(path.parent), "socket": str(path)}
    assert list(tmp_path.iterdir()) == []


def test_an_admin_directory_others_may_write_is_unsafe_not_in_use(tmp_path: Path) -> None:
    path = tmp_path / "admin"
    path.mkdir()
    path.chmod(0o775)
    with pytest.raises(AdminDirUnsafe) as caught:
        check_private_dir(path, None)
    exc = caught.value
    assert not isinstance(exc, SocketInUse)
    assert exc.event == "admin_socket_dir_unsafe"
    assert exc.fields == {"directory": str(path), "mode": "0775"}
    assert f"chmod 0700 {path}" in str(exc)
    with pytest.raises(AdminDirUnsafe, match=f"chmod 0750 {path}"):
        check_private_dir(path, os.getgid())


def test_an_admin_directory_of_another_uid_is_unsafe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "admin"
    path.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(path, 65534, -1)  # nobody's
    else:  # ours, as seen by a tmemd running as another uid
        monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)
    owner = path.stat().st_uid
    with pytest.raises(AdminDirUnsafe, match=f"belongs to uid {owner}, not to tmemd") as caught:
        check_private_dir(path, None)
    assert caught.value.fields == {"directory": str(path), "owner": owner}


@pytest.mark.parametrize(("group", "mode"), [(False, 0o700), (True, 0o750)])
def test_a_missing_admin_directory_is_made_private_whatever_the_umask(
    tmp_path: Path, group: bool, mode: int
) -> None:
    path = tmp_path / "admin"
    gid = os.getgid() if group else None
    old = os.umask(0o077)  # tmemd.service's UMask=
    try:
        check_private_dir(path, gid)
    finally:
        os.umask(old)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == mode
    assert st.st_uid == os.getuid()
    if gid is not None:
        assert st.st_gid == gid
    check_private_dir(path, gid)  # and it passes its own check from then on


def test_an_admin_directory_is_made_but_never_its_parents(tmp_path: Path) -> None:
    path = tmp_path / "run" / "tmemd"
    with pytest.raises(SocketDirMissing) as caught:
        check_private_dir(path, None)
    assert caught.value.fields == {"directory": str(tmp_path / "run")}
    assert list(tmp_path.iterdir()) == []
