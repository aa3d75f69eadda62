"""The engine link's restart policy on plain data: when it gives up, and when the cool-down
starts short again."""

from __future__ import annotations

import pytest

from omlx_actors.isolation.restarts import RestartPolicy


def policy(max_restarts: int = 2, window_s: float = 60.0) -> RestartPolicy:
    return RestartPolicy(max_restarts=max_restarts, window_s=window_s,
                         cooldown_base_s=30.0, cooldown_max_s=300.0)


def test_more_deaths_than_the_limit_within_the_window_give_up():
    restarts = policy(max_restarts=2)
    for now in (0.0, 1.0):
        restarts.died(now)
        assert not restarts.exhausted()
    restarts.died(2.0)
    assert restarts.exhausted() and restarts.deaths == 3


def test_deaths_older_than_the_window_are_forgotten():
    restarts = policy(max_restarts=2, window_s=10.0)
    for now in (0.0, 5.0, 12.0):
        restarts.died(now)
    assert restarts.deaths == 2 and not restarts.exhausted()


def test_each_give_up_in_a_row_doubles_the_cool_down_up_to_its_cap():
    restarts = policy()
    assert [restarts.give_up() for _ in range(6)] == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]


def test_an_engine_that_holds_a_whole_window_starts_the_backoff_over():
    restarts = policy(window_s=60.0)
    assert restarts.give_up() == 30.0
    restarts.cooled_down()
    restarts.ready(100.0)
    restarts.died(159.0)  # up 59 s: not a whole window
    assert restarts.give_up() == 60.0
    restarts.cooled_down()
    restarts.ready(200.0)
    restarts.died(260.0)  # up 60 s
    assert restarts.give_up() == 30.0


def test_a_cool_down_forgets_the_deaths():
    restarts = policy(max_restarts=0)
    restarts.died(0.0)
    assert restarts.exhausted()
    restarts.cooled_down()
    assert restarts.deaths == 0 and not restarts.exhausted()


def test_a_give_up_count_below_one_is_refused():
    from omlx_actors.isolation.restarts import cooldown_s

    with pytest.raises(ValueError, match="give_ups_in_a_row must be >= 1"):
        cooldown_s(0, 30.0, 300.0)
