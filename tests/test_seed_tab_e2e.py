"""The "Seed" tab through a real Label Studio and real workers: a project nobody annotated gets the
tasks its cold start should learn from first flagged and listed in a tab of their own, the label
stream opened from that tab serves them, and the tab empties as people label them.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from tests.e2e_data import CONFIG, SEED
from tests.flow import (
    PASSWORD,
    USER,
    AppServer,
    Workers,
    backend_env,
    drain,
    failed_jobs,
    next_task,
    wait_for,
)
from tests.flow import annotate as _annotate
from tests.flow import connect as _connect

pytestmark = pytest.mark.e2e

SEEDS = 6
TEXTS = {text: label for label, group in SEED.items() for text in group}


def _seed_tab(ls: Any, project_id: int) -> Any | None:
    tabs = [v for v in ls.views.list(project=project_id) if (v.data or {}).get("title") == "Seed"]
    assert len(tabs) <= 1, "one Seed tab, however often the project connects"
    return tabs[0] if tabs else None


def test_a_new_project_gets_its_seed_tasks_in_a_seed_tab_served_first(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str, tiny_encoder: Path
) -> None:
    env = backend_env(
        tmp_path / "models",
        label_studio,
        redis_url,
        AUTOANNOTATOR_SEED_TAB="true",
        AUTOANNOTATOR_SEED_LABELS=str(SEEDS),
        AUTOANNOTATOR_ENCODER=str(tiny_encoder),
        AUTOANNOTATOR_COLD_START_KINDS="ngram-linear",
    )
    settings = Settings.from_env(env)
    ls = label_studio.client()
    project = ls_project(CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS] + [{"text": ""}])
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
        uid = _connect(ls, project.id, app.url)
        tab = wait_for("the Seed tab", lambda: _seed_tab(ls, project.id), 120, workers)
        drain(redis_client, workers)
        assert not failed_jobs(redis_client), failed_jobs(redis_client)
        auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
        status = app.app.test_client().get("/status.json", headers=auth).get_json()
        (mine,) = [p for p in status["projects"] if p["project"] == uid]
        assert mine["seeds"]["seed_tab"].startswith(f"{SEEDS} seed tasks in the 'Seed' tab")
        page = app.app.test_client().get("/status", headers=auth).get_data(as_text=True)
        assert "seed tasks (Seed tab)" in page

        tasks = {t.id: t for t in ls.tasks.list(project=project.id, fields="all", page_size=500)}
        flagged = {i for i, t in tasks.items() if t.data.get("aa_seed") == 1}
        assert len(flagged) == SEEDS
        assert all(tasks[i].data["text"] for i in flagged)  # the task without text is never a seed
        listed = {t.id for t in ls.tasks.list(project=project.id, view=tab.id, page_size=500)}
        assert listed == flagged
        # Every other field of a flagged task is as it was imported.
        assert all(set(tasks[i].data) == {"text", "aa_seed"} for i in flagged)

        # "Label All Tasks" from the tab serves its tasks; a labelled one leaves the tab.
        first = next_task(label_studio, project.id, tab.id)
        assert first["id"] in flagged
        _annotate(ls, first["id"], TEXTS[tasks[first["id"]].data["text"]])
        listed = {t.id for t in ls.tasks.list(project=project.id, view=tab.id, page_size=500)}
        assert listed == flagged - {first["id"]}

        # Connecting again changes nothing: the choice was made once.
        _connect(ls, project.id, app.url)
        drain(redis_client, workers)
        assert _seed_tab(ls, project.id) is not None
        again = {
            t.id
            for t in ls.tasks.list(project=project.id, fields="all", page_size=500)
            if t.data.get("aa_seed") == 1
        }
        assert again == flagged
        assert not failed_jobs(redis_client), failed_jobs(redis_client)
