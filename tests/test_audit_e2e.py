"""The live audit through a real Label Studio, the session's Redis and real worker processes.

A published version's labelling run writes its predictions and draws the audit: about the audit
share of the tasks land in the Needs review tab, marked in the ``aa_audit`` column with the version,
the route and the label, accepted tasks among them. People annotate some of them in Label Studio;
their labels reach the audit log (never the pool), move the estimate on ``/status.json`` and in
``/metrics``, and a target policy chosen on the settings page is certified on them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from autoannotator.learning.audit import AuditLog, AuditMark
from autoannotator.learning.pool import VerifiedPool
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests import scrape
from tests.e2e_data import CONFIG, LABELS, SEED, publish
from tests.flow import PASSWORD, USER, AppServer, Workers, backend_env, drain, failed_jobs, tab_ids, wait_for
from tests.flow import annotate as _annotate
from tests.flow import connect as _connect
from tests.openai_server import OpenAIServer

pytestmark = pytest.mark.e2e

SHARE = 0.3
THRESHOLD = 0.5


def _auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def _tasks(ls: Any, project_id: int) -> list[Any]:
    return list(ls.tasks.list(project=project_id, fields="all", page_size=1000))


def test_audited_tasks_appear_marked_and_their_labels_move_the_estimate_and_certify_a_target(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    env = backend_env(
        tmp_path / "models",
        label_studio,
        redis_url,
        AUTOANNOTATOR_POLICY=f"mean:{THRESHOLD}",
        AUTOANNOTATOR_AUDIT_SHARE=str(SHARE),
        AUTOANNOTATOR_REVIEW_MODE="human",
    )
    settings = Settings.from_env(env)
    ls = label_studio.client()
    texts = {f"{text} (take {i})": label for label, group in SEED.items() for text in group for i in range(3)}
    project = ls_project(CONFIG)
    uid = f"{project.id}.{int(project.created_at.timestamp())}"
    # A version serves from the start (the cold start is the other tests' subject).
    version = publish(settings.model_dir, uid, 1.0, "served")
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
        client = app.app.test_client()
        assert _connect(ls, project.id, app.url) == uid  # /setup starts the version's labelling run
        wait_for(
            "the labelling run to predict every task",
            lambda: all(t.predictions for t in _tasks(ls, project.id)),
            300,
            workers,
        )
        drain(redis_client, workers)
        assert not failed_jobs(redis_client), failed_jobs(redis_client)

        tasks = _tasks(ls, project.id)
        marks = {t.id: AuditMark.parse(t.data.get("aa_audit")) for t in tasks}
        audited = {i for i, m in marks.items() if m is not None}
        assert abs(len(audited) / len(tasks) - SHARE) < 0.12, (len(audited), len(tasks))
        routed = set()
        for task in tasks:
            (p,) = task.predictions
            label = p.result[0]["value"]["choices"][0]
            if p.score < THRESHOLD:
                routed.add(task.id)
            mark = marks[task.id]
            if mark is not None:  # the mark says which version, which route and which label
                route = "routed" if p.score < THRESHOLD else "accepted"
                assert (mark.version, mark.route, mark.label) == (version, route, label), task.data
        accepted = sorted(audited - routed)
        assert len(accepted) >= 10, "too few audited accepted tasks to measure"
        # The tab holds the routed tasks and the audited ones, accepted or not.
        assert tab_ids(ls, project.id) == routed | audited
        status = client.get("/status.json", headers=_auth()).get_json()
        (mine,) = [p for p in status["projects"] if p["project"] == uid]
        assert mine["routing"]["audit"]["labels"] == 0
        assert mine["counters"]["audit_drawn"] == len(audited)

        # People label ten audited accepted tasks: the first six as predicted, four otherwise.
        by_id = {t.id: t for t in tasks}
        for n, task_id in enumerate(accepted[:10]):
            predicted = marks[task_id].label  # type: ignore[union-attr]
            gold = predicted if n < 6 else next(x for x in LABELS.names if x != predicted)
            _annotate(ls, task_id, gold)
        wait_for(
            "the audit labels to reach the log",
            lambda: (
                len(AuditLog(ProjectModels(settings.model_dir).registry(uid).root / "audit.jsonl").records())
                == 10
            ),
            120,
            workers,
        )
        drain(redis_client, workers)
        status = client.get("/status.json", headers=_auth()).get_json()
        (mine,) = [p for p in status["projects"] if p["project"] == uid]
        overall = mine["routing"]["audit"]["overall"]
        assert (overall["accepted"], overall["correct"], overall["accuracy"]) == (10, 6, 0.6)
        assert overall["low"] < 0.6 < overall["high"]
        assert mine["counters"]["audit_labels"] == 10
        metrics = client.get("/metrics", headers=_auth()).get_data(as_text=True)
        assert scrape.value(metrics, "autoannotator_audit_accuracy", project=uid, version=version) == 0.6
        assert (
            scrape.value(metrics, "autoannotator_audit_accepted_labels", project=uid, version=version) == 10
        )
        png = client.get(f"/projects/{uid}/audit.png", headers=_auth())
        assert png.status_code == 200 and png.data[:4] == b"\x89PNG"
        assert f"/projects/{uid}/audit.png" in client.get("/status", headers=_auth()).get_data(as_text=True)
        # Audit labels never train: the pool holds none of them; annotated, they left the tab.
        pool = VerifiedPool(LABELS, path=ProjectModels(settings.model_dir).registry(uid).root / "pool.jsonl")
        assert all(pool.get(f"task:{i}") is None for i in accepted[:10])
        assert tab_ids(ls, project.id).isdisjoint(accepted[:10])
        assert by_id  # every task was read once

        # The PM asks for a target: it is certified on the audit labels (too few to certify 0.9).
        r = client.post(
            f"/projects/{uid}/settings", json={"policy": "target:0.9", "audit_share": SHARE}, headers=_auth()
        )
        assert r.status_code == 200
        drain(redis_client, workers)
        stored = json.loads(redis_client.get(f"aa:p:{uid}:calibration"))
        assert stored["version"] == version and stored["calibration"] == 10
        assert stored["thresholds"] == [None, None, None]
        status = client.get("/status.json", headers=_auth()).get_json()
        (mine,) = [p for p in status["projects"] if p["project"] == uid]
        assert mine["routing"]["policy"] == "target:0.9"
        assert (
            "target 90% at 95% confidence on 10 audit labels: nothing certified yet"
            in mine["routing"]["message"]
        )
        assert not failed_jobs(redis_client), failed_jobs(redis_client)


def test_in_llm_mode_audited_tasks_keep_the_llm_label_out_of_the_pool_and_measure_the_llm(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    """Every task is routed to the LLM (a weak version under mean:0.95); the audited ones also stay
    in the Needs review tab, and their LLM labels do not join the pool: a person's label of one of
    them says whether the LLM agreed."""
    gold = {text: label for label, group in SEED.items() for text in group}
    with OpenAIServer(answer=lambda text: "Positive") as llm:  # right on a third of the tasks
        env = backend_env(
            tmp_path / "models",
            label_studio,
            redis_url,
            AUTOANNOTATOR_POLICY="mean:0.95",
            AUTOANNOTATOR_AUDIT_SHARE="0.5",
            AUTOANNOTATOR_REVIEW_MODE="llm",
            AUTOANNOTATOR_LLM_BASE_URL=llm.base_url,
            AUTOANNOTATOR_LLM_API_KEY="sk-e2e",
        )
        settings = Settings.from_env(env)
        ls = label_studio.client()
        project = ls_project(CONFIG)
        uid = f"{project.id}.{int(project.created_at.timestamp())}"
        version = publish(settings.model_dir, uid, 0.05, "weak on purpose: every task is routed")
        ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in gold])
        with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
            client = app.app.test_client()
            _connect(ls, project.id, app.url)
            wait_for(
                "the LLM to label every task",
                lambda: all(t.data.get("aa_review") == "llm" for t in _tasks(ls, project.id)),
                300,
                workers,
            )
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            tasks = _tasks(ls, project.id)
            audited = {t.id: t for t in tasks if t.data.get("aa_audit")}
            assert 10 <= len(audited) <= 50
            assert all(t.data["aa_audit"].startswith(f"{version} routed: ") for t in audited.values())
            assert tab_ids(ls, project.id) == set(audited)  # the others left with their LLM label
            pool = VerifiedPool(
                LABELS, path=ProjectModels(settings.model_dir).registry(uid).root / "pool.jsonl"
            )
            assert {it.key for it in pool.items()} == {f"task:{t.id}" for t in tasks if t.id not in audited}

            first, second = sorted(audited)[:2]
            _annotate(ls, first, "Positive")  # agrees with the LLM
            _annotate(ls, second, next(x for x in LABELS.names if x != "Positive"))
            wait_for(
                "two audit labels",
                lambda: (
                    len(AuditLog(ProjectModels(settings.model_dir).registry(uid).root / "audit.jsonl")) == 2
                ),
                120,
                workers,
            )
            status = client.get("/status.json", headers=_auth()).get_json()
            (mine,) = [p for p in status["projects"] if p["project"] == uid]
            overall = mine["routing"]["audit"]["overall"]
            assert (overall["accepted"], overall["llm_reviewed"], overall["llm_agreed"]) == (0, 2, 1)
            metrics = client.get("/metrics", headers=_auth()).get_data(as_text=True)
            assert scrape.value(metrics, "autoannotator_audit_llm_agreement", project=uid) == 0.5
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
