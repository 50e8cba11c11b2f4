"""Every name felix-lite creates in the kernel, from one place.

Fixed chains are prefix + role; per-object chains and sets are prefix + a
two-letter kind + a hash of the object's identity, so names are stable across
restarts and at most 28 characters (iptables allows 28, ipset 31).
"""

from __future__ import annotations

import hashlib
from typing import Final, NewType

ChainName = NewType("ChainName", str)
SetName = NewType("SetName", str)

CHAIN_PREFIX: Final = "FL-"
SET_PREFIX: Final = "fl-"
IFACE_PREFIX: Final = "fl"
MAX_NAME: Final = 28
HASH_LEN: Final = 16

# Fixed chains (filter table).
CHAIN_FORWARD: Final = ChainName("FL-FORWARD")
CHAIN_INPUT: Final = ChainName("FL-INPUT")
CHAIN_FROM_PODS: Final = ChainName("FL-FROM-PODS")
CHAIN_TO_PODS: Final = ChainName("FL-TO-PODS")

# Comment that marks our rules inside chains we do not own (FORWARD, INPUT).
HOOK_COMMENT: Final = "felix-lite:hook"
# Prefix of the per-rule hash comment inside our own chains.
RULE_COMMENT_PREFIX: Final = "fl:"

# Packet mark bit meaning "a policy allowed this packet in the current direction".
MARK_ALLOW: Final = 0x40000

# Per-object chain kinds.
KIND_POD_INGRESS: Final = "TW"  # traffic to a workload (pod ingress)
KIND_POD_EGRESS: Final = "FW"  # traffic from a workload (pod egress)
KIND_POLICY_INGRESS: Final = "PI"
KIND_POLICY_EGRESS: Final = "PE"
# Per-object set kinds.
KIND_SET_PODS: Final = "sp"  # pod IPs selected by a peer selector (hash:ip)
KIND_SET_NET: Final = "nb"  # an ipBlock with its excepts as nomatch (hash:net)
KIND_SET_NAMED_PORT: Final = "np"  # ip,proto:port of pods exposing a named port
KIND_SET_ANTISPOOF: Final = "as"  # ip,iface of every local pod (hash:net,iface)


def _digest(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:HASH_LEN]


def chain_name(kind: str, identity: str) -> ChainName:
    name = f"{CHAIN_PREFIX}{kind}-{_digest(identity)}"
    assert len(name) <= MAX_NAME
    return ChainName(name)


def set_name(kind: str, identity: str) -> SetName:
    name = f"{SET_PREFIX}{kind}-{_digest(identity)}"
    assert len(name) <= MAX_NAME
    return SetName(name)


# The one fixed set: which source address may arrive on which pod interface.
SET_LOCAL_SOURCES: Final = set_name(KIND_SET_ANTISPOOF, "local-pod-sources")


def pod_interface(namespace: str, pod: str) -> str:
    """Host-side veth of a pod: `fl` + 11 hex of sha1("<namespace>.<pod>")."""
    return IFACE_PREFIX + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def is_ours_chain(name: str) -> bool:
    return name.startswith(CHAIN_PREFIX)


def is_ours_set(name: str) -> bool:
    return name.startswith(SET_PREFIX)
