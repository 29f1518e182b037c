"""Self-training: a calibrated threshold, lighter pseudo-labels, and never a judge (learning.pseudo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import policy_from_spec
from autoannotator.errors import TrainingError
from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.learning.pseudo import SelfTrainingConfig, calibrated_threshold, summary
from autoannotator.learning.refine import RefineConfig, refine
from autoannotator.models.specialists import NgramSpecialist, TrainConfig, TransformerSpecialist
from autoannotator.models.specialists.linear import fit_linear_head
from autoannotator.storage.registry import Registry
from tests import tiny

LABELS = LabelSet(tiny.LABELS)
POLICY = policy_from_spec("budget:0.2:mean")


def test_the_threshold_is_the_lowest_whose_items_were_right_often_enough() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    right = np.array([1, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    # Top 4 all right; top 6 are 5/6 = 0.83 right; top 5 are 0.8 right.
    assert calibrated_threshold(conf, right, precision=1.0, min_items=2) == 0.8
    assert calibrated_threshold(conf, right, precision=0.8, min_items=2) == 0.6
    assert calibrated_threshold(conf, right, precision=0.8, min_items=7) is None  # 7 items: 5/7 right
    assert calibrated_threshold(conf, right, precision=0.7, min_items=7) == 0.5  # all 8: 5/8 right
    # Items tied at the threshold all count: two at 0.9, one of them wrong.
    tied = np.array([0.95, 0.9, 0.9, 0.5])
    assert calibrated_threshold(tied, np.array([1, 1, 0, 0], dtype=bool), 1.0, 1) == 0.95
    assert calibrated_threshold(np.array([]), np.array([], dtype=bool), 0.9, 1) is None
    with pytest.raises(ValueError, match="shape"):
        calibrated_threshold(conf, right[:3], 0.9, 1)


def test_the_config_is_validated_and_off_by_default() -> None:
    assert not SelfTrainingConfig().on and SelfTrainingConfig(ratio=0.5).on
    for bad in ({"ratio": -1}, {"weight": 0}, {"weight": 1.5}, {"precision": 0}, {"min_calibration": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SelfTrainingConfig(**bad)


# ------------------------------------------------------------------- weights in training


def test_a_linear_heads_weight_counts_like_repeating_the_example() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, size=60)
    weighted = fit_linear_head(x, y, 3, c=1.0, seed=0, sample_weight=np.r_[np.full(10, 3.0), np.ones(50)])
    repeated = fit_linear_head(np.r_[x[:10], x[:10], x], np.r_[y[:10], y[:10], y], 3, c=1.0, seed=0)
    plain = fit_linear_head(x, y, 3, c=1.0, seed=0)
    assert np.allclose(weighted[0], repeated[0], atol=1e-3) and np.allclose(
        weighted[1], repeated[1], atol=1e-3
    )
    assert not np.allclose(weighted[0], plain[0], atol=1e-3)


def test_a_linear_member_takes_weights_and_refuses_bad_ones(tmp_path: Path) -> None:
    corpus = tiny.make_corpus(60, seed=2)
    texts, ys = [t for t, _ in corpus], [y for _, y in corpus]
    member = NgramSpecialist.untrained(LABELS)
    light = member.fit(texts, ys, tmp_path / "w", weights=[1.0] * 30 + [0.05] * 30)
    plain = member.fit(texts, ys, tmp_path / "p")
    probe = [t for t, _ in tiny.make_corpus(20, seed=5)]
    assert not np.allclose(light.predict_proba(probe), plain.predict_proba(probe), atol=1e-3)
    with pytest.raises(TrainingError, match="weights"):
        member.fit(texts, ys, tmp_path / "bad", weights=[-1.0] * 60)


def test_a_transformer_trained_with_unit_weights_is_the_unweighted_one(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    corpus = tiny.make_corpus(40, seed=2)
    texts, ys = [t for t, _ in corpus], [y for _, y in corpus]
    config = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, max_length=24)
    base = TransformerSpecialist.from_encoder(tiny_encoder, LABELS, "bert")
    ones = base.fit(texts, ys, tmp_path / "ones", config, weights=[1.0] * len(texts))
    plain = base.fit(texts, ys, tmp_path / "plain", config)
    light = base.fit(texts, ys, tmp_path / "light", config, weights=[1.0] * 20 + [0.1] * 20)
    probe = [t for t, _ in tiny.make_corpus(20, seed=5)]
    assert np.allclose(ones.predict_proba(probe), plain.predict_proba(probe), atol=1e-5)
    assert not np.allclose(light.predict_proba(probe), plain.predict_proba(probe), atol=1e-4)
    for bad in ([1.0] * 3, [0.0] * len(texts), [float("nan")] * len(texts)):
        with pytest.raises(TrainingError, match="weights"):
            base.fit(texts, ys, tmp_path / "bad", config, weights=bad)


# ------------------------------------------------------------------- in refinement


def _served(tmp_path: Path, n_reviewed: int = 200) -> tuple[Registry, VerifiedPool]:
    """Two n-gram members on 60 seed labels and ``n_reviewed`` reviewed ones (a fifth of those held
    out), then 40 new verified items."""
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS, holdout_fraction=0.2)
    pool.add_many([(f"s{i}", t, y) for i, (t, y) in enumerate(tiny.make_corpus(60, seed=0))], Source.SEED)
    pool.add_many([(f"r{i}", t, y) for i, (t, y) in enumerate(tiny.make_corpus(n_reviewed, seed=3))])
    pool.mark_trained()
    texts, ys = [it.text for it in pool.train_items()], [it.label for it in pool.train_items()]
    registry.save_ensemble(
        LABELS,
        {
            "a": lambda d: NgramSpecialist.untrained(LABELS, "a").fit(texts, ys, d),
            "b": lambda d: NgramSpecialist.untrained(LABELS, "b", c=2.0).fit(texts, ys, d),
        },
    )
    pool.add_many([(f"h{i}", t, y) for i, (t, y) in enumerate(tiny.make_corpus(40, seed=1))])
    return registry, pool


UNLABELLED = [t for t, _ in tiny.make_corpus(600, seed=9)]


def test_confident_pseudo_labels_join_every_member_capped_and_never_the_pool(tmp_path: Path) -> None:
    registry, pool = _served(tmp_path)
    before = [(it.key, it.label) for it in pool.items()]
    n_train, n_holdout = len(pool.train_items()), len(pool.holdout_items())
    config = RefineConfig(beta=10, tolerance=1.0, self_training=SelfTrainingConfig(ratio=0.5, precision=0.9))

    result = refine(registry, pool, config, labels=LABELS, policy=POLICY, unlabelled=UNLABELLED)

    made = result.self_training
    assert made is not None and made["threshold"] is not None and made["calibrated_on"] == "held-out"
    assert made["calibration_accuracy"] >= 0.9 and made["calibration_items"] >= 30
    assert 0 < made["n_used"] <= made["cap"] == int(0.5 * n_train)
    assert made["n_labelled"] == min(len(UNLABELLED), 3 * made["cap"])  # the cost is bounded
    assert sum(made["by_label"].values()) == made["n_used"]
    for member in registry.load(result.version, LABELS).members:
        assert member.meta.n_train == n_train + made["n_used"]
    # The pool, its held-out set and the gate's count are the verified labels alone.
    assert [(it.key, it.label) for it in pool.items()] == before
    assert result.n_holdout == len(pool.holdout_items()) == n_holdout
    assert registry.history()[-1]["self_training"]["n_used"] == made["n_used"]


def test_held_out_and_verified_texts_are_never_pseudo_labelled(tmp_path: Path) -> None:
    registry, pool = _served(tmp_path)
    known = [it.text for it in pool.items()]
    config = RefineConfig(beta=10, tolerance=1.0, self_training=SelfTrainingConfig(ratio=1.0, precision=0.5))

    result = refine(registry, pool, config, labels=LABELS, policy=POLICY, unlabelled=[*known, "", " "])

    assert result.self_training is not None
    assert result.self_training["n_unlabelled"] == 0 and result.self_training.get("n_used", 0) == 0
    assert result.self_training["reason"] == "no unannotated text"


def test_without_enough_calibration_no_pseudo_label_is_made_and_the_report_says_why(tmp_path: Path) -> None:
    registry, pool = _served(tmp_path, n_reviewed=20)  # about 12 held-out items
    self_training = SelfTrainingConfig(ratio=1.0, min_calibration=30)
    config = RefineConfig(beta=10, tolerance=1.0, self_training=self_training)

    result = refine(registry, pool, config, labels=LABELS, policy=POLICY, unlabelled=UNLABELLED)

    assert result.promoted and result.self_training is not None
    reason = result.self_training["reason"]
    assert result.self_training["threshold"] is None and "at least 30 of the" in reason
    assert summary(result.self_training) == f"no pseudo-label: {reason}"
    for member in registry.load(result.version, LABELS).members:
        assert member.meta.n_train == len(pool.train_items())


def test_audit_labels_calibrate_the_threshold_where_there_are_any(tmp_path: Path) -> None:
    registry, pool = _served(tmp_path, n_reviewed=20)  # too few held-out items to calibrate on
    audit = tiny.make_corpus(80, seed=4)
    config = RefineConfig(beta=10, tolerance=1.0, self_training=SelfTrainingConfig(ratio=0.5, precision=0.9))

    result = refine(
        registry, pool, config, labels=LABELS, policy=POLICY, unlabelled=UNLABELLED + [t for t, _ in audit],
        audit=audit,
    )  # fmt: skip

    made = result.self_training
    assert made is not None and made["calibrated_on"] == "audit" and made["n_calibration"] == 80
    assert made["threshold"] is not None and made["n_used"] > 0
    assert made["n_unlabelled"] == len(set(UNLABELLED) - {t for t, _ in audit})  # audited: never pseudo


def test_self_training_off_reads_no_unlabelled_text(tmp_path: Path) -> None:
    registry, pool = _served(tmp_path)
    result = refine(registry, pool, RefineConfig(beta=10, tolerance=1.0), labels=LABELS, policy=POLICY,
                    unlabelled=UNLABELLED)  # fmt: skip
    assert result.self_training is None
    for member in registry.load(result.version, LABELS).members:
        assert member.meta.n_train == len(pool.train_items())
