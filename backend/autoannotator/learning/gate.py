"""The promotion gate: whether a retrained candidate may replace the served version.

One gate serves the backend's train job and ``autoannotator simulate``/``sweep`` alike, so the
figures in BENCHMARKS.md measure the gate production runs. It judges both versions on held-out
verified items that no version trained on, with the labels the project's routing policy would
serve (``policy.decide(probs, weights).labels``: the majority vote under the paper's ε rule, the
mean probability's argmax under ``mean:T``, the weighted vote under ``weighted:T`` ...). The
candidate is promoted if it is not worse on ``metric`` by more than ``tolerance``; with fewer than
``min_holdout`` held-out items a comparison means nothing, and the candidate is promoted unjudged
(the reason says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import Policy
from autoannotator.learning.pool import VerifiedItem
from autoannotator.models.ensemble import Ensemble

METRICS = ("accuracy", "macro_f1")


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


@dataclass(frozen=True)
class Gate:
    """The rule a candidate version must pass to be served: see the module's docstring."""

    policy: Policy
    metric: str = "accuracy"
    tolerance: float = 0.0
    min_holdout: int = 10

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"tolerance must be in [0, 1] (a share of the metric), got {self.tolerance}")
        if self.min_holdout < 0:
            raise ValueError(f"min_holdout must be >= 0, got {self.min_holdout}")

    def score(
        self, probs: np.ndarray, gold: np.ndarray, weights: np.ndarray | None = None
    ) -> dict[str, float]:
        """Metrics of the policy's labels for ``probs`` (``[k, n, L]``) against ``gold`` (``[n]``)."""
        probs = np.asarray(probs)
        pred = np.asarray(self.policy.decide(probs, weights).labels)
        if pred.shape != (probs.shape[1],):
            raise ValueError(f"the policy must label each of {probs.shape[1]} items, got shape {pred.shape}")
        return classification_metrics(np.asarray(gold), pred, probs.shape[2])

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

    def verdict(self, n_holdout: int, old: dict[str, float], new: dict[str, float]) -> tuple[bool, str]:
        """Whether a candidate scoring ``new`` may replace a version scoring ``old``, and why."""
        if n_holdout < self.min_holdout:
            return True, (
                f"promoted without evaluation: only {n_holdout} held-out items "
                f"(min_holdout={self.min_holdout})"
            )
        m, before, after = self.metric, old[self.metric], new[self.metric]
        if after >= before - self.tolerance - 1e-12:
            return True, f"promoted: held-out {m} {after:.4f} vs {before:.4f} (tolerance {self.tolerance})"
        return (
            False,
            f"rejected: held-out {m} fell from {before:.4f} to {after:.4f} (tolerance {self.tolerance})",
        )
