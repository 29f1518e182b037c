"""``bench-certify``: what a certified target reviews with N fair calibration labels, against the oracle.

The synthetic items are calibrated by construction (an item of confidence c is right with chance c),
so the oracle's share and the certificate's behaviour are known in advance; the command itself runs
end to end on a real (tiny) published version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoannotator.cli import main
from autoannotator.core.labels import LabelSet
from autoannotator.lab.bench_certify import MIN_EVALUATION, certificate_cost, run_bench_certify
from autoannotator.models.specialists import NgramSpecialist
from autoannotator.storage.registry import Registry
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)


def calibrated_items(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One member's ``[1, n, 3]`` probabilities and gold labels: confidence c in (1/3, 1), mostly
    high (1/3 + 2/3 Beta(4, 1)); the predicted label is right with chance c."""
    rng = np.random.default_rng(seed)
    c = 1 / 3 + (2 / 3) * rng.beta(4, 1, n) * 0.999
    predicted = rng.integers(0, 3, n)
    right = rng.random(n) < c
    gold = np.where(right, predicted, (predicted + rng.integers(1, 3, n)) % 3)
    probs = np.repeat(((1 - c) / 2)[:, None], 3, axis=1)
    probs[np.arange(n), predicted] = c
    return probs[None], gold


def test_with_many_fair_labels_the_certificate_reviews_close_to_the_oracle():
    probs, gold = calibrated_items(12_000)
    many = certificate_cost(probs, gold, target=0.9, size=6_000, draws=4)
    assert many["draws_accepting_anything"] == 4
    assert 0.1 < many["oracle"]["mean"] < 0.9
    assert many["reviewed"]["mean"] >= many["oracle_per_label"]["mean"] - 0.02  # no free lunch
    # Close to the target from above: with 2,000 labels a label, the bound's margin is a few points.
    assert many["accepted_accuracy"]["min"] >= 0.9 and many["accepted_accuracy"]["mean"] < 0.93
    assert many["ratio"]["mean"] < 2.0
    pooled = many["accepted_accuracy"]
    assert pooled["items"] > 4 * 3_000 and 0.9 <= pooled["pooled"] < 0.93


def test_with_too_few_labels_nothing_is_certified_and_everything_is_reviewed():
    probs, gold = calibrated_items(2_000)
    few = certificate_cost(probs, gold, target=0.95, size=60, draws=5)  # 20 a label; 0.95 needs more
    assert few["draws_accepting_anything"] == 0
    assert few["reviewed"] == {"mean": 1.0, "sd": 0.0}
    assert few["accepted_accuracy"]["mean"] is None
    assert few["ratio"]["mean"] == pytest.approx(1 / few["oracle"]["mean"], rel=0.05)


def test_the_ratio_to_the_oracle_falls_as_calibration_labels_grow():
    probs, gold = calibrated_items(12_000, seed=1)
    ratios = [
        certificate_cost(probs, gold, 0.9, size, draws=4, seed=2)["ratio"]["mean"]
        for size in (300, 1_000, 6_000)
    ]
    assert ratios[0] > ratios[1] > ratios[2]


def test_the_certificate_keeps_its_promise_over_draws():
    """Per draw, the accepted items' accuracy falls below the target with chance about delta at most
    (the measured items are 11,000, so their own spread is small)."""
    probs, gold = calibrated_items(12_000, seed=3)
    cost = certificate_cost(probs, gold, target=0.9, size=1_000, draws=60, seed=4)
    assert cost["draws_accepting_anything"] >= 50
    assert cost["draws_below_target"] <= 8  # 60 draws at 0.05: 8 or more has chance < 1%


def test_a_size_that_leaves_too_few_items_to_measure_on_is_refused():
    probs, gold = calibrated_items(MIN_EVALUATION + 50)
    with pytest.raises(ValueError, match="calibration size"):
        certificate_cost(probs, gold, 0.9, size=100, draws=2)
    with pytest.raises(ValueError, match="draws"):
        certificate_cost(probs, gold, 0.9, size=20, draws=0)


def test_the_command_labels_a_published_version_once_and_skips_sizes_too_large(tmp_path, capsys):
    train = tiny.make_corpus(240, seed=5)
    texts, ys = [t for t, _ in train], [y for _, y in train]
    registry = Registry(tmp_path / "models")
    version = registry.save_ensemble(
        LABELS,
        {"m0-ngram": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d)},
        note="certify test",
    )
    # A fifth of the stream's labels moved to the next label, so that the version is wrong on some.
    rows = [
        (t, tiny.LABELS[(tiny.LABELS.index(y) + (i % 5 == 0)) % 3])
        for i, (t, y) in enumerate(tiny.make_corpus(500, seed=6))
    ]
    stream = tmp_path / "val.jsonl"
    rows.append(("  ", "bullish"))  # a task without text: left out and counted
    stream.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "out" / "certify.json"
    code = main(
        [
            "bench-certify",
            "--version-dir", str(registry.path(version)),
            "--stream", str(stream),
            "--targets", "0.8,0.9",
            "--sizes", "100,250,400",  # 400 leaves 100 items: skipped
            "--draws", "3",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    [v] = result["versions"]
    assert v["version"] == version and v["items"] == 500 and 0.6 < v["accuracy"] < 0.9
    assert v["empty_texts_left_out"] == 1
    assert [(c["target"], c["calibration_labels"]) for c in v["costs"]] == [
        (0.8, 100),
        (0.8, 250),
        (0.9, 100),
        (0.9, 250),
    ]
    assert all(c["evaluated_items"] == 500 - c["calibration_labels"] for c in v["costs"])
    assert all(c["oracle"]["mean"] > 0 and c["ratio"]["mean"] >= 1.0 for c in v["costs"])
    assert f"| {tmp_path.name} {version} |" in capsys.readouterr().out


def test_one_stream_per_version_or_one_for_all():
    with pytest.raises(ValueError, match="one per version"):
        run_bench_certify([Path("a"), Path("b")], [Path("x"), Path("y"), Path("z")], [0.9], [100])
