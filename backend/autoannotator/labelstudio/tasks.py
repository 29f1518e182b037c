"""Label Studio in bulk: a project's tasks page by page, predictions written many at once, and one
task-data field set on many tasks with one request. What a labelling run of a whole project uses.

Measured against Label Studio 1.23.2 (its own server, SQLite, 2 CPU cores), per task:

- reading: ``GET /api/tasks`` with ``include`` naming the few fields we need costs 0.6 ms a task;
  ``fields=all`` costs 4.4 ms (it computes every Data Manager column), so the run never asks for it;
- predictions: ``POST /api/projects/{id}/import/predictions`` stores 100 in 0.1 s (1 ms each)
  with Label Studio's memory-efficient import on (the feature flag
  ``fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short=true`` in *its*
  environment). Without it, LS 1.23.2 recounts the annotations and predictions of every task of
  the project after each request: 1.1-1.4 s a request at 3,000 tasks, growing with the project,
  so a run of a large project spends its time there (README, "Scaling out"). One unknown task id
  fails the whole request with 400, so a task deleted mid-run is dropped and the rest written again;
- task data: ``PATCH /api/tasks/{id}`` costs 90-120 ms a task (4 or 1 at a time); the Data
  Manager action ``add_data_field`` sets one field to one value on 1,000 selected tasks in 0.19 s.
  It is marked experimental (hidden from the UI's action menu unless experimental features are
  on) but served by the API regardless; when a server refuses it, each task is patched instead;
- deleting a version's predictions (``DELETE /api/projects/{id}/model-versions``): 3.9 ms a task.

Paging is by task id (``id > last seen``, ascending), not by page number: tasks annotated while a
run pages would shift numbered pages and skip tasks. Every call goes through the SDK's HTTP client,
so authentication, timeouts and the SDK's retries of connection errors, 429 and 5xx apply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from label_studio_sdk.core.api_error import ApiError

from autoannotator.labelstudio.config import ProjectConfig, TaskText, extract_texts
from autoannotator.labelstudio.review_tab import TASK_COLUMNS

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)

# What a labelling run reads of a task: its text (data), whether a person annotated it, and which
# model versions already predicted it.
RUN_FIELDS = "id,data,total_annotations,predictions_model_versions"
_UNANNOTATED = {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}
# What LS 1.23.2 answers (400) when an imported prediction names a task that is gone; its two
# import paths word it differently.
_MISSING_TASK = ("not found in project", 'invalid "task" field')
# With fields=task_only LS computes a task's predictions_model_versions only when the query shows
# that column (include= alone returns ""): every other column is hidden.
_VERSIONS_SHOWN = [f"tasks:{c}" for c in TASK_COLUMNS if c != "predictions_model_versions"]
_HIDDEN = {"explore": _VERSIONS_SHOWN, "labeling": _VERSIONS_SHOWN}


def _call(ls: LabelStudio, method: str, path: str, **kwargs: Any) -> Any:
    """One request through the SDK's own HTTP client; the JSON answer, or :class:`ApiError`."""
    response = ls._client_wrapper.httpx_client.request(path, method=method, **kwargs)
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = response.text
    if response.status_code >= 400:
        raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
    return body


def unannotated_page(
    ls: LabelStudio, project_id: int, *, after_id: int, size: int
) -> tuple[list[dict[str, Any]], int]:
    """The next ``size`` tasks no person annotated, with ids above ``after_id``, ascending, each as
    ``{"id", "predictions_model_versions"}``; and how many such tasks there are in all."""
    query = {
        "filters": {
            "conjunction": "and",
            "items": [
                _UNANNOTATED,
                {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after_id},
            ],
        },
        "ordering": ["tasks:id"],
        "hiddenColumns": _HIDDEN,
    }
    params = {
        "project": project_id,
        "page": 1,
        "page_size": size,
        "fields": "task_only",
        "include": "id,predictions_model_versions",
        "query": json.dumps(query),
    }
    body = _call(ls, "GET", "api/tasks", params=params)
    return list(body.get("tasks") or []), int(body.get("total") or 0)


def unannotated_texts(
    ls: LabelStudio, project_id: int, config: ProjectConfig, *, max_chars: int, limit: int, page: int = 1000
) -> tuple[list[TaskText], dict[int, dict[str, Any]]]:
    """The texts of the project's first ``limit`` unannotated tasks (by id) that have one, read in
    pages of ``page``, and each such task's data as Label Studio holds it (written back whole when a
    field is added)."""
    ids: list[int] = []
    after = 0
    while len(ids) < limit:
        found, _ = unannotated_page(ls, project_id, after_id=after, size=page)
        if not found:
            break
        ids += [int(t["id"]) for t in found]
        after = int(found[-1]["id"])
    ids = ids[:limit]
    texts: list[TaskText] = []
    data: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), page):
        tasks = unannotated_tasks(ls, project_id, ids[start : start + page])
        data.update((int(t["id"]), dict(t.get("data") or {})) for t in tasks)
        texts += [t for t in extract_texts(tasks, config, max_chars) if t.ok and t.task_id is not None]
    return texts, data


def unannotated_tasks(ls: LabelStudio, project_id: int, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Those of ``ids`` that still exist and that no person annotated, with :data:`RUN_FIELDS`, in
    ascending id order."""
    if not ids:
        return []
    query = {
        "selectedItems": {"all": False, "included": [int(i) for i in ids]},
        "filters": {"conjunction": "and", "items": [_UNANNOTATED]},
        "ordering": ["tasks:id"],
        "hiddenColumns": _HIDDEN,
    }
    params = {
        "project": project_id,
        "page": 1,
        "page_size": len(ids),
        "fields": "task_only",
        "include": RUN_FIELDS,
        "query": json.dumps(query),
    }
    return list(_call(ls, "GET", "api/tasks", params=params).get("tasks") or [])


def model_versions(task: Mapping[str, Any]) -> set[str]:
    """The model versions that already predicted ``task`` (LS lists them comma-separated)."""
    raw = task.get("predictions_model_versions") or ""
    if isinstance(raw, list):
        return {str(v) for v in raw}
    return {v.strip() for v in str(raw).split(",") if v.strip()}


def import_predictions(ls: LabelStudio, project_id: int, items: Sequence[Mapping[str, Any]]) -> int:
    """Store ``items`` (``{"task", "model_version", "score", "result"}``) with one request; returns
    how many were stored. A task deleted since it was read fails the whole request in LS, so then
    the tasks that still exist are looked up and written again without the others."""
    if not items:
        return 0
    try:
        body = _call(ls, "POST", f"api/projects/{project_id}/import/predictions", json=list(items))
    except ApiError as error:
        if error.status_code != 400 or not any(m in str(error.body) for m in _MISSING_TASK):
            raise
        ids = [int(item["task"]) for item in items]
        alive = {int(t["id"]) for t in _existing(ls, project_id, ids)}
        kept = [item for item in items if int(item["task"]) in alive]
        gone = len(items) - len(kept)
        logger.info("project %s: %d tasks deleted since they were read, skipped", project_id, gone)
        if not kept:
            return 0
        body = _call(ls, "POST", f"api/projects/{project_id}/import/predictions", json=kept)
    return int((body or {}).get("created", 0))


def _existing(ls: LabelStudio, project_id: int, ids: Sequence[int]) -> list[dict[str, Any]]:
    query = {"selectedItems": {"all": False, "included": list(ids)}}
    params = {
        "project": project_id,
        "page": 1,
        "page_size": len(ids),
        "fields": "task_only",
        "include": "id",
        "query": json.dumps(query),
    }
    return list(_call(ls, "GET", "api/tasks", params=params).get("tasks") or [])


def set_data_field(
    ls: LabelStudio,
    project_id: int,
    tasks: Iterable[tuple[int, Mapping[str, Any]]],
    name: str,
    value: str | int | float,
) -> int:
    """Set the task-data field ``name`` to ``value`` on each of ``tasks`` (``(id, data)`` pairs: the
    data is only used if LS refuses the bulk action and each task must be patched whole); returns
    how many tasks were given the value."""
    tasks = list(tasks)
    if not tasks:
        return 0
    kind = "String" if isinstance(value, str) else "Number"
    try:
        _call(
            ls,
            "POST",
            "api/dm/actions",
            params={"id": "add_data_field", "project": project_id},
            json={
                "selectedItems": {"all": False, "included": [int(task_id) for task_id, _ in tasks]},
                "value_name": name,
                "value_type": kind,
                "value": value,
            },
        )
        return len(tasks)
    except ApiError as error:
        if not _action_refused(error):
            raise
        logger.warning(
            "project %s: bulk update of %s refused (%s); patching %d tasks one by one",
            project_id,
            name,
            error.status_code,
            len(tasks),
        )
    patched = 0
    for task_id, data in tasks:
        try:
            ls.tasks.update(id=str(task_id), data={**data, name: value})
            patched += 1
        except ApiError as error:
            if error.status_code != 404:
                raise
    return patched


def _action_refused(error: ApiError) -> bool:
    """Whether LS refused the action itself (unknown to this server, or not allowed), rather than
    failing to serve: an unknown action id is a 500 whose detail says so (LS 1.23.2)."""
    if error.status_code in (400, 403, 404, 405, 422):
        return True
    return error.status_code == 500 and "registered actions" in str(error.body)


def delete_version(ls: LabelStudio, project_id: int, version: str) -> int:
    """Delete every prediction of ``version`` in the project; returns how many LS deleted."""
    body = _call(ls, "DELETE", f"api/projects/{project_id}/model-versions", json={"model_version": version})
    return int((body or {}).get("deleted_predictions", 0)) if isinstance(body, dict) else 0


def project_title(ls: LabelStudio, project_id: int) -> str:
    return str(ls.projects.get(id=project_id).title or "")
