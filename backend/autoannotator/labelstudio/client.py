"""The Label Studio calls the workers make: task data, predictions, webhooks, the project's words.

One client per job (:func:`connect`): the SDK retries connection errors, 429 and 5xx answers
itself, with exponential backoff (``max_retries``), so nothing here loops on a failed request.
The loops that remain wait for something Label Studio has not done *yet* (store a prediction
that ``/predict`` just answered), and they wait once per batch, not once per task.

The SDK's client is imported by :func:`connect` only: with the pandas it brings it is about 65 MB
that a web worker, which never talks to Label Studio, does not hold (this package's other modules
name it for type checking alone).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoannotator.labelstudio.config import ProjectConfig, annotation_label, extract_texts
from autoannotator.labelstudio.fields import AUDIT, LLM_LABEL, LLM_REVIEWERS, REVIEWED_BY, pool_key

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)

# The SDK's retries of one request (connection errors, 429, 5xx), with its exponential backoff.
MAX_RETRIES = 3
REQUEST_TIMEOUT_S = 60.0
# How long a job waits for Label Studio to store the predictions of the /predict that queued it.
PREDICTION_WAIT_S = 10.0
_POLL_S = 0.25


def connect(url: str, api_key: str) -> LabelStudio:
    """A client for one job; ``api_key`` is a legacy token or a personal access token."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=api_key, timeout=REQUEST_TIMEOUT_S, max_retries=MAX_RETRIES)


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` header value for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def secure_webhooks(ls: LabelStudio, project_id: int, authorization: str) -> int:
    """Give the webhook LS created for our backend our basic-auth header; returns how many changed.

    LS creates ``<backend url>/webhook`` on connect *without* the ML backend's basic-auth
    credentials (it sends them on /setup, /predict and START_TRAINING, not on project events), so
    with basic auth on, every annotation event would be refused. Events refused before this runs
    are not lost: the sync that calls it reads every annotation from LS afterwards.
    """
    header = {"Authorization": authorization}
    ours = {b.url.rstrip("/") + "/webhook" for b in ls.ml.list(project=project_id) if b.url}
    changed = 0
    for hook in ls.webhooks.list(project=str(project_id)):
        if hook.url in ours and (hook.headers or {}) != header and hook.id is not None:
            ls.webhooks.update(id=hook.id, headers=header)
            changed += 1
    if changed:
        logger.info("project %s: basic auth added to %d webhook(s) of our backend", project_id, changed)
    return changed


def patch_task_data(ls: LabelStudio, task_id: int | str, data: Mapping[str, Any]) -> None:
    """Replace the task's data (LS keeps no partial update of ``data``: send all of it)."""
    ls.tasks.update(id=str(task_id), data=dict(data))


@dataclass(frozen=True)
class PredictionWrite:
    """A prediction to put on a task in place of the one ``version`` already stored there."""

    task_id: int
    result: list[dict[str, Any]]
    score: float


def replace_predictions(ls: LabelStudio, version: str, writes: Sequence[PredictionWrite]) -> int:
    """Put each write on its task in place of the task's prediction of ``version``; returns how
    many had to be created because Label Studio never stored the original.

    LS stores the ``/predict`` answer only after the response, and the job calling this may start
    first. So every task is looked up, those without the prediction yet are looked up again after a
    short pause, for :data:`PREDICTION_WAIT_S` at most *for the whole batch*, and what is still
    missing then is created.
    """
    pending = {w.task_id: w for w in writes}
    deadline = time.monotonic() + PREDICTION_WAIT_S
    while pending:
        for task_id in list(pending):
            existing = [p for p in ls.predictions.list(task=task_id) if p.model_version == version]
            if existing:
                write = pending.pop(task_id)
                for extra in existing[1:]:
                    ls.predictions.delete(id=int(extra.id))
                ls.predictions.update(id=int(existing[0].id), result=write.result, score=write.score)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    for write in pending.values():
        ls.predictions.create(
            task=write.task_id, result=write.result, score=write.score, model_version=version
        )
    if pending:
        logger.warning(
            "%d predictions of %s never reached Label Studio: created instead", len(pending), version
        )
    return len(pending)


@dataclass(frozen=True)
class StoredLabel:
    """A label Label Studio holds for a task: the latest human annotation or the LLM's label."""

    key: str
    text: str
    label: str
    task_id: int = 0
    audit: str | None = None  # the task's audit mark: its label is an audit label, not the pool's
    data: Mapping[str, Any] = field(default_factory=dict)


def read_labels(
    ls: LabelStudio, project_id: int, config: ProjectConfig, max_chars: int
) -> tuple[list[StoredLabel], list[StoredLabel]]:
    """``(human, llm)``: every task's latest human annotation, and the LLM labels recorded in the
    data of tasks no human annotated. Tasks without usable text are skipped."""
    human: list[StoredLabel] = []
    llm: list[StoredLabel] = []
    for task in _all_tasks(ls, project_id):
        data = dict(task.data or {})
        found = extract_texts([{"id": task.id, "data": data}], config, max_chars)[0]
        if not found.ok:
            continue
        key = pool_key(task.id)
        annotations = sorted(
            (a if isinstance(a, dict) else a.dict() for a in (task.annotations or [])),
            key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""),
        )
        labels = [lab for a in annotations if (lab := annotation_label(a, config)) is not None]
        audit = str(data[AUDIT]) if data.get(AUDIT) else None
        if labels:
            human.append(StoredLabel(key, found.text or "", labels[-1], int(task.id), audit, data))
        elif data.get(REVIEWED_BY) in LLM_REVIEWERS and data.get(LLM_LABEL) in config.labels:
            llm.append(StoredLabel(key, found.text or "", str(data[LLM_LABEL]), int(task.id), audit, data))
    return human, llm


def _all_tasks(ls: LabelStudio, project_id: int) -> Iterator[Any]:
    yield from ls.tasks.list(project=project_id, fields="all", page_size=500)


def project_words(ls: LabelStudio, project_id: int) -> str:
    """The project's title and description, as its manager wrote them (empty when neither is set)."""
    project = ls.projects.get(id=project_id)
    return " ".join(str(x).strip() for x in (project.title, project.description) if x and str(x).strip())
