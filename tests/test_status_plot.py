"""The status page's picture: measured on held-out labels at training time, drawn on request."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from autoannotator.core.labels import LabelSet
from autoannotator.core.metrics import review_curve
from autoannotator.core.policies import policy_from_spec
from autoannotator.learning.pool import Source, VerifiedItem
from autoannotator.service.app import create_app
from autoannotator.service.status_plot import read_holdout_tradeoff, render, write_holdout_tradeoff
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests import tiny
from tests.tiny import PROJECT
from tests.tiny import publish_two_members as publish

LABELS = LabelSet.of(tiny.LABELS)


@pytest.fixture
def projects(tmp_path):
    return ProjectModels(tmp_path / "models")


def _holdout(corpus: list[tuple[str, str]]) -> list[VerifiedItem]:
    return [VerifiedItem(f"k{i}", t, y, Source.HUMAN, 0.0, i) for i, (t, y) in enumerate(corpus)]


def test_tradeoff_is_measured_on_held_out_labels_and_rises_to_one(projects, tiny_corpus, tiny_encoder):
    version = publish(projects, tiny_corpus, tiny_encoder)
    registry = projects.registry(PROJECT)
    ensemble = registry.load(version, LABELS)
    few, held = _holdout(tiny_corpus[:4]), _holdout(tiny_corpus[150:210])
    assert write_holdout_tradeoff(registry.root, version, ensemble, few, LABELS, "mean:0.75") is None
    curve = write_holdout_tradeoff(registry.root, version, ensemble, held, LABELS, "mean:0.75")
    assert curve is not None and read_holdout_tradeoff(registry.root) == json.loads(json.dumps(curve))
    assert curve["n_holdout"] == 60 and curve["share"][0] == 0.0 and curve["share"][-1] == 1.0
    assert curve["accuracy"][-1] == 1.0  # everything reviewed (perfectly): everything right
    assert np.all(np.diff(curve["accuracy"]) >= 0)


def test_the_curve_is_the_served_policys_labels_and_order(projects, tiny_corpus, tiny_encoder):
    """The status page once drew the mean-probability curve whatever the project served."""
    version = publish(projects, tiny_corpus, tiny_encoder)
    registry = projects.registry(PROJECT)
    ensemble = registry.load(version, LABELS)
    held = _holdout(tiny_corpus[150:210])
    gold = np.array([LABELS.index(it.label) for it in held])
    probs = ensemble.predict_proba([it.text for it in held])
    for spec in ("epsilon:0.5", "mean:0.75", "margin:0.2"):
        decision = policy_from_spec(spec).decide(probs)
        curve = write_holdout_tradeoff(registry.root, version, ensemble, held, LABELS, spec)
        assert curve is not None and curve["policy"] == spec
        assert curve == {
            "version": version,
            "n_holdout": 60,
            "policy": spec,
            **review_curve(decision.labels, decision.confidence, gold, steps=20),
        }
        assert curve["accuracy"][0] == round(float((decision.labels == gold).mean()), 4)


def test_status_png_is_served_with_and_without_a_measurement(
    projects, tiny_corpus, tiny_encoder, tmp_path, redis_url
):
    app = create_app(Settings(model_dir=tmp_path / "models", redis_url=redis_url), projects)
    client = app.test_client()
    empty = client.get(f"/projects/{PROJECT}/status.png")
    assert empty.status_code == 200 and empty.mimetype == "image/png"
    version = publish(projects, tiny_corpus, tiny_encoder)
    registry = projects.registry(PROJECT)
    write_holdout_tradeoff(
        registry.root,
        version,
        registry.load(version, LABELS),
        _holdout(tiny_corpus[150:210]),
        LABELS,
        "mean:0.75",
    )
    drawn = client.get(f"/projects/{PROJECT}/status.png")
    with Image.open(io.BytesIO(drawn.data)) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and drawn.data != empty.data
    assert f"/projects/{PROJECT}/status.png" in client.get("/status").get_data(as_text=True)


def test_render_shows_savings_from_the_counters():
    status = {"routed_share": 0.25, "counters": {"predictions": 200, "llm_calls": 50, "llm_cost_usd": 0.5}}
    curve = {"version": "v0002", "n_holdout": 40, "share": [0.0, 0.5, 1.0], "accuracy": [0.8, 0.95, 1.0]}
    png = render(status, curve)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
