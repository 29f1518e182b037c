"""``autoannotator bench-label``: what a labelling run of a whole project costs in a real Label Studio.

Everything runs on this machine, started by the benchmark and stopped by it (also on Ctrl-C, SIGTERM
or an error): Label Studio headless from ``.venv-ls`` with its SQLite database under ``--out``, a
private ``redis-server`` (unless ``--redis-url`` names one) and ``--workers`` label workers, each a
real ``autoannotator worker --queues label`` process as deployed. The steps:

1. **Raw forward pass**: ``Ensemble.predict_proba`` of the version's members over every task text,
   in chunks of the run's chunk size, in this process, before anything else is started (a few
   texts that are not tasks warm it up first; the load is timed apart).
2. **Project**: a Label Studio project with the sentiment config (``label_config/sentiment.xml``;
   its choices become the version's labels where they differ, see :func:`label_config`) and
   ``--tasks`` tasks whose texts come from ``--data`` (repeated with a suffix when the file
   has fewer), imported in batches; the version is published into a model store under ``--out``
   (linked, not copied) and the project recorded in Redis the way ``/setup`` records it.
3. **The run**: :func:`request_labelling`, exactly what a published version starts; its wall time
   counts from that call to the ``finished_at`` that the last chunk records. It includes what a
   real run includes: the planner paging through the tasks, each worker loading the version on its
   first chunk, reading the tasks, predicting and routing, the bulk writes, the Needs review tab.
   ``speed_over_raw`` is the run's speed over the raw forward pass's (1.0: the run costs nothing
   beyond its forward passes; above 1 with several workers sharing the work on enough cores).
4. **Label Studio's writes, measured apart** (timing them inside the workers would need code in
   the service): ``import_predictions`` of a scratch version's predictions and ``set_data_field`` of
   a scratch field on up to 1,000 of the project's tasks, one request per chunk as a run makes them,
   then the scratch version is deleted (also timed). Figures are per 1,000 tasks.
5. **Memory**: each label worker's peak resident memory (``VmHWM``), read before it is stopped.

The Label Studio launch and the process supervisor are the demo's
(:mod:`autoannotator.demo.label_studio`, :mod:`autoannotator.demo.processes`). The lab may not import
the demo (``pyproject.toml``'s layer contract), so the command line hands them in as a
:class:`Launcher`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from xml.sax.saxutils import quoteattr

import redis
from label_studio_sdk import LabelStudio

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import policy_from_spec
from autoannotator.errors import AutoAnnotatorError, BadInputError
from autoannotator.lab.benchmark import forward_settings, machine, process_memory_mb, quiet_loggers
from autoannotator.labelstudio.config import ProjectConfig, parse_label_config, prediction
from autoannotator.labelstudio.tasks import (
    delete_version,
    import_predictions,
    set_data_field,
    unannotated_page,
    unannotated_tasks,
)
from autoannotator.learning.datasets import iter_jsonl
from autoannotator.models.ensemble import load_ensemble, read_manifest
from autoannotator.models.specialists.runtime import threads_per_process
from autoannotator.settings import REVIEW_MODES, Settings
from autoannotator.storage.label_runs import LabelRun, LabelRuns
from autoannotator.storage.model_store import ProjectModels
from autoannotator.storage.redis_state import ProjectInfo, State
from autoannotator.storage.registry import VERSION_PATTERN

logger = logging.getLogger(__name__)

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[3]
LS_EXECUTABLE = REPO / ".venv-ls" / "bin" / "label-studio"
LABEL_CONFIG = REPO / "label_config" / "sentiment.xml"
IMPORT_BATCH = 1000  # tasks per import request
WRITE_SAMPLE = 1000  # tasks whose writes are timed apart (fewer if the project has fewer)
SCRATCH_VERSION = "bench-label-scratch"
SCRATCH_FIELD = "aa_bench_scratch"
LS_USER = "admin@example.com"
LS_START_TIMEOUT_S = 600.0
WORKER_START_TIMEOUT_S = 180.0
PROGRESS_EVERY_S = 10.0


# --------------------------------------------------------------------------- what the demo hands in


class Child(Protocol):
    """A process the supervisor started (:class:`autoannotator.demo.processes.Child`)."""

    @property
    def name(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def log(self) -> str: ...
    def output(self) -> str: ...
    def running(self) -> bool: ...


class Supervisor(Protocol):
    """Starts children in their own process groups, records them in ``pids.json``, stops them all
    (:class:`autoannotator.demo.processes.Processes`)."""

    hidden: list[str]

    def clean_stale(self) -> list[str]: ...
    def write(self) -> None: ...
    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log_name: str | None = None
    ) -> Child: ...
    def wait(
        self,
        what: str,
        check: Callable[[], T | None],
        timeout_s: float,
        between: Callable[[], object] | None = None,
    ) -> T: ...
    def stop_all(self) -> None: ...


@dataclass(frozen=True)
class Launcher:
    """How the benchmark starts and stops its processes: the demo's supervisor (made for a data
    directory) and its Label Studio helpers, handed in by the command line."""

    supervisor: Callable[[Path], Supervisor]
    ls_argv: Callable[[Path, int], list[str]]
    ls_environment: Callable[[Path, str, str, str, str], dict[str, str]]
    ls_probe: Callable[[str, str, int], str | None]


@dataclass(frozen=True)
class BenchLabelConfig:
    """What ``autoannotator bench-label`` measures; each field is the option of the same name."""

    version_dir: Path
    data: Path
    out: Path
    tasks: int = 2000
    workers: int = 1
    cpu_sharers: int = 1  # the workers' AUTOANNOTATOR_CPU_SHARERS
    chunk: int = Settings().label_chunk
    policy: str = Settings().policy
    review_mode: str = Settings().review_mode
    redis_url: str | None = None  # None: start a private redis-server
    timeout_s: float = 7200.0  # for the run itself
    ls_executable: Path = LS_EXECUTABLE


# --------------------------------------------------------------------------- inputs


def read_texts(path: Path) -> list[str]:
    """The ``text`` of every line of a JSONL file (other fields are ignored)."""
    path = Path(path)
    texts = []
    for lineno, row in iter_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"{path}:{lineno}: no non-empty 'text' field")
        texts.append(text)
    if not texts:
        raise BadInputError(f"{path} holds no texts")
    return texts


def task_texts(pool: Sequence[str], n: int) -> list[str]:
    """``n`` task texts: ``pool`` in order, then again with a suffix `` (2)``, `` (3)``, ... so that
    no text repeats where the pool's did not (the embedding member caches vectors by text)."""
    out = []
    for i in range(n):
        text, repeat = pool[i % len(pool)], i // len(pool)
        out.append(text if repeat == 0 else f"{text} ({repeat + 1})")
    return out


def publish_version(version_dir: Path, store: Path, uid: str) -> str:
    """Serve ``version_dir`` for project ``uid`` from the model store ``store``: linked under the
    version name its manifest records (what the workers' predictions will carry), then published
    through the registry as a trained version is. Returns the name."""
    version_dir = Path(version_dir).resolve()
    name = str(read_manifest(version_dir)["version"])
    if not VERSION_PATTERN.fullmatch(name):
        raise BadInputError(f"{version_dir}/ensemble.json names version {name!r}, not vNNNN")
    registry = ProjectModels(store).registry(uid)
    registry.versions_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(version_dir, registry.path(name), target_is_directory=True)
    registry.publish(name, {"reason": "bench-label"})
    return name


def label_config(labels: Sequence[str]) -> tuple[str, str]:
    """The project's label config, and what it is: ``label_config/sentiment.xml``, its choices made
    the version's labels in the version's order where they differ (a linear member serves exactly
    the labels it was trained for: ``negative, neutral, positive`` from tweeteval, say)."""
    xml = LABEL_CONFIG.read_text(encoding="utf-8")
    if list(parse_label_config(xml).labels.names) == list(labels):
        return xml, "label_config/sentiment.xml"
    choices = "".join(f"    <Choice value={quoteattr(label)}/>\n" for label in labels)
    xml, found = re.subn(r"(?:[ \t]*<Choice [^>]*/>\n)+", lambda _: choices, xml, count=1)
    if not found or list(parse_label_config(xml).labels.names) != list(labels):
        raise AutoAnnotatorError(f"{LABEL_CONFIG}: its choices could not be made {list(labels)}")
    return xml, f"label_config/sentiment.xml with the version's labels as choices: {', '.join(labels)}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(message: str) -> None:
    print(f"bench-label: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measurements


def raw_forward_pass(version_dir: Path, labels: LabelSet, texts: Sequence[str], chunk: int) -> dict[str, Any]:
    """The members' forward pass over ``texts`` in chunks of ``chunk``, in this process."""
    started = time.perf_counter()
    ensemble = load_ensemble(version_dir, labels)
    load_s = time.perf_counter() - started
    ensemble.predict_proba([f"bench-label warm-up {i}" for i in range(8)])
    seconds = 0.0
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        t0 = time.perf_counter()
        ensemble.predict_proba(part)
        seconds += time.perf_counter() - t0
    members = [str(m["name"]) for m in ensemble.describe()["members"]]
    del ensemble
    return {
        "s": round(seconds, 3),
        "tasks_per_s": round(len(texts) / seconds, 2) if seconds > 0 else None,
        "load_s": round(load_s, 2),
        "members": members,
    }


def ls_write_cost(ls: LabelStudio, project_id: int, config: ProjectConfig, chunk: int) -> dict[str, Any]:
    """Time Label Studio's two bulk writes on up to :data:`WRITE_SAMPLE` of the project's tasks, one
    request per ``chunk`` tasks as a run makes them, with a scratch version and a scratch field;
    then delete the scratch version's predictions."""
    tasks: list[dict[str, Any]] = []
    after = 0
    while len(tasks) < WRITE_SAMPLE:
        page = unannotated_page(ls, project_id, after_id=after, size=min(chunk, WRITE_SAMPLE - len(tasks)))[0]
        if not page:
            break
        tasks.extend(unannotated_tasks(ls, project_id, [int(t["id"]) for t in page]))
        after = int(page[-1]["id"])
    if not tasks:
        raise AutoAnnotatorError("the project has no unannotated task to time Label Studio's writes on")
    names = list(config.labels.names)
    chunks = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
    imported = import_s = 0.0
    for part in chunks:
        items = [
            {
                "task": int(t["id"]),
                **prediction(config, names[int(t["id"]) % len(names)], 0.5, SCRATCH_VERSION),
            }
            for t in part
        ]
        t0 = time.perf_counter()
        imported += import_predictions(ls, project_id, items)
        import_s += time.perf_counter() - t0
    updated = field_s = 0.0
    for part in chunks:
        pairs = [(int(t["id"]), dict(t.get("data") or {})) for t in part]
        t0 = time.perf_counter()
        updated += set_data_field(ls, project_id, pairs, SCRATCH_FIELD, "x")
        field_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    deleted = delete_version(ls, project_id, SCRATCH_VERSION)
    delete_s = time.perf_counter() - t0
    n = len(tasks)
    if imported != n or updated != n:
        raise AutoAnnotatorError(
            f"Label Studio stored {imported:.0f} scratch predictions and set {updated:.0f} fields, not {n}"
        )
    return {
        "tasks": n,
        "requests_each": len(chunks),
        "import_predictions_s": round(import_s, 3),
        "set_data_field_s": round(field_s, 3),
        "delete_version_s": round(delete_s, 3),
        "deleted": deleted,
        "import_predictions_s_per_1000": round(1000 * import_s / n, 3),
        "set_data_field_s_per_1000": round(1000 * field_s / n, 3),
        "delete_version_s_per_1000": round(1000 * delete_s / n, 3),
    }


# --------------------------------------------------------------------------- the services


class _Bench:
    """One benchmark: its services under the supervisor, its project, its run."""

    def __init__(self, config: BenchLabelConfig, launcher: Launcher) -> None:
        self.config = config
        self.launcher = launcher
        self.out = config.out.resolve()
        self.procs = launcher.supervisor(self.out)
        self.token = secrets.token_hex(20)  # the legacy token format LS expects
        self.password = secrets.token_urlsafe(16)
        self.procs.hidden = [self.token, self.password]
        self.redis_url = config.redis_url or ""
        self.redis_child: Child | None = None
        self.ls_child: Child | None = None
        self.ls_url = ""
        self.workers: list[Child] = []

    def prepare(self) -> None:
        """Stop what a crashed benchmark on this ``--out`` left running; start from empty folders."""
        self.out.mkdir(parents=True, exist_ok=True)
        stopped = self.procs.clean_stale()
        if stopped:
            _say(f"stopped what an earlier run on {self.out} left running: {', '.join(stopped)}")
        for name in ("label-studio", "models", "redis", "logs"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        self.procs.write()

    def start_redis(self) -> None:
        if self.config.redis_url:
            client = redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=2)
            try:
                client.flushdb()
            except redis.RedisError as exc:
                raise AutoAnnotatorError(f"Redis at {self.config.redis_url}: {exc}") from None
            _say(f"Redis: {self.config.redis_url} (database flushed; again at the end)")
            return
        server = shutil.which("redis-server")
        if server is None:
            raise AutoAnnotatorError(
                "redis-server is not installed (make install-redis); or pass --redis-url"
            )
        port = _free_port()
        (self.out / "redis").mkdir(parents=True, exist_ok=True)
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.out / "redis")]
        self.redis_child = self.procs.spawn("redis", argv, dict(os.environ), self.out)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)

        def answers() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.ping())
            return False

        self.procs.wait("Redis to answer", answers, 30)
        _say(f"Redis: started on 127.0.0.1:{port} (pid {self.redis_child.pid})")

    def start_label_studio(self) -> float:
        executable = self.config.ls_executable
        if not executable.is_file():
            raise AutoAnnotatorError(f"{executable} is absent: run `make install-ls`")
        port = _free_port()
        self.ls_url = url = f"http://127.0.0.1:{port}"
        data_dir = self.out / "label-studio"
        (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
        env = self.launcher.ls_environment(data_dir, url, LS_USER, self.password, self.token)
        started = time.monotonic()
        _say(f"Label Studio: starting on {url} (a new database: migrations take about a minute)")
        child = self.ls_child = self.procs.spawn(
            "label-studio", self.launcher.ls_argv(executable, port), env, data_dir
        )
        self.procs.wait(
            "Label Studio to answer /health/",
            lambda: self.launcher.ls_probe(child.output(), url, port) is None,
            LS_START_TIMEOUT_S,
        )
        seconds = time.monotonic() - started
        _say(f"Label Studio: up in {seconds:.0f} s (pid {child.pid})")
        return seconds

    def worker_env(self, store: Path) -> dict[str, str]:
        """This environment minus every backend setting, plus the benchmark's and this process's
        precision and runtime (those of the raw forward pass it is timed against)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AUTOANNOTATOR_", "BASIC_AUTH_", "LABEL_STUDIO_"))
        }
        env.update(
            {
                "AUTOANNOTATOR_MODEL_DIR": str(store),
                "AUTOANNOTATOR_REDIS_URL": self.redis_url,
                "AUTOANNOTATOR_LABEL_CHUNK": str(self.config.chunk),
                "AUTOANNOTATOR_CPU_SHARERS": str(self.config.cpu_sharers),
                "AUTOANNOTATOR_POLICY": self.config.policy,
                "AUTOANNOTATOR_REVIEW_MODE": self.config.review_mode,
                **forward_settings(),
                "LABEL_STUDIO_URL": self.ls_url,
                "LABEL_STUDIO_API_KEY": self.token,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start_workers(self, env: dict[str, str], state: State) -> None:
        from rq import Worker

        script = Path(sys.executable).with_name("autoannotator")
        if not script.is_file():
            raise AutoAnnotatorError(f"{script} is absent: install the package (make install)")
        for i in range(1, self.config.workers + 1):
            argv = [str(script), "worker", "--queues", "label", "--name", f"bench-label-{os.getpid()}-{i}"]
            self.workers.append(self.procs.spawn(f"worker-label-{i}", argv, env, self.out))
        queue = state.queue("label")
        self.procs.wait(
            f"{self.config.workers} label workers to register",
            lambda: Worker.count(connection=state.redis, queue=queue) >= self.config.workers,
            WORKER_START_TIMEOUT_S,
        )
        _say(f"label workers: {', '.join(f'pid {c.pid}' for c in self.workers)}")

    def stop(self) -> None:
        """Stop every process this benchmark started; a second Ctrl-C must not cut this short."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main:
            previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.procs.stop_all()
            if self.config.redis_url:
                with contextlib.suppress(redis.RedisError):
                    redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=2).flushdb()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _failed_label_jobs(client: redis.Redis) -> list[str]:
    from rq.job import Job
    from rq.registry import FailedJobRegistry

    out = []
    for job_id in FailedJobRegistry("label", connection=client).get_job_ids():
        with contextlib.suppress(Exception):
            job = Job.fetch(job_id, connection=client)
            out.append(f"{job.description}: {(job.exc_info or '').strip()[-1500:]}")
    return out


def _chunks_run(output: str) -> int:
    """Chunks a label worker started, from its log (rq names each job by its description)."""
    return sum(1 for line in output.splitlines() if "label: label chunk " in line)


def _import_tasks(ls: LabelStudio, project_id: int, texts: Sequence[str]) -> float:
    """Import ``texts`` as tasks, :data:`IMPORT_BATCH` per request; the seconds it took."""
    started = time.perf_counter()
    for start in range(0, len(texts), IMPORT_BATCH):
        batch: list[Any] = [{"text": t} for t in texts[start : start + IMPORT_BATCH]]
        ls.projects.import_tasks(id=project_id, request=batch)
    seconds = time.perf_counter() - started
    total = unannotated_page(ls, project_id, after_id=0, size=1)[1]
    if total != len(texts):
        raise AutoAnnotatorError(f"Label Studio holds {total} tasks after the import, not {len(texts)}")
    return seconds


def _wait_run(bench: _Bench, state: State, uid: str, run_id: str, trail: list[dict[str, Any]]) -> LabelRun:
    """The finished run; meanwhile, every ``PROGRESS_EVERY_S``, a progress line and a point of
    ``trail``: the tasks done and each label worker's resident memory then."""
    runs = LabelRuns(state)
    shown = [time.monotonic()]

    def finished() -> LabelRun | None:
        failed = _failed_label_jobs(state.redis)
        if failed:
            raise AutoAnnotatorError("a labelling job failed:\n" + "\n".join(failed))
        run = runs.current(uid)
        if run is None or run.id != run_id:
            raise AutoAnnotatorError("the benchmark's run is no longer the project's current run")
        if run.state == "cancelled":
            raise AutoAnnotatorError(f"the run was cancelled: {run.note}")
        return run if run.finished else None

    def progress() -> None:
        if time.monotonic() - shown[0] >= PROGRESS_EVERY_S:
            shown[0] = time.monotonic()
            run = runs.current(uid)
            if run is not None:
                rss = [process_memory_mb(c.pid)["rss_mb"] for c in bench.workers]
                trail.append({"done": run.done, "rss_mb": rss})
                total = f"{run.total}" if run.planned else "?"
                _say(
                    f"labelling: {run.done}/{total} tasks ({run.state}{': ' + run.note if run.note else ''})"
                )

    return bench.procs.wait("the labelling run to finish", finished, bench.config.timeout_s, progress)


def run_bench_label(config: BenchLabelConfig, launcher: Launcher) -> dict[str, Any]:
    """Measure a labelling run of a whole project (see the module's docstring)."""
    from autoannotator.service.context import Context
    from autoannotator.service.queueing import request_labelling

    if config.tasks < 1 or config.workers < 1 or config.chunk < 1:
        raise BadInputError("--tasks, --workers and --chunk must be at least 1")
    try:
        policy_from_spec(config.policy)
    except ValueError as exc:
        raise BadInputError(f"policy {config.policy!r}: {exc}") from None
    if config.review_mode not in REVIEW_MODES:
        raise BadInputError(f"review mode must be one of {list(REVIEW_MODES)}, got {config.review_mode!r}")
    xml, config_name = label_config([str(x) for x in read_manifest(config.version_dir)["labels"]])
    project_config = parse_label_config(xml)
    texts = task_texts(read_texts(config.data), config.tasks)
    load_start = os.getloadavg()

    _say(f"raw forward pass of {config.version_dir} over {len(texts)} texts, chunks of {config.chunk}")
    raw = raw_forward_pass(config.version_dir, project_config.labels, texts, config.chunk)
    _say(f"raw forward pass: {raw['s']:.1f} s ({raw['tasks_per_s']} tasks/s)")

    bench = _Bench(config, launcher)
    try:
        with quiet_loggers("httpx", "urllib3"):
            bench.prepare()
            bench.start_redis()
            ls_start_s = bench.start_label_studio()
            ls = LabelStudio(base_url=bench.ls_url, api_key=bench.token, timeout=600)
            ls_version = str(getattr(ls.versions.get(), "release", None) or "?")
            project = ls.projects.create(title=f"bench-label {config.tasks} tasks", label_config=xml)
            if project.id is None or project.created_at is None:
                raise AutoAnnotatorError(f"Label Studio made a project without an id or a date: {project}")
            project_id = int(project.id)
            uid = f"{project_id}.{int(project.created_at.timestamp())}"
            import_s = _import_tasks(ls, project_id, texts)
            _say(f"project {uid}: {len(texts)} tasks imported in {import_s:.1f} s")

            store = bench.out / "models"
            version = publish_version(config.version_dir, store, uid)
            env = bench.worker_env(store)
            settings = Settings.from_env(env)  # what the workers read
            ctx = Context.from_settings(settings)
            ctx.state.remember(ProjectInfo(uid, project_id, bench.ls_url, xml))
            bench.start_workers(env, ctx.state)

            _say(f"labelling run of {version}: {config.workers} worker(s), chunks of {config.chunk}")
            started = time.time()
            run = request_labelling(ctx, uid, "benchmark")
            if run is None:
                raise AutoAnnotatorError(f"no labelling run started: project {uid} serves no version")
            trail: list[dict[str, Any]] = []
            final = _wait_run(bench, ctx.state, uid, run.id, trail)
            run_s = final.finished_at - started
            _say(f"labelling run done in {run_s:.1f} s: {final.done} tasks, {final.written} written")
            workers = [
                {"name": c.name, "pid": c.pid, **process_memory_mb(c.pid), "chunks": _chunks_run(c.output())}
                for c in bench.workers
            ]
            writes = ls_write_cost(ls, project_id, project_config, config.chunk)
            _say(
                f"Label Studio writes per 1,000 tasks: predictions {writes['import_predictions_s_per_1000']} "
                f"s, data field {writes['set_data_field_s_per_1000']} s"
            )
            pids = {
                "label_studio": bench.ls_child.pid if bench.ls_child else None,
                "redis": bench.redis_child.pid if bench.redis_child else None,
            }
    finally:
        bench.stop()

    rate = final.done / run_s if run_s > 0 else 0.0
    result = {
        "tasks": config.tasks,
        "workers": config.workers,
        "cpu_sharers": config.cpu_sharers,
        "threads_per_worker": threads_per_process(0, config.cpu_sharers),
        "chunk": config.chunk,
        "policy": config.policy,
        "review_mode": config.review_mode,
        "data": str(config.data),
        "label_config": config_name,
        "version_dir": str(config.version_dir),
        "version": version,
        "members": raw.pop("members"),
        "project": uid,
        "run": {
            k: v for k, v in final.as_dict().items() if k not in ("id", "reason", "note", "cursor", "eta_s")
        },
        "run_s": round(run_s, 3),
        "run_tasks_per_s": round(rate, 2),
        "raw": raw,
        # The run's speed as a share of its limit, the raw forward pass of the same members on the
        # same texts: 1.0 means the run costs nothing beyond its forward passes.
        "speed_over_raw": round(raw["s"] / run_s, 4) if run_s > 0 else None,
        # The same question asked inside the run: the share of its wall time that the workers spent
        # in forward passes (one worker; with more, their sum). Unlike the raw pass above, timed
        # in the very process and minutes that the run ran, so a busy machine moves both alike.
        "forward_share": round(final.forward_ms / 1000 / run_s, 4) if run_s > 0 else None,
        "ls_writes": writes,
        "worker_memory": workers,
        # Resident memory of each label worker as the run went (every PROGRESS_EVERY_S): flat once
        # the models are loaded and the largest batch shapes were met, if pages are streamed.
        "worker_memory_trail": trail,
        "import_s": round(import_s, 2),
        "label_studio": {
            "version": ls_version,
            "startup_s": round(ls_start_s, 1),
            "url": bench.ls_url,
        },
        "redis": {"url": bench.redis_url, "own": config.redis_url is None},
        "pids": {**pids, "workers": [w["pid"] for w in workers]},
        "machine": machine(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "out": str(bench.out),
    }
    (bench.out / "bench-label.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table row under its header, and a line on what the run did."""
    w = result["ls_writes"]
    peaks = ", ".join(
        f"{m['peak_rss_mb']:,.0f}" for m in result["worker_memory"] if m.get("peak_rss_mb") is not None
    )
    run = result["run"]
    rows = [
        "| tasks | label workers | chunk | labelling run, start to done | run speed | raw forward pass "
        "| run speed / raw speed "
        "| LS writes per 1,000 tasks: predictions, data field | label workers' peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['tasks']:,} | {result['workers']} | {result['chunk']} | {result['run_s']:,.1f} s "
        f"| {result['run_tasks_per_s']:,.1f} tasks/s | {result['raw']['tasks_per_s']:,.1f} tasks/s "
        f"| {result['speed_over_raw']:.2f} | {w['import_predictions_s_per_1000']:.2f} s, "
        f"{w['set_data_field_s_per_1000']:.2f} s | {peaks} MiB |",
        "",
        f"Version {result['version']} ({', '.join(result['members'])}), policy {result['policy']}, review "
        f"mode {result['review_mode']}, {result['threads_per_worker']} CPU thread(s) per label worker "
        f"(AUTOANNOTATOR_CPU_SHARERS={result['cpu_sharers']}), "
        f"Label Studio {result['label_studio']['version']}: "
        f"{run['done']:,} tasks done in {run['chunks']} chunks, {run['written']:,} predictions written, "
        f"{run['routed']:,} routed, {run['moved_in']:,} into the Needs review tab. Raw forward pass: "
        f"{result['raw']['s']:,.1f} s in this process (load {result['raw']['load_s']:.1f} s apart).",
    ]
    if run.get("predict_ms"):
        rows.append(
            "Inside the run's chunks, summed over workers: reading tasks "
            f"{run['read_ms'] / 1000:,.1f} s, predicting and routing {run['predict_ms'] / 1000:,.1f} s "
            f"(forward passes {run['forward_ms'] / 1000:,.1f} s), writing predictions "
            f"{run['write_ms'] / 1000:,.1f} s, moving the Needs review tab {run['tab_ms'] / 1000:,.1f} s; "
            f"forward passes / run wall time: {result['forward_share']:.2f}."
        )
    points = [p for p in result.get("worker_memory_trail", []) if p["rss_mb"] and None not in p["rss_mb"]]
    if points:
        shown = [points[i] for i in sorted({round(k * (len(points) - 1) / 7) for k in range(8)})]
        rows.append(
            "Label workers' resident memory as the run went (tasks done: MiB): "
            + "; ".join(f"{p['done']:,}: {', '.join(f'{r:,.0f}' for r in p['rss_mb'])}" for p in shown)
            + "."
        )
    return "\n".join(rows)
