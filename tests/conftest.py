"""Fixtures shared by the whole suite: tiny models built once per session, paths to shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiny

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_corpus() -> list[tuple[str, str]]:
    return tiny.make_corpus(240, seed=1)


@pytest.fixture
def shared_dataset():
    """Path to a ``../shared/datasets/<name>`` folder, or a skip saying why it is absent."""

    def get(name: str) -> Path:
        path = SHARED_DATASETS / name
        if not (path / "train.jsonl").is_file():
            pytest.skip(f"{path} is absent: the shared benchmark datasets are not beside this checkout")
        return path

    return get
