"""Accuracy, macro-F1 and the accuracy/review trade-off over label indices (numpy only: the hot path
needs no scikit-learn import)."""

from __future__ import annotations

from typing import Any

import numpy as np

from autoannotator.core.consensus import consensus


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    """Share of items whose prediction equals the gold label; 0.0 for no items."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    if gold.shape != pred.shape:
        raise ValueError(f"gold has shape {gold.shape}, predictions {pred.shape}")
    return float((gold == pred).mean()) if gold.size else 0.0


def macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    """Unweighted mean of per-label F1 over labels that occur in gold or predictions.

    A label absent from both contributes nothing (scikit-learn's ``labels=present`` convention), so a
    small evaluation set without some class is not punished for it.
    """
    gold, pred = np.asarray(gold), np.asarray(pred)
    if gold.shape != pred.shape:
        raise ValueError(f"gold has shape {gold.shape}, predictions {pred.shape}")
    scores = []
    for c in range(n_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def tradeoff(probs: np.ndarray, gold_idx: np.ndarray, steps: int = 50) -> dict[str, Any]:
    """Accuracy at each share reviewed, if the least confident items were reviewed perfectly.

    Computed on one ensemble's probabilities (no retraining), for three confidence orderings and
    for the paper's ε rule at every ε it can express with k members.
    """
    cons = consensus(probs)
    top2 = np.sort(cons.mean_proba, axis=1)[:, -2:]
    orderings = {
        "mean probability": (cons.mean_proba.argmax(1), cons.mean_proba.max(1)),
        "margin": (cons.mean_proba.argmax(1), top2[:, 1] - top2[:, 0]),
        "vote, then mean probability": (cons.majority, cons.agreement + 1e-3 * cons.mean_proba.max(1)),
    }
    curves = {name: review_curve(pred, conf, gold_idx, steps) for name, (pred, conf) in orderings.items()}
    points = []
    for votes in range(1, cons.k):
        eps = votes / cons.k
        review = cons.uncertainty >= eps - 1e-9
        ok = (cons.majority == gold_idx) | review
        points.append({"epsilon": round(eps, 4), "share": float(review.mean()), "accuracy": float(ok.mean())})
    return {"curves": curves, "epsilon_points": points}


def review_curve(
    pred: np.ndarray, confidence: np.ndarray, gold_idx: np.ndarray, steps: int = 50
) -> dict[str, list[float]]:
    """Accuracy at each share reviewed when the least confident items (by ``confidence``) are
    reviewed perfectly and the rest keep ``pred``: ``{"share": [...], "accuracy": [...]}``."""
    n = len(gold_idx)
    order = np.argsort(confidence, kind="stable")
    correct = np.asarray(pred) == gold_idx
    shares, accs = [], []
    for s in np.linspace(0, 1, steps + 1):
        m = round(float(s) * n)
        ok = correct.copy()
        ok[order[:m]] = True
        shares.append(round(float(m / n), 4) if n else 0.0)
        accs.append(round(float(ok.mean()), 4) if n else 0.0)
    return {"share": shares, "accuracy": accs}
