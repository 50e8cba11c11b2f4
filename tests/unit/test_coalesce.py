"""Coalescer with a fake clock: changes arrive at scripted (fake) times."""

from __future__ import annotations

import threading

import pytest

from controller.cache import Cache, Kind
from controller.coalesce import Coalescer
from controller.nodestate import converters


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedFeed:
    """A change counter whose changes happen at fixed fake times; waiting advances the clock."""

    def __init__(self, clock: FakeClock, arrivals: list[float]) -> None:
        self.clock = clock
        self.arrivals = sorted(arrivals)
        self.waits: list[float | None] = []

    @property
    def seq(self) -> int:
        return sum(1 for t in self.arrivals if t <= self.clock.now)

    def wait_for_change(self, after: int, timeout: float | None) -> int:
        self.waits.append(timeout)
        if self.seq != after:
            return self.seq
        upcoming = [t for t in self.arrivals if t > self.clock.now]
        if upcoming and (timeout is None or upcoming[0] <= self.clock.now + timeout):
            self.clock.now = upcoming[0]
        elif timeout is not None:
            self.clock.now += timeout
        return self.seq


def make(arrivals: list[float], **kw: float) -> tuple[Coalescer, FakeClock, ScriptedFeed]:
    clock = FakeClock()
    feed = ScriptedFeed(clock, arrivals)
    return Coalescer(feed, clock=clock, **kw), clock, feed


def test_single_change_closes_after_quiet() -> None:
    c, clock, _ = make([1.0], quiet=0.02, max_delay=0.2)
    batch = c.next_batch()
    assert batch is not None
    assert batch.wakeups == 1
    assert not batch.hit_max_delay
    assert clock.now == pytest.approx(1.02)
    assert batch.seq == 1


def test_changes_closer_than_quiet_are_one_batch() -> None:
    c, clock, _ = make([1.0, 1.015, 1.03], quiet=0.02, max_delay=0.2)
    batch = c.next_batch()
    assert batch is not None
    assert batch.wakeups == 3
    assert batch.seq == 3
    assert clock.now == pytest.approx(1.05)


def test_gap_longer_than_quiet_splits_batches() -> None:
    c, clock, _ = make([1.0, 1.05], quiet=0.02, max_delay=0.2)
    first = c.next_batch()
    assert first is not None and first.seq == 1
    second = c.next_batch()
    assert second is not None and second.seq == 2 and second.wakeups == 1
    assert clock.now == pytest.approx(1.07)


def test_steady_trickle_is_cut_at_max_delay() -> None:
    arrivals = [0.1 + i * 0.01 for i in range(100)]  # one change every 10 ms for a second
    c, clock, _ = make(arrivals, quiet=0.02, max_delay=0.2)
    batch = c.next_batch()
    assert batch is not None
    assert batch.hit_max_delay
    assert clock.now == pytest.approx(0.3)
    assert 1 < batch.seq < 100
    rest = c.next_batch()
    assert rest is not None and rest.seq > batch.seq  # nothing is lost, it goes to the next


def test_changes_before_the_call_are_picked_up_at_once() -> None:
    c, clock, feed = make([0.5, 0.6], quiet=0.02, max_delay=0.2)
    clock.now = 0.0
    c.mark_seen()  # start from seq 0
    clock.now = 1.0  # both changes already happened
    batch = c.next_batch()
    assert batch is not None and batch.seq == 2
    assert clock.now == pytest.approx(1.02)
    assert feed.waits[0] is not None


def test_timeout_without_change_returns_none() -> None:
    c, clock, _ = make([], quiet=0.02, max_delay=0.2, poll=0.1)
    assert c.next_batch(timeout=0.35) is None
    assert clock.now == pytest.approx(0.35)


def test_stop_returns_none() -> None:
    c, _, _ = make([5.0], quiet=0.02, max_delay=0.2)
    stop = threading.Event()
    stop.set()
    assert c.next_batch(stop=stop) is None


@pytest.mark.parametrize(("quiet", "max_delay"), [(0.0, 0.2), (0.3, 0.2), (-1.0, 1.0)])
def test_bad_windows_rejected(quiet: float, max_delay: float) -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="quiet"):
        Coalescer(ScriptedFeed(clock, []), quiet=quiet, max_delay=max_delay, clock=clock)


def test_cache_is_a_change_feed() -> None:
    cache = Cache(converters())
    c = Coalescer(cache, quiet=0.001, max_delay=0.01)
    for name in ("a", "b", "c"):
        cache.upsert(Kind.NAMESPACE, {"metadata": {"name": name}})
    batch = c.next_batch(timeout=5)
    assert batch is not None and batch.seq == cache.seq
    assert sorted(k.name for k in cache.take_changes()) == ["a", "b", "c"]
    assert c.next_batch(timeout=0.01) is None  # nothing new
