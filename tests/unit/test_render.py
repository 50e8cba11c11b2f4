"""Exact restore text for small rulesets; hash stability; name lengths."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from policy import names
from policy.names import ChainName, SetName
from policy.render import (
    IPSET_MAX_NAME,
    chain_rule_lines,
    drop_protocol_rules,
    normalize_member,
    render_human,
    render_ipset_destroy,
    render_ipset_restore,
    render_iptables_restore,
    rule_hash,
    set_content,
    temp_set_name,
)
from policy.ruleset import Chain, HookRule, IpSetSpec, Ruleset, SetType

C1 = ChainName("FL-PI-1")
C2 = ChainName("FL-PI-2")
S1 = SetName("fl-sp-1")
S2 = SetName("fl-nb-2")


def small() -> Ruleset:
    return Ruleset(
        chains={
            C1: Chain(C1, ("-p tcp --dport 80 -j RETURN", "-j DROP"), description="x/a"),
            C2: Chain(C2, ()),
        },
        sets={
            S1: IpSetSpec(
                S1, SetType.HASH_IP, frozenset({"10.0.0.2", "10.0.0.1"}), description="pod=a"
            ),
            S2: IpSetSpec(
                S2, SetType.HASH_NET, frozenset({"10.0.0.0/8"}), frozenset({"10.1.0.0/16"})
            ),
        },
        hooks=(HookRule("filter", "FORWARD", "-j FL-FORWARD"),),
    )


def test_rule_hash_is_stable_hex_and_position_sensitive() -> None:
    # Golden value: a change here changes every comment in every kernel, and
    # makes each upgraded agent rewrite all its chains once.
    assert rule_hash(C1, 0, "-j DROP") == "fe988ac60252c25b"
    h = rule_hash(C1, 0, "-j DROP")
    assert len(h) == 16 and set(h) <= set(string.hexdigits.lower())
    assert rule_hash(C1, 1, "-j DROP") != h
    assert rule_hash(C2, 0, "-j DROP") != h
    assert rule_hash(C1, 0, "-j ACCEPT") != h


def test_chain_rule_lines_exact() -> None:
    chain = small().chains[C1]
    h0, h1 = rule_hash(C1, 0, chain.rules[0]), rule_hash(C1, 1, chain.rules[1])
    assert chain_rule_lines(chain) == [
        f'-A FL-PI-1 -p tcp --dport 80 -j RETURN -m comment --comment "fl:{h0}"',
        f'-A FL-PI-1 -j DROP -m comment --comment "fl:{h1}"',
    ]


def test_iptables_restore_exact() -> None:
    rs = small()
    h0, h1 = (rule_hash(C1, i, r) for i, r in enumerate(rs.chains[C1].rules))
    text = render_iptables_restore(
        rs,
        chains=[C1, C2],
        remove=[ChainName("FL-OLD")],
        hook_inserts=rs.hooks,
        hook_deletes=[("FORWARD", '-m comment --comment "felix-lite:hook" -j FL-X')],
    )
    assert text == (
        "*filter\n"
        ":FL-PI-1 - [0:0]\n"
        ":FL-PI-2 - [0:0]\n"
        ":FL-OLD - [0:0]\n"
        '-D FORWARD -m comment --comment "felix-lite:hook" -j FL-X\n'
        f'-A FL-PI-1 -p tcp --dport 80 -j RETURN -m comment --comment "fl:{h0}"\n'
        f'-A FL-PI-1 -j DROP -m comment --comment "fl:{h1}"\n'
        '-I FORWARD 1 -m comment --comment "felix-lite:hook" -j FL-FORWARD\n'
        "-X FL-OLD\n"
        "COMMIT\n"
    )


def test_iptables_restore_defaults_to_all_chains_and_orders_multiple_hooks() -> None:
    rs = small()
    hooks = [HookRule("filter", "FORWARD", "-j A"), HookRule("filter", "FORWARD", "-j B")]
    text = render_iptables_restore(rs, hook_inserts=hooks)
    lines = text.splitlines()
    assert lines[1:3] == [":FL-PI-1 - [0:0]", ":FL-PI-2 - [0:0]"]
    assert '-I FORWARD 1 -m comment --comment "felix-lite:hook" -j A' in lines
    assert '-I FORWARD 2 -m comment --comment "felix-lite:hook" -j B' in lines
    assert "-X" not in text


def test_iptables_restore_nothing_to_do_is_an_empty_transaction() -> None:
    assert render_iptables_restore(small(), chains=[]) == "*filter\nCOMMIT\n"


def test_ipset_restore_exact() -> None:
    text = render_ipset_restore(small())
    opts = "family inet hashsize 1024 maxelem 1048576"
    assert text == (
        f"create fl-nb-2 hash:net {opts} -exist\n"
        f"create fl-nb-2-t hash:net {opts} -exist\n"
        "flush fl-nb-2-t\n"
        "add fl-nb-2-t 10.0.0.0/8\n"
        "add fl-nb-2-t 10.1.0.0/16 nomatch\n"
        "swap fl-nb-2-t fl-nb-2\n"
        "destroy fl-nb-2-t\n"
        f"create fl-sp-1 hash:ip {opts} -exist\n"
        f"create fl-sp-1-t hash:ip {opts} -exist\n"
        "flush fl-sp-1-t\n"
        "add fl-sp-1-t 10.0.0.1\n"
        "add fl-sp-1-t 10.0.0.2\n"
        "swap fl-sp-1-t fl-sp-1\n"
        "destroy fl-sp-1-t\n"
    )
    assert render_ipset_restore(small(), sets=[S1]).count("create ") == 2


def test_ipset_restore_fresh_sets_filled_in_place() -> None:
    text = render_ipset_restore(small(), sets=[S1], fresh=[S1])
    assert text == (
        "create fl-sp-1 hash:ip family inet hashsize 1024 maxelem 1048576 -exist\n"
        "flush fl-sp-1\n"
        "add fl-sp-1 10.0.0.1\n"
        "add fl-sp-1 10.0.0.2\n"
    )


def test_ipset_members_normalised_and_deduplicated() -> None:
    spec = IpSetSpec(
        SetName("fl-nb-x"),
        SetType.HASH_NET,
        frozenset({"10.0.0.5/8", "10.0.0.0/8", "10.2.3.4/32", "10.3.0.0/16"}),
        frozenset({"10.3.0.0/16"}),
    )
    content = set_content(spec)
    assert content.members == {"10.0.0.0/8", "10.2.3.4"}  # nomatch wins over a same member
    assert content.nomatch == {"10.3.0.0/16"}
    assert normalize_member(SetType.HASH_IP_PORT, "10.0.0.1,80") == "10.0.0.1,tcp:80"
    assert normalize_member(SetType.HASH_IP_PORT, "10.0.0.1,SCTP:80") == "10.0.0.1,sctp:80"
    assert normalize_member(SetType.HASH_IP, "10.0.0.1/32") == "10.0.0.1"


def test_ipset_destroy() -> None:
    assert render_ipset_destroy(["fl-b", "fl-a", "fl-a"]) == "destroy fl-a\ndestroy fl-b\n"


@given(st.text(min_size=1, max_size=40))
def test_temp_set_names_fit_ipset_and_are_ours(identity: str) -> None:
    for kind in (names.KIND_SET_PODS, names.KIND_SET_NET, names.KIND_SET_NAMED_PORT):
        name = names.set_name(kind, identity)
        tmp = temp_set_name(name)
        assert len(tmp) <= IPSET_MAX_NAME
        assert tmp.startswith("fl-") and tmp != name


@given(st.text(min_size=1, max_size=40))
def test_chain_names_fit_iptables(identity: str) -> None:
    for kind in ("TW", "FW", "PI", "PE"):
        assert len(names.chain_name(kind, identity)) <= 28


def test_drop_protocol_rules() -> None:
    rs = Ruleset(chains={C1: Chain(C1, ("-p sctp --dport 80 -j RETURN", "-p tcp -j RETURN"))})
    out, dropped = drop_protocol_rules(rs, "sctp")
    assert out.chains[C1].rules == ("-p tcp -j RETURN",)
    assert dropped == [(C1, "-p sctp --dport 80 -j RETURN")]
    same, none = drop_protocol_rules(out, "sctp")
    assert same == out and none == []


def test_render_human_lists_sets_and_chains() -> None:
    text = render_human(small())
    assert "# 2 ipsets, 2 chains" in text
    assert "ipset fl-sp-1 hash:ip (2 members)  # pod=a" in text
    assert "    10.1.0.0/16 nomatch" in text
    assert "chain FL-PI-1 (2 rules)  # x/a" in text
    assert "    2  -j DROP" in text
    assert "hook filter/FORWARD: -j FL-FORWARD" in text


@given(
    st.sampled_from([SetType.HASH_IP, SetType.HASH_IP_PORT, SetType.HASH_NET]),
    st.frozensets(
        st.one_of(
            st.ip_addresses(v=4).map(str),
            st.tuples(
                st.ip_addresses(v=4), st.sampled_from(["tcp:80", "udp:53", "81", "TCP:9"])
            ).map(lambda t: f"{t[0]},{t[1]}"),
            st.tuples(st.ip_addresses(v=4), st.integers(8, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
            st.sampled_from(["010.0.0.1", "10.0.0.1/32", " 10.0.0.2"]),
        ),
        max_size=8,
    ),
)
def test_whole_set_fast_path_equals_per_member_normalisation(
    set_type: SetType, members: frozenset[str]
) -> None:
    from policy.render import _normalized, normalize_member

    assert _normalized(set_type, members) == frozenset(
        normalize_member(set_type, m) for m in members
    )
