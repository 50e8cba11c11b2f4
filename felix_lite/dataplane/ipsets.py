"""Reading `ipset list -n` / `ipset save` into comparable set contents."""

from __future__ import annotations

from policy.names import is_ours_set
from policy.render import SetContent, normalize_member
from policy.ruleset import SetType


def parse_list_names(text: str) -> set[str]:
    """Our set names from `ipset list -n` (others' sets are ignored)."""
    return {ln.strip() for ln in text.splitlines() if is_ours_set(ln.strip())}


def parse_save(text: str) -> dict[str, SetContent | None]:
    """Our sets from `ipset save`: content, or None for a type we never create."""
    types: dict[str, SetType | None] = {}
    members: dict[str, set[str]] = {}
    nomatch: dict[str, set[str]] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if len(parts) < 3 or not is_ours_set(parts[1]):
            continue
        verb, name = parts[0], parts[1]
        if verb == "create":
            try:
                types[name] = SetType(parts[2])
            except ValueError:
                types[name] = None
            members.setdefault(name, set())
            nomatch.setdefault(name, set())
        elif verb == "add":
            set_type = types.get(name)
            member = parts[2] if set_type is None else normalize_member(set_type, parts[2])
            target = nomatch if "nomatch" in parts[3:] else members
            target.setdefault(name, set()).add(member)
    out: dict[str, SetContent | None] = {}
    for name, set_type in types.items():
        out[name] = (
            None
            if set_type is None
            else SetContent(
                type=set_type,
                members=frozenset(members.get(name, ())),
                nomatch=frozenset(nomatch.get(name, ())),
            )
        )
    return out
