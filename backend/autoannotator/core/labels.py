"""The project's label set, and mapping a model's own labels onto it.

A Hugging Face classifier names its outputs whatever its authors chose (``LABEL_0``, ``NEG``,
``negative``, ``toxic``...). A project names its choices whatever the project manager typed in the
Label Studio config. Mapping one onto the other happens once, when a specialist is loaded, so that
every probability matrix in the engine has the project's labels as columns, in the project's order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from autoannotator.errors import LabelMappingError

# Words that mean the same class across common sentiment / toxicity models and datasets.
# Each group is one concept; a model label maps onto a project label when both fall in one group.
SYNONYM_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"negative", "neg", "bearish", "bad", "sad", "down", "1star", "verynegative"}),
    frozenset({"positive", "pos", "bullish", "good", "happy", "up", "5stars", "verypositive"}),
    frozenset({"neutral", "neu", "mixed", "none", "objective"}),
    frozenset({"toxic", "toxicity", "offensive", "off", "hate", "hateful", "abusive", "abuse", "insult"}),
    frozenset(
        {
            "nontoxic",
            "nottoxic",
            "notoffensive",
            "nonoffensive",
            "not",
            "nothate",
            "nonhate",
            "nohate",
            "clean",
            "normal",
            "neither",
            "safe",
            # Toxicity classifiers often call the harmless class "neutral" (e.g. s-nlp's RoBERTa).
            "neutral",
        }
    ),
)


def normalize(name: str) -> str:
    """Lower-case and strip everything but letters and digits: ``Not-Offensive`` -> ``notoffensive``."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _groups_of(name: str) -> set[int]:
    """The synonym groups a name belongs to; "neutral" is in two (sentiment, and non-toxic)."""
    key = normalize(name)
    return {i for i, group in enumerate(SYNONYM_GROUPS) if key in group}


@dataclass(frozen=True)
class LabelSet:
    """An ordered, duplicate-free set of class names: the columns of every probability matrix."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"a label set needs at least two labels, got {list(self.names)!r}")
        if any(not isinstance(n, str) or not n.strip() for n in self.names):
            raise ValueError(f"labels must be non-empty strings, got {list(self.names)!r}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"labels must be unique, got {list(self.names)!r}")

    @classmethod
    def of(cls, names: Iterable[str]) -> LabelSet:
        return cls(tuple(names))

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise LabelMappingError(
                f"unknown label {name!r}; the project's labels are {list(self.names)!r}"
            ) from None

    def indices(self, names: Sequence[str]) -> list[int]:
        return [self.index(n) for n in names]

    def match(self, answer: str) -> str | None:
        """The project label that ``answer`` names exactly (ignoring case and punctuation), else None."""
        key = normalize(answer)
        hits = [n for n in self.names if normalize(n) == key]
        return hits[0] if len(hits) == 1 else None


def map_model_labels(
    model_labels: Sequence[str],
    project: LabelSet,
    explicit: Mapping[str, str] | None = None,
) -> list[int]:
    """For each model output, the index of the project label it votes for.

    Resolution order for each model label: the explicit mapping, then the same name (ignoring case
    and punctuation), then a common synonym (``NEG`` -> ``negative`` -> ``bearish``). Several model
    labels may feed one project label only through an explicit mapping (their probabilities are
    summed). Every project label must be reachable and every model label must land somewhere;
    otherwise :class:`LabelMappingError` says which labels are missing and how to fix it.
    """
    explicit = dict(explicit or {})
    for model_label, target in explicit.items():
        if target not in project:
            raise LabelMappingError(
                f"explicit mapping sends model label {model_label!r} to {target!r}, "
                f"which is not one of the project's labels {list(project.names)!r}"
            )
    unknown_keys = set(explicit) - set(model_labels)
    if unknown_keys:
        raise LabelMappingError(
            f"explicit mapping names {sorted(unknown_keys)!r}, which the model does not output "
            f"(its labels are {list(model_labels)!r})"
        )

    targets: list[int | None] = []
    for label in model_labels:
        if label in explicit:
            targets.append(project.index(explicit[label]))
            continue
        exact = [i for i, n in enumerate(project.names) if normalize(n) == normalize(label)]
        if len(exact) == 1:
            targets.append(exact[0])
            continue
        groups = _groups_of(label)
        syn = [i for i, n in enumerate(project.names) if groups & _groups_of(n)]
        targets.append(syn[0] if len(syn) == 1 else None)

    unmapped = [lab for lab, t in zip(model_labels, targets, strict=True) if t is None]
    reached = {t for t in targets if t is not None}
    missing = [n for i, n in enumerate(project.names) if i not in reached]
    implicit_dupes = sorted(
        {
            project.names[t]
            for lab, t in zip(model_labels, targets, strict=True)
            if t is not None
            and lab not in explicit
            and sum(
                1 for lab2, t2 in zip(model_labels, targets, strict=True) if t2 == t and lab2 not in explicit
            )
            > 1
        }
    )
    problems = []
    if unmapped:
        problems.append(f"model labels with no project label: {unmapped!r}")
    if missing:
        problems.append(f"project labels no model label maps to: {missing!r}")
    if implicit_dupes:
        problems.append(f"project labels matched by several model labels: {implicit_dupes!r}")
    if problems:
        raise LabelMappingError(
            "cannot map the model's labels "
            f"{list(model_labels)!r} onto the project's {list(project.names)!r}: "
            + "; ".join(problems)
            + ". Pass an explicit label mapping (model label -> project label)."
        )
    return [t for t in targets if t is not None]


def project_columns(model_probs: np.ndarray, targets: Sequence[int], n_labels: int) -> np.ndarray:
    """Fold a model's probability columns onto the project's columns (summing many-to-one)."""
    out = np.zeros((model_probs.shape[0], n_labels), dtype=np.float64)
    for col, t in enumerate(targets):
        out[:, t] += model_probs[:, col]
    return out
