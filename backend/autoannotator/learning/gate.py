"""The promotion gate: whether a retrained candidate may replace the served version.

One gate serves the backend's train job and ``autoannotator simulate``/``sweep`` alike, so the
figures in BENCHMARKS.md measure the gate production runs. It judges both versions on held-out
verified items that no version trained on, with the labels the project's routing policy would
serve (``policy.decide(probs, weights).labels``: the majority vote under the paper's ε rule, the
mean probability's argmax under ``mean:T``, the weighted vote under ``weighted:T`` ...). The
candidate is promoted if it is not worse on ``metric`` by more than ``tolerance``; with fewer than
``min_holdout`` held-out items a comparison means nothing, and the candidate is promoted unjudged
(the reason says so).

With ``alpha`` > 0 a drop rejects the candidate only when it is significant: the same exact sign
test as pruning's (below), on the held-out items exactly one of the two versions gets right, must
give p <= ``alpha`` that the candidate is the worse one. The held-out sets are small (tens of items
in a project's first retrainings), and with ``alpha`` = 0 (the paper's rule, the default) a
candidate one item behind is rejected; a rejected continual retraining leaves the older version
serving and learning nothing from those items, so one item's noise becomes a lasting difference.
``alpha`` trades that against promoting a version that is really worse by a little, and on the
smallest held-out sets by more than a little: of 10 items a candidate may lose 4 and win none
(p = 0.0625) and be promoted at 0.05, which is why it is off by default (BENCHMARKS.md, section 9).

Before the comparison, :meth:`Gate.prune` drops the candidate's members that pull the vote down
(the paper's Table 13: one weak member can make the vote worse than the best single model) on the
same held-out items, never below :data:`MIN_MEMBERS`. A member goes only on evidence, not on one
item: its removal must strictly raise the metric *and* pass an exact one-sided sign test (McNemar's
exact test) on the items the two votes disagree about being right on, at :data:`PRUNE_ALPHA`. With
``w`` items the smaller vote gets right and the current one wrong and ``l`` the reverse, the test's
p-value is the chance of ``w`` or more wins in ``w + l`` fair coin tosses (:func:`sign_test`); one
flipped item of 30 (``w = 1, l = 0``, p = 0.5) drops nothing, ten (p ≈ 0.001) do. Choosing the
members and judging the result on one set still flatters the pruned candidate a little; the served
version keeps its members, so a pruned candidate is only promoted if it is still not worse than the
version that serves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import Policy
from autoannotator.learning.pool import VerifiedItem
from autoannotator.models.ensemble import Ensemble

METRICS = ("accuracy", "macro_f1")
# Pruning never leaves fewer members than this: one member is no vote.
MIN_MEMBERS = 2
# A member is dropped only if the sign test's p-value is at most this: the conventional 5% level.
PRUNE_ALPHA = 0.05


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels that occur in either array (as scikit-learn averages)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"labels and predictions must be equal-length vectors, got {t.shape} and {p.shape}")
    if t.size == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "n": 0.0}
    f1s = []
    for c in range(n_labels):
        tp = int(np.sum((p == c) & (t == c)))
        wrong = int(np.sum((p == c) != (t == c)))  # false positives + false negatives
        if tp + wrong:
            f1s.append(2 * tp / (2 * tp + wrong))
    return {"accuracy": float(np.mean(t == p)), "macro_f1": float(np.mean(f1s)), "n": float(t.size)}


def sign_test(wins: int, losses: int) -> float:
    """The exact one-sided sign test: the chance of ``wins`` or more heads in ``wins + losses`` fair tosses.

    McNemar's exact test on paired per-item correctness: ``wins`` items only the new labels get
    right, ``losses`` items only the old ones do. 1.0 when they never differ.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins} and {losses}")
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n


@dataclass(frozen=True)
class Pruning:
    """Members dropped from a candidate because the vote was better without them on held-out items.

    ``with_all`` is the gate's metric of all the candidate's members, ``without`` that of ``kept``;
    ``p_value`` is the sign test's (:func:`sign_test`) for the step that dropped a member, the
    largest of them when several were dropped (each at most :data:`PRUNE_ALPHA`).
    """

    dropped: tuple[str, ...]
    kept: tuple[str, ...]
    metric: str
    with_all: float
    without: float
    n_holdout: int
    p_value: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "dropped": list(self.dropped),
            "kept": list(self.kept),
            "metric": self.metric,
            "with": round(self.with_all, 6),
            "without": round(self.without, 6),
            "n_holdout": self.n_holdout,
            "p_value": float(f"{self.p_value:.4g}"),
        }

    def summary(self) -> str:
        return (
            f"dropped {', '.join(self.dropped)}: held-out {self.metric} {self.without:.4f} without, "
            f"{self.with_all:.4f} with (sign test p = {self.p_value:.2g})"
        )


@dataclass(frozen=True)
class Gate:
    """The rule a candidate version must pass to be served: see the module's docstring."""

    policy: Policy
    metric: str = "accuracy"
    tolerance: float = 0.0
    min_holdout: int = 10
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"tolerance must be in [0, 1] (a share of the metric), got {self.tolerance}")
        if self.min_holdout < 0:
            raise ValueError(f"min_holdout must be >= 0, got {self.min_holdout}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1) (0: any drop rejects), got {self.alpha}")

    def score(
        self, probs: np.ndarray, gold: np.ndarray, weights: np.ndarray | None = None
    ) -> dict[str, float]:
        """Metrics of the policy's labels for ``probs`` (``[k, n, L]``) against ``gold`` (``[n]``)."""
        probs = np.asarray(probs)
        pred = np.asarray(self.policy.decide(probs, weights).labels)
        if pred.shape != (probs.shape[1],):
            raise ValueError(f"the policy must label each of {probs.shape[1]} items, got shape {pred.shape}")
        return classification_metrics(np.asarray(gold), pred, probs.shape[2])

    def right(self, probs: np.ndarray, gold: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Per item of ``gold``, whether the policy's label for ``probs`` (``[k, n, L]``) is right."""
        return np.asarray(self.policy.decide(np.asarray(probs), weights).labels) == np.asarray(gold)

    def evaluate(
        self,
        ensemble: Ensemble,
        items: Sequence[VerifiedItem],
        labels: LabelSet,
        weights: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Score ``ensemble`` on verified items as the project serves it."""
        probs = ensemble.predict_proba([it.text for it in items])
        return self.score(probs, np.asarray(labels.indices([it.label for it in items])), weights)

    def prune(
        self,
        probs: np.ndarray,
        gold: np.ndarray,
        names: Sequence[str],
        weights: np.ndarray | None = None,
    ) -> Pruning | None:
        """The members to drop from an ensemble whose ``[k, n, L]`` held-out probabilities are ``probs``.

        Backward elimination: while more than :data:`MIN_MEMBERS` remain, take the member whose
        removal raises the metric most (equal gains: the member weakest alone, then the later one),
        and drop it only if its removal strictly raises the metric and the exact one-sided sign test
        (:func:`sign_test`) on per-item correctness — ``w`` items the vote without it gets right and
        the current vote wrong, ``l`` the reverse — gives p <= :data:`PRUNE_ALPHA`; otherwise stop.
        A gain of one item (p = 0.5) is never enough. None when nothing is dropped, or with fewer
        than ``min_holdout`` items to judge on.
        """
        probs, gold = np.asarray(probs), np.asarray(gold)
        k = probs.shape[0]
        if len(names) != k:
            raise ValueError(f"{len(names)} names for {k} members")
        if k <= MIN_MEMBERS or gold.shape[0] < max(self.min_holdout, 1):
            return None

        def right(subset: list[int]) -> np.ndarray:
            return self.right(probs[subset], gold, None if weights is None else np.asarray(weights)[subset])

        def metric(subset: list[int]) -> float:
            w = None if weights is None else np.asarray(weights)[subset]
            return self.score(probs[subset], gold, w)[self.metric]

        alone = [metric([i]) for i in range(k)]
        kept = list(range(k))
        start = current = metric(kept)
        p_values: list[float] = []
        while len(kept) > MIN_MEMBERS:
            options = [(metric([j for j in kept if j != i]), -alone[i], i) for i in kept]
            best, _, drop = max(options)
            if best <= current + 1e-12:
                break
            smaller = [j for j in kept if j != drop]
            before, after = right(kept), right(smaller)
            p = sign_test(int(np.sum(after & ~before)), int(np.sum(before & ~after)))
            if p > PRUNE_ALPHA:
                break
            kept, current = smaller, best
            p_values.append(p)
        if len(kept) == k:
            return None
        return Pruning(
            dropped=tuple(names[i] for i in range(k) if i not in kept),
            kept=tuple(names[i] for i in kept),
            metric=self.metric,
            with_all=start,
            without=current,
            n_holdout=int(gold.shape[0]),
            p_value=max(p_values),
        )

    def verdict(
        self,
        n_holdout: int,
        old: dict[str, float],
        new: dict[str, float],
        old_right: np.ndarray | None = None,
        new_right: np.ndarray | None = None,
    ) -> tuple[bool, str]:
        """Whether a candidate scoring ``new`` may replace a version scoring ``old``, and why.

        ``old_right`` and ``new_right`` (per held-out item, whether each version's label is right)
        are needed when ``alpha`` > 0: a drop beyond the tolerance then rejects only if the sign test
        (:func:`sign_test`) on the items they disagree about, ``lost`` right before and wrong now
        against ``won`` the reverse, gives p <= ``alpha``.
        """
        if n_holdout < self.min_holdout:
            return True, (
                f"promoted without evaluation: only {n_holdout} held-out items "
                f"(min_holdout={self.min_holdout})"
            )
        m, before, after = self.metric, old[self.metric], new[self.metric]
        if after >= before - self.tolerance - 1e-12:
            return True, f"promoted: held-out {m} {after:.4f} vs {before:.4f} (tolerance {self.tolerance})"
        if self.alpha > 0:
            if old_right is None or new_right is None:
                raise ValueError("a gate with alpha > 0 needs both versions' per-item correctness")
            was, now = np.asarray(old_right, dtype=bool), np.asarray(new_right, dtype=bool)
            if was.shape != (n_holdout,) or now.shape != (n_holdout,):
                raise ValueError(f"per-item correctness must cover the {n_holdout} held-out items")
            lost, won = int(np.sum(was & ~now)), int(np.sum(now & ~was))
            p = sign_test(lost, won)
            test = f"{lost} items lost, {won} won, sign test p = {p:.2g}"
            if p > self.alpha:
                return True, (
                    f"promoted: held-out {m} {after:.4f} vs {before:.4f}, not a significant drop "
                    f"({test} > alpha {self.alpha})"
                )
            return False, (
                f"rejected: held-out {m} fell from {before:.4f} to {after:.4f}, a significant drop "
                f"({test} <= alpha {self.alpha})"
            )
        return (
            False,
            f"rejected: held-out {m} fell from {before:.4f} to {after:.4f} (tolerance {self.tolerance})",
        )
