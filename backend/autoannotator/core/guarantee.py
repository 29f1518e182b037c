"""How sure can a project manager be that auto-accepted labels are at least ``target`` right?

A threshold ``t`` on the ensemble's confidence accepts the items with ``confidence >= t``. Its
*accepted accuracy* is the share of those items whose label is right. :func:`certify` picks the
lowest threshold whose accepted accuracy is at least ``target`` with probability at least
``1 - delta`` over the draw of the calibration labels, the way Learn-then-Test does (Angelopoulos
et al., 2021):

- For each threshold, a one-sided exact binomial (Clopper-Pearson) bound: the accuracy of the
  calibration items at or above it is certified when its ``1 - delta`` lower bound reaches the
  target.
- Thresholds are tested in a fixed order, from the most cautious (1.0) down a fixed grid, and the
  search stops at the first one that fails. Fixed-sequence testing needs no correction for the
  number of thresholds tried: a first false certificate can only happen at the first threshold
  whose true accuracy is below the target, and that single test errs with probability at most
  ``delta``.
- Thresholds with few calibration items at or above them are passed over, not failed: fewer than
  :func:`first_tested` of the group's items. That is :func:`min_labels` (fewer could not certify
  even with every label right), and in a large group a tenth of its items. A sequence that starts
  on a few dozen items stops at the first of them that is wrong one time too often, however well
  the thousands below would have certified: with 10,000 calibration labels, a label 93% right
  over its top 2,000 items went uncertified in three draws of five because 68 of its top 71 were
  right. Whether a threshold is passed over depends only on how many items lie above it, never on
  whether they are right, so given those counts the order of the tests stays fixed.
- Per class (:func:`certify_per_class`), each predicted label gets its own threshold from the
  items predicted as that label, at ``delta / L`` each (Bonferroni). All L certificates then
  hold together with probability ``1 - delta``, so the accuracy of everything accepted, a mix
  of the classes, is at least the target too. A rare label is not accepted at the common
  label's threshold. A label with too few calibration items gets no threshold at all: its items
  all go to review, and :attr:`Certificate.needed` says how many more labels it takes at least.

The guarantee holds only if the calibration labels are a fair sample of the items the threshold
will be applied to, and no model being judged was trained on them. Which labels qualify is the
caller's business (:mod:`autoannotator.lab.simulate` and the README's routing section explain the
choice): items routed to review are not a fair sample, since the router chose them for being
hard.

The exact bound is the beta distribution's quantile (``scipy.special.betaincinv``, imported on first
use: a web worker that only applies certified thresholds never loads SciPy for it). MAPIE's risk
controllers implement the same idea but need a scikit-learn estimator to refit and give no per-class
Bonferroni split or "labels needed" count; the procedure itself fits in this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Thresholds tried, most cautious first: 1.0, 0.995, ..., 0.0.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(1.0 - i / 200, 3) for i in range(201))
DEFAULT_DELTA = 0.05
# The fewest items whose accuracy :attr:`Certificate.needed` extrapolates from (fewer say little).
RATE_SAMPLE = 20
# In a large group, the first threshold tested keeps at least this share of its calibration items.
FIRST_TESTED_SHARE = 0.1


def _beta_quantile(q: float, a: Any, b: Any) -> Any:
    """The ``q`` quantile of Beta(a, b), elementwise (``scipy.stats.beta.ppf``)."""
    from scipy.special import betaincinv

    return betaincinv(a, b, q)


def _check_open_unit(what: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{what} must be in (0, 1), got {value!r}")


def accuracy_lower_bound(correct: int, n: int, delta: float) -> float:
    """The one-sided ``1 - delta`` Clopper-Pearson lower bound on a success rate seen as
    ``correct`` of ``n`` (0.0 for no successes or no items)."""
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if correct == 0:
        return 0.0
    return float(_beta_quantile(delta, correct, n - correct + 1))


def accuracy_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided exact (Clopper-Pearson) interval for a success rate; (0, 1) with no items."""
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    a = (1.0 - confidence) / 2
    low = float(_beta_quantile(a, correct, n - correct + 1)) if correct > 0 else 0.0
    high = float(_beta_quantile(1 - a, correct + 1, n - correct)) if correct < n else 1.0
    return low, high


def min_labels(target: float, delta: float) -> int:
    """The fewest calibration items that can certify ``target``, all of them right: the smallest
    n with ``target ** n <= delta`` (59 for 0.95 and 29 for 0.90 at delta = 0.05)."""
    _check_open_unit("target", target)
    _check_open_unit("delta", delta)
    n = math.ceil(math.log(delta) / math.log(target))
    # Guard against rounding in the logarithms: the bound itself decides.
    while n > 1 and accuracy_lower_bound(n - 1, n - 1, delta) >= target:
        n -= 1
    while accuracy_lower_bound(n, n, delta) < target:
        n += 1
    return n


def first_tested(n: int, target: float, delta: float) -> int:
    """How many of a group's ``n`` calibration items the first threshold tested keeps at least:
    :func:`min_labels`, or a tenth of ``n`` where that is more. It depends on counts alone, so the
    tests' order stays fixed before any label is read; a group of fewer than ten times
    :func:`min_labels` starts where the fewest items could certify, as a small one must."""
    return max(min_labels(target, delta), math.ceil(FIRST_TESTED_SHARE * n))


@dataclass(frozen=True)
class Certificate:
    """The outcome of :func:`certify` on one group of calibration items.

    ``threshold`` is the lowest certified threshold, or None when none could be certified (then
    every item of the group goes to review). ``accepted`` and ``correct`` count the calibration
    items at or above it, ``lower_bound`` is their certified accuracy. ``needed`` is how many more
    calibration labels it takes at the very least to certify anything (0 once certified).
    """

    target: float
    delta: float
    calibration: int
    threshold: float | None
    accepted: int = 0
    correct: int = 0
    lower_bound: float | None = None
    needed: int | None = 0

    @property
    def certified(self) -> bool:
        return self.threshold is not None

    @property
    def accuracy(self) -> float | None:
        """The calibration items' accuracy at the certified threshold (an estimate, not the bound)."""
        return self.correct / self.accepted if self.accepted else None


def certify(
    confidence: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    target: float,
    delta: float = DEFAULT_DELTA,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> Certificate:
    """The lowest threshold of ``grid`` (tested from its first entry on, in order) whose accepted
    accuracy is certified to be at least ``target`` with probability ``1 - delta``."""
    _check_open_unit("target", target)
    _check_open_unit("delta", delta)
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if c.ndim != 1 or c.shape != ok.shape:
        raise ValueError(f"confidence and correct must be 1-D of one length, got {c.shape} and {ok.shape}")
    if not np.isfinite(c).all():
        raise ValueError("confidence must be finite")
    first = first_tested(c.size, target, delta)
    thresholds = np.asarray(grid, dtype=np.float64)
    ranked = np.argsort(-c, kind="stable")
    right_so_far = np.concatenate([[0], np.cumsum(ok[ranked])])
    n_at = np.searchsorted(-c[ranked], -thresholds, side="right")  # items with confidence >= t
    k_at = right_so_far[n_at]
    bounds = np.zeros(thresholds.size)
    some = k_at > 0
    bounds[some] = _beta_quantile(delta, k_at[some], n_at[some] - k_at[some] + 1)
    tested = n_at >= first  # the others are passed over, whatever their labels
    failed = np.flatnonzero(tested & (bounds < target))
    stop = int(failed[0]) if failed.size else thresholds.size
    passed = np.flatnonzero(tested[:stop])
    if passed.size:
        # Of the grid points that accept the same calibration items, the highest: no lower than
        # the data speak for (with every item at 0.99, not 0.0).
        i = int(np.flatnonzero(n_at == n_at[passed[-1]])[0])
        return Certificate(
            target, delta, c.size, float(thresholds[i]), int(n_at[i]), int(k_at[i]), float(bounds[i])
        )
    return Certificate(target, delta, c.size, None, needed=_labels_needed(c.size, n_at, k_at, target, delta))


def _labels_needed(size: int, n_at: np.ndarray, k_at: np.ndarray, target: float, delta: float) -> int | None:
    """About how many more calibration labels, like these, would certify a threshold: for each
    threshold whose items (at least :data:`RATE_SAMPLE` of them, or all there are) are right more
    often than the target, the sample whose bound at that accuracy reaches it, scaled by the share
    of items the threshold keeps; the smallest. None when no threshold's items beat the target:
    more labels alone would not help."""
    best: int | None = None
    for n, k in zip(n_at.tolist(), k_at.tolist(), strict=True):
        if n < min(RATE_SAMPLE, size) or n == 0 or k / n <= target:
            continue
        m = _sample_for(k / n, target, delta)
        if m is not None:
            total = math.ceil(m * size / n) - size
            best = total if best is None else min(best, total)
    return None if best is None else max(1, best)


def _sample_for(rate: float, target: float, delta: float, limit: int = 10_000_000) -> int | None:
    """The smallest n whose bound, with ``rate`` of n right, reaches ``target`` (None past ``limit``)."""

    def enough(m: int) -> bool:
        return accuracy_lower_bound(math.floor(rate * m + 1e-9), m, delta) >= target

    high = 1
    while not enough(high):
        high *= 2
        if high > limit:
            return None
    low = high // 2  # not enough (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def _per_class_arrays(
    confidence: Sequence[float] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    n_labels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three per-item arrays, checked: 1-D, one length, labels in ``[0, n_labels)``."""
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    c = np.asarray(confidence, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.int64)
    ok = np.asarray(correct, dtype=bool)
    if not (c.shape == p.shape == ok.shape) or c.ndim != 1:
        raise ValueError(
            "confidence, predicted and correct must be 1-D of one length, "
            f"got {c.shape}, {p.shape}, {ok.shape}"
        )
    if p.size and (p.min() < 0 or p.max() >= n_labels):
        raise ValueError(f"predicted labels must be in [0, {n_labels})")
    return c, p, ok


def certify_per_class(
    confidence: Sequence[float] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    n_labels: int,
    target: float,
    delta: float = DEFAULT_DELTA,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> list[Certificate]:
    """One :func:`certify` per predicted label, at ``delta / n_labels`` each, so that all hold
    together with probability ``1 - delta``."""
    c, p, ok = _per_class_arrays(confidence, predicted, correct, n_labels)
    share = delta / n_labels
    return [certify(c[p == j], ok[p == j], target, share, grid) for j in range(n_labels)]


def oracle_review_share(
    confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, target: float
) -> float:
    """The smallest share of items an oracle must review, least confident first, for the rest to
    be at least ``target`` right, knowing every label's truth: the floor any certified threshold
    is measured against. 1.0 when only reviewing everything reaches it (and for no items)."""
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if c.shape != ok.shape or c.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D of one length, got {c.shape} and {ok.shape}")
    n = c.size
    if n == 0:
        return 1.0
    kept_right = np.cumsum(ok[np.argsort(-c, kind="stable")])  # most confident first
    kept = np.arange(1, n + 1)
    reaching = np.flatnonzero(kept_right >= target * kept - 1e-9)
    return 1.0 - (int(reaching[-1]) + 1) / n if reaching.size else 1.0


def oracle_review_share_per_class(
    confidence: Sequence[float] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    n_labels: int,
    target: float,
) -> float:
    """The same floor for a policy bound to reach ``target`` within every predicted label, as
    :func:`certify_per_class` is: the oracle picks a threshold per label, reviewing the fewest items
    of each label for the rest of that label to be ``target`` right. It can review more than
    :func:`oracle_review_share` (a weak label is no longer carried by the others) or less (a label's
    own threshold keeps its less confident but right items, which one pooled threshold cannot do
    without also keeping the weak labels' items)."""
    c, p, ok = _per_class_arrays(confidence, predicted, correct, n_labels)
    if c.size == 0:
        return 1.0
    reviewed = 0.0
    for j in range(n_labels):
        mine = p == j
        if mine.any():
            reviewed += oracle_review_share(c[mine], ok[mine], target) * int(mine.sum())
    return reviewed / c.size
