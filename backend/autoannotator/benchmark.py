"""``autoannotator benchmark``: how fast the specialists label and learn on this machine.

Inference is timed on texts the members have not seen (the embedding cache would otherwise turn a
forward pass into a dictionary lookup), after one warm-up batch, as the median of several repeats.
Fine-tuning is timed once per kind on the same examples, with the configured epochs.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autoannotator.labels import LabelSet
from autoannotator.specialists import Specialist, TrainConfig, load_specialist
from autoannotator.specialists.encoder import Encoder
from autoannotator.specialists.linear import EmbeddingSpecialist
from autoannotator.specialists.runtime import available_cpus


def _fresh(texts: Sequence[str], tag: str) -> list[str]:
    """The same texts made unseen by the embedding cache (a suffix costs at most a token or two)."""
    return [f"{t} ~{tag}" for t in texts]


def _predict_rate(member: Specialist, texts: Sequence[str], repeats: int) -> float:
    member.predict_proba(_fresh(texts[:32], "warm"))
    rates = []
    for r in range(repeats):
        batch = _fresh(texts, f"r{r}") if isinstance(member, EmbeddingSpecialist) else list(texts)
        started = time.perf_counter()
        member.predict_proba(batch)
        rates.append(len(batch) / (time.perf_counter() - started))
    return statistics.median(rates)


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus_usable": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
    }


def run_benchmark(
    member_dirs: Sequence[Path],
    labels: LabelSet,
    texts: Sequence[str],
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    train_config: TrainConfig,
    repeats: int = 3,
) -> dict[str, Any]:
    """Inference rate of each member and of the whole ensemble; fine-tuning time of each member."""
    members = [load_specialist(d, labels) for d in member_dirs]
    rows: list[dict[str, Any]] = []
    for m in members:
        rows.append(
            {
                "member": m.name,
                "kind": m.kind,
                "predict_texts_per_s": round(_predict_rate(m, texts, repeats), 1),
            }
        )
    ensemble_s = sum(len(texts) / r["predict_texts_per_s"] for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        for m, row in zip(members, rows, strict=True):
            if isinstance(m, EmbeddingSpecialist):
                Encoder.shared(m.meta.base_model)._cache.clear()  # time the encoder too, as a refit would
            started = time.perf_counter()
            m.fit(train_texts, train_labels, Path(tmp) / m.name, train_config)
            seconds = time.perf_counter() - started
            row["fit_seconds"] = round(seconds, 2)
            row["fit_examples"] = len(train_texts)
            row["fit_epochs"] = train_config.epochs if m.kind == "transformer" else None
            row["fit_example_epochs_per_s"] = (
                round(len(train_texts) * train_config.epochs / seconds, 1)
                if m.kind == "transformer"
                else None
            )
    return {
        "machine": machine(),
        "n_texts": len(texts),
        "members": rows,
        "ensemble_predict_texts_per_s": round(len(texts) / ensemble_s, 1),
    }
