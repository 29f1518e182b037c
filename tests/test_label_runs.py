"""The labelling run's record in Redis (the session's private Redis server): one run per project is
current, a retried chunk counts once, exactly one caller finishes a run, and /setup's polls start
at most one run per version."""

from __future__ import annotations

import threading

import pytest

from autoannotator.storage.label_runs import LabelRuns
from autoannotator.storage.redis_state import State

UID = "7.1700000000"


@pytest.fixture
def runs(redis_client) -> LabelRuns:
    return LabelRuns(State(redis_client, "human"))


def test_a_new_run_replaces_the_current_one(runs: LabelRuns) -> None:
    first = runs.start(UID, "v0001", "v0001 published")
    second = runs.start(UID, "v0002", "v0002 published")
    assert first is not None and second is not None and first.id != second.id
    assert not runs.is_current(UID, first.id) and runs.is_current(UID, second.id)
    # The older run's chunks find they are no longer current: nothing of theirs is counted.
    assert runs.add_chunk(UID, first.id, 100) is None
    assert runs.chunk_done(UID, first.id, 1, done=100) is None
    current = runs.current(UID)
    assert current is not None and (current.version, current.total, current.done) == ("v0002", 0, 0)


def test_only_if_new_starts_one_run_per_version_even_when_polls_race(runs: LabelRuns) -> None:
    started: list[object] = []

    def poll() -> None:
        started.append(runs.start(UID, "v0001", "project connected", only_if_new=True))

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(run is not None for run in started) == 1
    assert runs.start(UID, "v0002", "v0002 published", only_if_new=True) is not None


def test_chunks_count_once_and_one_caller_finishes(runs: LabelRuns) -> None:
    run = runs.start(UID, "v0001", "test")
    assert run is not None
    assert [runs.add_chunk(UID, run.id, n, cursor=c) for n, c in ((100, 120), (40, 170))] == [1, 2]
    runs.set_state(UID, run.id, "running", planned=True)
    runs.chunk_done(UID, run.id, 1, done=100, written=98, skipped=2, routed=10, moved_in=10)
    again = runs.chunk_done(UID, run.id, 1, done=100, written=98, skipped=2, routed=10, moved_in=10)
    assert again is not None and (again.chunks_done, again.done, again.written) == (1, 100, 98)
    after = runs.chunk_done(UID, run.id, 2, done=40, written=40)
    assert after is not None and (after.chunks_done, after.chunks, after.done, after.total) == (
        2,
        2,
        140,
        140,
    )
    assert after.cursor == 170 and after.planned and after.eta_s is not None
    assert [runs.finish(UID, run.id) for _ in range(3)] == [True, False, False]
    done = runs.current(UID)
    assert done is not None and done.state == "done" and done.finished and done.eta_s == 0.0
    assert done.as_dict()["moved_in"] == 10


def test_a_page_with_nothing_to_do_moves_the_cursor_but_queues_no_chunk(runs: LabelRuns) -> None:
    # A rerun of a version whose predictions are all in Label Studio already: the planner pages on
    # without queueing; the run has no chunk to wait for.
    run = runs.start(UID, "v0002", "project connected with v0002")
    assert run is not None
    assert runs.save_cursor(UID, run.id, 500)
    current = runs.current(UID)
    assert current is not None and (current.cursor, current.chunks, current.total) == (500, 0, 0)
    assert not runs.save_cursor(UID, "not-the-current-run", 900)


def test_a_cancelled_run_reads_as_finished_and_unknown_counts_are_refused(runs: LabelRuns) -> None:
    run = runs.start(UID, "v0001", "test")
    assert run is not None
    runs.cancel(UID, "replaced by hand")
    current = runs.current(UID)
    assert current is not None and current.state == "cancelled" and current.finished
    assert current.note == "replaced by hand"
    with pytest.raises(ValueError, match="unknown run counts"):
        runs.chunk_done(UID, run.id, 1, tasks=3)
    with pytest.raises(ValueError, match="unknown run state"):
        runs.set_state(UID, run.id, "sleeping")


def test_llm_reviews_are_claimed_once_per_version(redis_client) -> None:
    state = State(redis_client, "human")
    assert state.claim_llm_reviews(UID, "v0001", [1, 2, 3]) == {1, 2, 3}
    assert state.claim_llm_reviews(UID, "v0001", [2, 3, 4]) == {4}
    assert state.claim_llm_reviews(UID, "v0002", [2, 3]) == {2, 3}
    assert state.claim_llm_reviews(UID, "v0002", []) == set()
