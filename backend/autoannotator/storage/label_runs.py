"""The record of a project's labelling run in Redis: which run is current, and how far it got.

A labelling run predicts every task of a project that no person annotated with one model version
and writes the predictions to Label Studio, in chunks that rq workers share (see
:mod:`autoannotator.service.labelling`). One run per project is current; starting another
replaces it, and the older run's chunks find they are no longer current and stop. Label Studio
is the durable record (a task that carries the version's prediction is done); this record is the
progress that ``/status``, ``/metrics`` and the CLI show, and the planner's cursor, so that a
restarted planner pages on from where it was.

Keys, under ``aa:p:<uid>:``: ``run`` (a hash, the fields of :class:`LabelRun`) and
``run:<id>:chunks`` (the set of chunk numbers finished, so a retried chunk counts once).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from autoannotator.storage.redis_state import State

# A finished run's chunk set is kept this long (for a retried chunk to find itself counted).
CHUNKS_TTL_S = 7 * 24 * 3600

STATES = ("planning", "running", "paused", "done", "cancelled")

# Counts a finished chunk adds to its run.
CHUNK_COUNTS = (
    *("done", "written", "skipped", "routed", "moved_in", "moved_out", "llm_queued", "audit_drawn"),
    # milliseconds spent reading tasks, predicting (the members' forward passes among it), writing
    # predictions and moving the tab, summed over the run's chunks
    *("read_ms", "predict_ms", "forward_ms", "write_ms", "tab_ms"),
)

# Start a run only if none of this version is current; atomic, since /setup is polled by every open
# Label Studio page and two polls may arrive together. KEYS[1] the run hash; ARGV: version, then the
# new run's fields as name/value pairs. Returns 1 if started.
_START_IF_NEW = """
local current = redis.call('HGET', KEYS[1], 'version')
if current == ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True)
class LabelRun:
    """One labelling run of a project, as recorded."""

    id: str
    version: str
    reason: str
    state: str = "planning"
    full: bool = False  # route tasks that already carry the version's prediction again
    started_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0
    planned: bool = False  # every chunk is queued
    cursor: int = 0  # the last task id the planner queued
    total: int = 0  # tasks in queued chunks
    chunks: int = 0
    chunks_done: int = 0
    done: int = 0  # tasks of finished chunks (written, skipped or routed)
    written: int = 0  # predictions stored in Label Studio
    skipped: int = 0  # tasks that already carried the version's prediction, deleted or without text
    routed: int = 0  # tasks the served policy routed to review
    moved_in: int = 0  # tasks that entered the Needs review tab
    moved_out: int = 0  # tasks that left it
    llm_queued: int = 0  # routed tasks handed to the LLM review job
    audit_drawn: int = 0  # tasks drawn for the audit (into the tab, marked)
    read_ms: int = 0  # time in the chunks, summed: reading tasks from Label Studio,
    predict_ms: int = 0  # predicting and routing (the Annotator),
    forward_ms: int = 0  # of which the members' forward passes,
    write_ms: int = 0  # importing the predictions,
    tab_ms: int = 0  # and moving the Needs review tab
    note: str = ""  # why it is paused, or what failed

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled")

    @property
    def tasks_per_s(self) -> float:
        end = self.finished_at or self.updated_at
        elapsed = end - self.started_at
        return self.done / elapsed if elapsed > 0 and self.done else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None until the planner knows the total and a rate."""
        if self.finished:
            return 0.0
        rate = self.tasks_per_s
        if not self.planned or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tasks_per_s"] = round(self.tasks_per_s, 2)
        eta = self.eta_s
        out["eta_s"] = None if eta is None else round(eta, 1)
        return out


_INTS = {f.name for f in fields(LabelRun) if f.type == "int"}
_FLOATS = {f.name for f in fields(LabelRun) if f.type == "float"}
_BOOLS = {f.name for f in fields(LabelRun) if f.type == "bool"}


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _parse(raw: Mapping[Any, Any]) -> LabelRun | None:
    data = {_decode(k): _decode(v) for k, v in raw.items()}
    if "id" not in data:
        return None
    values: dict[str, Any] = {}
    for f in fields(LabelRun):
        if f.name not in data:
            continue
        text = data[f.name]
        if f.name in _INTS:
            values[f.name] = int(float(text or 0))
        elif f.name in _FLOATS:
            values[f.name] = float(text or 0)
        elif f.name in _BOOLS:
            values[f.name] = text == "1"
        else:
            values[f.name] = text
    return LabelRun(**values)


class LabelRuns:
    """Typed access to the run keys; every method may raise ``StateUnavailableError``."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.redis = state.redis

    def _key(self, uid: str) -> str:
        return f"aa:p:{uid}:run"

    def _chunks_key(self, uid: str, run_id: str) -> str:
        return f"aa:p:{uid}:run:{run_id}:chunks"

    def start(
        self, uid: str, version: str, reason: str, *, full: bool = False, only_if_new: bool = False
    ) -> LabelRun | None:
        """Make a new run of ``version`` current (the older one's chunks then stop); with
        ``only_if_new``, only when no run of ``version`` is recorded (None otherwise)."""
        now = time.time()
        run = LabelRun(uuid.uuid4().hex[:12], version, reason, full=full, started_at=now, updated_at=now)
        mapping: dict[Any, Any] = {
            "id": run.id,
            "version": version,
            "reason": reason,
            "state": run.state,
            "full": "1" if full else "0",
            "started_at": f"{now:.3f}",
            "updated_at": f"{now:.3f}",
        }
        with self.state.guard():
            if only_if_new:
                args = [version, *(x for kv in mapping.items() for x in kv)]
                if not self.redis.eval(_START_IF_NEW, 1, self._key(uid), *args):
                    return None
            else:
                pipe = self.redis.pipeline()
                pipe.delete(self._key(uid))
                pipe.hset(self._key(uid), mapping=mapping)
                pipe.execute()
        return run

    def current(self, uid: str) -> LabelRun | None:
        with self.state.guard():
            return _parse(self.redis.hgetall(self._key(uid)))

    def is_current(self, uid: str, run_id: str) -> bool:
        with self.state.guard():
            raw = self.redis.hget(self._key(uid), "id")
        return raw is not None and _decode(raw) == run_id

    def add_chunk(self, uid: str, run_id: str, n_tasks: int, cursor: int | None = None) -> int | None:
        """Count a chunk of ``n_tasks`` as queued; its number, or None if ``run_id`` is not current."""
        if not self.is_current(uid, run_id):
            return None
        with self.state.guard():
            pipe = self.redis.pipeline()
            pipe.hincrby(self._key(uid), "chunks", 1)
            pipe.hincrby(self._key(uid), "total", n_tasks)
            if cursor is not None:
                pipe.hset(self._key(uid), "cursor", cursor)
            pipe.hset(self._key(uid), mapping={"updated_at": f"{time.time():.3f}"})
            number = int(pipe.execute()[0])
        return number

    def save_cursor(self, uid: str, run_id: str, cursor: int) -> bool:
        """Record that the planner paged past ``cursor`` without queueing a chunk (every task of the
        page already carried the version); False if ``run_id`` is not current."""
        if not self.is_current(uid, run_id):
            return False
        with self.state.guard():
            self.redis.hset(self._key(uid), mapping={"cursor": cursor, "updated_at": f"{time.time():.3f}"})
        return True

    def set_state(self, uid: str, run_id: str, state: str, note: str = "", **extra: Any) -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        if not self.is_current(uid, run_id):
            return
        mapping: dict[Any, Any] = {"state": state, "note": note, "updated_at": f"{time.time():.3f}"}
        mapping.update({k: ("1" if v is True else "0" if v is False else str(v)) for k, v in extra.items()})
        with self.state.guard():
            self.redis.hset(self._key(uid), mapping=mapping)

    def chunk_done(self, uid: str, run_id: str, number: int, **counts: int) -> LabelRun | None:
        """Add a finished chunk's counts once (a retried chunk counts once); the run as it stands
        after, or None if ``run_id`` is no longer current."""
        unknown = set(counts) - set(CHUNK_COUNTS)
        if unknown:
            raise ValueError(f"unknown run counts {sorted(unknown)}")
        if not self.is_current(uid, run_id):
            return None
        with self.state.guard():
            chunks = self._chunks_key(uid, run_id)
            if self.redis.sadd(chunks, number):
                pipe = self.redis.pipeline()
                pipe.expire(chunks, CHUNKS_TTL_S)
                pipe.hincrby(self._key(uid), "chunks_done", 1)
                for name, value in counts.items():
                    if value:
                        pipe.hincrby(self._key(uid), name, value)
                pipe.hset(self._key(uid), mapping={"updated_at": f"{time.time():.3f}"})
                pipe.execute()
        return self.current(uid)

    def finish(self, uid: str, run_id: str) -> bool:
        """Mark the run done; True for the one caller that did (the last chunk and the planner may
        both see it complete)."""
        if not self.is_current(uid, run_id):
            return False
        with self.state.guard():
            if not self.redis.hsetnx(self._key(uid), "finished_at", f"{time.time():.3f}"):
                return False
            self.redis.hset(self._key(uid), mapping={"state": "done", "updated_at": f"{time.time():.3f}"})
        return True

    def cancel(self, uid: str, why: str) -> None:
        """Stop the current run (its chunks find it cancelled and return)."""
        run = self.current(uid)
        if run is not None and not run.finished:
            self.set_state(uid, run.id, "cancelled", why)
            with self.state.guard():
                self.redis.hsetnx(self._key(uid), "finished_at", f"{time.time():.3f}")
