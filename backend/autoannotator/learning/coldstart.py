"""Cold start: build k *different* specialists from a few seed labels when no pretrained one fits.

A vote among clones adds nothing: three copies of one model make the same mistakes. So the default
members differ in what they see — a fine-tuned encoder (contextual subwords), the frozen encoder's
embeddings under a linear head (semantic similarity, no fine-tuning noise), and word/char n-grams
under a linear model (surface forms: tickers, spelling, emoji). Their pairwise disagreement on the
stream is reported so a user can see the members are not clones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.errors import TrainingError
from autoannotator.learning.recipes import ColdStartConfig
from autoannotator.models.specialists import (
    EmbeddingSpecialist,
    NgramSpecialist,
    Specialist,
    TrainConfig,
    TransformerSpecialist,
)
from autoannotator.models.specialists.encoder import concrete_encoder, model_reference

logger = logging.getLogger(__name__)


def check_seed(labels: Sequence[str], label_set: LabelSet, min_per_label: int) -> dict[str, int]:
    """Count seed labels per class; refuse a seed that leaves a class with too few examples."""
    counts = {name: 0 for name in label_set.names}
    for lab in labels:
        label_set.index(lab)
        counts[lab] += 1
    short = {name: c for name, c in counts.items() if c < min_per_label}
    if short:
        raise TrainingError(
            f"the seed set has too few examples of {short!r} (need {min_per_label} each); "
            "label a few more of those before the cold start"
        )
    return counts


def untrained_member(kind: str, index: int, labels: LabelSet, config: ColdStartConfig) -> Specialist:
    name = f"m{index}-{kind}"
    encoder = model_reference(config.encoder)
    if kind == "transformer":
        return TransformerSpecialist.from_encoder(encoder, labels, name=name, seed=config.seed)
    if kind == "embedding-linear":
        return EmbeddingSpecialist.untrained(
            encoder, labels, name=name, c=config.embedding_c, layers=config.embedding_layers
        )
    return NgramSpecialist.untrained(labels, name=name, c=config.ngram_c)


@dataclass
class ColdStartResult:
    members: list[Specialist]
    seed_counts: dict[str, int]
    seconds: dict[str, float]
    disagreement: np.ndarray | None = None

    def report(self) -> dict[str, Any]:
        names = [m.name for m in self.members]
        return {
            "members": names,
            "seed_counts": self.seed_counts,
            "train_seconds": self.seconds,
            "pairwise_disagreement": (
                {
                    f"{names[i]} vs {names[j]}": round(float(self.disagreement[i, j]), 4)
                    for i in range(len(names))
                    for j in range(i + 1, len(names))
                }
                if self.disagreement is not None
                else None
            ),
        }


def cold_start(
    texts: Sequence[str],
    labels: Sequence[str],
    label_set: LabelSet,
    out_dir: Path,
    config: ColdStartConfig | None = None,
    probe_texts: Sequence[str] | None = None,
) -> ColdStartResult:
    """Train one specialist of each configured kind on the seed set, into ``out_dir/<member>``.

    ``probe_texts`` (unlabelled, e.g. the first items of the stream) are used to measure how often
    the members disagree; without them the seed texts are used, which understates disagreement.
    An encoder of ``"auto"`` is decided once, here, and every member records the concrete choice.
    """
    config = config or ColdStartConfig()
    config = replace(config, encoder=concrete_encoder(config.encoder))
    counts = check_seed(labels, label_set, config.min_per_label)
    members: list[Specialist] = []
    seconds: dict[str, float] = {}
    for i, kind in enumerate(config.kinds):
        member = untrained_member(kind, i, label_set, config)
        started = time.perf_counter()
        train = config.transformer_train if kind == "transformer" else TrainConfig(seed=config.seed)
        members.append(member.fit(texts, labels, Path(out_dir) / member.name, train))
        seconds[member.name] = round(time.perf_counter() - started, 2)
        logger.info(
            "cold start: trained %s on %d seed labels in %.1fs", member.name, len(texts), seconds[member.name]
        )
    result = ColdStartResult(members, counts, seconds)
    if len(members) > 1:
        sample = list(probe_texts) if probe_texts else list(texts)
        votes = np.stack([m.predict_proba(sample).argmax(1) for m in members])
        result.disagreement = (votes[:, None, :] != votes[None, :, :]).mean(axis=2)
    return result
