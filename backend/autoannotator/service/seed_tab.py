"""Seed tasks that teach most: before the cold start, a "Seed" tab of tasks chosen to cover the project.

Label Studio serves a new project's tasks in import order (or at random), so the first few dozen
labels the cold start learns from may all be one kind of text. With ``AUTOANNOTATOR_SEED_TAB`` on,
a project that has no version yet gets, once (:func:`~autoannotator.service.queueing.request_seed_tab`,
on ``/setup`` and when tasks are imported), :func:`mark_seed_tasks`: its unannotated tasks are
embedded with the frozen encoder and as many as the cold start still needs
(``AUTOANNOTATOR_SEED_LABELS`` minus the human labels already in the pool) are chosen to cover it,
one per k-means cluster (:func:`autoannotator.learning.seeds.choose_seeds`, the same choice as the
LLM-seeded start's). They are flagged in their data (``aa_seed = 1``) and a "Seed" tab lists those
not annotated yet; "Label All Tasks" from that tab serves only them (``/next?view=…`` keeps to a
tab's tasks). The flag lives in Label Studio, so a Redis flush loses nothing; the tab empties as
people label its tasks, and any other annotation counts towards the cold start as before.

Not in llm mode with the LLM-seeded start on: the LLM labels the covering tasks itself there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autoannotator.labelstudio.config import TaskText
from autoannotator.labelstudio.fields import IN_TAB, SEED
from autoannotator.labelstudio.review_tab import ensure_review_tab
from autoannotator.labelstudio.tasks import set_data_field, unannotated_texts
from autoannotator.learning.seeds import MAX_CLUSTERED, choose_seeds
from autoannotator.service.context import Context

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

    from autoannotator.labelstudio.config import ProjectConfig
    from autoannotator.storage.redis_state import ProjectInfo

logger = logging.getLogger(__name__)

SEED_TAB = "Seed"


@dataclass
class CoveringChoice:
    """Tasks chosen to cover a project's unannotated texts, with the data Label Studio holds for each
    (written back whole when a field is added) and how many texts were clustered."""

    chosen: list[TaskText]
    data: dict[int, dict[str, Any]]
    clustered: int


def choose_covering_tasks(
    ctx: Context, ls: LabelStudio, info: ProjectInfo, config: ProjectConfig, n: int, at_least: int
) -> CoveringChoice | None:
    """``n`` of the project's unannotated tasks with text (of its first :data:`MAX_CLUSTERED`), one
    nearest each k-means centre of the frozen encoder's embeddings; None while fewer than
    ``at_least`` tasks have text."""
    texts, data = unannotated_texts(
        ls, info.project_id, config, max_chars=ctx.settings.max_text_chars, limit=MAX_CLUSTERED
    )
    if len(texts) < at_least:
        return None
    vectors = _embed(ctx, [t.text or "" for t in texts])
    return CoveringChoice([texts[i] for i in choose_seeds(vectors, n)], data, len(texts))


def _embed(ctx: Context, texts: list[str]) -> np.ndarray:
    from autoannotator.models.specialists.encoder import Encoder, resolve_model_source

    # serving=True: these vectors are wanted once, so the worker's cache stays small (see .encoder).
    return Encoder.shared(resolve_model_source(ctx.settings.encoder), serving=True).embed(texts)


def mark_seed_tasks(ctx: Context, uid: str) -> str:
    """Flag the tasks the cold start should learn from first and make the "Seed" tab list them."""
    if ctx.models.current_version(uid) is not None:
        return "skipped: the project has a version"
    info = ctx.info(uid)
    config = ctx.config(info)
    labels = config.labels
    with ctx.pool(uid, labels) as pool:
        humans = sum(1 for it in pool.items() if it.source.authoritative)
    wanted = ctx.settings.seed_labels - humans
    if wanted <= 0:
        message = f"skipped: {humans} human labels, enough for the cold start"
        ctx.state.put(uid, "seed_tab", message)
        return message
    ls = ctx.label_studio(info)
    choice = choose_covering_tasks(ctx, ls, info, config, wanted, at_least=min(wanted, 2 * len(labels)))
    if choice is None:
        ctx.state.release_seed_tab(uid)  # the next /setup or import asks again
        return "waiting for tasks with text"
    with ctx.task_data(uid):
        marked = set_data_field(
            ls,
            info.project_id,
            [(int(t.task_id or 0), choice.data[int(t.task_id or 0)]) for t in choice.chosen],
            SEED,
            IN_TAB,
        )
    view = ensure_review_tab(ls, info.project_id, title=SEED_TAB, flag=SEED)
    message = (
        f"{marked} seed tasks in the {SEED_TAB!r} tab (view {view}), one per cluster of "
        f"{choice.clustered} unannotated tasks; the cold start needs {wanted} more human labels"
    )
    ctx.state.put(uid, "seed_tab", message)
    logger.info("project %s: %s", uid, message)
    return message
