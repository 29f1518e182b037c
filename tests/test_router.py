"""Routing policies on hand-computed batches: the paper's epsilon boundaries, confidence policies,
exact budgets, threshold calibration and CLI specs."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autoannotator.core.consensus import member_weights
from autoannotator.core.policies import (
    Budget,
    Decision,
    EpsilonRule,
    Margin,
    MeanProbability,
    Policy,
    Route,
    WeightedVote,
    policy_from_spec,
    threshold_for_share,
)


def from_votes(votes: list[list[int]], n_labels: int, p: float = 0.7) -> np.ndarray:
    """``[k, n, L]`` where member j puts ``p`` on ``votes[i][j]`` and spreads the rest evenly."""
    v = np.array(votes).T
    out = np.full((*v.shape, n_labels), (1 - p) / (n_labels - 1))
    np.put_along_axis(out, v[..., None], p, axis=2)
    return out


def single_member(rows: list[list[float]]) -> np.ndarray:
    return np.array([rows])


@st.composite
def probs(draw: st.DrawFn) -> np.ndarray:
    k, n, n_labels = draw(st.integers(1, 5)), draw(st.integers(0, 12)), draw(st.integers(2, 4))
    raw = draw(arrays(np.float64, (k, n, n_labels), elements=st.floats(0.01, 1.0)))
    return raw / raw.sum(axis=2, keepdims=True)


ALL_POLICIES: list[Policy] = [
    EpsilonRule(),
    MeanProbability(0.7),
    WeightedVote(0.7),
    Margin(0.2),
    Budget(MeanProbability(0.0), fraction=0.25),
    Budget(Margin(0.0), count=3),
]

# k = 3 over L = 3: unanimous, 2-1, 1-1-1 (U = 0, 1/3, 2/3).
K3 = from_votes([[0, 0, 0], [1, 1, 2], [0, 1, 2]], n_labels=3)


@pytest.mark.parametrize(
    ("epsilon", "reviewed"),
    [
        (0.0, [True, True, True]),
        (0.2, [False, True, True]),
        (1 / 3, [False, True, True]),
        (0.34, [False, False, True]),
        (0.5, [False, False, True]),
        (2 / 3, [False, False, True]),
        (0.67, [False, False, False]),
        (1.0, [False, False, False]),
    ],
)
def test_epsilon_boundaries_for_k3(epsilon: float, reviewed: list[bool]) -> None:
    d = EpsilonRule(epsilon).decide(K3)
    assert d.review.tolist() == reviewed
    assert d.labels.tolist()[:2] == [0, 1]
    np.testing.assert_allclose(d.confidence, [1, 2 / 3, 1 / 3])


# k = 5 over L = 3: 5-0, 4-1, 3-2, 3-1-1, 2-2-1 (U = 0, 1/5, 2/5, 2/5, 3/5).
K5 = from_votes(
    [[0] * 5, [1, 1, 1, 1, 0], [2, 2, 2, 0, 0], [0, 0, 0, 1, 2], [0, 0, 1, 1, 2]],
    n_labels=3,
)


@pytest.mark.parametrize(
    ("epsilon", "reviewed"),
    [
        (0.2, [False, True, True, True, True]),
        (0.21, [False, False, True, True, True]),
        (0.4, [False, False, True, True, True]),
        (0.41, [False, False, False, False, True]),
        (0.6, [False, False, False, False, True]),
        (0.61, [False, False, False, False, False]),
    ],
)
def test_epsilon_boundaries_for_k5(epsilon: float, reviewed: list[bool]) -> None:
    d = EpsilonRule(epsilon).decide(K5)
    assert d.review.tolist() == reviewed
    assert d.labels.tolist() == [0, 1, 2, 0, 0]


def test_default_epsilon_reviews_nothing_with_two_labels_and_k3() -> None:
    p = from_votes([[0, 0, 1], [1, 0, 1], [0, 0, 0]], n_labels=2)
    assert not EpsilonRule().decide(p).review.any()
    assert EpsilonRule(1 / 3).decide(p).review.tolist() == [True, True, False]


# Two members lean weakly to label 0, one is sure of label 1: the vote says 0, the mean says 1.
LEANING = np.array([[[0.51, 0.49]], [[0.51, 0.49]], [[0.0, 1.0]]])


def test_mean_probability_can_overrule_the_vote() -> None:
    assert EpsilonRule().decide(LEANING).labels.tolist() == [0]
    d = MeanProbability(0.7).decide(LEANING)
    assert d.labels.tolist() == [1]
    np.testing.assert_allclose(d.confidence, [0.66])
    assert d.review.tolist() == [True]
    assert MeanProbability(0.66).decide(LEANING).review.tolist() == [False]  # strictly below reviews


def test_weights_change_the_decision() -> None:
    assert WeightedVote(0.5).decide(LEANING, np.array([0.0, 0.0, 1.0])).labels.tolist() == [1]
    d = WeightedVote(0.5).decide(LEANING, np.array([1.0, 1.0, 0.0]))
    assert d.labels.tolist() == [0]
    np.testing.assert_allclose(d.confidence, [0.51])


def test_weighted_vote_without_weights_is_mean_probability() -> None:
    a, b = WeightedVote(0.7).decide(K5), MeanProbability(0.7).decide(K5)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.confidence, b.confidence)
    assert np.array_equal(a.review, b.review)


def test_member_weights_from_verified_items_flip_a_label() -> None:
    # On three verified items members 0 and 1 were always wrong, member 2 always right.
    history = from_votes([[1, 1, 0], [0, 0, 1], [1, 1, 0]], n_labels=2)
    w = member_weights(history, np.array([0, 1, 0]))
    np.testing.assert_allclose(w, [0.2, 0.2, 0.8])
    batch = np.array([[[0.8, 0.2]], [[0.8, 0.2]], [[0.1, 0.9]]])
    assert MeanProbability(0.5).decide(batch).labels.tolist() == [0]
    d = WeightedVote(0.5).decide(batch, w)
    assert d.labels.tolist() == [1]
    np.testing.assert_allclose(d.confidence, [(0.2 * 0.2 + 0.2 * 0.2 + 0.8 * 0.9) / 1.2])


def test_margin_is_top1_minus_top2() -> None:
    p = single_member([[0.625, 0.25, 0.125], [0.25, 0.375, 0.375]])
    d = Margin(0.375).decide(p)
    assert d.labels.tolist() == [0, 1]
    assert d.confidence.tolist() == [0.375, 0.0]
    assert d.review.tolist() == [False, True]
    assert Margin(0.4).decide(p).review.tolist() == [True, True]


# One member, ten items whose mean-probability confidence is 0.95, 0.9, ..., 0.5 (descending).
TEN = single_member([[c, 1 - c] for c in np.linspace(0.95, 0.5, 10)])


def test_budget_fraction_reviews_the_least_confident() -> None:
    d = Budget(MeanProbability(0.0), fraction=0.3).decide(TEN)
    assert d.review.tolist() == [False] * 7 + [True] * 3  # 0.3 * 10 is 3 items, not 4
    assert Budget(MeanProbability(0.0), fraction=0.25).decide(TEN).review.sum() == 3  # ceil(2.5)
    assert Budget(MeanProbability(0.0), fraction=0.0).decide(TEN).review.sum() == 0
    assert Budget(MeanProbability(0.0), fraction=1.0).decide(TEN).review.all()


def test_budget_count_and_small_batches() -> None:
    d = Budget(MeanProbability(0.0), count=2).decide(TEN)
    assert np.flatnonzero(d.review).tolist() == [8, 9]
    assert Budget(MeanProbability(0.0), count=50).decide(TEN).review.all()
    assert not Budget(MeanProbability(0.0), count=0).decide(TEN).review.any()


def test_budget_breaks_ties_by_item_index_and_keeps_base_labels() -> None:
    p = single_member([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5], [0.5, 0.5]])
    d = Budget(MeanProbability(0.0), count=2).decide(p)
    assert d.review.tolist() == [True, False, True, False]
    assert d.labels.tolist() == [0, 1, 0, 0]


def test_budget_ignores_the_base_threshold() -> None:
    assert MeanProbability(1.0).decide(TEN).review.all()
    assert Budget(MeanProbability(1.0), count=1).decide(TEN).review.tolist() == [False] * 9 + [True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of fraction and count"),
        ({"fraction": 0.1, "count": 3}, "exactly one of fraction and count"),
        ({"fraction": 1.5}, r"fraction must be in \[0, 1\]"),
        ({"count": -1}, "count must be an integer >= 0"),
        ({"count": 2.0}, "count must be an integer >= 0"),
        ({"count": True}, "count must be an integer >= 0"),
    ],
)
def test_budget_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(MeanProbability(0.5), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (EpsilonRule, -0.1),
        (EpsilonRule, 1.1),
        (MeanProbability, 1.5),
        (WeightedVote, -0.01),
        (Margin, math.nan),
    ],
)
def test_parameters_outside_unit_interval_are_refused(make: type, value: float) -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        make(value)


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.name)
def test_empty_batch(policy: Policy) -> None:
    d = policy.decide(np.zeros((3, 0, 2)))
    assert (d.labels.shape, d.confidence.shape, d.review.shape) == ((0,), (0,), (0,))
    assert d.review_share == 0.0 and d.routes == []


def test_decision_helpers() -> None:
    d = EpsilonRule(1 / 3).decide(K3)
    assert d.review_share == pytest.approx(2 / 3)
    assert d.routes == [Route.ACCEPT, Route.REVIEW, Route.REVIEW]
    assert json.dumps(d.routes) == '["accept", "review", "review"]'
    with pytest.raises(ValueError, match="1-D of one length"):
        Decision(np.zeros(2, dtype=int), np.zeros(3), np.zeros(2, dtype=bool))


CONF = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])


def test_threshold_for_share() -> None:
    t = threshold_for_share(CONF, 0.3)
    assert t == pytest.approx(0.35)
    assert (t > CONF).sum() == 3
    assert threshold_for_share(CONF, 0.0) == 0.0
    assert threshold_for_share(CONF, 1.0) == 1.0  # routes all but the item at confidence 1.0
    assert threshold_for_share(np.array([]), 0.5) == 0.0


def test_threshold_for_share_never_routes_more_across_a_tie() -> None:
    assert threshold_for_share(np.array([0.5, 0.5, 0.5, 0.9]), 0.5) == 0.0
    t = threshold_for_share(np.array([0.1, 0.5, 0.5, 0.9]), 0.5)
    assert t == pytest.approx(0.3)


def test_threshold_calibrated_on_one_chunk_applies_to_the_next() -> None:
    t = threshold_for_share(MeanProbability(0.0).decide(TEN).confidence, 0.2)
    assert t == pytest.approx(0.575)  # midway between the 2nd (0.55) and 3rd (0.6) least confident
    harder = single_member([[0.52, 0.48], [0.51, 0.49], [0.6, 0.4], [0.9, 0.1]])
    assert MeanProbability(t).decide(harder).review.tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("confidence", "share", "message"),
    [
        (np.array([[0.5]]), 0.5, "1-D array"),
        (np.array([0.5, 1.5]), 0.5, r"values in \[0, 1\]"),
        (np.array([0.5]), 1.5, r"share must be in \[0, 1\]"),
    ],
)
def test_threshold_for_share_validation(confidence: np.ndarray, share: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        threshold_for_share(confidence, share)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("epsilon", EpsilonRule(0.34)),
        ("epsilon:0.34", EpsilonRule(0.34)),
        ("mean:0.7", MeanProbability(0.7)),
        (" Mean : 0.7 ", MeanProbability(0.7)),
        ("weighted:0.7", WeightedVote(0.7)),
        ("margin:0.2", Margin(0.2)),
        ("budget:0.2:mean", Budget(MeanProbability(0.0), fraction=0.2)),
        ("budget:50:mean", Budget(MeanProbability(0.0), count=50)),
        ("budget:1:margin", Budget(Margin(0.0), count=1)),
        ("budget:1.0:mean", Budget(MeanProbability(0.0), fraction=1.0)),
        ("budget:0:weighted", Budget(WeightedVote(0.0), count=0)),
        ("budget:0.0:weighted", Budget(WeightedVote(0.0), fraction=0.0)),
        ("budget:0.1:mean:0.7", Budget(MeanProbability(0.7), fraction=0.1)),
        ("budget:5:epsilon", Budget(EpsilonRule(), count=5)),
    ],
)
def test_policy_from_spec(spec: str, expected: Policy) -> None:
    assert policy_from_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "bad policy spec ''; use epsilon"),
        ("mean", "bad policy spec 'mean'; use"),
        ("mean:abc", "threshold must be a number in \\[0, 1\\], got 'abc'"),
        ("mean:1.5", "threshold must be a number in \\[0, 1\\], got '1.5'"),
        ("mean:nan", "got 'nan'"),
        ("mean:0.7:0.1", "bad policy spec 'mean:0.7:0.1'"),
        ("epsilon:0.1:0.2", "bad policy spec"),
        ("entropy:0.3", "bad policy spec 'entropy:0.3'; use"),
        ("budget:0.2", "bad policy spec 'budget:0.2'"),
        ("budget:2.5:mean", "budget fraction must be a number in \\[0, 1\\], got '2.5'"),
        ("budget:-3:mean", "budget fraction must be a number in \\[0, 1\\], got '-3'"),
        ("budget:0.2:budget:0.1:mean", "bad policy spec 'budget:0.2:budget:0.1:mean'"),
        ("budget:0.2:entropy", "bad policy spec"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy_from_spec(spec)


unit = st.floats(0.0, 1.0)
policies = st.one_of(
    st.builds(EpsilonRule, unit),
    st.builds(MeanProbability, unit),
    st.builds(WeightedVote, unit),
    st.builds(Margin, unit),
)


@settings(deadline=None)
@given(
    st.one_of(
        policies,
        st.builds(Budget, policies, fraction=unit),
        st.builds(Budget, policies, count=st.integers(0, 10**6)),
    )
)
def test_a_policy_name_is_its_spec(policy: Policy) -> None:
    assert policy_from_spec(policy.name) == policy


@settings(deadline=None)
@given(probs(), st.sampled_from(ALL_POLICIES))
def test_every_policy_gives_labels_in_range_and_confidence_in_unit_interval(
    p: np.ndarray, policy: Policy
) -> None:
    d = policy.decide(p, np.linspace(1.0, 2.0, p.shape[0]))
    n, n_labels = p.shape[1], p.shape[2]
    assert d.labels.shape == (n,) and ((d.labels >= 0) & (d.labels < n_labels)).all()
    assert ((d.confidence >= 0) & (d.confidence <= 1)).all()
    assert d.review.dtype == bool and d.review.shape == (n,)


@settings(deadline=None)
@given(probs(), st.sampled_from(ALL_POLICIES[:4]), st.integers(0, 100), st.integers(0, 20))
def test_budget_routes_exactly_what_was_asked(p: np.ndarray, base: Policy, percent: int, count: int) -> None:
    n = p.shape[1]
    by_fraction = Budget(base, fraction=percent / 100).decide(p)
    assert by_fraction.review.sum() == math.ceil(Fraction(percent, 100) * n)
    by_count = Budget(base, count=count).decide(p)
    assert by_count.review.sum() == min(count, n)
    conf = by_count.confidence
    if by_count.review.any() and not by_count.review.all():
        assert conf[by_count.review].max() <= conf[~by_count.review].min()
    assert np.array_equal(by_count.labels, base.decide(p).labels)


@settings(deadline=None)
@given(st.lists(st.floats(0.0, 1.0), max_size=30), st.integers(0, 100))
def test_threshold_for_share_never_routes_more_than_asked(conf: list[float], percent: int) -> None:
    c = np.array(conf, dtype=np.float64)
    t = threshold_for_share(c, percent / 100)
    target = math.ceil(Fraction(percent, 100) * len(conf))
    assert 0.0 <= t <= 1.0
    assert (c < t).sum() <= target
    if len(set(conf)) == len(conf) and max(conf, default=0.0) < 1.0:
        assert (c < t).sum() == target
