"""The shared poll-with-deadline loop: what it returns and how it fails."""

from __future__ import annotations

import itertools

import pytest

from felix_lite.waiting import wait_until


class Boom(Exception):
    pass


def test_returns_the_first_truthy_value() -> None:
    seq = iter([None, [], {"rv": 7}])
    assert wait_until(lambda: next(seq), 5, "rv", step=0) == {"rv": 7}


def test_timeout_raises_the_given_error_naming_what_and_detail() -> None:
    with pytest.raises(Boom, match=r"^timed out after 0.05s waiting for routes: node-2 lacks x/a$"):
        wait_until(lambda: False, 0.05, "routes", step=0.01, error=Boom,
                   detail=lambda: "node-2 lacks x/a")  # fmt: skip


def test_default_error_is_assertion_error() -> None:
    with pytest.raises(AssertionError, match="waiting for nothing"):
        wait_until(lambda: 0, 0.02, "nothing", step=0.01)


def test_check_runs_before_every_poll_and_can_fail_fast() -> None:
    calls = itertools.count(1)

    def check() -> None:
        if next(calls) == 3:
            raise Boom("agent died")

    polls: list[int] = []
    with pytest.raises(Boom, match="agent died"):
        wait_until(lambda: polls.append(1), 30, "never", step=0, check=check)
    assert len(polls) == 2
