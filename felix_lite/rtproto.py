"""Route protocol numbers that mark kernel routes as felix-lite's.

Routes carrying one of these are ours to reconcile after a restart; routes with
any other protocol are never touched. 186 is avoided (FRR's zebra uses it).
"""

from __future__ import annotations

from typing import Final

PROTO_LOCAL_POD: Final = 201
"""Local pod /32 routes (CNI ADD) and the blackhole for the node's pod CIDR."""

PROTO_BGP: Final = 202
"""Routes learned over BGP and installed by the agent."""
