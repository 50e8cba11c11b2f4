"""Golden tests of the ExaBGP 5.0.15 command renderer (syntax checked against a
live ExaBGP in tests/functional/test_bgp_exabgp.py: every line is acked `done`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix_lite.bgp import commands
from felix_lite.bgp.commands import (
    desired_prefixes,
    diff_commands,
    normalize_prefix,
    resync_commands,
)


def test_desired_without_aggregation() -> None:
    got = desired_prefixes(["10.244.1.2", "10.244.7.7"], "10.244.1.0/24", False)
    assert got == {"10.244.1.2/32", "10.244.7.7/32"}


def test_desired_with_aggregation_keeps_only_exceptions() -> None:
    got = desired_prefixes(["10.244.1.2", "10.244.1.3", "10.244.7.7"], "10.244.1.0/24", True)
    assert got == {"10.244.1.0/24", "10.244.7.7/32"}


def test_desired_aggregation_announces_block_even_without_pods() -> None:
    assert desired_prefixes([], "10.244.1.0/24", True) == {"10.244.1.0/24"}
    assert desired_prefixes([], None, True) == frozenset()


def test_normalize() -> None:
    assert normalize_prefix("10.0.0.1") == "10.0.0.1/32"
    assert normalize_prefix("10.0.0.0/24") == "10.0.0.0/24"
    with pytest.raises(ValueError):
        normalize_prefix("10.0.0.1/24")


def test_diff_golden_numeric_order_announces_first() -> None:
    got = diff_commands(
        {"10.244.1.10/32", "10.244.1.9/32", "10.244.1.0/24"},
        {"10.244.1.2/32", "10.244.1.9/32"},
    )
    assert got == [
        "announce attributes next-hop self nlri 10.244.1.0/24 10.244.1.10/32",
        "withdraw attributes next-hop self nlri 10.244.1.2/32",
    ]


def test_diff_nothing_to_do() -> None:
    assert diff_commands({"10.0.0.1/32"}, {"10.0.0.1/32"}) == []


def test_batching() -> None:
    prefixes = {f"10.244.1.{i}/32" for i in range(1, 6)}
    got = commands.announce_lines(prefixes, batch=2)
    assert got == [
        "announce attributes next-hop self nlri 10.244.1.1/32 10.244.1.2/32",
        "announce attributes next-hop self nlri 10.244.1.3/32 10.244.1.4/32",
        "announce attributes next-hop self nlri 10.244.1.5/32",
    ]
    with pytest.raises(ValueError, match="batch"):
        commands.announce_lines(prefixes, batch=0)


def test_resync_golden_global_and_per_neighbor() -> None:
    assert resync_commands({"10.244.1.2/32"}, {"10.244.1.2/32", "10.244.1.3/32"}) == [
        "announce attributes next-hop self nlri 10.244.1.2/32",
        "withdraw attributes next-hop self nlri 10.244.1.3/32",
        "announce eor ipv4 unicast",
    ]
    assert resync_commands({"10.244.1.2/32"}, frozenset(), neighbor="10.99.0.1") == [
        "neighbor 10.99.0.1 announce attributes next-hop self nlri 10.244.1.2/32",
        "neighbor 10.99.0.1 announce eor ipv4 unicast",
    ]


def test_eor_and_refresh_lines() -> None:
    assert commands.eor_line() == "announce eor ipv4 unicast"
    assert commands.route_refresh_line("10.0.0.1") == (
        "neighbor 10.0.0.1 announce route-refresh ipv4 unicast"
    )


_prefix = st.integers(0, 4095).map(lambda i: f"10.244.{i // 256}.{i % 256}/32")


@given(st.sets(_prefix, max_size=60), st.sets(_prefix, max_size=60), st.integers(1, 7))
def test_diff_applied_reaches_desired(desired: set[str], announced: set[str], batch: int) -> None:
    state = set(announced)
    for line in diff_commands(desired, announced, batch=batch):
        words = line.split()
        nlri = words[words.index("nlri") + 1 :]
        assert 1 <= len(nlri) <= batch
        if words[0] == "announce":
            state |= set(nlri)
        else:
            assert words[0] == "withdraw"
            state -= set(nlri)
    assert state == desired
