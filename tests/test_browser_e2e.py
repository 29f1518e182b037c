"""What a reviewer sees: the "Needs review" tab of a real Label Studio, in a real (headless) browser.

The whole product runs as in ``test_flow_e2e`` (our app on a socket, rq worker processes, a clean
Redis DB, LS from ``.venv-ls``) in human review mode: a published version predicts 15 imported
tasks, the uncertain ones are flagged ``aa_needs_review`` with the members' votes in ``aa_votes``
and the backend's job builds the tab. Then Debian's Chromium, driven by Playwright, logs in as a
person would, opens the tab and takes a screenshot; the test checks what the screenshot shows
(read from the page's DOM at that moment, compared with LS's API) and that the PNG is a picture.

``AUTOANNOTATOR_UPDATE_SCREENSHOT=1`` also writes it to ``docs/label-studio-needs-review.png``
(shown in the README); otherwise it stays in pytest's tmp dir. Skipped without ``/usr/bin/chromium``
(``make install-browser``) or the ``playwright`` package (the ``dev`` extra). Playwright's own
browser download (``playwright install``) is never used: this machine cannot reach it.

What LS 1.23.2's front end did, measured while writing this test:

- Login: ``/user/login/`` has ``input[name=email]``, ``input[name=password]`` and a
  ``button[type=submit]``; success redirects to ``/`` (then ``/projects/``).
- A tab's URL is ``/projects/<id>/data?tab=<view id>`` (the view id of ``ls.views``); opening a task
  adds ``&task=<task id>``.
- Tabs are ``[role=tab]`` elements with ``aria-label=<title>`` and ``aria-selected``.
- The task table is virtualised: only rows in view exist in the DOM, each a
  ``[data-testid=table-row]`` whose data cells are ``div.lsf-table__cell`` (the checkbox and the
  ``{ }`` source button are ``span`` cells); header cells are ``.lsf-table-head .lsf-th[data-id]``
  with ids such as ``tasks:predictions_score`` and ``tasks:data.aa_votes``, in the rows' order.
- "Prediction score" is rendered with 3 decimals; "Prediction results" is the raw result JSON
  (``[{from_name: sentiment, ..., value: {choices: [Neutral]}}]``), clipped to the cell's height,
  so the tab hides it: the ``aa_votes`` column is what shows the labels to a reviewer.
- The front end creates a "Default" tab only when a project has no view at all (on the first visit
  to ``/projects/<id>/data``, which then redirects to ``?tab=<its id>``). The backend's tab is made
  before anyone opens the project, so the backend creates "Default" itself first.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import MeanProbability
from autoannotator.models.specialists import EmbeddingSpecialist, NgramSpecialist, TransformerSpecialist
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests.e2e_data import CLEAR, CONFIG, LABELS, NEUTRAL, SEED
from tests.flow import (
    PASSWORD,
    USER,
    AppServer,
    Workers,
    backend_env,
    drain,
    failed_jobs,
    wait_for,
)

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
DOCS_SCREENSHOT = REPO / "docs" / "label-studio-needs-review.png"
VIEWPORT = {"width": 1440, "height": 900}
# Measured with Debian's Chromium 156 (see python-svc notes): without the networking flags it keeps
# trying Google's hosts, which this machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAB = "Needs review"
# Seven rows fit in a 900 px viewport, and the table only renders the rows in view: the policy's
# threshold is set between the 7th and 8th lowest confidence of the published ensemble.
ROUTED = 7
STREAM = [
    *CLEAR,
    *NEUTRAL,
    "The service was fine but the food was cold",
    "Not bad, not great",
    "I expected more from this phone",
    "The hotel is near the station and quite nice",
    "Shares were flat in quiet trading",
    "It works, I guess",
    "The movie was long",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent: run `make install-browser`"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is absent: pip install -e '.[dev]'",
    ),
]

# The table as the reviewer sees it: column ids from the header, and each rendered row's cell texts
# in screen order (rows are absolutely positioned wrappers in a virtualised list).
READ_TABLE = """() => {
  const columns = [...document.querySelectorAll('.lsf-table-head .lsf-th[data-id]')].map(e => e.dataset.id);
  const rows = [...document.querySelectorAll('[data-testid=table-row-wrapper]')]
    .map(w => ({top: w.getBoundingClientRect().top, bottom: w.getBoundingClientRect().bottom,
                cells: [...w.querySelectorAll('[data-testid=table-row] > div.lsf-table__cell')]
                  .map(c => c.innerText.trim())}))
    .sort((a, b) => a.top - b.top);
  return {columns, rows, height: window.innerHeight};
}"""


def _publish_three_kinds(model_dir: Path, uid: str, encoder: Path) -> str:
    """A version with three different kinds of member, trained on the e2e seed sentences."""
    texts = [t for group in SEED.values() for t in group]
    ys = [label for label, group in SEED.items() for _ in group]
    labels: LabelSet = LABELS
    return (
        ProjectModels(model_dir)
        .registry(uid)
        .save_ensemble(
            labels,
            {
                "m0-transformer": lambda d: TransformerSpecialist.from_encoder(encoder, labels).fit(
                    texts, ys, d
                ),
                "m1-embedding-linear": lambda d: EmbeddingSpecialist.untrained(encoder, labels).fit(
                    texts, ys, d
                ),
                "m2-ngram-linear": lambda d: NgramSpecialist.untrained(labels, c=1.0).fit(texts, ys, d),
            },
            note="browser test",
        )
    )


def test_needs_review_tab_in_the_browser(
    tmp_path: Path, label_studio: Any, ls_project: Any, tiny_encoder: Path, redis_client: Any, redis_url: str
) -> None:
    client = redis_client
    env = backend_env(tmp_path / "models", label_studio, redis_url, AUTOANNOTATOR_REVIEW_MODE="human")
    ls = label_studio.client()
    project = ls_project(CONFIG, title="Support tickets: sentiment")
    uid = f"{project.id}.{int(project.created_at.timestamp())}"
    version = _publish_three_kinds(tmp_path / "models", uid, tiny_encoder)
    ensemble = ProjectModels(tmp_path / "models").registry(uid).load(version, LABELS)
    confidence = np.sort(MeanProbability(0.5).decide(ensemble.predict_proba(STREAM)).confidence)
    env["AUTOANNOTATOR_POLICY"] = f"mean:{(confidence[ROUTED - 1] + confidence[ROUTED]) / 2:.6f}"
    settings = Settings.from_env(env)
    with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
        ls.ml.create(
            project=project.id,
            url=app.url,
            title="AutoAnnotator",
            auth_method="BASIC_AUTH",
            basic_auth_user=USER,
            basic_auth_pass=PASSWORD,
        )
        drain(client, workers)
        # The import's own labelling run (TASKS_CREATED) pre-labels the tasks and fills the tab:
        # nobody presses Retrieve Predictions.
        ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in STREAM])
        drain(client, workers)
        assert not failed_jobs(client), failed_jobs(client)

        tasks = {t.data["text"]: t for t in ls.tasks.list(project=project.id, fields="all")}
        assert set(tasks) == set(STREAM) and all(len(t.predictions) == 1 for t in tasks.values())
        flagged = {text for text, t in tasks.items() if t.data.get("aa_needs_review")}
        scores = {text: t.predictions[0].score for text, t in tasks.items()}
        assert len(flagged) == ROUTED, f"{len(flagged)} routed; scores {sorted(scores.values())}"
        views = wait_for(
            "the Needs review tab",
            lambda: [v for v in ls.views.list(project=project.id) if (v.data or {}).get("title") == TAB],
            workers=workers,
        )
        view_id = views[0].id
        in_tab = [t.data["text"] for t in ls.tasks.list(project=project.id, view=view_id)]
        assert set(in_tab) == flagged

        shot = tmp_path / "label-studio-needs-review.png"
        began = time.monotonic()
        table = _screenshot_tab(label_studio, project.id, view_id, len(in_tab), shot, tmp_path)
        browser_s = time.monotonic() - began
        print(f"browser part: {browser_s:.1f} s")

    # --- What the screenshot shows, from the DOM at the moment it was taken.
    selected = [tab["title"] for tab in table["tabs"] if tab["selected"] == "true"]
    assert [tab["title"] for tab in table["tabs"]].count(TAB) == 1 and selected == [TAB], table["tabs"]
    assert "Default" in [tab["title"] for tab in table["tabs"]], table["tabs"]  # the whole project too
    columns = table["columns"]
    for column in (
        "tasks:data.text",
        "tasks:predictions_score",
        "tasks:data.aa_votes",
    ):
        assert column in columns, columns
    assert "tasks:predictions_results" not in columns and "tasks:data.aa_needs_review" not in columns
    rows = [dict(zip(columns, row["cells"], strict=True)) for row in table["rows"]]
    assert all(row["bottom"] <= table["height"] for row in table["rows"]), "a row is cut off"
    assert [r["tasks:data.text"] for r in rows] == in_tab  # exactly the flagged tasks, most uncertain first
    for row in rows:
        task = tasks[row["tasks:data.text"]]
        assert row["tasks:id"] == str(task.id)
        assert row["tasks:predictions_score"] == f"{task.predictions[0].score:.3f}"
        assert row["tasks:data.aa_votes"] == task.data["aa_votes"]
        votes = re.findall(r"(\w+) (\d)", row["tasks:data.aa_votes"])
        assert sum(int(n) for _, n in votes) == 3, row  # k = 3 members vote
    assert table["predicted_choice"] in {"Positive", "Negative", "Neutral"}, table["predicted_choice"]
    first = tasks[in_tab[0]]
    assert f"task={first.id}" in table["task_url"], table["task_url"]
    assert table["predicted_choice"] == first.predictions[0].result[0]["value"]["choices"][0]

    # --- The PNG itself: the viewport's size, and a picture rather than a blank page.
    # Measured: these pages have a pixel std of ~19-21 and 200+ grey levels, the rows' band ~2% of
    # pixels darker than 200 (an empty band: none); a blank page has a std of 0 and one grey level.
    for path in (shot, tmp_path / "label-studio-task.png"):
        with Image.open(path) as image:
            assert image.size == (VIEWPORT["width"], VIEWPORT["height"]), image.size
            pixels = np.asarray(image.convert("L"), dtype=np.float64)
        assert pixels.std() > 8, f"{path.name} looks blank: pixel std {pixels.std():.1f}"
        assert len(np.unique(pixels)) > 64, f"{path.name} has too few shades to hold text"
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    band = pixels[int(table["rows"][0]["top"]) : int(table["rows"][-1]["bottom"])]
    assert (band < 200).mean() > 0.005, "the rows' band of the screenshot holds no text"

    if os.environ.get("AUTOANNOTATOR_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(shot.read_bytes())


def _screenshot_tab(
    label_studio: Any, project_id: int, view_id: int, n_rows: int, shot: Path, tmp_path: Path
) -> dict[str, Any]:
    """Log in, open the tab, screenshot it; then open its first task and screenshot the labeling
    view. Returns the table and tabs as rendered, and the choice checked in the labeling view."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # A persistent context on a fresh directory is Playwright's way to give --user-data-dir.
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        context.set_default_timeout(30_000)
        try:
            page = context.new_page()
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("input[name=email]", label_studio.username)
            page.fill("input[name=password]", label_studio.password)
            with page.expect_navigation():
                page.click("button[type=submit]")
            assert "/user/login" not in page.url, "login failed"

            page.goto(f"{label_studio.url}/projects/{project_id}/data?tab={view_id}")
            page.wait_for_function(
                "n => document.querySelectorAll('[data-testid=table-row]').length === n", arg=n_rows
            )
            page.wait_for_load_state("networkidle")
            page.evaluate("() => document.fonts.ready.then(() => true)")
            page.mouse.move(0, VIEWPORT["height"] - 1)  # no hover highlight on a row
            table = page.evaluate(READ_TABLE)
            page.screenshot(path=str(shot), full_page=True)
            assert page.evaluate(READ_TABLE) == table, "the table changed while the screenshot was taken"
            table["tabs"] = page.eval_on_selector_all(
                "[role=tab]",
                "tabs => tabs.map(t => ({title: t.getAttribute('aria-label'),"
                " selected: t.getAttribute('aria-selected')}))",
            )

            # The first (most uncertain) task in the labeling view: its prediction is pre-selected.
            text_column = table["columns"].index("tasks:data.text")
            page.locator("[data-testid=table-row]").first.locator("> div.lsf-table__cell").nth(
                text_column
            ).click()
            checked = page.locator(".lsf-choice__item input.ant-radio-input:checked")
            checked.wait_for()
            table["predicted_choice"] = checked.get_attribute("name")
            page.wait_for_load_state("networkidle")
            page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 1)
            page.screenshot(path=str(tmp_path / "label-studio-task.png"))
            table["task_url"] = page.url
        finally:
            context.close()
    return table
