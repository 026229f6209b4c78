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
from tmemd.listen import SocketInUse, bind_unix


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
