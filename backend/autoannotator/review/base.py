"""Secondary review: who labels the items the ensemble is unsure about, and what they answered.

A reviewer takes a batch of :class:`ReviewItem` and returns one :class:`ReviewOutcome` per item, in
order, and never raises because one item went wrong: a batch of a thousand items must not be lost to
one timeout. Only a ``LABELLED`` outcome carries a label; ``OFF_LABEL`` and ``FAILED`` items go to the
human queue instead, so a reviewer's mistake or outage costs human time, never a wrong label.

The LLM reviewer (the paper's "+GPT-3.5" mode) lives in :mod:`autoannotator.review.llm`; the oracles here
stand in for the human reviewer (the paper's "+Human" mode) in experiments and tests.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from autoannotator.core.labels import LabelSet
from autoannotator.errors import LabelMappingError


class ReviewStatus(StrEnum):
    """What became of one reviewed item."""

    LABELLED = "labelled"
    """The reviewer named exactly one project label."""
    OFF_LABEL = "off_label"
    """The reviewer answered, but not with exactly one project label; the item goes to a human."""
    FAILED = "failed"
    """No usable answer (timeouts, errors after retries, unknown item); the item goes to a human."""
    UNSURE = "unsure"
    """The reviewer named a label but gave it a probability below the set floor; the item goes to a
    human (the LLM's third tier: accept, ask a person, or the ensemble's own label)."""


def _letters(text: str) -> str:
    """Letters and digits of any script, case-folded: what two spellings of one word share."""
    return re.sub(r"[\W_]+", "", text.casefold())


def parse_answer(answer: str, labels: LabelSet) -> str | None:
    """The project label the answer is, or None when it is anything else.

    Whitespace, surrounding quotes or backticks and a trailing period are forgiven ("Bullish.");
    anything more is not: "I think bullish" and "bullish or neutral" are None. The second check
    (letters of any script) refuses answers that :meth:`LabelSet.match` would accept only because
    its ASCII normalisation drops non-Latin words, such as "不 bullish" ("not bullish").
    """
    cleaned = answer.strip().strip("\"'`").strip()
    if cleaned.endswith("."):
        cleaned = cleaned[:-1].rstrip().strip("\"'`").strip()
    if not cleaned:
        return None
    label = labels.match(cleaned)
    if label is None or _letters(label) != _letters(cleaned):
        return None
    return label


@dataclass(frozen=True)
class ReviewItem:
    """One text to review; ``key`` is the caller's id (a Label Studio task id) and comes back as is."""

    key: str
    text: str


@dataclass(frozen=True)
class ReviewOutcome:
    """A reviewer's verdict on one item, with what it cost.

    ``label`` is a project label when ``status`` is ``LABELLED`` and None otherwise: an outcome that
    is ``OFF_LABEL``, ``UNSURE`` or ``FAILED`` is meant for the human queue, never for the verified pool.
    ``raw_answer`` keeps what the reviewer actually said (for audit, and to show the human);
    ``detail`` says why an item failed. ``cached`` outcomes cost nothing: the answer was reused.
    """

    key: str
    label: str | None
    status: ReviewStatus
    reviewer: str
    raw_answer: str | None = None
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cached: bool = False
    confidence: float | None = None  # the answer's probability, where the reviewer reports one

    def __post_init__(self) -> None:
        if (self.status is ReviewStatus.LABELLED) != (self.label is not None):
            raise ValueError(
                f"outcome for {self.key!r}: a label comes with status LABELLED and only then "
                f"(got label={self.label!r}, status={self.status.value!r})"
            )

    @property
    def needs_human(self) -> bool:
        """True when this item must go to the human queue instead of the verified pool."""
        return self.status is not ReviewStatus.LABELLED


@runtime_checkable
class Reviewer(Protocol):
    """Anything that labels a batch of uncertain items.

    ``review`` returns exactly one outcome per item, in the items' order, and reports a problem with
    one item as that item's outcome rather than raising, so the rest of the batch is kept.
    """

    name: str

    def review(self, items: Sequence[ReviewItem]) -> list[ReviewOutcome]: ...


def _checked_gold(gold: Mapping[str, str], labels: LabelSet) -> dict[str, str]:
    """Copy the gold labels, refusing any that the project cannot hold (a typo, another dataset)."""
    bad = sorted({label for label in gold.values() if label not in labels})
    if bad:
        raise LabelMappingError(
            f"gold labels {bad!r} are not among the project's labels {list(labels.names)!r}; "
            "map the dataset's labels onto the project's before building the oracle"
        )
    return dict(gold)


class OracleReviewer:
    """Answers with the gold label: the paper's "+Human" mode, with a perfect, instant human.

    It measures what the rest of the pipeline achieves when the review itself is not the weak link.
    """

    def __init__(self, gold: Mapping[str, str], labels: LabelSet, name: str = "oracle") -> None:
        self.name = name
        self.labels = labels
        self._gold = _checked_gold(gold, labels)

    def _answer(self, key: str, gold: str) -> str:
        return gold

    def review(self, items: Sequence[ReviewItem]) -> list[ReviewOutcome]:
        outcomes = []
        for item in items:
            gold = self._gold.get(item.key)
            if gold is None:
                outcomes.append(
                    ReviewOutcome(
                        item.key,
                        None,
                        ReviewStatus.FAILED,
                        self.name,
                        detail=f"no gold label for key {item.key!r}",
                    )
                )
                continue
            answer = self._answer(item.key, gold)
            outcomes.append(
                ReviewOutcome(item.key, answer, ReviewStatus.LABELLED, self.name, raw_answer=answer)
            )
        return outcomes


class NoisyOracleReviewer(OracleReviewer):
    """A human who is right with probability ``accuracy`` and otherwise picks another label at random.

    Real annotators disagree with the gold standard; this lets an experiment ask how much reviewer
    noise the retraining loop tolerates. The answer for an item depends only on (seed, key), through
    a hash rather than a shared RNG, so it is the same on every call, in any batch order, in any
    process: re-reviewing an item does not give it a second chance to be right.
    """

    def __init__(
        self,
        gold: Mapping[str, str],
        labels: LabelSet,
        accuracy: float,
        seed: int = 0,
        name: str = "noisy-oracle",
    ) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be between 0 and 1, got {accuracy!r}")
        super().__init__(gold, labels, name=name)
        self.accuracy = accuracy
        self.seed = seed

    def _uniform(self, key: str, purpose: str) -> float:
        """A number in [0, 1) fixed by (seed, key, purpose)."""
        digest = hashlib.sha256(f"{self.seed}\x00{purpose}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _answer(self, key: str, gold: str) -> str:
        if self._uniform(key, "correct") < self.accuracy:
            return gold
        others = [label for label in self.labels if label != gold]
        return others[int(self._uniform(key, "which") * len(others))]
