"""Secondary review of the tasks one ``/predict`` routed: the Needs review tab, or the LLM; and the
tasks it drew for the audit, which go to the tab whatever the mode.

In ``human`` mode each task is flagged for the "Needs review" tab with the specialists' votes
written beside it. In ``llm`` mode the LLM labels the tasks; its label replaces the task's
prediction in Label Studio, is recorded in the task's data (so a Redis flush loses nothing) and
joins the pool. A task the LLM cannot label (off-label answer, timeout, 5xx after retries) falls
back to the human queue. Tasks the served version is now sure of are unflagged, unless they wait
for the audit. An audited task that the LLM labels stays in the tab (a person's label measures the
LLM too) and its LLM label does not join the pool (:mod:`autoannotator.learning.audit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from autoannotator.core.labels import LabelSet
from autoannotator.labelstudio.client import PredictionWrite, replace_predictions
from autoannotator.labelstudio.config import prediction
from autoannotator.labelstudio.fields import (
    AUDIT,
    IN_TAB,
    LLM_LABEL,
    NEEDS_REVIEW,
    OUT_OF_TAB,
    REVIEWED_BY,
    VOTES,
    AuditedTask,
    ClearedTask,
    RoutedTask,
    audited,
)
from autoannotator.labelstudio.review_tab import (
    align_model_version,
    ensure_review_tab,
    use_uncertainty_sampling,
)
from autoannotator.labelstudio.tasks import set_data_field
from autoannotator.learning.pool import Source
from autoannotator.review.base import ReviewItem, ReviewOutcome, ReviewStatus
from autoannotator.review.llm import LLMReviewer, build_reviewer
from autoannotator.service.context import Context
from autoannotator.service.ingest import maybe_train
from autoannotator.storage.redis_state import ProjectInfo

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

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
    audit: Sequence[AuditedTask] = (),
) -> str:
    """Act on the tasks one ``/predict`` routed to review (and unflag ``cleared`` ones); put the
    tasks it drew for the audit in the tab with their mark."""
    info = ctx.info(uid)
    ls = ctx.label_studio(info)
    _prepare_project(ctx, ls, uid, info, version)
    with ctx.task_data(uid):
        unflag = [(int(t.task_id), t.data) for t in cleared if not audited(t.data)]
        set_data_field(ls, info.project_id, unflag, NEEDS_REVIEW, OUT_OF_TAB)
        marked = mark_audits(ls, info.project_id, audit)
        if mode == "human" or not routed:
            flag(ls, info.project_id, routed, "human")
    if audit:
        ctx.state.count(uid, audit_drawn=len(audit))
    drew = f", {len(audit)} drawn for the audit" if audit else ""
    if mode == "human" or not routed:
        ctx.state.count(uid, reviewed_human_queue=len(routed))
        return f"{len(routed)} tasks flagged for human review, {len(cleared)} cleared{drew}"
    routed = [replace(t, data=marked.get(int(t.task_id), t.data)) for t in routed]
    if mode != "llm":
        return f"mode {mode}: nothing to review"
    return _review_by_llm(ctx, ls, uid, info, version, routed) + drew


def _review_by_llm(
    ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo, version: str, routed: Sequence[RoutedTask]
) -> str:
    config = ctx.config(info)
    fresh = ctx.state.claim_llm_reviews(uid, version, [int(t.task_id) for t in routed])
    if len(fresh) < len(routed):
        logger.info(
            "project %s: %d routed tasks were already sent to the LLM under %s",
            uid,
            len(routed) - len(fresh),
            version,
        )
    routed = [t for t in routed if int(t.task_id) in fresh]
    if not routed:
        return "every routed task was already reviewed under this version"
    reviewer = llm_reviewer(ctx, uid, config.labels)
    outcomes = _ask(ctx, uid, reviewer, routed)
    labelled: list[tuple[RoutedTask, str]] = []
    failed: dict[str, list[RoutedTask]] = {}
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
            failed.setdefault(f"human (LLM {outcome.status.value})", []).append(task)
    with ctx.task_data(uid):
        for reviewed_by, tasks in failed.items():
            flag(ls, info.project_id, tasks, reviewed_by)
    writes = []
    for task, label in labelled:
        item = prediction(config, label, task.confidence, version)
        writes.append(PredictionWrite(int(task.task_id), item["result"], item["score"]))
    replace_predictions(ls, version, writes)
    with ctx.task_data(uid):
        _record_llm_labels(ls, info.project_id, labelled)
    fallbacks = len(routed) - len(labelled)
    ctx.state.count(uid, reviewed_llm=len(labelled), llm_failures=fallbacks, reviewed_human_queue=fallbacks)
    trainable = [(task, label) for task, label in labelled if not audited(task.data)]
    if trainable:
        with ctx.pool(uid, config.labels) as pool:
            pool.add_many([(task.key(), task.text, label) for task, label in trainable], Source.LLM)
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


def _record_llm_labels(ls: LabelStudio, project_id: int, labelled: Sequence[tuple[RoutedTask, str]]) -> None:
    """Write each LLM label into its task's data (so a Redis flush loses nothing), take the task
    out of the tab, and mark it reviewed by the LLM: one bulk update per label and per field. The
    label goes first: a task marked "llm" without a label is ignored by the pool rebuild."""
    data = {int(t.task_id): dict(t.data) for t, _ in labelled}
    by_label: dict[str, list[int]] = {}
    for task, label in labelled:
        by_label.setdefault(label, []).append(int(task.task_id))
    for label, ids in by_label.items():
        set_data_field(ls, project_id, [(i, data[i]) for i in ids], LLM_LABEL, label)
        for i in ids:
            data[i][LLM_LABEL] = label
    # An audited task stays in the tab: a person's label will measure the LLM's.
    leaving = [(i, d) for i, d in data.items() if not audited(d)]
    set_data_field(ls, project_id, leaving, NEEDS_REVIEW, OUT_OF_TAB)
    for _, d in leaving:
        d[NEEDS_REVIEW] = OUT_OF_TAB
    set_data_field(ls, project_id, list(data.items()), REVIEWED_BY, "llm")
    for d in data.values():
        d[REVIEWED_BY] = "llm"
    by_votes: dict[str, list[int]] = {}
    for task, _ in labelled:
        by_votes.setdefault(task.votes_text, []).append(int(task.task_id))
    for text, ids in by_votes.items():
        set_data_field(ls, project_id, [(i, data[i]) for i in ids], VOTES, text)


def flag(ls: LabelStudio, project_id: int, tasks: Sequence[RoutedTask], reviewed_by: str) -> None:
    """Put ``tasks`` in the Needs review tab, with the votes a reviewer sees beside each: one bulk
    update per distinct votes text, then one for the flag and one for who reviews."""
    by_votes: dict[str, list[RoutedTask]] = {}
    for task in tasks:
        by_votes.setdefault(task.votes_text, []).append(task)
    for text, group in by_votes.items():
        set_data_field(ls, project_id, [(int(t.task_id), t.data) for t in group], VOTES, text)
    pairs = [(int(t.task_id), {**t.data, VOTES: t.votes_text}) for t in tasks]
    set_data_field(ls, project_id, pairs, NEEDS_REVIEW, IN_TAB)
    pairs = [(i, {**d, NEEDS_REVIEW: IN_TAB}) for i, d in pairs]
    set_data_field(ls, project_id, pairs, REVIEWED_BY, reviewed_by)


def mark_audits(ls: LabelStudio, project_id: int, audit: Sequence[AuditedTask]) -> dict[int, dict]:
    """Put the audited tasks in the Needs review tab with their votes and their audit mark (one bulk
    update per distinct mark and votes text, then one for the flag); returns their data as written."""
    data = {int(a.task.task_id): {**a.task.data, VOTES: a.task.votes_text} for a in audit}
    by_value: dict[tuple[str, str | int], list[int]] = {}
    for a in audit:
        by_value.setdefault((VOTES, a.task.votes_text), []).append(int(a.task.task_id))
        by_value.setdefault((AUDIT, a.mark), []).append(int(a.task.task_id))
    for (name, value), ids in by_value.items():
        set_data_field(ls, project_id, [(i, data[i]) for i in ids], name, value)
        for i in ids:
            data[i][name] = value
    set_data_field(ls, project_id, list(data.items()), NEEDS_REVIEW, IN_TAB)
    for d in data.values():
        d[NEEDS_REVIEW] = IN_TAB
    return data


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
        min_confidence=s.llm_min_confidence,
    )


def prepare_tab(ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo) -> None:
    """Once per project: the "Needs review" tab and uncertainty sampling."""
    if ctx.state.get(uid, "tab") is None:
        view = ensure_review_tab(ls, info.project_id, flag=NEEDS_REVIEW)
        use_uncertainty_sampling(ls, info.project_id)
        ctx.state.put(uid, "tab", str(view))


def _prepare_project(ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo, version: str) -> None:
    """The tab (:func:`prepare_tab`); once per version: point ``project.model_version`` at it (LS
    refuses until a prediction of it is stored, which happens right after the ``/predict`` that
    queued this job, hence the short wait)."""
    prepare_tab(ctx, ls, uid, info)
    if ctx.state.get(uid, "aligned") != version:
        deadline = time.monotonic() + ALIGN_WAIT_S
        while True:
            if align_model_version(ls, info.project_id, version):
                ctx.state.put(uid, "aligned", version)
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
