"""What k specialists say together about n items: votes, the paper's uncertainty, pooled probabilities.

Every specialist hands over an ``[n, L]`` probability matrix whose columns are the project's labels
(see :mod:`autoannotator.core.labels`); stacked they form ``probs`` of shape ``[k, n, L]`` (the paper's k
members, n items, L labels). This module turns ``probs`` into the numbers the router decides on and
nothing else: pure numpy, no I/O, no state, so every policy sees the same votes and a decision can be
recomputed from the stored probabilities alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoannotator.errors import BadInputError

# Specialists emit float32 softmax outputs; rows drift from 1 by rounding, not by more than this.
ROW_SUM_TOLERANCE = 1e-3
# Mean probabilities this close count as tied: a float sum depends on member order, the tie rule must not.
MEAN_TIE_TOLERANCE = 1e-9


@dataclass(frozen=True, eq=False)
class Consensus:
    """The ensemble's view of a batch. Arrays are read-only, so one instance can be shared by policies.

    ``majority`` is the paper's majority label. A tie on vote count goes to the tied label with the
    highest mean probability (the members that lost the vote still say which side they lean to), and
    a tie on that as well (within :data:`MEAN_TIE_TOLERANCE`) to the lowest label index, so the label
    depends neither on float rounding nor on the order of the members.
    ``uncertainty`` is the paper's ``U(x) = 1 - max_y #{votes = y} / k``: a multiple of ``1/k``.
    """

    votes: np.ndarray  # [n, k] int: each member's argmax (lowest index on an exact tie)
    counts: np.ndarray  # [n, L] int: how many members voted for each label
    majority: np.ndarray  # [n] int
    agreement: np.ndarray  # [n] float: max count / k
    uncertainty: np.ndarray  # [n] float: 1 - agreement
    mean_proba: np.ndarray  # [n, L]: the members' average probability
    weighted_proba: np.ndarray  # [n, L]: weighted average; the same array as mean_proba without weights
    k: int

    @property
    def n(self) -> int:
        return int(self.votes.shape[0])


def check_proba(probs: np.ndarray) -> np.ndarray:
    """``probs`` as a float64 ``[k, n, L]`` array of probability rows, renormalised to sum to exactly 1.

    Renormalising absorbs the float32 drift allowed by :data:`ROW_SUM_TOLERANCE`, so no confidence
    derived from it can exceed 1. Anything else (logits, a transposed array, a NaN) is refused with the
    member and row at fault, because a silent fix would turn a specialist's bug into wrong labels.
    """
    try:
        arr = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"probabilities must be numeric, got {type(probs).__name__}: {exc}") from None
    if arr.ndim != 3:
        raise BadInputError(f"probabilities must have shape [k members, n items, L labels], got {arr.shape}")
    k, _, n_labels = arr.shape
    if k < 1:
        raise BadInputError("probabilities come from no member (k = 0); an ensemble needs at least one")
    if n_labels < 2:
        raise BadInputError(f"probabilities cover {n_labels} label(s); a project needs at least two")
    for what, bad in (
        ("a non-finite value", ~np.isfinite(arr).all(axis=2)),
        ("a negative value", (arr < 0).any(axis=2)),
        ("a sum away from 1", np.abs(arr.sum(axis=2) - 1.0) > ROW_SUM_TOLERANCE),
    ):
        if bad.any():
            member, row = (int(i) for i in np.argwhere(bad)[0])
            raise BadInputError(
                f"member {member}, row {row} has {what} ({arr[member, row].tolist()}); every row must be "
                f"a probability distribution over the labels ({int(bad.sum())} bad row(s) in all)"
            )
    return arr / arr.sum(axis=2, keepdims=True)


def check_weights(weights: np.ndarray, k: int) -> np.ndarray:
    """Member weights as float64 ``[k]``, refused when they cannot form a weighted average."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise BadInputError(f"weights must have one entry per member ({k}), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise BadInputError(f"weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise BadInputError(f"weights must have a positive sum, got {w.tolist()}")
    return w


def _votes(p: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(p.argmax(axis=2).T)


def consensus(probs: np.ndarray, weights: np.ndarray | None = None) -> Consensus:
    """Votes, counts, the majority label (tie rule in :class:`Consensus`), U and pooled probabilities."""
    p = check_proba(probs)
    k, _, n_labels = p.shape
    votes = _votes(p)
    counts = (votes[:, :, None] == np.arange(n_labels)).sum(axis=1)
    mean = p.mean(axis=0)
    tied = counts == counts.max(axis=1, keepdims=True)
    tied_mean = np.where(tied, mean, -np.inf)
    best = tied_mean.max(axis=1, keepdims=True)
    majority = (tied_mean >= best - MEAN_TIE_TOLERANCE).argmax(axis=1)
    agreement = counts.max(axis=1) / k
    if weights is None:
        weighted = mean
    else:
        w = check_weights(weights, k)
        weighted = np.tensordot(w / w.sum(), p, axes=1)
    arrays = (votes, counts, majority, agreement, 1.0 - agreement, mean, weighted)
    for a in arrays:
        a.setflags(write=False)
    return Consensus(*arrays, k=k)


def member_weights(probs: np.ndarray, gold: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """Each member's accuracy on the verified items, Laplace-smoothed: ``(right + s) / (seen + 2 s)``.

    ``gold`` holds one label index per item of ``probs`` and a negative value for items nobody verified,
    so a caller can pass a whole batch. Smoothing pulls a member with few verified items towards 0.5
    instead of 0 or 1: one unlucky item must not silence a specialist, nor one lucky item crown it.
    With no verified items at all every member weighs 0.5, i.e. the plain average.
    """
    if not smoothing > 0:
        raise ValueError(
            f"smoothing must be > 0, got {smoothing}; raw accuracy can zero every member's weight"
        )
    p = check_proba(probs)
    _, n, n_labels = p.shape
    g = np.asarray(gold)
    if g.shape != (n,):
        raise BadInputError(f"gold must have one entry per item ({n}), got shape {g.shape}")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        raise BadInputError(f"gold must hold integer label indices (negative = unverified), got {g.dtype}")
    if (g >= n_labels).any():
        raise BadInputError(f"gold holds label index {int(g.max())}, but there are only {n_labels} labels")
    known = g >= 0
    right = (_votes(p)[known] == g[known, None]).sum(axis=0)
    return np.asarray((right + smoothing) / (known.sum() + 2 * smoothing), dtype=np.float64)


def pairwise_disagreement(probs: np.ndarray) -> np.ndarray:
    """``[k, k]`` share of items on which members i and j vote differently (0 on the diagonal).

    A vote among clones is one vote counted k times: this shows whether freshly trained specialists
    actually differ. An empty batch gives all zeros (no item shows a difference).
    """
    votes = _votes(check_proba(probs))
    if votes.shape[0] == 0:
        return np.zeros((votes.shape[1], votes.shape[1]))
    return np.asarray((votes[:, :, None] != votes[:, None, :]).mean(axis=0), dtype=np.float64)
