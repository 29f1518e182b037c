"""The "Needs review" tab: where human review mode puts the tasks our models are least sure of.

Humans review inside Label Studio (LS) itself, so the queue is a Data Manager tab the backend keeps
up to date, not a screen of our own: tasks with no annotation yet whose prediction score is below a
threshold, most uncertain first. The label stream (``/api/projects/{id}/next``) is switched to
uncertainty sampling so "Label all tasks" serves the same order.

What LS 1.23.2 / label-studio-sdk 2.1.2 did, measured in ``tests/test_review_tab.py``:

- A tab is a ``View`` whose ``data`` holds ``title``, ``filters``, ``ordering`` and
  ``hiddenColumns``. LS stores ``data.filters`` as a ``filter_group`` row on create *and* on
  update (``PATCH /api/dm/views/{id}``) and answers filters and ordering back under ``data``
  (the top-level ``filter_group`` and ``ordering`` of the answer are None). Updating in place
  replaces the filters: after a threshold change the tab filters by the new value only.
- Titles are not unique: ``views.create`` with a title already in use makes a second tab, hence
  the lookup by title before creating.
- ``GET /api/tasks?view=ID`` (``ls.tasks.list(view=...)``) applies that tab's filters and
  ordering, so it is exactly what a reviewer sees in the tab.
- ``tasks:predictions_score`` averages only predictions whose ``model_version`` equals
  ``project.model_version``: a task whose only prediction is another version's (score 0.05) has
  no score and stays out of a ``less`` filter, so without :func:`align_model_version` the tab
  would be empty.
- ``PATCH /api/projects/{id} {"model_version": v}`` answers 400 "Model version doesn't exist
  either as live model or as static predictions." until a prediction of ``v`` exists.
- ``sampling`` accepts exactly ``"Sequential sampling"``, ``"Uniform sampling"`` and
  ``"Uncertainty sampling"`` (``Project.SAMPLING_CHOICES``). With the latter, ``/next`` (with or
  without ``?view=ID``, which first restricts the stream to that tab's tasks) served the task
  with the lowest score of ``project.model_version``; once it was annotated, ``/next?view=ID``
  served the next lowest. Read in LS's source, not measured: when no task has a prediction of that version the
  stream falls back to *random* order, so align the version first here too.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from label_studio_sdk.core.api_error import ApiError

from autoannotator.errors import BadInputError
from autoannotator.labelstudio.fields import IN_TAB

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
_NO_SUCH_VERSION = "doesn't exist"

# Every built-in task column of the Data Manager (LS 1.23.2, data_manager/functions.py). The tab
# hides all but the id, the score and the predictions: an unlisted column is left *empty*, not
# shown, so the list has to be complete. Task data columns (``tasks:data.text``) stay visible.
TASK_COLUMNS = (
    "id",
    "inner_id",
    "completed_at",
    "total_annotations",
    "cancelled_annotations",
    "total_predictions",
    "annotators",
    "annotations_results",
    "annotations_ids",
    "predictions_score",
    "predictions_model_versions",
    "predictions_results",
    "file_upload",
    "storage_filename",
    "created_at",
    "updated_at",
    "updated_by",
    "avg_lead_time",
    "draft_exists",
)
# The prediction's label shows in the votes column the backend writes; the raw result JSON of
# ``predictions_results`` would be cut off at the row's height anyway.
_SHOWN = frozenset({"id", "predictions_score"})


def review_view_data(
    threshold: float | None = None, title: str = "Needs review", *, flag: str | None = None
) -> dict[str, Any]:
    """The tab's ``data`` payload; pure, so what the tab promises can be read without a server.

    Tasks with no annotation, filtered by ``predictions_score < threshold`` and/or by the numeric
    task-data field ``flag`` being :data:`IN_TAB` (1) (the backend's routing decision, exact for any policy),
    most uncertain first.
    """
    if threshold is None and flag is None:
        raise BadInputError("a review tab needs a score threshold, a flag field, or both")
    items: list[dict[str, Any]] = [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}
    ]
    if threshold is not None:
        if not isinstance(threshold, int | float) or not math.isfinite(threshold) or not 0 < threshold <= 1:
            raise BadInputError(f"review threshold must be a number in (0, 1], got {threshold!r}")
        items.append(
            {
                "filter": "filter:tasks:predictions_score",
                "operator": "less",
                "type": "Number",
                "value": float(threshold),
            }
        )
    if flag is not None:
        if not flag.isidentifier():
            raise BadInputError(f"the flag must be a plain task-data field name, got {flag!r:.40}")
        items.append(
            {"filter": f"filter:tasks:data.{flag}", "operator": "equal", "type": "Number", "value": IN_TAB}
        )
    hidden = [f"tasks:{column}" for column in TASK_COLUMNS if column not in _SHOWN]
    if flag is not None:
        hidden.append(f"tasks:data.{flag}")  # always true in this tab: a column of noise
    return {
        "title": title,
        "filters": {"conjunction": "and", "items": items},
        "ordering": ["tasks:predictions_score"],
        "hiddenColumns": {"explore": hidden, "labeling": hidden},
    }


def ensure_review_tab(
    ls: LabelStudio,
    project_id: int,
    threshold: float | None = None,
    title: str = "Needs review",
    *,
    flag: str | None = None,
) -> int:
    """Create the review tab, or rewrite the one titled ``title`` in place; return its view id.

    Idempotent because it runs on every setup/threshold change: LS would happily keep a second tab
    with the same title. If humans already made duplicates, the lowest id is kept up to date and the
    others are left alone (they may be someone's edits); a warning says so.
    """
    data = review_view_data(threshold, title, flag=flag)
    views = list(ls.views.list(project=project_id))
    if not views:
        # LS's UI makes its unfiltered "Default" tab only for a project with no tab at all; ours
        # would otherwise be the only one, and nobody could see the whole project.
        ls.views.create(project=project_id, data={"title": "Default"})
    mine = sorted(
        (view for view in views if (view.data or {}).get("title") == title),
        key=lambda view: view.id or 0,
    )
    if len(mine) > 1:
        logger.warning(
            "project %s has %d tabs titled %r; updating view %s", project_id, len(mine), title, mine[0].id
        )
    if mine and mine[0].id is not None:
        view = ls.views.update(id=str(mine[0].id), project=project_id, data=data)
    else:
        view = ls.views.create(project=project_id, data=data)
    if view.id is None:
        raise RuntimeError(f"Label Studio returned no id for the {title!r} tab of project {project_id}")
    logger.info("review tab %s of project %s: score < %s, flag %s", view.id, project_id, threshold, flag)
    return view.id


def align_model_version(ls: LabelStudio, project_id: int, version: str) -> bool:
    """Point ``project.model_version`` at the served version so score filters and uncertainty
    sampling see its predictions. False when LS refuses because no prediction of ``version`` exists
    yet (expected right after publishing; call again after the next retrieval); any other refusal
    raises."""
    try:
        ls.projects.update(id=project_id, model_version=version)
    except ApiError as error:
        if error.status_code == 400 and _NO_SUCH_VERSION in str(error.body):
            logger.info(
                "project %s has no prediction of %s yet; model_version left as is", project_id, version
            )
            return False
        raise
    return True


def use_uncertainty_sampling(ls: LabelStudio, project_id: int) -> None:
    """Make the label stream serve the lowest-score task first, the same order as the review tab."""
    ls.projects.update(id=project_id, sampling=UNCERTAINTY_SAMPLING)
