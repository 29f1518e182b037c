"""Harness for the end-to-end flow tests: our app on a real socket, real rq workers, a clean Redis DB.

- :class:`AppServer` serves ``create_app`` with werkzeug in a thread (see ``test_backend_e2e``'s
  docstring for why werkzeug and not gunicorn in tests), recording every request.
- :class:`Workers` runs ``autoannotator worker`` *processes* (the console script, as deployed),
  with the same environment the app's settings came from, and stops them by pid.
- :func:`drain` waits until every queue is empty and no job is running.

Tests use the session's private Redis (the ``redis_url`` / ``redis_client`` fixtures, emptied per
test), so nothing from another test, another run or a developer's own backend leaks in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from flask import Flask, Response, request
from werkzeug.serving import make_server

from autoannotator.demo.processes import poll_until
from autoannotator.labelstudio.config import parse_label_config, prediction
from autoannotator.storage.redis_state import QUEUES, State
from tests.e2e_data import CONFIG

WORKER = Path(sys.executable).with_name("autoannotator")


@dataclass(frozen=True)
class Call:
    """One request made to our app and what it answered."""

    method: str
    path: str
    body: Any  # the JSON sent, None without one
    authorization: str | None
    status: int
    answer: Any  # the JSON answered, None without one


@dataclass
class AppServer:
    """The suite's one call-recording harness: ``app`` served by werkzeug on a free port in a thread,
    every request appended to ``calls``."""

    app: Flask
    calls: list[Call] = field(default_factory=list)
    url: str = ""
    model_dir: Path | None = None  # the app's model store, for tests that publish into it

    def __post_init__(self) -> None:
        @self.app.after_request
        def record(response: Response) -> Response:
            self.calls.append(
                Call(
                    method=request.method,
                    path=request.path,
                    body=request.get_json(silent=True),
                    authorization=request.headers.get("Authorization"),
                    status=response.status_code,
                    answer=response.get_json(silent=True) if response.is_json else None,
                )
            )
            return response

    def __enter__(self) -> AppServer:
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
        self._server.server_close()

    def paths(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    def since(self, mark: int, *, webhooks: bool = False) -> list[Call]:
        """Calls after the first ``mark``; LS's project-event webhooks are left out unless asked."""
        return [c for c in self.calls[mark:] if webhooks or c.path != "/webhook"]


class Workers:
    """Worker processes as the README deploys them: ``n`` on the queues ingest and review (jobs run in
    the worker's own process, which keeps each project's pool between jobs), one on train (a forked
    child per training) and ``labellers`` on label (labelling runs, models kept in memory); each
    logs to ``log_dir/worker-<i>.log``."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, n: int = 1, *, labellers: int = 1, debug: bool = False
    ):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.debug = debug  # ``autoannotator -v worker``: every logger at DEBUG
        self.queues = [*(["ingest,review"] * n), "train", *(["label"] * labellers)]
        self.n = len(self.queues)
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, queues in enumerate(self.queues):
            log = open(self.log_dir / f"worker-{i}.log", "wb")
            self.processes.append(
                subprocess.Popen(
                    [
                        str(WORKER),
                        *(["-v"] if self.debug else []),
                        "worker",
                        "--queues",
                        queues,
                        "--name",
                        f"test-{os.getpid()}-{i}",
                    ],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # rq: warm shutdown, finishing the current job
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- worker-{i} ---\n" + (self.log_dir / f"worker-{i}.log").read_text(errors="replace")[-6000:]
            for i in range(self.n)
        )

    def log_paths(self) -> list[Path]:
        return [self.log_dir / f"worker-{i}.log" for i in range(self.n)]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)


@contextlib.contextmanager
def debug_log(path: Path) -> Iterator[Path]:
    """Everything this process logs (the app served by :class:`AppServer` included), at DEBUG, into
    ``path`` while the block runs; the root logger's level is put back after it."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
        handler.close()


def drain(client: redis.Redis, workers: Workers, timeout_s: float = 240.0) -> None:
    """Wait until all queues are empty and no job runs (twice in a row, jobs enqueue jobs)."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        assert workers.alive(), "a worker died:\n" + workers.logs()
        busy = State(client, "human").jobs_in_flight()
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= 3:
            return
        time.sleep(0.3)
    raise AssertionError(f"queues did not drain in {timeout_s:.0f}s:\n" + workers.logs())


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float = 60.0, workers: Workers | None = None
) -> Any:
    def workers_alive() -> None:
        if workers is not None:
            assert workers.alive(), "a worker died:\n" + workers.logs()

    value = poll_until(check, timeout_s, workers_alive, every_s=0.3)
    if not value:
        raise AssertionError(
            f"timed out after {timeout_s:.0f}s waiting for {what}"
            + ("\n" + workers.logs() if workers else "")
        )
    return value


def failed_jobs(client: redis.Redis) -> list[str]:
    from rq.job import Job
    from rq.registry import FailedJobRegistry

    out = []
    for q in QUEUES:
        for job_id in FailedJobRegistry(q, connection=client).get_job_ids():
            job = Job.fetch(job_id, connection=client)
            out.append(f"{q}/{job.description}: {(job.exc_info or '')[-800:]}")
    return out


# The basic-auth pair the e2e backends run with (Label Studio sends it to them).
USER, PASSWORD = "pm", "e2e-basic-auth-pass"


def backend_env(model_dir: Path, label_studio: Any, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of an e2e backend and its workers: a model store, the session's Redis and
    Label Studio, and basic auth; ``extra`` adds or overrides settings."""
    return {
        "AUTOANNOTATOR_MODEL_DIR": str(model_dir),
        "AUTOANNOTATOR_REDIS_URL": redis_url,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "BASIC_AUTH_USER": USER,
        "BASIC_AUTH_PASS": PASSWORD,
        **extra,
    }


def connect(ls: Any, project_id: int, url: str, **fields: Any) -> str:
    """Connect our backend at ``url`` to the LS project, with basic auth; returns the project's uid."""
    ls.ml.create(
        project=project_id,
        url=url,
        title="AutoAnnotator",
        auth_method="BASIC_AUTH",
        basic_auth_user=USER,
        basic_auth_pass=PASSWORD,
        **fields,
    )
    project = ls.projects.get(id=project_id)
    return f"{project.id}.{int(project.created_at.timestamp())}"


def annotate(ls: Any, task_id: int, label: str) -> None:
    """A human annotation of the task with ``label``, through LS's API (LS fires its webhook)."""
    config = parse_label_config(CONFIG)
    ls.annotations.create(id=task_id, result=prediction(config, label, 1.0, "human")["result"])


def tab_ids(ls: Any, project_id: int) -> set[int]:
    """The ids of the tasks in the project's "Needs review" tab."""
    tab = next(v for v in ls.views.list(project=project_id) if (v.data or {}).get("title") == "Needs review")
    return {t.id for t in ls.tasks.list(project=project_id, view=tab.id, page_size=1000)}


def next_task(label_studio: Any, project_id: int, view_id: int | None = None) -> dict[str, Any]:
    """``GET /api/projects/{id}/next[?view=…]``: the label stream as "Label All Tasks" asks it (from a
    tab: ``view_id``). The SDK has no method for it."""
    query = f"?view={view_id}" if view_id is not None else ""
    request = urllib.request.Request(
        f"{label_studio.url}/api/projects/{project_id}/next{query}",
        headers={"Authorization": f"Token {label_studio.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer
