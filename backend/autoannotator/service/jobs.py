"""The rq jobs, as a worker runs them: each entry point hands this process's context on.

The web process only parses and enqueues (Label Studio waits on ``/webhook`` inside the annotator's
request, 1 s at most); everything slow runs in ``autoannotator worker`` processes that may live on
other machines and share one Redis and one model store. Jobs are queued by
:mod:`autoannotator.service.queueing` under these functions' dotted names; their arguments are
ids and plain values, and each one is idempotent.

- :func:`ingest_annotation`, :func:`sync_project`: verified labels in (:mod:`.ingest`);
- :func:`review_routed`: the tasks a ``/predict`` routed to review or drew for the audit (:mod:`.review`);
- :func:`seed_with_llm`: the LLM labels a new project's seed tasks (:mod:`.llm_seeds`);
- :func:`mark_seed_tasks`: a new project's seed tasks, for people, in a "Seed" tab (:mod:`.seed_tab`);
- :func:`calibrate_project`: a target policy's thresholds for the served version (:mod:`.calibration`);
- :func:`train_project`: a project's first version or its next (:mod:`.training`);
- :func:`plan_labelling`, :func:`label_chunk`: a labelling run of the whole project (:mod:`.labelling`).

A worker builds its :class:`Context` once, from the environment, on its first job
(:func:`process_context`), and keeps it: the verified pools and LLM answer caches in it are what
make a worker's hundredth ingest as cheap as its first. ``autoannotator worker`` and tests that run
an rq worker in their own process hand theirs in with :func:`bind_context`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autoannotator.labelstudio.fields import AuditedTask, ClearedTask, RoutedTask
from autoannotator.service import calibration, ingest, labelling, llm_seeds, review, seed_tab, training
from autoannotator.service.context import Context
from autoannotator.settings import Settings

_context: Context | None = None


def process_context() -> Context:
    """This worker process's context: the one bound, or one built from the environment once."""
    global _context
    if _context is None:
        _context = Context.from_settings(Settings.from_env())
    return _context


def bind_context(ctx: Context | None) -> None:
    """Make ``ctx`` the context of the jobs this process runs (None: build it from the environment
    again on the next job)."""
    global _context
    _context = ctx


def ingest_annotation(uid: str, task: dict[str, Any], annotation: dict[str, Any]) -> str:
    return ingest.ingest_annotation(process_context(), uid, task, annotation)


def sync_project(uid: str) -> str:
    return ingest.sync_project(process_context(), uid)


def review_routed(
    uid: str,
    version: str,
    mode: str,
    routed: Sequence[RoutedTask],
    cleared: Sequence[ClearedTask],
    audited: Sequence[AuditedTask] = (),
) -> str:
    return review.review_routed(process_context(), uid, version, mode, routed, cleared, audited)


def seed_with_llm(uid: str) -> str:
    return llm_seeds.seed_with_llm(process_context(), uid)


def mark_seed_tasks(uid: str) -> str:
    return seed_tab.mark_seed_tasks(process_context(), uid)


def calibrate_project(uid: str) -> str:
    return calibration.recalibrate(process_context(), uid)


def train_project(uid: str, force: bool = False) -> str:
    return training.train_project(process_context(), uid, force)


def plan_labelling(uid: str, run_id: str) -> str:
    return labelling.plan_run(process_context(), uid, run_id)


def label_chunk(uid: str, run_id: str, number: int, ids: list[int]) -> str:
    return labelling.label_chunk(process_context(), uid, run_id, number, ids)
