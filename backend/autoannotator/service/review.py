"""Secondary review of the tasks one ``/predict`` routed: the Needs review tab, or the LLM.

In ``human`` mode each task is flagged for the "Needs review" tab with the specialists' votes
written beside it. In ``llm`` mode the LLM labels the tasks; its label replaces the task's
prediction in Label Studio, is recorded in the task's data (so a Redis flush loses nothing) and
joins the pool. A task the LLM cannot label (off-label answer, timeout, 5xx after retries) falls
back to the human queue. Tasks the served version is now sure of are unflagged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from label_studio_sdk import LabelStudio

from autoannotator.core.labels import LabelSet
from autoannotator.labelstudio.client import PredictionWrite, patch_task_data, replace_predictions
from autoannotator.labelstudio.config import prediction
from autoannotator.labelstudio.fields import (
    LLM_LABEL,
    NEEDS_REVIEW,
    REVIEWED_BY,
    VOTES,
    ClearedTask,
    RoutedTask,
    with_fields,
)
from autoannotator.labelstudio.review_tab import (
    align_model_version,
    ensure_review_tab,
    use_uncertainty_sampling,
)
from autoannotator.learning.pool import Source
from autoannotator.review.base import ReviewItem, ReviewOutcome, ReviewStatus
from autoannotator.review.llm import LLMReviewer, build_reviewer
from autoannotator.service.context import Context
from autoannotator.service.ingest import maybe_train
from autoannotator.storage.redis_state import ProjectInfo

logger = logging.getLogger(__name__)

# LS refuses to point project.model_version at a version until a prediction of it is stored.
ALIGN_WAIT_S = 10.0


def review_routed(
    ctx: Context,
    uid: str,
    version: str,
    mode: str,
    routed: Sequence[RoutedTask],
    cleared: Sequence[ClearedTask],
) -> str:
    """Act on the tasks one ``/predict`` routed to review (and unflag ``cleared`` ones)."""
    info = ctx.info(uid)
    ls = ctx.label_studio(info)
    _prepare_project(ctx, ls, uid, info, version)
    for done in cleared:
        patch_task_data(ls, done.task_id, with_fields(done.data, **{NEEDS_REVIEW: False}))
    if mode == "human" or not routed:
        for task in routed:
            _flag(ls, task, "human")
        ctx.state.count(uid, reviewed_human_queue=len(routed))
        return f"{len(routed)} tasks flagged for human review, {len(cleared)} cleared"
    if mode != "llm":
        return f"mode {mode}: nothing to review"
    return _review_by_llm(ctx, ls, uid, info, version, routed)


def _review_by_llm(
    ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo, version: str, routed: Sequence[RoutedTask]
) -> str:
    config = ctx.config(info)
    reviewer = llm_reviewer(ctx, uid, config.labels)
    outcomes = _ask(ctx, uid, reviewer, routed)
    labelled: list[tuple[RoutedTask, str]] = []
    for task, outcome in zip(routed, outcomes, strict=True):
        if outcome.status is ReviewStatus.LABELLED and outcome.label is not None:
            labelled.append((task, outcome.label))
        else:
            why = outcome.detail or f"answered {outcome.raw_answer!r:.60}"
            logger.warning(
                "project %s: task %s goes to the human queue: LLM %s (%s)",
                uid,
                task.task_id,
                outcome.status.value,
                why,
            )
            _flag(ls, task, f"human (LLM {outcome.status.value})")
    writes = []
    for task, label in labelled:
        item = prediction(config, label, task.confidence, version)
        writes.append(PredictionWrite(int(task.task_id), item["result"], item["score"]))
    replace_predictions(ls, version, writes)
    for task, label in labelled:
        fields = {NEEDS_REVIEW: False, VOTES: task.votes_text, REVIEWED_BY: "llm", LLM_LABEL: label}
        patch_task_data(ls, task.task_id, with_fields(task.data, **fields))
    fallbacks = len(routed) - len(labelled)
    ctx.state.count(uid, reviewed_llm=len(labelled), llm_failures=fallbacks, reviewed_human_queue=fallbacks)
    if labelled:
        with ctx.pool(uid, config.labels) as pool:
            pool.add_many([(task.key(), task.text, label) for task, label in labelled], Source.LLM)
            maybe_train(ctx, uid, pool)
    return f"{len(labelled)} labelled by the LLM, {fallbacks} sent to the human queue"


def _ask(ctx: Context, uid: str, reviewer: LLMReviewer, routed: Sequence[RoutedTask]) -> list[ReviewOutcome]:
    """The LLM's outcome per task, its usage counted in the project's counters."""
    before = reviewer.usage
    outcomes = reviewer.review([ReviewItem(str(task.task_id), task.text) for task in routed])
    usage = reviewer.usage
    ctx.state.count(
        uid,
        llm_calls=usage.calls - before.calls,
        llm_cache_hits=usage.cache_hits - before.cache_hits,
        llm_prompt_tokens=usage.prompt_tokens - before.prompt_tokens,
        llm_completion_tokens=usage.completion_tokens - before.completion_tokens,
        llm_cost_usd=usage.cost - before.cost,
    )
    return outcomes


def _flag(ls: LabelStudio, task: RoutedTask, reviewed_by: str) -> None:
    """Put the task in the Needs review tab, with the votes a reviewer sees beside it."""
    fields = {NEEDS_REVIEW: True, VOTES: task.votes_text, REVIEWED_BY: reviewed_by}
    patch_task_data(ls, task.task_id, with_fields(task.data, **fields))


def llm_reviewer(ctx: Context, uid: str, labels: LabelSet) -> LLMReviewer:
    """The project's LLM reviewer, with the answers this process already has for it."""
    s = ctx.settings
    return build_reviewer(
        s.llm_base_url,
        s.llm_api_key or None,
        s.llm_model,
        labels,
        price=s.llm_prices(),
        timeout_s=s.llm_timeout_s,
        max_concurrency=s.llm_concurrency,
        cache=ctx.review_cache(uid),
    )


def _prepare_project(ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo, version: str) -> None:
    """Once per project: the "Needs review" tab and uncertainty sampling; once per version: point
    ``project.model_version`` at it (LS refuses until a prediction of it is stored, which happens
    right after the ``/predict`` that queued this job, hence the short wait)."""
    if ctx.state.get(uid, "tab") is None:
        view = ensure_review_tab(ls, info.project_id, flag=NEEDS_REVIEW)
        use_uncertainty_sampling(ls, info.project_id)
        ctx.state.put(uid, "tab", str(view))
    if ctx.state.get(uid, "aligned") != version:
        deadline = time.monotonic() + ALIGN_WAIT_S
        while True:
            if align_model_version(ls, info.project_id, version):
                ctx.state.put(uid, "aligned", version)
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
