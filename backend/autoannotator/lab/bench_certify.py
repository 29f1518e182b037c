"""``autoannotator bench-certify``: what a certified target costs in reviews, for a given number of
fair calibration labels, against an oracle that knows every label.

The target policy (``target:A``) accepts a label only above a threshold certified on calibration
labels: the audit's and the calibration seeds' (:mod:`autoannotator.core.guarantee`). A run of
``simulate`` mixes three things in its share reviewed: versions that change as it retrains, a
calibration set that grows with the audit, and the price of certainty itself. This benchmark
isolates the last two from the first:

- one published version labels a labelled file it was never trained on (the val split for a
  version trained on the train split);
- in each draw, ``size`` of those items, drawn at random, stand for the calibration labels, and the
  policy certifies its thresholds on them exactly as it does in service
  (:meth:`~autoannotator.core.policies.TargetAccuracy.calibrated`);
- the other items measure what it reviews, how right what it accepts is, and what an oracle that
  knows every label would have reviewed for the same target on the same items
  (:func:`~autoannotator.core.guarantee.oracle_review_share`, the issue's floor, and its per-label
  form).

Each calibration label is available from the start here, for the one version judged, which a
streaming project never has: its first versions certify on fewer, and each new version is judged
anew. So the ratio to the oracle measured here is a floor for a project of that version's quality
whose audit has gathered ``size`` labels. It answers before a project: how many audit labels a
target takes before it stops reviewing everything, and how close to the oracle it can get.

For comparison, each draw also certifies one threshold for all labels
(:func:`~autoannotator.core.guarantee.certify` at the full ``delta``), which promises the pooled
accuracy only: a weak label can hide behind a strong one, which is why the policy certifies per label.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoannotator.core.consensus import consensus
from autoannotator.core.guarantee import (
    DEFAULT_DELTA,
    certify,
    oracle_review_share,
    oracle_review_share_per_class,
)
from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import TargetAccuracy
from autoannotator.learning.datasets import read_jsonl
from autoannotator.models.ensemble import load_ensemble, read_manifest

logger = logging.getLogger(__name__)

# The fewest items left to measure on after the calibration draw: sizes that leave fewer are skipped.
MIN_EVALUATION = 200


def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None}
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def certificate_cost(
    probs: np.ndarray,
    gold: np.ndarray,
    target: float,
    size: int,
    draws: int,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
) -> dict[str, Any]:
    """Over ``draws`` random splits of the items (members' ``probs`` ``[k, n, L]``, ``gold`` label
    indices) into ``size`` calibration items and the rest: what the target policy certified on the
    calibration items reviews of the rest, against the oracle on the same items, and how right
    what it accepts is; the same for one threshold for all labels."""
    gold = np.asarray(gold, dtype=np.int64)
    proba = consensus(probs).mean_proba
    predicted = proba.argmax(axis=1)
    confidence = np.clip(proba.max(axis=1), 0.0, 1.0)
    correct = predicted == gold
    n, n_labels = proba.shape
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if not 0 < size <= n - MIN_EVALUATION:
        raise ValueError(
            f"a calibration size must leave {MIN_EVALUATION} of {n} items to measure on, got {size}"
        )
    policy = TargetAccuracy(target, delta)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "reviewed",
            "ratio",
            "ratio_per_label",
            "oracle",
            "oracle_per_label",
            "one_threshold_reviewed",
            "one_threshold_ratio",
        )
    }
    accepted_right: list[float] = []
    below_target = accepting_draws = accepted_total = right_total = 0
    for _ in range(draws):
        order = rng.permutation(n)
        cal, ev = order[:size], order[size:]
        _, certs = policy.calibrated(probs[:, cal], gold[cal])
        cut = np.array([np.inf if c.threshold is None else c.threshold for c in certs])
        review = confidence[ev] < cut[predicted[ev]]
        oracle = oracle_review_share(confidence[ev], correct[ev], target)
        oracle_pl = oracle_review_share_per_class(
            confidence[ev], predicted[ev], correct[ev], n_labels, target
        )
        one = certify(confidence[cal], correct[cal], target, delta)
        one_review = confidence[ev] < (np.inf if one.threshold is None else one.threshold)
        rows["reviewed"].append(float(review.mean()))
        rows["oracle"].append(oracle)
        rows["oracle_per_label"].append(oracle_pl)
        # A ratio to an oracle that reviews nothing is undefined: such draws are left out of it.
        if oracle > 0:
            rows["ratio"].append(float(review.mean()) / oracle)
            rows["one_threshold_ratio"].append(float(one_review.mean()) / oracle)
        if oracle_pl > 0:
            rows["ratio_per_label"].append(float(review.mean()) / oracle_pl)
        rows["one_threshold_reviewed"].append(float(one_review.mean()))
        if any(c.certified for c in certs) and not review.all():
            accepting_draws += 1
            right = float(correct[ev][~review].mean())
            accepted_right.append(right)
            accepted_total += int((~review).sum())
            right_total += int(correct[ev][~review].sum())
            below_target += right < target
    return {
        "target": target,
        "delta": delta,
        "calibration_labels": size,
        "evaluated_items": n - size,
        "draws": draws,
        "draws_accepting_anything": accepting_draws,
        # Per draw, the accepted items' accuracy fell below the target this often (the policy allows
        # about delta, plus the chance that the measured items stray from their population).
        "draws_below_target": below_target,
        "accepted_accuracy": {
            **_mean_sd(accepted_right),
            "min": round(min(accepted_right), 4) if accepted_right else None,
            # Over every draw's accepted items together: a few accepted items make a draw's figure noisy.
            "pooled": round(right_total / accepted_total, 4) if accepted_total else None,
            "items": accepted_total,
        },
        **{k: _mean_sd(v) for k, v in rows.items()},
    }


def run_bench_certify(
    version_dirs: Sequence[Path],
    streams: Sequence[Path],
    targets: Sequence[float],
    sizes: Sequence[int],
    draws: int = 40,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
) -> dict[str, Any]:
    """Each version labels its stream once (one stream for all, or one per version); then, per
    target and calibration size that leaves :data:`MIN_EVALUATION` items, :func:`certificate_cost`."""
    if len(streams) not in (1, len(version_dirs)):
        raise ValueError(
            f"give one stream, or one per version: {len(version_dirs)} versions, {len(streams)} streams"
        )
    versions: list[dict[str, Any]] = []
    for i, directory in enumerate(version_dirs):
        stream = streams[0] if len(streams) == 1 else streams[i]
        manifest = read_manifest(directory)
        labels = LabelSet.of(manifest["labels"])
        # A task without text gets no prediction in Label Studio: such lines are left out and counted.
        skipped: list[int] = []
        examples = read_jsonl(stream, skipped=skipped)
        gold = np.asarray(labels.indices([e.label for e in examples]), dtype=np.int64)
        ensemble = load_ensemble(directory, labels, serving=True)
        logger.info("%s labels %d texts of %s", manifest["version"], len(examples), stream)
        probs = ensemble.predict_proba([e.text for e in examples])
        correct = consensus(probs).mean_proba.argmax(axis=1) == gold
        rows = []
        for target in targets:
            for size in sizes:
                if size > len(examples) - MIN_EVALUATION:
                    logger.info("calibration size %d skipped: %s has %d items", size, stream, len(examples))
                    continue
                rows.append(certificate_cost(probs, gold, target, size, draws, delta, seed))
        versions.append(
            {
                "version_dir": str(directory),
                "version": manifest["version"],
                "stream": str(stream),
                "items": len(examples),
                "empty_texts_left_out": len(skipped),
                "accuracy": round(float(correct.mean()), 4),
                "costs": rows,
            }
        )
    return {"draws": draws, "delta": delta, "seed": seed, "versions": versions}


def markdown_table(result: dict[str, Any]) -> str:
    """One row per version, target and calibration size: the reviewed shares and ratios."""

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f}%"

    def ratio(cell: dict[str, Any]) -> str:
        m = cell["mean"]
        return "—" if m is None else f"{m:.2f} ± {cell['sd']:.2f}"

    lines = [
        "| version | accuracy | target | calibration labels | reviewed | oracle | ratio | per-label oracle "
        "| ratio | one threshold: reviewed | ratio | accepted right: mean (min) | pooled (items) "
        "| below target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in result["versions"]:
        for c in v["costs"]:
            acc = c["accepted_accuracy"]
            lines.append(
                f"| {Path(v['stream']).parent.name or v['stream']} {v['version']} | {pct(v['accuracy'])} | "
                f"{c['target']} | {c['calibration_labels']} | {pct(c['reviewed']['mean'])} | "
                f"{pct(c['oracle']['mean'])} | {ratio(c['ratio'])} | {pct(c['oracle_per_label']['mean'])} | "
                f"{ratio(c['ratio_per_label'])} | {pct(c['one_threshold_reviewed']['mean'])} | "
                f"{ratio(c['one_threshold_ratio'])} | {pct(acc['mean'])} ({pct(acc['min'])}) | "
                f"{pct(acc['pooled'])} ({acc['items']}) | "
                f"{c['draws_below_target']}/{c['draws_accepting_anything']} |"
            )
    return "\n".join(lines)
