"""What the web workers and the rq workers share through Redis: modes, counters, flags and queues.

Redis holds only what can be lost: a project's review mode (the environment's default comes back),
counters (they restart from zero; Prometheus handles counter resets), "training pending" and
"synced" flags, and the queues. The durable record is Label Studio's database, the model store
(versions, ``CURRENT``) and the pool log beside them; after a flush the first request that sees the
project missing its ``synced`` flag queues a sync that rebuilds the pool from Label Studio.

Keys, all under ``aa:`` (one Redis can serve other software too):

======================================  =======================================================
``aa:p:<uid>:mode``                     review mode chosen for the project (absent: the default)
``aa:p:<uid>:ls_mode``                  the last ``review_mode`` seen in LS's extra params
``aa:p:<uid>:policy``                   routing policy chosen for the project (absent: the default)
``aa:p:<uid>:audit``                    audit share chosen for the project (absent: the default)
``aa:p:<uid>:calibration``              the target policy's thresholds for the served version (JSON)
``aa:p:<uid>:calibration_pending``      set while a calibration job is queued (with TTL)
``aa:p:<uid>:llm_seeds_claim``          set once the LLM-seeded start was queued for the project
``aa:p:<uid>:llm_seeds``                what the LLM-seeded start did (for status pages)
``aa:p:<uid>:seed_tab_claim``           set once the seed tasks were queued to be chosen
``aa:p:<uid>:seed_tab``                 what choosing them did (for status pages)
``aa:p:<uid>:info``                     hash: LS project id, LS URL, label config
``aa:p:<uid>:m``                        hash of counters (see :data:`COUNTERS`)
``aa:p:<uid>:train_pending``            set while a training job is queued or running (with TTL)
``aa:p:<uid>:synced``                   set once the pool was rebuilt from LS after a flush
``aa:p:<uid>:aligned``                  the version LS's ``project.model_version`` points at
``aa:p:<uid>:tab``                      the "Needs review" tab's view id
``aa:p:<uid>:version``                  mirror of the registry's ``CURRENT`` (for status pages)
``aa:p:<uid>:title``                    the project's title in Label Studio (for status pages)
``aa:p:<uid>:run``                      the current labelling run (:mod:`.label_runs`)
``aa:p:<uid>:llm_sent:<version>``       task ids sent to the LLM under that version (once each)
``aa:p:<uid>:writes:<version>``         hash task id -> who writes its prediction of that version
``aa:lock:pool:<uid>``                  one writer of the pool log at a time
``aa:lock:train:<uid>``                 one training per project at a time
``aa:lock:taskdata:<uid>``              one writer of the project's task-data fields at a time
``aa:projects``                         set of every project uid seen
======================================  =======================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from autoannotator.errors import StateUnavailableError
from autoannotator.settings import REVIEW_MODES

logger = logging.getLogger(__name__)

QUEUES = ("ingest", "review", "train", "label")
"""rq queues: ``ingest`` (annotations, syncs), ``review`` (routed tasks: flags or LLM), ``train``,
``label`` (labelling runs: a version's predictions for every unannotated task)."""

COUNTERS = (
    "predictions",
    "invalid_predictions",
    "routed",
    "reviewed_llm",
    "reviewed_human_queue",
    "llm_calls",
    "llm_cache_hits",
    "llm_failures",
    "llm_prompt_tokens",
    "llm_completion_tokens",
    "llm_cost_usd",
    "human_labels",
    "trainings_published",
    "trainings_rejected",
    "trainings_failed",
    "webhooks",
    "labelled_tasks",
    "tab_entered",
    "tab_left",
    "audit_drawn",
    "audit_labels",
)
"""Per-project counters in ``aa:p:<uid>:m``; every one is exported by ``/metrics``."""

FLOAT_COUNTERS = frozenset({"llm_cost_usd"})
"""Counters kept as floats: always added with HINCRBYFLOAT, since HINCRBY refuses a field holding
``0.25`` and that refusal would read as "Redis unavailable" and drop the rest of the request's work."""

# A training job that dies without its finally block (a killed worker) must not block the next
# one forever: the pending flag expires. Longer than any training on a CPU here (minutes).
TRAIN_PENDING_TTL_S = 6 * 3600
# How long the record of which tasks were sent to the LLM under a version is kept.
LLM_SENT_TTL_S = 30 * 24 * 3600
# Who writes which task's prediction of a version (``claim_prediction_writes``) matters only while
# both are in flight; the record is kept a day. Label Studio abandons a /predict after 100 s (its
# ML_TIMEOUT_PREDICT): a /predict claim older than that was not stored and frees the task.
WRITES_TTL_S = 24 * 3600
PREDICT_CLAIM_S = 120.0

# KEYS[1]: the hash; ARGV: owner, now, seconds after which a claim of the *other* owner is stale,
# ttl, then the task ids. Grants (and records) each id that is free, held by the same owner, or
# held by the other owner for longer than the stale time; returns the granted ids.
_CLAIM_WRITES = """
local owner, now, stale = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local granted = {}
for i = 5, #ARGV do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  local ok = not held
  if held then
    local sep = string.find(held, ':', 1, true)
    ok = string.sub(held, 1, sep - 1) == owner or now - tonumber(string.sub(held, sep + 1)) > stale
  end
  if ok then
    redis.call('HSET', KEYS[1], ARGV[i], owner .. ':' .. ARGV[2])
    granted[#granted + 1] = ARGV[i]
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return granted
"""


def _text(raw: bytes | str) -> str:
    """rq needs a bytes client (no ``decode_responses``), so answers are decoded here."""
    return raw.decode() if isinstance(raw, bytes) else raw


def connect(url: str) -> redis.Redis:
    """A client for ``url`` with short timeouts: a web request must never hang on a dead Redis."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


@dataclass(frozen=True)
class ProjectInfo:
    """What the workers need to reach a project in Label Studio, recorded from /setup and webhooks."""

    uid: str
    project_id: int
    ls_url: str
    label_config: str


class State:
    """Typed access to the keys above. Every method may raise :class:`StateUnavailableError`."""

    def __init__(self, client: redis.Redis, default_mode: str) -> None:
        self.redis = client
        self.default_mode = default_mode
        # Sent by its SHA (EVALSHA), the text only when Redis lacks it: /predict claims on every call.
        self._claim_writes = client.register_script(_CLAIM_WRITES)

    @classmethod
    def from_url(cls, url: str, default_mode: str) -> State:
        return cls(connect(url), default_mode)

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Redis errors inside the block become :class:`StateUnavailableError` naming the server
        (never its password); for every reader and writer of these keys (:mod:`.label_runs` too)."""
        try:
            yield
        except RedisError as exc:
            kwargs = self.redis.connection_pool.connection_kwargs
            where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
            raise StateUnavailableError(f"Redis at {where} is unavailable: {type(exc).__name__}") from exc

    @staticmethod
    def _k(uid: str, name: str) -> str:
        return f"aa:p:{uid}:{name}"

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except RedisError:
            return False

    def queue(self, name: str) -> Queue:
        if name not in QUEUES:
            raise ValueError(f"unknown queue {name!r}; the queues are {QUEUES}")
        return Queue(name, connection=self.redis)

    def enqueue(self, name: str, func: str, *args: Any, **options: Any) -> Job:
        """``Queue(name).enqueue(func, *args, **options)``, ``func`` named by its dotted path (the web
        process need not import the job's code to queue it); a Redis error is a :class:`StateUnavailableError`
        like everywhere else (a raw one would reach the web client as a 500)."""
        with self.guard():
            return self.queue(name).enqueue(func, *args, **options)

    def queue_depths(self) -> dict[str, int]:
        with self.guard():
            return {name: self.queue(name).count for name in QUEUES}

    def jobs_in_flight(self) -> int:
        """Jobs queued or running on every queue: 0 when the workers have nothing left to do (until
        a new request or a job enqueues more; callers that wait for quiet check a few times)."""
        with self.guard():
            return sum(
                self.queue(name).count + StartedJobRegistry(name, connection=self.redis).count
                for name in QUEUES
            )

    # ------------------------------------------------------------------ projects

    def remember(self, info: ProjectInfo) -> None:
        with self.guard():
            pipe = self.redis.pipeline()
            pipe.sadd("aa:projects", info.uid)
            # Webhooks carry no LS URL: an empty field never overwrites one /setup recorded.
            fields: dict[str, str | int] = {
                "project_id": info.project_id,
                "ls_url": info.ls_url,
                "label_config": info.label_config,
            }
            pipe.hset(self._k(info.uid, "info"), mapping={k: v for k, v in fields.items() if v != ""})
            pipe.execute()

    def info(self, uid: str) -> ProjectInfo | None:
        with self.guard():
            raw = self.redis.hgetall(self._k(uid, "info"))
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        return ProjectInfo(uid, int(data["project_id"]), data.get("ls_url", ""), data.get("label_config", ""))

    def projects(self) -> list[str]:
        with self.guard():
            return sorted(_text(m) for m in self.redis.smembers("aa:projects"))

    # ------------------------------------------------------------------ review mode

    def mode(self, uid: str) -> str:
        with self.guard():
            raw = self.redis.get(self._k(uid, "mode"))
        mode = _text(raw) if raw else self.default_mode
        return mode if mode in REVIEW_MODES else self.default_mode

    def set_mode(self, uid: str, mode: str) -> None:
        if mode not in REVIEW_MODES:
            raise ValueError(f"review mode must be one of {REVIEW_MODES}, got {mode!r:.40}")
        with self.guard():
            self.redis.set(self._k(uid, "mode"), mode)
            self.redis.sadd("aa:projects", uid)
        logger.info("project %s: review mode is now %s", uid, mode)

    def mode_from_label_studio(self, uid: str, extra_params: Any) -> str | None:
        """Apply ``extra_params["review_mode"]`` when it *changed* since LS last sent it.

        LS sends the same extra params with every /setup (the UI polls it), so applying them every
        time would undo a switch made on our settings page a second later; the latest change wins,
        wherever it was made. Returns the mode applied, or None.
        """
        if not isinstance(extra_params, dict) or "review_mode" not in extra_params:
            return None
        wanted = str(extra_params["review_mode"]).strip().lower()
        if wanted not in REVIEW_MODES:
            raise ValueError(f"extra_params review_mode must be one of {REVIEW_MODES}, got {wanted!r:.40}")
        with self.guard():
            previous = self.redis.getset(self._k(uid, "ls_mode"), wanted)
        if previous is not None and _text(previous) == wanted:
            return None
        self.set_mode(uid, wanted)
        return wanted

    # ------------------------------------------------------------------ routing policy and audit

    def routing(self, uid: str) -> tuple[str | None, str | None, str | None]:
        """The project's own policy spec, audit share and calibration (JSON), each None where unset:
        one round trip, on the path of every prediction."""
        with self.guard():
            raw = self.redis.mget([self._k(uid, n) for n in ("policy", "audit", "calibration")])
        policy, audit, calibration = (None if r is None else _text(r) for r in raw)
        return policy, audit, calibration

    def set_routing(self, uid: str, policy: str | None, audit_share: float | None) -> None:
        """Choose the project's policy spec and audit share (None: back to the environment's)."""
        with self.guard():
            pipe = self.redis.pipeline()
            for name, value in (("policy", policy), ("audit", audit_share)):
                if value is None:
                    pipe.delete(self._k(uid, name))
                else:
                    pipe.set(self._k(uid, name), str(value))
            pipe.sadd("aa:projects", uid)
            pipe.execute()
        logger.info("project %s: policy %s, audit share %s", uid, policy or "default", audit_share)

    def claim_calibration(self, uid: str) -> bool:
        """True for the one caller that may queue a calibration now (one waits in the queue at most)."""
        with self.guard():
            return bool(
                self.redis.set(self._k(uid, "calibration_pending"), "1", nx=True, ex=TRAIN_PENDING_TTL_S)
            )

    def claim_llm_seeds(self, uid: str) -> bool:
        """True once for a project (until :meth:`release_llm_seeds`): whoever gets it queues the
        LLM-seeded start."""
        with self.guard():
            return bool(self.redis.set(self._k(uid, "llm_seeds_claim"), "1", nx=True))

    def release_llm_seeds(self, uid: str) -> None:
        with self.guard():
            self.redis.delete(self._k(uid, "llm_seeds_claim"))

    def claim_seed_tab(self, uid: str) -> bool:
        """True once for a project (until :meth:`release_seed_tab`): whoever gets it queues the
        choice of its seed tasks."""
        with self.guard():
            return bool(self.redis.set(self._k(uid, "seed_tab_claim"), "1", nx=True))

    def release_seed_tab(self, uid: str) -> None:
        with self.guard():
            self.redis.delete(self._k(uid, "seed_tab_claim"))

    def release_calibration(self, uid: str) -> None:
        with self.guard():
            self.redis.delete(self._k(uid, "calibration_pending"))

    def set_calibration(self, uid: str, calibration: str | None) -> None:
        with self.guard():
            if calibration is None:
                self.redis.delete(self._k(uid, "calibration"))
            else:
                self.redis.set(self._k(uid, "calibration"), calibration)

    # ------------------------------------------------------------------ counters

    def count(self, uid: str, **deltas: float) -> None:
        unknown = set(deltas) - set(COUNTERS)
        if unknown:
            raise ValueError(f"unknown counters {sorted(unknown)}")
        with self.guard():
            pipe = self.redis.pipeline()
            for name, value in deltas.items():
                if value:
                    if isinstance(value, int) and name not in FLOAT_COUNTERS:
                        pipe.hincrby(self._k(uid, "m"), name, value)
                    else:
                        pipe.hincrbyfloat(self._k(uid, "m"), name, value)
            pipe.execute()

    def count_predictions(self, uid: str, predictions: int, routed: int, invalid: int = 0) -> str:
        """Count a /predict's predictions and routed tasks and read the project's review mode, in one
        round trip: this is on the path of every prediction, and a single task's forward pass takes
        only tens of milliseconds."""
        with self.guard():
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self._k(uid, "mode"))
            if predictions:
                pipe.hincrby(self._k(uid, "m"), "predictions", predictions)
            if routed:
                pipe.hincrby(self._k(uid, "m"), "routed", routed)
            if invalid:
                pipe.hincrby(self._k(uid, "m"), "invalid_predictions", invalid)
            raw = pipe.execute()[0]
        mode = _text(raw) if raw else self.default_mode
        return mode if mode in REVIEW_MODES else self.default_mode

    def counters(self, uid: str) -> dict[str, float]:
        with self.guard():
            raw = self.redis.hgetall(self._k(uid, "m"))
        values = {_text(k): float(v) for k, v in raw.items()}
        return {name: values.get(name, 0.0) for name in COUNTERS}

    # ------------------------------------------------------------------ flags

    def claim_training(self, uid: str) -> bool:
        """True for the one caller that may queue a training now; False while one is pending."""
        with self.guard():
            return bool(self.redis.set(self._k(uid, "train_pending"), "1", nx=True, ex=TRAIN_PENDING_TTL_S))

    def release_training(self, uid: str) -> None:
        with self.guard():
            self.redis.delete(self._k(uid, "train_pending"))

    def training_pending(self, uid: str) -> bool:
        with self.guard():
            return bool(self.redis.exists(self._k(uid, "train_pending")))

    def claim_sync(self, uid: str) -> bool:
        """True once per Redis lifetime (or after :meth:`forget_sync`): whoever gets it queues a sync."""
        with self.guard():
            return bool(self.redis.set(self._k(uid, "synced"), "queued", nx=True))

    def forget_sync(self, uid: str) -> None:
        with self.guard():
            self.redis.delete(self._k(uid, "synced"))

    def claim_llm_reviews(self, uid: str, version: str, task_ids: list[int]) -> set[int]:
        """Those of ``task_ids`` not yet sent to the LLM under ``version`` (now marked as sent): a
        task that ``/predict`` and a labelling run both route is reviewed once per version."""
        if not task_ids:
            return set()
        key = self._k(uid, f"llm_sent:{version}")
        with self.guard():
            pipe = self.redis.pipeline()
            for task_id in task_ids:
                pipe.sadd(key, task_id)
            pipe.expire(key, LLM_SENT_TTL_S)
            added = pipe.execute()[:-1]
        return {task_id for task_id, new in zip(task_ids, added, strict=True) if new}

    def claim_prediction_writes(
        self,
        uid: str,
        version: str,
        task_ids: Sequence[int],
        owner: str,
        *,
        run_stale_s: float,
        now: float | None = None,
    ) -> set[int]:
        """Those of ``task_ids`` whose ``version`` prediction ``owner`` may write (now recorded as its).

        Two writers can store a prediction of the same version on the same task: a labelling run
        (``owner="run"``) and Label Studio itself, with what ``/predict`` answered
        (``owner="predict"``), when someone presses *Retrieve Predictions* or opens a task while a
        run is writing. Label Studio only asks ``/predict`` for tasks without a prediction of the
        current version, but the run's read, its write and LS's request overlap. So each writer
        claims its tasks first and the first claim wins: a run skips a task ``/predict`` answered
        (LS stores that answer), and ``/predict`` answers nothing for a task the run will write.
        An owner may claim again what it holds (a retried chunk, a second ``/predict`` of a task);
        a claim of the other owner frees the task once stale: ``PREDICT_CLAIM_S`` for ``/predict``
        (LS gave up on it), ``run_stale_s`` for a run (its chunk died and was not retried).
        ``now`` (seconds since the epoch) is the writers' shared clock; the tests set it.
        """
        if not task_ids:
            return set()
        if owner not in ("run", "predict"):
            raise ValueError(f"owner must be 'run' or 'predict', not {owner!r}")
        stale = PREDICT_CLAIM_S if owner == "run" else run_stale_s
        key = self._k(uid, f"writes:{version}")
        with self.guard():
            at = f"{time.time() if now is None else now:.3f}"
            args: list[str | float] = [owner, at, stale, WRITES_TTL_S, *map(int, task_ids)]
            granted = self._claim_writes(keys=[key], args=args)
        return {int(i) for i in granted}

    def get(self, uid: str, name: str) -> str | None:
        with self.guard():
            raw = self.redis.get(self._k(uid, name))
        return _text(raw) if raw is not None else None

    def put(self, uid: str, name: str, value: str) -> None:
        with self.guard():
            self.redis.set(self._k(uid, name), value)

    @contextmanager
    def lock(
        self,
        kind: str,
        uid: str,
        timeout_s: float,
        wait_s: float | None,
        *,
        keep_alive: tuple[str, ...] | None = None,
    ) -> Iterator[bool]:
        """A Redis lock ``aa:lock:<kind>:<uid>``; yields whether it was acquired within ``wait_s``.

        ``timeout_s`` frees a lock whose holder died. With ``keep_alive`` (a tuple, maybe empty),
        a heartbeat thread renews the lock every third of ``timeout_s`` while the block runs, and
        gives the project keys named in the tuple the same time to live: a long job holds a short
        lock, and a job killed mid-way (no ``finally`` runs) frees it within ``timeout_s``.
        """
        with self.guard():
            # thread_local=False: the heartbeat thread renews the token the acquiring thread holds.
            lock = self.redis.lock(
                f"aa:lock:{kind}:{uid}", timeout=timeout_s, blocking_timeout=wait_s, thread_local=False
            )
            acquired = lock.acquire(blocking=wait_s is None or wait_s > 0)
        stop = threading.Event()
        if acquired and keep_alive is not None:
            keys = [self._k(uid, name) for name in keep_alive]

            def beat() -> None:
                while not stop.wait(timeout_s / 3):
                    try:
                        lock.reacquire()
                        for key in keys:
                            self.redis.expire(key, int(timeout_s))
                    except RedisError as exc:
                        logger.warning("lock %s:%s heartbeat failed: %s", kind, uid, exc)

            threading.Thread(target=beat, name=f"heartbeat-{kind}-{uid}", daemon=True).start()
        try:
            yield acquired
        finally:
            stop.set()
            if acquired:
                try:
                    lock.release()
                except RedisError as exc:  # expired or Redis gone: the next holder is safe either way
                    logger.warning("lock %s:%s was not released cleanly: %s", kind, uid, exc)
