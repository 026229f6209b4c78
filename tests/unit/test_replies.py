"""The guest library's checks of what tmemd answers: a reply of the wrong shape or type is a
ProtocolError at once, never a TypeError later, nor a wrong result (in the compiled build too,
where annotations are enforced and a bool would pass for an int). No daemon: the functions that
read the answers, fed what a broken or hostile daemon could send."""

from __future__ import annotations

from typing import Any

import pytest

from tmemclient import _plans
from tmemclient._pool import pool_info
from tmemclient.mapping import token_of
from tmemclient.wire.errors import ProtocolError
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Limits

BAD_NEW_POOL: list[Any] = [
    ["x", 4096],
    [1.5, 4096],
    [None, 4096],
    [True, 4096],
    [1, 4096.0],
    [1, True],
    [1, 100],  # smaller than a page
    [-1, 4096],
    [1 << 32, 4096],
    [1],
    [1, 4096, True],  # a plain pool's answer has no "reopened"
    5,
    None,
]


@pytest.mark.parametrize("answer", BAD_NEW_POOL, ids=repr)
def test_a_bad_new_pool_answer_is_a_protocol_error(answer: Any) -> None:
    with pytest.raises(ProtocolError):
        pool_info(answer, persistent=True, shared=False, uuid=None, name=None)


def test_new_pool_answers_as_tmemd_sends_them() -> None:
    info = pool_info([7, 8192], persistent=True, shared=False, uuid=None, name=None)
    assert (info.handle, info.page_size, info.reopened) == (7, 8192, False)
    named = pool_info([7, 4096, True], persistent=True, shared=False, uuid=None, name="n")
    assert named.reopened and named.name == "n"
    with pytest.raises(ProtocolError):  # a named pool's answer says whether it was reopened
        pool_info([7, 4096], persistent=True, shared=False, uuid=None, name="n")


@pytest.mark.parametrize(
    "answer",
    [["a", 1], [1, "a"], [True, 2], [1, None], [-1, 0], [1 << 32, 0], [0, 1 << 64], [1.0, 2]],
    ids=repr,
)
def test_a_bad_token_is_a_protocol_error(answer: Any) -> None:
    with pytest.raises(ProtocolError):
        token_of(answer)


def test_tokens_and_plain_answers() -> None:
    assert token_of([3, 9]) == (3, 9)
    assert token_of(True) is None and token_of(False) is None


def drive_get_many(replies: list[Any], pages: int = 2) -> Any:
    """A GET_MANY plan of ``pages`` pages, answered with ``replies``."""
    region = memoryview(bytearray(FRAME_SIZE * 8))
    info = _plans.PoolInfo(handle=1, page_size=FRAME_SIZE, persistent=True, shared=False, uuid=None)
    limits = Limits(version=1, guest="g", frames=8, max_frame=1 << 20, max_batch=64, max_pools=4)
    batch = _plans.Batch([1] * pages, list(range(pages)))
    plan = _plans.get_many(region, info, limits, 0, 8, batch)
    next(plan)
    try:
        plan.send(replies)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the plan asked for a second round")


@pytest.mark.parametrize("replies", [[5], [None], [[True]], [[True, True, True]]], ids=repr)
def test_a_batch_answer_of_the_wrong_shape_is_a_protocol_error(replies: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        drive_get_many(replies)


def test_a_batch_answer_of_one_result_per_page() -> None:
    assert drive_get_many([[True, False]]) == [bytes(FRAME_SIZE), None]
