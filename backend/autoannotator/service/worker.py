"""``autoannotator worker``: which rq worker class runs which queues."""

from __future__ import annotations

import logging

from rq import SimpleWorker, Worker
from rq.worker import BaseWorker

from autoannotator.errors import AutoAnnotatorError
from autoannotator.service import jobs
from autoannotator.service.context import Context, configure_runtime
from autoannotator.settings import Settings
from autoannotator.storage.redis_state import QUEUES

logger = logging.getLogger(__name__)

ISOLATION = ("auto", "fork", "none")
# How often a worker cleans rq's registries. The cleanup is what requeues the job of a worker that
# was killed (once the job's timeout has passed): every minute, not rq's ten, so a killed label
# worker's chunk is retried soon after its timeout.
MAINTENANCE_INTERVAL_S = 60


def worker_class(queues: list[str], isolate: str = "auto") -> type[BaseWorker]:
    """rq's worker class for ``autoannotator worker`` on ``queues``.

    ``fork`` is rq's default: every job runs in a child process forked for it, so a job's memory
    goes back to the system when it ends and a crash in native code loses that job only — right
    for trainings, which hold gigabytes for minutes. ``none`` runs jobs in the worker's own process:
    its context outlives each job, so each project's verified pool stays in memory and an ingest
    reads only what other workers appended (:meth:`Context.pool`), where a forked job would start
    from an empty context and replay the whole log for every annotation. ``auto``: fork when the
    worker serves the ``train`` queue, else ``none``.
    """
    if isolate not in ISOLATION:
        raise AutoAnnotatorError(f"isolate must be one of {list(ISOLATION)}, got {isolate!r}")
    fork = isolate == "fork" or (isolate == "auto" and "train" in queues)
    return Worker if fork else SimpleWorker


def run_worker(
    settings: Settings,
    queues: list[str],
    isolate: str = "auto",
    *,
    name: str | None = None,
    burst: bool = False,
) -> None:
    """Serve ``queues`` until stopped (or, with ``burst``, until they are empty): the context is
    built once here and every job of this process gets it."""
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise AutoAnnotatorError(f"unknown queues {unknown}; choose from {list(QUEUES)}")
    threads = configure_runtime(settings)
    ctx = Context.from_settings(settings)
    if not ctx.state.ping():
        raise AutoAnnotatorError("Redis does not answer at AUTOANNOTATOR_REDIS_URL; start it or fix the URL")
    jobs.bind_context(ctx)
    cls = worker_class(queues, isolate)
    worker = cls(
        [ctx.state.queue(q) for q in queues],
        connection=ctx.state.redis,
        name=name,
        maintenance_interval=MAINTENANCE_INTERVAL_S,
        # An idle worker blocks on the queues for worker_ttl - 15 s between maintenance checks
        # (rq's default: 405 s); this makes it MAINTENANCE_INTERVAL_S.
        worker_ttl=MAINTENANCE_INTERVAL_S + 15,
    )
    logger.info(
        "worker %s on queues %s (%s), models in %s, %d CPU threads",
        worker.name,
        queues,
        "a forked child per job" if cls is Worker else "jobs in this process",
        settings.model_dir,
        threads,
    )
    worker.work(burst=burst, with_scheduler=False)
