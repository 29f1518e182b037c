"""The whole product against a real Label Studio, a real Redis and real rq worker processes.

Human mode: connect (with basic auth), annotate seed tasks, watch the cold start publish v0001,
retrieve predictions, find the routed tasks in the "Needs review" tab with the specialists' votes,
answer them, watch a retraining publish v0002 and LS re-predict with it.
LLM mode (chosen in LS's own "extra params"): routed tasks are labelled by a local server speaking
the OpenAI API; an off-label answer and a server answering 500 send tasks to the human queue.
With the app and the workers logging at DEBUG, none of the LLM API key, the LS token, the basic-auth
password (or its header) and the tasks' text is in any of their logs.
A webhook storm starts one training and loses no label; after a Redis flush *and* the loss of the
pool log, the pool is rebuilt from Label Studio alone.

What LS 1.23.2 did, measured while writing these tests:

- The webhook LS creates on connect (``<backend>/webhook``) carries no basic auth even when the
  ML backend uses it (LS sends the credentials on /setup, /predict and START_TRAINING only), so
  every annotation event is refused until :func:`autoannotator.labelstudio.client.secure_webhooks` adds the
  header; the sync it runs in then reads the annotations that were refused.
- ``ls.annotations.create`` through the API fires ANNOTATION_CREATED like the UI does.
- The "extra params" of the ML backend connection (a textarea in LS's connect form) reach /setup
  as ``extra_params``.
- A task-data field added by ``PATCH /api/tasks/{id}`` becomes a Data Manager column
  (``all_data_columns`` of the project summary) and can be filtered on as a Boolean.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from rq import Worker

from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.review.llm import PriceTable
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests import scrape
from tests.e2e_data import CONFIG, LABELS, NEUTRAL, SEED, publish
from tests.flow import (
    PASSWORD,
    USER,
    AppServer,
    Workers,
    backend_env,
    debug_log,
    drain,
    failed_jobs,
    wait_for,
)
from tests.flow import annotate as _annotate
from tests.flow import connect as _connect
from tests.openai_server import OpenAIServer, Reply, rough_usage

pytestmark = pytest.mark.e2e

GOLD = {text: label for label, texts in SEED.items() for text in texts}


def _env(tmp_path: Path, label_studio: Any, redis_url: str, **extra: str) -> dict[str, str]:
    return backend_env(
        tmp_path / "models", label_studio, redis_url, **{"AUTOANNOTATOR_POLICY": "mean:0.8", **extra}
    )


def _retrieve(ls: Any, project_id: int) -> None:
    ls.actions.create(
        id="retrieve_tasks_predictions", project=project_id, selected_items={"all": True, "excluded": []}
    )


def _tasks(ls: Any, project_id: int) -> dict[str, Any]:
    return {t.data["text"]: t for t in ls.tasks.list(project=project_id, fields="all")}


def _pool(model_dir: Path, uid: str) -> VerifiedPool:
    return VerifiedPool(LABELS, path=ProjectModels(model_dir).registry(uid).root / "pool.jsonl")


def test_human_mode_cold_start_review_tab_and_retraining(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str, tiny_encoder: Path
) -> None:
    client = redis_client
    env = _env(
        tmp_path,
        label_studio,
        redis_url,
        AUTOANNOTATOR_REVIEW_MODE="human",
        AUTOANNOTATOR_SEED_LABELS="30",
        AUTOANNOTATOR_RETRAIN_EVERY="10",
        AUTOANNOTATOR_MIN_HOLDOUT="1000",  # promote unjudged: judging is test_training's subject
        AUTOANNOTATOR_ENCODER=str(tiny_encoder),
        AUTOANNOTATOR_COLD_START_KINDS="transformer,embedding-linear,ngram-linear",
    )
    settings = Settings.from_env(env)
    ls = label_studio.client()
    seed = {label: texts[:12] for label, texts in SEED.items()}
    stream = [t for texts in SEED.values() for t in texts[12:]] + NEUTRAL
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
        project = ls_project(CONFIG)
        uid = _connect(ls, project.id, app.url)
        drain(client, workers)  # the first sync secures our webhook with basic auth
        hooks = [h for h in ls.webhooks.list(project=str(project.id)) if h.url == f"{app.url}/webhook"]
        assert len(hooks) == 1 and hooks[0].headers["Authorization"].startswith("Basic ")

        ls.projects.import_tasks(
            id=project.id,
            request=[{"text": t} for texts in seed.values() for t in texts] + [{"text": t} for t in stream],
        )
        tasks = _tasks(ls, project.id)
        for label, texts in seed.items():
            for text in texts:
                _annotate(ls, tasks[text].id, label)
        registry = ProjectModels(settings.model_dir).registry(uid)
        wait_for("the cold start to publish v0001", registry.current, 300, workers)
        drain(client, workers)
        # The cold start begins once enough labels (of every class) arrived; labels that came in
        # while it trained may reach beta and publish v0002 straight after.
        served = registry.current()
        assert served in {"v0001", "v0002"}
        webhooks = app.paths("/webhook")
        created = [c for c in webhooks if c.body.get("action") == "ANNOTATION_CREATED"]
        assert all(c.status == 200 for c in webhooks), [c.status for c in webhooks]
        # Acknowledged at once: each answer says the work was queued, for a worker to do.
        assert [c.answer for c in created] == [{"status": "queued", "action": "ANNOTATION_CREATED"}] * 36
        assert len(_pool(settings.model_dir, uid)) == 36
        manifest = registry.manifest("v0001")
        assert [m.split("-", 1)[1] for m in manifest["members"]] == [
            "transformer",
            "embedding-linear",
            "ngram-linear",
        ]

        _retrieve(ls, project.id)
        drain(client, workers)
        assert not failed_jobs(client), failed_jobs(client)
        tasks = _tasks(ls, project.id)
        unlabelled = {t: tasks[t] for t in stream}
        for text, task in unlabelled.items():
            versions = [p.model_version for p in task.predictions]
            assert versions == [served], (text, versions)
        flagged = {t for t, task in unlabelled.items() if task.data.get("aa_needs_review")}
        scores = {t: task.predictions[0].score for t, task in unlabelled.items()}
        assert flagged, f"no task was routed; scores {sorted(scores.values())}"
        # The flag is the routing decision: exactly the tasks under the policy's threshold.
        assert flagged == {t for t, s in scores.items() if s < 0.8}
        for text in flagged:
            votes = unlabelled[text].data["aa_votes"]
            assert sum(int(n) for _, n in re.findall(r"(\w+) (\d+)", votes)) == 3, votes  # k = 3 members

        ls_project_now = ls.projects.get(id=project.id)
        assert ls_project_now.model_version == served
        assert ls_project_now.sampling == "Uncertainty sampling"
        tab = [v for v in ls.views.list(project=project.id) if v.data.get("title") == "Needs review"]
        assert len(tab) == 1
        in_tab = [t.data["text"] for t in ls.tasks.list(project=project.id, view=tab[0].id)]
        assert set(in_tab) == flagged
        assert [scores[t] for t in in_tab] == sorted(scores[t] for t in in_tab)  # most uncertain first

        # Human review: the tab's tasks first, then others, ten answers in all (beta = 10).
        answered = (in_tab + [t for t in stream if t not in flagged])[:10]
        for text in answered:
            _annotate(ls, tasks[text].id, GOLD.get(text, "Neutral"))
        wait_for("a retraining to publish a new version", lambda: registry.current() != served, 300, workers)
        drain(client, workers)
        pool = _pool(settings.model_dir, uid)
        assert len(pool) == 46 and all(pool.get(f"task:{tasks[t].id}") is not None for t in answered)
        assert {t.data["text"] for t in ls.tasks.list(project=project.id, view=tab[0].id)}.isdisjoint(
            answered
        )

        newest = registry.current()
        assert newest is not None and newest > served
        # The new version's labelling run relabelled the project (drain waited for it): nobody had to
        # press Retrieve Predictions again.
        after = _tasks(ls, project.id)
        unannotated = [t for t in stream if t not in answered]
        assert all(newest in [p.model_version for p in after[t].predictions] for t in unannotated)
        assert ls.projects.get(id=project.id).model_version == newest

        status = app.app.test_client().get("/status.json", headers=_auth()).get_json()
        mine = next(p for p in status["projects"] if p["project"] == uid)
        assert mine["version"] == newest and mine["review_mode"] == "human"
        published = len(registry.versions())
        assert mine["counters"]["human_labels"] == 46 and mine["counters"]["trainings_published"] == published
        # Every task of every /predict LS sent is counted; the runs wrote the rest.
        asked = sum(len(c.body["tasks"]) for c in app.paths("/predict") if c.status == 200)
        assert mine["counters"]["predictions"] == asked
        assert mine["counters"]["labelled_tasks"] >= len(stream) + len(unannotated) - asked
        metrics = app.app.test_client().get("/metrics", headers=_auth()).get_data(as_text=True)
        assert scrape.value(metrics, "autoannotator_trainings_published_total", project=uid) == published
        assert scrape.value(metrics, "autoannotator_model_info", project=uid, version=newest) == 1
        assert not failed_jobs(client), failed_jobs(client)


def _auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


OFF_LABEL_TEXT = NEUTRAL[0]
# A task text found nowhere else: if it shows up in a log, the log holds task text.
SENTINEL_TEXT = f"Sentinel {uuid.uuid4().hex} says the quarterly report is out"
LLM_KEY = "sk-e2e-secret-key"


def _llm_answer(text: str) -> str:
    if text == OFF_LABEL_TEXT:
        return "It is hard to say, maybe Neutral"
    return GOLD.get(text, "Neutral")


def test_llm_mode_from_label_studio_extra_params_with_fallback_to_humans_and_no_secret_in_any_log(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    client = redis_client
    with OpenAIServer(answer=_llm_answer) as llm:
        env = _env(
            tmp_path,
            label_studio,
            redis_url,
            AUTOANNOTATOR_REVIEW_MODE="off",
            AUTOANNOTATOR_POLICY="mean:0.95",
            AUTOANNOTATOR_LLM_BASE_URL=llm.base_url,
            AUTOANNOTATOR_LLM_MODEL="gpt-4o-mini",
            AUTOANNOTATOR_LLM_API_KEY=LLM_KEY,
            AUTOANNOTATOR_LLM_TIMEOUT="5",
        )
        settings = Settings.from_env(env)
        ls = label_studio.client()
        stream = [t for texts in SEED.values() for t in texts[15:]] + NEUTRAL + [SENTINEL_TEXT]
        logs = tmp_path / "logs"
        logs.mkdir()
        with (
            debug_log(logs / "backend.log"),
            AppServer(create_app(settings)) as app,
            Workers(env, logs, debug=True) as workers,
        ):
            project = ls_project(CONFIG)
            uid = _connect(ls, project.id, app.url, extra_params={"review_mode": "llm"})
            publish(settings.model_dir, uid, c=0.05, note="weak on purpose: most tasks are routed")
            drain(client, workers)
            status = app.app.test_client().get(f"/projects/{uid}/settings", headers=_auth()).get_json()
            assert status["review_mode"] == "llm" and status["default"] == "off"

            ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in stream])
            _retrieve(ls, project.id)
            drain(client, workers)
            assert not failed_jobs(client), failed_jobs(client)
            tasks = _tasks(ls, project.id)
            reviewed = {t: task for t, task in tasks.items() if task.data.get("aa_review") == "llm"}
            fell_back = {t: task for t, task in tasks.items() if task.data.get("aa_needs_review")}
            assert OFF_LABEL_TEXT in fell_back and OFF_LABEL_TEXT not in reviewed
            assert fell_back[OFF_LABEL_TEXT].data["aa_review"] == "human (LLM off_label)"
            # The weak model is under 0.95 on every task: all are routed, the LLM labels all but one.
            assert sorted(reviewed) == sorted(set(stream) - {OFF_LABEL_TEXT}), sorted(
                t.data.get("aa_review", "-") for t in tasks.values()
            )
            for text, task in reviewed.items():
                # The LLM's label replaced the ensemble's prediction; one prediction per task and version.
                assert [p.model_version for p in task.predictions] == ["v0001"]
                choice = task.predictions[0].result[0]["value"]["choices"]
                assert choice == [_llm_answer(text)] == [task.data["aa_llm_label"]]
            pool = _pool(settings.model_dir, uid)
            assert {pool.get(f"task:{task.id}").source for task in reviewed.values()} == {Source.LLM}
            requests_so_far = len(llm.completions)
            assert all(r.authorization == f"Bearer {LLM_KEY}" for r in llm.completions)
            assert any(SENTINEL_TEXT in r.user_text for r in llm.completions)  # the LLM did read it

            # A human label overrides the LLM's in the pool.
            text = next(iter(reviewed))
            human_label = next(lab for lab in LABELS.names if lab != _llm_answer(text))
            _annotate(ls, tasks[text].id, human_label)
            drain(client, workers)
            item = _pool(settings.model_dir, uid).get(f"task:{tasks[text].id}")
            assert (item.label, item.source) == (human_label, Source.HUMAN)

            # The LLM endpoint fails: new routed tasks go to the human queue, none is lost.
            # Imported tasks are labelled by a labelling run of their own (TASKS_CREATED): nobody
            # presses Retrieve Predictions.
            llm.always(Reply(status=500))
            ls.projects.import_tasks(id=project.id, request=[{"text": "Shares were flat in quiet trading"}])
            drain(client, workers)
            task = _tasks(ls, project.id)["Shares were flat in quiet trading"]
            assert task.data["aa_needs_review"] == 1 and task.data["aa_review"] == "human (LLM failed)"
            assert len(llm.completions) == requests_so_far + 4  # asked, retried 3 times, then gave up

            # Switching to off takes effect for the next prediction, without a restart.
            llm.always(None)
            answer = app.app.test_client().post(
                f"/projects/{uid}/settings", json={"review_mode": "off"}, headers=_auth()
            )
            assert answer.status_code == 200
            before = len(llm.completions)
            ls.projects.import_tasks(id=project.id, request=[{"text": "Markets will open at nine"}])
            drain(client, workers)
            task = _tasks(ls, project.id)["Markets will open at nine"]
            assert [p.model_version for p in task.predictions] == ["v0001"]
            assert "aa_review" not in task.data and len(llm.completions) == before

            status = app.app.test_client().get("/status.json", headers=_auth()).get_json()
            counters = next(p for p in status["projects"] if p["project"] == uid)["counters"]
            assert counters["llm_calls"] == len(llm.completions)
            assert counters["reviewed_llm"] == len(reviewed)
            # Tokens as the server reported them for every answer it gave, priced as gpt-4o-mini.
            answered = [r for r in llm.completions if r.reply_status == 200]
            tokens = [rough_usage(r.body, _llm_answer(r.user_text)) for r in answered]
            assert (counters["llm_prompt_tokens"], counters["llm_completion_tokens"]) == (
                sum(p for p, _ in tokens),
                sum(c for _, c in tokens),
            )
            prices = PriceTable.default()
            cost = sum(prices.cost("gpt-4o-mini", p, c) or 0.0 for p, c in tokens)
            assert cost > 0 and counters["llm_cost_usd"] == pytest.approx(cost)

    # Secrets and task text in no log, even at DEBUG: the whole of the backend's log and of every
    # worker's, read after they stopped.
    written = {p.name: p.read_text(errors="replace") for p in sorted(logs.glob("*.log"))}
    assert sorted(written) == ["backend.log", *(p.name for p in workers.log_paths())]
    for name, text in written.items():
        assert " DEBUG " in text, f"{name} was not written at DEBUG"
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    secrets = {
        "LLM API key": LLM_KEY,
        "Label Studio token": label_studio.token,
        "basic-auth password": PASSWORD,
        "basic-auth header": basic,
        "the sentinel task text": SENTINEL_TEXT,
        **{
            f"task text {t!r}": t
            for t in [*stream, "Shares were flat in quiet trading", "Markets will open at nine"]
        },
    }
    leaks = [
        (name, what) for name, text in written.items() for what, value in secrets.items() if value in text
    ]
    assert leaks == [], leaks


def test_webhook_storm_starts_one_training_and_loses_no_label_then_redis_flush_rebuilds_pool(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    client = redis_client
    env = _env(
        tmp_path, label_studio, redis_url, AUTOANNOTATOR_REVIEW_MODE="off", AUTOANNOTATOR_RETRAIN_EVERY="20"
    )
    settings = Settings.from_env(env)
    ls = label_studio.client()
    texts = [t for label_texts in SEED.values() for t in label_texts[:10]]  # 30 texts
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs", n=2) as workers:
        project = ls_project(CONFIG)
        uid = _connect(ls, project.id, app.url)
        publish(settings.model_dir, uid, c=1.0, note="served before the storm")
        drain(client, workers)
        ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
        tasks = _tasks(ls, project.id)

        errors: list[BaseException] = []

        def annotate(chunk: list[str]) -> None:
            try:
                for text in chunk:
                    _annotate(ls, tasks[text].id, GOLD[text])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=annotate, args=(texts[i::6],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        drain(client, workers)
        assert not failed_jobs(client), failed_jobs(client)
        # Scale-out: both ingest/review workers (separate processes, each keeping its own copy of
        # the pool; one Redis, one model store) took jobs, and the train worker ran the one training
        # (worker 3 serves the label queue: the published versions' labelling runs).
        done = {w.name: w.successful_job_count for w in Worker.all(connection=client)}
        ingest_workers = [f"test-{os.getpid()}-{i}" for i in (0, 1)]
        assert len(done) == 4 and all(done[name] > 0 for name in ingest_workers), done
        assert done[f"test-{os.getpid()}-2"] == 1, done
        registry = ProjectModels(settings.model_dir).registry(uid)
        trainings = [
            e for e in registry.history() if e.get("event") in {"publish", "rejected"} and e.get("previous")
        ]
        assert len(trainings) == 1, trainings  # 30 labels, beta 20: one training, never two at once
        assert registry.current() == "v0002"
        pool = _pool(settings.model_dir, uid)
        assert len(pool) == 30 and pool.growth_since_training() < 20

        # Redis is flushed and the pool log is lost too: Label Studio alone restores every label.
        client.flushdb()
        (registry.root / "pool.jsonl").unlink()
        ls.ml.list(project=project.id)  # LS polls /setup; the backend sees a project it does not know
        drain(client, workers)
        rebuilt = _pool(settings.model_dir, uid)
        assert {it.key: it.label for it in rebuilt.items()} == {it.key: it.label for it in pool.items()}
        assert registry.current() == "v0002"  # a rebuild alone does not retrain on old labels

        # An annotator deletes an annotation: its label leaves the pool (LS sends only ids; the
        # backend reconciles with LS).
        victim = tasks[texts[0]]
        for annotation in ls.annotations.list(id=victim.id):
            ls.annotations.delete(id=annotation.id)
        drain(client, workers)
        after = _pool(settings.model_dir, uid)
        assert after.get(f"task:{victim.id}") is None and len(after) == 29
