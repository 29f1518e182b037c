"""The registry: versions built aside, published by swapping one pointer, never rewritten nor reused."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from autoannotator.core.labels import LabelSet
from autoannotator.errors import LabelMappingError, SpecialistLoadError
from autoannotator.models.ensemble import write_manifest
from autoannotator.models.specialists import NgramSpecialist
from autoannotator.storage.registry import MEMBER_PATTERN, Registry, member_name
from tests import tiny

LABELS = LabelSet(tiny.LABELS)


def save_ngrams(registry: Registry, n: int = 60, seed: int = 0, publish: bool = True) -> str:
    texts, ys = zip(*tiny.make_corpus(n, seed), strict=True)
    return registry.save_ensemble(
        LABELS,
        {
            "ngram-a": lambda d: NgramSpecialist.untrained(LABELS, "a").fit(texts, ys, d),
            "ngram-b": lambda d: NgramSpecialist.untrained(LABELS, "b", c=1.0).fit(texts, ys, d),
        },
        note="cold start",
        publish=publish,
    )


def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_save_ensemble_publishes_a_loadable_self_describing_version(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    assert registry.current() is None and registry.versions() == []
    version = save_ngrams(registry)
    assert version == "v0001" and registry.current() == "v0001" and registry.versions() == ["v0001"]
    manifest = json.loads((tmp_path / "reg/versions/v0001/ensemble.json").read_text())
    assert manifest["members"] == ["ngram-a", "ngram-b"]
    assert manifest["labels"] == list(LABELS.names) and manifest["note"] == "cold start"
    assert (tmp_path / "reg/CURRENT").read_text().strip() == "v0001"

    ensemble = registry.load("v0001", LABELS)
    assert ensemble.version == "v0001" and ensemble.names == ["a", "b"]
    probs = ensemble.predict_proba(["shares rally on record gains", "company holds meeting"])
    assert probs.shape == (2, 2, 3)
    assert [LABELS.names[i] for i in probs.mean(axis=0).argmax(axis=1)] == ["bullish", "neutral"]
    [entry] = registry.history()
    assert entry["event"] == "publish" and entry["version"] == "v0001" and entry["previous"] is None


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    version = registry.next_version()
    with pytest.raises(RuntimeError, match="halfway"), registry.stage(version) as tmp:
        (tmp / "member").mkdir()
        (tmp / "member" / "weights.bin").write_bytes(b"partial")
        raise RuntimeError("crashed halfway")
    assert os.listdir(tmp_path / "versions") == []
    assert registry.versions() == [] and registry.current() is None

    other = LabelSet(("negative", "positive"))
    texts, ys = zip(*tiny.make_corpus(30), strict=True)
    with pytest.raises(LabelMappingError):
        registry.save_ensemble(
            LABELS,
            {
                "ok": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d),
                "foreign": lambda d: NgramSpecialist.untrained(other).fit(
                    texts, ["positive" if y == "bullish" else "negative" for y in ys], d
                ),
            },
        )
    assert os.listdir(tmp_path / "versions") == [] and registry.current() is None


def test_versions_are_never_overwritten_and_names_are_checked(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    save_ngrams(registry)
    with pytest.raises(FileExistsError), registry.stage("v0001"):
        pass
    assert registry.next_version() == "v0002"  # allocation skips what exists
    for bad in ("../escape", "v1", "current"):
        with pytest.raises(ValueError, match="version name"):
            registry.path(bad)
    with pytest.raises(SpecialistLoadError, match=r"v0009.*known: v0001"):
        registry.load("v0009", LABELS)
    with pytest.raises(SpecialistLoadError, match=r"ensemble\.json"):
        registry.publish("v0002")  # allocated but never built: cannot be served
    assert registry.current() == "v0001"
    with pytest.raises(ValueError, match="plain names"):
        registry.save_ensemble(LABELS, {"../x": lambda d: NgramSpecialist.untrained(LABELS)})


def test_a_version_built_by_hand_is_refused_at_publish_when_a_member_name_is_not_plain(
    tmp_path: Path,
) -> None:
    """Every way of building a version ends in publish, so that is where member names are checked."""
    registry = Registry(tmp_path)
    first = save_ngrams(registry)
    texts, ys = zip(*tiny.make_corpus(30, 1), strict=True)
    version = registry.next_version()
    with registry.stage(version) as staged:
        NgramSpecialist.untrained(LABELS).fit(texts, ys, staged / "m0-fin sent (v2)")
        write_manifest(staged, version=version, labels=LABELS, members=["m0-fin sent (v2)"])
    with pytest.raises(ValueError, match=r"'m0-fin sent \(v2\)'.*plain names"):
        registry.publish(version)
    assert registry.current() == first
    assert [e["version"] for e in registry.history()] == [first]


@pytest.mark.parametrize(
    ("index", "source", "name"),
    [
        (0, "ProsusAI/finbert", "m0-finbert"),
        (1, "/models/fin sent (v2)", "m1-fin-sent-v2"),
        (2, "runs/x/models/versions/v0001/m2-ngram-linear", "m2-ngram-linear"),
        (0, "/", "m0-model"),
        (3, "..", "m3-model"),
        (0, "/data/ünïcode…", "m0-n-code"),
        (4, "/" + "a" * 300, "m4-" + "a" * 100),
    ],
)
def test_member_names_from_sources_are_plain_path_components(index: int, source: str, name: str) -> None:
    assert member_name(index, source) == name
    assert MEMBER_PATTERN.fullmatch(name)


def test_later_publishes_and_rollbacks_never_touch_a_published_directory(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    first = save_ngrams(registry, seed=1)
    before = tree_hash(registry.path(first))
    assert sorted(before) == [  # the manifest and three files per member
        "ensemble.json",
        *(f"{m}/{f}" for m in ("ngram-a", "ngram-b") for f in ("head.npz", "ngrams.json", "specialist.json")),
    ]
    second = save_ngrams(registry, seed=2)
    registry.publish(first)  # roll back
    assert registry.current() == first
    registry.publish(second)
    assert tree_hash(registry.path(first)) == before
    assert [(e["version"], e["previous"]) for e in registry.history()] == [
        (first, None),
        (second, first),
        (first, second),
        (second, first),
    ]


def test_staging_leftovers_of_a_killed_process_are_invisible_and_can_be_swept(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    save_ngrams(registry)
    stale = tmp_path / "versions" / ".tmp-v0002-abc"
    stale.mkdir()
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / "versions" / ".tmp-v0003-def"
    fresh.mkdir()
    assert registry.versions() == ["v0001"]
    assert registry.discard_stale_stages() == [".tmp-v0002-abc"]
    assert sorted(os.listdir(tmp_path / "versions")) == [".tmp-v0003-def", "v0001"]


def test_history_survives_a_torn_last_line(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    save_ngrams(registry)
    registry.record({"event": "rejected", "version": "v0002", "reason": "worse"})
    with open(tmp_path / "history.jsonl", "a") as fh:
        fh.write('{"event": "rej')
    assert [e["event"] for e in registry.history()] == ["publish", "rejected"]


def test_concurrent_allocation_from_threads_gives_unique_sequential_names(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    names: list[str] = []
    lock = threading.Lock()

    def allocate() -> None:
        for _ in range(10):
            name = Registry(tmp_path).next_version()  # a Registry per thread, as separate workers would
            with lock:
                names.append(name)

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == [f"v{i:04d}" for i in range(1, 81)]
    assert registry.next_version() == "v0081"


def _allocate_in_child(root: str) -> list[str]:
    return [Registry(Path(root)).next_version() for _ in range(10)]


def test_concurrent_allocation_from_processes_gives_unique_names(tmp_path: Path) -> None:
    # fork: the child needs only the already-imported registry; spawning would re-import torch per child.
    with multiprocessing.get_context("fork").Pool(4) as workers:
        batches = workers.map(_allocate_in_child, [str(tmp_path)] * 4)
    names = [n for batch in batches for n in batch]
    assert sorted(names) == [f"v{i:04d}" for i in range(1, 41)]
    assert all(batch == sorted(batch) for batch in batches)  # each caller sees its names increase
    assert np.unique(names).size == 40
