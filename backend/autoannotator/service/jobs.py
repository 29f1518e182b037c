"""The work that happens off the request path, as rq jobs: ingest labels, review routed tasks, train.

The web process only parses and enqueues (Label Studio waits on ``/webhook`` inside the annotator's
request, 1 s at most); everything slow runs here, in ``autoannotator worker`` processes that may
live on other machines and share one Redis and one model store.

- :func:`ingest_annotation` puts a human label into the project's verified pool, then asks for a
  training when the pool grew by β (or reached the cold-start seed size).
- :func:`review_routed` takes the tasks a ``/predict`` routed to review. In ``human`` mode it flags
  them for the "Needs review" tab and writes the specialists' votes into the task for the reviewer
  to see; in ``llm`` mode it asks the LLM, replaces the task's prediction in Label Studio with the
  LLM's label, marks the task LLM-reviewed and adds the label to the pool. A task the LLM cannot
  label (off-label answer, timeout, 5xx after retries) falls back to the human queue.
- :func:`train_project` builds a project's first version (configured specialists, or a cold start
  from its first human labels) or refines the served one; exactly one runs per project at a time.
- :func:`sync_project` rebuilds the pool from Label Studio (the durable record), after a Redis
  flush or on demand.

The pool log is written by one process at a time, under a Redis lock per project.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from label_studio_sdk import LabelStudio
from rq import SimpleWorker, Worker
from rq.worker import BaseWorker

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import policy_from_spec
from autoannotator.errors import AutoAnnotatorError, TrainingError
from autoannotator.labelstudio.config import (
    ProjectConfig,
    annotation_label,
    extract_texts,
    parse_label_config,
    prediction,
)
from autoannotator.labelstudio.review_tab import (
    align_model_version,
    ensure_review_tab,
    use_uncertainty_sampling,
)
from autoannotator.learning.coldstart import ColdStartConfig
from autoannotator.learning.first_version import FirstVersionPlan, TaskDescription, build_first_version
from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.learning.refine import RefineConfig, refine
from autoannotator.models.specialists.base import TrainConfig
from autoannotator.review.base import ReviewItem, ReviewStatus
from autoannotator.review.llm import LLMReviewer, PriceTable, ReviewCache, make_openai_client
from autoannotator.service.status_plot import write_holdout_tradeoff
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from autoannotator.storage.redis_state import ProjectInfo, State

logger = logging.getLogger(__name__)

POOL_LOCK_TIMEOUT_S = 120.0
MIN_SEED_PER_LABEL = ColdStartConfig.min_per_label
TRAIN_JOB_TIMEOUT_S = 4 * 3600
# While a training runs, its lock and "pending" flag live this long and are renewed every third of
# it: a training killed mid-way (its finally never runs) blocks the next one for two minutes at most.
TRAIN_HEARTBEAT_TTL_S = 120.0
# Task data keys the backend writes (and Label Studio shows as Data Manager columns).
NEEDS_REVIEW = "aa_needs_review"
VOTES = "aa_votes"
REVIEWED_BY = "aa_review"
LLM_LABEL = "aa_llm_label"


class NotConfiguredError(AutoAnnotatorError):
    """A job needs a setting that is missing (for example LABEL_STUDIO_API_KEY)."""


@dataclass(frozen=True)
class Context:
    """What every job of one worker process shares: settings, Redis state and the model store."""

    settings: Settings
    state: State
    models: ProjectModels
    # Each project's verified pool as this process last saw it (see pool()).
    _pools: dict[str, VerifiedPool] = field(default_factory=dict, compare=False, repr=False)
    # Each project's LLM answers as this process last read them (see review_cache()).
    _review_caches: dict[str, ReviewCache] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        return cls(
            settings,
            State.from_url(settings.redis_url, settings.review_mode),
            ProjectModels(settings.model_dir),
        )

    def config(self, info: ProjectInfo) -> ProjectConfig:
        return _parse(info.label_config)

    def info(self, uid: str) -> ProjectInfo:
        info = self.state.info(uid)
        if info is None:
            raise NotConfiguredError(
                f"project {uid} is unknown to this Redis (flushed?); Label Studio's next /setup or "
                "webhook records it again"
            )
        return info

    def label_studio(self, info: ProjectInfo) -> LabelStudio:
        url = self.settings.label_studio_url or info.ls_url
        if not self.settings.label_studio_api_key:
            raise NotConfiguredError(
                "LABEL_STUDIO_API_KEY is not set: the workers need it to write predictions and read "
                "annotations (a legacy token or a personal access token of a project member)"
            )
        if not url:
            raise NotConfiguredError(
                "LABEL_STUDIO_URL is not set and Label Studio sent no hostname to /setup"
            )
        return LabelStudio(base_url=url, api_key=self.settings.label_studio_api_key)

    def pool_path(self, uid: str) -> Path:
        return self.models.registry(uid).root / "pool.jsonl"

    def review_cache(self, uid: str) -> ReviewCache:
        """The project's cache of LLM answers, kept between jobs and brought up to date with what
        other workers appended (a worker that forks per job reads the whole file each time)."""
        path = self.models.registry(uid).root / "llm-cache.jsonl"
        cache = self._review_caches.get(uid)
        if cache is None or cache.path != path:
            cache = self._review_caches[uid] = ReviewCache(path)
        else:
            cache.refresh()
        return cache

    @contextmanager
    def pool(self, uid: str, labels: LabelSet) -> Iterator[VerifiedPool]:
        """The project's pool, up to date with its log, held under the project's pool lock.

        A worker keeps each project's pool between jobs and only reads what other workers appended
        since (:meth:`VerifiedPool.refresh`); replaying the whole log for every annotation would cost
        O(pool) per label. After a failure inside the block the kept pool is dropped and the next
        job reads the log again.
        """
        with self.state.lock("pool", uid, timeout_s=POOL_LOCK_TIMEOUT_S, wait_s=POOL_LOCK_TIMEOUT_S) as got:
            if not got:
                raise TrainingError(
                    f"project {uid}: the pool lock was not free within {POOL_LOCK_TIMEOUT_S:.0f}s"
                )
            path = self.pool_path(uid)
            pool = self._pools.get(uid)
            if pool is None or pool.labels != labels or pool.path != path:
                pool = self._pools[uid] = VerifiedPool(labels, path=path)
            else:
                pool.refresh()
            try:
                yield pool
            except BaseException:
                self._pools.pop(uid, None)
                raise
            self.state.put(uid, "pool_size", str(len(pool)))
            self.state.put(uid, "pool_growth", str(pool.growth_since_training()))


@lru_cache(maxsize=64)
def _parse(xml: str) -> ProjectConfig:
    return parse_label_config(xml)


ISOLATION = ("auto", "fork", "none")


def worker_class(queues: list[str], isolate: str = "auto") -> type[BaseWorker]:
    """rq's worker class for ``autoannotator worker`` on ``queues``.

    ``fork`` is rq's default: every job runs in a child process forked for it, so a job's memory
    goes back to the system when it ends and a crash in native code loses that job only — right
    for trainings, which hold gigabytes for minutes. ``none`` runs jobs in the worker's own process:
    its :class:`Context` outlives each job, so each project's verified pool stays in memory and an
    ingest reads only what other workers appended (:meth:`Context.pool`), where a forked job would
    start from an empty context and replay the whole log for every annotation. ``auto``: fork when
    the worker serves the ``train`` queue, else ``none``.
    """
    if isolate not in ISOLATION:
        raise AutoAnnotatorError(f"isolate must be one of {list(ISOLATION)}, got {isolate!r}")
    fork = isolate == "fork" or (isolate == "auto" and "train" in queues)
    return Worker if fork else SimpleWorker


_context: Context | None = None


def context() -> Context:
    """This process's context, built from the environment on first use (workers are long-lived)."""
    global _context
    if _context is None:
        _context = Context.from_settings(Settings.from_env())
    return _context


def use_context(ctx: Context | None) -> None:
    """Set (or with None, reset) the context jobs of this process use; for tests and the CLI."""
    global _context
    _context = ctx


# ---------------------------------------------------------------------------- enqueueing


def request_training(ctx: Context, uid: str, *, force: bool = False, reason: str = "") -> bool:
    """Queue one training for ``uid`` unless one is already queued or running; True if queued."""
    if not ctx.state.claim_training(uid):
        logger.info("project %s: training already queued or running (%s)", uid, reason or "requested")
        return False
    try:
        ctx.state.enqueue(
            "train",
            train_project,
            uid,
            force,
            job_timeout=TRAIN_JOB_TIMEOUT_S,
            description=f"train {uid}: {reason or 'requested'}",
            failure_ttl=7 * 24 * 3600,
        )
    except Exception:
        # No job carries the claim: give it back, or no training could be queued until its TTL.
        with contextlib.suppress(Exception):
            ctx.state.release_training(uid)
        raise
    logger.info("project %s: training queued (%s)", uid, reason or "requested")
    return True


def request_sync(ctx: Context, uid: str) -> bool:
    """Queue a rebuild of the pool from Label Studio, once per Redis lifetime; True if queued."""
    if not ctx.state.claim_sync(uid):
        return False
    try:
        ctx.state.enqueue("ingest", sync_project, uid, job_timeout=3600, description=f"sync {uid} from LS")
    except Exception:
        with contextlib.suppress(Exception):
            ctx.state.forget_sync(uid)  # the next request tries again
        raise
    return True


def _maybe_train(ctx: Context, uid: str, pool: VerifiedPool) -> None:
    registry = ctx.models.registry(uid)
    if registry.current() is None:
        waiting = None if ctx.settings.specialists else _seed_shortfall(ctx, pool)
        if waiting is None:
            request_training(ctx, uid, reason=f"first version: {len(pool)} verified labels")
        else:
            ctx.state.put(uid, "last_training", f"waiting for seed labels: {waiting}")
        return
    growth = pool.growth_since_training()
    if growth >= ctx.settings.retrain_every:
        request_training(ctx, uid, reason=f"pool grew by {growth} >= beta={ctx.settings.retrain_every}")


def _seed_shortfall(ctx: Context, pool: VerifiedPool) -> str | None:
    """What the cold start still waits for, or None when the pool is a usable seed set.

    ``AUTOANNOTATOR_SEED_LABELS`` counts every verified label; about a fifth is held out to judge
    later versions, and the rest must hold a couple of examples of every label.
    """
    need = ctx.settings.seed_labels
    if len(pool) < need:
        return f"{len(pool)} of {need} labels (AUTOANNOTATOR_SEED_LABELS)"
    items = pool.train_items()
    counts = {name: 0 for name in pool.labels.names}
    for it in items:
        counts[it.label] += 1
    short = sorted(name for name, n in counts.items() if n < MIN_SEED_PER_LABEL)
    if short:
        return f"at least {MIN_SEED_PER_LABEL} labels of each of {short}"
    return None


# ---------------------------------------------------------------------------- ingest


def ingest_annotation(uid: str, task: dict[str, Any], annotation: dict[str, Any]) -> str:
    """A human annotation from the webhook joins the pool (a human label overrides an LLM label)."""
    ctx = context()
    info = ctx.info(uid)
    config = ctx.config(info)
    text = extract_texts([task], config, max_chars=ctx.settings.max_text_chars)[0]
    if not text.ok:
        logger.warning("project %s: annotation of a task without usable text ignored: %s", uid, text.problem)
        return f"ignored: {text.problem}"
    if text.task_id is None:
        return "ignored: the task has no id"  # every id-less task would share the pool key task:None
    label = annotation_label(annotation, config)
    if label is None:
        return "ignored: cancelled or no choice for our control"
    with ctx.pool(uid, config.labels) as pool:
        changed = pool.add(f"task:{text.task_id}", text.text or "", label, Source.HUMAN)
        if changed:
            ctx.state.count(uid, human_labels=1)
        _maybe_train(ctx, uid, pool)
    return f"task {text.task_id}: {label} ({'new' if changed else 'unchanged'})"


def sync_project(uid: str) -> str:
    """Rebuild the pool from Label Studio: every task's latest human annotation, and LLM labels
    recorded in task data. Idempotent: labels already in the pool change nothing. A human label
    whose annotation is gone from LS (deleted) leaves the pool, and the task's LLM label, if any,
    takes its place."""
    ctx = context()
    info = ctx.info(uid)
    config = ctx.config(info)
    ls = ctx.label_studio(info)
    secure_webhooks(ctx, ls, info.project_id)
    human: list[tuple[str, str, str]] = []
    llm: list[tuple[str, str, str]] = []
    task: Any
    for task in ls.tasks.list(project=info.project_id, fields="all", page_size=500):
        data = dict(task.data or {})
        found = extract_texts([{"id": task.id, "data": data}], config, ctx.settings.max_text_chars)[0]
        if not found.ok:
            continue
        key = f"task:{task.id}"
        annotations = sorted(
            (a if isinstance(a, dict) else a.dict() for a in (task.annotations or [])),
            key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""),
        )
        labels = [lab for a in annotations if (lab := annotation_label(a, config)) is not None]
        if labels:
            human.append((key, found.text or "", labels[-1]))
        elif data.get(REVIEWED_BY) == "llm" and data.get(LLM_LABEL) in config.labels:
            llm.append((key, found.text or "", str(data[LLM_LABEL])))
    rebuilt = not ctx.pool_path(uid).exists()
    annotated = {key for key, _, _ in human}
    with ctx.pool(uid, config.labels) as pool:
        deleted = pool.remove(
            it.key for it in pool.items() if it.source is Source.HUMAN and it.key not in annotated
        )
        added = pool.add_many(llm, Source.LLM) + pool.add_many(human, Source.HUMAN)
        if rebuilt and ctx.models.registry(uid).current() is not None:
            # The log held the "trained up to" mark; without it every label would look new and
            # start a retraining on old data. Growth counts from the rebuild instead.
            pool.mark_trained()
        _maybe_train(ctx, uid, pool)
        size = len(pool)
    ctx.state.put(uid, "synced", "done")
    logger.info(
        "project %s: synced from Label Studio: %d human, %d LLM labels, %d changed, %d deleted",
        uid,
        len(human),
        len(llm),
        added,
        deleted,
    )
    return (
        f"{len(human)} human and {len(llm)} LLM labels read, {added} changed the pool, "
        f"{deleted} deleted annotations left it ({size} in all)"
    )


def secure_webhooks(ctx: Context, ls: LabelStudio, project_id: int) -> int:
    """Give the webhook LS created for our backend our basic-auth header; returns how many changed.

    LS creates ``<backend url>/webhook`` on connect *without* the ML backend's basic-auth
    credentials (it sends them on /setup, /predict and START_TRAINING, not on project events), so
    with basic auth on, every annotation event would be refused. Events refused before this runs
    are not lost: the sync that calls it reads every annotation from LS afterwards.
    """
    s = ctx.settings
    if not s.basic_auth_user:
        return 0
    token = base64.b64encode(f"{s.basic_auth_user}:{s.basic_auth_password}".encode()).decode()
    header = {"Authorization": f"Basic {token}"}
    ours = {b.url.rstrip("/") + "/webhook" for b in ls.ml.list(project=project_id) if b.url}
    changed = 0
    for hook in ls.webhooks.list(project=str(project_id)):
        if hook.url in ours and (hook.headers or {}) != header and hook.id is not None:
            ls.webhooks.update(id=hook.id, headers=header)
            changed += 1
    if changed:
        logger.info("project %s: basic auth added to %d webhook(s) of our backend", project_id, changed)
    return changed


# ---------------------------------------------------------------------------- review


def votes_text(votes: dict[str, int], confidence: float) -> str:
    """What the reviewer sees in the ``aa_votes`` column, e.g. ``bullish 2 · bearish 1 (0.58)``."""
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
    return " · ".join(f"{label} {n}" for label, n in ranked) + f" ({confidence:.2f})"


def review_routed(
    uid: str, version: str, mode: str, routed: list[dict[str, Any]], cleared: list[dict[str, Any]]
) -> str:
    """Act on the tasks one ``/predict`` routed to review (and un-flag ``cleared`` ones).

    Each routed entry: ``task_id``, ``data`` (the task's data as LS sent it), ``text``, ``label``
    (the ensemble's), ``confidence`` and ``votes`` (label -> members voting for it).
    """
    ctx = context()
    info = ctx.info(uid)
    config = ctx.config(info)
    ls = ctx.label_studio(info)
    _prepare_project(ctx, ls, uid, info, version)
    for entry in cleared:
        _patch_data(ls, entry, {NEEDS_REVIEW: False})
    if mode == "human" or not routed:
        for entry in routed:
            _patch_data(
                ls,
                entry,
                {
                    NEEDS_REVIEW: True,
                    VOTES: votes_text(entry["votes"], entry["confidence"]),
                    REVIEWED_BY: "human",
                },
            )
        ctx.state.count(uid, reviewed_human_queue=len(routed))
        return f"{len(routed)} tasks flagged for human review, {len(cleared)} cleared"
    if mode != "llm":
        return f"mode {mode}: nothing to review"
    reviewer = _llm_reviewer(ctx, uid, config.labels)
    before = reviewer.usage
    outcomes = reviewer.review([ReviewItem(str(e["task_id"]), e["text"]) for e in routed])
    usage = reviewer.usage
    ctx.state.count(
        uid,
        llm_calls=usage.calls - before.calls,
        llm_cache_hits=usage.cache_hits - before.cache_hits,
        llm_prompt_tokens=usage.prompt_tokens - before.prompt_tokens,
        llm_completion_tokens=usage.completion_tokens - before.completion_tokens,
        llm_cost_usd=usage.cost - before.cost,
    )
    labelled: list[tuple[str, str, str]] = []
    fallbacks = 0
    for entry, outcome in zip(routed, outcomes, strict=True):
        votes = votes_text(entry["votes"], entry["confidence"])
        if outcome.status is ReviewStatus.LABELLED and outcome.label is not None:
            _write_llm_prediction(ls, info.project_id, entry, config, outcome.label, version)
            _patch_data(
                ls, entry, {NEEDS_REVIEW: False, VOTES: votes, REVIEWED_BY: "llm", LLM_LABEL: outcome.label}
            )
            labelled.append((f"task:{entry['task_id']}", entry["text"], outcome.label))
        else:
            why = outcome.detail or f"answered {outcome.raw_answer!r:.60}"
            logger.warning(
                "project %s: task %s goes to the human queue: LLM %s (%s)",
                uid,
                entry["task_id"],
                outcome.status.value,
                why,
            )
            _patch_data(
                ls,
                entry,
                {NEEDS_REVIEW: True, VOTES: votes, REVIEWED_BY: f"human (LLM {outcome.status.value})"},
            )
            fallbacks += 1
    ctx.state.count(uid, reviewed_llm=len(labelled), llm_failures=fallbacks, reviewed_human_queue=fallbacks)
    if labelled:
        with ctx.pool(uid, config.labels) as pool:
            pool.add_many(labelled, Source.LLM)
            _maybe_train(ctx, uid, pool)
    return f"{len(labelled)} labelled by the LLM, {fallbacks} sent to the human queue"


def _llm_reviewer(ctx: Context, uid: str, labels: LabelSet) -> LLMReviewer:
    s = ctx.settings
    prices = PriceTable.default()
    configured = s.llm_prices()
    if configured is not None:
        prices = prices.with_price(s.llm_model, *configured)
    client = make_openai_client(s.llm_base_url, s.llm_api_key or None, s.llm_timeout_s)
    cache = ctx.review_cache(uid)
    return LLMReviewer(
        client,
        s.llm_model,
        labels,
        prices=prices,
        max_concurrency=s.llm_concurrency,
        timeout_s=s.llm_timeout_s,
        cache=cache,
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
        for _ in range(40):
            if align_model_version(ls, info.project_id, version):
                ctx.state.put(uid, "aligned", version)
                break
            time.sleep(0.25)


def _patch_data(ls: LabelStudio, entry: dict[str, Any], fields: dict[str, Any]) -> None:
    data = {**entry["data"], **fields}
    ls.tasks.update(id=str(entry["task_id"]), data=data)
    entry["data"] = data


def _write_llm_prediction(
    ls: LabelStudio, project_id: int, entry: dict[str, Any], config: ProjectConfig, label: str, version: str
) -> None:
    """Replace the ensemble's prediction of ``version`` on the task with the LLM's label.

    LS stores the ``/predict`` answer only after the response, and this job may start first, so
    wait a little for it; if it never appears (LS dropped it), create the prediction instead.
    """
    item = prediction(config, label, float(entry["confidence"]), version)
    for _ in range(40):
        existing = [p for p in ls.predictions.list(task=int(entry["task_id"])) if p.model_version == version]
        if existing:
            for extra in existing[1:]:
                ls.predictions.delete(id=int(extra.id))
            ls.predictions.update(id=int(existing[0].id), result=item["result"], score=item["score"])
            return
        time.sleep(0.25)
    ls.predictions.create(
        task=int(entry["task_id"]), result=item["result"], score=item["score"], model_version=version
    )


# ---------------------------------------------------------------------------- training


def train_project(uid: str, force: bool = False) -> str:
    """Build the first version or refine the served one; the old version serves until a better one
    is published, and a crash or a worse model leaves it serving."""
    ctx = context()
    try:
        with ctx.state.lock(
            "train", uid, timeout_s=TRAIN_HEARTBEAT_TTL_S, wait_s=0, keep_alive=("train_pending",)
        ) as got:
            if not got:
                return "another training of this project is running"
            outcome = _train(ctx, uid, force)
    finally:
        ctx.state.release_training(uid)
    info = ctx.info(uid)
    with ctx.pool(uid, ctx.config(info).labels) as pool:
        _maybe_train(ctx, uid, pool)  # labels that arrived while training may warrant another round
    return outcome


def _train(ctx: Context, uid: str, force: bool) -> str:
    info = ctx.info(uid)
    labels = ctx.config(info).labels
    registry = ctx.models.registry(uid)
    registry.discard_stale_stages()
    with ctx.pool(uid, labels) as pool:
        snapshot = VerifiedPool(labels, path=pool.path)
    mark = snapshot.last_seq
    snapshot.path = None  # a private copy: the trainer marks the shared log itself, under the lock
    if registry.current() is None and not ctx.settings.specialists:
        # "Start Training" before the seed is complete: nothing to train yet, and nothing failed.
        waiting = _seed_shortfall(ctx, snapshot)
        if waiting is not None:
            ctx.state.put(uid, "last_training", f"waiting for seed labels: {waiting}")
            return f"skipped: waiting for seed labels: {waiting}"
    try:
        if registry.current() is None:
            version = _first_version(ctx, uid, registry, snapshot, labels)
            ctx.state.count(uid, trainings_published=1)
            message = f"first version {version} published"
        else:
            result = refine(
                registry,
                snapshot,
                _refine_config(ctx.settings),
                labels=labels,
                policy=policy_from_spec(ctx.settings.policy),  # the gate judges what /predict serves
                force=force,
            )
            if not result.version:
                if not snapshot.new_train_items():
                    # Only held-out labels are new: count them as seen (they still judge the next
                    # version), or the growth stays >= beta and _maybe_train queues this again forever.
                    with ctx.pool(uid, labels) as pool:
                        pool.mark_trained(mark)
                return f"skipped: {result.reason}"
            ctx.state.count(uid, **{"trainings_published" if result.promoted else "trainings_rejected": 1})
            message = f"{result.version} {'published' if result.promoted else 'rejected'}: {result.reason}"
    except Exception as exc:
        ctx.state.count(uid, trainings_failed=1)
        ctx.state.put(uid, "last_training", f"failed: {exc}")
        raise
    with ctx.pool(uid, labels) as pool:
        pool.mark_trained(mark)
    served = registry.current()
    ctx.state.put(uid, "version", served or "")
    ctx.state.put(uid, "last_training", message)
    logger.info("project %s: %s", uid, message)
    if served is not None:
        try:  # the status page's accuracy/review curve; a failure here must not fail the training
            ensemble = registry.load(served, labels)
            write_holdout_tradeoff(registry.root, served, ensemble, snapshot.holdout_items(), labels)
        except Exception as exc:
            logger.warning("project %s: no held-out trade-off curve for %s: %s", uid, served, exc)
    return message


def _first_version(ctx: Context, uid: str, registry: Any, pool: VerifiedPool, labels: LabelSet) -> str:
    plan = _first_version_plan(ctx.settings)
    task = None
    if plan.source == "catalog":
        task = TaskDescription(*_task_description(ctx, uid, labels))
    elif plan.needs_seed:
        waiting = _seed_shortfall(ctx, pool)
        if waiting is not None:
            raise TrainingError(f"project {uid} cannot cold-start yet: waiting for {waiting}")
    items = pool.train_items() if plan.needs_seed else []
    built = build_first_version(
        registry,
        labels,
        plan,
        seed_texts=[it.text for it in items],
        seed_labels=[it.label for it in items],
        task=task,
        project=f"project {uid}",
    )
    return built.version


def _first_version_plan(s: Settings) -> FirstVersionPlan:
    """Where the settings say a project's first members come from."""
    top_k = s.catalog_top_k()
    return FirstVersionPlan(
        models=() if top_k is not None else s.specialists,
        catalog_top_k=top_k,
        catalog=Path(s.catalog) if s.catalog else None,
        cold_start=ColdStartConfig(
            encoder=s.encoder,
            kinds=s.cold_start_kinds,
            transformer_train=TrainConfig(learning_rate=s.cold_start_lr, epochs=s.cold_start_epochs),
        ),
        contrastive_pairs=s.cold_start_contrastive,
    )


def _refine_config(s: Settings) -> RefineConfig:
    """How the settings say a served version is retrained and judged."""
    return RefineConfig(
        beta=s.retrain_every,
        min_holdout=s.min_holdout,
        train=TrainConfig(learning_rate=s.refine_lr, epochs=s.refine_epochs),
    )


def _task_description(ctx: Context, uid: str, labels: LabelSet) -> tuple[str, str]:
    """What the project's annotators label, and where that came from, for Eq. 1."""
    if ctx.settings.task_description.strip():
        return ctx.settings.task_description.strip(), "AUTOANNOTATOR_TASK"
    try:
        info = ctx.info(uid)
        project = ctx.label_studio(info).projects.get(id=info.project_id)
        text = " ".join(str(x).strip() for x in (project.title, project.description) if x and str(x).strip())
        if text:
            return text, "the Label Studio project's title and description"
    except Exception as exc:  # Label Studio unreachable or no key: the label names still describe the task
        logger.warning("project %s: no task description from Label Studio (%s)", uid, exc)
    return f"Label each text as one of: {', '.join(labels.names)}.", "the label names"
