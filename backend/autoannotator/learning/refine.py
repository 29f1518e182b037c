"""Continual refinement: retrain every specialist on what reviewers verified, promote only what is not worse.

The paper fine-tunes each SLM on the hard pool once it holds β items and swaps it in unconditionally.
A product cannot trust that blindly (one careless annotator, one bad LLM prompt), so each attempt is
gated (:class:`~autoannotator.learning.gate.Gate`): the new ensemble and the served one are scored
on held-out verified items that no version ever trained on, with the routing policy the project
serves, and the new one is published only if it is not worse.

How a member retrains is its kind's and the ``strategy``'s (``RETRAIN_STRATEGIES``). Linear
members always refit from scratch on every verified training item, which costs seconds. Incremental
members (transformers, which can continue from their weights) either continue on the new items plus
a replay sample of older ones, so they do not forget (``continual``: the paper's way, the
cheapest), continue on every verified training item (``mix``), or start again from the encoder they
were first built on, with a new head, on every verified training item and the cold start's recipe
(``refit``: what a member would be had all labels been seeds; a member loaded as a ready classifier
has no such base and continues instead).

With self-training on (``RefineConfig.self_training``, :mod:`autoannotator.learning.pseudo`), every
member also trains on the served version's confident labels of unannotated texts, at a lower weight;
they never reach the pool, so the gate and the pruning judge on verified held-out labels alone.

Whatever happens, the served version is untouched until the new one is complete and has passed: see
:class:`~autoannotator.storage.registry.Registry`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from autoannotator.core.labels import LabelSet
from autoannotator.core.limits import MAX_TEXT_CHARS
from autoannotator.core.policies import Policy
from autoannotator.errors import TrainingError
from autoannotator.learning.gate import METRICS, Gate, Pruning
from autoannotator.learning.pool import VerifiedItem, VerifiedPool
from autoannotator.learning.pseudo import PseudoLabels, SelfTrainingConfig, pseudo_label
from autoannotator.learning.recipes import ColdStartConfig
from autoannotator.models.ensemble import Ensemble, write_manifest
from autoannotator.models.specialists.base import RETRAIN_STRATEGIES, Specialist, TrainConfig
from autoannotator.storage.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    """When to retrain, on what, and how a new version must compare to be served.

    ``beta``: pool growth that triggers training (the paper's β; the default is the backend's
    ``AUTOANNOTATOR_RETRAIN_EVERY``). ``replay_ratio``: older items per new item for incremental
    members. ``min_holdout``: below this many held-out items a comparison means nothing, so the new
    version is promoted unevaluated (and the reason says so).
    ``tolerance``: how much of ``metric`` a new version may lose and still be promoted;
    ``gate_alpha`` > 0: a larger loss still promotes unless the sign test calls it significant at
    that level (:class:`~autoannotator.learning.gate.Gate`). ``prune``:
    drop members whose removal raises the held-out ``metric`` (never below two members).
    ``strategy``: how incremental members retrain (``RETRAIN_STRATEGIES``); ``train`` is their
    recipe when they continue, ``refit_train`` (the cold start's) when they start again from their
    encoder. ``self_training``: pseudo-labels of unannotated texts (off unless its ``ratio`` is > 0).
    """

    beta: int = 100
    replay_ratio: float = 1.0
    strategy: str = "continual"
    refit_train: TrainConfig = field(default_factory=lambda: ColdStartConfig().transformer_train)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    min_holdout: int = 10
    tolerance: float = 0.0
    gate_alpha: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    metric: str = "accuracy"
    prune: bool = True

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1 item, got {self.beta}")
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio must be >= 0, got {self.replay_ratio}")
        if self.min_holdout < 0:
            raise ValueError(f"min_holdout must be >= 0, got {self.min_holdout}")
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"tolerance must be in [0, 1] (a share of the metric), got {self.tolerance}")
        if not 0 <= self.gate_alpha < 1:
            raise ValueError(f"gate_alpha must be in [0, 1) (0: any drop rejects), got {self.gate_alpha}")
        if not isinstance(self.train, TrainConfig) or not isinstance(self.refit_train, TrainConfig):
            raise ValueError("train and refit_train must be TrainConfig instances")
        if self.strategy not in RETRAIN_STRATEGIES:
            raise ValueError(f"strategy must be one of {list(RETRAIN_STRATEGIES)}, got {self.strategy!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")

    def gate(self, policy: Policy) -> Gate:
        """The promotion gate these settings describe, judging with the routing policy ``policy``."""
        return Gate(
            policy,
            metric=self.metric,
            tolerance=self.tolerance,
            min_holdout=self.min_holdout,
            alpha=self.gate_alpha,
        )


@dataclass(frozen=True)
class RefinementResult:
    """What one call to :func:`refine` did. ``version`` is the version built ("" when none was)."""

    promoted: bool
    version: str
    previous: str | None
    reason: str
    metrics_old: dict[str, float]
    metrics_new: dict[str, float]
    n_new: int
    n_replay: int
    n_holdout: int
    seconds: float
    member_seconds: dict[str, float]
    # Members dropped from the candidate because the vote was better without them (see Gate.prune).
    pruning: dict[str, Any] | None = None
    # How each member retrained: "continual", "mix" or "refit" (see RETRAIN_STRATEGIES).
    strategy: dict[str, str] = field(default_factory=dict)
    # Self-training: the threshold, how many pseudo-labels every member trained on, and why so many.
    self_training: dict[str, Any] | None = None

    @property
    def serving(self) -> str | None:
        """The version served after this call."""
        return self.version if self.promoted else self.previous


class _RejectedError(Exception):
    """Raised inside the staging block so that the rejected version's directory is removed."""


def should_train(pool: VerifiedPool, config: RefineConfig) -> bool:
    """Whether the pool grew by β since the last training (the paper's trigger)."""
    return pool.growth_since_training() >= config.beta


def _texts_labels(items: Sequence[VerifiedItem]) -> tuple[list[str], list[str]]:
    return [it.text for it in items], [it.label for it in items]


def _member_plan(
    member: Specialist,
    config: RefineConfig,
    continual: Sequence[VerifiedItem],
    everything: Sequence[VerifiedItem],
) -> tuple[Specialist, Sequence[VerifiedItem], TrainConfig, str]:
    """What ``member`` trains from, on which items, with which recipe, and the word for it.

    ``continual`` is the new items plus the replay sample; ``everything`` every verified training item.
    """
    if not member.incremental:
        return member, everything, config.train, "refit"
    if config.strategy == "mix":
        return member, everything, config.train, "mix"
    if config.strategy == "refit":
        restart = getattr(member, "from_base", None)
        fresh = restart(seed=config.refit_train.seed) if restart is not None else None
        if fresh is not None:
            return fresh, everything, config.refit_train, "refit"
        logger.info("%s was loaded as a ready classifier: it continues instead of refitting", member.name)
    return member, continual, config.train, "continual"


def refine(
    registry: Registry,
    pool: VerifiedPool,
    config: RefineConfig,
    *,
    labels: LabelSet,
    policy: Policy,
    weights: np.ndarray | None = None,
    force: bool = False,
    unlabelled: Sequence[str] = (),
    audit: Sequence[tuple[str, str]] = (),
) -> RefinementResult:
    """One refinement attempt: train every member into a staged version, evaluate, publish or reject.

    ``policy`` is the routing policy the project serves (and ``weights`` the member weights it
    serves with, if any, one per member of the served version): the gate judges both versions by
    the labels it would give. Without ``force`` nothing happens until the pool grew by β. A rejected
    version is deleted and the rejection recorded with both scores; a failure (raised as
    :class:`TrainingError` naming the member) deletes the half-built version. In both cases the
    served version stays as it was. ``unlabelled``: the project's unannotated texts, which
    self-training draws its pseudo-labels from (read only when ``config.self_training`` is on), and
    ``audit``: ``(text, label)`` items that fairly sample the project and that no version trained on
    (the audit's), which calibrate its threshold; without them the held-out items do.
    """
    started = time.perf_counter()
    gate = config.gate(policy)
    previous = registry.current()
    if previous is None:
        raise TrainingError(
            f"no version is served under {registry.root}; publish a cold-start ensemble before refining"
        )

    def skipped(reason: str) -> RefinementResult:
        logger.info("refinement skipped: %s", reason)
        seconds = time.perf_counter() - started
        return RefinementResult(
            False, "", previous, reason, {}, {}, 0, 0, len(pool.holdout_items()), seconds, {}
        )

    growth = pool.growth_since_training()
    if not force and growth < config.beta:
        return skipped(f"the pool grew by {growth} of beta={config.beta} items since the last training")
    mark = pool.last_seq
    new = pool.new_train_items()
    if not new:
        return skipped(
            f"no new verified training items since the last training ({growth} new held-out items)"
        )

    subdirs = registry.manifest(previous)["members"]
    old = registry.load(previous, labels)
    version = registry.next_version()
    replay = pool.replay_sample(
        round(config.replay_ratio * len(new)), rng_seed=config.train.seed + int(version[1:])
    )
    train_all, holdout = pool.train_items(), pool.holdout_items()
    n_replay = 0  # the replay sample counts once a member continued on it
    logger.info(
        "refining %s into %s (%s): %d new, %d replay, %d training, %d held-out items",
        previous,
        version,
        config.strategy,
        len(new),
        len(replay),
        len(train_all),
        len(holdout),
    )
    pseudo = PseudoLabels()
    if config.self_training.on:
        known = {it.text for it in pool.items()} | {text for text, _ in audit}
        candidates = [t for t in unlabelled if t.strip() and len(t) <= MAX_TEXT_CHARS and t not in known]
        pseudo = pseudo_label(
            old,
            policy,
            weights,
            list(audit) or [(it.text, it.label) for it in holdout],
            candidates,
            n_verified=len(train_all),
            config=config.self_training,
            labels=labels,
            seed=config.train.seed + int(version[1:]),
        )
        pseudo.report["calibrated_on"] = "audit" if audit else "held-out"
    member_seconds: dict[str, float] = {}
    member_strategy: dict[str, str] = {}
    metrics_old: dict[str, float] = {}
    metrics_new: dict[str, float] = {}
    pruned: list[Pruning] = []

    def result(promoted: bool, reason: str) -> RefinementResult:
        return RefinementResult(
            promoted,
            version,
            previous,
            reason,
            metrics_old,
            metrics_new,
            len(new),
            n_replay,
            len(holdout),
            time.perf_counter() - started,
            member_seconds,
            pruned[0].as_dict() if pruned else None,
            dict(member_strategy),
            pseudo.report if config.self_training.on else None,
        )

    def entry(res: RefinementResult, event: str) -> dict[str, Any]:
        return {
            **asdict(res),
            "event": event,
            "metric": config.metric,
            "policy": policy.name,
            "n_train": len(train_all),
        }

    try:
        with registry.stage(version) as tmp:
            fitted = []
            for sub, member in tqdm(
                list(zip(subdirs, old.members, strict=True)),
                desc=f"refine {version}",
                unit="member",
                leave=False,
            ):
                t0 = time.perf_counter()
                try:
                    start, items, recipe, how = _member_plan(member, config, [*new, *replay], train_all)
                    member_strategy[sub] = how
                    texts, ys = _texts_labels(items)
                    example_weights = None
                    if pseudo:
                        example_weights = [1.0] * len(texts) + [config.self_training.weight] * len(pseudo)
                        texts, ys = texts + pseudo.texts, ys + pseudo.labels
                    fitted.append(start.fit(texts, ys, tmp / sub, recipe, example_weights))
                except Exception as exc:
                    raise TrainingError(
                        f"member {member.name!r} ({sub}) of {previous} failed to train into {version}: {exc}"
                    ) from exc
                member_seconds[sub] = time.perf_counter() - t0
            if "continual" in member_strategy.values():
                n_replay = len(replay)
            members = list(subdirs)
            old_right = new_right = None
            if holdout:
                texts = [it.text for it in holdout]
                gold = np.asarray(labels.indices([it.label for it in holdout]))
                old_probs = old.predict_proba(texts)
                metrics_old.update(gate.score(old_probs, gold, weights))
                old_right = gate.right(old_probs, gold, weights)
                probs = Ensemble(fitted, labels, version=version).predict_proba(texts)
                kept = list(range(len(members)))
                if config.prune:
                    pruning = gate.prune(probs, gold, members, weights)
                    if pruning is not None:
                        pruned.append(pruning)
                        kept = [members.index(m) for m in pruning.kept]
                        for dropped in pruning.dropped:
                            shutil.rmtree(tmp / dropped)
                        members = list(pruning.kept)
                        logger.info("%s: %s", version, pruning.summary())
                kept_weights = None if weights is None else np.asarray(weights)[kept]
                metrics_new.update(gate.score(probs[kept], gold, kept_weights))
                new_right = gate.right(probs[kept], gold, kept_weights)
            promoted, reason = gate.verdict(len(holdout), metrics_old, metrics_new, old_right, new_right)
            if pruned:
                reason = f"{reason}; {pruned[0].summary()}"
            if not promoted:
                raise _RejectedError(reason)
            write_manifest(
                tmp,
                version=version,
                labels=labels,
                members=members,
                parent=previous,
                metrics={
                    "holdout": metrics_new,
                    "previous_holdout": metrics_old,
                    **({"pruning": pruned[0].as_dict()} if pruned else {}),
                },
                note=reason,
            )
    except _RejectedError as rejected:
        res = result(False, str(rejected))
        registry.record(entry(res, "rejected"))
        pool.mark_trained(mark)
        logger.warning("%s rejected; %s keeps serving: %s", version, previous, rejected)
        return res
    except Exception as exc:
        registry.record(entry(result(False, f"failed: {exc}"), "failed"))
        raise
    res = result(True, reason)
    registry.publish(version, entry(res, "publish"))
    pool.mark_trained(mark)
    return res
