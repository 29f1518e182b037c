"""Specialists that are a linear model over fixed features: encoder embeddings, or word/char n-grams.

They are fast to train from scratch, so they refit on every verified example at each retraining
(``incremental = False``). Their weights are saved as plain arrays and JSON, not pickles: a model
store should be loadable across scikit-learn versions and never execute code on load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion

from autoannotator.core.labels import LabelSet
from autoannotator.errors import SpecialistLoadError, TrainingError
from autoannotator.models.specialists.base import (
    DescribedByMeta,
    SpecialistMeta,
    TrainConfig,
    check_texts,
    check_training_data,
    check_weights,
    read_meta,
    softmax,
    staged_dir,
    write_meta,
)
from autoannotator.models.specialists.encoder import Encoder, concrete_encoder

HEAD_FILE = "head.npz"
# A logit this low gives a class the model never saw in training a probability of ~0.
_ABSENT_CLASS_BIAS = -30.0


def fit_linear_head(
    x: np.ndarray,
    y: Sequence[int],
    n_labels: int,
    c: float,
    seed: int,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression as ``(W [L, d], b [L])`` for ``softmax(x @ W.T + b)``.

    Works when the training data lack some labels (those get a prohibitive bias) and for two labels
    (scikit-learn's single binary row becomes the equivalent two-row softmax).
    """
    y_arr = np.asarray(y)
    present = np.unique(y_arr)
    if len(present) < 2:
        raise TrainingError(
            f"training data hold a single label ({int(present[0]) if len(present) else 'none'}); "
            "a classifier needs examples of at least two labels"
        )
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(x, y_arr, sample_weight=sample_weight)
    w = np.zeros((n_labels, x.shape[1]), dtype=np.float64)
    b = np.full(n_labels, _ABSENT_CLASS_BIAS, dtype=np.float64)
    if len(clf.classes_) == 2:
        lo, hi = int(clf.classes_[0]), int(clf.classes_[1])
        w[lo], b[lo] = 0.0, 0.0
        w[hi], b[hi] = clf.coef_[0], clf.intercept_[0]
    else:
        for row, cls in enumerate(clf.classes_):
            w[int(cls)], b[int(cls)] = clf.coef_[row], clf.intercept_[row]
    return w, b


class _LinearSpecialist(DescribedByMeta):
    """Shared machinery: a feature map (subclass) and a softmax head saved in ``head.npz``."""

    kind: ClassVar[str]
    incremental: ClassVar[bool] = False

    def __init__(
        self, meta: SpecialistMeta, w: np.ndarray | None, b: np.ndarray | None, directory: Path | None = None
    ) -> None:
        self.meta = meta
        self.w = w
        self.b = b
        self.directory = directory
        # Loaded to predict only (load(..., serving=True)): an embedding head then asks its shared
        # encoder for a serving process's small cache.
        self.serving = False

    def features(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if self.w is None or self.b is None:
            raise TrainingError(f"specialist {self.name!r} has not been trained yet")
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)))
        x = self.features(check_texts(texts))
        return softmax(np.asarray(x @ self.w.T) + self.b)

    def _fit_features(self, texts: list[str]) -> np.ndarray:
        """Features for training; a subclass that learns a vocabulary learns it here."""
        return self.features(texts)

    def _restore_features(self, directory: Path) -> None:
        """Rebuild a learned feature map from what ``_save_features`` wrote (nothing by default)."""

    def _save_features(self, directory: Path) -> None:
        """Persist a learned feature map (nothing by default)."""

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        out_dir: Path,
        config: TrainConfig | None = None,
        weights: Sequence[float] | None = None,
    ) -> _LinearSpecialist:
        config = config or TrainConfig()
        y = check_training_data(texts, labels, self.labels)
        clean = check_texts(texts)
        w_examples = check_weights(weights, len(clean))
        new = type(self)(replace(self.meta), None, None)
        x = new._fit_features(clean)
        c = float(self.meta.extra.get("C", 1.0))
        w, b = fit_linear_head(x, y, len(self.labels), c=c, seed=config.seed, sample_weight=w_examples)
        new.w, new.b = w, b
        out_dir = Path(out_dir)
        new.meta = replace(
            self.meta,
            created_at=time.time(),
            n_train=len(clean),
            parent=str(self.directory) if self.directory else None,
            train_config={"C": c, "seed": config.seed},
            metrics={},
        )
        with staged_dir(out_dir) as tmp:
            np.savez(tmp / HEAD_FILE, w=w, b=b)
            new._save_features(tmp)
            write_meta(tmp, new.meta)
        new.directory = out_dir
        return new

    @classmethod
    def load(cls, directory: Path, *, serving: bool = False) -> _LinearSpecialist:
        """A saved specialist; ``serving``: for predictions only (see :attr:`serving`)."""
        directory = Path(directory)
        meta = read_meta(directory)
        if meta.kind != cls.kind:
            raise SpecialistLoadError(f"{directory} holds a {meta.kind!r} specialist, not {cls.kind!r}")
        try:
            with np.load(directory / HEAD_FILE) as head:
                w, b = head["w"], head["b"]
        except (OSError, KeyError) as exc:
            raise SpecialistLoadError(f"{directory}/{HEAD_FILE} is unreadable: {exc}") from exc
        spec = cls(meta, w, b, directory)
        spec.serving = serving
        spec._restore_features(directory)
        return spec


class EmbeddingSpecialist(_LinearSpecialist):
    """Frozen encoder embeddings (mean-pooled) + a logistic-regression head."""

    kind = "embedding-linear"

    @classmethod
    def untrained(
        cls,
        encoder: str | Path,
        labels: LabelSet,
        name: str = "embedding-linear",
        c: float = 4.0,
        layers: int = 0,
    ) -> EmbeddingSpecialist:
        """``layers`` > 0: pool the encoder's states after that many layers, not after its last."""
        if layers < 0:
            raise ValueError(f"layers must be >= 0 (0: all of them), got {layers}")
        extra: dict[str, Any] = {"C": c}
        if layers:
            extra["layers"] = layers
        meta = SpecialistMeta(
            kind=cls.kind,
            name=name,
            labels=labels.names,
            base_model=concrete_encoder(encoder),
            extra=extra,
        )
        return cls(meta, None, None)

    @property
    def layers(self) -> int:
        """How many of the encoder's layers its features come from (0: all of them)."""
        return int(self.meta.extra.get("layers", 0) or 0)

    # The depth of the encoder's trunk a fine-tuned member of the same served version shares, set when
    # the version loads (models.ensemble.share_trunks); embedding through it gives the same vectors.
    trunk_depth: int = 0

    @property
    def encoder(self) -> Encoder:
        """The process's shared encoder; a serving head asks for a small cache, one being fit for room
        for a whole verified pool."""
        return Encoder.shared(self.meta.base_model, serving=self.serving)

    def features(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.embed(texts, depth=self.trunk_depth, layers=self.layers)

    def compile_for_serving(self) -> bool:
        """Compile the encoder's forward pass now where the runtime compiles it (``compiled``), so
        the first request does not wait for it; True if it is compiled."""
        return self.encoder.compiled_forward(self.trunk_depth, self.layers) is not None


VECTORIZER_FILE = "ngrams.json"


class NgramSpecialist(_LinearSpecialist):
    """TF-IDF over word 1-2-grams and character 2-5-grams + a logistic-regression head.

    It needs no encoder at all and errs differently from the neural kinds (it sees spelling,
    tickers and emoji that a subword model smooths over), which is what makes a vote worth having.
    """

    kind = "ngram-linear"

    def __init__(
        self, meta: SpecialistMeta, w: np.ndarray | None, b: np.ndarray | None, directory: Path | None = None
    ) -> None:
        super().__init__(meta, w, b, directory)
        self.union: FeatureUnion | None = None

    @classmethod
    def untrained(cls, labels: LabelSet, name: str = "ngram-linear", c: float = 8.0) -> NgramSpecialist:
        meta = SpecialistMeta(
            kind=cls.kind, name=name, labels=labels.names, base_model="tfidf", extra={"C": c}
        )
        return cls(meta, None, None)

    @staticmethod
    def _new_union() -> FeatureUnion:
        return FeatureUnion(
            [
                ("word", TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, lowercase=True)),
                (
                    "char",
                    TfidfVectorizer(
                        analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, lowercase=True
                    ),
                ),
            ]
        )

    def features(self, texts: Sequence[str]) -> np.ndarray:
        if self.union is None:
            raise TrainingError(f"specialist {self.name!r} has no fitted vocabulary")
        return self.union.transform(list(texts))

    def _fit_features(self, texts: list[str]) -> np.ndarray:
        self.union = self._new_union()
        try:
            x = self.union.fit_transform(texts)
        except ValueError:
            # min_df=2 on a handful of texts can leave no character n-gram at all.
            self.union.transformer_list[1][1].set_params(min_df=1)
            x = self.union.fit_transform(texts)
        return x

    def _save_features(self, directory: Path) -> None:
        assert self.union is not None
        parts = {}
        for part, vec in self.union.transformer_list:
            parts[part] = {
                "params": {k: v for k, v in vec.get_params().items() if k in _SAVED_PARAMS},
                "vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()},
                "idf": vec.idf_.tolist(),
            }
        (directory / VECTORIZER_FILE).write_text(json.dumps(parts))

    def _restore_features(self, directory: Path) -> None:
        try:
            parts = json.loads((directory / VECTORIZER_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecialistLoadError(f"{directory}/{VECTORIZER_FILE} is unreadable: {exc}") from exc
        vecs = []
        for part in ("word", "char"):
            p = parts[part]
            params = dict(p["params"])
            params["ngram_range"] = tuple(params["ngram_range"])
            vec = TfidfVectorizer(**params)
            vec.vocabulary_ = p["vocabulary"]
            vec.idf_ = np.asarray(p["idf"])
            vecs.append((part, vec))
        self.union = FeatureUnion(vecs)


_SAVED_PARAMS = {"ngram_range", "analyzer", "min_df", "sublinear_tf", "lowercase"}
