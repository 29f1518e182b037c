"""What every specialist is: a classifier that turns texts into probabilities over the project's labels.

Specialists come in different kinds (a fine-tuned transformer, encoder embeddings + a linear head,
n-gram features + a linear model) because a vote among clones adds nothing. They share one small
contract, :class:`Specialist`, and one on-disk shape: a directory holding the kind's own files plus
``specialist.json``, which says what the directory is (kind, labels, base model, metrics, lineage).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.core.limits import MAX_TEXT_CHARS
from autoannotator.errors import BadInputError, SpecialistLoadError, TrainingError

META_FILE = "specialist.json"


def clip_text(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS]


def check_texts(texts: Sequence[str]) -> list[str]:
    """Refuse what no specialist can label, clip what is merely huge."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadInputError(f"text #{i} is {type(t).__name__}, not a string")
        if not t.strip():
            raise BadInputError(f"text #{i} is empty; an empty text has no label to predict")
        out.append(clip_text(t))
    return out


# How an incremental member (one that can continue from its weights) retrains on verified labels:
# on the new items and a replay sample of older ones, on every verified item from its current weights,
# or from the encoder it was first built on with a new head (learning.refine says which costs what).
RETRAIN_STRATEGIES = ("continual", "mix", "refit")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyperparameters. Defaults are the paper's (cross-entropy, lr 2e-5, wd 0.01, 3 epochs).

    Linear-model kinds read ``weight_decay`` as their L2 strength and ignore the optimiser fields.
    """

    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    warmup_ratio: float = 0.0
    seed: int = 0
    # Transformer kinds: the embeddings and this many lower layers keep the encoder's weights, so a
    # served version runs them once for this member and the embedding member (specialists.trunk).
    frozen_layers: int = 0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens, got {self.max_length}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0, got {self.frozen_layers}")


@dataclass(frozen=True)
class SpecialistMeta:
    """The contents of ``specialist.json``: enough to reload the directory and to explain it."""

    kind: str
    name: str
    labels: tuple[str, ...]
    base_model: str
    created_at: float = field(default_factory=time.time)
    n_train: int = 0
    parent: str | None = None
    train_config: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpecialistMeta:
        d = dict(d)
        d["labels"] = tuple(d["labels"])
        return cls(**d)


class DescribedByMeta:
    """``labels`` and ``name`` read from ``specialist.json``'s contents, for every concrete kind."""

    meta: SpecialistMeta

    @property
    def labels(self) -> LabelSet:
        return LabelSet(self.meta.labels)

    @property
    def name(self) -> str:
        return self.meta.name


@runtime_checkable
class Specialist(Protocol):
    """A classifier over the project's labels.

    ``predict_proba`` returns an ``[n_texts, n_labels]`` array whose columns follow ``labels``.
    ``fit`` never changes ``self``: it writes a new directory and returns the specialist living
    there, so the old one can go on serving until the new one is promoted.
    ``incremental`` says whether ``fit`` continues from the current weights (so new examples plus a
    replay sample are enough) or trains from scratch (so it needs every verified example).
    ``weights`` (one per example, > 0; none: all 1) scale each example's share of the loss: a
    self-training pseudo-label counts for less than a verified label.
    """

    kind: ClassVar[str]
    incremental: ClassVar[bool]
    meta: SpecialistMeta

    @property
    def labels(self) -> LabelSet: ...

    @property
    def name(self) -> str: ...

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray: ...

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        out_dir: Path,
        config: TrainConfig | None = None,
        weights: Sequence[float] | None = None,
    ) -> Specialist: ...


def read_meta(directory: Path) -> SpecialistMeta:
    path = Path(directory) / META_FILE
    try:
        return SpecialistMeta.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SpecialistLoadError(f"{directory} is not a specialist directory: no {META_FILE}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SpecialistLoadError(f"{path} is unreadable: {exc}") from exc


def write_meta(directory: Path, meta: SpecialistMeta) -> None:
    (Path(directory) / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Write a directory next to its final place, then move it there in one ``os.replace``.

    A crash halfway leaves no half-written specialist at ``final`` (the temporary sibling is removed).
    ``final`` must not exist yet: published versions are never overwritten.
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists already; versions are never overwritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_training_data(texts: Sequence[str], labels: Sequence[str], label_set: LabelSet) -> list[int]:
    """Validate (text, label) examples; return the label indices."""
    if len(texts) != len(labels):
        raise TrainingError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise TrainingError("no training examples")
    check_texts(texts)
    y = label_set.indices(labels)
    return y


def check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray | None:
    """Per-example training weights as an array (``None`` stays ``None``: every example weighs 1)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise TrainingError(f"{n} training examples but {w.size} weights")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise TrainingError("training weights must be finite and > 0")
    return w


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))
