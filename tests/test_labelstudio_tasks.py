"""Label Studio in bulk (``autoannotator.labelstudio.tasks``) against a real Label Studio.

Every test imports its own tasks (``text {i}``) into a fresh project of the sentiment config and
checks what LS stored or answered, never what our code believes it sent. What LS 1.23.2 did here:

- ``GET /api/tasks`` with a ``query`` filter counts ``total`` over both filters, so the total of
  :func:`unannotated_page` is the number of unannotated tasks *above* ``after_id``;
- an annotation created between two pages shifts numbered pages by one task (measured below), which
  is why the run pages by id;
- ``add_data_field`` (``POST /api/dm/actions``) stores a Number as a float (``1`` reads back as
  ``1.0``) and leaves the task's other data keys as they were;
- ``PATCH /api/tasks/{id}`` of a deleted task answers 404;
- ``import/predictions`` drops a prediction it finds invalid (logged on its side) without refusing
  the request, and answers ``created`` with the number it stored;
- ``DELETE /api/projects/{id}/model-versions`` answers ``deleted_predictions: 0`` for a version
  with no prediction;
- with ``fields=task_only`` LS computes a Data Manager column only when the query filters, orders
  or shows it, so ``include=predictions_model_versions`` alone reads back ``""``;
- one unknown task id fails ``import/predictions`` with 400 "... contains invalid "task" field:
  corresponding task ID couldn't be retrieved from project ... tasks" (the legacy import path this
  server takes), not "not found in project".

Both were bugs of the module when these tests were written (it now shows the versions column and
knows both wordings); the tests below failed before the fix.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from autoannotator.labelstudio import tasks
from autoannotator.labelstudio.config import parse_label_config, prediction
from autoannotator.labelstudio.fields import IN_TAB, NEEDS_REVIEW, OUT_OF_TAB, REVIEWED_BY
from autoannotator.labelstudio.review_tab import ensure_review_tab
from autoannotator.labelstudio.tasks import (
    delete_version,
    import_predictions,
    model_versions,
    set_data_field,
    unannotated_page,
    unannotated_tasks,
)
from autoannotator.service.context import Context
from autoannotator.settings import Settings
from tests.e2e_data import CONFIG
from tests.flow import annotate

pytestmark = pytest.mark.e2e

SENTIMENT = parse_label_config(CONFIG)

# ---------------------------------------------------------------- helpers


def _project(ls: LabelStudio, ls_project: Callable[..., Any], n: int, **extra: Any) -> tuple[int, list[int]]:
    """A new sentiment project with ``n`` tasks ``{"text": "text {i}", **extra}``; its id and the
    task ids in ascending order (LS numbers imported tasks in import order)."""
    project = ls_project(CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"text": f"text {i}", **extra} for i in range(n)])
    ids = sorted(int(task.id) for task in ls.tasks.list(project=project.id, page_size=n))
    assert len(ids) == n
    return project.id, ids


def _item(task_id: int, version: str, score: float = 0.5, label: str = "Positive") -> dict[str, Any]:
    """One element of :func:`import_predictions`'s list."""
    return {"task": task_id, **prediction(SENTIMENT, label, score, version)}


def _stored(ls: LabelStudio, project_id: int) -> list[tuple[int, str]]:
    """Every prediction LS holds for the project, as sorted ``(task, model_version)`` pairs."""
    return sorted((int(p.task), str(p.model_version)) for p in ls.predictions.list(project=project_id))


def _data(ls: LabelStudio, project_id: int) -> dict[int, dict[str, Any]]:
    """Each task's data as LS stores it now."""
    return {int(task.id): dict(task.data) for task in ls.tasks.list(project=project_id, page_size=1000)}


# ---------------------------------------------------------------- unannotated_page


def test_unannotated_page_pages_by_id_and_leaves_annotated_tasks_out(label_studio, ls_project) -> None:
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 10)
    annotate(ls, ids[3], "Positive")

    page, total = unannotated_page(ls, pid, after_id=0, size=4)
    assert [t["id"] for t in page] == [ids[0], ids[1], ids[2], ids[4]]  # ids[3] is annotated
    assert total == 9
    # Only what the planner reads: no data, no Data Manager columns computed for nothing.
    assert all(set(t) == {"id", "predictions_model_versions"} for t in page)

    page, total = unannotated_page(ls, pid, after_id=ids[4], size=4)
    assert [t["id"] for t in page] == ids[5:9]
    assert total == 5  # LS counts over both filters: the unannotated tasks above the cursor

    page, total = unannotated_page(ls, pid, after_id=ids[8], size=4)
    assert [t["id"] for t in page] == [ids[9]]
    assert unannotated_page(ls, pid, after_id=ids[9], size=4) == ([], 0)


def test_paging_250_tasks_visits_each_unannotated_task_once_while_people_annotate(
    label_studio, ls_project
) -> None:
    """Between the first and the second page a person annotates one task already read (which
    shifts numbered pages) and one of a later page (which must then never be served)."""
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 250)
    visited: list[int] = []
    totals: list[int] = []
    cursor = 0
    while True:
        page, total = unannotated_page(ls, pid, after_id=cursor, size=100)
        visited += [int(t["id"]) for t in page]
        totals.append(total)
        if len(totals) == 1:
            annotate(ls, ids[5], "Negative")  # already read
            annotate(ls, ids[150], "Positive")  # on the next page
        if len(page) < 100:
            break
        cursor = int(page[-1]["id"])

    assert sorted(Counter(visited).values()) == [1] * len(visited)  # nothing twice
    assert set(visited) == set(ids) - {ids[150]}
    assert visited == sorted(visited)
    assert totals == [250, 149, 49]

    # Why by id: numbered pages over the same filter, after those annotations, skip ids[100].
    query = {"filters": {"conjunction": "and", "items": [tasks._UNANNOTATED]}, "ordering": ["tasks:id"]}
    params = {"project": pid, "page": 2, "page_size": 100, "fields": "task_only", "include": "id"}
    numbered = tasks._call(ls, "GET", "api/tasks", params={**params, "query": json.dumps(query)})
    assert numbered["tasks"][0]["id"] == ids[101]


# ---------------------------------------------------------------- unannotated_tasks


def test_unannotated_tasks_returns_the_requested_ids_still_unannotated(label_studio, ls_project) -> None:
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 8, source="import")
    annotate(ls, ids[2], "Neutral")
    ls.tasks.delete(id=str(ids[5]))
    other_pid, other_ids = _project(ls, ls_project, 1)

    asked = [ids[6], ids[2], ids[0], ids[5], ids[3], other_ids[0], ids[-1] + 10_000]
    found = unannotated_tasks(ls, pid, asked)

    # Annotated, deleted, another project's and never-existing ids are simply absent; the tasks
    # not asked for (ids[1], ids[4], ids[7]) too; ascending whatever order they were asked in.
    assert [t["id"] for t in found] == [ids[0], ids[3], ids[6]]
    for task, i in zip(found, (0, 3, 6), strict=True):
        assert set(task) == {"id", "data", "total_annotations", "predictions_model_versions"}
        assert task["data"] == {"text": f"text {i}", "source": "import"}
        assert task["total_annotations"] == 0
    assert unannotated_tasks(ls, pid, []) == []
    assert [t["id"] for t in unannotated_tasks(ls, other_pid, other_ids)] == other_ids


# ---------------------------------------------------------------- model_versions


def test_model_versions_of_a_plain_answer() -> None:
    """LS answers the column comma-separated; a list (another serializer) is read as well."""
    assert model_versions({"predictions_model_versions": "v0002,v0001"}) == {"v0001", "v0002"}
    assert model_versions({"predictions_model_versions": ""}) == set()
    assert model_versions({"predictions_model_versions": None}) == set()
    assert model_versions({}) == set()
    assert model_versions({"predictions_model_versions": ["v0001", "v0003"]}) == {"v0001", "v0003"}


def test_model_versions_lists_every_version_that_predicted_a_task(label_studio, ls_project) -> None:
    """Without them a repeated or resumed run predicts again, and stores a second prediction of
    the same version, every task it already wrote."""
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 3)
    stored = import_predictions(
        ls, pid, [_item(ids[0], "v0001"), _item(ids[0], "v0002", 0.9), _item(ids[1], "v0002")]
    )
    assert stored == 3

    read = {t["id"]: model_versions(t) for t in unannotated_tasks(ls, pid, ids)}
    assert read == {ids[0]: {"v0001", "v0002"}, ids[1]: {"v0002"}, ids[2]: set()}
    page, _ = unannotated_page(ls, pid, after_id=0, size=10)
    assert {t["id"]: model_versions(t) for t in page} == read


# ---------------------------------------------------------------- import_predictions


def test_import_predictions_stores_all_of_them_in_one_request(
    label_studio, ls_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 30)
    items = [_item(task_id, "v0001", score=i / 100) for i, task_id in enumerate(ids)]

    assert import_predictions(ls, pid, items) == 30
    assert _stored(ls, pid) == [(task_id, "v0001") for task_id in ids]
    # The score and the choice arrive as sent.
    last = ls.predictions.list(task=ids[-1])
    assert [p.score for p in last] == [pytest.approx(0.29)]
    assert last[0].result[0]["value"] == {"choices": ["Positive"]}

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tasks, "_call", lambda *args, **kwargs: calls.append(args))
    assert import_predictions(ls, pid, []) == 0
    assert calls == []  # nothing to write: no request at all


def test_import_predictions_skips_a_task_deleted_since_it_was_read(label_studio, ls_project) -> None:
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 5)
    ls.tasks.delete(id=str(ids[2]))

    assert import_predictions(ls, pid, [_item(task_id, "v0001") for task_id in ids]) == 4
    assert _stored(ls, pid) == [(task_id, "v0001") for task_id in ids if task_id != ids[2]]
    # Every task of the list deleted: nothing stored, nothing raised.
    assert import_predictions(ls, pid, [_item(ids[2], "v0002")]) == 0


def test_import_predictions_counts_what_label_studio_stored(label_studio, ls_project) -> None:
    """With the memory-efficient import on (the environment our Label Studio runs with, as large
    projects need), LS 1.23.2 stores a prediction without validating it (here a region on a
    control the config does not have) and answers how many it created: that is the count. (Its
    default import path dropped that one.) So the backend validates every prediction itself
    before it writes it (``Annotator.predict``)."""
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 2)
    wrong = _item(ids[1], "v0001")
    wrong["result"] = [{**wrong["result"][0], "from_name": "no_such_control"}]

    assert import_predictions(ls, pid, [_item(ids[0], "v0001"), wrong]) == 2
    assert _stored(ls, pid) == [(ids[0], "v0001"), (ids[1], "v0001")]


# ---------------------------------------------------------------- set_data_field


def test_set_data_field_sets_one_field_on_the_selected_tasks_only(label_studio, ls_project) -> None:
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 6, source="import")
    before = _data(ls, pid)

    assert set_data_field(ls, pid, [(i, before[i]) for i in ids[:3]], NEEDS_REVIEW, IN_TAB) == 3
    assert set_data_field(ls, pid, [(i, before[i]) for i in ids[1:4]], REVIEWED_BY, "llm") == 3
    assert set_data_field(ls, pid, [], REVIEWED_BY, "human") == 0

    after = _data(ls, pid)
    for n, task_id in enumerate(ids):
        expected = {"text": f"text {n}", "source": "import"}
        if n < 3:
            expected[NEEDS_REVIEW] = IN_TAB
        if 1 <= n < 4:
            expected[REVIEWED_BY] = "llm"
        assert after[task_id] == expected, n
    # A Number comes back a number (LS stores 1 as 1.0), a String a string.
    assert isinstance(after[ids[0]][NEEDS_REVIEW], int | float)
    assert isinstance(after[ids[1]][REVIEWED_BY], str)

    # Setting it again overwrites the value and nothing else.
    assert set_data_field(ls, pid, [(ids[0], after[ids[0]])], NEEDS_REVIEW, OUT_OF_TAB) == 1
    assert _data(ls, pid)[ids[0]] == {"text": "text 0", "source": "import", NEEDS_REVIEW: OUT_OF_TAB}


def test_two_workers_writing_fields_of_the_same_tasks_lose_none_of_them(
    label_studio, ls_project, redis_url, tmp_path
) -> None:
    """On SQLite (this server, and LS's default) ``add_data_field`` reads the selected tasks' data,
    sets the field in Python and writes every row back: two such updates at once on the same tasks
    keep only one of them. Without the ``with``, this test lost fields of all 300 tasks in each of
    three runs here (a labelling run's votes had erased a review job's LLM label the same way);
    under the project's task-data lock, which every writer in the backend takes, nothing is lost."""
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 300)
    settings = Settings.from_env(
        {"AUTOANNOTATOR_MODEL_DIR": str(tmp_path / "models"), "AUTOANNOTATOR_REDIS_URL": redis_url}
    )

    def write(prefix: str) -> None:
        ctx, client = Context.from_settings(settings), label_studio.client()  # a worker of its own
        for n in range(6):
            with ctx.task_data("p1"):
                set_data_field(client, pid, [(i, {}) for i in ids], f"{prefix}{n}", n)

    workers = [threading.Thread(target=write, args=(prefix,)) for prefix in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    expected = {f"{p}{n}" for p in "ab" for n in range(6)} | {"text"}
    lost = {i: sorted(expected - set(d)) for i, d in _data(ls, pid).items() if set(d) != expected}
    assert not lost, f"{len(lost)} of {len(ids)} tasks lost fields, e.g. {next(iter(lost.items()))}"


def _refuse_the_bulk_action(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``_call`` as it is, except that ``api/dm/actions`` answers what LS 1.23.2 answered for an
    action id it does not know. Returns the paths called, in order."""
    real = tasks._call
    paths: list[str] = []

    def call(ls: LabelStudio, method: str, path: str, **kwargs: Any) -> Any:
        paths.append(path)
        if path == "api/dm/actions":
            raise ApiError(
                status_code=500, body={"detail": "Can't find 'add_data_field' in registered actions"}
            )
        return real(ls, method, path, **kwargs)

    monkeypatch.setattr(tasks, "_call", call)
    return paths


def test_set_data_field_patches_each_task_whole_when_the_bulk_action_is_refused(
    label_studio, ls_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one simulated part: the refusal. A real LS cannot be made to refuse ``add_data_field``
    (1.23.2 serves it, experimental or not), so ``_call`` answers ``api/dm/actions`` with the 500
    that LS 1.23.2 really answered for an unknown action id; the per-task PATCHes go to the real
    LS, which replaces a task's data whole, so each task is sent its data plus the field."""
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 5, source="import")
    data = _data(ls, pid)
    ls.tasks.delete(id=str(ids[3]))  # deleted since it was read: PATCH answers 404, skipped
    paths = _refuse_the_bulk_action(monkeypatch)

    chosen = [ids[0], ids[1], ids[3]]
    assert set_data_field(ls, pid, [(i, data[i]) for i in chosen], NEEDS_REVIEW, IN_TAB) == 2
    assert paths == ["api/dm/actions"]  # tried once, then the SDK's task updates

    after = _data(ls, pid)
    assert ids[3] not in after
    for n, task_id in enumerate(ids):
        if task_id == ids[3]:
            continue
        expected = {"text": f"text {n}", "source": "import"}
        if task_id in chosen:
            expected[NEEDS_REVIEW] = IN_TAB
        assert after[task_id] == expected, n


def test_set_data_field_raises_a_failure_that_is_no_refusal(
    label_studio, ls_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500 that does not say the action is unknown is a failing server: no task-by-task storm."""
    ls = label_studio.client()
    pid, _ = _project(ls, ls_project, 2)
    data = _data(ls, pid)

    def broken(ls: LabelStudio, method: str, path: str, **kwargs: Any) -> Any:
        raise ApiError(status_code=500, body={"detail": "database is locked"})

    monkeypatch.setattr(tasks, "_call", broken)
    with pytest.raises(ApiError):
        set_data_field(ls, pid, list(data.items()), NEEDS_REVIEW, IN_TAB)
    monkeypatch.undo()
    assert _data(ls, pid) == data


# ---------------------------------------------------------------- delete_version


def test_delete_version_deletes_that_version_only(label_studio, ls_project) -> None:
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 4)
    items = [_item(i, "v0001") for i in ids] + [_item(i, "v0002") for i in ids[:3]]
    assert import_predictions(ls, pid, items) == 7

    assert delete_version(ls, pid, "v0001") == 4
    assert _stored(ls, pid) == [(i, "v0002") for i in ids[:3]]
    assert delete_version(ls, pid, "v0001") == 0  # nothing left of it
    assert delete_version(ls, pid, "v9999") == 0  # never existed
    assert _stored(ls, pid) == [(i, "v0002") for i in ids[:3]]


# ---------------------------------------------------------------- the Needs review tab


def test_the_review_tab_lists_the_flagged_unannotated_tasks(label_studio, ls_project) -> None:
    """The tab filters on the number ``add_data_field`` stores (1.0): flagged 1 and unannotated."""
    ls = label_studio.client()
    pid, ids = _project(ls, ls_project, 8)
    view_id = ensure_review_tab(ls, pid, flag=NEEDS_REVIEW)
    data = _data(ls, pid)

    def tab() -> list[int]:
        return sorted(int(task.id) for task in ls.tasks.list(project=pid, view=view_id))

    assert tab() == []
    flagged = [ids[0], ids[2], ids[4], ids[6]]
    assert set_data_field(ls, pid, [(i, data[i]) for i in flagged], NEEDS_REVIEW, IN_TAB) == 4
    assert set_data_field(ls, pid, [(i, data[i]) for i in ids[1:6:2]], NEEDS_REVIEW, OUT_OF_TAB) == 3
    # ids[7] never gets the field.
    assert tab() == flagged

    annotate(ls, ids[2], "Positive")  # a person answered it: out of the tab
    assert tab() == [ids[0], ids[4], ids[6]]
    set_data_field(ls, pid, [(ids[4], data[ids[4]])], NEEDS_REVIEW, OUT_OF_TAB)
    assert tab() == [ids[0], ids[6]]
