"""The README's hot swap across web workers, under the deployment's own server.

A real gunicorn (the Dockerfile's command: three sync workers, ``--preload``, ``create_app()``)
serves a model store holding v0001. Concurrent /predict requests on fresh connections reach all three
workers (gunicorn's access log names the worker pid of every request, keyed by a request header
the test sends: nothing in the product is there for the test). Then *another process* trains and
publishes v0002 through the registry, as the train worker does, while requests keep coming.

Proven: every worker answers with v0002 (a generous poll deadline, no timing assert); every
request sent after the publisher exited is answered by v0002 (the README: a worker "picks a new
version up on its next request"); no worker goes back to v0001; each worker loads each version
exactly once; and no answer mixes two versions: v0002's members are trained on rotated labels,
so every answer (label and score of every task) must equal, exactly, what one whole version
answers, computed in this process from the same store.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autoannotator.lab.bench_predict import server_env
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from tests.e2e_data import CLEAR, CONFIG, NEUTRAL
from tests.flow import wait_for
from tests.ports import free_port

GUNICORN = Path(sys.executable).with_name("gunicorn")
REPO = Path(__file__).resolve().parents[1]
UID = "7.1700000000"
TEXTS = [*CLEAR, *NEUTRAL]
BODY = {
    "project": UID,
    "label_config": CONFIG,
    "tasks": [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(TEXTS)],
}
WORKERS = 3
CONCURRENCY = 6  # more requests in flight than workers: an idle worker is always there to take one
# Rotated labels make v0002's members disagree with v0001's on every clear task.
ROTATE = {"Positive": "Negative", "Negative": "Neutral", "Neutral": "Positive"}

# What the train worker does, in a process of its own: build two members into a new version and
# publish it (save_ensemble -> Registry.publish: os.replace of CURRENT).
PUBLISHER = """
import sys
from pathlib import Path
from autoannotator.storage.model_store import ProjectModels
from autoannotator.models.specialists import NgramSpecialist
from tests.e2e_data import LABELS, SEED

model_dir, uid, rotate = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "rotate"
turn = {"Positive": "Negative", "Negative": "Neutral", "Neutral": "Positive"}
texts = [t for texts in SEED.values() for t in texts]
ys = [turn[y] if rotate else y for y, texts in SEED.items() for _ in texts]
members = {
    f"m{i}-ngram": (lambda d, c=c: NgramSpecialist.untrained(LABELS, c=c).fit(texts, ys, d))
    for i, c in enumerate((1.0, 0.2))
}
print(ProjectModels(model_dir).registry(uid).save_ensemble(LABELS, members, note=sys.argv[3]))
"""


def _publish_in_another_process(model_dir: Path, how: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(model_dir), UID, how],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _published(process: subprocess.Popen[str]) -> str:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    return out.strip().splitlines()[-1]


class Client:
    """Concurrent /predict requests on fresh connections, each tagged with an ``X-Probe`` id."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: dict[str, tuple[float, Any]] = {}  # probe -> (monotonic time sent, results)
        self._lock = threading.Lock()

    def one(self) -> None:
        probe = uuid.uuid4().hex
        sent = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(
                "POST",
                "/predict",
                body=json.dumps(BODY),
                headers={"Content-Type": "application/json", "X-Probe": probe, "Connection": "close"},
            )
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        assert response.status == 200, raw[:500]
        with self._lock:
            self.answers[probe] = (sent, json.loads(raw)["results"])

    def round(self, pool: ThreadPoolExecutor, n: int = 2 * CONCURRENCY) -> None:
        for future in [pool.submit(self.one) for _ in range(n)]:
            future.result()


def _pids_by_probe(access_log: Path) -> dict[str, int]:
    """Request id -> the pid of the worker that served it, in the order the log has them (each
    worker writes its lines in the order it served its requests)."""
    found = (re.fullmatch(r"([0-9a-f]{32}) <(\d+)>", line) for line in access_log.read_text().splitlines())
    return {m.group(1): int(m.group(2)) for m in found if m}


def _worker_pids(master: int) -> set[int]:
    with open(f"/proc/{master}/task/{master}/children") as fh:
        return {int(p) for p in fh.read().split()}


def test_every_gunicorn_worker_swaps_to_a_version_published_by_another_process(
    tmp_path: Path, redis_url: str
) -> None:
    model_dir = tmp_path / "models"
    v1 = _published(_publish_in_another_process(model_dir, "plain"))
    env = server_env(model_dir, redis_url, "off")
    # The answers a whole version gives, from the same store, in this process.
    reference = create_app(Settings.from_env(env)).test_client()

    def expected() -> Any:
        return reference.post("/predict", json=BODY).get_json()["results"]

    answers_of = {v1: expected()}
    assert [r["model_version"] for r in answers_of[v1]] == [v1] * len(TEXTS)
    assert [r["result"][0]["value"]["choices"] for r in answers_of[v1][: len(CLEAR)]] == [
        [label] for label in CLEAR.values()
    ]

    port, access_log, server_log = free_port(), tmp_path / "access.log", tmp_path / "gunicorn.log"
    command = [
        str(GUNICORN),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(WORKERS),
        "--worker-class",
        "sync",
        "--timeout",
        "120",
        "--no-control-socket",
        "--access-logfile",
        str(access_log),
        "--access-logformat",
        "%({x-probe}i)s %(p)s",
        "--preload",
        "autoannotator.service.app:create_app()",
    ]
    with open(server_log, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def alive() -> None:
        assert server.poll() is None, "gunicorn exited:\n" + server_log.read_text()[-3000:]

    client = Client(port)
    try:
        workers = wait_for(
            "gunicorn's three workers",
            lambda: len(_worker_pids(server.pid)) == WORKERS and _worker_pids(server.pid),
            timeout_s=60,
        )
        with ThreadPoolExecutor(CONCURRENCY) as pool:

            def answered_by(version: str, since: float = 0.0) -> set[int]:
                alive()
                client.round(pool)
                pids = _pids_by_probe(access_log)
                return {
                    pids[p]
                    for p, (sent, results) in dict(client.answers).items()
                    if p in pids and sent >= since and results[0]["model_version"] == version
                }

            wait_for("all three workers to serve v0001", lambda: answered_by(v1) == workers, timeout_s=90)

            publisher = _publish_in_another_process(model_dir, "rotate")
            while publisher.poll() is None:  # requests in flight all through the publish
                client.round(pool, n=CONCURRENCY)
            v2 = _published(publisher)
            published_at = time.monotonic()
            answers_of[v2] = expected()
            assert v2 == "v0002" and v1 == "v0001"
            wait_for(
                "every worker to answer with v0002",
                lambda: answered_by(v2, since=published_at) == workers,
                timeout_s=90,
            )
            client.round(pool)
        wait_for(
            "the access log to name every request's worker",
            lambda: set(client.answers) <= set(_pids_by_probe(access_log)),
            timeout_s=30,
        )
        pids = _pids_by_probe(access_log)
        assert _worker_pids(server.pid) == workers  # no worker was restarted on the way
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)

    # v0002 is told apart from v0001 on every clear task: a mix of their members would show.
    assert [r["result"][0]["value"]["choices"] for r in answers_of[v2][: len(CLEAR)]] == [
        [ROTATE[label]] for label in CLEAR.values()
    ]
    history: dict[int, list[str]] = {pid: [] for pid in workers}
    for probe in pids:  # in the order each worker served them
        sent, results = client.answers[probe]
        versions = {r["model_version"] for r in results}
        assert len(versions) == 1, results
        (version,) = versions
        assert results == answers_of[version], f"an answer that no single version gives: {results}"
        if sent >= published_at:
            assert version == v2, "a request sent after the publish was answered by v0001"
        history[pids[probe]].append(version)
    for pid, order in history.items():  # v0001, then v0002 for good: never back
        assert order == sorted(order) and order[0] == v1 and order[-1] == v2, (pid, order)
    # Each worker loaded each version once (serving's INFO line, in gunicorn's log with its pid).
    loads = re.findall(r"\[(\d+)\] \[INFO\] project \S+: loading version (v\d+)", server_log.read_text())
    assert sorted(loads) == sorted((str(pid), v) for pid in workers for v in (v1, v2)), loads
