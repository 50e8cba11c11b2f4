"""Coalescing of update storms into one recompute.

A `kubectl apply` of a hundred objects arrives as a hundred watch events
within milliseconds; recomputing and reprogramming after each would waste
work and lengthen the tail. `Coalescer.next_batch` waits for the first
change, then keeps absorbing changes until `quiet` passes with none or
`max_delay` has passed since the first, and only then returns: the caller
does one recompute and one apply per batch. `max_delay` bounds the latency
a steady trickle can add.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class ChangeFeed(Protocol):
    """A monotonically changing counter one can wait on (`controller.cache.Cache`)."""

    @property
    def seq(self) -> int: ...

    def wait_for_change(self, after: int, timeout: float | None) -> int:
        """Block until the counter differs from `after` or `timeout` passes; return it."""
        ...


@dataclass(frozen=True)
class Batch:
    seq: int  # the feed's counter when the batch closed
    wakeups: int  # how many distinct changes were absorbed (>= 1)
    waited: float  # seconds from the first change to the close
    hit_max_delay: bool


class Coalescer:
    """Waits for a burst of changes to settle; one instance per consumer loop.

    `poll` bounds how long a wait lasts before `stop` is checked again, so a
    stop event ends `next_batch` promptly without needing the feed to wake.
    """

    def __init__(
        self,
        feed: ChangeFeed,
        *,
        quiet: float = 0.02,
        max_delay: float = 0.2,
        poll: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if quiet <= 0 or max_delay < quiet:
            raise ValueError("coalesce: need 0 < quiet <= max_delay")
        self._feed = feed
        self._quiet = quiet
        self._max_delay = max_delay
        self._poll = poll
        self._clock = clock
        self._seen = feed.seq

    def mark_seen(self) -> None:
        """Forget changes so far (e.g. after a full initial computation)."""
        self._seen = self._feed.seq

    def next_batch(
        self, *, stop: threading.Event | None = None, timeout: float | None = None
    ) -> Batch | None:
        """The next settled batch, or None if `stop` is set or `timeout` passes first."""
        start = self._clock()
        while True:
            if stop is not None and stop.is_set():
                return None
            wait = self._poll
            if timeout is not None:
                left = start + timeout - self._clock()
                if left <= 0:
                    return None
                wait = min(wait, left)
            seq = self._feed.wait_for_change(self._seen, wait)
            if seq != self._seen:
                break
        first = self._clock()
        last = first
        wakeups = 1
        hit_max = False
        while True:
            now = self._clock()
            until_quiet = last + self._quiet - now
            until_max = first + self._max_delay - now
            if until_max <= 0:
                hit_max = True
                break
            if until_quiet <= 0:
                break
            newer = self._feed.wait_for_change(seq, min(until_quiet, until_max))
            if newer != seq:
                seq = newer
                last = self._clock()
                wakeups += 1
        self._seen = seq
        batch = Batch(seq=seq, wakeups=wakeups, waited=self._clock() - first, hit_max_delay=hit_max)
        log.debug(
            "coalesce.batch seq=%d wakeups=%d waited_ms=%.1f max=%s",
            seq,
            wakeups,
            batch.waited * 1000,
            hit_max,
        )
        return batch
