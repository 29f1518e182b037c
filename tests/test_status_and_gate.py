"""Two README claims with their numbers: what ``/status`` derives from the counters, and the gate
that keeps a worse candidate from being served.

- *Costs and metrics*: per project, "predictions and the share routed, LLM calls ... and cost, and
  what was saved against LLM-only annotation (one call per task)": ``routed_share``,
  ``llm_calls_saved`` and ``llm_cost_saved_usd`` from known counters, through the real app
  (``/predict`` counts, ``/status.json`` and ``/status`` report), edge cases included.
- *How it works*: "a worse candidate leaves the old version serving": a training job whose
  candidate learnt permuted labels is rejected on the held-out labels; ``CURRENT`` stays, ``/predict``
  still answers with the old version, and ``/status`` and the registry history say why, with the
  held-out figures.

In-process (the jobs run as ``autoannotator worker`` runs them, in an rq worker) against the
session's private Redis; no Label Studio, tiny n-gram models only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from autoannotator.core.policies import policy_from_spec
from autoannotator.learning.gate import Gate
from autoannotator.learning.pool import VerifiedPool
from autoannotator.models.ensemble import Ensemble
from autoannotator.models.specialists import NgramSpecialist
from autoannotator.models.specialists.base import TrainConfig
from autoannotator.service import jobs
from autoannotator.service.app import create_app
from autoannotator.service.context import Context
from autoannotator.service.worker import worker_class
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from autoannotator.storage.redis_state import ProjectInfo, State
from tests import scrape
from tests.e2e_data import CONFIG, LABELS, publish

UID = "7.1700000000"
AS_SENTIMENT = {"bullish": "Positive", "bearish": "Negative", "neutral": "Neutral"}
# Every label is wrong, and consistently so: what a careless annotator (or a bad prompt) would teach.
PERMUTED = {"Positive": "Negative", "Negative": "Neutral", "Neutral": "Positive"}


def _env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "AUTOANNOTATOR_MODEL_DIR": str(tmp_path / "models"),
        "AUTOANNOTATOR_REDIS_URL": redis_url,
        "AUTOANNOTATOR_REVIEW_MODE": "off",  # /predict counts; no review job is queued
        **extra,
    }


def _project(client: FlaskClient, uid: str = UID) -> dict[str, Any]:
    answer = client.get("/status.json")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return next(p for p in answer.get_json()["projects"] if p["project"] == uid)


def _predict(client: FlaskClient, texts: list[str], first_id: int, uid: str = UID) -> list[dict[str, Any]]:
    tasks = [{"id": first_id + i, "data": {"text": t}} for i, t in enumerate(texts)]
    answer = client.post("/predict", json={"tasks": tasks, "project": uid, "label_config": CONFIG})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    results: list[dict[str, Any]] = answer.get_json()["results"]
    return results


def _saved_row(page: str) -> str:
    row = page.split("<th>saved vs LLM-only</th><td>", 1)[1]
    return row.split("</td>", 1)[0]


# ---------------------------------------------------------------------------- derived status fields


def test_status_derives_routed_share_and_llm_savings_from_the_counters(tmp_path, redis_url, redis_client):
    """A known history: 8 + 4 tasks predicted through /predict with a policy that routes exactly 2 of
    each batch, 3 LLM calls that cost $0.0006. LLM-only would have asked once per task."""
    settings = Settings.from_env(_env(tmp_path, redis_url, AUTOANNOTATOR_POLICY="budget:2:mean"))
    publish(settings.model_dir, UID, c=1.0, note="served")
    client = create_app(settings).test_client()
    state = State(redis_client, "off")

    # Nothing predicted yet: no share to speak of, nothing saved, no cost figure.
    assert client.post("/setup", json={"project": UID, "schema": CONFIG}).status_code == 200
    fresh = _project(client)
    assert fresh["counters"]["predictions"] == 0 and fresh["counters"]["llm_calls"] == 0
    assert (fresh["routed_share"], fresh["llm_calls_saved"], fresh["llm_cost_saved_usd"]) == (None, 0, None)
    assert _saved_row(client.get("/status").get_data(as_text=True)) == "0 calls"

    # Predictions, no LLM call yet (human or off mode): every task is a call saved, at no known price.
    texts = [f"the report number {i} was filed on time" for i in range(12)]
    _predict(client, texts[:8], 100)
    p = _project(client)
    assert (p["counters"]["predictions"], p["counters"]["routed"]) == (8, 2)
    assert (p["routed_share"], p["llm_calls_saved"], p["llm_cost_saved_usd"]) == (0.25, 8, None)

    _predict(client, texts[8:], 200)
    state.count(UID, llm_calls=3, llm_cost_usd=0.0006, llm_prompt_tokens=120, llm_completion_tokens=3)
    p = _project(client)
    assert (p["counters"]["predictions"], p["counters"]["routed"], p["counters"]["llm_calls"]) == (12, 4, 3)
    assert p["routed_share"] == 0.3333  # 4 routed of 12 predicted, to four places
    assert p["llm_calls_saved"] == 9  # LLM-only would have made 12 calls, AutoAnnotator made 3
    # $0.0002 a call, observed ($0.0006 for 3), times the 9 calls saved.
    assert p["llm_cost_saved_usd"] == 0.0018
    page = client.get("/status").get_data(as_text=True)
    assert "12 / 4 (33.3% routed)" in page
    assert _saved_row(page) == "9 calls, $0.0018"
    # /metrics carries the raw counters the fields are derived from.
    metrics = client.get("/metrics").get_data(as_text=True)
    assert scrape.value(metrics, "autoannotator_predictions_total", project=UID) == 12
    assert scrape.value(metrics, "autoannotator_routed_total", project=UID) == 4
    assert scrape.value(metrics, "autoannotator_llm_cost_usd_total", project=UID) == pytest.approx(0.0006)


@pytest.mark.parametrize(
    ("model", "price", "saved_usd", "shown"),
    [
        # A model of the built-in table that answered with 0 tokens: it really cost nothing.
        ("gpt-4o-mini", "", 0.0, "7 calls, $0.0000"),
        # A local model priced at 0 by the operator: free, and known to be.
        ("qwen2.5:7b", "0,0", 0.0, "7 calls, $0.0000"),
        # A model whose price nobody knows: its calls are counted at $0, but a saving of $0 would
        # be a claim; the status says nothing about money instead.
        ("qwen2.5:7b", "", None, "7 calls"),
    ],
)
def test_no_known_price_means_no_cost_saving_is_claimed(
    tmp_path, redis_url, redis_client, model, price, saved_usd, shown
):
    settings = Settings.from_env(
        _env(tmp_path, redis_url, AUTOANNOTATOR_LLM_MODEL=model, AUTOANNOTATOR_LLM_PRICE=price)
    )
    client = create_app(settings).test_client()
    state = State(redis_client, "off")
    state.remember(ProjectInfo(UID, 7, "http://ls.invalid", CONFIG))
    state.count(UID, predictions=10, routed=3, llm_calls=3)  # llm_cost_usd stays 0: nothing was priced
    p = _project(client)
    assert (p["routed_share"], p["llm_calls_saved"], p["llm_cost_saved_usd"]) == (0.3, 7, saved_usd)
    assert _saved_row(client.get("/status").get_data(as_text=True)) == shown


def test_a_member_a_refinement_dropped_is_on_the_status_with_its_figures(tmp_path, redis_url, redis_client):
    """What a refinement that pruned a member writes to the history (see tests/test_training.py),
    as /status.json and /status show it."""
    settings = Settings.from_env(_env(tmp_path, redis_url))
    publish(settings.model_dir, UID, c=1.0, note="cold start")
    registry = ProjectModels(settings.model_dir).registry(UID)
    texts = [f"shares rally {i}" for i in range(6)] + [f"stock plunges {i}" for i in range(6)]
    ys = ["Positive"] * 6 + ["Negative"] * 6
    second = registry.save_ensemble(
        LABELS,
        {"m0-ngram-linear": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d)},
        publish=False,
    )
    pruning = {
        "dropped": ["m1-ngram-linear"],
        "kept": ["m0-ngram-linear"],
        "metric": "accuracy",
        "with": 0.71,
        "without": 0.74,
        "n_holdout": 100,
    }
    registry.publish(second, {"reason": "promoted; dropped m1-ngram-linear", "pruning": pruning})
    State(redis_client, "off").remember(ProjectInfo(UID, 7, "http://ls.invalid", CONFIG))
    client = create_app(settings).test_client()

    p = _project(client)
    assert p["members_dropped"] == [{"version": second, **pruning}]
    assert p["trainings"][-1]["pruning"] == pruning
    assert "pruning" not in p["trainings"][0]  # the cold start dropped nothing
    page = client.get("/status").get_data(as_text=True)
    assert (
        f"<th>members dropped</th><td>{second}: m1-ngram-linear (held-out accuracy 74.0% without, "
        "71.0% with, 100 items)</td>"
    ) in page


# ---------------------------------------------------------------------------- the evaluation gate


@pytest.fixture
def gate_ctx(tmp_path, redis_url):
    """The jobs' context as a worker builds it (``make_ctx`` of tests/test_jobs.py, in short)."""
    settings = Settings.from_env(
        _env(
            tmp_path,
            redis_url,
            AUTOANNOTATOR_COLD_START_KINDS="ngram-linear",
            AUTOANNOTATOR_SEED_LABELS="10",
            AUTOANNOTATOR_RETRAIN_EVERY="20",
            AUTOANNOTATOR_MIN_HOLDOUT="5",
        )
    )
    ctx = Context.from_settings(settings)
    ctx.state.remember(ProjectInfo(UID, 7, "http://ls.invalid", CONFIG))
    jobs.bind_context(ctx)
    yield ctx
    jobs.bind_context(None)


def _annotate(task_id: int, text: str, label: str) -> str:
    annotation = {
        "id": task_id,
        "result": [
            {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}
        ],
    }
    return jobs.ingest_annotation(UID, {"id": task_id, "data": {"text": text}}, annotation)


def _run_train_queue(ctx: Context) -> None:
    """What ``autoannotator worker --queues train`` does with the queued job (in this process)."""
    cls = worker_class(["train"], "none")
    worker = cls([ctx.state.queue("train")], connection=ctx.state.redis)
    assert worker.work(burst=True)
    assert ctx.state.queue("train").failed_job_registry.count == 0


def test_a_candidate_trained_on_permuted_labels_is_rejected_and_the_old_version_keeps_serving(
    gate_ctx, tiny_corpus, tmp_path
):
    ctx = gate_ctx
    examples = [(text, AS_SENTIMENT[y]) for text, y in tiny_corpus[:60]]
    for i, (text, label) in enumerate(examples):
        _annotate(i, text, label)
    assert len(ctx.state.queue("train").jobs) == 1  # the cold start, queued once the seed was complete
    _run_train_queue(ctx)
    registry = ctx.models.registry(UID)
    assert registry.current() == "v0001"

    pool = VerifiedPool(LABELS, path=ctx.pool_path(UID))
    holdout = pool.holdout_items()
    train = pool.train_items()
    assert (len(holdout), len(train)) == (6, 54)  # fixed by a hash of each task key
    # Every training label is relabelled wrongly by a human; the held-out labels stay right.
    for item in train:
        task_id = int(item.key.removeprefix("task:"))
        assert _annotate(task_id, item.text, PERMUTED[item.label]).endswith("(new)")
    (job,) = ctx.state.queue("train").jobs  # beta=20 reached: one training, queued once
    assert job.args == (UID, False)
    _run_train_queue(ctx)

    # Rejected: the old version serves, the candidate's directory is gone, nothing is queued again.
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]
    assert ctx.state.queue("train").jobs == []
    counters = ctx.state.counters(UID)
    trainings = {k: counters[f"trainings_{k}"] for k in ("published", "rejected", "failed")}
    assert trainings == {"published": 1, "rejected": 1, "failed": 0}

    # The held-out figures: the served version on the held-out labels, and what the candidate (a
    # refit of the same n-gram member on the now wrong training labels) scored there.
    # The gate judges with the policy /predict serves (the default, mean:0.75, here).
    gate = Gate(policy_from_spec(ctx.settings.policy))
    served = registry.load("v0001", LABELS)
    expected_old = gate.evaluate(served, holdout, LABELS)
    relabelled = VerifiedPool(LABELS, path=ctx.pool_path(UID)).train_items()
    texts, ys = [it.text for it in relabelled], [it.label for it in relabelled]
    refit = served.members[0].fit(texts, ys, tmp_path / "replica", TrainConfig())
    expected_new = gate.evaluate(Ensemble([refit], LABELS, version="replica"), holdout, LABELS)
    assert expected_new["accuracy"] < expected_old["accuracy"]
    reason = (
        f"rejected: held-out accuracy fell from {expected_old['accuracy']:.4f} to "
        f"{expected_new['accuracy']:.4f} (tolerance 0.0)"
    )
    rejected = registry.history()[-1]
    assert (rejected["event"], rejected["version"], rejected["previous"]) == ("rejected", "v0002", "v0001")
    assert rejected["reason"] == reason
    assert rejected["metrics_old"] == expected_old and rejected["metrics_new"] == expected_new
    assert rejected["n_holdout"] == len(holdout) and rejected["n_new"] == len(train)
    assert rejected["policy"] == "mean:0.75" == ctx.settings.policy
    assert ctx.state.get(UID, "last_training") == f"v0002 rejected: {reason}"

    # /predict still answers with v0001, and with v0001's labels; /status says why.
    client = create_app(ctx.settings).test_client()
    texts = [it.text for it in holdout]
    results = _predict(client, texts, 5000)
    assert {r["model_version"] for r in results} == {"v0001"}
    served_labels = [LABELS.names[i] for i in gate.policy.decide(served.predict_proba(texts)).labels]
    assert [r["result"][0]["value"]["choices"][0] for r in results] == served_labels
    status = _project(client)
    assert status["version"] == "v0001" and status["versions"] == ["v0001"]
    assert status["last_training"] == f"v0002 rejected: {reason}"
    last = status["trainings"][-1]
    assert last == {
        "event": "rejected",
        "version": "v0002",
        "previous": "v0001",
        "reason": reason,
        "metrics_new": expected_new,
        "metrics_old": expected_old,
        "n_new": len(train),
        "policy": "mean:0.75",
    }
    assert "1 published, 1 rejected, 0 failed" in client.get("/status").get_data(as_text=True)
