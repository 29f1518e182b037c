"""The product as Label Studio meets it: a real LS 1.23.2 drives our backend over real HTTP.

Our app (``create_app``) is served by werkzeug on 127.0.0.1 in a thread of the test process, and
every request LS makes is recorded (an ``after_request`` hook added here, not in the product). Not
gunicorn: it would fork a separate process whose requests we could not record in memory, take
seconds to boot and need a signal dance to stop; werkzeug binds port 0 at once (no port race),
answers each request in its own thread (LS's 1 s timeouts on /health and /webhook never wait
behind a /predict) and stops with ``shutdown()``. The WSGI app is the same object gunicorn would serve.

The story: connect the backend to a sentiment project while it has no model, publish a real
NgramSpecialist ensemble for the uid LS actually sent, import tasks (two of them bad), let LS
retrieve predictions through the Data Manager action, read back what LS stored, then publish a
second version and see LS re-predict with it while the same server keeps running.

What LS 1.23.2 / label-studio-sdk 2.1.2 did, measured while writing this test (beyond
``/work/shared/docs/label-studio.md``):

- Connecting: ``ls.ml.create(url=..., project=id, title=...)`` (``POST /api/ml``) is all it takes;
  LS calls ``GET /health`` + ``POST /setup`` twice (serializer validation, then ``update_state``),
  ~0.1 s in all. Answering /setup with ``"waiting-for-seed-labels"`` is accepted: the backend is
  stored ``Connected`` (state ``"CO"``) with that model_version (``auto_update`` is on by default,
  so every later /setup answer replaces it). Every ``GET /api/ml...`` (``ls.ml.list``/``get``)
  calls /health + /setup again.
- The uid LS sends as ``project`` (in /setup and /predict alike) is the string
  ``f"{project.id}.{int(project.created_at.timestamp())}"``, e.g. ``"1.1795426762"``; the
  timestamp is whole seconds of the project's ``created_at`` as the SDK returns it.
- /setup carries exactly ``project, schema, hostname, access_token, extra_params``; ``schema`` is
  the label config as LS stored it (comments kept, the trailing newline stripped), ``hostname`` is
  ``LABEL_STUDIO_HOST``, ``extra_params`` is None, and ``access_token`` is the project creator's
  own API token (here the legacy token): every backend connected to a project receives its
  owner's credential. LS sends no ``Authorization`` header (User-Agent ``heartex/<commit>``).
  /predict carries ``tasks, project, label_config, params`` (``params = {login, password,
  context}``, all None here); each task is LS's full task object (``id``, ``data``, ``meta``,
  ``annotations``, ``predictions``, counters, ...).
- Import validates each task's data against the config: a task without ``text`` makes LS refuse
  the *whole* import (400, ``'"text" key is expected in task data'``), nothing is stored. But
  ``PATCH /api/tasks/{id}`` (``ls.tasks.update``) accepts data without ``text``: that is how a
  task missing its text reaches the backend.
- Connecting auto-creates a webhook to ``<backend>/webhook``; our app has no such route, so LS's
  ``TASKS_CREATED``/``PROJECT_UPDATED`` posts get a 404 there, which LS ignores.
- ``ls.actions.create(id="retrieve_tasks_predictions", project=id, selected_items={"all": True,
  "excluded": []})`` returns None and runs synchronously: /health, /setup (its answer is the
  version LS compares with), then ONE /predict with every selected task lacking a prediction of
  that version, all 10 at once. With nothing new to predict LS still calls /health + /setup but
  no /predict.
- An item with an empty ``result`` IS stored: a prediction row with ``result == []``, the score we
  sent (0.0) and our model_version. (``labelconfig.empty_prediction``'s docstring says LS stores
  nothing for it; that is not so.) Such a task therefore counts as predicted for that version
  and is not asked again until the version changes, and its ``predictions_score`` is 0.0.
- ``project.model_version`` is set to the backend *title* on connect and is not updated by
  retrievals. While it is the title, ``predictions_score`` in the task list is None for every
  task (it averages only predictions of ``project.model_version``). ``PATCH /api/projects/{id}
  {"model_version": v}`` is refused (400, "Model version doesn't exist either as live model or as
  static predictions.") until predictions of ``v`` exist, so the order is: publish, retrieve, then
  set the project's model_version to the new version.
- ``GET /api/tasks/{id}`` returns a task's predictions of every version regardless of
  ``project.model_version``, but *calls /predict* for a task with no prediction at all
  (``show_collab_predictions`` is on by default); this test reads predictions back through
  ``GET /api/predictions?project=`` so that reading never triggers predicting.
- ``ls.ml.list_model_versions`` (``GET /api/ml/{id}/versions``) calls our ``GET /versions``
  without a body, hence without the project: LS shows whatever we list, here every project's
  ``"<uid>/<version>"``.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from autoannotator.labelstudio.config import PredictionValidator, parse_label_config
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import WAITING_VERSION
from tests.e2e_data import CLEAR, CONFIG, LABELS, NEUTRAL, publish
from tests.flow import AppServer
from tests.ls_server import LabelStudioServer

pytestmark = pytest.mark.e2e

BACKEND_TITLE = "AutoAnnotator e2e"
RETRIEVE = "retrieve_tasks_predictions"


@pytest.fixture
def backend(tmp_path: Path, redis_url: str) -> Iterator[AppServer]:
    """Our backend on a real socket for the test's length (see the module docstring: why werkzeug),
    every request LS makes recorded; ``backend.model_dir`` is its model store."""
    model_dir = tmp_path / "models"
    with AppServer(create_app(Settings(model_dir=model_dir, redis_url=redis_url))) as server:
        server.model_dir = model_dir
        yield server


def stored_predictions(ls: LabelStudio, project_id: int) -> dict[int, dict[str, Any]]:
    """task id -> {model_version: prediction} as LS stored them (never triggers a /predict)."""
    out: dict[int, dict[str, Any]] = defaultdict(dict)
    for p in ls.predictions.list(project=project_id):
        assert p.model_version not in out[p.task], f"task {p.task}: two predictions of {p.model_version}"
        out[p.task][p.model_version] = p
    return out


def prediction_scores(ls: LabelStudio, project_id: int) -> dict[int, float | None]:
    """The Data Manager's ``predictions_score`` per task (what score filters and sampling use)."""
    return {t.id: t.predictions_score for t in ls.tasks.list(project=project_id, fields="all")}


def test_label_studio_drives_our_backend_over_http(
    backend: AppServer, label_studio: LabelStudioServer, ls_project, capsys
) -> None:
    ls = label_studio.client()
    config = parse_label_config(CONFIG)
    validator = PredictionValidator(config)
    project = ls_project(CONFIG, title="e2e backend")

    # --- 1. Connect while the project has no model yet.
    began = time.monotonic()
    ml = ls.ml.create(url=backend.url, project=project.id, title=BACKEND_TITLE)
    connect_s = time.monotonic() - began
    assert (ml.state, ml.readable_state, ml.error_message) == ("CO", "Connected", None)
    assert ml.model_version == WAITING_VERSION
    connect = backend.since(0)
    assert [(c.method, c.path, c.status) for c in connect] == [
        ("GET", "/health", 200),
        ("POST", "/setup", 200),
    ] * 2
    setup = connect[1].body
    assert set(setup) == {"project", "schema", "hostname", "access_token", "extra_params"}
    assert setup["schema"] == CONFIG.strip()  # as LS stored it: trailing newline stripped
    assert setup["hostname"] == label_studio.url
    assert setup["access_token"] == label_studio.token
    assert setup["extra_params"] is None
    assert all(c.authorization is None for c in connect)
    assert all(c.answer == {"model_version": WAITING_VERSION} for c in connect if c.path == "/setup")
    uid = setup["project"]
    assert re.fullmatch(r"\d+\.\d{9,}", uid), uid
    assert uid == f"{project.id}.{int(project.created_at.timestamp())}"
    assert ls.projects.get(id=project.id).model_version == BACKEND_TITLE

    # --- 2. The first real model for exactly the uid LS sends.
    v1 = publish(backend.model_dir, uid, c=8.0, note="e2e seed set")

    # --- 3. Tasks: 8 good, one with empty text, one without the text field.
    with pytest.raises(ApiError) as refused:
        ls.projects.import_tasks(id=project.id, request=[{"text": "fine"}, {"note": "no text"}])
    assert refused.value.status_code == 400
    assert '"text" key is expected in task data' in str(refused.value.body)
    assert list(ls.tasks.list(project=project.id)) == []  # the whole import was refused
    good_texts = [*CLEAR, *NEUTRAL]
    ls.projects.import_tasks(
        id=project.id, request=[{"text": t} for t in good_texts] + [{"text": ""}, {"text": "to drop"}]
    )
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    assert len(tasks) == 10
    empty_id, missing_id = tasks[-2].id, tasks[-1].id
    ls.tasks.update(id=missing_id, data={"note": "the text field was dropped in an edit"})
    good = {t.id: t.data["text"] for t in tasks[:-2]}
    assert sorted(good.values()) == sorted(good_texts)

    webhooks = [c for c in backend.calls if c.path == "/webhook"]
    assert "TASKS_CREATED" in {c.body["action"] for c in webhooks}  # auto-created on connect

    # --- 4. "Retrieve predictions" from the Data Manager.
    mark = len(backend.calls)
    began = time.monotonic()
    ls.actions.create(id=RETRIEVE, project=project.id, selected_items={"all": True, "excluded": []})
    retrieve_s = time.monotonic() - began
    calls = backend.since(mark)
    assert [(c.method, c.path, c.status) for c in calls] == [
        ("GET", "/health", 200),
        ("POST", "/setup", 200),
        ("POST", "/predict", 200),
    ]
    assert calls[1].body["project"] == uid and calls[1].answer == {"model_version": v1}
    predict = calls[2].body
    assert set(predict) == {"tasks", "project", "label_config", "params"}
    assert predict["project"] == uid and predict["label_config"] == CONFIG.strip()
    assert sorted(t["id"] for t in predict["tasks"]) == [t.id for t in tasks]  # one call, all tasks
    assert predict["params"] == {"login": None, "password": None, "context": None}
    sent = {t["id"]: t["data"] for t in predict["tasks"]}
    assert sent[empty_id] == {"text": ""} and "text" not in sent[missing_id]

    stored = stored_predictions(ls, project.id)
    assert set(stored) == {t.id for t in tasks}
    for task_id, text in good.items():
        assert set(stored[task_id]) == {v1}
        p = stored[task_id][v1]
        assert validator.validate({"result": p.result, "score": p.score, "model_version": v1}) == []
        (choice,) = p.result[0]["value"]["choices"]
        assert choice in LABELS.names
        assert 0.0 <= p.score <= 1.0
        if text in CLEAR:
            assert choice == CLEAR[text], (text, choice, p.score)
    for task_id in (empty_id, missing_id):  # stored, but with no label: see the module docstring
        assert set(stored[task_id]) == {v1}
        assert (stored[task_id][v1].result, stored[task_id][v1].score) == ([], 0.0)

    # The project still points at the backend title: score filters see nothing until it is aligned.
    assert set(prediction_scores(ls, project.id).values()) == {None}
    ls.projects.update(id=project.id, model_version=v1)
    assert prediction_scores(ls, project.id) == {t.id: pytest.approx(stored[t.id][v1].score) for t in tasks}

    # --- 5. A second version, served by the same running server.
    v2 = publish(backend.model_dir, uid, c=2.0, note="e2e retrained")
    assert v2 != v1
    with pytest.raises(ApiError) as unknown:
        ls.projects.update(id=project.id, model_version=v2)
    assert unknown.value.status_code == 400
    assert "doesn't exist" in str(unknown.value.body)

    mark = len(backend.calls)
    ls.actions.create(id=RETRIEVE, project=project.id, selected_items={"all": True, "excluded": []})
    calls = backend.since(mark)
    assert [c.path for c in calls] == ["/health", "/setup", "/predict"]
    assert calls[1].answer == {"model_version": v2}
    assert sorted(t["id"] for t in calls[2].body["tasks"]) == [t.id for t in tasks]
    assert {r["model_version"] for r in calls[2].answer["results"]} == {v2}

    stored = stored_predictions(ls, project.id)
    for task_id, text in good.items():
        assert set(stored[task_id]) == {v1, v2}  # LS keeps the old version's predictions
        p = stored[task_id][v2]
        assert validator.validate({"result": p.result, "score": p.score, "model_version": v2}) == []
        if text in CLEAR:
            assert p.result[0]["value"]["choices"] == [CLEAR[text]], (text, p.result, p.score)
    for task_id in (empty_id, missing_id):
        assert (stored[task_id][v2].result, stored[task_id][v2].score) == ([], 0.0)
    ls.projects.update(id=project.id, model_version=v2)
    assert prediction_scores(ls, project.id) == {t.id: pytest.approx(stored[t.id][v2].score) for t in tasks}
    assert ls.ml.get(id=ml.id).model_version == v2
    any_good = next(iter(good))
    assert {p.model_version for p in ls.tasks.get(id=any_good).predictions} == {v1, v2}

    # Nothing new to predict: LS still asks /setup, but sends no /predict.
    mark = len(backend.calls)
    ls.actions.create(id=RETRIEVE, project=project.id, selected_items={"all": True, "excluded": []})
    assert [c.path for c in backend.since(mark)] == ["/health", "/setup"]

    # LS passes our /versions through; it cannot tell us the project (a GET without a body).
    mark = len(backend.calls)
    versions = ls.ml.list_model_versions(id=ml.id)
    assert {f"{uid}/{v1}", f"{uid}/{v2}"} <= set(versions.versions)
    (listed,) = [c for c in backend.since(mark) if c.path == "/versions"]
    assert listed.body is None

    with capsys.disabled():
        print(
            f"\n[e2e] backend connect {connect_s:.2f} s; first retrieve of {len(tasks)} tasks "
            f"(LS -> /health, /setup, /predict -> stored) {retrieve_s:.2f} s"
        )
