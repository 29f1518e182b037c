"""``autoannotator bench-precision``: what a cheaper forward pass costs in labels, and what it saves.

The same published version labels the same stream once per arm: a precision, and optionally a
runtime and OpenVINO's weight format (``fp32``, ``bf16``, ``fp32:openvino:int8``). Reported per version: each
member's label agreement with fp32 and its largest probability change; the ensemble's accuracy when
the routing policy sends its share of the stream to review (reviewed items take the gold label, as a
perfect reviewer would give); and the time per text of each member's forward passes, in this
process's threads. Several versions (seed draws, datasets) give the spread of the accuracy change.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import policy_from_spec
from autoannotator.core.precision import OPENVINO_WEIGHTS, PRECISIONS, RUNTIMES
from autoannotator.learning.datasets import read_jsonl
from autoannotator.models.ensemble import load_ensemble, read_manifest
from autoannotator.models.specialists.compiled import configured_runtime, configured_weights, set_runtime
from autoannotator.models.specialists.encoder import clear_encoder_caches
from autoannotator.models.specialists.runtime import (
    configure_precision,
    configured_precision,
    inference_dtype,
)

logger = logging.getLogger(__name__)


def apply_arm(arm: str) -> None:
    """Set this process's forward passes to ``arm``: ``PRECISION[:RUNTIME[:WEIGHTS]]``, for example
    ``fp32``, ``bf16``, ``fp32:openvino`` or ``fp32:openvino:int8`` (runtime torch by default, and
    OpenVINO's weights int8 by default)."""
    precision, runtime, weights = ([*arm.split(":"), "torch", "int8"])[:3]
    if precision not in PRECISIONS or runtime not in RUNTIMES or weights not in OPENVINO_WEIGHTS:
        raise ValueError(
            f"an arm is PRECISION[:RUNTIME[:WEIGHTS]] from {PRECISIONS}, {RUNTIMES}, "
            f"{OPENVINO_WEIGHTS}; got {arm!r}"
        )
    configure_precision(precision)
    set_runtime(runtime, weights=weights)


def _label_pass(ensemble: Any, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, float]]:
    """``[k, n, L]`` probabilities and each member's ms per text, in the arm the caller applied, the
    embedding cache emptied first (a cached vector would be the other arm's, and free)."""
    clear_encoder_caches()
    ensemble.predict_proba(list(texts[:32]))  # warm-up: lazy inits, autocast's weight casts
    clear_encoder_caches()
    ensemble.timings.clear()
    probs = ensemble.predict_proba(list(texts))
    ms = {name: round(1000 * s / len(texts), 3) for name, s in ensemble.timings.items()}
    return probs, ms


def _accuracy(probs: np.ndarray, gold: np.ndarray, policy_spec: str) -> dict[str, float]:
    decision = policy_from_spec(policy_spec).decide(probs)
    final = np.where(decision.review, gold, decision.labels)
    return {
        "accuracy": round(float((final == gold).mean()), 5),
        "accuracy_unreviewed": round(
            float((decision.labels[~decision.review] == gold[~decision.review]).mean()), 5
        ),
        "reviewed_share": round(decision.review_share, 5),
    }


def bench_version(
    version_dir: Path, stream_file: Path, precisions: Sequence[str], policy: str, n: int | None
) -> dict[str, Any]:
    manifest = read_manifest(version_dir)
    labels = LabelSet.of(manifest["labels"])
    examples = read_jsonl(stream_file)[:n] if n else read_jsonl(stream_file)
    texts = [e.text for e in examples]
    gold = np.asarray(labels.indices([e.label for e in examples]))
    runs = {}
    for p in precisions:
        # Loaded anew per arm, as a serving process loads it: weights in the forward's dtype, and
        # compiled where the arm's runtime compiles.
        apply_arm(p)
        ensemble = load_ensemble(version_dir, labels, serving=True)
        runs[p] = _label_pass(ensemble, texts)
    reference, _ = runs[precisions[0]]
    out: dict[str, Any] = {"version_dir": str(version_dir), "n": len(texts), "precisions": {}}
    for p, (probs, ms) in runs.items():
        apply_arm(p)  # to name the dtype each arm resolved to on this machine
        dtype = inference_dtype(torch.device("cpu"))
        out["precisions"][p] = {
            "computes_in": str(dtype or torch.float32).replace("torch.", ""),
            **_accuracy(probs, gold, policy),
            "ms_per_text": ms,
            "members": {
                name: {
                    "agreement": round(float((probs[i].argmax(1) == reference[i].argmax(1)).mean()), 5),
                    "max_abs_prob_change": round(float(np.abs(probs[i] - reference[i]).max()), 4),
                }
                for i, name in enumerate(ensemble.names)
            },
        }
    return out


def run_bench_precision(
    version_dirs: Sequence[Path],
    stream_files: Sequence[Path],
    precisions: Sequence[str] = ("fp32", "bf16"),
    policy: str = "budget:0.2:mean",
    n: int | None = None,
) -> dict[str, Any]:
    """Each version on its stream (one stream for all, or one per version), the first arm (a precision,
    optionally with a runtime: :func:`apply_arm`) the reference; then the change in accuracy per arm
    over the versions, mean and spread. The process's runtime is put back after."""
    if len(stream_files) not in (1, len(version_dirs)):
        raise ValueError("give one stream file for all versions, or one per version")
    saved = configured_precision(), configured_runtime(), configured_weights()
    try:
        for arm in precisions:
            apply_arm(arm)  # a bad arm is refused before any version loads
        return _run(version_dirs, stream_files, precisions, policy, n)
    finally:
        configure_precision(saved[0])
        set_runtime(saved[1], weights=saved[2])


def _run(
    version_dirs: Sequence[Path],
    stream_files: Sequence[Path],
    precisions: Sequence[str],
    policy: str,
    n: int | None,
) -> dict[str, Any]:
    streams = list(stream_files) * len(version_dirs) if len(stream_files) == 1 else list(stream_files)
    started = time.perf_counter()
    versions = []
    for vdir, stream in zip(version_dirs, streams, strict=True):
        logger.info("bench-precision: %s on %s", vdir, stream)
        versions.append(bench_version(Path(vdir), Path(stream), precisions, policy, n))
    summary = {}
    for p in precisions[1:]:
        deltas = [
            100 * (v["precisions"][p]["accuracy"] - v["precisions"][precisions[0]]["accuracy"])
            for v in versions
        ]
        speedups = [
            sum(v["precisions"][precisions[0]]["ms_per_text"].values())
            / sum(v["precisions"][p]["ms_per_text"].values())
            for v in versions
        ]
        summary[p] = {
            "accuracy_change_points": [round(d, 2) for d in deltas],
            "mean_change_points": round(statistics.fmean(deltas), 3),
            "sd_change_points": round(statistics.stdev(deltas), 3) if len(deltas) > 1 else None,
            "ensemble_speedup": [round(s, 2) for s in speedups],
        }
    return {
        "policy": policy,
        "reference": precisions[0],
        "summary": summary,
        "versions": versions,
        "seconds": round(time.perf_counter() - started, 1),
    }
