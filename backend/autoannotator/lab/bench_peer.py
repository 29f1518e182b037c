"""``autoannotator bench-peer``: our backend against the official single-model example, side by side.

The peer is Label Studio's own ML backend example ``bert_classifier`` (repository
``HumanSignal/label-studio-ml-backend``), installed by the user in a virtual environment of its own,
nothing of it in this project. It is served as its Dockerfile serves it (``gunicorn --preload
--threads 8 --timeout 0 _wsgi:app`` from the example's folder) with the fine-tuned transformer member
of ``--version-dir`` as its checkpoint, so that both label with the same fine-tuned MiniLM: the peer
with that one model, we with every member of the version. Ours runs under ``gunicorn --preload`` as
our Dockerfile serves it, so both workers are forked from a master that imported the app.

Both get the same Label Studio-shaped ``POST /predict`` bodies, one server then the other, the order
swapped each round so a drifting load hits both alike; every body carries texts neither has seen
(a suffix per round, as in ``bench-predict``: our embedding member caches vectors by text).

Phases, each for the pinned setting (both servers on CPU 0, one thread) and the unpinned one (every
CPU, threads as each server sizes them):

- ``single``: one-task requests, p50 and p95 of each;
- ``batch``: 100- and 1,000-task requests, tasks per second (median of the repeats);
- ``memory``: each worker's resident memory after the batches;

and unpinned only, ``concurrent``: 3 gunicorn workers each and 3 clients sending one-task requests at
once, p50 and p95 of each server (our workers sized by ``AUTOANNOTATOR_CPU_SHARERS=3``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from autoannotator.errors import AutoAnnotatorError
from autoannotator.lab.bench_predict import (
    DEFAULT_UID,
    Server,
    gunicorn,
    http_request,
    label_config_xml,
    model_store,
    predict_body,
    server_env,
    worker_memory,
)
from autoannotator.lab.benchmark import machine
from autoannotator.models.ensemble import read_manifest
from autoannotator.models.specialists.base import read_meta
from autoannotator.models.specialists.compiled import configured_runtime
from autoannotator.models.specialists.runtime import configured_precision

logger = logging.getLogger(__name__)

PEER_APP = "_wsgi:app"
OUR_APP = "autoannotator.service.app:create_app()"
PEER_MODEL_NAME = "finetuned"


@dataclass(frozen=True)
class PeerInstall:
    """Where the user installed the official example: its folder and its environment's python."""

    example_dir: Path
    python: Path

    def check(self) -> None:
        if not (self.example_dir / "_wsgi.py").is_file():
            raise AutoAnnotatorError(f"{self.example_dir} is not the bert_classifier example (no _wsgi.py)")
        if not self.python.is_file():
            raise AutoAnnotatorError(f"no python at {self.python}: give the peer's virtual environment")


def transformer_member(version_dir: Path) -> Path:
    """The version's fine-tuned transformer member: the checkpoint the peer serves."""
    members = read_manifest(version_dir)["members"]
    for name in members:
        if read_meta(version_dir / name).kind == "transformer":
            return version_dir / name
    raise AutoAnnotatorError(f"{version_dir} has no transformer member for the peer to serve")


@dataclass(frozen=True)
class _Bench:
    """What every phase needs: the version, the peer, a scratch folder, Redis and the texts."""

    version_dir: Path
    peer: PeerInstall
    work: Path
    redis_url: str
    pool: Sequence[str]
    xml: str


@dataclass
class _Side:
    """One server under test and the request bodies it answers."""

    name: str
    server: Server
    uid: str


class _Bodies:
    """Identical request bodies for both sides: a slice of the pool, each round's suffix unseen."""

    def __init__(self, pool: Sequence[str], uid: str, xml: str) -> None:
        self.pool, self.uid, self.xml = list(pool), uid, xml
        self.cursor = 0
        self.round = 0

    def next(self, n: int) -> bytes:
        self.round += 1
        texts = [f"{self.pool[(self.cursor + i) % len(self.pool)]} ~p{self.round}" for i in range(n)]
        self.cursor = (self.cursor + n) % len(self.pool)
        return predict_body(self.uid, self.xml, texts, first_id=1 + self.round * 10_000)


def _post(side: _Side, body: bytes, n: int) -> float:
    started = time.perf_counter()
    status, raw, _ = http_request(side.server, "POST", "/predict", body)
    seconds = time.perf_counter() - started
    if status != 200:
        raise AutoAnnotatorError(f"{side.name} answered {status}: {raw[:300]!r}")
    results = json.loads(raw).get("results")
    if not isinstance(results, list) or len(results) != n:
        raise AutoAnnotatorError(f"{side.name} answered {n} tasks with {raw[:300]!r}")
    return seconds


def _alternate(sides: Sequence[_Side], bodies: _Bodies, n: int, rounds: int) -> dict[str, list[float]]:
    """``rounds`` requests of ``n`` tasks to each side, the same body to both, the order swapped each
    round."""
    seconds: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(rounds):
        body = bodies.next(n)
        for side in sides if r % 2 == 0 else list(reversed(sides)):
            seconds[side.name].append(_post(side, body, n))
    return seconds


def _ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 1),
        "p95": round(float(np.percentile(ms, 95)), 1),
        "n": len(ms),
    }


def _concurrent(side: _Side, bodies: list[bytes], clients: int) -> list[float]:
    """``clients`` threads sending one-task requests at once, ``bodies`` shared out between them."""
    seconds: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(mine: list[bytes]) -> None:
        try:
            for body in mine:
                took = _post(side, body, 1)
                with lock:
                    seconds.append(took)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(bodies[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return seconds


@contextmanager
def _servers(bench: _Bench, *, pinned: bool, workers: int) -> Iterator[tuple[_Side, _Side]]:
    """Ours and the peer, each under gunicorn with ``workers`` workers; pinned: both on CPU 0."""
    version_dir, peer, work = bench.version_dir, bench.peer, bench.work
    cpus = {0} if pinned else None
    tag = f"{'pinned' if pinned else 'unpinned'}-w{workers}"
    store = work / f"store-{tag}"
    model_store(version_dir, store, DEFAULT_UID)
    ours_env = server_env(store, bench.redis_url, "off")
    ours_env["AUTOANNOTATOR_THREADS"] = "1" if pinned else "0"
    ours_env["AUTOANNOTATOR_CPU_SHARERS"] = str(workers)
    # server_env carries --precision and --runtime: `autoannotator --precision fp32 bench-peer` serves
    # ours in fp32, as on a CPU without native bf16 (the peer always runs fp32).
    peer_dir = work / f"peer-models-{tag}"
    peer_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AUTOANNOTATOR_", "LABEL_STUDIO_"))},
        "MODEL_DIR": str(peer_dir),
        "FINETUNED_MODEL_NAME": PEER_MODEL_NAME,
        "BASELINE_MODEL_NAME": str(transformer_member(version_dir)),
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",  # never called by /predict; the example wants one
        "LABEL_STUDIO_API_KEY": "unused",
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    shutil.copytree(transformer_member(version_dir), peer_dir / PEER_MODEL_NAME)
    if pinned:
        peer_env["OMP_NUM_THREADS"] = "1"  # what its torch would pick on one CPU anyway, said outright
    with ExitStack() as stack:
        ours = stack.enter_context(
            gunicorn(
                OUR_APP,
                ours_env,
                work / f"ours-{tag}.log",
                workers=workers,
                options=("--preload",),  # as our Dockerfile serves it (and theirs)
                cpus=cpus,
            )
        )
        theirs = stack.enter_context(
            gunicorn(
                PEER_APP,
                peer_env,
                work / f"peer-{tag}.log",
                python=str(peer.python),
                cwd=peer.example_dir,
                workers=workers,
                threads=8,  # the example's Dockerfile
                options=("--preload",),
                cpus=cpus,
            )
        )
        yield _Side("ours", ours, DEFAULT_UID), _Side("official example", theirs, DEFAULT_UID)


def _setting(
    bench: _Bench, *, pinned: bool, single_n: int, batches: Sequence[int], repeats: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with _servers(bench, pinned=pinned, workers=1) as sides:
        bodies = _Bodies(bench.pool, DEFAULT_UID, bench.xml)
        _alternate(sides, bodies, 8, 2)  # warm-up: lazy loads, first-request costs
        single = _alternate(sides, bodies, 1, single_n)
        out["single_ms"] = {name: _ms(s) for name, s in single.items()}
        out["batch_tasks_per_s"] = {}
        for n in batches:
            took = _alternate(sides, bodies, n, repeats)
            out["batch_tasks_per_s"][str(n)] = {
                name: round(n / statistics.median(s), 1) for name, s in took.items()
            }
        out["worker_memory"] = {side.name: worker_memory(side.server) for side in sides}
    return out


def _concurrency(bench: _Bench, *, clients: int, requests: int, rounds: int) -> dict[str, Any]:
    """Each server alone under the clients, in turns (never both at once: they would share the CPUs)."""
    with _servers(bench, pinned=False, workers=clients) as sides:
        bodies = _Bodies(bench.pool, DEFAULT_UID, bench.xml)
        seconds: dict[str, list[float]] = {s.name: [] for s in sides}
        for side in sides:  # warm every worker
            _concurrent(side, [bodies.next(1) for _ in range(4 * clients)], clients)
        for r in range(rounds):
            for side in sides if r % 2 == 0 else list(reversed(sides)):
                seconds[side.name] += _concurrent(side, [bodies.next(1) for _ in range(requests)], clients)
    return {"clients": clients, "workers": clients, "single_ms": {n: _ms(s) for n, s in seconds.items()}}


def run_bench_peer(
    version_dir: Path,
    texts: Sequence[str],
    peer: PeerInstall,
    *,
    single_n: int = 40,
    batches: Sequence[int] = (100, 1000),
    repeats: int = 3,
    clients: int = 3,
    concurrent_requests: int = 300,
    concurrent_rounds: int = 2,
    redis_url: str = "redis://127.0.0.1:6379/13",
    settings: Sequence[str] = ("pinned", "unpinned", "concurrent"),
) -> dict[str, Any]:
    peer.check()
    version_dir = Path(version_dir).resolve()
    labels = [str(x) for x in read_manifest(version_dir)["labels"]]
    xml = label_config_xml(labels)
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "precision": configured_precision(),
        "runtime": configured_runtime(),
        "version_dir": str(version_dir),
        "peer": {"example_dir": str(peer.example_dir), "python": str(peer.python)},
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
            bench = _Bench(version_dir, peer, Path(tmp), redis_url, texts, xml)
            for name in ("pinned", "unpinned"):
                if name in settings:
                    logger.info("bench-peer: %s", name)
                    result[name] = _setting(
                        bench, pinned=name == "pinned", single_n=single_n, batches=batches, repeats=repeats
                    )
            if "concurrent" in settings:
                logger.info("bench-peer: %d clients against %d workers each", clients, clients)
                result["concurrent"] = _concurrency(
                    bench, clients=clients, requests=concurrent_requests, rounds=concurrent_rounds
                )
    finally:
        r.flushdb()
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The figures as BENCHMARKS.md shows them: ours, theirs, and ours/theirs in time."""
    rows = ["| | ours | official example | ours / theirs, time |", "|---|---:|---:|---:|"]
    for name in ("pinned", "unpinned"):
        if name not in result:
            continue
        res = result[name]
        single = res["single_ms"]
        o, t = single["ours"], single["official example"]
        rows.append(
            f"| {name}: 1 task p50 / p95 | {o['p50']:.0f} / {o['p95']:.0f} ms | "
            f"{t['p50']:.0f} / {t['p95']:.0f} ms | {o['p50'] / t['p50']:.2f} |"
        )
        for n, rates in res["batch_tasks_per_s"].items():
            o_rate, t_rate = rates["ours"], rates["official example"]
            rows.append(
                f"| {name}: {n} tasks | {o_rate} tasks/s | {t_rate} tasks/s | {t_rate / o_rate:.2f} |"
            )
        mem = res["worker_memory"]
        o_mb, t_mb = mem["ours"].get("rss_mb"), mem["official example"].get("rss_mb")
        if o_mb and t_mb:
            rows.append(f"| {name}: worker memory after the batches | {o_mb:.0f} MB | {t_mb:.0f} MB | |")
    if "concurrent" in result:
        c = result["concurrent"]
        single = c["single_ms"]
        o, t = single["ours"], single["official example"]
        rows.append(
            f"| {c['clients']} clients, {c['workers']} workers each: 1 task p50 / p95 | "
            f"{o['p50']:.0f} / {o['p95']:.0f} ms | {t['p50']:.0f} / {t['p95']:.0f} ms | "
            f"{o['p50'] / t['p50']:.2f} |"
        )
    return "\n".join(rows)
