"""Accuracy and macro-F1 over label indices (numpy only: the hot path needs no scikit-learn import)."""

from __future__ import annotations

import numpy as np


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
