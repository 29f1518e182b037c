"""The rq jobs run in-process (no worker, no Label Studio): ingest, cold-start gating, training.

Uses the session's private Redis (emptied before each test), and a model store under
``tmp_path``. The jobs that talk to Label Studio (sync, review) are covered by tests/test_flow_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rq import Queue, SimpleWorker, Worker

from autoannotator.errors import (
    AutoAnnotatorError,
    LabelMappingError,
    NotConfiguredError,
    StateUnavailableError,
    TrainingError,
)
from autoannotator.labelstudio.config import parse_label_config
from autoannotator.labelstudio.fields import votes_text
from autoannotator.learning.audit import AuditLog, drawn_for_calibration
from autoannotator.learning.coldstart import ColdStartConfig
from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.learning.refine import RefineConfig
from autoannotator.models.specialists import NgramSpecialist
from autoannotator.service import jobs, training
from autoannotator.service.context import Context
from autoannotator.service.ingest import seed_shortfall
from autoannotator.service.queueing import JOBS, request_sync, request_training
from autoannotator.service.status import project_status
from autoannotator.service.worker import worker_class
from autoannotator.settings import Settings
from autoannotator.storage.redis_state import ProjectInfo
from tests import tiny

UID = "5.1700000000"
CONFIG = (Path(__file__).resolve().parents[1] / "label_config" / "sentiment.xml").read_text()
LABELS = parse_label_config(CONFIG).labels  # Positive, Negative, Neutral; text at $text
AS_SENTIMENT = {"bullish": "Positive", "bearish": "Negative", "neutral": "Neutral"}
SEED_LABELS = 10  # the cold start waits for 8 training labels (a fifth is held out)


@pytest.fixture
def make_ctx(tmp_path, redis_url):
    """``make_ctx(**env)``: settings from an environment, the project remembered, the jobs' context set."""

    def make(**env: str) -> Context:
        settings = Settings.from_env(
            {
                "AUTOANNOTATOR_MODEL_DIR": str(tmp_path / "models"),
                "AUTOANNOTATOR_REDIS_URL": redis_url,
                "AUTOANNOTATOR_COLD_START_KINDS": "ngram-linear",
                "AUTOANNOTATOR_SEED_LABELS": str(SEED_LABELS),
                **env,
            }
        )
        ctx = Context.from_settings(settings)
        ctx.state.remember(ProjectInfo(UID, 5, "http://ls.invalid", CONFIG))
        jobs.bind_context(ctx)
        return ctx

    yield make
    jobs.bind_context(None)


@pytest.fixture
def ctx(make_ctx):
    return make_ctx()


def choice(label: str) -> dict:
    return {
        "id": 1,
        "result": [
            {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}
        ],
    }


def annotate(task_id: int, text: str, label: str) -> str:
    return jobs.ingest_annotation(UID, {"id": task_id, "data": {"text": text}}, choice(label))


def pool_of(ctx: Context) -> VerifiedPool:
    return VerifiedPool(LABELS, path=ctx.pool_path(UID))


def train_jobs(ctx: Context) -> list:
    return Queue("train", connection=ctx.state.redis).jobs


def corpus(n: int, seed: int = 3) -> list[tuple[str, str]]:
    return [(text, AS_SENTIMENT[y]) for text, y in tiny.make_corpus(n, seed=seed)]


# ---------------------------------------------------------------------------- ingest


def count_pool_builds(monkeypatch) -> list[int]:
    """A list that grows by one each time a VerifiedPool is built (rather than refreshed)."""
    built: list[int] = []
    real_init = VerifiedPool.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(VerifiedPool, "__init__", counting_init)
    return built


def test_two_workers_keep_their_pools_and_see_each_others_labels(ctx, monkeypatch):
    """Each worker keeps its pool between jobs and reads only what the other appended."""
    other = Context.from_settings(ctx.settings)  # a second worker process, in effect
    rebuilt = count_pool_builds(monkeypatch)
    for i, (text, label) in enumerate(corpus(12)):
        jobs.bind_context(ctx if i % 2 else other)
        annotate(i, text, label)
    jobs.bind_context(ctx)
    annotate(99, "stocks plunge on losses", "Negative")
    assert len(rebuilt) == 2  # one pool per worker, built once, then refreshed
    assert ctx._pools[UID].get("task:98") is None and len(ctx._pools[UID]) == 13
    assert ctx.state.get(UID, "pool_size") == "13"
    monkeypatch.undo()
    assert sorted(i.key for i in pool_of(ctx).items()) == sorted(i.key for i in ctx._pools[UID].items())


def test_workers_fork_for_training_and_keep_their_context_otherwise():
    assert worker_class(["ingest", "review"]) is SimpleWorker
    assert worker_class(["train"]) is Worker
    assert worker_class(["ingest", "review", "train"]) is Worker
    assert worker_class(["ingest"], "fork") is Worker
    assert worker_class(["train"], "none") is SimpleWorker
    with pytest.raises(AutoAnnotatorError, match="isolate must be one of"):
        worker_class(["ingest"], "thread")


def test_an_rq_worker_on_the_ingest_queue_keeps_the_pool_between_jobs(ctx, monkeypatch):
    """Real rq, real Redis: annotations queued as /webhook queues them, run by the worker class that
    ``autoannotator worker --queues ingest,review`` uses. The pool is built once, then refreshed; a
    forked job would start from an empty context and replay the whole log each time."""
    rebuilt = count_pool_builds(monkeypatch)
    examples = corpus(6)
    for i, (text, label) in enumerate(examples):
        task = {"id": i, "data": {"text": text}}
        ctx.state.enqueue("ingest", JOBS + "ingest_annotation", UID, task, choice(label), job_timeout=300)
    cls = worker_class(["ingest", "review"])
    worker = cls([ctx.state.queue("ingest")], connection=ctx.state.redis)
    assert worker.work(burst=True)
    assert ctx.state.queue("ingest").failed_job_registry.count == 0
    assert len(rebuilt) == 1
    assert len(ctx._pools[UID]) == len(examples) == int(ctx.state.get(UID, "pool_size"))


def test_a_worker_keeps_each_projects_llm_answers_and_reads_what_others_added(ctx):
    other = Context.from_settings(ctx.settings)  # a second worker process, in effect
    cache = ctx.review_cache(UID)
    other.review_cache(UID).put("k", "Positive")
    again = ctx.review_cache(UID)
    assert again is cache and again.get("k") == "Positive"


def test_a_human_label_joins_the_pool(ctx):
    assert annotate(1, "shares rally on record gains", "Positive") == "task 1: Positive (new)"
    path = ctx.pool_path(UID)
    assert path == ctx.settings.model_dir / f"project-{UID}" / "pool.jsonl" and path.is_file()
    item = pool_of(ctx).get("task:1")
    assert item is not None and (item.text, item.label, item.source) == (
        "shares rally on record gains",
        "Positive",
        Source.HUMAN,
    )
    assert annotate(1, "shares rally on record gains", "Positive") == "task 1: Positive (unchanged)"
    assert annotate(1, "shares rally on record gains", "Neutral") == "task 1: Neutral (new)"  # an edit wins
    assert pool_of(ctx).get("task:1").label == "Neutral"
    assert ctx.state.counters(UID)["human_labels"] == 2
    assert ctx.state.get(UID, "pool_size") == "1"


def test_a_human_label_overrides_an_llm_label(ctx):
    with ctx.pool(UID, LABELS) as pool:
        pool.add("task:4", "weak quarter", "Positive", Source.LLM)
    assert annotate(4, "weak quarter", "Negative") == "task 4: Negative (new)"
    item = pool_of(ctx).get("task:4")
    assert (item.label, item.source) == ("Negative", Source.HUMAN)


@pytest.mark.parametrize(
    ("task", "annotation", "why"),
    [
        ({"id": 2, "data": {"text": "a text"}}, {**choice("Positive"), "was_cancelled": True}, "cancelled"),
        ({"id": 2, "data": {"text": "a text"}}, {"result": []}, "no choice"),
        ({"id": 2, "data": {"tweet": "wrong field"}}, choice("Positive"), "data has no field 'text'"),
        ({"id": 2, "data": {"text": "   "}}, choice("Positive"), "empty or only whitespace"),
        ({"id": 2, "data": {"text": 42}}, choice("Positive"), "is int 42, not text"),
        ({"data": {"text": "a text"}}, choice("Positive"), "the task has no id"),
    ],
)
def test_annotations_without_a_usable_label_are_ignored_and_lose_nothing(ctx, task, annotation, why):
    annotate(1, "kept text", "Negative")
    before = ctx.pool_path(UID).read_bytes()
    outcome = jobs.ingest_annotation(UID, task, annotation)
    assert outcome.startswith("ignored: ") and why in outcome
    assert ctx.pool_path(UID).read_bytes() == before
    assert pool_of(ctx).get("task:1").label == "Negative"


def test_a_label_outside_the_config_is_a_clear_error(ctx):
    with pytest.raises(LabelMappingError, match=r"'bullish', which is not one of the project's labels"):
        annotate(3, "shares rally", "bullish")
    assert not ctx.pool_path(UID).exists()


def test_an_unknown_project_says_how_it_recovers(ctx):
    with pytest.raises(NotConfiguredError, match="unknown to this Redis"):
        jobs.ingest_annotation("9.1700000000", {"id": 1, "data": {"text": "x"}}, choice("Positive"))


def test_workers_need_a_label_studio_key(ctx):
    with pytest.raises(NotConfiguredError, match="LABEL_STUDIO_API_KEY is not set"):
        ctx.label_studio(ctx.info(UID))


# ---------------------------------------------------------------------------- cold start gating


def test_the_cold_start_waits_for_the_seed_then_queues_exactly_one_training(ctx):
    rows = corpus(60)
    for i, (text, label) in enumerate(rows[:4]):
        annotate(i, text, label)
    waiting = ctx.state.get(UID, "last_training")
    assert waiting is not None and waiting.startswith("waiting for seed labels: ")
    assert "4 of 10 labels (AUTOANNOTATOR_SEED_LABELS)" in waiting
    assert train_jobs(ctx) == [] and not ctx.state.training_pending(UID)
    queued_at = None
    for i, (text, label) in enumerate(rows[4:], start=4):
        annotate(i, text, label)
        if train_jobs(ctx) and queued_at is None:
            queued_at = i
            assert seed_shortfall(ctx, pool_of(ctx)) is None  # queued as soon as the seed is usable
        if queued_at is None:
            assert seed_shortfall(ctx, pool_of(ctx)) is not None
    assert queued_at is not None
    (job,) = train_jobs(ctx)  # labels arriving while it is pending queue nothing more
    assert job.func_name.endswith("train_project") and job.args == (UID, False)
    assert ctx.state.training_pending(UID)


def test_a_seed_missing_a_class_waits_naming_the_class(ctx):
    rows = [(t, lab) for t, lab in corpus(90) if lab != "Neutral"]
    for i, (text, label) in enumerate(rows[:30]):
        annotate(i, text, label)
    assert ctx.state.get(UID, "last_training") == (
        "waiting for seed labels: at least 2 labels of each of ['Neutral']"
    )
    assert train_jobs(ctx) == []
    neutral = [t for t, lab in corpus(90, seed=4) if lab == "Neutral"]
    for i, text in enumerate(neutral, start=100):
        annotate(i, text, "Neutral")
        if train_jobs(ctx):
            break
    assert len(train_jobs(ctx)) == 1


def test_configured_specialists_do_not_wait_for_a_seed(make_ctx):
    ctx = make_ctx(AUTOANNOTATOR_SPECIALISTS="some/model")
    annotate(1, "one label", "Positive")
    assert len(train_jobs(ctx)) == 1


def test_a_configured_model_in_a_directory_with_an_odd_name_gets_a_plain_member_name(make_ctx, tmp_path):
    """The member's directory is named after the model's, reduced to what the registry accepts."""
    source = tiny.build_classifier(tmp_path / "fin sent (v2) ü", ["negative", "neutral", "positive"])
    ctx = make_ctx(AUTOANNOTATOR_SPECIALISTS=str(source))
    annotate(1, "one label", "Positive")
    assert jobs.train_project(UID) == "first version v0001 published"
    registry = ctx.models.registry(UID)
    assert registry.manifest("v0001")["members"] == ["m0-fin-sent-v2"]
    assert [p.name for p in registry.path("v0001").iterdir() if p.is_dir()] == ["m0-fin-sent-v2"]
    assert registry.history()[-1]["given_models"] == [str(source)]
    assert ctx.models.ensemble(UID, LABELS).predict_proba(["shares surge"]).shape == (1, 1, 3)


def test_a_served_project_retrains_every_beta_labels(make_ctx, tmp_path):
    ctx = make_ctx(AUTOANNOTATOR_RETRAIN_EVERY="5")
    _seed_and_publish(ctx)
    for i, (text, label) in enumerate(corpus(5, seed=9), start=1000):
        assert train_jobs(ctx) == []
        annotate(i, text, label)
    (job,) = train_jobs(ctx)
    assert job.args == (UID, False)


def test_a_failed_enqueue_gives_the_claims_back(ctx, monkeypatch):
    def down(*args, **kwargs):
        raise StateUnavailableError("Redis at 127.0.0.1:1/0 is unavailable: ConnectionError")

    monkeypatch.setattr(ctx.state, "enqueue", down)
    with pytest.raises(StateUnavailableError):
        request_training(ctx, UID, reason="test")
    assert not ctx.state.training_pending(UID)  # else no training for TRAIN_PENDING_TTL_S
    with pytest.raises(StateUnavailableError):
        request_sync(ctx, UID)
    assert ctx.state.claim_sync(UID)  # the next request queues the sync


# ---------------------------------------------------------------------------- training


def _seed_and_publish(ctx: Context, n: int = 45) -> None:
    for i, (text, label) in enumerate(corpus(n)):
        annotate(i, text, label)
    assert jobs.train_project(UID) == "first version v0001 published"
    Queue("train", connection=ctx.state.redis).empty()


def test_training_cold_starts_the_first_version_and_marks_the_pool(ctx):
    _seed_and_publish(ctx)
    registry = ctx.models.registry(UID)
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]
    assert registry.manifest("v0001")["members"] == ["m0-ngram-linear"]
    assert pool_of(ctx).growth_since_training() == 0
    assert ctx.state.get(UID, "version") == "v0001"
    assert ctx.state.get(UID, "last_training") == "first version v0001 published"
    assert ctx.state.counters(UID)["trainings_published"] == 1
    assert not ctx.state.training_pending(UID)
    ensemble = ctx.models.ensemble(UID, LABELS)
    assert ensemble is not None and ensemble.version == "v0001"
    probs = ensemble.predict_proba(["shares surge to record gains", "stock plunge after losses"])
    assert [LABELS.names[i] for i in probs.mean(axis=0).argmax(axis=1)] == ["Positive", "Negative"]


def test_start_training_before_the_seed_is_skipped_not_failed(ctx):
    annotate(1, "only one label", "Positive")
    outcome = jobs.train_project(UID, True)
    assert outcome.startswith("skipped: waiting for seed labels: ")
    assert ctx.models.registry(UID).current() is None
    assert ctx.state.counters(UID)["trainings_failed"] == 0
    assert ctx.state.get(UID, "last_training").startswith("waiting for seed labels: ")
    assert not ctx.state.training_pending(UID)


def test_a_second_training_while_one_runs_does_nothing(ctx):
    for i, (text, label) in enumerate(corpus(45)):
        annotate(i, text, label)
    with ctx.state.lock("train", UID, timeout_s=60, wait_s=0) as got:
        assert got
        assert jobs.train_project(UID) == "another training of this project is running"
    assert ctx.models.registry(UID).current() is None
    assert ctx.state.counters(UID)["trainings_failed"] == 0


def test_a_refinement_that_crashes_leaves_the_served_version_and_can_be_retried(ctx, monkeypatch):
    _seed_and_publish(ctx)
    for i, (text, label) in enumerate(corpus(12, seed=7), start=500):
        annotate(i, text, label)
    growth = pool_of(ctx).growth_since_training()
    assert growth == 12

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(NgramSpecialist, "fit", crash)
    assert ctx.state.claim_training(UID) or ctx.state.training_pending(UID)  # as request_training did
    with pytest.raises(TrainingError, match="disk full"):
        jobs.train_project(UID, True)
    registry = ctx.models.registry(UID)
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]  # no half-built version
    assert ctx.models.ensemble(UID, LABELS).version == "v0001"
    assert ctx.state.counters(UID)["trainings_failed"] == 1
    last = ctx.state.get(UID, "last_training")
    assert last.startswith("failed: ") and "disk full" in last
    assert registry.history()[-1]["event"] == "failed"
    assert pool_of(ctx).growth_since_training() == growth  # the new labels are still new
    assert not ctx.state.training_pending(UID)
    Queue("train", connection=ctx.state.redis).empty()
    assert request_training(ctx, UID, reason="retry")  # a later training can be queued
    monkeypatch.undo()
    outcome = jobs.train_project(UID, True)
    assert outcome.startswith("v000") and ("published" in outcome or "rejected" in outcome)
    assert pool_of(ctx).growth_since_training() == 0


def test_the_refinement_is_judged_with_the_routing_policy_the_project_serves(make_ctx):
    ctx = make_ctx(AUTOANNOTATOR_POLICY="budget:2:epsilon")
    _seed_and_publish(ctx)
    for i, (text, label) in enumerate(corpus(30, seed=7), start=500):
        annotate(i, text, label)
    Queue("train", connection=ctx.state.redis).empty()
    outcome = jobs.train_project(UID, True)
    assert outcome.startswith("v0002 ")
    judged = ctx.models.registry(UID).history()[-1]
    assert judged["policy"] == "budget:2:epsilon:0.34"
    assert project_status(ctx, UID)["trainings"][-1]["policy"] == "budget:2:epsilon:0.34"


def test_a_cold_start_that_crashes_publishes_nothing(ctx, monkeypatch):
    for i, (text, label) in enumerate(corpus(45)):
        annotate(i, text, label)

    def crash(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(NgramSpecialist, "fit", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        jobs.train_project(UID)
    assert ctx.models.registry(UID).current() is None
    assert ctx.models.registry(UID).versions() == []
    assert ctx.state.counters(UID)["trainings_failed"] == 1
    assert ctx.state.get(UID, "last_training") == "failed: out of memory"
    assert not ctx.state.training_pending(UID)


# ---------------------------------------------------------------------------- review formatting


@pytest.mark.parametrize(
    ("votes", "shown"),
    [
        ({"bearish": 1, "bullish": 2}, "bullish 2 · bearish 1"),
        ({"b": 1, "a": 1, "c": 1}, "a 1 · b 1 · c 1"),  # ties in label order
        ({"Positive": 3}, "Positive 3"),
    ],
)
def test_votes_text(votes, shown):
    # No confidence in the text (it is the prediction's score): few distinct texts, so a labelling
    # run writes the votes of a chunk with one bulk update per text.
    assert votes_text(votes) == shown


def test_new_labels_that_are_all_held_out_do_not_requeue_training_forever(make_ctx):
    ctx = make_ctx(AUTOANNOTATOR_RETRAIN_EVERY="1")
    _seed_and_publish(ctx)
    pool = pool_of(ctx)
    held_out = next(i for i in range(10_000, 20_000) if pool.is_holdout(f"task:{i}"))
    annotate(held_out, "shares rally on record gains", "Positive")
    (job,) = train_jobs(ctx)  # beta=1: one new label asks for a training
    Queue("train", connection=ctx.state.redis).empty()
    outcome = jobs.train_project(*job.args)  # what the worker runs
    assert outcome.startswith("skipped: no new verified training items")
    # Nothing to train on: the same training must not be queued again (a worker would loop on it).
    assert train_jobs(ctx) == [] and not ctx.state.training_pending(UID)
    assert ctx.models.registry(UID).current() == "v0001"
    assert pool_of(ctx).holdout_items()[-1].key == f"task:{held_out}"  # still judges the next version


# ---------------------------------------------------------------------------- catalog selection


def _catalog(tmp_path: Path) -> Path:
    """A catalog of local tiny classifiers (the packaged one names hub models: no network here).

    The best match by description is a directory that does not exist, so the selection has to skip
    it; the toxicity model is the worst match and must not be picked.
    """
    root = tmp_path / "catalog"
    tiny.build_classifier(root / "fin-sent", ["negative", "neutral", "positive"])
    tiny.build_classifier(root / "tweet-sent", ["NEGATIVE", "NEUTRAL", "POSITIVE"], seed=1)
    tiny.build_classifier(root / "toxic", ["toxic", "not toxic"], seed=2)
    entries = [
        (
            "./gone-fin-sent",
            "Sentiment of financial news headlines and stock market tweets: bearish or bullish.",
        ),
        ("./fin-sent", "Financial news sentiment classifier for headlines about companies and markets."),
        ("./tweet-sent", "Twitter sentiment classifier: negative, neutral or positive tweets."),
        ("./toxic", "Detects toxic, insulting, obscene or threatening online comments."),
    ]
    path = root / "catalog.json"
    path.write_text(
        json.dumps({"version": 1, "models": [{"id": i, "description": d} for i, d in entries]}), "utf-8"
    )
    return path


@pytest.mark.slow  # ranks the catalog with the packaged MiniLM
def test_catalog_specialists_are_chosen_by_task_and_need_no_seed(make_ctx, tmp_path):
    ctx = make_ctx(
        AUTOANNOTATOR_SPECIALISTS="catalog:2",
        AUTOANNOTATOR_CATALOG=str(_catalog(tmp_path)),
        AUTOANNOTATOR_TASK="Sentiment of financial news headlines",
    )
    annotate(1, "one label is no seed", "Positive")
    assert len(train_jobs(ctx)) == 1  # no seed to wait for, as with listed models
    assert jobs.train_project(UID) == "first version v0001 published"

    registry = ctx.models.registry(UID)
    assert registry.manifest("v0001")["members"] == ["m0-fin-sent", "m1-tweet-sent"]
    published = registry.history()[-1]
    root = (tmp_path / "catalog").resolve()
    assert [(m["id"], m["rank"]) for m in published["catalog_models"]] == [
        (str(root / "fin-sent"), 2),
        (str(root / "tweet-sent"), 3),
    ]
    (skipped,) = published["catalog_skipped"]
    assert skipped["id"] == str(root / "gone-fin-sent") and skipped["reason"]
    assert published["task_description_from"] == "AUTOANNOTATOR_TASK"
    (shown,) = project_status(ctx, UID)["trainings"]  # what /status.json tells a project manager
    assert shown["catalog_models"] == published["catalog_models"]
    assert shown["task_description"] == "Sentiment of financial news headlines"
    ensemble = ctx.models.ensemble(UID, LABELS)
    assert ensemble is not None and ensemble.version == "v0001"
    assert ensemble.predict_proba(["shares surge"]).shape == (2, 1, 3)


@pytest.mark.slow  # ranks the catalog with the packaged MiniLM
def test_a_catalog_with_nothing_usable_fails_the_training_with_every_reason(make_ctx, tmp_path):
    catalog = tmp_path / "only-toxic.json"
    tiny.build_classifier(tmp_path / "toxic", ["toxic", "not toxic"])
    catalog.write_text(
        json.dumps(
            {
                "version": 1,
                "models": [
                    {"id": "./toxic", "description": "toxic comments"},
                    {"id": "./nowhere", "description": "sentiment"},
                ],
            }
        ),
        "utf-8",
    )
    # No AUTOANNOTATOR_TASK and no Label Studio key: the label names describe the task.
    ctx = make_ctx(AUTOANNOTATOR_SPECIALISTS="catalog", AUTOANNOTATOR_CATALOG=str(catalog))
    with pytest.raises(TrainingError, match="no catalog model could be used") as failure:
        jobs.train_project(UID)
    assert "toxic" in str(failure.value) and "nowhere" in str(failure.value)
    assert ctx.models.registry(UID).current() is None
    assert ctx.state.get(UID, "last_training").startswith("failed: ")
    assert ctx.state.counters(UID)["trainings_failed"] == 1


@pytest.mark.parametrize(
    ("value", "top_k"),
    [("catalog", 3), ("catalog:1", 1), (" Catalog:5 ", 5), ("a/model,./b", None), ("", None)],
)
def test_catalog_k_is_read_from_the_specialists_setting(value, top_k):
    assert Settings.from_env({"AUTOANNOTATOR_SPECIALISTS": value}).catalog_top_k() == top_k


@pytest.mark.parametrize("value", ["catalog:0", "catalog:three", "catalog:2,some/model"])
def test_a_malformed_catalog_setting_is_refused_at_startup(value):
    with pytest.raises(ValueError, match="AUTOANNOTATOR_SPECIALISTS"):
        Settings.from_env({"AUTOANNOTATOR_SPECIALISTS": value})


@pytest.mark.e2e
@pytest.mark.slow  # ranks the catalog with the packaged MiniLM
def test_the_catalog_is_ranked_against_the_label_studio_projects_own_words(
    make_ctx, tmp_path, label_studio, ls_project
):
    """Without AUTOANNOTATOR_TASK, the task description is the LS project's title and description."""
    project = ls_project(
        CONFIG,
        title="Financial news sentiment",
        description="Is a headline good or bad news for the company's stock?",
    )
    ctx = make_ctx(
        AUTOANNOTATOR_SPECIALISTS="catalog:1",
        AUTOANNOTATOR_CATALOG=str(_catalog(tmp_path)),
        LABEL_STUDIO_API_KEY=label_studio.token,
    )
    ctx.state.remember(ProjectInfo(UID, project.id, label_studio.url, CONFIG))
    assert jobs.train_project(UID) == "first version v0001 published"
    published = ctx.models.registry(UID).history()[-1]
    assert published["task_description_from"] == "the Label Studio project's title and description"
    assert published["task_description"] == (
        "Financial news sentiment Is a headline good or bad news for the company's stock?"
    )
    assert [m["id"].rsplit("/", 1)[-1] for m in published["catalog_models"]] == ["fin-sent"]


def test_the_cold_start_can_reshape_its_encoder_on_the_seed_labels_first(make_ctx, tiny_encoder):
    ctx = make_ctx(
        AUTOANNOTATOR_COLD_START_KINDS="embedding-linear",
        AUTOANNOTATOR_ENCODER=str(tiny_encoder),
        AUTOANNOTATOR_COLD_START_CONTRASTIVE="2",
    )
    for i, (text, label) in enumerate(corpus(12)):
        annotate(i, text, label)
    assert jobs.train_project(UID) == "first version v0001 published"
    registry = ctx.models.registry(UID)
    encoder = (registry.root / "encoders" / "v0001-contrastive").resolve()
    published = registry.history()[-1]
    made = published["contrastive_encoder"]
    assert made["base"] == str(tiny_encoder) and made["n_pairs"] == made["n_examples"] * 2 * 2
    assert made["n_examples"] == len(pool_of(ctx).train_items())  # seed labels only, none held out
    member = json.loads((registry.path("v0001") / "m0-embedding-linear" / "specialist.json").read_text())
    assert member["base_model"] == str(encoder)
    assert ctx.models.ensemble(UID, LABELS).predict_proba(["shares surge"]).shape == (1, 1, 3)


@pytest.mark.e2e
def test_the_cold_start_can_adapt_its_encoder_to_the_projects_texts_first(
    make_ctx, tiny_encoder, label_studio, ls_project
):
    """AUTOANNOTATOR_COLD_START_SIMCSE: before the cold start, the encoder is adapted without labels to
    the verified items' texts and the project's unannotated tasks' (read from Label Studio)."""
    project = ls_project(CONFIG)
    unlabelled = [text for text, _ in corpus(30, seed=9)]
    label_studio.client().projects.import_tasks(id=project.id, request=[{"text": t} for t in unlabelled])
    ctx = make_ctx(
        AUTOANNOTATOR_COLD_START_KINDS="embedding-linear",
        AUTOANNOTATOR_ENCODER=str(tiny_encoder),
        AUTOANNOTATOR_COLD_START_SIMCSE="1000",
        LABEL_STUDIO_API_KEY=label_studio.token,
    )
    ctx.state.remember(ProjectInfo(UID, project.id, label_studio.url, CONFIG))
    seeds = corpus(12)
    for i, (text, label) in enumerate(seeds):
        annotate(i, text, label)
    assert jobs.train_project(UID) == "first version v0001 published"
    registry = ctx.models.registry(UID)
    made = registry.history()[-1]["simcse_encoder"]
    assert made["n_texts"] == len({t for t, _ in seeds} | set(unlabelled))
    assert made["base"] == str(tiny_encoder)
    encoder = (registry.root / "encoders" / "v0001-simcse").resolve()
    member = json.loads((registry.path("v0001") / "m0-embedding-linear" / "specialist.json").read_text())
    assert member["base_model"] == str(encoder)


@pytest.mark.e2e
def test_self_training_adds_pseudo_labels_of_the_projects_unannotated_tasks(
    make_ctx, label_studio, ls_project
):
    """AUTOANNOTATOR_SELF_TRAINING: a retraining also learns the served version's confident labels of
    the project's unannotated tasks (read from Label Studio); the pool never holds them."""
    project = ls_project(CONFIG)
    unlabelled = [text for text, _ in corpus(150, seed=9)]
    label_studio.client().projects.import_tasks(id=project.id, request=[{"text": t} for t in unlabelled])
    ctx = make_ctx(
        AUTOANNOTATOR_SELF_TRAINING="0.5",
        AUTOANNOTATOR_PSEUDO_PRECISION="0.6",
        AUTOANNOTATOR_MIN_HOLDOUT="1000",  # promoted unjudged: the test reads the version it built
        LABEL_STUDIO_API_KEY=label_studio.token,
    )
    ctx.state.remember(ProjectInfo(UID, project.id, label_studio.url, CONFIG))
    _seed_and_publish(ctx, n=200)  # about 40 held out: enough to calibrate a threshold on
    for i, (text, label) in enumerate(corpus(12, seed=7), start=500):
        annotate(i, text, label)
    size = len(pool_of(ctx))
    Queue("train", connection=ctx.state.redis).empty()
    outcome = jobs.train_project(UID, True)
    assert outcome.startswith("v0002 published")
    made = ctx.models.registry(UID).history()[-1]["self_training"]
    assert f"; {made['n_used']} pseudo-labels at confidence >= {made['threshold']:.3f}" in outcome
    assert ctx.state.get(UID, "last_training") == outcome  # what /status shows
    assert made["calibrated_on"] == "held-out" and made["n_unlabelled"] == len(set(unlabelled))
    assert 0 < made["n_used"] <= made["cap"] == int(0.5 * len(pool_of(ctx).train_items()))
    meta = json.loads(
        (ctx.models.registry(UID).path("v0002") / "m0-ngram-linear" / "specialist.json").read_text()
    )
    assert meta["n_train"] == len(pool_of(ctx).train_items()) + made["n_used"]
    assert len(pool_of(ctx)) == size  # the pseudo-labels trained, and were never verified labels


# ---------------------------------------------------------------------------- training settings


def test_the_trainers_defaults_are_the_settings_defaults():
    """One default for each: what a trainer does unconfigured is what the backend does."""
    assert training._refine_config(Settings()) == RefineConfig()
    assert training._first_version_plan(Settings()).cold_start == ColdStartConfig()
    assert RefineConfig().beta == Settings().retrain_every


# A fine-tuned member whose cold start and refinement differ in learning rate and epochs.
TRAINING_ENV = {
    "AUTOANNOTATOR_COLD_START_KINDS": "transformer",
    "AUTOANNOTATOR_COLD_START_LR": "1e-3",
    "AUTOANNOTATOR_COLD_START_EPOCHS": "2",
    "AUTOANNOTATOR_REFINE_LR": "5e-4",
    "AUTOANNOTATOR_REFINE_EPOCHS": "1",
    "AUTOANNOTATOR_MIN_HOLDOUT": "1000",  # promoted unjudged: the tests read the version it built
}


def test_training_hyperparameters_come_from_the_settings(make_ctx, tiny_encoder):
    ctx = make_ctx(**TRAINING_ENV, AUTOANNOTATOR_ENCODER=str(tiny_encoder))
    _seed_and_publish(ctx)
    registry = ctx.models.registry(UID)

    def trained_with(version: str) -> dict:
        meta = json.loads((registry.path(version) / "m0-transformer" / "specialist.json").read_text())
        return meta["train_config"]

    assert (trained_with("v0001")["learning_rate"], trained_with("v0001")["epochs"]) == (1e-3, 2)
    for i, (text, label) in enumerate(corpus(12, seed=7), start=500):
        annotate(i, text, label)
    Queue("train", connection=ctx.state.redis).empty()
    assert jobs.train_project(UID, True).startswith("v0002 published")
    assert (trained_with("v0002")["learning_rate"], trained_with("v0002")["epochs"]) == (5e-4, 1)


def test_the_refit_strategy_retrains_from_the_encoder_with_the_cold_start_recipe(make_ctx, tiny_encoder):
    ctx = make_ctx(
        **TRAINING_ENV, AUTOANNOTATOR_ENCODER=str(tiny_encoder), AUTOANNOTATOR_RETRAIN_STRATEGY="refit"
    )
    _seed_and_publish(ctx)
    registry = ctx.models.registry(UID)
    for i, (text, label) in enumerate(corpus(12, seed=7), start=500):
        annotate(i, text, label)
    Queue("train", connection=ctx.state.redis).empty()
    assert jobs.train_project(UID, True).startswith("v0002 published")
    meta = json.loads((registry.path("v0002") / "m0-transformer" / "specialist.json").read_text())
    assert (meta["train_config"]["learning_rate"], meta["train_config"]["epochs"]) == (1e-3, 2)
    assert meta["parent"] is None and meta["base_model"] == str(tiny_encoder)
    assert meta["n_train"] == len(pool_of(ctx).train_items())
    assert registry.history()[-1]["strategy"] == {"m0-transformer": "refit"}


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("AUTOANNOTATOR_REFINE_LR", "0"),
        ("AUTOANNOTATOR_REFINE_EPOCHS", "0"),
        ("AUTOANNOTATOR_COLD_START_LR", "-1e-5"),
        ("AUTOANNOTATOR_COLD_START_EPOCHS", "0"),
        ("AUTOANNOTATOR_RETRAIN_STRATEGY", "restart"),
        ("AUTOANNOTATOR_SELF_TRAINING", "-1"),
        ("AUTOANNOTATOR_PSEUDO_WEIGHT", "0"),
        ("AUTOANNOTATOR_PSEUDO_PRECISION", "1.5"),
    ],
)
def test_bad_training_hyperparameters_are_refused_at_startup(env, value):
    with pytest.raises(ValueError, match=env):
        Settings.from_env({env: value})


# ---------------------------------------------------------------------------- the live audit


def audit(task_id: int, text: str, label: str, mark: str, **data: str) -> str:
    task = {"id": task_id, "data": {"text": text, "aa_audit": mark, **data}}
    return jobs.ingest_annotation(UID, task, choice(label))


def test_an_audit_label_goes_to_the_audit_log_never_to_the_pool(ctx):
    _seed_and_publish(ctx)
    pool = pool_of(ctx)
    size = len(pool)
    text, label = corpus(1, seed=11)[0]
    other = next(name for name in LABELS.names if name != label)
    # The LLM had labelled the task before it was drawn: its label leaves the pool too.
    with ctx.pool(UID, LABELS) as shared:
        shared.add("task:900", text, other, Source.LLM)
    out = audit(900, text, label, f"v0001 routed: {label}", aa_review="llm", aa_llm_label=other)
    assert out == f"task 900: audit label {label} of v0001 (confirmed)"
    assert len(pool_of(ctx)) == size and pool_of(ctx).get("task:900") is None
    (record,) = AuditLog(ctx.audit_path(UID)).records()
    assert (record.gold, record.version, record.route, record.predicted, record.llm_label) == (
        label,
        "v0001",
        "routed",
        label,
        other,
    )
    assert audit(901, "shares jump", other, f"v0001 accepted: {label}").endswith(f"(corrects {label})")
    assert ctx.state.counters(UID)["audit_labels"] == 2
    status = project_status(ctx, UID)["routing"]
    assert status["policy"] == "mean:0.75" and "target" not in status
    overall = status["audit"]["overall"]
    assert (overall["accepted"], overall["correct"], overall["llm_reviewed"], overall["llm_agreed"]) == (
        1,
        0,
        1,
        0,
    )
    assert Queue("ingest", connection=ctx.state.redis).jobs == []  # no target: nothing to calibrate


def test_a_target_policy_is_certified_on_audit_labels_and_then_accepts_what_it_certified(make_ctx):
    ctx = make_ctx(
        AUTOANNOTATOR_POLICY="target:0.7",
        AUTOANNOTATOR_AUDIT_SHARE="0.2",
        AUTOANNOTATOR_CALIBRATION_SEEDS="0",
    )
    _seed_and_publish(ctx)
    # Published under a target: calibrated at once, on no audit labels, so nothing is certified.
    stored = json.loads(ctx.state.routing(UID)[2])
    assert stored["version"] == "v0001" and stored["thresholds"] == [None, None, None]
    routing = project_status(ctx, UID)["routing"]
    assert routing["target"] == 0.7 and "not certified for v0001 yet (0 audit labels)" in routing["message"]
    texts = ["shares surge to record gains", "stock plunge after losses"]
    batch = ctx.annotator.predict(UID, [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)], CONFIG)
    assert len(batch.routed) == 2  # uncertified: everything is reviewed

    ensemble = ctx.models.ensemble(UID, LABELS)
    items = corpus(120, seed=21)
    predicted = ensemble.predict_proba([t for t, _ in items]).mean(axis=0).argmax(axis=1)
    for i, ((text, gold), p) in enumerate(zip(items, predicted, strict=True)):
        audit(1000 + i, text, gold, f"v0001 accepted: {LABELS.names[int(p)]}")
    queued = Queue("ingest", connection=ctx.state.redis).jobs
    assert [j.func_name for j in queued] == [JOBS + "calibrate_project"]  # one job for 120 labels
    out = jobs.calibrate_project(UID)
    assert out.startswith("target:0.7 for v0001 on 120 audit labels: certified [")
    stored = json.loads(ctx.state.routing(UID)[2])
    certified = [t for t in stored["thresholds"] if t is not None]
    assert certified and stored["calibration"] == 120
    assert json.loads((ctx.models.registry(UID).root / "calibration.json").read_text()) == stored
    ctx.routing.forget(UID)
    batch = ctx.annotator.predict(
        UID, [{"id": 2000 + i, "data": {"text": t}} for i, (t, _) in enumerate(corpus(40, seed=5))], CONFIG
    )
    assert len(batch.routed) < 40  # certified labels above their thresholds are accepted
    routing = project_status(ctx, UID)["routing"]
    assert routing["calibration"]["version"] == "v0001" and "certified" in routing["message"]
    audited = routing["audit"]["overall"]
    assert audited["accepted"] == 120 and audited["low"] <= audited["accuracy"] <= audited["high"]

    # A project that leaves the target has its calibration removed.
    ctx.state.set_routing(UID, "mean:0.5", None)
    assert jobs.calibrate_project(UID) == "policy mean:0.5: nothing to calibrate"
    assert ctx.state.routing(UID)[2] is None
    assert not (ctx.models.registry(UID).root / "calibration.json").exists()


# ---------------------------------------------------------------------------- calibration seeds


def seed_tasks(ctx: Context) -> set[int]:
    return {r.task_id for r in AuditLog(ctx.audit_path(UID)).records() if r.is_seed}


def test_under_a_target_a_share_of_the_seed_goes_to_calibration_and_never_to_training(make_ctx):
    ctx = make_ctx(AUTOANNOTATOR_POLICY="target:0.7", AUTOANNOTATOR_AUDIT_SHARE="0.1")
    items = corpus(60)
    outs = [annotate(i, text, label) for i, (text, label) in enumerate(items)]
    kept = seed_tasks(ctx)
    assert kept == {i for i in range(60) if drawn_for_calibration(i, 0.2)} and 4 <= len(kept) <= 20
    assert all(outs[i].startswith(f"task {i}: calibration seed ") for i in kept)
    pool = pool_of(ctx)
    assert len(pool) == 60 - len(kept) and all(pool.get(f"task:{i}") is None for i in kept)

    # An edited seed annotation stays a seed after the first version, with the new label.
    assert jobs.train_project(UID) == "first version v0001 published"
    first = min(kept)
    other = next(name for name in LABELS.names if name != items[first][1])
    Queue("ingest", connection=ctx.state.redis).empty()
    assert annotate(first, items[first][0], other).startswith(f"task {first}: calibration seed {other}")
    queued = Queue("ingest", connection=ctx.state.redis).jobs
    assert [j.func_name for j in queued] == [JOBS + "calibrate_project"]  # certified again on the edit
    assert pool_of(ctx).get(f"task:{first}") is None
    assert {r.task_id: r.gold for r in AuditLog(ctx.audit_path(UID)).records()}[first] == other
    # With a version serving, no new annotation becomes a seed: the audit measures from now on.
    drawn_later = next(i for i in range(1000, 2000) if drawn_for_calibration(i, 0.2))
    assert annotate(drawn_later, "shares surge", "Positive") == f"task {drawn_later}: Positive (new)"
    assert seed_tasks(ctx) == kept

    # The seeds calibrate the target for v0001; they measure no version.
    out = jobs.calibrate_project(UID)
    assert out.startswith(f"target:0.7 for v0001 on 0 audit labels and {len(kept)} calibration seeds: ")
    routing = project_status(ctx, UID)["routing"]
    assert routing["calibration"]["calibration"] == len(kept) == routing["calibration"]["seeds"]
    assert routing["audit"]["labels"] == 0 and routing["audit"]["calibration_seeds"] == len(kept)
    assert routing["audit"]["per_version"] == [] and routing["audit"]["overall"]["audited"] == 0
    assert f"on 0 audit labels and {len(kept)} calibration seeds" in routing["message"]


def test_without_a_target_or_with_no_share_every_seed_annotation_trains(make_ctx):
    for env in ({}, {"AUTOANNOTATOR_POLICY": "target:0.7", "AUTOANNOTATOR_AUDIT_SHARE": "0.1",
                     "AUTOANNOTATOR_CALIBRATION_SEEDS": "0"}):  # fmt: skip
        ctx = make_ctx(**env)
        for i, (text, label) in enumerate(corpus(30)):
            annotate(i, text, label)
        assert seed_tasks(ctx) == set() and len(pool_of(ctx)) == 30
        ctx.state.redis.flushdb()
        ctx.pool_path(UID).unlink()


def test_a_sync_keeps_the_seeds_the_log_holds_and_draws_new_ones_only_before_the_first_version(make_ctx):
    """Label Studio's side of a sync is given as the labels it would return (the e2e tests run sync
    against a real Label Studio); here the rule for which of them are calibration seeds is checked."""
    from autoannotator.labelstudio.client import StoredLabel
    from autoannotator.service.ingest import _calibration_seeds

    ctx = make_ctx(AUTOANNOTATOR_POLICY="target:0.7", AUTOANNOTATOR_AUDIT_SHARE="0.1")
    human = [StoredLabel(f"task:{i}", text, label, i) for i, (text, label) in enumerate(corpus(40))]
    keys = _calibration_seeds(ctx, UID, human)
    drawn = {i for i in range(40) if drawn_for_calibration(i, 0.2)}
    assert keys == {f"task:{i}" for i in drawn} and seed_tasks(ctx) == drawn
    lines = len(AuditLog(ctx.audit_path(UID)).path.read_text().splitlines())
    assert _calibration_seeds(ctx, UID, human) == keys  # nothing new: the log does not grow
    assert len(AuditLog(ctx.audit_path(UID)).path.read_text().splitlines()) == lines

    for i, (text, label) in enumerate(corpus(45, seed=8)):  # a version appears
        annotate(100 + i, text, label)
    jobs.train_project(UID)
    later = [StoredLabel(f"task:{i}", "stocks fall", "Negative", i) for i in range(200, 260)]
    assert _calibration_seeds(ctx, UID, human + later) == keys


def test_a_task_the_seed_tab_flagged_is_never_a_calibration_seed(make_ctx):
    """The Seed tab chooses tasks by clustering, not at random: they would not be a fair sample."""
    ctx = make_ctx(AUTOANNOTATOR_POLICY="target:0.7", AUTOANNOTATOR_AUDIT_SHARE="0.1")
    flagged = next(i for i in range(100) if drawn_for_calibration(i, 0.2))
    task = {"id": flagged, "data": {"text": "shares fall on weak results", "aa_seed": 1}}
    assert jobs.ingest_annotation(UID, task, choice("Negative")) == f"task {flagged}: Negative (new)"
    assert seed_tasks(ctx) == set() and pool_of(ctx).get(f"task:{flagged}") is not None
