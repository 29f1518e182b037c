"""What the backend writes into Label Studio tasks, and what ``/predict`` hands to the review job.

The ``aa_*`` keys are task data fields: Label Studio shows each as a Data Manager column, the
"Needs review" tab filters on :data:`NEEDS_REVIEW`, and after a Redis flush the pool is rebuilt
from :data:`REVIEWED_BY` and :data:`LLM_LABEL`. They live here, free of torch, so that the web
process, the workers and the demo read one definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NEEDS_REVIEW = "aa_needs_review"  # 1 while the task waits for a person in the review tab, else 0
VOTES = "aa_votes"  # the specialists' votes, e.g. "Positive 2 · Negative 1"
REVIEWED_BY = "aa_review"  # "llm", "human", or "human (LLM timeout)" when the LLM could not label it
LLM_LABEL = "aa_llm_label"  # the LLM's label, kept in the task so a Redis flush loses nothing
LLM_SEED = "llm seed"  # REVIEWED_BY on a seed task the LLM labelled for the fully automatic start
LLM_REVIEWERS = ("llm", LLM_SEED)  # REVIEWED_BY values whose LLM_LABEL stands until a person's
# Set on a task drawn for the live audit: "v0003 accepted: Positive", the version whose label a
# person checks, its route and its label (see autoannotator.learning.audit). An audited task waits
# in the Needs review tab like a routed one; this column tells the two apart.
AUDIT = "aa_audit"
# 1 on a task chosen to cover the project before its cold start (the "Seed" tab lists those not yet
# annotated; see autoannotator.service.seed_tab).
SEED = "aa_seed"

# NEEDS_REVIEW's values. Numbers, not booleans: Label Studio's bulk update of a data field (see
# labelstudio.tasks.set_data_field) writes strings or numbers, and the tab filters on the number.
IN_TAB = 1
OUT_OF_TAB = 0


def in_tab(data: Mapping[str, Any]) -> bool:
    """Whether the task's data puts it in the Needs review tab (``True`` from earlier versions too)."""
    value = data.get(NEEDS_REVIEW)
    if isinstance(value, bool):
        return value
    return isinstance(value, int | float) and value == IN_TAB


@dataclass(frozen=True)
class RoutedTask:
    """A task the routing policy was unsure of, as ``/predict`` saw it: the review job's input.

    ``data`` is the task's data as Label Studio sent it; the job writes it back with the ``aa_*``
    fields added (Label Studio replaces a task's data whole, so every other key must go back too).
    """

    task_id: int | str
    text: str
    label: str  # the ensemble's label, which the prediction already carries
    confidence: float
    votes: Mapping[str, int]  # member votes per label, labels without a vote left out
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def votes_text(self) -> str:
        return votes_text(self.votes)

    def key(self) -> str:
        return pool_key(self.task_id)


def audited(data: Mapping[str, Any]) -> bool:
    """Whether the task's data marks it for the audit (it then stays in the tab until annotated)."""
    return bool(data.get(AUDIT))


@dataclass(frozen=True)
class AuditedTask:
    """A task ``/predict`` (or a labelling run) drew for the audit, and the mark to write on it."""

    task: RoutedTask
    mark: str  # the AUDIT field's value


@dataclass(frozen=True)
class ClearedTask:
    """A task flagged for review earlier that the served version is now sure of: unflag it."""

    task_id: int | str
    data: Mapping[str, Any] = field(default_factory=dict)


def pool_key(task_id: int | str) -> str:
    """A Label Studio task's key in the verified pool: one label per task, whoever gave it."""
    return f"task:{task_id}"


def votes_text(votes: Mapping[str, int]) -> str:
    """What the reviewer sees in the ``aa_votes`` column, e.g. ``bullish 2 · bearish 1``, most votes
    first. The ensemble's confidence is the prediction's score, in the tab's score column; leaving
    it out here lets a labelling run write the votes of many tasks with one request per text."""
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
    return " · ".join(f"{label} {n}" for label, n in ranked)


def with_fields(data: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """The task's data with the ``aa_*`` fields set (keyword names are the constants' values)."""
    return {**data, **fields}
