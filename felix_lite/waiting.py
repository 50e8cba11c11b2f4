"""Polling until a condition holds: the one loop the labs, routers and tests share.

Most of what the labs wait on (BGP sessions, kernel routes, an agent's /readyz)
lives in other processes and namespaces with nothing to block on, so polling
with a deadline is the honest tool; the error names what was awaited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    pred: Callable[[], T],
    timeout: float,
    what: str,
    *,
    step: float = 0.05,
    error: Callable[[str], Exception] = AssertionError,
    detail: Callable[[], str] | None = None,
    check: Callable[[], None] | None = None,
) -> T:
    """pred()'s first truthy value. After `timeout` seconds, raises
    `error("timed out after Ns waiting for <what>[: <detail()>]")`; `check` runs
    before every poll so a caller can fail fast (say, a process it needs died)."""
    start = time.monotonic()
    while True:
        if check is not None:
            check()
        got = pred()
        if got:
            return got
        if time.monotonic() - start > timeout:
            extra = f": {detail()}" if detail is not None else ""
            raise error(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(step)
