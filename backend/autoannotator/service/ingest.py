"""Verified labels in: a human annotation from the webhook, or the whole project from Label Studio.

Both end by asking whether the pool now warrants a training (:func:`maybe_train`): the first
version once the seed is complete, a refinement whenever the pool grew by β. The annotation of a
task drawn for the audit goes to the project's audit log instead, never to the pool
(:mod:`autoannotator.learning.audit` says why), and a target policy is certified again on it. So
does a calibration seed: with a target policy, a share of the annotations taken before the first
version exists (``AUTOANNOTATOR_CALIBRATION_SEEDS``), drawn by task, and every later edit of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from autoannotator.core.labels import LabelSet
from autoannotator.labelstudio.client import StoredLabel, basic_auth, read_labels, secure_webhooks
from autoannotator.labelstudio.config import annotation_label, extract_texts
from autoannotator.labelstudio.fields import AUDIT, LLM_LABEL, LLM_SEED, REVIEWED_BY, SEED, pool_key
from autoannotator.learning.audit import AuditLog, AuditMark, AuditRecord, drawn_for_calibration
from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.learning.recipes import ColdStartConfig
from autoannotator.service.context import Context
from autoannotator.service.queueing import request_calibration, request_training
from autoannotator.service.routing import is_target

logger = logging.getLogger(__name__)

MIN_SEED_PER_LABEL = ColdStartConfig.min_per_label


def ingest_annotation(ctx: Context, uid: str, task: dict[str, Any], annotation: dict[str, Any]) -> str:
    """A human annotation from the webhook joins the pool (a human label overrides an LLM label)."""
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
    data = task.get("data") or {}
    mark = AuditMark.parse(data.get(AUDIT))
    if mark is not None:
        record = audit_record(int(text.task_id), text.text or "", label, mark, data, config.labels)
        with ctx.pool(uid, config.labels) as pool:
            AuditLog(ctx.audit_path(uid)).add(record)
            pool.remove([pool_key(text.task_id)])  # no version may train on an audited task
        ctx.state.count(uid, audit_labels=1)
        _after_audit(ctx, uid)
        verdict = "confirmed" if record.correct else f"corrects {mark.label}"
        return f"task {text.task_id}: audit label {label} of {mark.version} ({verdict})"
    log = AuditLog(ctx.audit_path(uid))
    if int(text.task_id) in _seed_tasks(log) or (_draws_seeds(ctx, uid) and _drawn(ctx, text.task_id, data)):
        with ctx.pool(uid, config.labels) as pool:
            log.add(AuditRecord.seed(int(text.task_id), text.text or "", label))
            pool.remove([pool_key(text.task_id)])
        if ctx.models.registry(uid).current() is not None:
            _after_audit(ctx, uid)  # an edited seed: the served version's calibration changes
        return f"task {text.task_id}: calibration seed {label} (kept out of training to certify the target)"
    with ctx.pool(uid, config.labels) as pool:
        changed = pool.add(pool_key(text.task_id), text.text or "", label, Source.HUMAN)
        if changed:
            ctx.state.count(uid, human_labels=1)
        maybe_train(ctx, uid, pool)
    return f"task {text.task_id}: {label} ({'new' if changed else 'unchanged'})"


def audit_record(
    task_id: int, text: str, gold: str, mark: AuditMark, data: Mapping[str, Any], labels: LabelSet
) -> AuditRecord:
    """The audit label of a task, with what the audited version said and, if the LLM labelled the
    task, the LLM's label."""
    llm = data.get(LLM_LABEL) if data.get(REVIEWED_BY) == "llm" and data.get(LLM_LABEL) in labels else None
    return AuditRecord(task_id, text, gold, mark.version, mark.route, mark.label, llm)


def _seed_tasks(log: AuditLog) -> dict[int, AuditRecord]:
    """The calibration seeds the log holds, by task: once a seed, a task stays one."""
    return {r.task_id: r for r in log.records() if r.is_seed} if log.path.exists() else {}


def _draws_seeds(ctx: Context, uid: str) -> bool:
    """Whether new annotations may become calibration seeds: a target policy, and no version yet (a
    version's own predictions decide what people see from then on; the audit takes over)."""
    spec, _, _ = ctx.routing.choice(uid)
    return (
        is_target(spec) and ctx.settings.calibration_seeds > 0 and ctx.models.registry(uid).current() is None
    )


def _drawn(ctx: Context, task_id: int | str, data: Mapping[str, Any]) -> bool:
    """A seed annotation drawn for calibration; a task the "Seed" tab flagged (chosen by clustering,
    not at random) never is."""
    return data.get(SEED) != 1 and drawn_for_calibration(task_id, ctx.settings.calibration_seeds)


def _after_audit(ctx: Context, uid: str) -> None:
    """A target policy is certified again with the new audit labels."""
    spec, _, _ = ctx.routing.choice(uid)
    if is_target(spec):
        request_calibration(ctx, uid, "new audit labels")


def sync_project(ctx: Context, uid: str) -> str:
    """Rebuild the pool from Label Studio: every task's latest human annotation, and LLM labels
    recorded in task data. Idempotent: labels already in the pool change nothing. A human label
    whose annotation is gone from LS (deleted) leaves the pool, and the task's LLM label, if any,
    takes its place."""
    info = ctx.info(uid)
    config = ctx.config(info)
    ls = ctx.label_studio(info)
    s = ctx.settings
    if s.basic_auth_user:
        secure_webhooks(ls, info.project_id, basic_auth(s.basic_auth_user, s.basic_auth_password))
    human, llm = read_labels(ls, info.project_id, config, s.max_text_chars)
    audits = _audit_labels(ctx, uid, human, config.labels)
    human = [x for x in human if x.audit is None]
    llm = [x for x in llm if x.audit is None]
    rebuilt = not ctx.pool_path(uid).exists()
    annotated = {x.key for x in human}
    seeds = _calibration_seeds(ctx, uid, human)
    human = [x for x in human if x.key not in seeds]
    with ctx.pool(uid, config.labels) as pool:
        deleted = pool.remove(
            it.key for it in pool.items() if it.source is Source.HUMAN and it.key not in annotated
        )
        seeded = [(x.key, x.text, x.label) for x in llm if x.data.get(REVIEWED_BY) == LLM_SEED]
        reviewed = [(x.key, x.text, x.label) for x in llm if x.data.get(REVIEWED_BY) != LLM_SEED]
        added = pool.add_many(reviewed, Source.LLM) + pool.add_many(seeded, Source.LLM_SEED)
        added += pool.add_many([(x.key, x.text, x.label) for x in human], Source.HUMAN)
        if rebuilt and ctx.models.registry(uid).current() is not None:
            # The log held the "trained up to" mark; without it every label would look new and
            # start a retraining on old data. Growth counts from the rebuild instead.
            pool.mark_trained()
        pool.remove(key for key in audits | seeds if pool.get(key) is not None)
        maybe_train(ctx, uid, pool)
        size = len(pool)
    ctx.state.put(uid, "synced", "done")
    _after_audit(ctx, uid)  # after a Redis flush the web processes have no thresholds
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
        f"{deleted} deleted annotations left it ({size} in all); {len(audits)} audit labels, "
        f"{len(seeds)} calibration seeds"
    )


def _audit_labels(ctx: Context, uid: str, human: list[StoredLabel], labels: LabelSet) -> set[str]:
    """Record the audit labels the log lacks (annotations whose webhook was lost); their pool keys."""
    log = AuditLog(ctx.audit_path(uid))
    known = {(r.task_id, r.gold, r.version) for r in log.records()}
    keys = set()
    for x in human:
        mark = AuditMark.parse(x.audit)
        if mark is None:
            continue
        keys.add(x.key)
        record = audit_record(x.task_id, x.text, x.label, mark, x.data, labels)
        if (record.task_id, record.gold, record.version) not in known:
            log.add(record)
    return keys


def maybe_train(ctx: Context, uid: str, pool: VerifiedPool) -> None:
    """Queue the first version once the seed is complete, then a refinement every β new labels."""
    registry = ctx.models.registry(uid)
    if registry.current() is None:
        waiting = None if ctx.settings.specialists else seed_shortfall(ctx, pool)
        if waiting is None:
            request_training(ctx, uid, reason=f"first version: {len(pool)} verified labels")
        else:
            ctx.state.put(uid, "last_training", f"waiting for seed labels: {waiting}")
        return
    growth = pool.growth_since_training()
    if growth >= ctx.settings.retrain_every:
        request_training(ctx, uid, reason=f"pool grew by {growth} >= beta={ctx.settings.retrain_every}")


def seed_shortfall(ctx: Context, pool: VerifiedPool) -> str | None:
    """What the cold start still waits for, or None when the pool is a usable seed set.

    ``AUTOANNOTATOR_SEED_LABELS`` counts every verified label; about a fifth is held out to judge
    later versions, and the rest must hold a couple of examples of every label. A pool the LLM
    seeded (``AUTOANNOTATOR_LLM_SEEDS``) needs no more labels than the LLM gave.
    """
    need = ctx.settings.seed_labels
    llm_seeds = sum(1 for it in pool.items() if it.source is Source.LLM_SEED)
    if llm_seeds:
        need = min(need, llm_seeds)
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


def _calibration_seeds(ctx: Context, uid: str, human: list[StoredLabel]) -> set[str]:
    """Record the calibration seeds among the human labels that the log lacks or holds with another
    label (a webhook lost, an annotation edited); their pool keys."""
    log = AuditLog(ctx.audit_path(uid))
    known = _seed_tasks(log)
    drawing = _draws_seeds(ctx, uid)
    keys = set()
    for x in human:
        if x.task_id in known or (drawing and _drawn(ctx, x.task_id, x.data)):
            keys.add(x.key)
            if x.task_id not in known or known[x.task_id].gold != x.label:
                log.add(AuditRecord.seed(x.task_id, x.text, x.label))
    return keys
