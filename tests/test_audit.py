"""The live audit's pieces without Label Studio (the draw, the mark, the log and its estimates), and
the choice of seed tasks for the LLM-seeded start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoannotator.core.guarantee import accuracy_interval
from autoannotator.errors import CorruptStoreError
from autoannotator.learning.audit import (
    ACCEPTED,
    ROUTED,
    AuditLog,
    AuditMark,
    AuditRecord,
    check_share,
    drawn,
    estimate,
    per_version,
)
from autoannotator.learning.seeds import choose_seeds


def test_the_draw_is_uniform_repeatable_and_new_for_each_version() -> None:
    ids = range(20_000)
    first = [drawn(i, "v0001", 0.1) for i in ids]
    assert first == [drawn(i, "v0001", 0.1) for i in ids]  # every process, every request
    assert abs(sum(first) / len(first) - 0.1) < 0.006  # ~4.5 sd of a binomial share
    second = [drawn(i, "v0002", 0.1) for i in ids]
    both = sum(a and b for a, b in zip(first, second, strict=True))
    assert abs(both / len(first) - 0.01) < 0.003  # independent draws per version
    assert not any(drawn(i, "v0001", 0.0) for i in ids)
    # A larger share keeps every task the smaller one drew (the same uniform number per task).
    assert all(drawn(i, "v0001", 0.2) for i, d in zip(ids, first, strict=True) if d)


def test_the_mark_reads_back_and_foreign_values_are_not_marks() -> None:
    mark = AuditMark("v0003", ACCEPTED, "very: positive")
    assert mark.value == "v0003 accepted: very: positive"
    assert AuditMark.parse(mark.value) == mark
    for foreign in (None, "", 1, "yes", "v0003 maybe: Positive", " accepted: Positive"):
        assert AuditMark.parse(foreign) is None
    with pytest.raises(ValueError):
        AuditMark("v 3", ROUTED, "x")


def test_the_share_is_checked() -> None:
    assert check_share("0.05") == 0.05
    for bad in (-0.1, 0.51, "many"):
        with pytest.raises(ValueError):
            check_share(bad)  # type: ignore[arg-type]


def _record(task_id: int, gold: str, predicted: str, version: str = "v0001", **kw) -> AuditRecord:
    return AuditRecord(task_id, f"text {task_id}", gold, version, kw.pop("route", ACCEPTED), predicted, **kw)


def test_the_log_keeps_the_latest_label_of_each_task_and_survives_a_cut_last_line(tmp_path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.records() == []
    log.add(_record(1, "Positive", "Positive"))
    log.add(_record(2, "Negative", "Positive"))
    log.add(_record(1, "Neutral", "Positive"))  # the annotator edited the annotation
    with open(log.path, "a", encoding="utf-8") as fh:
        fh.write('{"task_id": 3, "te')  # a crash in the middle of a write
    records = log.records()
    assert [(r.task_id, r.gold) for r in records] == [(1, "Neutral"), (2, "Negative")]
    assert all(r.at > 0 for r in records)
    with open(log.path, "a", encoding="utf-8") as fh:
        fh.write("\n" + json.dumps({"not": "a record"}) + "\n")
    with pytest.raises(CorruptStoreError, match="not an audit record"):
        log.records()


def test_an_unchanged_log_is_parsed_once_and_a_change_by_another_writer_is_seen(
    tmp_path, monkeypatch
) -> None:
    writer, reader = AuditLog(tmp_path / "audit.jsonl"), AuditLog(tmp_path / "audit.jsonl")
    writer.add(_record(1, "Positive", "Positive"))
    parsed = []
    real_parse = AuditLog._parse
    monkeypatch.setattr(AuditLog, "_parse", lambda self: parsed.append(1) or real_parse(self))
    first = reader.records()
    assert reader.records() == first and len(parsed) == 1
    writer.add(_record(2, "Negative", "Positive"))  # another process appends
    assert [r.task_id for r in reader.records()] == [1, 2] and len(parsed) == 2
    reader.records().clear()  # a caller's list is its own
    assert len(reader.records()) == 2


def test_estimates_count_accepted_labels_per_version_with_an_exact_interval() -> None:
    records = [
        *(_record(i, "Positive", "Positive") for i in range(18)),
        *(_record(100 + i, "Negative", "Positive") for i in range(2)),
        # Routed tasks are audited too (they calibrate), but do not measure the accepted labels.
        *(_record(200 + i, "Negative", "Positive", route=ROUTED) for i in range(5)),
        # The LLM labelled these routed tasks; people agreed with it on 3 of 4.
        *(_record(300 + i, "Neutral", "Positive", route=ROUTED, llm_label="Neutral") for i in range(3)),
        _record(303, "Neutral", "Positive", route=ROUTED, llm_label="Negative"),
        *(_record(400 + i, "Neutral", "Neutral", version="v0002") for i in range(7)),
    ]
    overall = estimate(records)
    assert (overall.audited, overall.accepted, overall.correct) == (36, 27, 25)
    low, high = accuracy_interval(25, 27)
    assert (overall.low, overall.high) == (round(low, 4), round(high, 4))
    assert overall.low < 25 / 27 < overall.high
    assert (overall.llm_reviewed, overall.llm_agreed, overall.llm_agreement) == (4, 3, 0.75)
    first, second = per_version(records)
    assert (first.version, first.accepted, first.correct, first.accuracy) == ("v0001", 20, 18, 0.9)
    assert (second.version, second.accepted, second.accuracy, second.llm_agreement) == ("v0002", 7, 1.0, None)
    assert second.high == 1.0 and second.low < 1.0
    empty = estimate([])
    assert empty.accuracy is None and empty.low is None and empty.as_dict()["accuracy"] is None


def test_seeds_cover_every_cluster_once() -> None:
    """Three tight groups of unequal size: three seeds take one from each, the one nearest its
    centre, not three from the biggest group as an import order might."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    sizes = (300, 30, 10)
    vectors = np.vstack([c + 0.01 * rng.standard_normal((n, 8)) for c, n in zip(centres, sizes, strict=True)])
    group = np.repeat(np.arange(3), sizes)
    chosen = choose_seeds(vectors, 3)
    assert sorted(group[chosen]) == [0, 1, 2] and len(set(chosen)) == 3
    for i in chosen:
        members = vectors[group == group[i]]
        nearest = np.linalg.norm(members - members.mean(axis=0), axis=1).min()
        assert np.linalg.norm(vectors[i] - members.mean(axis=0)) <= nearest + 0.02
    assert choose_seeds(vectors[:2], 5) == [0, 1] and choose_seeds(vectors, 0) == []
    assert choose_seeds(vectors, 3) == chosen  # repeatable
