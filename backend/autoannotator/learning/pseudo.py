"""Self-training: the served version's confident labels of unannotated tasks, as light training items.

A project holds far more unannotated tasks than verified ones. Before a refinement, the served
version labels a sample of them; a label becomes a *pseudo-label* only when the version gives it with
a confidence that its verified held-out items show to be right often enough:

- **A calibrated threshold, never a raw score.** Labelled items that no version trained on are
  decided by the served version with the project's routing policy; the threshold is the lowest
  confidence at which the items at or above it were right at least ``precision`` of the time, over
  at least ``min_calibration`` of them. Fewer such items: no threshold and no pseudo-label (the
  report says why). Which items: the audit's labels where there are any (a uniform sample of what
  the versions predicted, :mod:`autoannotator.learning.audit`), which are what the question is
  about; otherwise the pool's held-out items. Those are mostly the hard items the router sent for
  review, which sit low on the confidence scale: few of them reach a high confidence, so they rarely
  certify a threshold, and never a looser one than a fair sample would.
- **Lighter.** Each pseudo-label trains with ``weight`` (< 1) where a verified label weighs 1.
- **Never a judge.** Pseudo-labels never enter the verified pool: the gate, the pruning test and the
  held-out set see verified labels only, so a version cannot be promoted on labels it made itself.
- **Capped.** At most ``ratio`` pseudo-labels per verified training item, drawn at random from the
  confident ones (the most confident alone would teach least), from at most ``candidates`` times as
  many unannotated texts as are wanted, which bounds the forward passes one refinement spends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import Policy
from autoannotator.models.ensemble import Ensemble

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTrainingConfig:
    """``ratio``: pseudo-labels per verified training item at most (0: off). ``weight``: a
    pseudo-label's training weight, a verified label's being 1. ``precision``: how often the held-out
    items at or above the threshold must have been right. ``min_calibration``: held-out items needed
    at or above it. ``candidates``: unannotated texts labelled per pseudo-label wanted."""

    ratio: float = 0.0
    weight: float = 0.5
    precision: float = 0.95
    min_calibration: int = 30
    candidates: int = 3

    def __post_init__(self) -> None:
        if self.ratio < 0:
            raise ValueError(f"ratio must be >= 0 (0: off), got {self.ratio}")
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight}")
        if not 0 < self.precision <= 1:
            raise ValueError(f"precision must be in (0, 1], got {self.precision}")
        if self.min_calibration < 1:
            raise ValueError(f"min_calibration must be >= 1, got {self.min_calibration}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")

    @property
    def on(self) -> bool:
        return self.ratio > 0


def calibrated_threshold(
    confidence: np.ndarray, correct: np.ndarray, precision: float, min_items: int
) -> float | None:
    """The lowest confidence ``t`` such that the items with confidence >= ``t`` number at least
    ``min_items`` and were right at least ``precision`` of the time; ``None`` when there is none.

    Items tied at ``t`` are all counted, so the accuracy is that of the set the threshold selects.
    """
    conf = np.asarray(confidence, dtype=float)
    right = np.asarray(correct, dtype=bool)
    if conf.shape != right.shape:
        raise ValueError(f"confidence and correct differ in shape: {conf.shape} vs {right.shape}")
    best: float | None = None
    for t in np.unique(conf)[::-1]:  # from the most confident down
        above = conf >= t
        n = int(above.sum())
        if n >= min_items and right[above].mean() >= precision:
            best = float(t)
    return best


@dataclass
class PseudoLabels:
    """What :func:`pseudo_label` chose: ``texts`` with ``labels``, and a report of why so many."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def summary(report: dict[str, Any]) -> str:
    """One line for a person: how many pseudo-labels a retraining used, and on what ground."""
    if report.get("threshold") is None:
        return f"no pseudo-label: {report.get('reason', 'self-training made none')}"
    source = "audit labels" if report.get("calibrated_on") == "audit" else "held-out labels"
    return (
        f"{report.get('n_used', 0)} pseudo-labels at confidence >= {report['threshold']:.3f} "
        f"({report['calibration_accuracy']:.0%} right on {report['calibration_items']} {source})"
    )


def pseudo_label(
    ensemble: Ensemble,
    policy: Policy,
    weights: np.ndarray | None,
    calibration: Sequence[tuple[str, str]],
    unlabelled: Sequence[str],
    n_verified: int,
    config: SelfTrainingConfig,
    labels: LabelSet,
    seed: int = 0,
) -> PseudoLabels:
    """Label a sample of ``unlabelled`` with ``ensemble`` as ``policy`` decides, and keep what the
    threshold calibrated on ``calibration`` (``(text, label)`` items no version trained on) calls
    confident, at most ``config.ratio * n_verified``."""
    cap = int(config.ratio * n_verified)
    report: dict[str, Any] = {
        "cap": cap,
        "weight": config.weight,
        "precision": config.precision,
        "n_unlabelled": len(unlabelled),
    }
    if cap < 1 or not unlabelled:
        report["reason"] = "no unannotated text" if not unlabelled else "the cap allows none"
        return PseudoLabels(report=report)
    if not calibration:
        report["reason"] = "no labelled item to calibrate a threshold on"
        return PseudoLabels(report=report)
    decided = policy.decide(ensemble.predict_proba([text for text, _ in calibration]), weights)
    gold = np.asarray(labels.indices([label for _, label in calibration]))
    threshold = calibrated_threshold(
        decided.confidence, decided.labels == gold, config.precision, config.min_calibration
    )
    report["n_calibration"] = len(calibration)
    report["threshold"] = threshold
    if threshold is None:
        report["reason"] = (
            f"no confidence above which at least {config.min_calibration} of the {len(calibration)} "
            f"calibration labels were right {config.precision:.0%} of the time"
        )
        return PseudoLabels(report=report)
    above = decided.confidence >= threshold
    report["calibration_accuracy"] = round(float((decided.labels == gold)[above].mean()), 4)
    report["calibration_items"] = int(above.sum())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unlabelled))[: cap * config.candidates]
    texts = [unlabelled[int(i)] for i in order]
    decision = policy.decide(ensemble.predict_proba(texts), weights)
    confident = np.flatnonzero(decision.confidence >= threshold)[:cap]
    report["n_labelled"] = len(texts)
    report["n_confident"] = int((decision.confidence >= threshold).sum())
    chosen = PseudoLabels(
        [texts[int(i)] for i in confident],
        [labels.names[int(decision.labels[i])] for i in confident],
        report,
    )
    report["n_used"] = len(chosen)
    report["by_label"] = {name: chosen.labels.count(name) for name in labels.names}
    logger.info(
        "self-training: %d pseudo-labels (threshold %.3f, %d of %d labelled texts confident, cap %d)",
        len(chosen),
        threshold,
        report["n_confident"],
        len(texts),
        cap,
    )
    return chosen
