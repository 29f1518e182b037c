"""README claims proven against a real Label Studio, a real Redis and real rq worker processes.

- *Start Training* (``POST /api/ml/{id}/train``) and LS's ``min_annotations_to_start_training``
  each send START_TRAINING to ``/webhook``, and each START_TRAINING starts exactly one training.
- After a Redis flush *and* the loss of the pool log, the sync rebuilds the LLM labels from the
  ``aa_llm_label`` the review wrote into the tasks, and a human label still beats the LLM's.
- Annotations whose webhooks LS sent before the backend's first sync gave the webhook our basic-auth
  header (answered 401) reach the pool anyway: that sync reads them back from LS.

What LS 1.23.2 did, measured while writing these tests:

- ``min_annotations_to_start_training`` is a *project* field. LS checks it in the annotation's
  ``post_save`` (``Annotation.objects.filter(project=...).count() % N == 0``, once per created
  annotation) and calls the ML backend's ``train()`` there, i.e. (in LS's code) before it sends
  that annotation's ANNOTATION_CREATED: the training may start before the annotation that
  triggered it reaches the pool, so only the trainings started are counted there, not versions.
- START_TRAINING carries the ML backend's basic auth (project events do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rq.job import Job
from rq.registry import FinishedJobRegistry

from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests.e2e_data import CONFIG, LABELS, SEED, publish
from tests.flow import AppServer, Workers, annotate, backend_env, connect, drain, failed_jobs
from tests.openai_server import OpenAIServer

pytestmark = pytest.mark.e2e

GOLD = {text: label for label, texts in SEED.items() for text in texts}
BASIC = "Basic "


def _pool(model_dir: Path, uid: str) -> dict[str, tuple[str, Source]]:
    """The project's pool as its log on disk says: key -> (label, source)."""
    pool = VerifiedPool(LABELS, path=ProjectModels(model_dir).registry(uid).root / "pool.jsonl")
    return {it.key: (it.label, it.source) for it in pool.items()}


def _trainings(client: Any) -> list[str]:
    """Descriptions of the train jobs that ran to the end (failed ones are checked apart)."""
    registry = FinishedJobRegistry("train", connection=client)
    return sorted(str(Job.fetch(i, connection=client).description) for i in registry.get_job_ids())


def _start_training_calls(app: AppServer) -> list[Any]:
    return [c for c in app.paths("/webhook") if (c.body or {}).get("action") == "START_TRAINING"]


def test_start_training_from_label_studio_starts_exactly_one_training_each_time(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    every = 4  # LS sends START_TRAINING at the 4th, 8th, ... annotation of the project
    env = backend_env(
        tmp_path / "models",
        label_studio,
        redis_url,
        AUTOANNOTATOR_REVIEW_MODE="off",
        AUTOANNOTATOR_RETRAIN_EVERY="1000",  # no training because the pool grew: only START_TRAINING
        AUTOANNOTATOR_MIN_HOLDOUT="1000",  # promote unjudged: judging is test_training's subject
    )
    settings = Settings.from_env(env)
    ls = label_studio.client()
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
        project = ls_project(CONFIG, min_annotations_to_start_training=every)
        uid = connect(ls, project.id, app.url)
        (backend,) = ls.ml.list(project=project.id)
        registry = ProjectModels(settings.model_dir).registry(uid)
        publish(settings.model_dir, uid, c=1.0, note="served before any training")
        drain(redis_client, workers)  # the first sync secures our webhook
        texts = [SEED[label][i] for i in range(6) for label in SEED]  # labels taken in turn
        ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
        tasks = {t.data["text"]: t for t in ls.tasks.list(project=project.id, fields="all")}
        # Annotate training items only (the pool holds a fifth out, by a hash of the key), so that
        # "Start Training" has something new to learn from and publishes a version.
        holdout = VerifiedPool(LABELS).is_holdout
        order = [t for t in texts if not holdout(f"task:{tasks[t].id}")]
        assert len(order) >= 2 * every, "too many held-out tasks for this test"

        for text in order[: every - 1]:
            annotate(ls, tasks[text].id, GOLD[text])
        drain(redis_client, workers)
        assert _start_training_calls(app) == [] and _trainings(redis_client) == []
        assert len(_pool(settings.model_dir, uid)) == every - 1

        # "Start Training" in LS (the ML backend's button): one START_TRAINING, one training.
        ls.ml.train(id=backend.id)
        drain(redis_client, workers)
        assert not failed_jobs(redis_client), failed_jobs(redis_client)
        calls = _start_training_calls(app)
        assert [(c.status, (c.authorization or "").startswith(BASIC)) for c in calls] == [(200, True)]
        assert calls[0].answer == {"status": "training queued"}
        assert _trainings(redis_client) == [f"train {uid}: Start Training in Label Studio"]
        published = [e for e in registry.history() if e.get("event") == "publish" and e.get("previous")]
        assert len(published) == 1 and registry.current() == "v0002", registry.history()

        # min_annotations_to_start_training: the 4th annotation sends START_TRAINING, one training.
        annotate(ls, tasks[order[every - 1]].id, GOLD[order[every - 1]])
        drain(redis_client, workers)
        calls = _start_training_calls(app)
        assert [c.status for c in calls] == [200, 200]
        assert calls[1].answer == {"status": "training queued"}
        assert len(_trainings(redis_client)) == 2, _trainings(redis_client)

        # ... and the 8th another one; the three annotations between start none.
        for i, text in enumerate(order[every : 2 * every]):
            annotate(ls, tasks[text].id, GOLD[text])
            if i < every - 1:
                drain(redis_client, workers)
                assert len(_start_training_calls(app)) == 2 and len(_trainings(redis_client)) == 2
        drain(redis_client, workers)
        assert not failed_jobs(redis_client), failed_jobs(redis_client)
        calls = _start_training_calls(app)
        assert [c.status for c in calls] == [200, 200, 200]
        assert [c.answer for c in calls] == [{"status": "training queued"}] * 3
        assert _trainings(redis_client) == [f"train {uid}: Start Training in Label Studio"] * 3
        assert len(_pool(settings.model_dir, uid)) == 2 * every


def test_llm_labels_are_rebuilt_from_task_data_after_a_redis_flush_and_a_human_label_still_wins(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    with OpenAIServer(answer=lambda text: GOLD.get(text, "Neutral")) as llm:
        env = backend_env(
            tmp_path / "models",
            label_studio,
            redis_url,
            AUTOANNOTATOR_REVIEW_MODE="llm",
            AUTOANNOTATOR_POLICY="mean:0.95",  # with a weak model: every task is routed to the LLM
            AUTOANNOTATOR_RETRAIN_EVERY="1000",
            AUTOANNOTATOR_LLM_BASE_URL=llm.base_url,
            AUTOANNOTATOR_LLM_MODEL="gpt-4o-mini",
            AUTOANNOTATOR_LLM_API_KEY="sk-e2e-secret-key",
            AUTOANNOTATOR_LLM_TIMEOUT="5",
        )
        settings = Settings.from_env(env)
        ls = label_studio.client()
        texts = [t for label_texts in SEED.values() for t in label_texts[16:18]]  # 6 texts
        with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
            project = ls_project(CONFIG)
            uid = connect(ls, project.id, app.url)
            publish(settings.model_dir, uid, c=0.05, note="weak on purpose: every task is routed")
            drain(redis_client, workers)
            ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
            ls.actions.create(
                id="retrieve_tasks_predictions",
                project=project.id,
                selected_items={"all": True, "excluded": []},
            )
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            tasks = {t.data["text"]: t for t in ls.tasks.list(project=project.id, fields="all")}
            reviewed = {t: task for t, task in tasks.items() if task.data.get("aa_review") == "llm"}
            # A weak model (c=0.05) is far below 0.95 on every task: all six are routed and labelled.
            assert sorted(reviewed) == sorted(texts), {
                t: task.data.get("aa_review") for t, task in tasks.items()
            }
            assert all(task.data["aa_llm_label"] == GOLD[t] for t, task in reviewed.items())
            by_llm = {f"task:{task.id}": (GOLD[t], Source.LLM) for t, task in reviewed.items()}
            assert _pool(settings.model_dir, uid) == by_llm

            # A human relabels one LLM-labelled task: the human label replaces the LLM's.
            text = sorted(reviewed)[0]
            human_label = next(label for label in LABELS.names if label != GOLD[text])
            annotate(ls, tasks[text].id, human_label)
            drain(redis_client, workers)
            expected = {**by_llm, f"task:{tasks[text].id}": (human_label, Source.HUMAN)}
            assert _pool(settings.model_dir, uid) == expected

            # Redis is flushed and the pool log lost: the LLM labels come back from the tasks' data,
            # with their source, and the human label still beats the LLM label of its task.
            calls_before = len(llm.completions)
            redis_client.flushdb()
            (ProjectModels(settings.model_dir).registry(uid).root / "pool.jsonl").unlink()
            ls.ml.list(project=project.id)  # LS polls /setup; the backend sees a project it does not know
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            assert _pool(settings.model_dir, uid) == expected
            assert len(llm.completions) == calls_before  # rebuilt from LS, not asked again


def test_webhooks_refused_before_the_first_sync_are_recovered_by_it(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    env = backend_env(tmp_path / "models", label_studio, redis_url, AUTOANNOTATOR_REVIEW_MODE="off")
    settings = Settings.from_env(env)
    ls = label_studio.client()
    texts = [t for label_texts in SEED.values() for t in label_texts[:2]]  # 6 texts
    with AppServer(create_app(settings)) as app:
        project = ls_project(CONFIG)
        # Connecting queues the first sync (the one that adds our basic-auth header to LS's
        # webhook); no worker runs yet, so the window before it completes stays open.
        uid = connect(ls, project.id, app.url)
        hooks = [h for h in ls.webhooks.list(project=str(project.id)) if h.url == f"{app.url}/webhook"]
        assert len(hooks) == 1 and "Authorization" not in (hooks[0].headers or {})
        ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
        tasks = {t.data["text"]: t for t in ls.tasks.list(project=project.id, fields="all")}
        early = texts[:4]
        for text in early:
            annotate(ls, tasks[text].id, GOLD[text])
        created = [c for c in app.paths("/webhook") if (c.body or {}).get("action") == "ANNOTATION_CREATED"]
        assert [(c.status, c.authorization) for c in created] == [(401, None)] * len(early)
        assert _pool(settings.model_dir, uid) == {}

        with Workers(env, tmp_path / "logs") as workers:
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            recovered = {f"task:{tasks[t].id}": (GOLD[t], Source.HUMAN) for t in early}
            assert _pool(settings.model_dir, uid) == recovered
            hooks = [h for h in ls.webhooks.list(project=str(project.id)) if h.url == f"{app.url}/webhook"]
            assert len(hooks) == 1 and (hooks[0].headers or {}).get("Authorization", "").startswith(BASIC)

            # From now on LS's webhooks carry the header and are taken at once.
            late = texts[4]
            annotate(ls, tasks[late].id, GOLD[late])
            drain(redis_client, workers)
            created = [
                c for c in app.paths("/webhook") if (c.body or {}).get("action") == "ANNOTATION_CREATED"
            ]
            assert [c.status for c in created] == [401] * len(early) + [200]
            recovered[f"task:{tasks[late].id}"] = (GOLD[late], Source.HUMAN)
            assert _pool(settings.model_dir, uid) == recovered
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
