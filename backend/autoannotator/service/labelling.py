"""Labelling runs: every new version predicts the whole project, in the background, in chunks.

Label Studio asks ``/predict`` only for tasks without a prediction (opening one, the Data
Manager), or for every selected task at once when someone presses *Retrieve Predictions* — which
it abandons after 100 s. So once a better version is published, the backend itself writes its
predictions to every task no person has annotated yet, and re-routes each one:

1. **Plan** (:func:`plan_run`, one job): page through the project's unannotated tasks by id and
   queue one :func:`label_chunk` job per ``label_chunk`` tasks on the ``label`` queue. Only ids are
   held, one page at a time; the cursor is saved after each chunk, so a restarted planner pages on.
2. **Chunks** (:func:`label_chunk`, any number of workers on any machines): read the chunk's tasks,
   predict and route them with exactly what ``/predict`` runs (:class:`Annotator`), write the
   predictions with one bulk import, point the project's ``model_version`` at the version, and
   bring the Needs review tab up to date: tasks the version routes enter it (human mode) or go to
   the LLM (llm mode), tasks it is now sure of leave it.
3. **Finish**: the last chunk marks the run done (and, with ``AUTOANNOTATOR_DELETE_OLD_PREDICTIONS``,
   deletes the older versions' predictions).

A chunk is idempotent: a task that already carries the run's version is not written again (no
duplicate predictions when a chunk is retried or a run resumed), an annotated task is never
touched, a deleted one is skipped. A newer run (a newer version, or one started by hand) makes
the older run's remaining chunks return at once. Label Studio unreachable pauses a chunk (its
record says so on ``/status``) until it answers again, for ``label_pause_s`` at most.

A task the LLM labelled keeps its label under every new version until a person annotates it: the
new version's prediction carries the LLM's label. Older versions' predictions stay in Label
Studio beside the new one by default: the editor, the score column and uncertainty sampling only
show the project's ``model_version``, and an export carries each task's current prediction
marked with its version (and the earlier ones, to compare versions against human labels later).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from label_studio_sdk.core.api_error import ApiError

from autoannotator.errors import StateUnavailableError
from autoannotator.labelstudio.config import ProjectConfig, prediction
from autoannotator.labelstudio.fields import (
    IN_TAB,
    LLM_LABEL,
    LLM_REVIEWERS,
    NEEDS_REVIEW,
    OUT_OF_TAB,
    REVIEWED_BY,
    VOTES,
    AuditedTask,
    RoutedTask,
    audited,
    in_tab,
)
from autoannotator.labelstudio.review_tab import align_model_version
from autoannotator.labelstudio.tasks import (
    delete_version,
    import_predictions,
    model_versions,
    set_data_field,
    unannotated_page,
    unannotated_tasks,
)
from autoannotator.service.annotator import PredictionBatch
from autoannotator.service.context import Context
from autoannotator.service.queueing import JOBS, enqueue_chunk
from autoannotator.service.review import mark_audits, prepare_tab
from autoannotator.settings import Settings
from autoannotator.storage.label_runs import LabelRun, LabelRuns
from autoannotator.storage.redis_state import ProjectInfo, State

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RunStoppedError(Exception):
    """The run this job belongs to is no longer current: a newer one replaced it."""


# ---------------------------------------------------------------- planning


def plan_run(ctx: Context, uid: str, run_id: str) -> str:
    """Queue the chunks of run ``run_id``: every unannotated task, ``label_chunk`` at a time."""
    runs = LabelRuns(ctx.state)
    run = _active(runs, uid, run_id)
    if run is None:
        return "stopped: a newer run replaced this one"
    info = ctx.info(uid)
    ls = ctx.label_studio(info)
    _remember_title(ctx, ls, uid, info)
    size = ctx.settings.label_chunk
    cursor, queued = run.cursor, 0
    while True:
        try:
            page = _patiently(ctx, runs, uid, run_id, partial(_page, ls, info.project_id, cursor, size))
        except RunStoppedError:
            return f"stopped after queueing {queued} tasks: a newer run replaced this one"
        if not page:
            break
        cursor = int(page[-1]["id"])
        ids = [int(t["id"]) for t in page if run.full or run.version not in model_versions(t)]
        if ids:
            number = runs.add_chunk(uid, run_id, len(ids), cursor=cursor)
            if number is None:
                return f"stopped after queueing {queued} tasks: a newer run replaced this one"
            enqueue_chunk(ctx, uid, run_id, number, ids)
            queued += len(ids)
        elif not runs.save_cursor(uid, run_id, cursor):
            return f"stopped after queueing {queued} tasks: a newer run replaced this one"
        if len(page) < size:
            break
    runs.set_state(uid, run_id, "running", planned=True)
    _maybe_finish(ctx, runs, uid, run_id)
    logger.info("project %s: labelling run %s of %s planned: %d tasks", uid, run_id, run.version, queued)
    return f"{queued} tasks queued in chunks of {size}"


def _page(ls: LabelStudio, project_id: int, after_id: int, size: int) -> list[dict[str, Any]]:
    return unannotated_page(ls, project_id, after_id=after_id, size=size)[0]


def _remember_title(ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo) -> None:
    """The project's Label Studio title, for the status page (a failure only costs the title)."""
    try:
        title = str(ls.projects.get(id=info.project_id).title or "")
        if title:
            ctx.state.put(uid, "title", title)
    except Exception as exc:  # the run goes on without it
        logger.info("project %s: no title from Label Studio (%s)", uid, exc)


# ---------------------------------------------------------------- one chunk


def label_chunk(ctx: Context, uid: str, run_id: str, number: int, ids: Sequence[int]) -> str:
    """Predict, write and route the tasks ``ids`` of run ``run_id`` (see the module's docstring)."""
    runs = LabelRuns(ctx.state)
    run = _active(runs, uid, run_id)
    if run is None:
        return "stopped: a newer run replaced this one"
    info = ctx.info(uid)
    ls = ctx.label_studio(info)
    try:
        counts = _patiently(ctx, runs, uid, run_id, lambda: _label(ctx, ls, uid, info, run, ids))
    except RunStoppedError as stop:
        return f"stopped: {stop}"
    after = runs.chunk_done(uid, run_id, number, **counts)
    if after is not None and after.state == "paused":
        runs.set_state(uid, run_id, "running")
    _maybe_finish(ctx, runs, uid, run_id)
    ctx.state.count(uid, labelled_tasks=counts["written"])
    return (
        f"chunk {number}: {counts['written']} predictions written, {counts['skipped']} skipped, "
        f"{counts['routed']} routed, {counts['moved_in']} into the tab, {counts['moved_out']} out; "
        f"ms read {counts['read_ms']}, predict {counts['predict_ms']}, write {counts['write_ms']}, "
        f"tab {counts['tab_ms']}"
    )


def _label(
    ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo, run: LabelRun, ids: Sequence[int]
) -> dict[str, int]:
    config = ctx.config(info)
    started = time.perf_counter()
    tasks = unannotated_tasks(ls, info.project_id, ids)
    read = time.perf_counter()
    batch = ctx.annotator.predict(uid, tasks, info.label_config)
    predicted = time.perf_counter()
    if batch.version != run.version:
        raise RunStoppedError(f"{batch.version} now serves, not {run.version}")
    llm = _llm_labels(tasks, config)
    writes = []
    for task, result in zip(tasks, batch.results, strict=True):
        task_id = int(task["id"])
        if not result.get("result") or run.version in model_versions(task):
            continue
        if task_id in llm:  # the LLM's label stands until a person annotates the task
            result = prediction(config, llm[task_id], float(result.get("score") or 0.0), run.version)
        writes.append({"task": task_id, **result})
    # Label Studio may be storing /predict's answer for some of these right now (see
    # State.claim_prediction_writes): those it keeps, the run skips.
    mine = ctx.state.claim_prediction_writes(
        uid, run.version, [int(w["task"]) for w in writes], "run", run_stale_s=ctx.settings.label_timeout_s
    )
    written = import_predictions(ls, info.project_id, [w for w in writes if int(w["task"]) in mine])
    if written:
        _align(ctx, ls, uid, info, run.version)
    imported = time.perf_counter()
    routed = [r for r in batch.routed if int(r.task_id) not in llm]
    tab = _update_tab(ctx, ls, uid, info, run, tasks, routed, batch.votes, llm, batch.audited)
    ms = _milliseconds(started, read, predicted, imported, time.perf_counter())
    return {
        "done": len(ids),
        "written": written,
        "skipped": len(ids) - written,
        "routed": len(routed),
        **tab,
        # Where the chunk's time went, summed over the run: /status and the benchmark show it.
        "read_ms": ms[0],
        "predict_ms": ms[1],
        "write_ms": ms[2],
        "tab_ms": ms[3],
        "forward_ms": round(1000 * batch.timings.get("forward", 0.0)),
    }


def _milliseconds(*marks: float) -> list[int]:
    """The whole milliseconds between consecutive ``time.perf_counter()`` marks."""
    return [round(1000 * (b - a)) for a, b in pairwise(marks)]


def _llm_labels(tasks: Sequence[Mapping[str, Any]], config: ProjectConfig) -> dict[int, str]:
    """The tasks whose data records an LLM label (and no person annotated them, or LS would not
    have listed them)."""
    out = {}
    for task in tasks:
        data = task.get("data") or {}
        if data.get(REVIEWED_BY) in LLM_REVIEWERS and data.get(LLM_LABEL) in config.labels:
            out[int(task["id"])] = str(data[LLM_LABEL])
    return out


def _update_tab(
    ctx: Context,
    ls: LabelStudio,
    uid: str,
    info: ProjectInfo,
    run: LabelRun,
    tasks: Sequence[Mapping[str, Any]],
    routed: Sequence[RoutedTask],
    votes: Mapping[int, str],
    llm: Mapping[int, str],
    audit: Sequence[AuditedTask] = (),
) -> dict[str, int]:
    """The Needs review tab after this chunk: exactly the tasks the version routes (human mode)
    and those waiting for the audit (any mode); in llm mode routed tasks go to a review job
    instead. Returns the tab's moves."""
    prepare_tab(ctx, ls, uid, info)
    data = {int(t["id"]): dict(t.get("data") or {}) for t in tasks}
    mode = ctx.state.mode(uid)
    with ctx.task_data(uid):
        data.update(mark_audits(ls, info.project_id, audit))
        routed_ids = {int(r.task_id) for r in routed}
        entering = [i for i in routed_ids if not in_tab(data[i])] if mode == "human" else []
        keep = routed_ids if mode == "human" else set()
        leaving = [i for i, d in data.items() if in_tab(d) and i not in keep and not audited(d)]
        # Votes are written where a reviewer sees them: tasks in the tab after this chunk, and those
        # leaving it (their old votes would mislead); nobody reviews the others (as with /predict).
        shown = keep | set(leaving)
        _write_tab_fields(
            ls, info.project_id, data, {i: t for i, t in votes.items() if i in shown}, entering, leaving
        )
    queued = 0
    if mode == "llm" and routed:
        ctx.state.enqueue(
            "review",
            JOBS + "review_routed",
            uid,
            run.version,
            "llm",
            [replace(r, data=data[int(r.task_id)]) for r in routed],
            [],
            job_timeout=ctx.settings.review_timeout_s,
            description=f"review {len(routed)} tasks of {uid} (llm, labelling run {run.id})",
        )
        queued = len(routed)
    if entering or leaving or audit:
        ctx.state.count(uid, tab_entered=len(entering), tab_left=len(leaving), audit_drawn=len(audit))
    return {
        "moved_in": len(entering),
        "moved_out": len(leaving),
        "llm_queued": queued,
        "audit_drawn": len(audit),
    }


def _write_tab_fields(
    ls: LabelStudio,
    pid: int,
    data: dict[int, dict[str, Any]],
    votes: Mapping[int, str],
    entering: Sequence[int],
    leaving: Sequence[int],
) -> None:
    """The task-data writes of :func:`_update_tab`, a bulk update per field and value."""
    # Votes first, so a task enters the tab with the votes a reviewer should see beside it.
    by_text: dict[str, list[int]] = defaultdict(list)
    for task_id, text in votes.items():
        if task_id in data and data[task_id].get(VOTES) != text:
            by_text[text].append(task_id)
    for text, group in by_text.items():
        set_data_field(ls, pid, [(i, data[i]) for i in group], VOTES, text)
        for i in group:
            data[i][VOTES] = text
    set_data_field(ls, pid, [(i, data[i]) for i in leaving], NEEDS_REVIEW, OUT_OF_TAB)
    set_data_field(ls, pid, [(i, data[i]) for i in entering], NEEDS_REVIEW, IN_TAB)
    needs_reviewer = [i for i in entering if data[i].get(REVIEWED_BY) != "human"]
    set_data_field(ls, pid, [(i, data[i]) for i in needs_reviewer], REVIEWED_BY, "human")


def _align(ctx: Context, ls: LabelStudio, uid: str, info: ProjectInfo, version: str) -> None:
    """Point the project's ``model_version`` at ``version`` once, as soon as one of its predictions
    is stored (LS refuses before): the editor, the score column and uncertainty sampling follow."""
    if ctx.state.get(uid, "aligned") == version:
        return
    if align_model_version(ls, info.project_id, version):
        ctx.state.put(uid, "aligned", version)


# ---------------------------------------------------------------- /predict beside a run


def answers_beside_runs(
    state: State, settings: Settings, batch: PredictionBatch, tasks: Sequence[Any]
) -> list[Any]:
    """``batch.results`` as ``/predict`` sends them: ``[]`` (Label Studio then stores no prediction
    of that task) for each task whose prediction of ``batch.version`` a labelling run claimed,
    since the run writes the same prediction; ``/predict`` claims the others, so a run reading them
    now leaves them to Label Studio. Without Redis there is no run to leave anything to."""
    ids = {
        i: int(task["id"])
        for i, (task, result) in enumerate(zip(tasks, batch.results, strict=True))
        if result.get("result") and isinstance(task, Mapping) and isinstance(task.get("id"), int)
    }
    if not ids:
        return batch.results
    try:
        mine = state.claim_prediction_writes(
            batch.uid, batch.version, list(ids.values()), "predict", run_stale_s=settings.label_timeout_s
        )
    except StateUnavailableError:
        return batch.results
    left = [task_id for task_id in ids.values() if task_id not in mine]
    if left:
        logger.info("project %s: %d tasks left to the labelling run that writes them", batch.uid, len(left))
    return [[] if i in ids and ids[i] not in mine else r for i, r in enumerate(batch.results)]


# ---------------------------------------------------------------- the end, and waiting


def _maybe_finish(ctx: Context, runs: LabelRuns, uid: str, run_id: str) -> None:
    run = runs.current(uid)
    if run is None or run.id != run_id or not run.planned or run.chunks_done < run.chunks:
        return
    if not runs.finish(uid, run_id):
        return
    logger.info(
        "project %s: labelling run %s of %s done: %d tasks, %d predictions written, %d routed",
        uid,
        run_id,
        run.version,
        run.done,
        run.written,
        run.routed,
    )
    if ctx.settings.delete_old_predictions:
        _delete_older_versions(ctx, uid, run.version)


def _delete_older_versions(ctx: Context, uid: str, version: str) -> None:
    info = ctx.info(uid)
    ls = ctx.label_studio(info)
    for old in ctx.models.registry(uid).versions():
        if old != version:
            try:
                n = delete_version(ls, info.project_id, old)
                if n:
                    logger.info("project %s: %d predictions of %s deleted", uid, n, old)
            except ApiError as exc:
                logger.warning("project %s: predictions of %s not deleted: %s", uid, old, exc)


def _active(runs: LabelRuns, uid: str, run_id: str) -> LabelRun | None:
    run = runs.current(uid)
    if run is None or run.id != run_id or run.state == "cancelled":
        return None
    return run


def _unreachable(exc: BaseException) -> bool:
    """Label Studio down, restarting or overloaded (after the SDK's own retries)."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ApiError) and exc.status_code is not None and exc.status_code >= 500


def _patiently(ctx: Context, runs: LabelRuns, uid: str, run_id: str, work: Callable[[], T]) -> T:
    """``work()``, retried while Label Studio is unreachable, with back-off (2 s doubling, 60 s at
    most), for ``label_pause_s`` in all; the run shows as paused meanwhile. Other errors raise."""
    deadline = time.monotonic() + ctx.settings.label_pause_s
    wait = 2.0
    while True:
        try:
            return work()
        except Exception as exc:
            if not _unreachable(exc) or time.monotonic() + wait > deadline:
                raise
            why = f"Label Studio unreachable ({type(exc).__name__}); retrying in {wait:.0f} s"
            logger.warning("project %s: run %s paused: %s", uid, run_id, why)
            runs.set_state(uid, run_id, "paused", why)
            time.sleep(wait)
            wait = min(60.0, wait * 2)
            if _active(runs, uid, run_id) is None:
                raise RunStoppedError("a newer run replaced this one") from exc
