"""The one first-version builder the backend's train job and ``autoannotator simulate`` share."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoannotator.core.labels import LabelSet
from autoannotator.errors import TrainingError
from autoannotator.learning.coldstart import ColdStartConfig
from autoannotator.learning.first_version import FirstVersionPlan, build_first_version
from autoannotator.storage.registry import Registry
from tests import tiny

LABELS = LabelSet(tiny.LABELS)
NGRAM_ONLY = ColdStartConfig(kinds=("ngram-linear",))


def seed(n: int = 60) -> tuple[list[str], list[str]]:
    corpus = tiny.make_corpus(n, seed=0)
    return [t for t, _ in corpus], [y for _, y in corpus]


def test_a_cold_start_is_published_with_its_report_in_the_manifest_and_the_history(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "a")
    texts, ys = seed()
    built = build_first_version(
        registry, LABELS, FirstVersionPlan(cold_start=NGRAM_ONLY), seed_texts=texts, seed_labels=ys
    )
    assert (built.version, built.members) == ("v0001", ["m0-ngram-linear"])
    assert registry.current() == "v0001"
    manifest = registry.manifest("v0001")
    assert manifest["members"] == built.members and manifest["metrics"]["start"] == built.report
    assert built.report["members"] == built.members and sum(built.report["seed_counts"].values()) == 60
    published = registry.history()[-1]
    assert (published["event"], published["reason"], published["members"]) == (
        "publish",
        "initial members",
        built.members,
    )


def test_given_models_keep_their_kind_names_in_vote_order(tmp_path: Path) -> None:
    """What the sweep does: later runs start from the first run's cold-start members."""
    first = Registry(tmp_path / "first")
    texts, ys = seed()
    plan = FirstVersionPlan(cold_start=ColdStartConfig(kinds=("ngram-linear", "ngram-linear")))
    built = build_first_version(first, LABELS, plan, seed_texts=texts, seed_labels=ys)
    sources = tuple(str(first.path(built.version) / m) for m in reversed(built.members))

    again = Registry(tmp_path / "again")
    copied = build_first_version(again, LABELS, FirstVersionPlan(models=sources))
    assert copied.members == ["m0-ngram-linear", "m1-ngram-linear"]
    assert copied.report == {"given_models": list(sources), "members": copied.members}
    assert again.load("v0001", LABELS).k == 2


def test_a_cold_start_without_enough_seed_labels_publishes_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(TrainingError, match="too few examples"):
        build_first_version(
            registry,
            LABELS,
            FirstVersionPlan(cold_start=NGRAM_ONLY),
            seed_texts=["up"],
            seed_labels=["bullish"],
        )
    with pytest.raises(ValueError, match="2 seed texts but 1 seed labels"):
        build_first_version(
            registry, LABELS, FirstVersionPlan(), seed_texts=["a", "b"], seed_labels=["bullish"]
        )
    assert registry.current() is None and registry.versions() == []


def test_the_plan_says_where_the_members_come_from() -> None:
    assert FirstVersionPlan(models=("a/b",)).source == "models"
    assert FirstVersionPlan(catalog_top_k=2).source == "catalog"
    assert FirstVersionPlan().source == "cold-start" and FirstVersionPlan().needs_seed
    with pytest.raises(ValueError, match="not both"):
        FirstVersionPlan(models=("a/b",), catalog_top_k=2)
    for bad in ({"catalog_top_k": 0}, {"contrastive_pairs": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FirstVersionPlan(**bad)  # type: ignore[arg-type]
