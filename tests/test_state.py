"""Redis state shared by web and rq workers: modes, counters, flags, locks, and a Redis that is down.

Runs against the session's private Redis (emptied before each test).
"""

from __future__ import annotations

import time
from functools import partial

import pytest

from autoannotator.settings import REVIEW_MODES
from autoannotator.storage.redis_state import (
    COUNTERS,
    PREDICT_CLAIM_S,
    QUEUES,
    TRAIN_PENDING_TTL_S,
    ProjectInfo,
    State,
    StateUnavailableError,
)

DEAD_URL = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
UID = "3.1700000000"


@pytest.fixture
def state(redis_url: str) -> State:
    return State.from_url(redis_url, "human")


# ---------------------------------------------------------------------------- review mode


def test_mode_defaults_to_the_settings_and_set_mode_switches_it(state):
    assert state.mode(UID) == "human"
    assert State(state.redis, "off").mode(UID) == "off"  # the default is the environment's
    state.set_mode(UID, "llm")
    assert state.mode(UID) == "llm"
    assert UID in state.projects()  # a project whose mode was set is known
    state.set_mode(UID, "off")
    assert state.mode(UID) == "off"
    assert state.mode("4.1700000000") == "human"  # other projects keep the default


def test_an_invalid_mode_is_refused_with_the_choices(state):
    with pytest.raises(ValueError, match=r"review mode must be one of .*'llm'.*got 'gpt'"):
        state.set_mode(UID, "gpt")
    assert state.mode(UID) == "human"


def test_a_garbage_mode_in_redis_falls_back_to_the_default(state):
    state.redis.set(f"aa:p:{UID}:mode", "bogus")
    assert state.mode(UID) == "human"


def test_label_studio_extra_params_apply_only_when_they_change(state):
    assert state.mode_from_label_studio(UID, {"review_mode": "llm"}) == "llm"
    assert state.mode(UID) == "llm"
    # The project manager switches on our settings page ...
    state.set_mode(UID, "off")
    # ... and the next /setup, sending the same extra params as before, does not undo it.
    assert state.mode_from_label_studio(UID, {"review_mode": "llm"}) is None
    assert state.mode(UID) == "off"
    # A change made in Label Studio wins again (case and blanks do not matter).
    assert state.mode_from_label_studio(UID, {"review_mode": " Human "}) == "human"
    assert state.mode(UID) == "human"


@pytest.mark.parametrize("params", [None, "", [], {}, {"threshold": 0.3}, {"other": "llm"}])
def test_extra_params_without_a_review_mode_change_nothing(state, params):
    state.set_mode(UID, "off")
    assert state.mode_from_label_studio(UID, params) is None
    assert state.mode(UID) == "off"


def test_an_unknown_mode_in_extra_params_is_refused_and_remembers_nothing(state):
    with pytest.raises(ValueError, match=r"extra_params review_mode must be one of .*got 'robots'"):
        state.mode_from_label_studio(UID, {"review_mode": "robots"})
    assert state.mode(UID) == "human"
    # A later valid value is a change, so it applies.
    assert state.mode_from_label_studio(UID, {"review_mode": "off"}) == "off"


def test_review_modes_are_the_three_documented_ones():
    assert REVIEW_MODES == ("llm", "human", "off")


# ---------------------------------------------------------------------------- projects, counters


def test_remember_keeps_the_ls_url_a_webhook_does_not_carry(state):
    assert state.info(UID) is None
    state.remember(ProjectInfo(UID, 3, "http://ls:8080", "<View/>"))
    state.remember(ProjectInfo(UID, 3, "", "<View>new</View>"))  # a webhook: no URL
    assert state.info(UID) == ProjectInfo(UID, 3, "http://ls:8080", "<View>new</View>")
    assert state.projects() == [UID]


def test_counters_add_ints_and_floats(state):
    assert state.counters(UID) == dict.fromkeys(COUNTERS, 0.0)
    state.count(UID, predictions=3, routed=1)
    state.count(UID, predictions=2, llm_cost_usd=0.25)
    state.count(UID, llm_cost_usd=0.5, routed=0)
    counters = state.counters(UID)
    assert counters["predictions"] == 5 and counters["routed"] == 1
    assert counters["llm_cost_usd"] == pytest.approx(0.75)
    assert set(counters) == set(COUNTERS)


def test_counting_predictions_reads_the_mode_in_the_same_round_trip(state):
    assert state.count_predictions(UID, 4, 1) == "human"
    state.set_mode(UID, "llm")
    assert state.count_predictions(UID, 2, 0) == "llm"
    state.redis.set(f"aa:p:{UID}:mode", "bogus")
    assert state.count_predictions(UID, 0, 0) == "human"  # garbage: the default, as mode() says
    counters = state.counters(UID)
    assert counters["predictions"] == 6 and counters["routed"] == 1


def test_a_counter_that_held_a_float_still_adds_an_int(state):
    state.count(UID, llm_cost_usd=0.5)
    state.count(UID, llm_cost_usd=1)  # e.g. a price table that yields a whole number
    assert state.counters(UID)["llm_cost_usd"] == pytest.approx(1.5)


def test_an_unknown_counter_is_refused_and_nothing_is_counted(state):
    with pytest.raises(ValueError, match=r"unknown counters \['typo'\]"):
        state.count(UID, predictions=1, typo=1)
    assert state.counters(UID)["predictions"] == 0


# ---------------------------------------------------------------------------- flags


def test_claim_training_is_exclusive_until_released_and_expires(state):
    assert not state.training_pending(UID)
    assert state.claim_training(UID)
    assert state.training_pending(UID)
    assert not state.claim_training(UID)
    ttl = state.redis.ttl(f"aa:p:{UID}:train_pending")
    assert 0 < ttl <= TRAIN_PENDING_TTL_S  # a killed worker cannot block trainings forever
    state.release_training(UID)
    assert not state.training_pending(UID)
    assert state.claim_training(UID)
    assert state.claim_training("4.1700000000")  # per project


def test_claim_sync_once_until_forgotten(state):
    assert state.claim_sync(UID)
    assert not state.claim_sync(UID)
    state.forget_sync(UID)
    assert state.claim_sync(UID)


def test_the_first_writer_of_a_tasks_version_keeps_it_and_may_claim_it_again(state):
    claim = partial(state.claim_prediction_writes, UID, "v0002", run_stale_s=900, now=1000.0)
    assert claim([1, 2, 3], "run") == {1, 2, 3}
    assert claim([2, 3, 4], "predict") == {4}  # LS stores /predict's answer for 4 only
    assert claim([1, 2, 4, 5], "run") == {1, 2, 5}  # a retried chunk keeps its own; 4 is LS's
    assert claim([4], "predict") == {4}  # LS asking again for the task it was answered
    # Another version's writes are another record.
    assert state.claim_prediction_writes(UID, "v0003", [4], "run", run_stale_s=900, now=1000.0) == {4}
    assert claim([], "run") == set()


def test_a_stale_claim_of_the_other_writer_frees_the_task(state):
    claim = partial(state.claim_prediction_writes, UID, "v0002", run_stale_s=900)
    assert claim([1], "predict", now=1000.0) == {1}
    assert claim([1], "run", now=1000.0 + PREDICT_CLAIM_S) == set()  # LS may still store it
    assert claim([1], "run", now=1001.0 + PREDICT_CLAIM_S) == {1}  # LS gave up on that /predict
    assert claim([1], "predict", now=1100.0 + PREDICT_CLAIM_S) == set()  # the run's chunk is alive
    assert claim([1], "predict", now=2000.0 + PREDICT_CLAIM_S) == {1}  # its chunk died unretried
    with pytest.raises(ValueError, match="owner"):
        claim([1], "someone")


def test_get_and_put(state):
    assert state.get(UID, "last_training") is None
    state.put(UID, "last_training", "v0001 published")
    assert state.get(UID, "last_training") == "v0001 published"


# ---------------------------------------------------------------------------- locks


def test_a_lock_is_exclusive_and_released_after_the_block(state):
    with state.lock("train", UID, timeout_s=30, wait_s=0) as got:
        assert got
        with state.lock("train", UID, timeout_s=30, wait_s=0) as second:
            assert not second
        t0 = time.perf_counter()
        with state.lock("train", UID, timeout_s=30, wait_s=0.2) as waited:
            assert not waited
        assert 0.05 < time.perf_counter() - t0 < 5  # it waited (redis-py polls every 0.1 s)
        with state.lock("pool", UID, timeout_s=30, wait_s=0) as other_kind:
            assert other_kind
    with state.lock("train", UID, timeout_s=30, wait_s=0) as again:
        assert again


def test_a_lock_is_released_when_the_block_raises(state):
    with pytest.raises(RuntimeError), state.lock("pool", UID, timeout_s=30, wait_s=0) as got:
        assert got
        raise RuntimeError("boom")
    with state.lock("pool", UID, timeout_s=30, wait_s=0) as again:
        assert again


def test_a_lock_whose_holder_died_expires(state):
    with state.lock("train", UID, timeout_s=0.3, wait_s=0) as got:
        assert got
        time.sleep(0.5)  # the holder outlived its timeout: released with a warning, not an error
        with state.lock("train", UID, timeout_s=30, wait_s=0) as other:
            assert other


# ---------------------------------------------------------------------------- Redis down


def _calls(state: State) -> dict[str, object]:
    info = ProjectInfo(UID, 3, "http://ls", "<View/>")
    return {
        "remember": lambda: state.remember(info),
        "info": lambda: state.info(UID),
        "projects": lambda: state.projects(),
        "mode": lambda: state.mode(UID),
        "set_mode": lambda: state.set_mode(UID, "llm"),
        "mode_from_label_studio": lambda: state.mode_from_label_studio(UID, {"review_mode": "llm"}),
        "routing": lambda: state.routing(UID),
        "set_routing": lambda: state.set_routing(UID, "target:0.9", 0.1),
        "set_calibration": lambda: state.set_calibration(UID, "{}"),
        "claim_calibration": lambda: state.claim_calibration(UID),
        "release_calibration": lambda: state.release_calibration(UID),
        "claim_llm_seeds": lambda: state.claim_llm_seeds(UID),
        "release_llm_seeds": lambda: state.release_llm_seeds(UID),
        "claim_seed_tab": lambda: state.claim_seed_tab(UID),
        "release_seed_tab": lambda: state.release_seed_tab(UID),
        "count": lambda: state.count(UID, predictions=1, llm_cost_usd=0.1),
        "counters": lambda: state.counters(UID),
        "count_predictions": lambda: state.count_predictions(UID, 1, 1),
        "claim_training": lambda: state.claim_training(UID),
        "release_training": lambda: state.release_training(UID),
        "training_pending": lambda: state.training_pending(UID),
        "claim_sync": lambda: state.claim_sync(UID),
        "claim_llm_reviews": lambda: state.claim_llm_reviews(UID, "v0001", [1]),
        "claim_prediction_writes": lambda: state.claim_prediction_writes(
            UID, "v1", [1], "run", run_stale_s=9
        ),
        "forget_sync": lambda: state.forget_sync(UID),
        "get": lambda: state.get(UID, "x"),
        "put": lambda: state.put(UID, "x", "y"),
        "queue_depths": lambda: state.queue_depths(),
        "jobs_in_flight": lambda: state.jobs_in_flight(),
        "enqueue": lambda: state.enqueue("ingest", print, "x"),
        "lock": lambda: state.lock("pool", UID, timeout_s=1, wait_s=0).__enter__(),
        "guard": lambda: _read_under_guard(state),
    }


def _read_under_guard(state: State) -> None:
    """What :mod:`.label_runs` does: its own Redis calls inside ``State.guard``."""
    with state.guard():
        state.redis.get("aa:anything")


def test_every_method_says_redis_is_unavailable_naming_where_but_not_the_password():
    state = State.from_url(DEAD_URL, "human")
    assert state.ping() is False
    for name, call in _calls(state).items():
        t0 = time.perf_counter()
        with pytest.raises(StateUnavailableError) as info:
            call()  # type: ignore[operator]
        message = str(info.value)
        assert "127.0.0.1:1" in message, name
        assert "hunter2" not in message and "hunter2" not in repr(info.value.__cause__), name
        assert time.perf_counter() - t0 < 30, f"{name} hung on a dead Redis"  # refused at once


def test_the_method_list_above_covers_every_public_method():
    public = {n for n in dir(State) if not n.startswith("_")} - {"from_url", "ping", "queue", "redis"}
    assert public <= set(_calls(State.from_url(DEAD_URL, "human")))


def test_queues_are_named_and_an_unknown_one_is_refused(state):
    assert QUEUES == ("ingest", "review", "train", "label")
    assert state.queue_depths() == dict.fromkeys(QUEUES, 0)
    with pytest.raises(ValueError, match="unknown queue 'slow'"):
        state.queue("slow")
    assert state.ping()


def test_jobs_in_flight_counts_the_jobs_queued_on_every_queue(state):
    """Running jobs count too; real workers exercise that in tests/test_flow_e2e.py (drain)."""
    assert state.jobs_in_flight() == 0
    state.enqueue("ingest", print, "a")
    state.enqueue("train", print, "b")
    assert state.jobs_in_flight() == 2


def test_a_kept_alive_lock_outlives_its_timeout_and_refreshes_named_keys(state: State) -> None:
    state.claim_training(UID)
    # A heartbeat every 2 s; the lock is lost only if one comes over 4 s late.
    with state.lock("train", UID, timeout_s=6, wait_s=0, keep_alive=("train_pending",)) as got:
        assert got
        time.sleep(8)  # past the timeout: only the heartbeat keeps it
        with state.lock("train", UID, timeout_s=6, wait_s=0) as second:
            assert not second
        assert 0 < state.redis.ttl(f"aa:p:{UID}:train_pending") <= 6
    with state.lock("train", UID, timeout_s=6, wait_s=0) as after:
        assert after
