"""The review tab against a real Label Studio: what a reviewer sees in it and what /next serves.

Predictions are created straight through the API (no backend): the tab only cares about their
scores and versions. The measured LS behaviours are listed in ``autoannotator.labelstudio.review_tab``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autoannotator.errors import BadInputError
from autoannotator.labelstudio.config import parse_label_config, prediction
from autoannotator.labelstudio.review_tab import (
    UNCERTAINTY_SAMPLING,
    align_model_version,
    ensure_review_tab,
    review_view_data,
    use_uncertainty_sampling,
)
from tests.flow import next_task

CONFIG = Path(__file__).resolve().parents[1] / "label_config" / "sentiment.xml"
VERSION = "v0001"
THRESHOLD = 0.5
# text -> score of its v0001 prediction (None: no prediction at all)
SCORES: dict[str, float | None] = {
    "sure positive": 0.9,
    "unsure a": 0.2,
    "borderline": 0.55,
    "unsure b": 0.35,
    "most unsure": 0.1,
    "fairly sure": 0.7,
    "unsure c": 0.45,
    "unsure d": 0.3,
    "never predicted": None,
}
OLD_ONLY = "only an old version"  # a 0.05 prediction of v0000 alone: not the served version


def test_view_data_refuses_a_threshold_outside_0_1() -> None:
    for bad in (0, 1.5, float("nan"), "0.5"):
        with pytest.raises(BadInputError, match="threshold"):
            review_view_data(bad)  # type: ignore[arg-type]


@pytest.mark.e2e
def test_review_tab_shows_unannotated_uncertain_tasks_most_uncertain_first(label_studio, ls_project) -> None:
    ls = label_studio.client()
    xml = CONFIG.read_text(encoding="utf-8")
    config = parse_label_config(xml)
    project = ls_project(xml)
    ls.projects.import_tasks(id=project.id, request=[{"text": text} for text in [*SCORES, OLD_ONLY]])
    ids = {task.data["text"]: task.id for task in ls.tasks.list(project=project.id)}

    assert align_model_version(ls, project.id, VERSION) is False  # no prediction of it yet
    for text, score in SCORES.items():
        if score is not None:
            ls.predictions.create(task=ids[text], **prediction(config, "Positive", score, VERSION))
    ls.predictions.create(task=ids[OLD_ONLY], **prediction(config, "Negative", 0.05, "v0000"))
    assert align_model_version(ls, project.id, VERSION) is True
    assert ls.projects.get(id=project.id).model_version == VERSION
    use_uncertainty_sampling(ls, project.id)
    assert ls.projects.get(id=project.id).sampling == UNCERTAINTY_SAMPLING

    view_id = ensure_review_tab(ls, project.id, THRESHOLD)

    def tab() -> list[tuple[str, float]]:
        return [
            (task.data["text"], task.predictions_score)
            for task in ls.tasks.list(project=project.id, view=view_id)
        ]

    expected = sorted(
        ((text, score) for text, score in SCORES.items() if score is not None and score < THRESHOLD),
        key=lambda pair: pair[1],
    )
    assert [text for text, _ in tab()] == [text for text, _ in expected]
    assert [score for _, score in tab()] == pytest.approx([score for _, score in expected])

    # The label stream serves the lowest score first, with or without the tab.
    assert next_task(label_studio, project.id)["data"]["text"] == "most unsure"
    assert next_task(label_studio, project.id, view_id)["data"]["text"] == "most unsure"

    # A human answers the most uncertain task: it leaves the tab and the stream moves on.
    region = prediction(config, "Neutral", 1.0, VERSION)["result"]
    ls.annotations.create(id=ids["most unsure"], result=region)
    assert [text for text, _ in tab()] == [text for text, _ in expected[1:]]
    assert next_task(label_studio, project.id, view_id)["data"]["text"] == "unsure a"

    # Ensuring again (a new threshold) rewrites the same tab: one tab, new filters.
    assert ensure_review_tab(ls, project.id, 0.3) == view_id
    assert ensure_review_tab(ls, project.id, 0.3) == view_id
    titled = [view for view in ls.views.list(project=project.id) if view.data.get("title") == "Needs review"]
    assert [view.id for view in titled] == [view_id]
    assert [text for text, _ in tab()] == ["unsure a"]
    stored = titled[0]
    # LS keeps the filters in a filter_group row and answers them back under ``data``.
    assert stored.data["filters"]["items"][1]["value"] == 0.3
    assert stored.data["ordering"] == ["tasks:predictions_score"]
    assert "tasks:predictions_score" not in stored.data["hiddenColumns"]["explore"]
    assert "tasks:total_annotations" in stored.data["hiddenColumns"]["explore"]

    # LS itself allows a second tab with the same title; ensuring keeps updating the first one.
    twin = ls.views.create(project=project.id, data={"title": "Needs review"})
    assert twin.id != view_id
    assert ensure_review_tab(ls, project.id, THRESHOLD) == view_id
    assert len(tab()) == len(expected) - 1
