"""Training a project: its first version (configured specialists, catalog selection or a cold
start from its first verified labels), then refinements, each judged before it is served.

Exactly one training runs per project at a time (a Redis lock kept alive while it runs). The old
version serves until a better one is published; a crash or a worse candidate leaves it serving.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from autoannotator.core.labels import LabelSet
from autoannotator.errors import TrainingError
from autoannotator.labelstudio.client import project_words
from autoannotator.learning.adapt import ContrastiveConfig, contrastive_adapt
from autoannotator.learning.coldstart import ColdStartConfig, cold_start
from autoannotator.learning.pool import VerifiedPool
from autoannotator.learning.refine import RefineConfig, refine
from autoannotator.learning.selection import load_catalog, mean_pool_embedder, rank_candidates
from autoannotator.models.ensemble import write_manifest
from autoannotator.models.specialists import import_member
from autoannotator.service.context import Context
from autoannotator.service.ingest import maybe_train, seed_shortfall
from autoannotator.service.queueing import first_version_failed, first_version_succeeded
from autoannotator.service.status_plot import write_holdout_tradeoff

logger = logging.getLogger(__name__)

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
        else:
            result = refine(
                registry,
                snapshot,
                RefineConfig(beta=ctx.settings.retrain_every, min_holdout=ctx.settings.min_holdout),
                labels=labels,
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
        try:  # the status page's accuracy/review curve; a failure here must not fail the training
            ensemble = registry.load(served, labels)
            write_holdout_tradeoff(registry.root, served, ensemble, snapshot.holdout_items(), labels)
        except Exception as exc:
            logger.warning("project %s: no held-out trade-off curve for %s: %s", uid, served, exc)
    return message


def _first_version(ctx: Context, uid: str, registry: Any, pool: VerifiedPool, labels: LabelSet) -> str:
    s = ctx.settings
    version = registry.next_version()
    top_k = s.catalog_top_k()
    names: list[str]
    report: dict[str, Any]
    with registry.stage(version) as staged:
        if top_k is not None:
            names, report = _from_catalog(ctx, uid, labels, staged, top_k)
        elif s.specialists:
            names = []
            for i, source in enumerate(s.specialists):
                names.append(f"m{i}-{Path(source).name or 'model'}")
                import_member(source, labels, staged / names[-1])
            report = {"given_models": list(s.specialists)}
        else:
            items = pool.train_items()
            waiting = seed_shortfall(ctx, pool)
            if waiting is not None:
                raise TrainingError(f"project {uid} cannot cold-start yet: waiting for {waiting}")
            encoder = s.encoder
            contrastive = None
            if s.cold_start_contrastive > 0:
                # Outside the staged version (whose directory is renamed when published): the
                # embedding member refers to its encoder by path for as long as it serves.
                encoder_dir = registry.root / "encoders" / f"{version}-contrastive"
                shutil.rmtree(encoder_dir, ignore_errors=True)  # left by a failed attempt
                contrastive = contrastive_adapt(
                    [it.text for it in items],
                    [it.label for it in items],
                    encoder_dir,
                    base=s.encoder,
                    config=ContrastiveConfig(pairs_per_example=s.cold_start_contrastive),
                )
                encoder = str(encoder_dir.resolve())
            result = cold_start(
                [it.text for it in items],
                [it.label for it in items],
                labels,
                staged,
                ColdStartConfig(encoder=encoder, kinds=s.cold_start_kinds),
            )
            names = [m.name for m in result.members]
            report = result.report()
            if contrastive is not None:
                report["contrastive_encoder"] = contrastive
        write_manifest(
            staged,
            version=version,
            labels=labels,
            members=names,
            note="initial members",
            metrics={"start": report},
        )
    registry.publish(version, {"reason": "initial members", **report})
    return str(version)


def _from_catalog(
    ctx: Context, uid: str, labels: LabelSet, staged: Path, top_k: int
) -> tuple[list[str], dict[str, Any]]:
    """The paper's meta-controller: rank the catalog by Eq. 1 against the project's task, then import
    candidates best first until ``top_k`` of them load and map onto the project's labels.

    A candidate that cannot be used (a hub id without network, labels that do not map, a broken
    directory) is skipped with its reason in the version's report and the log; if none can be used,
    the training fails with every reason, and the project keeps waiting with that message on /status.
    """
    s = ctx.settings
    catalog = load_catalog(Path(s.catalog) if s.catalog else None)
    description, source = _task_description(ctx, uid, labels)
    ranked = rank_candidates(description, labels, catalog, mean_pool_embedder(), top_k=len(catalog))
    names: list[str] = []
    chosen: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for candidate in ranked:
        if len(names) == top_k:
            break
        entry = candidate.entry
        name = f"m{len(names)}-{Path(entry.id).name or 'model'}"
        try:
            import_member(entry.id, labels, staged / name)
        except Exception as exc:  # an outside model: any failure skips it, with the reason
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            logger.warning("project %s: catalog model %s skipped: %s", uid, entry.id, reason)
            skipped.append({"id": entry.id, "reason": reason})
            continue
        names.append(name)
        chosen.append({"id": entry.id, "rank": candidate.rank, "similarity": round(candidate.score, 4)})
    if not names:
        reasons = "; ".join(f"{x['id']}: {x['reason']}" for x in skipped)
        raise TrainingError(f"project {uid}: no catalog model could be used ({reasons})")
    logger.info(
        "project %s: %d specialists from the catalog for %r (from %s): %s",
        uid,
        len(names),
        description[:80],
        source,
        ", ".join(c["id"] for c in chosen),
    )
    report = {
        "catalog": s.catalog or "packaged",
        "task_description": description,
        "task_description_from": source,
        "catalog_models": chosen,
        "catalog_skipped": skipped,
    }
    return names, report


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
