"""Label selectors: Kubernetes semantics, canonical form, description."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.model import Labels, LabelSelector, Operator, Requirement
from policy.selectors import canonical, compile_selector, describe, matches
from tests.unit.strategies import label_selectors, labels


def _sel(ml: dict[str, str] | None = None, *exprs: Requirement) -> LabelSelector:
    return LabelSelector(match_labels=Labels(ml or {}), match_expressions=tuple(exprs))


def _req(key: str, op: Operator, *values: str) -> Requirement:
    return Requirement(key=key, operator=op, values=tuple(values))


def reference_matches(sel: LabelSelector, lab: Mapping[str, str]) -> bool:
    """Straight from the metav1.LabelSelector docs, no cleverness."""
    for k, v in sel.match_labels.items():
        if k not in lab or lab[k] != v:
            return False
    for r in sel.match_expressions:
        present = r.key in lab
        if r.operator == Operator.IN and not (present and lab[r.key] in r.values):
            return False
        if r.operator == Operator.NOT_IN and present and lab[r.key] in r.values:
            return False
        if r.operator == Operator.EXISTS and not present:
            return False
        if r.operator == Operator.DOES_NOT_EXIST and present:
            return False
    return True


def normal_form(sel: LabelSelector) -> frozenset[tuple[str, str, frozenset[str]]]:
    """The semantic identity canonical() must respect: matchLabels k=v is k In (v)."""
    out = {(k, "In", frozenset([v])) for k, v in sel.match_labels.items()}
    out |= {(r.key, r.operator.value, frozenset(r.values)) for r in sel.match_expressions}
    return frozenset(out)


# ---------------------------------------------------------------- matches


@pytest.mark.parametrize(
    ("sel", "lab", "expected"),
    [
        (_sel(), {}, True),
        (_sel(), {"pod": "a"}, True),
        (_sel({"pod": "a"}), {"pod": "a", "x": "y"}, True),
        (_sel({"pod": "a"}), {"pod": "b"}, False),
        (_sel({"pod": "a"}), {}, False),
        (_sel({"pod": "a", "app": "web"}), {"pod": "a"}, False),
        (_sel(None, _req("tier", Operator.IN, "web", "api")), {"tier": "api"}, True),
        (_sel(None, _req("tier", Operator.IN, "web", "api")), {"tier": "db"}, False),
        (_sel(None, _req("tier", Operator.IN, "web")), {}, False),
        (_sel(None, _req("tier", Operator.NOT_IN, "web")), {}, True),
        (_sel(None, _req("tier", Operator.NOT_IN, "web")), {"tier": "web"}, False),
        (_sel(None, _req("tier", Operator.NOT_IN, "web")), {"tier": "api"}, True),
        (_sel(None, _req("tier", Operator.EXISTS)), {"tier": ""}, True),
        (_sel(None, _req("tier", Operator.EXISTS)), {"pod": "a"}, False),
        (_sel(None, _req("tier", Operator.DOES_NOT_EXIST)), {"pod": "a"}, True),
        (_sel(None, _req("tier", Operator.DOES_NOT_EXIST)), {"tier": "x"}, False),
        (_sel({"pod": "a"}, _req("tier", Operator.EXISTS)), {"pod": "a"}, False),
        (_sel({"pod": "a"}, _req("tier", Operator.EXISTS)), {"pod": "a", "tier": "w"}, True),
        # Empty value is a value: In ("") matches key=""; NotIn ("") excludes it.
        (_sel(None, _req("k", Operator.IN, "")), {"k": ""}, True),
        (_sel(None, _req("k", Operator.NOT_IN, "")), {"k": ""}, False),
    ],
)
def test_matches_cases(sel: LabelSelector, lab: dict[str, str], expected: bool) -> None:
    assert matches(sel, Labels(lab)) is expected
    assert matches(sel, lab) is expected  # any Mapping works, not only Labels
    assert reference_matches(sel, lab) is expected


@given(label_selectors(), labels())
def test_matches_agrees_with_reference(sel: LabelSelector, lab: Labels) -> None:
    assert matches(sel, lab) == reference_matches(sel, lab)
    assert matches(sel, dict(lab)) == reference_matches(sel, lab)


@given(labels(max_size=6))
def test_empty_selector_matches_everything(lab: Labels) -> None:
    assert matches(LabelSelector(), lab)


@given(label_selectors(), labels())
def test_equal_but_distinct_selector_objects_match_alike(sel: LabelSelector, lab: Labels) -> None:
    twin = LabelSelector(Labels(dict(sel.match_labels)), tuple(sel.match_expressions))
    assert twin is not sel
    assert matches(twin, lab) == matches(sel, lab) == compile_selector(sel)(lab)


def test_matches_survives_many_distinct_selectors() -> None:
    # Exercises the identity cache's eviction: results stay right after it.
    lab = Labels({"n": "7"})
    hits = [i for i in range(10000) if matches(_sel({"n": str(i % 50)}), lab)]
    assert hits == [i for i in range(10000) if i % 50 == 7]


# ---------------------------------------------------------------- canonical


def test_canonical_none_and_empty_differ() -> None:
    assert canonical(None) != canonical(LabelSelector())
    assert canonical(LabelSelector()) == canonical(_sel({}))


def test_canonical_order_independent_examples() -> None:
    a = _sel({"x": "1", "y": "2"}, _req("t", Operator.IN, "b", "a"), _req("e", Operator.EXISTS))
    b = _sel({"y": "2", "x": "1"}, _req("e", Operator.EXISTS), _req("t", Operator.IN, "a", "b"))
    assert canonical(a) == canonical(b)


def test_canonical_match_labels_equals_single_value_in() -> None:
    assert canonical(_sel({"pod": "a"})) == canonical(_sel(None, _req("pod", Operator.IN, "a")))


def test_canonical_is_quoted_not_ambiguous() -> None:
    # Keys/values with separators (unvalidated input) must not collide.
    a = _sel({"a": "b,c"})
    b = _sel({"a": "b", "c": ""})
    assert canonical(a) != canonical(b)


@given(label_selectors(), st.randoms(use_true_random=False))
def test_canonical_order_independent(sel: LabelSelector, rnd: object) -> None:
    import random

    assert isinstance(rnd, random.Random)
    items = list(sel.match_labels.items())
    rnd.shuffle(items)
    exprs = [
        Requirement(r.key, r.operator, tuple(rnd.sample(r.values, len(r.values))))
        for r in sel.match_expressions
    ]
    rnd.shuffle(exprs)
    shuffled = LabelSelector(Labels(items), tuple(exprs))
    assert canonical(shuffled) == canonical(sel)


@given(label_selectors(), label_selectors())
def test_canonical_injective_on_normal_forms(a: LabelSelector, b: LabelSelector) -> None:
    assert (canonical(a) == canonical(b)) == (normal_form(a) == normal_form(b))


@given(label_selectors(), label_selectors(), labels())
def test_equal_canonical_means_equal_semantics(
    a: LabelSelector, b: LabelSelector, lab: Labels
) -> None:
    if canonical(a) == canonical(b):
        assert matches(a, lab) == matches(b, lab)


# ---------------------------------------------------------------- describe


@pytest.mark.parametrize(
    ("sel", "text"),
    [
        (None, "none"),
        (LabelSelector(), "all"),
        (_sel({"pod": "a"}), "pod=a"),
        (_sel({"pod": "a"}, _req("tier", Operator.IN, "web", "api")), "pod=a,tier in (api,web)"),
        (_sel(None, _req("tier", Operator.NOT_IN, "db")), "tier notin (db)"),
        (_sel(None, _req("tier", Operator.EXISTS), _req("x", Operator.DOES_NOT_EXIST)), "tier,!x"),
        (_sel({"b": "2", "a": "1"}), "a=1,b=2"),
    ],
)
def test_describe(sel: LabelSelector | None, text: str) -> None:
    assert describe(sel) == text
