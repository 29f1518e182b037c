"""The paper's fully automatic start: an LLM labels the seed tasks of a project nobody annotated.

Off by default. With ``AUTOANNOTATOR_LLM_SEEDS=N`` (N > 0), a project in llm mode that has no
version and no human label gets, once (:func:`~autoannotator.service.queueing.request_llm_seeds`,
on ``/setup`` and when tasks are imported), :func:`seed_with_llm`: its unannotated tasks are embedded
with the frozen encoder, N of them chosen to cover the project (one per k-means cluster,
:func:`autoannotator.learning.seeds.choose_seeds`), and the LLM labels them. Its labels join the
pool as ``llm-seed`` items and the cold start trains on them as soon as they hold every label (the
seed threshold is then the number of seeds the LLM labelled, not ``AUTOANNOTATOR_SEED_LABELS``).

They are marked in the tasks' data (``aa_review = "llm seed"``, ``aa_llm_label``), so a Redis
flush loses nothing, and any human label overrides one: a person who annotates a seed task
replaces the LLM's label in the pool, and the next refinement learns from the person's.
Tasks the LLM could not label (off-label answer, timeout, 5xx) are left for people, as in review.
"""

from __future__ import annotations

import logging

from autoannotator.labelstudio.fields import LLM_LABEL, LLM_SEED, REVIEWED_BY, pool_key
from autoannotator.labelstudio.tasks import set_data_field
from autoannotator.learning.pool import Source
from autoannotator.review.base import ReviewItem, ReviewStatus
from autoannotator.service.context import Context
from autoannotator.service.ingest import seed_shortfall
from autoannotator.service.queueing import request_training
from autoannotator.service.review import llm_reviewer
from autoannotator.service.seed_tab import choose_covering_tasks

logger = logging.getLogger(__name__)


def seed_with_llm(ctx: Context, uid: str) -> str:
    """Choose the project's seed tasks, have the LLM label them, and start the cold start."""
    info = ctx.info(uid)
    labels = ctx.config(info).labels
    with ctx.pool(uid, labels) as pool:
        humans = sum(1 for it in pool.items() if it.source.authoritative)
    if humans:
        ctx.state.put(uid, "llm_seeds", f"skipped: the project has {humans} human labels")
        return f"skipped: {humans} human labels already"
    ls = ctx.label_studio(info)
    config = ctx.config(info)
    n = ctx.settings.llm_seeds
    choice = choose_covering_tasks(ctx, ls, info, config, n, at_least=min(n, 2 * len(labels)))
    if choice is None:
        ctx.state.release_llm_seeds(uid)  # the next /setup or import asks again
        return "waiting for tasks with text"
    chosen, task_data = choice.chosen, choice.data
    reviewer = llm_reviewer(ctx, uid, labels)
    outcomes = reviewer.review([ReviewItem(str(t.task_id), t.text or "") for t in chosen])
    labelled = [
        (int(t.task_id or 0), t.text or "", o.label)
        for t, o in zip(chosen, outcomes, strict=True)
        if o.status is ReviewStatus.LABELLED and o.label is not None
    ]
    ctx.state.count(uid, llm_calls=reviewer.usage.calls, llm_cost_usd=reviewer.usage.cost)
    with ctx.task_data(uid):
        by_label: dict[str, list[int]] = {}
        for task_id, _, label in labelled:
            by_label.setdefault(label, []).append(task_id)
        data = {task_id: task_data[task_id] for task_id, _, _ in labelled}
        for label, group in by_label.items():
            set_data_field(ls, info.project_id, [(i, data[i]) for i in group], LLM_LABEL, label)
            for i in group:
                data[i][LLM_LABEL] = label
        set_data_field(ls, info.project_id, list(data.items()), REVIEWED_BY, LLM_SEED)
    with ctx.pool(uid, labels) as pool:
        pool.add_many([(pool_key(i), text, label) for i, text, label in labelled], Source.LLM_SEED)
        waiting = seed_shortfall(ctx, pool)
    message = f"{len(labelled)} of {len(chosen)} seed tasks labelled by the LLM"
    message += f" ({choice.clustered} tasks clustered)"
    if waiting is None:
        request_training(ctx, uid, reason=f"first version from {len(labelled)} LLM seeds")
    else:
        message += f"; the cold start waits: {waiting}"
    ctx.state.put(uid, "llm_seeds", message)
    logger.info("project %s: %s", uid, message)
    return message
