"""The certified threshold of the target-accuracy policy: its bound, its coverage, its per-class split."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from autoannotator.core.guarantee import (
    THRESHOLD_GRID,
    accuracy_interval,
    accuracy_lower_bound,
    certify,
    certify_per_class,
    first_tested,
    min_labels,
)
from autoannotator.core.policies import TargetAccuracy, policy_from_spec


def test_min_labels_are_the_all_right_sample_sizes() -> None:
    assert min_labels(0.95, 0.05) == 59  # 0.95 ** 59 = 0.048 <= 0.05 < 0.95 ** 58
    assert min_labels(0.90, 0.05) == 29
    assert min_labels(0.90, 0.05 / 3) == 39


@pytest.mark.parametrize(("k", "n"), [(1, 1), (9, 10), (55, 60), (200, 240), (0, 5)])
def test_lower_bound_is_the_exact_binomial_bound(k: int, n: int) -> None:
    bound = accuracy_lower_bound(k, n, 0.05)
    expected = binomtest(k, n, alternative="greater").proportion_ci(0.95, method="exact").low
    assert bound == pytest.approx(expected, abs=1e-9)
    low, high = accuracy_interval(k, n)
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-9)


def _calibrated_population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ``1 - 0.7 u^2`` (u uniform: most items sure, as with a trained ensemble) and right
    with probability equal to it, so the accepted accuracy at threshold t >= 0.3 is exactly
    ``1 - (1 - t) / 3``: 0.90 is reached from t = 0.7 on, by 65% of the items."""
    c = 1.0 - 0.7 * rng.random(n) ** 2
    return c, rng.random(n) < c


def _true_accuracy(t: float) -> float:
    return 1.0 - (1.0 - max(t, 0.3)) / 3.0


@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_certified_threshold_misses_the_target_no_more_often_than_delta(delta: float) -> None:
    rng = np.random.default_rng(7)
    draws, target = 600, 0.9
    misses = naive_misses = certified = 0
    for _ in range(draws):
        c, ok = _calibrated_population(rng, 400)
        cert = certify(c, ok, target, delta)
        if cert.threshold is not None:
            certified += 1
            misses += _true_accuracy(cert.threshold) < target
        # The same search without the bound: lowest threshold whose sample accuracy reaches the target.
        naive = [t for t in THRESHOLD_GRID if (c >= t).sum() >= 10 and ok[c >= t].mean() >= target]
        naive_misses += bool(naive) and _true_accuracy(min(naive)) < target
    assert certified >= 0.9 * draws  # the guarantee is not bought by never certifying
    # Binomial slack of three standard deviations over the draws.
    assert misses / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert naive_misses / draws > 0.5  # the check can fail: without the bound the target is missed


def test_too_few_labels_certify_nothing_and_say_how_many_more() -> None:
    c = np.full(20, 0.99)
    cert = certify(c, np.ones(20, dtype=bool), 0.95)
    assert not cert.certified and cert.threshold is None
    assert cert.needed == 59 - 20
    enough = certify(np.full(59, 0.99), np.ones(59, dtype=bool), 0.95)
    assert enough.certified and enough.threshold == 0.99 and enough.needed == 0
    assert enough.lower_bound is not None and enough.lower_bound >= 0.95


def test_members_worse_than_the_target_need_more_than_labels() -> None:
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 1, 500)
    cert = certify(c, rng.random(500) < 0.6, 0.95)
    assert not cert.certified and cert.needed is None


def test_search_stops_at_the_first_failed_threshold() -> None:
    # 200 sure and right items, then a block of wrong ones, then a block of right ones: a threshold
    # below the wrong block would pass again on the whole sample, but the fixed sequence stops.
    c = np.concatenate([np.full(200, 0.95), np.full(40, 0.85), np.full(400, 0.75)])
    ok = np.concatenate([np.ones(200), np.zeros(40), np.ones(400)]).astype(bool)
    assert first_tested(640, 0.9, 0.05) <= 200
    cert = certify(c, ok, 0.9, 0.05)
    assert cert.threshold == 0.95 and cert.accepted == 200
    assert accuracy_lower_bound(600, 640, 0.05) > 0.9  # what a search without the order would take


def test_where_testing_starts_depends_on_counts_alone() -> None:
    assert first_tested(100, 0.9, 0.05) == min_labels(0.9, 0.05) == 29  # as few as can certify
    assert first_tested(290, 0.9, 0.05) == 29
    assert first_tested(470, 0.9, 0.05) == 47  # a tenth of a large group
    assert first_tested(5_000, 0.95, 0.05) == 500


def test_a_large_group_is_not_stopped_by_its_first_few_dozen_items() -> None:
    """71 items at the top, 68 right (bound 0.894 < 0.9), above 2,000 items 95% right: a sequence
    that tested the 71 first would stop there and certify nothing."""
    rng = np.random.default_rng(0)
    c = np.concatenate([np.full(71, 0.97), np.full(2_000, 0.9)])
    ok = np.concatenate([np.arange(71) >= 3, rng.random(2_000) < 0.95])
    assert accuracy_lower_bound(68, 71, 0.05) < 0.9
    cert = certify(c, ok, 0.9, 0.05)
    assert cert.threshold == 0.9 and cert.accepted == 2_071


def _two_class_population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label 1 is rare (15%) and, at the same confidence, right less often than label 0 (c^2, not c)."""
    predicted = (rng.random(n) < 0.15).astype(int)
    c = rng.uniform(0.5, 1.0, n)
    ok = rng.random(n) < np.where(predicted == 0, c, c**2)
    return c, predicted, ok


def test_rare_class_gets_its_own_higher_threshold() -> None:
    rng = np.random.default_rng(3)
    # Accepted accuracy at t: (1 + t) / 2 for label 0 (0.8 from t = 0.6), (1 + t + t^2) / 3 for label 1
    # (0.8 from t = 0.81).
    common, rare = certify_per_class(*_two_class_population(rng, 20_000), 2, 0.8)
    assert common.threshold is not None and rare.threshold is not None
    assert rare.threshold > common.threshold + 0.15
    # On a fresh population each label accepted at its own threshold reaches the target, and so does the mix.
    c2, pred2, ok2 = _two_class_population(rng, 400_000)
    accepted = c2 >= np.array([common.threshold, rare.threshold])[pred2]
    assert ok2[accepted].mean() >= 0.8
    assert ok2[accepted & (pred2 == 1)].mean() >= 0.8
    # One shared threshold (the common label's) would accept the rare label below the target.
    assert ok2[(pred2 == 1) & (c2 >= common.threshold)].mean() < 0.75


def test_target_policy_reviews_everything_until_calibrated() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(3, 50))
    policy = policy_from_spec("target:0.95")
    assert isinstance(policy, TargetAccuracy) and policy.name == "target:0.95"
    assert policy_from_spec("target:0.9:0.1").name == "target:0.9:0.1"
    d = policy.decide(probs)
    assert d.review.all()
    assert (d.labels == probs.mean(0).argmax(1)).all()


def test_target_policy_accepts_only_certified_labels() -> None:
    rng = np.random.default_rng(5)
    n, labels = 3000, 3
    gold = rng.integers(0, labels, n)
    sure = rng.random(n) < 0.7  # the members say 0.9 and are right; elsewhere 0.5 for a wrong label
    wrong = (gold + 1) % labels
    other = (gold + 2) % labels
    probs = np.zeros((3, n, labels))
    rows = np.arange(n)
    probs[:, rows, gold] = np.where(sure, 0.9, 0.3)
    probs[:, rows, wrong] = np.where(sure, 0.05, 0.5)
    probs[:, rows, other] = np.where(sure, 0.05, 0.2)
    policy, certs = TargetAccuracy(0.95).calibrated(probs, gold)
    assert len(certs) == labels and all(c.certified for c in certs)
    assert all(t is not None and 0.5 < t <= 0.9 for t in policy.thresholds)
    d = policy.decide(probs)
    assert (~d.review == sure).all()  # exactly the sure items are accepted
    assert (d.labels[sure] == gold[sure]).all()
    assert policy_from_spec(policy.name) == TargetAccuracy(0.95)  # the spec names the goal only
    with pytest.raises(ValueError, match="calibrate"):
        two = probs[:, :, :2] / probs[:, :, :2].sum(axis=2, keepdims=True)
        policy.decide(two)


@pytest.mark.parametrize(
    "spec", ["target", "target:1.0", "target:0", "target:0.9:0", "target:x", "budget:0.2:target"]
)
def test_bad_target_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="bad policy spec"):
        policy_from_spec(spec)


def test_oracle_share_is_the_smallest_review_that_reaches_the_target() -> None:
    from autoannotator.core.guarantee import oracle_review_share

    c = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    ok = np.array([True, True, False, True, False])
    # Keep the top 2 (100%), top 4 (75%): 0.75 needs 1 of 5 reviewed, 0.9 needs 3 of 5.
    assert oracle_review_share(c, ok, 0.75) == pytest.approx(0.2)
    assert oracle_review_share(c, ok, 0.9) == pytest.approx(0.6)
    assert oracle_review_share(c, ~ok & False, 0.9) == 1.0
    assert oracle_review_share(c, np.ones(5, dtype=bool), 0.99) == 0.0


def test_the_per_label_oracle_reviews_within_each_label_what_its_own_target_needs() -> None:
    from autoannotator.core.guarantee import oracle_review_share, oracle_review_share_per_class

    # Label 0: ten items, all right. Label 1: ten less confident items, its four most confident right.
    c = np.concatenate([np.linspace(0.99, 0.90, 10), np.linspace(0.89, 0.80, 10)])
    predicted = np.array([0] * 10 + [1] * 10)
    ok = np.array([True] * 10 + [True] * 4 + [False] * 6)
    # Pooled, the top 16 are 14/16 = 87.5% right: an oracle keeps 16 for 0.85 and reviews 4 of 20.
    assert oracle_review_share(c, ok, 0.85) == pytest.approx(0.2)
    # Per label, label 1 keeps only its four right items: 6 of 20 reviewed.
    assert oracle_review_share_per_class(c, predicted, ok, 2, 0.85) == pytest.approx(0.3)
    # With every label equally right, the two floors agree.
    assert oracle_review_share_per_class(c, predicted, np.ones(20, dtype=bool), 2, 0.85) == 0.0
    # And lower than the pooled floor: label 1's items are all right but the least confident, under
    # label 0's two wrong ones; one threshold reviews them all, a threshold per label none of them.
    c2 = np.concatenate([np.linspace(0.99, 0.90, 10), np.linspace(0.60, 0.51, 10)])
    ok2 = np.array([True] * 8 + [False] * 2 + [True] * 10)
    assert oracle_review_share(c2, ok2, 0.95) == pytest.approx(0.6)  # only label 0's top 8 kept
    assert oracle_review_share_per_class(c2, predicted, ok2, 2, 0.95) == pytest.approx(0.1)
    assert oracle_review_share_per_class([], [], [], 2, 0.9) == 1.0
    with pytest.raises(ValueError, match="1-D of one length"):
        oracle_review_share_per_class(c, predicted[:3], ok, 2, 0.85)
