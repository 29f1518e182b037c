"""Which items the ensemble may label alone and which go to secondary review (an LLM or a human).

Every policy is a small frozen dataclass with one method, ``decide(probs, weights) -> Decision``: a pure
function of the members' probabilities ``probs`` ``[k, n, L]``. :class:`EpsilonRule` is the paper's rule;
the others use how sure the members are, not only how they voted, which matters with k = 3 where
vote shares take just three values. A policy's ``name`` is its spec, so ``policy_from_spec(p.name)``
rebuilds it and a prediction can say which policy routed it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import ClassVar, Protocol

import numpy as np

from autoannotator.core.consensus import consensus
from autoannotator.core.guarantee import DEFAULT_DELTA, Certificate, certify_per_class

# U is a multiple of 1/k held in floating point (1 - 2/3 != 1/3 exactly); epsilon is compared with
# this slack so that epsilon = 1/3 means "one vote in three", as the paper intends.
EPSILON_SLACK = 1e-9


class Route(StrEnum):
    ACCEPT = "accept"
    REVIEW = "review"


@dataclass(frozen=True, eq=False)
class Decision:
    """Per item: the label to pre-fill, how sure the policy is (in [0, 1]) and whether to review it."""

    labels: np.ndarray  # [n] int
    confidence: np.ndarray  # [n] float
    review: np.ndarray  # [n] bool

    def __post_init__(self) -> None:
        n = self.labels.shape
        if len(n) != 1 or self.confidence.shape != n or self.review.shape != n:
            raise ValueError(
                f"labels, confidence and review must be 1-D of one length, got shapes "
                f"{self.labels.shape}, {self.confidence.shape}, {self.review.shape}"
            )

    @property
    def review_share(self) -> float:
        """Share of the batch sent to review; 0.0 for an empty batch."""
        return float(self.review.mean()) if self.review.size else 0.0

    @property
    def routes(self) -> list[Route]:
        return [Route.REVIEW if r else Route.ACCEPT for r in self.review.tolist()]


class Policy(Protocol):
    """Anything named that decides: callers (api, cli, evaluation) depend on this, not on a class."""

    @property
    def name(self) -> str: ...

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision: ...


def _num(x: float) -> str:
    return repr(float(x))


def _check_unit(what: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")


def _by_threshold(proba: np.ndarray, confidence: np.ndarray, threshold: float) -> Decision:
    confidence = np.clip(confidence, 0.0, 1.0)
    return Decision(proba.argmax(axis=1), confidence, confidence < threshold)


@dataclass(frozen=True)
class EpsilonRule:
    """The paper: majority label, confidence = agreement, review when ``U >= epsilon`` (note ``>=``).

    Only votes count here, so ``weights`` are ignored, as in the paper.

    U takes the values ``0, 1/k, 2/k, ...``, so epsilon only matters through which of them it passes.
    With k = 3: epsilon = 0 reviews everything; epsilon in (0, 1/3] reviews every item that is not
    unanimous (a 2-1 split has U = 1/3); epsilon in (1/3, 2/3] reviews only items with no majority at
    all (1-1-1, U = 2/3), so with two labels, where 1-1-1 cannot happen, it reviews nothing; epsilon
    above 2/3 reviews nothing. With k = 5, a 3-2 split has U = 2/5 and a 4-1 split U = 1/5.
    """

    epsilon: float = 0.34
    kind: ClassVar[str] = "epsilon"

    def __post_init__(self) -> None:
        _check_unit("epsilon", self.epsilon)

    @property
    def name(self) -> str:
        return f"{self.kind}:{_num(self.epsilon)}"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        c = consensus(probs)
        return Decision(c.majority, c.agreement, c.uncertainty >= self.epsilon - EPSILON_SLACK)


@dataclass(frozen=True)
class _ThresholdPolicy:
    """Shared shape of the confidence policies: review when confidence < ``threshold``."""

    threshold: float
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_unit("threshold", self.threshold)

    @property
    def name(self) -> str:
        return f"{self.kind}:{_num(self.threshold)}"


@dataclass(frozen=True)
class MeanProbability(_ThresholdPolicy):
    """Label = argmax of the members' mean probability, confidence = that mean, review below threshold.

    Unlike the vote, three members at 0.51 and three at 0.99 are told apart. The label can differ from
    the majority vote when the outvoted members are very sure. ``weights`` are ignored on purpose.
    """

    kind: ClassVar[str] = "mean"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        proba = consensus(probs).mean_proba
        return _by_threshold(proba, proba.max(axis=1), self.threshold)


@dataclass(frozen=True)
class WeightedVote(_ThresholdPolicy):
    """Like :class:`MeanProbability` on the weighted average: members that were right more often on
    verified items (see :func:`autoannotator.core.consensus.member_weights`) count for more. Without
    weights it is exactly :class:`MeanProbability`.
    """

    kind: ClassVar[str] = "weighted"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        proba = consensus(probs, weights).weighted_proba
        return _by_threshold(proba, proba.max(axis=1), self.threshold)


@dataclass(frozen=True)
class Margin(_ThresholdPolicy):
    """Confidence = top-1 minus top-2 mean probability (margin sampling): small when two labels compete,
    whatever the number of labels. Label = argmax of the mean; review below threshold.
    """

    kind: ClassVar[str] = "margin"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        proba = consensus(probs).mean_proba
        top2 = np.sort(proba, axis=1)[:, -2:]
        return _by_threshold(proba, top2[:, 1] - top2[:, 0], self.threshold)


def _budget_size(n: int, fraction: float | None, count: int | None) -> int:
    """``ceil(fraction * n)`` with the fraction read as the decimal it prints as (0.3 * 10 is 3, not 4)."""
    if count is not None:
        return min(count, n)
    assert fraction is not None
    return math.ceil(Fraction(repr(float(fraction))) * n)


@dataclass(frozen=True)
class Budget:
    """Review exactly a fixed number of each batch: its least confident items according to ``base``.

    For a reviewer paid per item (an LLM) or with fixed hours (a human). Give either ``fraction``
    (``ceil(fraction * n)`` items) or ``count`` (``min(count, n)`` items). Equal confidences are
    ranked by item index, so the choice is reproducible. Labels and confidence are the base's; the
    base's own threshold plays no part.
    """

    base: Policy
    fraction: float | None = None
    count: int | None = None
    kind: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ValueError(f"give exactly one of fraction and count, got {self.fraction=}, {self.count=}")
        if self.fraction is not None:
            _check_unit("fraction", self.fraction)
        elif isinstance(self.count, bool) or not isinstance(self.count, int | np.integer) or self.count < 0:
            raise ValueError(f"count must be an integer >= 0, got {self.count!r}")

    @property
    def name(self) -> str:
        amount = str(int(self.count)) if self.count is not None else _num(self.fraction or 0.0)
        return f"{self.kind}:{amount}:{self.base.name}"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        d = self.base.decide(probs, weights)
        n = d.labels.shape[0]
        review = np.zeros(n, dtype=bool)
        review[np.argsort(d.confidence, kind="stable")[: _budget_size(n, self.fraction, self.count)]] = True
        return Decision(d.labels, d.confidence, review)


@dataclass(frozen=True)
class TargetAccuracy:
    """Accept only where the accepted labels are certified to be at least ``target`` right.

    Label = argmax of the members' mean probability, confidence = that mean, as in
    :class:`MeanProbability`; but the threshold is not given, it is *earned*: :meth:`calibrated`
    certifies one per label on calibration items (:func:`autoannotator.core.guarantee.certify_per_class`,
    confidence ``1 - delta`` for all labels together). A label without a certified threshold, and
    every label before any calibration, goes to review: with too little evidence the policy reviews
    everything rather than guess. The spec (``target:0.95`` or ``target:0.95:0.1``) names the goal,
    not the thresholds, which belong to one version and its calibration labels.
    """

    target: float
    delta: float = DEFAULT_DELTA
    thresholds: tuple[float | None, ...] = ()
    kind: ClassVar[str] = "target"

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be in (0, 1), got {self.target!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        for t in self.thresholds:
            if t is not None:
                _check_unit("threshold", t)

    @property
    def name(self) -> str:
        suffix = "" if self.delta == DEFAULT_DELTA else f":{_num(self.delta)}"
        return f"{self.kind}:{_num(self.target)}{suffix}"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        proba = consensus(probs).mean_proba
        labels = proba.argmax(axis=1)
        confidence = np.clip(proba.max(axis=1), 0.0, 1.0)
        if not self.thresholds:
            return Decision(labels, confidence, np.ones(labels.shape, dtype=bool))
        if len(self.thresholds) != proba.shape[1]:
            raise ValueError(
                f"{len(self.thresholds)} certified thresholds for {proba.shape[1]} labels: "
                "calibrate the policy on this label set"
            )
        cut = np.array([np.inf if t is None else t for t in self.thresholds])
        return Decision(labels, confidence, confidence < cut[labels])

    def calibrated(self, probs: np.ndarray, gold: np.ndarray) -> tuple[TargetAccuracy, list[Certificate]]:
        """This policy with thresholds certified on calibration items (members' ``probs``
        ``[k, n, L]`` and their ``gold`` label indices), and the certificate of each label."""
        gold = np.asarray(gold, dtype=np.int64)
        proba = consensus(probs).mean_proba
        predicted = proba.argmax(axis=1)
        certs = certify_per_class(
            proba.max(axis=1), predicted, predicted == gold, proba.shape[1], self.target, self.delta
        )
        return TargetAccuracy(self.target, self.delta, tuple(c.threshold for c in certs)), certs


def threshold_for_share(confidence: np.ndarray, share: float) -> float:
    """A threshold that makes ``confidence < threshold`` route about ``share`` of these items.

    Meant for streams: calibrate on one chunk, then run ``MeanProbability(t)`` (or any threshold
    policy) on the next, where the share routed follows how hard the new items are instead of being
    fixed as with :class:`Budget`. The target is ``ceil(share * n)`` items, as in :class:`Budget`,
    and never more: tied confidences cannot be split, so fewer are routed when a tie straddles the
    cut. The threshold lies midway between the last routed and the first kept confidence, leaving the
    next chunk equal room on both sides. ``share = 0`` (or an empty chunk) gives 0.0, which routes
    nothing; a target of every item gives 1.0, which routes all but items at full confidence 1.0.
    """
    c = np.asarray(confidence, dtype=np.float64)
    if c.ndim != 1 or not np.isfinite(c).all() or (c < 0).any() or (c > 1).any():
        raise ValueError(f"confidence must be a 1-D array of values in [0, 1], got shape {c.shape}")
    c = np.sort(c)
    _check_unit("share", share)
    m = _budget_size(c.size, share, None)
    if m == 0:
        return 0.0
    if m >= c.size:
        return 1.0
    below = c[c < c[m]]
    if not below.size:
        return 0.0
    middle = float((below[-1] + c[m]) / 2)
    # Between two adjacent tiny floats the midpoint rounds onto the lower one, which would route
    # nothing: the first kept confidence itself is then the threshold (``<`` still keeps it).
    return middle if below[-1] < middle else float(c[m])


_THRESHOLD_POLICIES: dict[str, Callable[[float], Policy]] = {
    p.kind: p for p in (MeanProbability, WeightedVote, Margin)
}
SPEC_HELP = (
    "epsilon[:E] | mean:T | weighted:T | margin:T | budget:F|N:BASE | target:A[:D] "
    "(T, E, F decimals in [0, 1]; N an integer count; "
    "BASE one of epsilon, mean, weighted, margin, its threshold optional; "
    "A the accuracy auto-accepted labels must reach and D the risk of missing it, both in (0, 1))"
)


def _unit_arg(spec: str, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"bad policy spec {spec!r}: {what} must be a number in [0, 1], got {text!r}")
    return value


def _parse(spec: str, parts: list[str], *, as_base: bool) -> Policy:
    kind, args = parts[0].strip().lower(), [a.strip() for a in parts[1:]]
    if kind == "budget" and not as_base and len(args) >= 2:
        base = _parse(spec, args[1:], as_base=True)
        if re.fullmatch(r"\d+", args[0]):
            return Budget(base, count=int(args[0]))
        return Budget(base, fraction=_unit_arg(spec, "budget fraction", args[0]))
    if kind == "epsilon" and len(args) <= 1:
        return EpsilonRule(_unit_arg(spec, "epsilon", args[0])) if args else EpsilonRule()
    if kind == "target" and not as_base and 1 <= len(args) <= 2:
        target = _unit_arg(spec, "target accuracy", args[0])
        delta = _unit_arg(spec, "delta", args[1]) if len(args) == 2 else DEFAULT_DELTA
        if not (0.0 < target < 1.0 and 0.0 < delta < 1.0):
            raise ValueError(f"bad policy spec {spec!r}: target and delta must lie strictly between 0 and 1")
        return TargetAccuracy(target, delta)
    if kind in _THRESHOLD_POLICIES and (len(args) == 1 or (as_base and not args)):
        # A budget ignores its base's threshold, so "budget:0.2:mean" needs none.
        return _THRESHOLD_POLICIES[kind](_unit_arg(spec, "threshold", args[0]) if args else 0.0)
    raise ValueError(f"bad policy spec {spec!r}; use {SPEC_HELP}")


def policy_from_spec(spec: str) -> Policy:
    """Build a policy from a compact spec such as ``epsilon:0.34``, ``mean:0.7`` or ``budget:50:margin``.

    In ``budget:A:BASE`` an integer ``A`` is a count of items and a decimal a fraction in [0, 1]
    (``budget:1:mean`` reviews one item, ``budget:1.0:mean`` all of them; ``0`` and ``0.0`` both none).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"bad policy spec {spec!r}; use {SPEC_HELP}")
    return _parse(spec, spec.split(":"), as_base=False)
