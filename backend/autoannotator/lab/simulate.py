"""``autoannotator simulate``: the paper's protocol on any labelled JSONL, measured against gold.

1. Cold start: k different specialists on N seed labels from one file (or load given models).
2. Stream another file through the engine in chunks: every member labels every item, a routing
   policy accepts the vote or sends the item to review (oracle = simulated human, a noisy oracle,
   or a real LLM through any OpenAI-compatible API; items the LLM cannot label go to a human).
3. Verified labels join the pool; when it has grown by β, the members are fine-tuned, a member that
   pulls the vote down on held-out verified items (by a sign test at 5%) is dropped, and the new
   version is promoted only if not worse on those items: the backend's first-version builder and
   promotion gate, judging with the run's routing policy.
4. Report: final-label accuracy and macro-F1, share reviewed, human labels, LLM usage and cost,
   time per stage, accuracy per retraining cycle, and baselines from the same run (each cold-start
   specialist alone, their plain majority vote, the LLM alone when one is configured).

The target-accuracy policy (``target:0.95``) and the audit: a share of the seed labels is kept out of
the cold start, and every streamed item is drawn into the audit with probability ``audit_share``,
whatever its route; a person labels it. These labels are a fair sample of the stream and no version
trains on them, so they are what the policy certifies its thresholds on, chunk by chunk, for the
version serving; the labels of routed items are not (the router chose them for being hard). The
report's ``guarantee`` section sets the accuracy of what was auto-accepted, against gold, beside the
target, the audit's estimate of it and the share an oracle would have reviewed for the same target.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from autoannotator.core.consensus import consensus, member_weights
from autoannotator.core.guarantee import (
    Certificate,
    accuracy_interval,
    oracle_review_share,
    oracle_review_share_per_class,
)
from autoannotator.core.labels import LabelSet
from autoannotator.core.metrics import accuracy, macro_f1, tradeoff
from autoannotator.core.policies import Decision, Policy, TargetAccuracy
from autoannotator.errors import BadInputError
from autoannotator.learning.coldstart import ColdStartConfig
from autoannotator.learning.datasets import Example, read_jsonl
from autoannotator.learning.first_version import FirstVersionPlan, build_first_version
from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.learning.pseudo import SelfTrainingConfig
from autoannotator.learning.refine import RefineConfig, refine
from autoannotator.models.ensemble import Ensemble
from autoannotator.models.specialists import TrainConfig
from autoannotator.models.specialists.base import RETRAIN_STRATEGIES
from autoannotator.models.specialists.encoder import concrete_encoder
from autoannotator.review.base import Reviewer, ReviewItem, ReviewStatus
from autoannotator.storage.registry import Registry

logger = logging.getLogger(__name__)

SEED_CHOICES = ("random", "clusters")


@dataclass(frozen=True)
class SimulationConfig:
    seed_file: Path
    stream_file: Path
    out_dir: Path
    n_seed: int = 500
    chunk_size: int = 100
    beta: int = 150
    retrain: bool = True
    models: tuple[str, ...] = ()
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    # > 0: before the cold start, reshape the encoder with this many SetFit-style pairs per seed
    # label (autoannotator.learning.adapt.contrastive_adapt); only the seed labels are used.
    contrastive_pairs: int = 0
    # > 0: before the cold start (and the pairs), adapt the encoder without labels to at most this
    # many texts of the seed and stream files, the project's own texts (unsupervised SimCSE).
    simcse_texts: int = 0
    refine_train: TrainConfig = field(default_factory=TrainConfig)
    # How the fine-tuned members retrain: continue on new items and a replay sample, continue on all
    # verified items, or refit from their encoder on all of them (RETRAIN_STRATEGIES, learning.refine).
    retrain_strategy: str = "continual"
    # > 0: a retrained version that is worse on the held-out items is still promoted unless the sign
    # test calls the drop significant at this level (learning.gate.Gate.alpha); 0 is the paper's rule.
    gate_alpha: float = 0.0
    # Self-training (learning.pseudo): the served version's confident labels of texts nobody labelled
    # (the seed file's unchosen ones and the stream's unreviewed, unaudited ones) join each retraining.
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    holdout_fraction: float = 0.2
    # Share of the seed labels kept out of the cold start to calibrate the target policy with.
    calibration_seeds: float = 0.0
    # Chance that a streamed item is drawn into the audit (a person labels it, no version trains on it).
    audit_share: float = 0.0
    # With a target policy and a person reviewing: the audit's share while the served version has no
    # certified label (everything is reviewed then, so the larger draw costs no extra label).
    audit_uncertified: float = 0.0
    # With a target policy and a person reviewing: items reviewed because the served version had not
    # certified their predicted label calibrate that version too (never a later one: it trains on them).
    calibrate_on_reviews: bool = False
    # The paper's fully automatic start: the seed items are chosen to cover the seed file (one per
    # k-means cluster of the frozen encoder's embeddings) and labelled by the reviewer (standing in
    # for the LLM) instead of by people.
    llm_seeds: bool = False
    # How the seed items are drawn from the seed file: "random" (Label Studio's order standing for a
    # random draw) or "clusters" (one nearest each k-means centre of the frozen encoder's embeddings,
    # as the fully automatic start chooses them; people still label them). llm_seeds implies clusters.
    seed_choice: str = "random"
    max_stream: int | None = None
    labels: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_seed < 1:
            raise ValueError("n_seed must be >= 1")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.beta < 1:
            raise ValueError("beta must be >= 1")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if self.contrastive_pairs < 0:
            raise ValueError("contrastive_pairs must be >= 0")
        if self.simcse_texts < 0:
            raise ValueError("simcse_texts must be >= 0")
        if not 0 <= self.calibration_seeds < 1:
            raise ValueError("calibration_seeds must be in [0, 1)")
        if not 0 <= self.audit_share <= 1:
            raise ValueError("audit_share must be in [0, 1]")
        if not 0 <= self.audit_uncertified <= 1:
            raise ValueError("audit_uncertified must be in [0, 1]")
        if not 0 <= self.gate_alpha < 1:
            raise ValueError("gate_alpha must be in [0, 1)")
        if self.retrain_strategy not in RETRAIN_STRATEGIES:
            raise ValueError(
                f"retrain_strategy must be one of {RETRAIN_STRATEGIES}, got {self.retrain_strategy!r}"
            )
        if self.seed_choice not in SEED_CHOICES:
            raise ValueError(f"seed_choice must be one of {SEED_CHOICES}, got {self.seed_choice!r}")

    @property
    def covering_seeds(self) -> bool:
        return self.llm_seeds or self.seed_choice == "clusters"


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 3)


def _label_set(config: SimulationConfig, seed: Sequence[Example], stream: Sequence[Example]) -> LabelSet:
    if config.labels:
        labels = LabelSet.of(config.labels)
    else:
        labels = LabelSet.of(sorted({e.label for e in seed} | {e.label for e in stream}))
    stray = sorted({e.label for e in [*seed, *stream]} - set(labels.names))
    if stray:
        raise BadInputError(f"the data hold labels {stray!r} outside the label set {list(labels.names)!r}")
    return labels


def _covering_seed(
    examples: Sequence[Example], n: int, config: SimulationConfig, exclude: set[str]
) -> list[Example]:
    """``n`` seed items that cover ``examples``: one nearest each k-means centre of the frozen
    encoder's embeddings (of a random 20,000 at most), as the service's LLM-seeded start chooses."""
    from autoannotator.learning.seeds import MAX_CLUSTERED, choose_seeds
    from autoannotator.models.specialists.encoder import Encoder, resolve_model_source

    candidates = [e for e in examples if e.key not in exclude]
    if len(candidates) > MAX_CLUSTERED:
        candidates = random.Random(config.seed).sample(candidates, MAX_CLUSTERED)
    encoder = Encoder.shared(resolve_model_source(config.cold_start.encoder))
    vectors = encoder.embed([e.text for e in candidates])
    return [candidates[i] for i in choose_seeds(vectors, n, seed=config.seed)]


def _label_seed(
    seed: Sequence[Example], reviewer: Reviewer, human: bool
) -> tuple[list[Example], dict[str, Any]]:
    """The seed items as the reviewer labels them (those it cannot label are dropped), and how
    often its labels matched the gold ones."""
    outcomes = reviewer.review([ReviewItem(e.key, e.text) for e in seed])
    labelled = [
        Example(e.key, e.text, o.label)
        for e, o in zip(seed, outcomes, strict=True)
        if o.status is ReviewStatus.LABELLED and o.label is not None
    ]
    gold = {e.key: e.label for e in seed}
    right = sum(x.label == gold[x.key] for x in labelled)
    report = {
        "chosen": "clusters",
        "labelled_by": "people" if human else "the reviewer (standing in for the LLM)",
        "n": len(labelled),
        "asked": len(seed),
        "label_accuracy": round(right / len(labelled), 4) if labelled else None,
    }
    return labelled, report


def _sample_seed(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    if n > len(examples):
        raise BadInputError(f"asked for {n} seed labels but the seed file holds only {len(examples)}")
    return random.Random(seed).sample(list(examples), n)


@dataclass
class ReviewSetup:
    """Who reviews. ``reviewer`` reviews routed items; items it leaves unlabelled (an LLM's off-label
    answer, a failure) are labelled by the gold "human". ``baseline`` (the LLM, when configured) labels
    the whole stream once for the LLM-only baseline. ``usage`` returns the LLM's counters. ``human``
    says whether the reviewer stands for a person (the oracle: its labels count as human labels and
    override LLM labels in the pool) or for a machine (an LLM, a noisy oracle)."""

    reviewer: Reviewer
    human: bool = False
    baseline: Reviewer | None = None
    usage: Callable[[], dict[str, Any]] | None = None


@dataclass
class CalibrationSet:
    """Labels that represent the stream and that no version was trained on: the seeds kept out of
    the cold start (Label Studio's order stands for a random draw) and the audit's. Each version's
    probabilities on them are computed once and extended as the audit grows."""

    texts: list[str] = field(default_factory=list)
    gold: list[int] = field(default_factory=list)
    _probs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # --calibrate-on-reviews: items a person reviewed because the served version had not certified
    # their predicted label (every such item is reviewed, so they are a uniform sample of that
    # label's predictions), with that version's probabilities; only that version calibrates on them.
    _own: dict[str, tuple[list[np.ndarray], list[int]]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def add_own(self, version: str, probs: np.ndarray, gold: int) -> None:
        """One reviewed item of ``version``'s uncertified labels: its ``[k, L]`` probabilities."""
        if version not in self._own:
            self._own = {version: ([], [])}  # older versions serve no more
        rows, labels = self._own[version]
        rows.append(probs)
        labels.append(gold)

    def own(self, version: str) -> int:
        return len(self._own.get(version, ((), ()))[1])

    def everything(self, ensemble: Ensemble) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``[k, n, L]`` and gold labels of every item that may calibrate ``ensemble``."""
        probs, gold = self.probs(ensemble), np.asarray(self.gold, dtype=np.int64)
        rows, labels = self._own.get(ensemble.version, ([], []))
        if rows:
            probs = np.concatenate([probs, np.stack(rows, axis=1)], axis=1)
            gold = np.concatenate([gold, np.asarray(labels, dtype=np.int64)])
        return probs, gold

    def add(self, text: str, gold: int) -> None:
        self.texts.append(text)
        self.gold.append(gold)

    def probs(self, ensemble: Ensemble) -> np.ndarray:
        have = self._probs.get(ensemble.version)
        done = 0 if have is None else have.shape[1]
        if done < len(self.texts):
            new = ensemble.predict_proba(self.texts[done:])
            have = new if have is None else np.concatenate([have, new], axis=1)
            self._probs = {ensemble.version: have}  # older versions serve no more
        assert have is not None
        return have


def _route(
    policy: Policy,
    ensemble: Ensemble,
    probs: np.ndarray,
    weights: np.ndarray | None,
    calibration: CalibrationSet,
) -> tuple[Decision, list[Certificate]]:
    """The policy's decision on a chunk; a target policy is first calibrated on what there is."""
    if not isinstance(policy, TargetAccuracy):
        return policy.decide(probs, weights), []
    if not len(calibration) and not calibration.own(ensemble.version):
        return policy.decide(probs), []
    active, certs = policy.calibrated(*calibration.everything(ensemble))
    return active.decide(probs), certs


def _audit_rate(config: SimulationConfig, policy: Policy, certs: Sequence[Certificate], human: bool) -> float:
    """The chance that an item of this chunk is audited. It depends only on what was certified before
    the chunk, never on its items, so the audit stays a uniform sample of the stream. While a target
    policy has certified no label, every item goes to review; with a person reviewing, a larger draw
    then costs no label, only labels the next version would have trained on."""
    if isinstance(policy, TargetAccuracy) and human and not any(c.certified for c in certs):
        return max(config.audit_share, config.audit_uncertified)
    return config.audit_share


def run_simulation(
    config: SimulationConfig,
    policy: Policy,
    make_review: Callable[[dict[str, str], LabelSet], ReviewSetup],
) -> dict[str, Any]:
    """Run the protocol and return the report (also written to ``out_dir/report.json``).

    ``make_review(gold, labels)`` builds the reviewers once the data and label set are known (an
    oracle needs the gold labels by item key).
    """
    timer = StageTimer()
    started_all = time.perf_counter()
    skipped: dict[str, list[int]] = {"seed_file": [], "stream_file": []}
    seed_all = read_jsonl(config.seed_file, skipped=skipped["seed_file"])
    stream = read_jsonl(config.stream_file, skipped=skipped["stream_file"])
    for which, lines in skipped.items():
        if lines:
            logger.warning("%s: %d lines without text left out (no prediction)", which, len(lines))
    if config.max_stream:
        stream = stream[: config.max_stream]
    labels = _label_set(config, seed_all, stream)
    seed = _sample_seed(seed_all, config.n_seed, config.seed)
    calibration = CalibrationSet()
    n_calibration = round(config.calibration_seeds * len(seed))
    for e in seed[len(seed) - n_calibration :]:
        calibration.add(e.text, labels.index(e.label))
    calibration_keys = {e.key for e in seed[len(seed) - n_calibration :]}
    seed = seed[: len(seed) - n_calibration]
    gold = {e.key: e.label for e in stream}
    if config.covering_seeds:
        t = time.perf_counter()
        seed = _covering_seed(seed_all, len(seed), config, exclude=calibration_keys)
        gold.update((e.key, e.label) for e in seed)
        timer.add("seed_choice", t)
    review = make_review(gold, labels)
    reviewer = review.reviewer
    seed_report: dict[str, Any] = {
        "chosen": "clusters" if config.covering_seeds else "random",
        "labelled_by": "people",
        "n": len(seed),
    }
    seed_source = Source.SEED
    if config.llm_seeds:
        seed, seed_report = _label_seed(seed, reviewer, review.human)
        seed_source = Source.SEED if review.human else Source.LLM_SEED
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(out_dir / "models")
    pool = VerifiedPool(labels, holdout_fraction=config.holdout_fraction, seed=config.seed)

    t = time.perf_counter()
    plan = FirstVersionPlan(
        models=config.models,
        cold_start=config.cold_start,
        contrastive_pairs=config.contrastive_pairs,
        simcse_texts=config.simcse_texts,
    )
    first = build_first_version(
        registry,
        labels,
        plan,
        seed_texts=[e.text for e in seed],
        seed_labels=[e.label for e in seed],
        probe_texts=[e.text for e in stream[: config.chunk_size * 3]],
        unlabelled_texts=[e.text for e in [*seed_all, *stream]] if config.simcse_texts else (),
    )
    start_report = {**first.report, "seed_set": seed_report}
    ensemble = registry.load(first.version, labels)
    timer.add("cold_start", t)
    pool.add_many([(f"seed:{i}", e.text, e.label) for i, e in enumerate(seed)], seed_source)
    chosen = {e.key for e in seed} | calibration_keys
    unchosen = [e.text for e in seed_all if e.key not in chosen]  # nobody labels these
    pool.mark_trained()
    initial = ensemble

    n, k = len(stream), ensemble.k
    final = np.full(n, -1)
    routed = np.zeros(n, dtype=bool)
    by_human = np.zeros(n, dtype=bool)
    by_reviewer = np.zeros(n, dtype=bool)
    served_by: list[str] = [""] * n
    initial_probs = np.zeros((k, n, len(labels)))
    gold_idx = np.asarray(labels.indices([e.label for e in stream]))
    cycles: list[dict[str, Any]] = []
    weights: np.ndarray | None = None
    served_pred = np.full(n, -1)  # the ensemble's own label, whatever the route
    served_conf = np.zeros(n)
    audited = np.zeros(n, dtype=bool)
    reviewer_right = np.zeros(n, dtype=bool)  # on audited routed items: did the reviewer agree with people
    audit_rng = np.random.default_rng(config.seed + 1)
    certificates: list[dict[str, Any]] = []

    bar = tqdm(total=n, desc="stream", unit="item")
    for start in range(0, n, config.chunk_size):
        chunk = stream[start : start + config.chunk_size]
        idx = np.arange(start, start + len(chunk))
        texts = [e.text for e in chunk]
        t = time.perf_counter()
        probs = ensemble.predict_proba(texts)
        decision, certs = _route(policy, ensemble, probs, weights, calibration)
        timer.add("predict_and_route", t)
        if certs:
            calibrating = len(calibration) + calibration.own(ensemble.version)
            certificates.append(_certificates_summary(int(start), ensemble.version, calibrating, certs))
        served_pred[idx] = decision.labels
        served_conf[idx] = decision.confidence
        audited[idx] = audit_rng.random(len(chunk)) < _audit_rate(config, policy, certs, review.human)
        if ensemble is initial:
            initial_probs[:, idx] = probs
        else:  # the baselines are the cold-start members', whatever serves now
            t = time.perf_counter()
            initial_probs[:, idx] = initial.predict_proba(texts)
            timer.add("baseline_predict", t)
        final[idx] = decision.labels
        routed[idx] = decision.review
        for i in idx:
            served_by[i] = ensemble.version

        to_review = [chunk[j] for j in np.flatnonzero(decision.review)]
        t = time.perf_counter()
        outcomes = reviewer.review([ReviewItem(e.key, e.text) for e in to_review])
        timer.add("review", t)
        verified: dict[Source, list[tuple[str, str, str]]] = {}
        reviewer_source = Source.ORACLE if review.human else Source.LLM
        for e, outcome, j in zip(to_review, outcomes, np.flatnonzero(decision.review).tolist(), strict=True):
            i = start + j
            if outcome.status is ReviewStatus.LABELLED and outcome.label is not None:
                final[i] = labels.index(outcome.label)
                by_reviewer[i] = True
                reviewer_right[i] = outcome.label == gold[e.key]
                if not audited[i]:
                    verified.setdefault(reviewer_source, []).append((e.key, e.text, outcome.label))
            else:
                final[i] = labels.index(gold[e.key])
                by_human[i] = True
                if not audited[i]:
                    verified.setdefault(Source.HUMAN, []).append((e.key, e.text, gold[e.key]))
        for source, rows in verified.items():
            pool.add_many(rows, source)
        if config.calibrate_on_reviews and isinstance(policy, TargetAccuracy) and review.human:
            uncertified = {j for j in range(len(labels)) if not certs or not certs[j].certified}
            for j in np.flatnonzero(decision.review).tolist():
                i = start + j
                if not audited[i] and int(decision.labels[j]) in uncertified:
                    calibration.add_own(ensemble.version, probs[:, j], int(final[i]))
        # The audit: a person labels every drawn item; the label is final, joins the calibration
        # set and never the training pool.
        for i in idx[audited[idx]]:
            final[i] = gold_idx[i]
            calibration.add(stream[i].text, int(gold_idx[i]))
        bar.update(len(chunk))

        if config.retrain and pool.growth_since_training() >= config.beta:
            t = time.perf_counter()
            result = refine(
                registry,
                pool,
                RefineConfig(
                    beta=config.beta,
                    train=config.refine_train,
                    strategy=config.retrain_strategy,
                    gate_alpha=config.gate_alpha,
                    refit_train=config.cold_start.transformer_train,
                    self_training=config.self_training,
                ),
                labels=labels,
                policy=policy,
                weights=weights,
                **(
                    _self_training_inputs(unchosen, stream, audited, calibration, labels)
                    if config.self_training.on
                    else {}
                ),
            )
            timer.add("retrain", t)
            cycles.append({"after_items": int(idx[-1] + 1), **_result_summary(result)})
            if result.promoted:
                ensemble = registry.load(result.version, labels)
            # Members' accuracy on held-out verified items; only weight-aware policies read it.
            weights = _holdout_weights(ensemble, pool, labels)
            cycles[-1]["member_weights"] = None if weights is None else [round(float(w), 4) for w in weights]
    bar.close()

    report = _report(
        config=config,
        guarantee=_guarantee_report(
            policy=policy,
            n_labels=len(labels),
            gold_idx=gold_idx,
            served_pred=served_pred,
            served_conf=served_conf,
            routed=routed,
            audited=audited,
            by_reviewer=by_reviewer,
            reviewer_right=reviewer_right,
            served_by=served_by,
            n_calibration_seeds=n_calibration,
            certificates=certificates,
            human_reviewer=review.human,
        ),
        policy=policy,
        reviewer=reviewer,
        labels=labels,
        stream=stream,
        gold_idx=gold_idx,
        final=final,
        routed=routed,
        by_human=by_human,
        by_reviewer=by_reviewer,
        served_by=served_by,
        initial=initial,
        initial_probs=initial_probs,
        cycles=cycles,
        start_report=start_report,
        timer=timer,
        # Human labels: the seed's unless the reviewer (an LLM) labelled it, and the calibration's.
        n_seed=(len(seed) if seed_source is Source.SEED else 0) + n_calibration,
        human_reviewer=review.human,
    )
    if review.usage is not None:
        # Before the LLM-only baseline runs: it may share the reviewer, and its calls are not ours.
        report["llm"] = review.usage()
    if review.baseline is not None:
        t = time.perf_counter()
        outs = review.baseline.review([ReviewItem(e.key, e.text) for e in stream])
        timer.add("llm_only_baseline", t)
        answered = np.array([o.label is not None for o in outs])
        pred = np.array([labels.index(o.label) if o.label is not None else -1 for o in outs])
        report["baselines"]["llm_only"] = {
            "accuracy": accuracy(gold_idx, pred),
            "macro_f1": macro_f1(gold_idx, pred, len(labels)),
            "answered_share": float(answered.mean()),
            "calls": n,
        }
        ours = report.get("llm") or {}
        if ours.get("calls") and ours.get("cost") is not None:
            # LLM-only pays one call per item; priced at this run's mean cost per call.
            report["baselines"]["llm_only"]["estimated_cost"] = round(ours["cost"] / ours["calls"] * n, 6)
    report["config"]["empty_texts_left_out"] = {which: len(lines) for which, lines in skipped.items()}
    report["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - started_all, 2)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _self_training_inputs(
    unchosen: list[str],
    stream: Sequence[Example],
    audited: np.ndarray,
    calibration: CalibrationSet,
    labels: LabelSet,
) -> dict[str, Any]:
    """Self-training's ``unlabelled`` and ``audit`` for :func:`refine`: the texts nobody labelled (refine
    leaves out those in the pool, the reviewed ones) and the calibration set's labels."""
    return {
        "unlabelled": unchosen + [e.text for e, a in zip(stream, audited.tolist(), strict=True) if not a],
        "audit": [
            (text, labels.names[y]) for text, y in zip(calibration.texts, calibration.gold, strict=True)
        ],
    }


def _certificates_summary(
    start: int, version: str, n_calibration: int, certs: Sequence[Certificate]
) -> dict[str, Any]:
    return {
        "from_item": start,
        "version": version,
        "calibration": n_calibration,
        "thresholds": [c.threshold for c in certs],
        "needed": [c.needed for c in certs],
    }


def _audit_estimate(correct: np.ndarray) -> dict[str, Any]:
    k, m = int(correct.sum()), int(correct.size)
    low, high = accuracy_interval(k, m)
    return {"n": m, "estimate": round(k / m, 4) if m else None, "interval": [round(low, 4), round(high, 4)]}


def _guarantee_report(
    *,
    policy: Policy,
    n_labels: int,
    gold_idx: np.ndarray,
    served_pred: np.ndarray,
    served_conf: np.ndarray,
    routed: np.ndarray,
    audited: np.ndarray,
    by_reviewer: np.ndarray,
    reviewer_right: np.ndarray,
    served_by: list[str],
    n_calibration_seeds: int,
    certificates: list[dict[str, Any]],
    human_reviewer: bool,
) -> dict[str, Any] | None:
    """What the target policy promised against what it delivered, and the audit's view of it."""
    if not isinstance(policy, TargetAccuracy) and not audited.any():
        return None
    accepted = ~routed
    right = served_pred == gold_idx
    out: dict[str, Any] = {
        "target": policy.target if isinstance(policy, TargetAccuracy) else None,
        "delta": policy.delta if isinstance(policy, TargetAccuracy) else None,
        "accepted_share": round(float(accepted.mean()), 4),
        "accepted_accuracy": round(float(right[accepted].mean()), 4) if accepted.any() else None,
        "review_share": round(float(routed.mean()), 4),
        "audit_share_of_stream": round(float(audited.mean()), 4),
        # People's labels the audit adds: accepted items, and routed ones a machine reviewed.
        "audit_extra_labels": int((audited & (accepted | (by_reviewer & (not human_reviewer)))).sum()),
        "calibration_seeds": n_calibration_seeds,
        "audit": _audit_estimate(right[audited & accepted]),
        "per_version": {},
        "certificates": certificates,
    }
    if isinstance(policy, TargetAccuracy):
        oracle = oracle_review_share(served_conf, right, policy.target)
        out["oracle_review_share"] = round(oracle, 4)
        out["review_to_oracle"] = round(float(routed.mean()) / oracle, 3) if oracle > 0 else None
        # The floor for what this policy promises: every label's accepted items at least the target.
        per_label = oracle_review_share_per_class(served_conf, served_pred, right, n_labels, policy.target)
        out["oracle_review_share_per_label"] = round(per_label, 4)
        share = float(routed.mean())
        out["review_to_oracle_per_label"] = round(share / per_label, 3) if per_label > 0 else None
        out["accepted_accuracy_per_label"] = [
            round(float(right[accepted & (served_pred == j)].mean()), 4)
            if (accepted & (served_pred == j)).any()
            else None
            for j in range(n_labels)
        ]
        # None when nothing was accepted: the target then holds vacuously, at the price of reviewing all.
        out["reached"] = bool(right[accepted].mean() >= policy.target) if accepted.any() else None
    checked = audited & routed & by_reviewer
    if checked.any():  # how often the (LLM) reviewer agreed with people on audited routed items
        out["reviewer_agreement"] = _audit_estimate(reviewer_right[checked])
    versions = np.asarray(served_by)
    for v in dict.fromkeys(served_by):
        mine = accepted & (versions == v)
        out["per_version"][v] = {
            "accepted": int(mine.sum()),
            "accepted_accuracy": round(float(right[mine].mean()), 4) if mine.any() else None,
            "audit": _audit_estimate(right[mine & audited]),
        }
    return out


def _holdout_weights(ensemble: Ensemble, pool: VerifiedPool, labels: LabelSet) -> np.ndarray | None:
    held = pool.holdout_items()
    if not held:
        return None
    probs = ensemble.predict_proba([it.text for it in held])
    return member_weights(probs, np.asarray(labels.indices([it.label for it in held])))


def _result_summary(result: Any) -> dict[str, Any]:
    d = asdict(result)
    return {
        k: d[k]
        for k in (
            "promoted",
            "version",
            "previous",
            "reason",
            "metrics_old",
            "metrics_new",
            "n_new",
            "n_replay",
            "n_holdout",
            "seconds",
            "member_seconds",
            "pruning",
            "strategy",
            "self_training",
        )
    }


def _report(
    *,
    config: SimulationConfig,
    guarantee: dict[str, Any] | None,
    policy: Policy,
    reviewer: Reviewer,
    labels: LabelSet,
    stream: Sequence[Example],
    gold_idx: np.ndarray,
    final: np.ndarray,
    routed: np.ndarray,
    by_human: np.ndarray,
    by_reviewer: np.ndarray,
    served_by: list[str],
    initial: Ensemble,
    initial_probs: np.ndarray,
    cycles: list[dict[str, Any]],
    start_report: dict[str, Any],
    timer: StageTimer,
    n_seed: int,
    human_reviewer: bool,
) -> dict[str, Any]:
    n_labels = len(labels)
    accepted = ~routed
    cons = consensus(initial_probs)
    baselines: dict[str, Any] = {
        "members_alone": {
            name: {
                "accuracy": accuracy(gold_idx, initial_probs[i].argmax(1)),
                "macro_f1": macro_f1(gold_idx, initial_probs[i].argmax(1), n_labels),
            }
            for i, name in enumerate(initial.names)
        },
        "majority_vote": {
            "accuracy": accuracy(gold_idx, cons.majority),
            "macro_f1": macro_f1(gold_idx, cons.majority, n_labels),
        },
        "mean_probability": {
            "accuracy": accuracy(gold_idx, cons.mean_proba.argmax(1)),
            "macro_f1": macro_f1(gold_idx, cons.mean_proba.argmax(1), n_labels),
        },
    }
    per_version: dict[str, dict[str, Any]] = {}
    for v in dict.fromkeys(served_by):
        mask = np.array([s == v for s in served_by])
        acc_mask = mask & accepted
        per_version[v] = {
            "items": int(mask.sum()),
            "review_share": float(routed[mask].mean()),
            "final_accuracy": accuracy(gold_idx[mask], final[mask]),
            "accepted_accuracy": accuracy(gold_idx[acc_mask], final[acc_mask]) if acc_mask.any() else None,
        }
    human_reviews = int(by_human.sum()) + (int(by_reviewer.sum()) if human_reviewer else 0)
    return {
        "config": {
            "seed_file": str(config.seed_file),
            "stream_file": str(config.stream_file),
            "n_seed": n_seed,
            "n_stream": len(stream),
            "chunk_size": config.chunk_size,
            "beta": config.beta,
            "retrain": config.retrain,
            "policy": policy.name,
            "reviewer": reviewer.name,
            "refine_train": asdict(config.refine_train),
            "retrain_strategy": config.retrain_strategy,
            "gate_alpha": config.gate_alpha,
            "self_training": asdict(config.self_training),
            "cold_start": {
                "encoder": concrete_encoder(config.cold_start.encoder),  # what "auto" picked
                "kinds": list(config.cold_start.kinds),
                "contrastive_pairs": config.contrastive_pairs,
                "simcse_texts": config.simcse_texts,
                "frozen_layers": config.cold_start.transformer_train.frozen_layers,
                "embedding_layers": config.cold_start.embedding_layers,
            },
            "audit": {"share": config.audit_share, "uncertified": config.audit_uncertified},
            "calibrate_on_reviews": config.calibrate_on_reviews,
            "seed": config.seed,
        },
        "labels": list(labels.names),
        "final": {
            "accuracy": accuracy(gold_idx, final),
            "macro_f1": macro_f1(gold_idx, final, n_labels),
            "review_share": float(routed.mean()),
            "reviewed": int(routed.sum()),
            "accepted_accuracy": accuracy(gold_idx[accepted], final[accepted]) if accepted.any() else None,
            "reviewer_labelled": int(by_reviewer.sum()),
            "human_fallbacks": int(by_human.sum()),
            "human_labels_total": n_seed
            + human_reviews
            + int((guarantee or {}).get("audit_extra_labels", 0)),
        },
        "guarantee": guarantee,
        "baselines": baselines,
        "cycles": cycles,
        "per_version": per_version,
        "start": start_report,
        "tradeoff": tradeoff(initial_probs, gold_idx),
    }
