"""``autoannotator bench-predict``: what the Label Studio protocol costs on top of the specialists.

The real backend (``create_app`` under gunicorn, one worker) serves a published version from a
temporary model store; requests shaped like Label Studio's ``POST /predict`` (full task objects,
project uid, label config, params) go to it over loopback HTTP, one at a time. Each round labels
one slice of texts three ways, in an order rotated from round to round so that a busy machine's
drifting load hits every side alike:

- ``raw``: ``Ensemble.predict_proba`` in this process, on the very ensemble the app's
  :class:`ProjectModels` loaded from the store (the forward pass of every member);
- ``in-process``: the same request through a Flask test client of an app built here, so that the
  handler's own time (parse, extract, route, build and validate the predictions, Redis counters,
  enqueue the review job, JSON out) is the request's time minus the forward pass inside it;
- ``http``: the request over HTTP to gunicorn, client-side JSON encoding and decoding included.
  gunicorn serves the product's ``create_app()`` as deployed; its ``Server-Timing`` header says
  how long that request spent in the members' forward passes, so HTTP time can also be *paired*
  with the forward pass of the same request in the same process: on a shared machine the two
  processes' forward passes differ by more than the protocol costs, and the pairing cancels that.

The per-step breakdown (``components_ms``) times :meth:`Annotator.predict`, the very function the
route calls, by its own clock, plus the Redis work after the answer and the JSON on either side.

Every call gets texts nobody has seen (a short suffix, as in ``autoannotator benchmark``): the
embedding member caches vectors by text, and a repeated text would make its forward pass a lookup.

Redis: the server and this process use the database of ``redis_url`` (flushed before and after),
and the review mode is switched per project through Redis, exactly as the settings page does. With
mode ``human`` the tasks the policy routes are enqueued as rq ``review`` jobs as in production (no
worker runs, so they just sit in the queue until the flush); with ``off`` only the counters move.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import redis

from autoannotator.errors import AutoAnnotatorError
from autoannotator.lab.benchmark import forward_settings, machine, process_memory_mb, quiet_loggers
from autoannotator.labelstudio.config import parse_label_config
from autoannotator.models.ensemble import Ensemble, read_manifest
from autoannotator.service.annotator import Annotator
from autoannotator.service.queueing import dispatch_review
from autoannotator.settings import REVIEW_MODES, Settings
from autoannotator.storage.model_store import ProjectModels
from autoannotator.storage.redis_state import State
from autoannotator.storage.registry import VERSION_PATTERN

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
DEFAULT_UID = "1.1700000000"  # Label Studio's "<project id>.<created_at unix seconds>"
SERVER_START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0
# /predict's answer names the time of each of its steps in this header (``forward;dur=12.3``, ms).
TIMING_HEADER = "Server-Timing"


def label_config_xml(labels: Sequence[str]) -> str:
    """A single-choice text classification config for ``labels``, in that order."""
    choices = "\n".join(f"    <Choice value={quoteattr(lab)}/>" for lab in labels)
    return (
        "<View>\n"
        '  <Text name="text" value="$text"/>\n'
        '  <Choices name="label" toName="text" choice="single-radio">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def ls_task(task_id: int, text: str) -> dict[str, Any]:
    """A task object as Label Studio 1.23 sends it to /predict (the fields the backend may read)."""
    return {
        "id": task_id,
        "data": {"text": text},
        "meta": {},
        "annotations": [],
        "predictions": [],
        "drafts": [],
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "is_labeled": False,
        "inner_id": task_id,
    }


def predict_body(uid: str, label_config: str, texts: Sequence[str], first_id: int) -> bytes:
    """The JSON body of one Label Studio ``POST /predict``."""
    return json.dumps(
        {
            "tasks": [ls_task(first_id + i, t) for i, t in enumerate(texts)],
            "project": uid,
            "label_config": label_config,
            "params": {"login": None, "password": None, "context": None},
        }
    ).encode("utf-8")


def model_store(version_dir: Path, root: Path, uid: str) -> str:
    """A model store under ``root`` whose project ``uid`` serves ``version_dir`` (linked, not copied).

    Published through :meth:`Registry.publish`, so the app finds it exactly as it finds a trained
    version. Returns the version name.
    """
    version_dir = Path(version_dir).resolve()
    read_manifest(version_dir)
    name = version_dir.name if VERSION_PATTERN.fullmatch(version_dir.name) else "v0001"
    registry = ProjectModels(root).registry(uid)
    registry.versions_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(version_dir, registry.path(name), target_is_directory=True)
    registry.publish(name, {"reason": "bench-predict"})
    return name


class _Texts:
    """Slices of ``pool`` (cycling through it); every call gets its slice made unseen by a suffix.

    :meth:`advance` moves to the next slice; the raw, in-process and HTTP calls of one round all
    :meth:`take` the same slice, so that they label the same texts (forward-pass cost depends on
    the texts' lengths), each with its own suffix so that no embedding cache helps any of them.
    """

    def __init__(self, pool: Sequence[str]) -> None:
        if not pool:
            raise AutoAnnotatorError("bench-predict needs at least one text")
        self.pool = list(pool)
        self.start = 0
        self.cursor = 0
        self.calls = 0

    def advance(self, n: int) -> None:
        self.start = self.cursor
        self.cursor = (self.cursor + n) % len(self.pool)

    def take(self, n: int) -> list[str]:
        self.calls += 1
        return [f"{self.pool[(self.start + i) % len(self.pool)]} ~b{self.calls}" for i in range(n)]


# --------------------------------------------------------------------------- the server


@dataclass
class Server:
    """The backend under gunicorn on a loopback socket this process bound (no port race)."""

    url: str
    host: str
    port: int
    command: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path


def server_env(model_dir: Path, redis_url: str, review_mode: str) -> dict[str, str]:
    """This environment minus any backend setting, plus the store, Redis, default mode, and this
    process's precision and runtime."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AUTOANNOTATOR_", "BASIC_AUTH_", "LABEL_STUDIO_"))
    }
    env.update(
        {
            "AUTOANNOTATOR_MODEL_DIR": str(model_dir),
            "AUTOANNOTATOR_REDIS_URL": redis_url,
            "AUTOANNOTATOR_REVIEW_MODE": review_mode,
            **forward_settings(),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@contextmanager
def gunicorn_server(
    env: dict[str, str], log_path: Path, threads: int = 1, workers: int = 1
) -> Iterator[Server]:
    """gunicorn (``gthread`` with ``threads`` > 1, else ``sync``, as in the README) serving the
    product's app; stopped on exit."""
    with gunicorn(
        "autoannotator.service.app:create_app()", env, log_path, workers=workers, threads=threads
    ) as server:
        yield server


@contextmanager
def gunicorn(
    app: str,
    env: dict[str, str],
    log_path: Path,
    *,
    python: str = sys.executable,
    cwd: Path | None = None,
    workers: int = 1,
    threads: int = 1,
    options: Sequence[str] = (),
    cpus: set[int] | None = None,
) -> Iterator[Server]:
    """Any WSGI ``app`` under gunicorn on a loopback socket bound here, run by ``python`` from ``cwd``,
    pinned to ``cpus`` (every worker inherits the affinity) when given; stopped on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    host, port = sock.getsockname()[:2]
    command = [
        python,
        "-m",
        "gunicorn",
        *("--workers", str(workers), "--worker-class", "gthread" if threads > 1 else "sync"),
        *("--threads", str(threads), "--bind", f"fd://{sock.fileno()}"),
        *("--timeout", str(int(REQUEST_TIMEOUT_S)), "--graceful-timeout", "10", "--log-level", "warning"),
        *options,
        app,
    ]
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),),
            preexec_fn=pin,
        )
    sock.close()  # gunicorn holds its own copy
    server = Server(f"http://{host}:{port}", host, port, command, process, log_path)
    try:
        _wait_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def worker_memory(server: Server) -> dict[str, Any]:
    """The gunicorn workers' memory once every request has been served: what one web worker holds
    for one project (``rss_mb``) and the most it held (``peak_rss_mb``, its largest batch); with
    several workers, the largest of them."""
    try:
        with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as fh:
            workers = [int(pid) for pid in fh.read().split()]
    except OSError:  # no /proc (not Linux): not measured
        return {}
    measured = [{"pid": pid, **process_memory_mb(pid)} for pid in workers]
    return max(measured, key=lambda m: m.get("rss_mb") or 0.0) if measured else {}


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            status, _, _ = http_request(server, "GET", "/health", None, timeout=5)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    tail = server.log_path.read_text(errors="replace")[-2000:]
    raise AutoAnnotatorError(f"gunicorn did not answer /health at {server.url}; its log ends:\n{tail}")


def http_request(
    server: Server, method: str, path: str, body: bytes | None, timeout: float = REQUEST_TIMEOUT_S
) -> tuple[int, bytes, float]:
    """One request on a new connection (what a client without keep-alive pays): status, body and the
    server's forward-pass seconds (0 when the answer has no such header)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), forward_seconds(response.getheader(TIMING_HEADER))
    finally:
        conn.close()


def forward_seconds(server_timing: str | None) -> float:
    """The ``forward`` step's seconds from a ``Server-Timing`` header (0.0 when it has none)."""
    for part in (server_timing or "").split(","):
        name, _, params = part.strip().partition(";")
        if name == "forward" and params.startswith("dur="):
            return float(params.removeprefix("dur=")) / 1000
    return 0.0


# --------------------------------------------------------------------------- measurement


def _summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p95": round(float(np.percentile(ms, 95)), 3),
        "mean": round(float(ms.mean()), 3),
    }


def _pct(measured: float, raw: float) -> float:
    return round(100.0 * (measured - raw) / raw, 1)


@dataclass
class _Probe:
    """The three ways of labelling the same kind of batch, each timed per call."""

    uid: str
    xml: str
    version: str
    ensemble: Ensemble
    client: Any  # flask.testing.FlaskClient
    server: Server
    texts: _Texts
    next_id: int = 1

    def _ids(self, n: int) -> int:
        first = self.next_id
        self.next_id += n
        return first

    def raw(self, n: int) -> float:
        texts = self.texts.take(n)
        started = time.perf_counter()
        self.ensemble.predict_proba(texts)
        return time.perf_counter() - started

    def in_process(self, n: int) -> tuple[float, float]:
        """(request seconds, forward-pass seconds inside it) through the Flask test client.

        ``buffered=True`` closes the response inside the call, as a WSGI server does after sending
        it, so this time includes the counting and queueing that /predict does after its answer:
        it is the worker's busy time, where the HTTP time is what the client waits for."""
        body = predict_body(self.uid, self.xml, self.texts.take(n), self._ids(n))
        started = time.perf_counter()
        response = self.client.post("/predict", data=body, content_type="application/json", buffered=True)
        seconds = time.perf_counter() - started
        forward = forward_seconds(response.headers.get(TIMING_HEADER))
        self._check(response.status_code, response.get_json(), n)
        return seconds, forward

    def http(self, n: int) -> tuple[float, float]:
        """(request seconds as the client saw them, forward-pass seconds inside the server)."""
        texts = self.texts.take(n)
        first = self._ids(n)
        started = time.perf_counter()
        status, raw, forward = http_request(
            self.server, "POST", "/predict", predict_body(self.uid, self.xml, texts, first)
        )
        answer = json.loads(raw)
        seconds = time.perf_counter() - started
        self._check(status, answer, n)
        if forward <= 0:
            raise AutoAnnotatorError(f"the server's answer has no forward step in {TIMING_HEADER}")
        return seconds, forward

    def _check(self, status: int, answer: Any, n: int) -> None:
        results = answer.get("results") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(results, list) or len(results) != n:
            raise AutoAnnotatorError(f"/predict answered {status}: {str(answer)[:300]}")
        versions = {r.get("model_version") for r in results}
        empty = sum(1 for r in results if not r.get("result"))
        if versions != {self.version} or empty:
            raise AutoAnnotatorError(
                f"/predict answered versions {versions} (expected {self.version!r}), {empty} empty results"
            )


def _components(
    probe: _Probe, annotator: Annotator, state: State, settings: Settings, n: int, repeats: int
) -> dict[str, float]:
    """Where one request's time goes, for a batch of ``n`` (median ms per step): the steps of
    :meth:`Annotator.predict` by its own clock (the code that serves), the counting and review
    queueing done after the answer (``redis``), and the JSON parsed and written on either side."""
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        probe.texts.advance(n)
        body = predict_body(probe.uid, probe.xml, probe.texts.take(n), probe._ids(n))
        t0 = time.perf_counter()
        tasks = json.loads(body)["tasks"]
        t1 = time.perf_counter()
        batch = annotator.predict(probe.uid, tasks, probe.xml)
        t2 = time.perf_counter()
        dispatch_review(
            state, settings, batch.uid, batch.version, batch.routed, batch.cleared, predictions=batch.n
        )
        t3 = time.perf_counter()
        json.dumps({"results": batch.results})
        t4 = time.perf_counter()
        steps = {"json_parse": t1 - t0, **batch.timings, "redis": t3 - t2, "json_out": t4 - t3}
        for key, seconds in steps.items():
            times.setdefault(key, []).append(seconds)
    return {k: round(1000 * statistics.median(v), 3) for k, v in times.items()}


def _round(probe: _Probe, n: int, i: int) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """One raw, one in-process and one HTTP call of ``n`` tasks, the order rotated with ``i`` so that
    neither side always runs first after the other (a busy machine's load drifts)."""
    calls: list[Callable[[], Any]] = [
        lambda: probe.raw(n),
        lambda: probe.in_process(n),
        lambda: probe.http(n),
    ]
    probe.texts.advance(n)
    out: list[Any] = [None, None, None]
    for k in range(3):
        j = (k + i) % 3
        out[j] = calls[j]()
    return out[0], out[1], out[2]


@dataclass
class _Samples:
    """Per call: raw forward pass; in-process request and its forward pass; HTTP request and the
    forward pass inside the server for that same request."""

    raw: list[float]
    inproc: list[float]
    inproc_forward: list[float]
    http: list[float]
    http_forward: list[float]

    @classmethod
    def take(cls, probe: _Probe, n: int, calls: int) -> _Samples:
        out = cls([], [], [], [], [])
        for i in range(calls):
            raw, (inproc, inproc_forward), (http_s, http_forward) = _round(probe, n, i)
            out.raw.append(raw)
            out.inproc.append(inproc)
            out.inproc_forward.append(inproc_forward)
            out.http.append(http_s)
            out.http_forward.append(http_forward)
        return out

    def handler(self) -> list[float]:
        """In-process request time minus the forward pass inside it."""
        return [s - f for s, f in zip(self.inproc, self.inproc_forward, strict=True)]

    def paired_pct(self) -> float:
        """Median over requests of (HTTP time - the server's forward pass) / that forward pass."""
        return round(
            100 * statistics.median((h - f) / f for h, f in zip(self.http, self.http_forward, strict=True)), 1
        )


def _measure_mode(
    probe: _Probe,
    single_n: int,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    for n in (1, min(32, max(batch_sizes, default=1))):
        _Samples.take(probe, n, warmup)
    one = _Samples.take(probe, 1, single_n)
    raw_ms, http_ms = _summary_ms(one.raw), _summary_ms(one.http)
    single: dict[str, Any] = {
        "n": single_n,
        "raw_ms": raw_ms,
        "in_process_ms": _summary_ms(one.inproc),
        "http_ms": http_ms,
        "http_server_forward_ms": _summary_ms(one.http_forward),
        "handler_excl_forward_ms": _summary_ms(one.handler()),
        "http_minus_server_forward_ms": _summary_ms(
            [h - f for h, f in zip(one.http, one.http_forward, strict=True)]
        ),
        "overhead_p50_pct": _pct(http_ms["p50"], raw_ms["p50"]),
        "overhead_p95_pct": _pct(http_ms["p95"], raw_ms["p95"]),
        "paired_overhead_pct": one.paired_pct(),
        "in_process_overhead_p50_pct": _pct(_summary_ms(one.inproc)["p50"], raw_ms["p50"]),
    }
    log(
        f"batch 1: p50 raw {raw_ms['p50']:.1f} ms, http {http_ms['p50']:.1f} ms "
        f"({single['overhead_p50_pct']:+.1f}%; paired {single['paired_overhead_pct']:+.1f}%)"
    )
    batches = []
    for n in batch_sizes:
        b = _Samples.take(probe, n, repeats)
        raw, inproc, http_s = (statistics.median(x) for x in (b.raw, b.inproc, b.http))
        row = {
            "batch": n,
            "repeats": repeats,
            "raw_s": round(raw, 4),
            "in_process_s": round(inproc, 4),
            "http_s": round(http_s, 4),
            "http_server_forward_s": round(statistics.median(b.http_forward), 4),
            "raw_tasks_per_s": round(n / raw, 1),
            "in_process_tasks_per_s": round(n / inproc, 1),
            "http_tasks_per_s": round(n / http_s, 1),
            "overhead_pct": _pct(http_s, raw),
            # The fastest repeat of each: less sensitive to other load on the machine than the median.
            "overhead_best_pct": _pct(min(b.http), min(b.raw)),
            "paired_overhead_pct": b.paired_pct(),
            "in_process_overhead_pct": _pct(inproc, raw),
            "handler_excl_forward_s": round(statistics.median(b.handler()), 4),
            "http_minus_server_forward_s": round(
                statistics.median(h - f for h, f in zip(b.http, b.http_forward, strict=True)), 4
            ),
            "all_s": {
                "raw": [round(x, 4) for x in b.raw],
                "in_process": [round(x, 4) for x in b.inproc],
                "http": [round(x, 4) for x in b.http],
                "http_server_forward": [round(x, 4) for x in b.http_forward],
            },
        }
        batches.append(row)
        log(
            f"batch {n}: raw {row['raw_tasks_per_s']:.0f} tasks/s, http {row['http_tasks_per_s']:.0f} "
            f"tasks/s ({row['overhead_pct']:+.1f}%; paired {row['paired_overhead_pct']:+.1f}%)"
        )
    return {"single": single, "batches": batches}


def run_bench_predict(
    version_dir: Path,
    texts: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (100, 1000),
    single_n: int = 200,
    repeats: int = 3,
    warmup: int = 3,
    modes: Sequence[str] = ("human", "off"),
    redis_url: str = DEFAULT_REDIS_URL,
    threads: int = 1,
    uid: str = DEFAULT_UID,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Time ``POST /predict`` against the raw forward pass of ``version_dir``'s ensemble (see above)."""
    from autoannotator.service.app import create_app

    bad = [m for m in modes if m not in REVIEW_MODES]
    if bad or not modes:
        raise AutoAnnotatorError(f"modes must be some of {list(REVIEW_MODES)}, got {list(modes)}")
    if single_n < 1 or repeats < 1 or any(n < 1 for n in batch_sizes):
        raise AutoAnnotatorError("single_n, repeats and every batch size must be at least 1")
    manifest = read_manifest(version_dir)
    labels = [str(x) for x in manifest["labels"]]
    xml = label_config_xml(labels)
    config = parse_label_config(xml)
    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise AutoAnnotatorError(f"bench-predict needs Redis at {redis_url}: {exc}") from None
    client.flushdb()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        store = tmp / "models"
        version = model_store(version_dir, store, uid)
        settings = Settings(model_dir=store, redis_url=redis_url, review_mode=modes[0])
        projects = ProjectModels(store)
        state = State.from_url(redis_url, settings.review_mode)
        app = create_app(settings, projects, state)
        env = server_env(store, redis_url, modes[0])
        result: dict[str, Any] = {"modes": {}}
        with (
            gunicorn_server(env, tmp / "gunicorn.log", threads=threads) as server,
            quiet_loggers(
                "autoannotator.service.app",
                "autoannotator.storage.redis_state",
                "autoannotator.storage.model_store",
            ),
        ):
            flask_client = app.test_client()
            warm = flask_client.post(
                "/predict",
                data=predict_body(uid, xml, ["warm up"], 0),
                content_type="application/json",
                buffered=True,
            )
            if warm.status_code != 200:
                raise AutoAnnotatorError(
                    f"/predict answered {warm.status_code}: {warm.get_data(as_text=True)}"
                )
            ensemble = projects.ensemble(uid, config.labels)
            assert ensemble is not None  # published above
            probe = _Probe(uid, xml, version, ensemble, flask_client, server, _Texts(texts))
            for mode in modes:
                state.set_mode(uid, mode)
                client.delete(f"aa:p:{uid}:m")
                log(f"mode {mode}")
                measured = _measure_mode(probe, single_n, batch_sizes, repeats, warmup, log)
                counters = state.counters(uid)
                measured["predictions_counted"] = int(counters["predictions"])
                measured["routed"] = int(counters["routed"])
                measured["review_jobs_queued"] = state.queue_depths()["review"]
                # Both apps count every request; fewer means someone else wrote to (flushed) this
                # Redis database mid-run, and the mode may have fallen back to the default.
                requests = warmup * (1 + min(32, max(batch_sizes, default=1))) + single_n
                expected = 2 * (requests + repeats * sum(batch_sizes))
                measured["redis_undisturbed"] = (
                    measured["predictions_counted"] == expected and state.mode(uid) == mode
                )
                if not measured["redis_undisturbed"]:
                    logger.warning(
                        "mode %s: Redis counted %d predictions, not %d: another client used %s mid-run",
                        mode,
                        measured["predictions_counted"],
                        expected,
                        redis_url,
                    )
                result["modes"][mode] = measured
                # Each mode starts from an empty review queue.
                state.queue("review").empty()
            comp_mode = "human" if "human" in modes else modes[0]
            state.set_mode(uid, comp_mode)
            annotator = app.extensions["autoannotator"].annotator
            # Batch 1 gets as many repeats as the latency figures: its steps take microseconds.
            components = {
                str(n): _components(probe, annotator, state, settings, n, single_n if n == 1 else repeats)
                for n in (1, *batch_sizes)
            }
            memory = worker_memory(server)
        result.update(
            {
                "machine": machine(),
                "load_average_start": [round(x, 2) for x in load_start],
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "version_dir": str(version_dir),
                "version": version,
                "members": ensemble.describe()["members"],
                "labels": labels,
                "n_texts_pool": len(texts),
                "policy": settings.policy,
                "server": {
                    "command": " ".join(["gunicorn", *server.command[3:]]),
                    "workers": 1,
                    "threads": threads,
                    "redis_url": redis_url,
                },
                "single_n": single_n,
                "batch_sizes": list(batch_sizes),
                "repeats": repeats,
                "components_mode": comp_mode,
                "components_ms": components,
                "worker_memory": memory,
            }
        )
        return result
    finally:
        client.flushdb()
        shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table: one row per mode and batch size (p50 and p95 for batch 1)."""
    rows = [
        "| review mode | batch | raw forward pass | `/predict` over HTTP | overhead vs raw "
        "| overhead, paired | handler minus forward pass | HTTP minus server's forward pass |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, m in result["modes"].items():
        s = m["single"]
        for q in ("p50", "p95"):
            paired = f"{s['paired_overhead_pct']:+.1f}%" if q == "p50" else ""
            rows.append(
                f"| {mode} | 1 ({q}) | {s['raw_ms'][q]:.1f} ms | {s['http_ms'][q]:.1f} ms | "
                f"{s[f'overhead_{q}_pct']:+.1f}% | {paired} | {s['handler_excl_forward_ms'][q]:.1f} ms | "
                f"{s['http_minus_server_forward_ms'][q]:.1f} ms |"
            )
        for b in m["batches"]:
            rows.append(
                f"| {mode} | {b['batch']:,} | {b['raw_tasks_per_s']:,.0f} tasks/s | "
                f"{b['http_tasks_per_s']:,.0f} tasks/s | {b['overhead_pct']:+.1f}% | "
                f"{b['paired_overhead_pct']:+.1f}% | {1000 * b['handler_excl_forward_s']:.1f} ms | "
                f"{1000 * b['http_minus_server_forward_s']:.1f} ms |"
            )
    worker = result.get("worker_memory") or {}
    if worker.get("rss_mb") is not None:
        rows.append(
            f"\nThe gunicorn worker (one project loaded): {worker['rss_mb']:,.0f} MiB resident after the "
            f"run, {worker['peak_rss_mb']:,.0f} MiB at its peak (its largest batch)."
        )
    disturbed = [mode for mode, m in result["modes"].items() if not m.get("redis_undisturbed", True)]
    if disturbed:
        rows.append(
            f"\nAnother client flushed or wrote the Redis database during mode(s) {disturbed}: re-run."
        )
    return "\n".join(rows)
