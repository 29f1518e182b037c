"""The verified pool: precedence, a held-out split fixed by hashing, the watermark, the durable log."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError, CorruptStoreError, LabelMappingError
from autoannotator.learning.pool import Source, VerifiedItem, VerifiedPool
from tests import tiny

LABELS = LabelSet(tiny.LABELS)


def item(pool: VerifiedPool, key: str) -> VerifiedItem:
    found = pool.get(key)
    assert found is not None, key
    return found


def keyed(n: int, seed: int = 0, prefix: str = "t") -> list[tuple[str, str, str]]:
    return [(f"{prefix}{i}", text, label) for i, (text, label) in enumerate(tiny.make_corpus(n, seed))]


def test_human_overrides_llm_and_llm_never_overrides_human() -> None:
    pool = VerifiedPool(LABELS)
    assert pool.add("a", "shares rally", "bullish", Source.LLM)
    assert pool.add("a", "shares rally", "neutral", Source.HUMAN)
    assert not pool.add("a", "shares rally", "bearish", Source.LLM)
    assert (item(pool, "a").label, item(pool, "a").source) == ("neutral", Source.HUMAN)

    # An annotator who edits an annotation means the edit.
    assert pool.add("a", "shares rally", "bullish", Source.HUMAN)
    assert item(pool, "a").label == "bullish"
    # The oracle (a simulated human) and the seed set count as human; the LLM may revise its own label.
    assert pool.add("b", "stock slump", "bullish", Source.LLM)
    assert pool.add("b", "stock slump", "bearish", Source.LLM)
    assert pool.add("b", "stock slump", "neutral", Source.ORACLE)
    assert not pool.add("b", "stock slump", "bearish", Source.LLM)
    assert pool.add("c", "meeting", "neutral", Source.SEED)
    assert not pool.add("c", "meeting", "bullish", Source.LLM)
    assert [(it.key, it.label) for it in pool.items()] == [
        ("a", "bullish"),
        ("b", "neutral"),
        ("c", "neutral"),
    ]
    assert len(pool) == 3


def test_repeating_a_label_changes_nothing_and_confirming_one_does_not_count_as_growth() -> None:
    pool = VerifiedPool(LABELS)
    pool.add("a", "shares rally", "bullish", Source.LLM)
    assert not pool.add("a", "shares rally", "bullish", Source.LLM)
    pool.mark_trained()
    # A human confirming the LLM's label upgrades its provenance but teaches a model nothing new.
    assert pool.add("a", "shares rally", "bullish", Source.HUMAN)
    assert item(pool, "a").source is Source.HUMAN
    assert pool.growth_since_training() == 0
    assert not pool.add("a", "shares rally", "bearish", Source.LLM)


def test_bad_items_are_refused_and_a_bad_row_leaves_the_pool_unchanged() -> None:
    pool = VerifiedPool(LABELS)
    with pytest.raises(LabelMappingError, match="'positive'"):
        pool.add("a", "shares rally", "positive")
    with pytest.raises(BadInputError, match="empty text"):
        pool.add("a", "   ", "bullish")
    with pytest.raises(BadInputError, match="key"):
        pool.add("", "shares rally", "bullish")
    with pytest.raises(LabelMappingError):
        pool.add_many([("x", "shares rally", "bullish"), ("y", "stock slump", "nope")])
    assert len(pool) == 0
    with pytest.raises(ValueError, match="holdout_fraction"):
        VerifiedPool(LABELS, holdout_fraction=1.0)


def test_holdout_is_fixed_by_key_whatever_the_arrival_order() -> None:
    rows = keyed(1000)
    first, second = VerifiedPool(LABELS, seed=7), VerifiedPool(LABELS, seed=7)
    first.add_many(rows)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    for row in shuffled:
        second.add(*row)
    held = {it.key for it in first.holdout_items()}
    assert held == {it.key for it in second.holdout_items()}
    assert len(held) == 214  # holdout_fraction=0.2 of 1000 keys, drawn by a hash of seed and key
    trained = {it.key for it in first.train_items()}
    assert not held & trained and len(held | trained) == 1000
    # A relabel does not move an item across the split, and another seed draws another split.
    first.add(sorted(held)[0], "shares rally", "bullish", Source.HUMAN)
    assert {it.key for it in first.holdout_items()} == held
    other = VerifiedPool(LABELS, seed=8)
    other.add_many(rows)
    assert {it.key for it in other.holdout_items()} != held


def test_seed_items_are_never_held_out_because_the_first_version_trained_on_them() -> None:
    pool = VerifiedPool(LABELS, holdout_fraction=0.5)
    rows = keyed(200)
    would_hold = [r for r in rows if pool.is_holdout(r[0])]
    assert would_hold
    pool.add_many(rows, Source.SEED)
    assert pool.holdout_items() == []
    # Even after a human relabels a seed item, it stays a training item.
    key, text, _ = would_hold[0]
    pool.add(key, text, "neutral", Source.HUMAN)
    assert not pool.is_holdout(key)


def test_watermark_splits_new_items_from_replayable_ones() -> None:
    pool = VerifiedPool(LABELS, holdout_fraction=0.0)
    pool.add_many(keyed(50, prefix="old"))
    assert pool.growth_since_training() == 50
    pool.mark_trained()
    assert pool.growth_since_training() == 0 and pool.new_train_items() == []
    pool.add_many(keyed(10, seed=1, prefix="new"))
    relabel = "neutral" if item(pool, "old3").label != "neutral" else "bullish"
    pool.add("old3", item(pool, "old3").text, relabel)
    new_keys = {it.key for it in pool.new_train_items()}
    assert new_keys == {f"new{i}" for i in range(10)} | {"old3"}
    assert pool.growth_since_training() == 11

    replay = pool.replay_sample(20, rng_seed=5)
    assert len(replay) == 20 and len({it.key for it in replay}) == 20
    assert all(it.key.startswith("old") and it.key != "old3" for it in replay)
    assert replay == pool.replay_sample(20, rng_seed=5)
    assert replay != pool.replay_sample(20, rng_seed=6)
    assert len(pool.replay_sample(500)) == 49  # all older items when fewer exist
    # Uniform: over many draws every older item shows up.
    seen = {it.key for s in range(60) for it in pool.replay_sample(5, rng_seed=s)}
    assert len(seen) == 49


def test_mark_trained_up_to_a_watermark_keeps_later_arrivals_new() -> None:
    pool = VerifiedPool(LABELS, holdout_fraction=0.0)
    pool.add_many(keyed(5))
    mark = pool.last_seq
    pool.add("late", "shares surge", "bullish")  # arrives while a trainer is busy
    pool.mark_trained(mark)
    assert [it.key for it in pool.new_train_items()] == ["late"]


def test_log_round_trip_restores_items_split_and_watermark(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    pool = VerifiedPool(LABELS, path=path, seed=3)
    pool.add_many(keyed(30, prefix="s"), Source.SEED)
    pool.add_many(keyed(40, seed=2, prefix="h"), Source.LLM)
    pool.mark_trained()
    pool.add("h1", item(pool, "h1").text, "neutral", Source.HUMAN)
    pool.add("z", "investors fear losses", "bearish", Source.ORACLE)

    again = VerifiedPool(LABELS, path=path, seed=3)
    assert again.items() == pool.items()
    assert again.growth_since_training() == pool.growth_since_training() == 2
    assert again.holdout_items() == pool.holdout_items()
    assert again.new_train_items() == pool.new_train_items()
    assert not again.add("h1", item(pool, "h1").text, "bullish", Source.LLM)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["op"] for e in events].count("mark") == 1
    assert {"key": "z", "label": "bearish", "source": "oracle"}.items() <= events[-1].items()


def test_a_torn_last_line_is_dropped_and_later_appends_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    pool = VerifiedPool(LABELS, path=path)
    pool.add_many(keyed(5))
    with open(path, "a") as fh:
        fh.write('{"op": "put", "key": "torn", "te')  # a crash in the middle of a write
    again = VerifiedPool(LABELS, path=path)
    assert [it.key for it in again.items()] == [f"t{i}" for i in range(5)]
    again.add("after", "shares rally", "bullish")
    third = VerifiedPool(LABELS, path=path)
    assert [it.key for it in third.items()] == [*(f"t{i}" for i in range(5)), "after"]


def test_damage_before_the_end_or_a_foreign_label_is_refused_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    VerifiedPool(LABELS, path=path).add_many(keyed(3))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(CorruptStoreError, match=r"pool\.jsonl:2 ") as damaged:
        VerifiedPool(LABELS, path=path)
    assert not isinstance(damaged.value, BadInputError)  # a damaged store is ours, not the client's
    other = LabelSet(("negative", "positive"))
    path.write_text(lines[0] + "\n" + lines[1] + "\n")  # the log's id, then one event
    with pytest.raises(LabelMappingError, match="another label set"):
        VerifiedPool(other, path=path)


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    pool = VerifiedPool(LABELS, path=path)
    rows = keyed(400)

    def worker(part: int) -> None:
        for row in rows[part::4]:
            pool.add(*row)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pool) == 400
    assert sorted(it.seq for it in pool.items()) == list(range(1, 401))
    assert VerifiedPool(LABELS, path=path).items() == pool.items()


def test_removed_items_leave_the_pool_and_stay_gone_after_a_replay(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    pool = VerifiedPool(LABELS, path=path)
    pool.add_many([("a", "rally", "bullish"), ("b", "crash", "bearish"), ("c", "flat", "neutral")])
    pool.mark_trained()
    assert pool.remove(["b", "missing"]) == 1
    assert pool.remove(["b"]) == 0
    assert pool.get("b") is None and len(pool) == 2
    assert pool.growth_since_training() == 0  # a deletion is not growth
    again = VerifiedPool(LABELS, path=path)
    assert {it.key for it in again.items()} == {"a", "c"} and again.growth_since_training() == 0
    assert again.add("b", "crash", "bearish") and again.growth_since_training() == 1


# ---------------------------------------------------------------------------- refresh (many workers)


def _state(pool: VerifiedPool) -> tuple:
    return (
        sorted((i.key, i.text, i.label, i.source.value, i.seq) for i in pool.items()),
        pool.growth_since_training(),
        pool.last_seq,
    )


def test_a_kept_pool_catches_up_with_what_another_worker_appended(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    mine, theirs = VerifiedPool(LABELS, path=path), VerifiedPool(LABELS, path=path)
    mine.add_many(keyed(5, prefix="a"))
    written = path.stat().st_size
    assert theirs.refresh() == written and len(theirs) == 5  # the whole log: bytes read
    theirs.add_many(keyed(3, prefix="b"), Source.LLM)
    theirs.remove(["a0"])
    theirs.mark_trained()
    assert mine.refresh() == path.stat().st_size - written  # only what theirs appended
    assert _state(mine) == _state(theirs) == _state(VerifiedPool(LABELS, path=path))
    assert mine.refresh() == 0  # nothing new: nothing read
    mine.add("c0", "stocks rally", "bullish")  # its own events need no re-reading
    assert mine.refresh() == 0
    assert _state(mine) == _state(VerifiedPool(LABELS, path=path))


def test_an_append_after_unread_events_is_read_back_in_log_order(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    mine, theirs = VerifiedPool(LABELS, path=path), VerifiedPool(LABELS, path=path)
    theirs.add("k", "shares slump", "bearish", Source.LLM)
    mine.add("k", "shares slump", "bullish", Source.LLM)  # written after theirs, unaware of it
    assert mine.refresh() == path.stat().st_size  # theirs and its own event again: the log's order wins
    assert _state(mine) == _state(VerifiedPool(LABELS, path=path))
    assert mine.get("k").label == "bullish"


def test_a_replaced_or_deleted_log_is_read_again_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    mine = VerifiedPool(LABELS, path=path)
    mine.add_many(keyed(4))
    path.unlink()
    mine.refresh()
    assert len(mine) == 0 and mine.last_seq == 0  # the durable record is gone: so is the pool
    other = VerifiedPool(LABELS, path=tmp_path / "elsewhere.jsonl")
    other.add_many(keyed(2, prefix="z"))
    (tmp_path / "elsewhere.jsonl").replace(path)  # a restored backup: another file
    mine.refresh()
    assert sorted(i.key for i in mine.items()) == ["z0", "z1"]


def test_a_torn_event_appended_by_a_crashed_worker_is_cut_off_on_refresh(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    mine = VerifiedPool(LABELS, path=path)
    mine.add_many(keyed(3))
    size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b'{"op": "put", "key": "x", "te')
    mine.refresh()
    assert len(mine) == 3 and path.stat().st_size == size
    mine.add("y", "stocks rally", "bullish")
    assert _state(mine) == _state(VerifiedPool(LABELS, path=path))


def test_a_log_loaded_past_a_torn_line_is_then_read_on_not_again(tmp_path: Path) -> None:
    """Loading cuts the torn line and keeps the log's identity, so the next refresh reads only what
    was appended since, not the whole log once more."""
    path = tmp_path / "pool.jsonl"
    VerifiedPool(LABELS, path=path).add_many(keyed(3))
    with open(path, "ab") as fh:
        fh.write(b'{"op": "put", "key": "x", "te')
    mine = VerifiedPool(LABELS, path=path)
    assert len(mine) == 3
    size = path.stat().st_size
    VerifiedPool(LABELS, path=path).add("y", "stocks rally", "bullish")
    assert mine.refresh() == path.stat().st_size - size  # the one appended event, not the log
    assert _state(mine) == _state(VerifiedPool(LABELS, path=path))


def test_a_log_rewritten_in_the_same_file_is_told_apart_by_its_id(tmp_path: Path) -> None:
    """A deleted log's inode is often reused by the next file (seen in the e2e storm test: a kept
    pool read a rebuilt log from its old offset and cut a "torn" line off it). Rewriting the same
    file in place keeps the inode for sure; the random id in the log's first line tells them apart."""
    path = tmp_path / "pool.jsonl"
    mine = VerifiedPool(LABELS, path=path)
    mine.add_many(keyed(3))
    inode = path.stat().st_ino
    other_path = tmp_path / "rebuilt.jsonl"
    rebuilt = VerifiedPool(LABELS, path=other_path)
    rebuilt.add_many(keyed(8, seed=5, prefix="r"))
    rebuilt.remove(["r0"])
    with open(path, "r+b") as fh:  # the same inode, another log, longer than what `mine` read
        fh.write(other_path.read_bytes())
        fh.truncate()
    assert path.stat().st_ino == inode
    mine.refresh()
    assert _state(mine) == _state(rebuilt)
    assert path.read_bytes() == other_path.read_bytes()  # nothing was cut off the file
    mine.add("after", "shares rally", "bullish")
    assert _state(VerifiedPool(LABELS, path=path)) == _state(mine)


def test_a_log_begins_with_its_id_and_a_log_without_one_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    VerifiedPool(LABELS, path=path).add_many(keyed(2))
    first = json.loads(path.read_text().splitlines()[0])
    assert first["op"] == "log" and len(first["id"]) == 32
    old = tmp_path / "old.jsonl"  # written before logs named themselves
    old.write_text("".join(line + "\n" for line in path.read_text().splitlines()[1:]))
    kept = VerifiedPool(LABELS, path=old)
    assert [it.key for it in kept.items()] == ["t0", "t1"]
    VerifiedPool(LABELS, path=old).add("t2", "stocks slide", "bearish")  # another worker appends
    kept.refresh()
    assert [it.key for it in kept.items()] == ["t0", "t1", "t2"]
