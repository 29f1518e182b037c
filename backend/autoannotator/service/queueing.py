"""What the backend puts on its rq queues, with each job's timeout: the one place jobs are queued.

Jobs are named by the dotted path of their entry point in :mod:`autoannotator.service.jobs`
(``JOBS + "train_project"``): a worker imports that module when it runs the job, so queueing a job
never imports the training code into the web process. Job arguments are ids and plain values.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rq import Retry

from autoannotator.errors import StateUnavailableError
from autoannotator.labelstudio.fields import AuditedTask, ClearedTask, RoutedTask
from autoannotator.storage.label_runs import LabelRun, LabelRuns

if TYPE_CHECKING:
    from autoannotator.service.context import Context
    from autoannotator.settings import Settings
    from autoannotator.storage.redis_state import State

logger = logging.getLogger(__name__)

JOBS = "autoannotator.service.jobs."
# A failed training stays in rq's failed registry this long, for /status and for a person to read.
TRAIN_FAILURE_TTL_S = 7 * 24 * 3600
# A labelling job that fails (or whose worker is killed) is run again this many times.
LABEL_RETRIES = 3


def request_training(ctx: Context, uid: str, *, force: bool = False, reason: str = "") -> bool:
    """Queue one training for ``uid`` unless one is already queued or running; True if queued."""
    if not ctx.state.claim_training(uid):
        logger.info("project %s: training already queued or running (%s)", uid, reason or "requested")
        return False
    try:
        ctx.state.enqueue(
            "train",
            JOBS + "train_project",
            uid,
            force,
            job_timeout=ctx.settings.train_timeout_s,
            description=f"train {uid}: {reason or 'requested'}",
            failure_ttl=TRAIN_FAILURE_TTL_S,
        )
    except Exception:
        # No job carries the claim: give it back, or no training could be queued until its TTL.
        with contextlib.suppress(Exception):
            ctx.state.release_training(uid)
        raise
    logger.info("project %s: training queued (%s)", uid, reason or "requested")
    return True


def request_sync(ctx: Context, uid: str, *, why: str = "from LS", force: bool = False) -> bool:
    """Queue a rebuild of the pool from Label Studio, once per Redis lifetime (``force``: again);
    True if queued."""
    if not force and not ctx.state.claim_sync(uid):
        return False
    try:
        ctx.state.enqueue(
            "ingest",
            JOBS + "sync_project",
            uid,
            job_timeout=ctx.settings.sync_timeout_s,
            description=f"sync {uid} {why}",
        )
    except Exception:
        if not force:
            with contextlib.suppress(Exception):
                ctx.state.forget_sync(uid)  # the next request tries again
        raise
    return True


def request_labelling(
    ctx: Context,
    uid: str,
    reason: str,
    *,
    task_ids: Sequence[int] | None = None,
    full: bool = False,
    only_if_new: bool = False,
) -> LabelRun | None:
    """Start a labelling run of the served version (see :mod:`autoannotator.service.labelling`);
    the run started, or None when there is nothing to run.

    ``task_ids``: only those tasks (new tasks Label Studio announced); they join the current run
    when it is of the served version and still going, else a run of their own starts. Otherwise
    the whole project: a new run replaces the current one (whose remaining chunks then stop), or,
    with ``only_if_new``, starts only when no run of this version was recorded (``/setup`` asks on
    every poll). ``full``: route again tasks that already carry the version's prediction.
    """
    version = ctx.models.current_version(uid)
    if version is None:
        return None
    runs = LabelRuns(ctx.state)
    if task_ids is not None:
        ids = sorted({int(i) for i in task_ids})
        current = runs.current(uid)
        if not ids:
            return None
        if current is None or current.version != version or current.finished:
            current = runs.start(uid, version, reason)
            assert current is not None
            runs.set_state(uid, current.id, "running", planned=True)
        size = ctx.settings.label_chunk
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            number = runs.add_chunk(uid, current.id, len(chunk))
            if number is not None:
                enqueue_chunk(ctx, uid, current.id, number, chunk)
        return current
    run = runs.start(uid, version, reason, full=full, only_if_new=only_if_new)
    if run is None:
        return None
    ctx.state.enqueue(
        "label",
        JOBS + "plan_labelling",
        uid,
        run.id,
        job_timeout=ctx.settings.label_timeout_s,
        retry=Retry(max=LABEL_RETRIES),
        description=f"plan labelling run {run.id} of {uid} ({version}): {reason}",
    )
    logger.info("project %s: labelling run %s of %s queued (%s)", uid, run.id, version, reason)
    return run


def enqueue_chunk(ctx: Context, uid: str, run_id: str, number: int, ids: Sequence[int]) -> None:
    """One chunk of a labelling run; retried when it fails or its worker dies (rq's registry
    cleanup requeues a job whose worker stopped beating, once its timeout has passed)."""
    ctx.state.enqueue(
        "label",
        JOBS + "label_chunk",
        uid,
        run_id,
        number,
        list(ids),
        job_timeout=ctx.settings.label_timeout_s,
        retry=Retry(max=LABEL_RETRIES),
        description=f"label chunk {number} of run {run_id} ({len(ids)} tasks of {uid})",
    )


def request_llm_seeds(ctx: Context, uid: str, why: str) -> bool:
    """Queue the LLM-seeded start (:mod:`autoannotator.service.llm_seeds`) once for a project in
    llm mode with no version yet; True if queued."""
    s = ctx.settings
    if s.llm_seeds <= 0 or ctx.models.current_version(uid) is not None or ctx.state.mode(uid) != "llm":
        return False
    return _queue_once(
        ctx.state.claim_llm_seeds,
        ctx.state.release_llm_seeds,
        ctx,
        "review",
        "seed_with_llm",
        uid,
        timeout_s=s.review_timeout_s,
        description=f"LLM seeds for {uid}: {why}",
    )


def request_seed_tab(ctx: Context, uid: str, why: str) -> bool:
    """Queue the choice of a project's seed tasks (:mod:`autoannotator.service.seed_tab`) once, while
    it has no version and its seeds are people's to label; True if queued."""
    s = ctx.settings
    if not s.seed_tab or s.specialists or ctx.models.current_version(uid) is not None:
        return False
    if s.llm_seeds > 0 and ctx.state.mode(uid) == "llm":
        return False  # the LLM-seeded start labels the covering tasks itself
    return _queue_once(
        ctx.state.claim_seed_tab,
        ctx.state.release_seed_tab,
        ctx,
        "ingest",
        "mark_seed_tasks",
        uid,
        timeout_s=s.ingest_timeout_s,
        description=f"seed tasks for {uid}: {why}",
    )


def request_calibration(ctx: Context, uid: str, why: str) -> bool:
    """Queue a target policy's calibration (:mod:`autoannotator.service.calibration`) unless one is
    queued already (it reads every audit label that arrives before it starts); True if queued."""
    return _queue_once(
        ctx.state.claim_calibration,
        ctx.state.release_calibration,
        ctx,
        "ingest",
        "calibrate_project",
        uid,
        timeout_s=ctx.settings.ingest_timeout_s,
        description=f"calibrate {uid}: {why}",
    )


def _queue_once(
    claim: Callable[[str], bool],
    release: Callable[[str], None],
    ctx: Context,
    queue: str,
    job: str,
    uid: str,
    *,
    timeout_s: int,
    description: str,
) -> bool:
    """Queue ``job`` for ``uid`` if ``claim`` grants it; a failed enqueue gives the claim back (or no
    job could be queued again until the claim expires)."""
    if not claim(uid):
        return False
    try:
        ctx.state.enqueue(queue, JOBS + job, uid, job_timeout=timeout_s, description=description)
    except Exception:
        with contextlib.suppress(Exception):
            release(uid)
        raise
    return True


def enqueue_annotation(
    ctx: Context, uid: str, action: str, task: dict[str, Any], annotation: dict[str, Any]
) -> None:
    """A created or updated annotation, for the pool."""
    ctx.state.enqueue(
        "ingest",
        JOBS + "ingest_annotation",
        uid,
        task,
        annotation,
        job_timeout=ctx.settings.ingest_timeout_s,
        description=f"{action} {uid}",
    )


def dispatch_review(
    state: State,
    settings: Settings,
    uid: str,
    version: str,
    routed: Sequence[RoutedTask],
    cleared: Sequence[ClearedTask],
    *,
    predictions: int,
    invalid: int = 0,
    audited: Sequence[AuditedTask] = (),
) -> str:
    """Count one ``/predict``, read the project's review mode (one Redis round trip) and queue its
    review job if there is anything to do (a second); returns the mode. Tasks drawn for the audit
    go to people whatever the mode.

    Without Redis: the default mode, nothing queued, and the log says how many routed tasks missed
    their review (the next ``/predict`` of those tasks routes them again).
    """
    try:
        mode = state.count_predictions(uid, predictions, len(routed), invalid)
        if (routed and mode != "off") or cleared or audited:
            state.enqueue(
                "review",
                JOBS + "review_routed",
                uid,
                version,
                mode,
                list(routed) if mode != "off" else [],
                list(cleared),
                list(audited),
                job_timeout=settings.review_timeout_s,
                description=f"review {len(routed)} tasks of {uid} ({mode}), audit {len(audited)}",
            )
        return mode
    except StateUnavailableError as exc:
        logger.warning(
            "project %s: %s; review mode falls back to %s, %d routed tasks not queued for review",
            uid,
            exc,
            settings.review_mode,
            len(routed),
        )
        return settings.review_mode


# ---------------------------------------------------------------- the first version's back-off
# /setup asks for a project's first version on every poll (Label Studio polls while a page is
# open). A first training that failed (say, every catalog model unusable) must not be queued again
# at once each time: it waits FIRST_RETRY_S, doubling with each failure, FIRST_RETRY_MAX_S at most.
# An annotation, Start Training or a deploy with a fixed setting ask again regardless.
FIRST_RETRY_S = 60.0
FIRST_RETRY_MAX_S = 3600.0


def first_version_failed(state: State, uid: str, now: float | None = None) -> None:
    failures = int(state.get(uid, "first_failures") or 0) + 1
    state.put(uid, "first_failures", str(failures))
    state.put(uid, "first_failed_at", f"{time.time() if now is None else now:.3f}")


def first_version_succeeded(state: State, uid: str) -> None:
    if state.get(uid, "first_failures"):
        state.put(uid, "first_failures", "0")


def first_version_retry_in(state: State, uid: str, now: float | None = None) -> float:
    """Seconds until /setup may queue the first training again (0: now)."""
    failures = int(state.get(uid, "first_failures") or 0)
    if failures == 0:
        return 0.0
    wait = min(FIRST_RETRY_MAX_S, FIRST_RETRY_S * 2 ** (failures - 1))
    since = (time.time() if now is None else now) - float(state.get(uid, "first_failed_at") or 0)
    return max(0.0, wait - since)


def request_first_version(ctx: Context, uid: str, reason: str) -> bool:
    """Queue the project's first training unless it failed recently (see above); True if queued."""
    wait = first_version_retry_in(ctx.state, uid)
    if wait > 0:
        logger.info("project %s: first training failed recently; next try in %.0f s", uid, wait)
        return False
    return request_training(ctx, uid, reason=reason)
