"""Consensus on hand-computed batches: votes, the paper's U, the tie rule, weights, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autoannotator.core.consensus import consensus, member_weights, pairwise_disagreement
from autoannotator.errors import BadInputError

# k = 3 members, L = 3 labels, three items: unanimous (0,0,0), a 2-1 split (0,0,1), no majority (0,1,2).
SPLITS = np.array(
    [
        [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]],
        [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]],
        [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]],
    ]
)


def from_votes(votes: list[list[int]], n_labels: int, p: float = 0.7) -> np.ndarray:
    """``[k, n, L]`` where member j puts ``p`` on ``votes[i][j]`` and spreads the rest evenly."""
    v = np.array(votes).T
    out = np.full((*v.shape, n_labels), (1 - p) / (n_labels - 1))
    np.put_along_axis(out, v[..., None], p, axis=2)
    return out


@st.composite
def probs(draw: st.DrawFn) -> np.ndarray:
    k, n, n_labels = draw(st.integers(1, 5)), draw(st.integers(0, 6)), draw(st.integers(2, 4))
    raw = draw(arrays(np.float64, (k, n, n_labels), elements=st.floats(0.01, 1.0)))
    return raw / raw.sum(axis=2, keepdims=True)


def test_unanimous_two_one_and_no_majority_splits() -> None:
    c = consensus(SPLITS)
    assert c.k == 3 and c.n == 3
    assert c.votes.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2]]
    assert c.counts.tolist() == [[3, 0, 0], [2, 1, 0], [1, 1, 1]]
    np.testing.assert_allclose(c.agreement, [1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(c.uncertainty, [0, 1 / 3, 2 / 3])
    # Item 2 is a 1-1-1 tie; the mean probability [0.3, 0.4, 0.3] breaks it towards label 1.
    np.testing.assert_allclose(c.mean_proba[2], [0.3, 0.4, 0.3])
    assert c.majority.tolist() == [0, 0, 1]


def test_vote_tie_goes_to_the_higher_mean_not_the_lower_index() -> None:
    p = np.array([[[0.55, 0.45]], [[0.1, 0.9]]])  # votes 0 and 1; mean [0.325, 0.675]
    assert consensus(p).majority.tolist() == [1]
    assert consensus(p[::-1]).majority.tolist() == [1]


def test_full_tie_goes_to_the_lowest_tied_index() -> None:
    p = np.array([[[0.0, 0.4, 0.6]], [[0.0, 0.6, 0.4]]])  # votes 2 and 1, mean [0, 0.5, 0.5]
    assert consensus(p).majority.tolist() == [1]


def test_mean_tie_survives_float_rounding_and_member_order() -> None:
    # 2-2-1 over five members: labels 0 and 1 have equal means that float sums make unequal.
    p = from_votes([[0, 0, 1, 1, 2]], n_labels=3)
    for order in ([0, 1, 2, 3, 4], [2, 3, 0, 1, 4], [4, 3, 2, 1, 0]):
        assert consensus(p[order]).majority.tolist() == [0]


def test_majority_is_only_chosen_among_labels_tied_on_votes() -> None:
    # Label 0 has the highest mean (0.45) but no vote; labels 1 and 2 tie 2-2 with equal means.
    p = np.array([[[0.45, 0.55, 0.0]]] * 2 + [[[0.45, 0.0, 0.55]]] * 2)
    c = consensus(p)
    assert c.counts.tolist() == [[0, 2, 2]]
    assert c.majority.tolist() == [1]


def test_member_argmax_tie_votes_for_the_lowest_index() -> None:
    assert consensus(np.array([[[0.5, 0.5]]])).votes.tolist() == [[0]]


def test_weighted_proba_is_the_mean_without_weights_and_follows_weights() -> None:
    c = consensus(SPLITS)
    assert c.weighted_proba is c.mean_proba
    np.testing.assert_allclose(consensus(SPLITS, np.array([1.0, 0, 0])).weighted_proba, SPLITS[0])
    np.testing.assert_allclose(consensus(SPLITS, np.array([2.0, 2, 2])).weighted_proba, c.mean_proba)
    np.testing.assert_allclose(
        consensus(SPLITS, np.array([3.0, 1, 0])).weighted_proba, 0.75 * SPLITS[0] + 0.25 * SPLITS[1]
    )


def test_arrays_are_read_only() -> None:
    c = consensus(SPLITS)
    with pytest.raises(ValueError, match="read-only"):
        c.majority[0] = 2


def test_rows_within_tolerance_are_renormalised() -> None:
    p = np.array([[[0.6005, 0.4]]])
    c = consensus(p)
    assert c.mean_proba.sum() == pytest.approx(1.0, abs=1e-12)
    assert c.mean_proba.max() <= 1.0


def test_single_member_is_always_unanimous() -> None:
    c = consensus(SPLITS[:1])
    assert c.uncertainty.tolist() == [0.0, 0.0, 0.0]
    assert c.majority.tolist() == [0, 0, 0]


def test_empty_batch() -> None:
    c = consensus(np.zeros((3, 0, 2)))
    assert (c.votes.shape, c.counts.shape, c.majority.shape) == ((0, 3), (0, 2), (0,))
    assert (c.agreement.shape, c.mean_proba.shape, c.n) == ((0,), (0, 2), 0)
    assert member_weights(np.zeros((3, 0, 2)), np.array([], dtype=int)).tolist() == [0.5, 0.5, 0.5]
    assert pairwise_disagreement(np.zeros((2, 0, 2))).tolist() == [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize(
    ("probs_", "message"),
    [
        (np.full((3, 2), 0.5), r"shape \[k members, n items, L labels\], got \(3, 2\)"),
        (np.zeros((0, 2, 2)), "no member"),
        (np.ones((2, 2, 1)), "1 label"),
        ([[["a", "b"]]], "numeric"),
    ],
)
def test_shapes_and_types_are_validated(probs_: object, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        consensus(probs_)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("member", "row", "value", "message"),
    [
        (1, 2, [np.nan, 0.5], "member 1, row 2 has a non-finite value"),
        (0, 1, [1.2, -0.2], "member 0, row 1 has a negative value"),
        (2, 0, [0.5, 0.4], "member 2, row 0 has a sum away from 1"),
        (2, 0, [3.0, 5.0], "member 2, row 0 has a sum away from 1"),
    ],
)
def test_bad_rows_are_named(member: int, row: int, value: list[float], message: str) -> None:
    p = np.full((3, 3, 2), 0.5)
    p[member, row] = value
    with pytest.raises(BadInputError, match=message):
        consensus(p)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.array([1.0, 1.0]), "one entry per member"),
        (np.array([1.0, -1.0, 1.0]), "non-negative"),
        (np.array([1.0, np.nan, 1.0]), "finite"),
        (np.zeros(3), "positive sum"),
    ],
)
def test_bad_weights_are_refused(weights: np.ndarray, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        consensus(SPLITS, weights)


# Members vote [0,1,0,1], [0,0,0,0] and [1,0,1,0] on four items.
FOUR = from_votes([[0, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]], n_labels=2)


def test_member_weights_are_smoothed_accuracy_on_verified_items() -> None:
    gold = np.array([0, 1, -1, 1])  # item 2 is not verified
    # Right on 3, 1 and 0 of the 3 verified items.
    np.testing.assert_allclose(member_weights(FOUR, gold), [4 / 5, 2 / 5, 1 / 5])
    np.testing.assert_allclose(member_weights(FOUR, gold, smoothing=0.5), [3.5 / 4, 1.5 / 4, 0.5 / 4])
    np.testing.assert_allclose(member_weights(FOUR, np.full(4, -1)), [0.5, 0.5, 0.5])


@pytest.mark.parametrize(
    ("gold", "smoothing", "error", "message"),
    [
        (np.array([0, 1, 0]), 1.0, BadInputError, r"one entry per item \(4\)"),
        (np.array([0.0, 1.0, 0.0, 1.0]), 1.0, BadInputError, "integer label indices"),
        (np.array([0, 1, 2, 1]), 1.0, BadInputError, "label index 2, but there are only 2 labels"),
        (np.array([0, 1, 0, 1]), 0.0, ValueError, "smoothing must be > 0"),
    ],
)
def test_member_weights_validation(gold: np.ndarray, smoothing: float, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        member_weights(FOUR, gold, smoothing)


def test_pairwise_disagreement() -> None:
    d = pairwise_disagreement(FOUR)
    np.testing.assert_allclose(d, [[0, 0.5, 1], [0.5, 0, 0.5], [1, 0.5, 0]])


def test_identical_members_never_disagree() -> None:
    assert not pairwise_disagreement(np.stack([SPLITS[0]] * 3)).any()


@settings(deadline=None)
@given(probs())
def test_consensus_invariants(p: np.ndarray) -> None:
    c = consensus(p)
    k, n, n_labels = p.shape
    assert (c.counts.sum(axis=1) == k).all()
    assert ((c.majority >= 0) & (c.majority < n_labels)).all()
    top = c.counts.max(axis=1)
    assert (c.counts[np.arange(n), c.majority] == top).all()
    np.testing.assert_allclose(c.agreement * k, top)
    np.testing.assert_allclose(c.uncertainty, 1 - c.agreement)
    assert ((c.uncertainty >= 0) & (c.uncertainty <= 1 - 1 / k + 1e-12)).all()
    np.testing.assert_allclose(c.mean_proba.sum(axis=1), 1.0)
    tied_means = np.where(c.counts == top[:, None], c.mean_proba, -np.inf)
    assert (c.mean_proba[np.arange(n), c.majority] >= tied_means.max(axis=1) - 1e-9).all()


@settings(deadline=None)
@given(probs(), st.randoms(use_true_random=False))
def test_member_order_does_not_matter(p: np.ndarray, rnd: object) -> None:
    order = np.arange(p.shape[0])
    rnd.shuffle(order)  # type: ignore[attr-defined]
    a, b = consensus(p), consensus(p[order])
    assert (a.counts == b.counts).all()
    assert (a.votes[:, order] == b.votes).all()
    assert (a.majority == b.majority).all()
    np.testing.assert_allclose(a.mean_proba, b.mean_proba)
    d = pairwise_disagreement(p)
    np.testing.assert_allclose(pairwise_disagreement(p[order]), d[np.ix_(order, order)])
