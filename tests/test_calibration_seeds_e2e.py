"""Calibration seeds through a real Label Studio, the session's Redis and real worker processes.

A project whose policy is a target before anyone annotates: people label the seed tasks in Label
Studio, and the webhook sends a share of them, drawn by task, to the audit log instead of the
training pool. The first version trains on the others, and is certified on the kept-out ones as
soon as it is published.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from autoannotator.learning.audit import AuditLog, drawn_for_calibration
from autoannotator.learning.pool import VerifiedPool
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests.e2e_data import CONFIG, LABELS, SEED
from tests.flow import PASSWORD, USER, AppServer, Workers, backend_env, drain, failed_jobs, wait_for
from tests.flow import annotate as _annotate
from tests.flow import connect as _connect

pytestmark = pytest.mark.e2e

SHARE = 0.5  # of the seed annotations: about 30 of the 60 tasks
TEXTS = {text: label for label, group in SEED.items() for text in group}


def test_seed_annotations_drawn_for_calibration_never_train_and_certify_the_first_version(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    env = backend_env(
        tmp_path / "models",
        label_studio,
        redis_url,
        AUTOANNOTATOR_POLICY="target:0.6",
        AUTOANNOTATOR_AUDIT_SHARE="0.1",
        AUTOANNOTATOR_CALIBRATION_SEEDS=str(SHARE),
        AUTOANNOTATOR_SEED_LABELS="20",
        AUTOANNOTATOR_COLD_START_KINDS="ngram-linear",
        AUTOANNOTATOR_REVIEW_MODE="human",
    )
    settings = Settings.from_env(env)
    ls = label_studio.client()
    project = ls_project(CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
    tasks = {t.id: t.data["text"] for t in ls.tasks.list(project=project.id, fields="all", page_size=500)}
    drawn = {i for i in tasks if drawn_for_calibration(i, SHARE)}
    assert 15 <= len(drawn) <= 45
    root = ProjectModels(settings.model_dir)
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
        uid = _connect(ls, project.id, app.url)
        log = AuditLog(root.registry(uid).root / "audit.jsonl")
        # The drawn tasks first, all before any version exists; then the others, which train it.
        for task_id in sorted(drawn):
            _annotate(ls, task_id, TEXTS[tasks[task_id]])
        wait_for(
            "the calibration seeds to reach the log", lambda: len(log.records()) == len(drawn), 120, workers
        )
        drain(redis_client, workers)
        assert root.registry(uid).current() is None
        for task_id in sorted(set(tasks) - drawn):
            _annotate(ls, task_id, TEXTS[tasks[task_id]])
        calibration = root.registry(uid).root / "calibration.json"
        wait_for(
            "the first version, calibrated",
            lambda: calibration.exists() and json.loads(calibration.read_text())["version"] == "v0001",
            300,
            workers,
        )
        drain(redis_client, workers)
        assert not failed_jobs(redis_client), failed_jobs(redis_client)

        records = log.records()
        assert {r.task_id for r in records} == drawn and all(r.is_seed for r in records)
        assert all(r.gold == TEXTS[tasks[r.task_id]] for r in records)
        pool = VerifiedPool(LABELS, path=root.registry(uid).root / "pool.jsonl")
        assert {int(it.key.split(":")[1]) for it in pool.items()} == set(tasks) - drawn
        stored = json.loads(calibration.read_text())
        assert stored["calibration"] == stored["seeds"] == len(drawn)

        auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
        status = app.app.test_client().get("/status.json", headers=auth).get_json()
        (mine,) = [p for p in status["projects"] if p["project"] == uid]
        routing = mine["routing"]
        assert routing["audit"]["labels"] == 0 and routing["audit"]["calibration_seeds"] == len(drawn)
        assert routing["audit"]["per_version"] == []  # the seeds measure no version
        assert f"on 0 audit labels and {len(drawn)} calibration seeds" in routing["message"]
