"""Unit tests of the resilient clients' retry policy (tmemclient/reconnect.py): the backoff,
its bounds, the checks of its arguments, and that a daemon that never answers ends in
``Unreachable`` after exactly the attempts asked for (with a recorded, not a real, sleep)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmemclient import DaemonGone, InvalidArgument, Retry, Unreachable
from tmemclient.reconnect import PoolSpec, Reconnected, ResilientClient, note


def test_backoff_starts_at_once_then_doubles_up_to_the_cap() -> None:
    retry = Retry(attempts=7, first_delay=0.1, max_delay=0.5)
    assert retry.delays() == [0.0, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert retry.budget == pytest.approx(2.2)
    assert Retry(attempts=1).delays() == [0.0]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"attempts": 0}, "at least 1"),
        ({"attempts": True}, "must be an int"),
        ({"attempts": 2.5}, "must be an int"),
        ({"first_delay": -1}, "first_delay"),
        ({"first_delay": 3, "max_delay": 2}, "first_delay <= max_delay"),
        ({"connect_timeout": 0}, "connect_timeout"),
    ],
)
def test_bad_retry_policies_are_refused(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_no_daemon_means_unreachable_after_the_attempts_asked(tmp_path: Path) -> None:
    slept: list[float] = []
    retry = Retry(attempts=4, first_delay=0.25, max_delay=1.0, connect_timeout=1)
    with pytest.raises(Unreachable, match=r"after 4 attempts over 1\.8s") as caught:
        ResilientClient(
            tmp_path / "none.sock",
            "vm",
            retry=retry,
            on_reconnect=None,
            options={"frames": 16},
            sleep=slept.append,
        )
    assert slept == [0.25, 0.5, 1.0]  # the first attempt at once
    assert isinstance(caught.value, DaemonGone)  # callers that catch DaemonGone still do


class _Pool:
    def __init__(self, reopened: bool) -> None:
        self.reopened = reopened


def test_reconnected_event_tells_reopened_from_emptied_and_counts_lost_persistent() -> None:
    event = Reconnected(attempts=2, seconds=0.5)
    note(event, _Pool(True), PoolSpec(True, False, None, 4096, "swap"), 11)
    note(event, _Pool(False), PoolSpec(True, False, None, 4096, None), 12)
    note(event, _Pool(False), PoolSpec(False, False, None, 4096, "cache"), 13)
    assert event.reopened == ["swap"]
    assert event.emptied == ["#12", "cache"]
    assert event.lost_persistent == 1  # the ephemeral one may come back empty
