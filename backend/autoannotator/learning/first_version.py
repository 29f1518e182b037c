"""A project's first version, built one way for the backend and for ``autoannotator simulate``.

Its members come from one of three places:

1. given models (hub ids or directories), imported in the order given;
2. the catalog (the paper's Eq. 1): candidates ranked against the task description, imported best
   first until ``catalog_top_k`` of them load and map onto the project's labels;
3. a cold start: one specialist of each configured kind trained on the seed labels, optionally on
   an encoder first reshaped by SetFit-style pairs of those labels.

Every member's directory is named by :func:`~autoannotator.storage.registry.member_name`, and the
version is built in the registry's staging directory and published there, so the registry's checks
apply to it as to any other version. Where the task description comes from (a setting, the Label
Studio project) is the caller's business: the builder takes it as text.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.errors import TrainingError
from autoannotator.learning.adapt import ContrastiveConfig, SimCSEConfig, contrastive_adapt, simcse_adapt
from autoannotator.learning.coldstart import ColdStartConfig, cold_start
from autoannotator.learning.selection import load_catalog, mean_pool_embedder, rank_candidates
from autoannotator.models.ensemble import write_manifest
from autoannotator.models.specialists import import_member
from autoannotator.models.specialists.encoder import concrete_encoder
from autoannotator.storage.registry import Registry, check_member_names, member_name

logger = logging.getLogger(__name__)

NOTE = "initial members"


@dataclass(frozen=True)
class FirstVersionPlan:
    """Where the first members come from: ``models``, else the catalog, else a cold start.

    ``catalog_top_k``: take the K best catalog models (``catalog``: a catalog file, None for the
    packaged one). ``contrastive_pairs`` > 0: before a cold start, reshape ``cold_start.encoder``
    with this many same-label and as many other-label pairs per seed label. ``simcse_texts`` > 0:
    first adapt it without labels to at most this many of the project's texts (``unlabelled_texts``
    of :func:`build_first_version`; unsupervised SimCSE), then the pairs, then the members.
    """

    models: tuple[str, ...] = ()
    catalog_top_k: int | None = None
    catalog: Path | None = None
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    contrastive_pairs: int = 0
    simcse_texts: int = 0

    def __post_init__(self) -> None:
        if self.models and self.catalog_top_k is not None:
            raise ValueError("give models or catalog_top_k, not both")
        if self.catalog_top_k is not None and self.catalog_top_k < 1:
            raise ValueError(f"catalog_top_k must be >= 1, got {self.catalog_top_k}")
        if self.contrastive_pairs < 0:
            raise ValueError(f"contrastive_pairs must be >= 0, got {self.contrastive_pairs}")
        if self.simcse_texts < 0:
            raise ValueError(f"simcse_texts must be >= 0, got {self.simcse_texts}")

    @property
    def source(self) -> str:
        """``models``, ``catalog`` or ``cold-start``: which of the three this plan uses."""
        if self.models:
            return "models"
        return "catalog" if self.catalog_top_k is not None else "cold-start"

    @property
    def needs_seed(self) -> bool:
        """Whether the build needs seed labels (only a cold start does)."""
        return self.source == "cold-start"


@dataclass(frozen=True)
class TaskDescription:
    """What the project's annotators label, for Eq. 1, and where that text came from."""

    text: str
    source: str


@dataclass(frozen=True)
class FirstVersion:
    """The published first version: its name, member sub-directories in vote order, and its report
    (also in the version's manifest under ``metrics.start`` and in the registry's history)."""

    version: str
    members: list[str]
    report: dict[str, Any]


def build_first_version(
    registry: Registry,
    labels: LabelSet,
    plan: FirstVersionPlan,
    *,
    seed_texts: Sequence[str] = (),
    seed_labels: Sequence[str] = (),
    task: TaskDescription | None = None,
    probe_texts: Sequence[str] | None = None,
    embedder: Callable[[list[str]], np.ndarray] | None = None,
    project: str = "",
    unlabelled_texts: Sequence[str] = (),
) -> FirstVersion:
    """Build the first version by ``plan``, publish it and return it.

    ``seed_texts``/``seed_labels`` train a cold start; ``task`` ranks the catalog (without one, the
    label names describe the task); ``probe_texts`` (unlabelled) measure how often cold-started
    members disagree; ``unlabelled_texts`` (the project's texts) adapt the encoder when
    ``plan.simcse_texts`` > 0; ``embedder`` ranks the catalog (default: the packaged MiniLM); ``project``
    names the project in logs and errors. Nothing is published if any step fails.
    """
    where = project or str(registry.root)
    if len(seed_texts) != len(seed_labels):
        raise ValueError(f"{len(seed_texts)} seed texts but {len(seed_labels)} seed labels")
    version = registry.next_version()
    with registry.stage(version) as staged:
        if plan.source == "models":
            names = _import_models(plan.models, labels, staged)
            report: dict[str, Any] = {"given_models": list(plan.models)}
        elif plan.source == "catalog":
            assert plan.catalog_top_k is not None
            names, report = _from_catalog(plan, labels, staged, task, embedder, where)
        else:
            names, report = _cold_start(
                registry,
                version,
                plan,
                labels,
                staged,
                seed_texts,
                seed_labels,
                probe_texts,
                unlabelled_texts,
            )
        check_member_names(names)
        report = {**report, "members": list(names)}
        write_manifest(
            staged, version=version, labels=labels, members=names, note=NOTE, metrics={"start": report}
        )
    registry.publish(version, {"reason": NOTE, **report})
    return FirstVersion(version, names, report)


def _import_models(models: Sequence[str], labels: LabelSet, staged: Path) -> list[str]:
    names = []
    for i, source in enumerate(models):
        names.append(member_name(i, source))
        import_member(source, labels, staged / names[-1])
    return names


def _from_catalog(
    plan: FirstVersionPlan,
    labels: LabelSet,
    staged: Path,
    task: TaskDescription | None,
    embedder: Callable[[list[str]], np.ndarray] | None,
    where: str,
) -> tuple[list[str], dict[str, Any]]:
    """The paper's meta-controller: rank the catalog by Eq. 1 against the task, then import
    candidates best first until ``catalog_top_k`` of them load and map onto the project's labels.

    A candidate that cannot be used (a hub id without network, labels that do not map, a broken
    directory) is skipped with its reason in the version's report and the log; if none can be used,
    the build fails with every reason.
    """
    assert plan.catalog_top_k is not None
    catalog = load_catalog(plan.catalog)
    if task is None or not task.text.strip():
        task = TaskDescription(f"Label each text as one of: {', '.join(labels.names)}.", "the label names")
    ranked = rank_candidates(task.text, labels, catalog, embedder or mean_pool_embedder(), top_k=len(catalog))
    names: list[str] = []
    chosen: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for candidate in ranked:
        if len(names) == plan.catalog_top_k:
            break
        entry = candidate.entry
        name = member_name(len(names), entry.id)
        try:
            import_member(entry.id, labels, staged / name)
        except Exception as exc:  # an outside model: any failure skips it, with the reason
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            logger.warning("%s: catalog model %s skipped: %s", where, entry.id, reason)
            skipped.append({"id": entry.id, "reason": reason})
            shutil.rmtree(staged / name, ignore_errors=True)  # whatever the failed import left
            continue
        names.append(name)
        chosen.append({"id": entry.id, "rank": candidate.rank, "similarity": round(candidate.score, 4)})
    if not names:
        reasons = "; ".join(f"{x['id']}: {x['reason']}" for x in skipped)
        raise TrainingError(f"{where}: no catalog model could be used ({reasons})")
    logger.info(
        "%s: %d specialists from the catalog for %r (from %s): %s",
        where,
        len(names),
        task.text[:80],
        task.source,
        ", ".join(c["id"] for c in chosen),
    )
    report = {
        "catalog": str(plan.catalog) if plan.catalog else "packaged",
        "task_description": task.text,
        "task_description_from": task.source,
        "catalog_models": chosen,
        "catalog_skipped": skipped,
    }
    return names, report


def _cold_start(
    registry: Registry,
    version: str,
    plan: FirstVersionPlan,
    labels: LabelSet,
    staged: Path,
    texts: Sequence[str],
    ys: Sequence[str],
    probe_texts: Sequence[str] | None,
    unlabelled_texts: Sequence[str] = (),
) -> tuple[list[str], dict[str, Any]]:
    # "auto" becomes a concrete encoder now, so the contrastive base and the members agree on it.
    config = replace(plan.cold_start, encoder=concrete_encoder(plan.cold_start.encoder))
    simcse = None
    if plan.simcse_texts > 0:
        if not unlabelled_texts:
            raise ValueError("simcse_texts > 0 needs the project's unlabelled texts")
        encoder_dir = registry.root / "encoders" / f"{version}-simcse"
        shutil.rmtree(encoder_dir, ignore_errors=True)  # left by a failed attempt
        simcse = simcse_adapt(
            list(unlabelled_texts),
            encoder_dir,
            base=config.encoder,
            config=SimCSEConfig(max_texts=plan.simcse_texts, seed=config.seed),
        )
        config = replace(config, encoder=str(encoder_dir.resolve()))
    contrastive = None
    if plan.contrastive_pairs > 0:
        # Outside the staged version (whose directory is renamed when published): the embedding
        # member refers to its encoder by path for as long as it serves.
        encoder_dir = registry.root / "encoders" / f"{version}-contrastive"
        shutil.rmtree(encoder_dir, ignore_errors=True)  # left by a failed attempt
        contrastive = contrastive_adapt(
            list(texts),
            list(ys),
            encoder_dir,
            base=config.encoder,
            config=ContrastiveConfig(pairs_per_example=plan.contrastive_pairs, seed=config.seed),
        )
        config = replace(config, encoder=str(encoder_dir.resolve()))
    result = cold_start(texts, ys, labels, staged, config, probe_texts=probe_texts)
    report = result.report()
    if simcse is not None:
        report["simcse_encoder"] = simcse
    if contrastive is not None:
        report["contrastive_encoder"] = contrastive
    return [m.name for m in result.members], report
