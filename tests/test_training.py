"""Continual refinement end to end on real, tiny specialists: train, evaluate on held-out items, gate."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import Decision, EpsilonRule, MeanProbability, policy_from_spec
from autoannotator.errors import TrainingError
from autoannotator.learning.gate import PRUNE_ALPHA, Gate, classification_metrics, sign_test
from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.learning.refine import RefineConfig, refine, should_train
from autoannotator.models.ensemble import Ensemble
from autoannotator.models.specialists import NgramSpecialist, TrainConfig, TransformerSpecialist
from autoannotator.models.specialists.base import Specialist
from autoannotator.settings import Settings
from autoannotator.storage.registry import Registry
from tests import tiny

LABELS = LabelSet(tiny.LABELS)
SERVED = policy_from_spec(Settings().policy)  # what the backend serves unless told otherwise
ROTATE = {"bearish": "bullish", "bullish": "neutral", "neutral": "bearish"}


def rows(n: int, seed: int, prefix: str) -> list[tuple[str, str, str]]:
    return [(f"{prefix}{i}", text, label) for i, (text, label) in enumerate(tiny.make_corpus(n, seed))]


def cold_start(registry: Registry, pool: VerifiedPool, seed_rows: list[tuple[str, str, str]]) -> str:
    """What cold start does: label a seed set, train two n-gram members on it, publish version 1."""
    pool.add_many(seed_rows, Source.SEED)
    pool.mark_trained()
    texts = [t for _, t, _ in seed_rows]
    ys = [y for _, _, y in seed_rows]
    return registry.save_ensemble(
        LABELS,
        {
            "ngram-a": lambda d: NgramSpecialist.untrained(LABELS, "a").fit(texts, ys, d),
            "ngram-b": lambda d: NgramSpecialist.untrained(LABELS, "b", c=2.0).fit(texts, ys, d),
        },
    )


def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_config_is_validated() -> None:
    bad_values = ({"beta": 0}, {"replay_ratio": -1}, {"min_holdout": -1}, {"tolerance": 2}, {"metric": "auc"})
    for bad in (*bad_values, {"strategy": "restart"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RefineConfig(**bad)
    # The defaults are the backend's: beta is AUTOANNOTATOR_RETRAIN_EVERY (see tests/test_jobs.py).
    assert RefineConfig().train == TrainConfig() and RefineConfig().beta == Settings().retrain_every == 100


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    p[:5] = 2  # label 1 may be missing from predictions; sklearn averages over labels seen in either
    got = classification_metrics(t, p, 3)
    assert got["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert got["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert got["n"] == 200


def test_refining_needs_a_served_version(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="cold-start"):
        refine(
            Registry(tmp_path), VerifiedPool(LABELS), RefineConfig(), labels=LABELS, policy=SERVED, force=True
        )


def test_nothing_happens_before_beta_or_without_new_training_items(tmp_path: Path) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(60, 0, "s"))
    config = RefineConfig(beta=50)
    pool.add_many(rows(20, 1, "h"))
    assert not should_train(pool, config)
    result = refine(registry, pool, config, labels=LABELS, policy=SERVED)
    assert not result.promoted and result.version == "" and result.serving == "v0001"
    assert result.reason == "the pool grew by 20 of beta=50 items since the last training"
    pool.mark_trained()
    forced = refine(registry, pool, config, labels=LABELS, policy=SERVED, force=True)
    assert forced.reason.startswith("no new verified training items") and not forced.promoted
    assert registry.versions() == ["v0001"] and len(registry.history()) == 1


def test_an_empty_pool_is_a_no_op_with_a_reason(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    cold_start(registry, VerifiedPool(LABELS), rows(30, 0, "s"))
    result = refine(
        registry, VerifiedPool(LABELS), RefineConfig(beta=1), labels=LABELS, policy=SERVED, force=True
    )
    assert (result.promoted, result.version, result.n_new) == (False, "", 0)
    assert "no new verified training items" in result.reason and registry.current() == "v0001"


def test_a_better_version_is_promoted_and_the_old_one_stays_untouched(tmp_path: Path) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(6, 0, "s"))  # six examples: a weak first version
    before = tree_hash(registry.path("v0001"))
    pool.add_many(rows(300, 1, "h"), Source.HUMAN)
    config = RefineConfig(beta=100)
    assert should_train(pool, config)
    n_new, n_holdout = len(pool.new_train_items()), len(pool.holdout_items())

    result = refine(registry, pool, config, labels=LABELS, policy=SERVED)

    assert result.promoted and (result.version, result.previous) == ("v0002", "v0001")
    assert result.reason.startswith("promoted: held-out accuracy")
    assert result.metrics_new["accuracy"] > result.metrics_old["accuracy"] + 0.1
    assert (result.n_new, result.n_holdout, result.n_replay) == (n_new, n_holdout, 0)
    assert set(result.member_seconds) == {"ngram-a", "ngram-b"}
    assert registry.current() == "v0002" and tree_hash(registry.path("v0001")) == before
    served = registry.load("v0002", LABELS)
    # Linear members retrain from scratch on every verified training item, never on held-out ones.
    assert [m.meta.n_train for m in served.members] == [6 + n_new] * 2
    assert served.members[0].meta.parent == str(registry.path("v0001") / "ngram-a")
    manifest = registry.manifest("v0002")
    assert manifest["parent"] == "v0001" and manifest["metrics"]["holdout"] == result.metrics_new
    last = registry.history()[-1]
    assert (last["event"], last["version"], last["metrics_new"]) == ("publish", "v0002", result.metrics_new)
    assert pool.growth_since_training() == 0


def _careless(pool: VerifiedPool, share: float = 1.0) -> list[tuple[str, str, str]]:
    """300 new items, a ``share`` of the training ones (never a held-out one) wrongly labelled."""
    rng = np.random.default_rng(3)
    return [
        (k, t, y if pool.is_holdout(k) or rng.random() >= share else ROTATE[y])
        for k, t, y in rows(300, 1, "h")
    ]


def test_a_worse_version_is_rejected_deleted_and_recorded(tmp_path: Path) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(150, 0, "s"))
    # Careless reviewers: every new training item carries the wrong label; held-out ones stay right,
    # so the clean held-out set shows that retraining on them made the ensemble worse.
    pool.add_many(_careless(pool), Source.HUMAN)

    result = refine(registry, pool, RefineConfig(beta=100), labels=LABELS, policy=SERVED)

    assert not result.promoted and result.version == "v0002" and result.serving == "v0001"
    assert result.reason.startswith("rejected: held-out accuracy fell from")
    assert result.metrics_new["accuracy"] < result.metrics_old["accuracy"] - 0.2
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]
    assert sorted(os.listdir(tmp_path / "versions")) == ["v0001"]
    last = registry.history()[-1]
    assert (last["event"], last["promoted"], last["version"]) == ("rejected", False, "v0002")
    assert last["metrics_old"] == result.metrics_old and last["metrics_new"] == result.metrics_new
    probs = registry.load("v0001", LABELS).predict_proba(["shares surge to a record"])
    assert LABELS.names[int(probs.mean(axis=0).argmax())] == "bullish"
    # The attempt counts as training: the same items do not trigger another one at once.
    assert pool.growth_since_training() == 0
    assert refine(registry, pool, RefineConfig(beta=100), labels=LABELS, policy=SERVED).version == ""


def test_with_alpha_a_drop_rejects_only_when_the_sign_test_calls_it_significant() -> None:
    """30 held-out items the served version got all right; the candidate loses some and wins none
    (or one back). The paper's rule (alpha 0) rejects any drop; alpha 0.05 only one the exact sign
    test calls significant: 1 lost (p = 0.5) or 5 lost and 1 won (p = 7/64) promote, 6 lost (p = 1/64)
    rejects."""
    old_right = np.ones(30, dtype=bool)

    def judge(gate: Gate, lost: int, won: int = 0) -> tuple[bool, str]:
        was = old_right.copy()
        was[:won] = False  # items the served version got wrong and the candidate gets right
        now = was.copy()
        now[:won] = True
        now[won : won + lost] = False
        old, new = {"accuracy": float(was.mean())}, {"accuracy": float(now.mean())}
        return gate.verdict(30, old, new, was, now)

    paper, significant = Gate(SERVED), Gate(SERVED, alpha=0.05)
    assert judge(paper, 1) == (
        False,
        "rejected: held-out accuracy fell from 1.0000 to 0.9667 (tolerance 0.0)",
    )
    promoted, reason = judge(significant, 1)
    assert promoted and reason.endswith(
        "not a significant drop (1 items lost, 0 won, sign test p = 0.5 > alpha 0.05)"
    )
    promoted, reason = judge(significant, 5, 1)
    assert promoted and "(5 items lost, 1 won, sign test p = 0.11 > alpha 0.05)" in reason
    assert sign_test(5, 1) == pytest.approx(7 / 64)
    promoted, reason = judge(significant, 6)
    assert not promoted
    assert reason == (
        "rejected: held-out accuracy fell from 1.0000 to 0.8000, a significant drop "
        "(6 items lost, 0 won, sign test p = 0.016 <= alpha 0.05)"
    )
    assert judge(significant, 0)[0] and judge(significant, 0, 3)[0]  # not worse: no test needed
    with pytest.raises(ValueError, match="per-item correctness"):
        significant.verdict(30, {"accuracy": 1.0}, {"accuracy": 0.9})
    with pytest.raises(ValueError, match="cover the 30"):
        significant.verdict(30, {"accuracy": 1.0}, {"accuracy": 0.9}, old_right[:29], old_right[:29])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            Gate(SERVED, alpha=bad)
        with pytest.raises(ValueError, match="gate_alpha"):
            RefineConfig(gate_alpha=bad)
    assert RefineConfig(gate_alpha=0.05).gate(SERVED).alpha == 0.05


def test_a_retraining_one_held_out_item_worse_is_rejected_by_default_and_promoted_with_alpha(
    tmp_path: Path,
) -> None:
    """The same retraining, twice: 15% of its new training labels are wrong, and the candidate
    gets one held-out item wrong that the served version got right. The paper's rule keeps the
    served version; alpha 0.05 serves the candidate, and its reason gives the test."""
    results = []
    for alpha in (0.0, 0.05):
        registry, pool = Registry(tmp_path / str(alpha)), VerifiedPool(LABELS)
        cold_start(registry, pool, rows(100, 0, "s"))
        pool.add_many(_careless(pool, 0.15), Source.HUMAN)
        results.append(
            refine(registry, pool, RefineConfig(beta=100, gate_alpha=alpha), labels=LABELS, policy=SERVED)
        )
        assert registry.current() == ("v0001" if alpha == 0 else "v0002")
    paper, significant = results
    assert paper.metrics_old == significant.metrics_old and paper.metrics_new == significant.metrics_new
    n = paper.n_holdout
    assert round((paper.metrics_old["accuracy"] - paper.metrics_new["accuracy"]) * n) == 1
    assert not paper.promoted and paper.reason.startswith("rejected: held-out accuracy fell")
    assert significant.promoted
    assert significant.reason.endswith(
        "not a significant drop (1 items lost, 0 won, sign test p = 0.5 > alpha 0.05)"
    )


def test_with_alpha_a_significantly_worse_retraining_is_still_rejected(tmp_path: Path) -> None:
    """Every new training label wrong (the careless reviewers above): the drop is far beyond chance."""
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(150, 0, "s"))
    pool.add_many(_careless(pool), Source.HUMAN)
    result = refine(registry, pool, RefineConfig(beta=100, gate_alpha=0.05), labels=LABELS, policy=SERVED)
    assert not result.promoted and registry.current() == "v0001"
    assert ", a significant drop (" in result.reason and "<= alpha 0.05)" in result.reason
    lost = int(result.reason.split("(")[1].split(" items lost")[0])
    won = int(result.reason.split("items lost, ")[1].split(" won")[0])
    n = result.n_holdout
    assert lost - won == round((result.metrics_old["accuracy"] - result.metrics_new["accuracy"]) * n)


def test_the_gate_alpha_setting_reaches_the_backend_retraining(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoannotator.service import training  # the service stack, imported here (conftest)

    assert training._refine_config(Settings.from_env()).gate_alpha == 0.0  # the paper's rule by default
    monkeypatch.setenv("AUTOANNOTATOR_GATE_ALPHA", "0.05")
    assert training._refine_config(Settings.from_env()).gate(SERVED).alpha == 0.05
    for bad in ("1", "-0.01"):
        monkeypatch.setenv("AUTOANNOTATOR_GATE_ALPHA", bad)
        with pytest.raises(ValueError, match="AUTOANNOTATOR_GATE_ALPHA"):
            Settings.from_env()


def test_too_few_held_out_items_promote_without_evaluation(tmp_path: Path) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(60, 0, "s"))
    pool.add_many(rows(20, 1, "h"), Source.LLM)
    n_holdout = len(pool.holdout_items())
    result = refine(registry, pool, RefineConfig(beta=10, min_holdout=1000), labels=LABELS, policy=SERVED)
    assert result.promoted and registry.current() == "v0002"
    assert result.reason == f"promoted without evaluation: only {n_holdout} held-out items (min_holdout=1000)"


class AlwaysNeutral:
    """A routing policy that labels everything neutral, whatever the members say."""

    name = "always-neutral"

    def decide(self, probs: np.ndarray, weights: np.ndarray | None = None) -> Decision:
        n = probs.shape[1]
        return Decision(np.full(n, LABELS.index("neutral")), np.ones(n), np.zeros(n, dtype=bool))


def test_the_served_policy_is_what_gets_evaluated(tmp_path: Path) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(60, 0, "s"))
    pool.add_many(rows(200, 1, "h"))
    holdout = pool.holdout_items()
    share = sum(it.label == "neutral" for it in holdout) / len(holdout)

    result = refine(registry, pool, RefineConfig(beta=1), labels=LABELS, policy=AlwaysNeutral())
    assert result.metrics_old["accuracy"] == result.metrics_new["accuracy"] == pytest.approx(share)
    assert result.promoted  # equal is not worse
    assert registry.history()[-1]["policy"] == "always-neutral"


def test_the_gate_scores_the_labels_the_policy_serves_not_a_fixed_rule() -> None:
    """Two members say label 1 without conviction, one is sure of label 0: the paper's ε rule serves
    the majority (1), ``mean:T`` the mean probability's argmax (0)."""
    probs = np.array([[[0.4, 0.6, 0.0]], [[0.45, 0.55, 0.0]], [[1.0, 0.0, 0.0]]])
    gold = np.array([0])
    assert Gate(EpsilonRule()).score(probs, gold)["accuracy"] == 0.0
    assert Gate(MeanProbability(0.75)).score(probs, gold)["accuracy"] == 1.0
    assert Gate(policy_from_spec("budget:1:epsilon")).score(probs, gold)["accuracy"] == 0.0
    for bad in ({"metric": "auc"}, {"tolerance": 2.0}, {"min_holdout": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Gate(SERVED, **bad)  # type: ignore[arg-type]


class ExplodingNgram(NgramSpecialist):
    """A test double: an n-gram member whose training dies like a full disk would.

    No real member fails on demand, and the point is what happens to the work of the members that
    finished before it: the double notes that their directories existed when it failed.
    """

    seen_siblings: ClassVar[list[str]] = []

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        out_dir: Path,
        config: TrainConfig | None = None,
        weights: Sequence[float] | None = None,
    ) -> NgramSpecialist:
        ExplodingNgram.seen_siblings = sorted(p.name for p in Path(out_dir).parent.iterdir())
        raise OSError(28, "No space left on device")


def test_a_crash_halfway_leaves_the_old_version_serving_and_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    cold_start(registry, pool, rows(60, 0, "s"))
    pool.add_many(rows(100, 1, "h"))
    growth = pool.growth_since_training()
    load = registry.load

    def load_with_double(version: str, labels: LabelSet) -> Ensemble:
        ensemble = load(version, labels)
        ensemble.members[1] = ExplodingNgram.load(registry.path(version) / "ngram-b")
        return ensemble

    monkeypatch.setattr(registry, "load", load_with_double)
    with pytest.raises(TrainingError, match=r"member 'b' \(ngram-b\) of v0001 failed.*No space left"):
        refine(registry, pool, RefineConfig(beta=10), labels=LABELS, policy=SERVED)

    assert ExplodingNgram.seen_siblings == ["ngram-a"]  # the first member had finished
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]
    assert os.listdir(tmp_path / "versions") == ["v0001"]
    assert [e["version"] for e in registry.history() if e["promoted"]] == ["v0001"]
    assert registry.history()[-1]["event"] == "failed"
    assert pool.growth_since_training() == growth  # nothing was trained: the items stay new
    assert load("v0001", LABELS).k == 2


def test_incremental_members_get_new_items_plus_replay_and_the_configured_hyperparameters(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    seed_rows = rows(60, 0, "s")
    pool.add_many(seed_rows, Source.SEED)
    pool.mark_trained()
    texts, ys = [t for _, t, _ in seed_rows], [y for _, _, y in seed_rows]
    start = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, max_length=32)
    members: dict[str, Callable[[Path], Specialist]] = {
        "ngram": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d),
        "bert": lambda d: TransformerSpecialist.from_encoder(tiny_encoder, LABELS, "bert").fit(
            texts, ys, d, start
        ),
    }
    registry.save_ensemble(LABELS, members)
    pool.add_many(rows(50, 1, "h"))
    n_new = len(pool.new_train_items())
    train = TrainConfig(learning_rate=5e-4, weight_decay=0.05, epochs=2, batch_size=8, max_length=24, seed=11)
    config = RefineConfig(beta=10, replay_ratio=0.5, tolerance=1.0, train=train)

    result = refine(registry, pool, config, labels=LABELS, policy=SERVED)

    assert result.promoted and result.n_new == n_new and result.n_replay == round(0.5 * n_new)
    ngram, bert = registry.load("v0002", LABELS).members
    assert isinstance(bert, TransformerSpecialist) and isinstance(ngram, NgramSpecialist)
    assert bert.meta.n_train == result.n_new + result.n_replay
    assert bert.meta.train_config == asdict(train)
    assert bert.meta.parent == str(registry.path("v0001") / "bert")
    assert len(bert.meta.metrics["train_loss"]) == train.epochs
    assert ngram.meta.n_train == len(pool.train_items()) == 60 + n_new


def _with_a_transformer(
    tmp_path: Path, transformer: Callable[[Path, list[str], list[str]], Specialist]
) -> tuple[Registry, VerifiedPool]:
    """Version 1 of an n-gram member and ``transformer`` on 60 seed labels, then 50 new verified items."""
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    seed_rows = rows(60, 0, "s")
    pool.add_many(seed_rows, Source.SEED)
    pool.mark_trained()
    texts, ys = [t for _, t, _ in seed_rows], [y for _, _, y in seed_rows]
    registry.save_ensemble(
        LABELS,
        {
            "ngram": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d),
            "bert": lambda d: transformer(d, texts, ys),
        },
    )
    pool.add_many(rows(50, 1, "h"))
    return registry, pool


CONTINUE = TrainConfig(learning_rate=5e-4, epochs=1, batch_size=8, max_length=24, seed=11)
RESTART = TrainConfig(learning_rate=3e-3, epochs=2, batch_size=16, max_length=24, seed=11)


def _with_a_cold_started_transformer(tmp_path: Path, encoder: Path) -> tuple[Registry, VerifiedPool]:
    start = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, max_length=32)
    return _with_a_transformer(
        tmp_path,
        lambda d, texts, ys: TransformerSpecialist.from_encoder(encoder, LABELS, "bert").fit(
            texts, ys, d, start
        ),
    )


def test_mix_continues_from_the_served_weights_on_every_verified_item(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    registry, pool = _with_a_cold_started_transformer(tmp_path, tiny_encoder)
    config = RefineConfig(beta=10, tolerance=1.0, strategy="mix", train=CONTINUE, refit_train=RESTART)

    result = refine(registry, pool, config, labels=LABELS, policy=SERVED)

    assert result.promoted and result.strategy == {"ngram": "refit", "bert": "mix"}
    assert result.n_replay == 0  # nothing continued on a replay sample
    ngram, bert = registry.load("v0002", LABELS).members
    assert isinstance(bert, TransformerSpecialist)
    assert bert.meta.n_train == ngram.meta.n_train == len(pool.train_items())
    assert bert.meta.parent == str(registry.path("v0001") / "bert")  # continued from the served weights
    assert bert.meta.train_config == asdict(CONTINUE)
    assert registry.history()[-1]["strategy"] == {"ngram": "refit", "bert": "mix"}


def test_refit_starts_again_from_the_encoder_with_the_cold_start_recipe(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    registry, pool = _with_a_cold_started_transformer(tmp_path, tiny_encoder)
    served = registry.load("v0001", LABELS).members[1]
    assert isinstance(served, TransformerSpecialist)
    config = RefineConfig(beta=10, tolerance=1.0, strategy="refit", train=CONTINUE, refit_train=RESTART)

    result = refine(registry, pool, config, labels=LABELS, policy=SERVED)

    assert result.promoted and result.strategy == {"ngram": "refit", "bert": "refit"}
    assert result.n_replay == 0
    bert = registry.load("v0002", LABELS).members[1]
    assert isinstance(bert, TransformerSpecialist)
    assert bert.meta.n_train == len(pool.train_items()) > 60
    assert bert.meta.parent is None  # a new head on the encoder, not the served member's weights
    assert bert.meta.base_model == served.meta.base_model == str(tiny_encoder)
    assert bert.meta.train_config == asdict(RESTART)
    assert len(bert.meta.metrics["train_loss"]) == RESTART.epochs
    # The served member's encoder weights were not the starting point: the refit's first layer
    # differs from both the served member's and (after training) the bare encoder's.
    key = "bert.encoder.layer.0.attention.self.query.weight"
    refit, old = bert.model.state_dict()[key], served.model.state_dict()[key]
    fresh = TransformerSpecialist.from_encoder(tiny_encoder, LABELS, "bert").model.state_dict()[key]
    assert not np.allclose(refit.numpy(), old.numpy()) and not np.allclose(refit.numpy(), fresh.numpy())


def test_under_refit_a_member_loaded_as_a_ready_classifier_continues(tmp_path: Path) -> None:
    classifier = tiny.build_classifier(tmp_path / "clf", list(LABELS.names))
    registry, pool = _with_a_transformer(
        tmp_path / "registry",
        lambda d, texts, ys: TransformerSpecialist.load(classifier, LABELS, name="bert").fit(
            texts, ys, d, CONTINUE
        ),
    )
    config = RefineConfig(beta=10, tolerance=1.0, strategy="refit", train=CONTINUE, refit_train=RESTART)

    result = refine(registry, pool, config, labels=LABELS, policy=SERVED)

    assert result.promoted and result.strategy == {"ngram": "refit", "bert": "continual"}
    bert = registry.load("v0002", LABELS).members[1]
    assert bert.meta.n_train == result.n_new + result.n_replay and result.n_replay > 0
    assert bert.meta.parent == str(registry.path("v0001") / "bert")


# ---------------------------------------------------------------------------- pruning


def _votes(*rows: list[int], n_labels: int = 3, sure: float = 0.8) -> np.ndarray:
    """``[k, n, L]`` probabilities from each member's label per item (``sure`` on it, the rest spread)."""
    out = np.full((len(rows), len(rows[0]), n_labels), (1 - sure) / (n_labels - 1))
    for m, row in enumerate(rows):
        out[m, np.arange(len(row)), row] = sure
    return out


def _careless_third(gold: np.ndarray, other: list[int]) -> np.ndarray:
    """A sure member right everywhere (0.9), ``other`` (0.8), and a third that is always wrong and
    always certain: under the mean probability it decides every item the first two disagree on."""
    careless = np.eye(3)[(gold + 1) % 3]
    return np.concatenate([_votes(gold.tolist(), sure=0.9), _votes(other), careless[None]])


def test_the_sign_test_is_the_exact_one_sided_binomial_tail() -> None:
    assert sign_test(0, 0) == 1.0  # the two votes never differ: no evidence at all
    assert sign_test(1, 0) == 0.5  # one flipped item
    assert sign_test(5, 0) == 1 / 32 and sign_test(10, 0) == 1 / 1024
    assert sign_test(10, 2) == (66 + 12 + 1) / 4096
    assert sign_test(6, 1) == 8 / 128 > PRUNE_ALPHA == 0.05  # six wins, one loss: not enough
    assert sign_test(0, 3) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        sign_test(-1, 2)


def test_a_member_that_pulls_the_vote_down_is_dropped_and_the_figures_say_so() -> None:
    gold = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    # The second member is wrong on five items, where the careless one sides with it: the vote of all
    # three is wrong there, the vote of the first two right (5 wins, no loss: p = 1/32).
    other = [(y + 2) % 3 if i < 5 else y for i, y in enumerate(gold.tolist())]
    probs = _careless_third(gold, other)
    gate = Gate(MeanProbability(0.75))
    pruning = gate.prune(probs, gold, ["m0-a", "m1-b", "m2-c"])
    assert pruning is not None
    assert (pruning.dropped, pruning.kept, pruning.metric) == (("m2-c",), ("m0-a", "m1-b"), "accuracy")
    assert pruning.with_all == gate.score(probs, gold)["accuracy"] == 0.5
    assert pruning.without == 1.0 and pruning.n_holdout == 10 and pruning.p_value == 1 / 32
    assert pruning.as_dict() == {
        "dropped": ["m2-c"],
        "kept": ["m0-a", "m1-b"],
        "metric": "accuracy",
        "with": 0.5,
        "without": 1.0,
        "n_holdout": 10,
        "p_value": 0.03125,
    }
    assert pruning.summary() == (
        "dropped m2-c: held-out accuracy 1.0000 without, 0.5000 with (sign test p = 0.031)"
    )


def test_one_flipped_item_of_thirty_drops_nobody_ten_do() -> None:
    gold = np.arange(30) % 3
    gate = Gate(MeanProbability(0.75))
    names = ["a", "b", "c"]
    # The second member is wrong on one item, and the careless third makes the vote wrong there:
    # without it the accuracy rises from 29/30 to 30/30, but one item is no evidence (p = 0.5).
    one = [(y + 2) % 3 if i == 0 else y for i, y in enumerate(gold.tolist())]
    probs = _careless_third(gold, one)
    assert gate.score(probs[:2], gold)["accuracy"] == 1.0 > gate.score(probs, gold)["accuracy"]
    assert gate.prune(probs, gold, names) is None
    # Wrong on ten items: the careless member costs the vote all ten (p = 1/1024), and goes.
    ten = [(y + 2) % 3 if i < 10 else y for i, y in enumerate(gold.tolist())]
    pruning = gate.prune(_careless_third(gold, ten), gold, names)
    assert pruning is not None and pruning.dropped == ("c",) and pruning.kept == ("a", "b")
    assert (pruning.with_all, pruning.without, pruning.p_value) == (20 / 30, 1.0, 1 / 1024)


def test_a_gain_with_losses_needs_the_wins_to_outweigh_them() -> None:
    gold = np.arange(30) % 3
    ys = gold.tolist()
    # On items 0-5 the second member is wrong and the careless third decides against the first; on
    # item 6 the first two are wrong (differently) and the third, right and certain, saves the vote.
    first = [(y + 1) % 3 if i == 6 else y for i, y in enumerate(ys)]
    second = [(y + 2) % 3 if i <= 6 else y for i, y in enumerate(ys)]
    third = np.eye(3)[[y if i == 6 else (y + 1) % 3 for i, y in enumerate(ys)]]
    probs = np.concatenate([_votes(first, sure=0.9), _votes(second), third[None]])
    gate = Gate(MeanProbability(0.75))
    # Without the third: 6 items won, 1 lost; the accuracy rises (24/30 to 29/30) but p = 8/128.
    assert gate.score(probs, gold)["accuracy"] == pytest.approx(24 / 30)
    assert gate.score(probs[:2], gold)["accuracy"] == pytest.approx(29 / 30)
    assert gate.prune(probs, gold, ["a", "b", "c"]) is None


def test_pruning_needs_a_strict_gain_enough_items_and_never_leaves_fewer_than_two_members() -> None:
    gold = np.array([2, 2, 2, 0, 1, 2, 0, 1, 2, 2])
    right = gold.tolist()
    gate = Gate(EpsilonRule())
    # Three members that agree: no removal raises the vote's accuracy, so nobody goes.
    assert gate.prune(_votes(right, right, right), gold, ["a", "b", "c"]) is None
    # Two members are the floor, however bad one of them is.
    assert gate.prune(_votes(right, [(y + 1) % 3 for y in gold]), gold, ["a", "b"]) is None
    # Too few held-out items to judge on: nothing is dropped.
    wrong = [(y + 1) % 3 for y in gold]
    probs = _votes(right, wrong, wrong, right)
    assert Gate(EpsilonRule(), min_holdout=11).prune(probs, gold, ["a", "b", "c", "d"]) is None
    # Four members, two of them always wrong: a 2-2 tie goes to the first label, which is wrong on the
    # six items labelled 2 (the wrong label is 0 there). Dropping c (the later of two equally weak
    # members) gives a 2-1 majority for the right label on all six (p = 1/64). b then stays: with c
    # gone it never flips a vote, so removing it would gain nothing.
    pruning = gate.prune(probs, gold, ["a", "b", "c", "d"])
    assert pruning is not None and pruning.dropped == ("c",) and pruning.kept == ("a", "b", "d")
    assert (pruning.with_all, pruning.without) == (gate.score(probs, gold)["accuracy"], 1.0)
    assert pruning.with_all == 0.4 and pruning.p_value == 1 / 64
    with pytest.raises(ValueError, match="2 names for 4 members"):
        gate.prune(probs, gold, ["a", "b"])


def test_refinement_drops_a_member_whose_removal_raises_held_out_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, pool = Registry(tmp_path), VerifiedPool(LABELS)
    seed_rows = rows(90, 0, "s")
    pool.add_many(seed_rows, Source.SEED)
    pool.mark_trained()
    texts, ys = [t for _, t, _ in seed_rows], [y for _, _, y in seed_rows]
    registry.save_ensemble(
        LABELS,
        {
            # Two cautious members (strong regularisation) and one that is always sure of itself.
            "ngram-a": lambda d: NgramSpecialist.untrained(LABELS, "a", c=0.1).fit(texts, ys, d),
            "ngram-b": lambda d: NgramSpecialist.untrained(LABELS, "b", c=0.2).fit(texts, ys, d),
            "ngram-c": lambda d: NgramSpecialist.untrained(LABELS, "c", c=50.0).fit(texts, ys, d),
        },
    )
    # Member c learns from a careless reviewer from now on: every label it is taught is rotated.
    real_fit = NgramSpecialist.fit

    def careless(self, texts, labels, out_dir, config=None, weights=None):  # type: ignore[no-untyped-def]
        if self.name == "c":
            labels = [ROTATE[y] for y in labels]
        return real_fit(self, texts, labels, out_dir, config, weights)

    monkeypatch.setattr(NgramSpecialist, "fit", careless)
    pool.add_many(rows(300, 1, "h"), Source.HUMAN)

    result = refine(registry, pool, RefineConfig(beta=100), labels=LABELS, policy=SERVED)

    assert result.promoted and result.version == "v0002"
    pruning = result.pruning
    assert (
        pruning is not None
        and pruning["dropped"] == ["ngram-c"]
        and pruning["kept"] == ["ngram-a", "ngram-b"]
    )
    assert pruning["without"] > pruning["with"] and pruning["n_holdout"] == result.n_holdout >= 10
    assert result.metrics_new["accuracy"] == pytest.approx(pruning["without"])
    assert pruning["p_value"] <= PRUNE_ALPHA
    assert result.reason.endswith(
        f"; dropped ngram-c: held-out accuracy {pruning['without']:.4f} without, "
        f"{pruning['with']:.4f} with (sign test p = {pruning['p_value']:.2g})"
    )
    manifest = registry.manifest("v0002")
    assert manifest["members"] == ["ngram-a", "ngram-b"] and manifest["metrics"]["pruning"] == pruning
    assert sorted(p.name for p in registry.path("v0002").iterdir() if p.is_dir()) == ["ngram-a", "ngram-b"]
    assert registry.load("v0002", LABELS).k == 2
    published = registry.history()[-1]
    assert (published["event"], published["pruning"]) == ("publish", pruning)
    # The next refinement starts from two members and never goes below them.
    pool.add_many(rows(300, 2, "i"), Source.HUMAN)
    again = refine(registry, pool, RefineConfig(beta=100), labels=LABELS, policy=SERVED)
    assert again.pruning is None and registry.load(again.serving or "", LABELS).k == 2
