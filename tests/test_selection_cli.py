"""``autoannotator select`` on a catalog of tiny local classifiers (no hub)."""

import json

import numpy as np
import pytest
import torch

from autoannotator.cli import main
from tests import tiny


def _classifier(directory, labels, bias_to=None):
    """A tiny classifier; with ``bias_to`` its head always answers that label (a weak member)."""
    tiny.build_classifier(directory, labels)
    if bias_to is not None:
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(directory)
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([5.0 if lab == bias_to else 0.0 for lab in labels]))
        model.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_select_ranks_by_description_and_drops_a_member_that_hurts_the_vote(tmp_path, tiny_corpus, capsys):
    """Ranking needs a real sentence encoder: this uses the packaged MiniLM."""
    from autoannotator.core.labels import LabelSet
    from autoannotator.models.specialists import NgramSpecialist

    labels = LabelSet.of(tiny.LABELS)
    texts, ys = [t for t, _ in tiny_corpus[:150]], [y for _, y in tiny_corpus[:150]]
    good = NgramSpecialist.untrained(labels).fit(texts, ys, tmp_path / "good-a")
    NgramSpecialist.untrained(labels).fit(texts[::-1], ys[::-1], tmp_path / "good-b")
    _classifier(tmp_path / "always-bullish", ["bearish", "bullish", "neutral"], bias_to="bullish")
    catalog = {
        "version": 1,
        "note": "test catalog",
        "models": [
            {"id": str(tmp_path / "good-a"), "description": "financial news sentiment bearish bullish"},
            {"id": str(tmp_path / "good-b"), "description": "stock market sentiment of financial tweets"},
            {"id": str(tmp_path / "always-bullish"), "description": "financial sentiment bullish market"},
            {"id": "unitary/toxic-bert", "description": "toxic comment detection insults threats"},
        ],
    }
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    verified = tmp_path / "verified.jsonl"
    verified.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in tiny_corpus[150:]))
    argv = ["select", "--task", "Sentiment of financial news: bearish, bullish or neutral",
            "--labels", "bearish,bullish,neutral", "--catalog", str(tmp_path / "catalog.json")]  # fmt: skip
    assert main(argv) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    assert len(ranked) == 3 and "unitary/toxic-bert" not in [r["id"] for r in ranked]
    assert main([*argv, "--verified", str(verified)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["drop"] == [str(tmp_path / "always-bullish")]
    assert sorted(out["keep"]) == sorted([str(tmp_path / "good-a"), str(tmp_path / "good-b")])
    assert "drop" in out["summary"]
    assert np.isfinite(good.predict_proba(["rally"])).all()


def test_select_refuses_an_unknown_label_in_verified_data(tmp_path, capsys):
    (tmp_path / "v.jsonl").write_text(json.dumps({"text": "x", "label": "positive"}) + "\n")
    argv = ["select", "--task", "t", "--labels", "a,b", "--verified", str(tmp_path / "v.jsonl"),
            "--encoder", str(tiny.build_encoder(tmp_path / "enc"))]  # fmt: skip
    assert main(argv) == 2
    assert "unknown label 'positive'" in capsys.readouterr().err
