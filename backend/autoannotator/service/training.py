"""Training a project: its first version (configured specialists, catalog selection or a cold
start from its first verified labels), then refinements, each judged before it is served.

Exactly one training runs per project at a time (a Redis lock kept alive while it runs). The old
version serves until a better one is published; a crash or a worse candidate leaves it serving.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from autoannotator.core.labels import LabelSet
from autoannotator.errors import TrainingError
from autoannotator.labelstudio.client import project_words
from autoannotator.labelstudio.tasks import unannotated_texts
from autoannotator.learning.audit import AuditLog
from autoannotator.learning.coldstart import ColdStartConfig
from autoannotator.learning.first_version import FirstVersionPlan, TaskDescription, build_first_version
from autoannotator.learning.pool import VerifiedPool
from autoannotator.learning.pseudo import SelfTrainingConfig
from autoannotator.learning.pseudo import summary as pseudo_summary
from autoannotator.learning.refine import RefineConfig, refine
from autoannotator.models.specialists.base import TrainConfig
from autoannotator.service.calibration import recalibrate
from autoannotator.service.context import Context
from autoannotator.service.ingest import maybe_train, seed_shortfall
from autoannotator.service.queueing import first_version_failed, first_version_succeeded, request_labelling
from autoannotator.service.routing import gate_policy, is_target
from autoannotator.service.status_plot import write_holdout_tradeoff
from autoannotator.settings import Settings

logger = logging.getLogger(__name__)

# Self-training reads at most this many of a project's unannotated tasks (the first, by id).
SELF_TRAINING_TEXTS = 20_000

# While a training runs, its lock and "pending" flag live this long and are renewed every third of
# it: a training killed mid-way (its finally never runs) blocks the next one for two minutes at most.
TRAIN_HEARTBEAT_TTL_S = 120.0


def train_project(ctx: Context, uid: str, force: bool = False) -> str:
    """Build the first version or refine the served one; the old version serves until a better one
    is published, and a crash or a worse model leaves it serving."""
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
        maybe_train(ctx, uid, pool)  # labels that arrived while training may warrant another round
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
        waiting = seed_shortfall(ctx, snapshot)
        if waiting is not None:
            ctx.state.put(uid, "last_training", f"waiting for seed labels: {waiting}")
            return f"skipped: waiting for seed labels: {waiting}"
    try:
        if registry.current() is None:
            version = _first_version(ctx, uid, registry, snapshot, labels)
            ctx.state.count(uid, trainings_published=1)
            message = f"first version {version} published"
            published = True
        else:
            result = refine(
                registry,
                snapshot,
                _refine_config(ctx.settings),
                labels=labels,
                # the gate judges what /predict serves (a target policy: see gate_policy)
                policy=gate_policy(ctx.routing.choice(uid)[0]),
                force=force,
                **(_self_training_inputs(ctx, uid, labels) if ctx.settings.self_training > 0 else {}),
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
            if result.self_training is not None:
                message += f"; {pseudo_summary(result.self_training)}"
            published = result.promoted
    except Exception as exc:
        ctx.state.count(uid, trainings_failed=1)
        ctx.state.put(uid, "last_training", f"failed: {exc}")
        if registry.current() is None:
            first_version_failed(ctx.state, uid)
        raise
    with ctx.pool(uid, labels) as pool:
        pool.mark_trained(mark)
    first_version_succeeded(ctx.state, uid)
    served = registry.current()
    ctx.state.put(uid, "version", served or "")
    ctx.state.put(uid, "last_training", message)
    logger.info("project %s: %s", uid, message)
    if served is not None:
        _after_training(ctx, uid, registry, served, snapshot, labels, published)
    return message


def _after_training(
    ctx: Context,
    uid: str,
    registry: Any,
    served: str,
    snapshot: VerifiedPool,
    labels: LabelSet,
    published: bool,
) -> None:
    """A published version labels the rest of the project (the loop turns without anyone asking),
    certified first under a target policy (or the run would send every task to review); the status
    page's accuracy/review curve is drawn. None of it may fail the training."""
    spec = ctx.routing.choice(uid)[0]
    if published and is_target(spec):
        try:
            logger.info("project %s: %s", uid, recalibrate(ctx, uid))
        except Exception as exc:  # it reviews everything until the next audit label recalibrates
            logger.warning("project %s: %s not calibrated for %s: %s", uid, spec, served, exc)
    if published:
        try:
            request_labelling(ctx, uid, f"{served} published")
        except Exception as exc:  # the version serves regardless; the next /setup starts the run
            logger.warning("project %s: labelling run of %s not queued: %s", uid, served, exc)
    try:
        ensemble = registry.load(served, labels, serving=True)
        write_holdout_tradeoff(
            registry.root, served, ensemble, snapshot.holdout_items(), labels, gate_policy(spec).name
        )
    except Exception as exc:
        logger.warning("project %s: no held-out trade-off curve for %s: %s", uid, served, exc)


def _first_version(ctx: Context, uid: str, registry: Any, pool: VerifiedPool, labels: LabelSet) -> str:
    plan = _first_version_plan(ctx.settings)
    task = None
    if plan.source == "catalog":
        task = TaskDescription(*_task_description(ctx, uid, labels))
    elif plan.needs_seed:
        waiting = seed_shortfall(ctx, pool)
        if waiting is not None:
            raise TrainingError(f"project {uid} cannot cold-start yet: waiting for {waiting}")
    items = pool.train_items() if plan.needs_seed else []
    unlabelled: list[str] = []
    if plan.needs_seed and plan.simcse_texts > 0:
        unlabelled = _project_texts(ctx, uid, pool, plan.simcse_texts)
    built = build_first_version(
        registry,
        labels,
        plan,
        seed_texts=[it.text for it in items],
        seed_labels=[it.label for it in items],
        task=task,
        project=f"project {uid}",
        unlabelled_texts=unlabelled,
    )
    return built.version


def _project_texts(ctx: Context, uid: str, pool: VerifiedPool, limit: int) -> list[str]:
    """The project's texts for the encoder's unsupervised adaptation: every verified item's (held-out
    ones too: their labels are not used) and its unannotated tasks', ``limit`` at most."""
    texts = [it.text for it in pool.items()] + _unannotated(ctx, uid, limit)
    logger.info("project %s: %d texts to adapt the encoder to before the cold start", uid, len(texts))
    return texts  # SimCSE samples at most `limit` of them


def _unannotated(ctx: Context, uid: str, limit: int) -> list[str]:
    """The texts of the project's first ``limit`` unannotated tasks, read from Label Studio."""
    info = ctx.info(uid)
    found, _ = unannotated_texts(
        ctx.label_studio(info),
        info.project_id,
        ctx.config(info),
        max_chars=ctx.settings.max_text_chars,
        limit=limit,
    )
    return [t.text or "" for t in found]


def _self_training_inputs(ctx: Context, uid: str, labels: LabelSet) -> dict[str, Any]:
    """What self-training reads, as :func:`refine`'s ``unlabelled`` and ``audit``: the unannotated
    texts it may pseudo-label (none when Label Studio cannot be reached: the retraining goes on with
    verified labels only) and the audit labels that calibrate its threshold."""
    try:
        unlabelled = _unannotated(ctx, uid, SELF_TRAINING_TEXTS)
    except Exception as exc:
        logger.warning("project %s: no unannotated texts for self-training: %s", uid, exc)
        unlabelled = []
    audit = [(r.text, r.gold) for r in AuditLog(ctx.audit_path(uid)).records() if r.gold in labels]
    return {"unlabelled": unlabelled, "audit": audit}


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
            embedding_layers=s.embedding_layers,
            transformer_train=TrainConfig(
                learning_rate=s.cold_start_lr, epochs=s.cold_start_epochs, frozen_layers=s.shared_layers
            ),
        ),
        contrastive_pairs=s.cold_start_contrastive,
        simcse_texts=s.cold_start_simcse,
    )


def _refine_config(s: Settings) -> RefineConfig:
    """How the settings say a served version is retrained and judged."""
    return RefineConfig(
        beta=s.retrain_every,
        min_holdout=s.min_holdout,
        gate_alpha=s.gate_alpha,
        train=TrainConfig(learning_rate=s.refine_lr, epochs=s.refine_epochs, frozen_layers=s.shared_layers),
        strategy=s.retrain_strategy,
        refit_train=TrainConfig(
            learning_rate=s.cold_start_lr, epochs=s.cold_start_epochs, frozen_layers=s.shared_layers
        ),
        self_training=SelfTrainingConfig(
            ratio=s.self_training, weight=s.pseudo_weight, precision=s.pseudo_precision
        ),
    )


def _task_description(ctx: Context, uid: str, labels: LabelSet) -> tuple[str, str]:
    """What the project's annotators label, and where that came from, for Eq. 1."""
    if ctx.settings.task_description.strip():
        return ctx.settings.task_description.strip(), "AUTOANNOTATOR_TASK"
    try:
        info = ctx.info(uid)
        text = project_words(ctx.label_studio(info), info.project_id)
        if text:
            return text, "the Label Studio project's title and description"
    except Exception as exc:  # Label Studio unreachable or no key: the label names still describe the task
        logger.warning("project %s: no task description from Label Studio (%s)", uid, exc)
    return f"Label each text as one of: {', '.join(labels.names)}.", "the label names"
