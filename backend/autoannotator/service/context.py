"""What the jobs of one worker process share: settings, Redis state, the model store and caches.

A :class:`Context` is built once per process (:func:`autoannotator.service.jobs.process_context`)
and handed to every job function; nothing below reads the environment or a global.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import policy_from_spec
from autoannotator.errors import LockTimeoutError, NotConfiguredError
from autoannotator.labelstudio.client import connect
from autoannotator.labelstudio.config import ProjectConfig
from autoannotator.learning.pool import VerifiedPool
from autoannotator.models.specialists.compiled import set_runtime
from autoannotator.models.specialists.runtime import configure_precision, configure_torch, threads_per_process
from autoannotator.review.llm import ReviewCache
from autoannotator.service.annotator import Annotator, project_config
from autoannotator.service.routing import ProjectRouting
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from autoannotator.storage.redis_state import ProjectInfo, State

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)


def configure_runtime(settings: Settings) -> int:
    """Size this process's torch/BLAS threads and set its inference precision and runtime from
    ``settings``, before its first forward pass; every serving process (web, worker) calls it once.
    Returns the thread count."""
    threads = threads_per_process(settings.threads, settings.cpu_sharers)
    configure_torch(threads)
    configure_precision(settings.precision)
    set_runtime(
        settings.runtime, weights=settings.openvino_weights, cache_dir=settings.model_dir / "openvino"
    )
    logger.info(
        "forward passes: %d threads, %s precision, %s runtime (OpenVINO weights %s)",
        threads,
        settings.precision,
        settings.runtime,
        settings.openvino_weights,
    )
    return threads


# A holder writes a few bulk field updates (0.2 s per 1,000 tasks each); a dead one frees it then.
TASK_DATA_LOCK_WAIT_S = 60.0


@dataclass(eq=False)
class Context:
    """Settings, state and the model store, plus what this process keeps between jobs: each
    project's verified pool and LLM answer cache, brought up to date with what other workers wrote."""

    settings: Settings
    state: State
    models: ProjectModels
    _pools: dict[str, VerifiedPool] = field(default_factory=dict, repr=False)
    _review_caches: dict[str, ReviewCache] = field(default_factory=dict, repr=False)
    _annotator: Annotator | None = field(default=None, repr=False)
    _routing: ProjectRouting | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        return cls(
            settings,
            State.from_url(settings.redis_url, settings.review_mode),
            ProjectModels(settings.model_dir),
        )

    @property
    def routing(self) -> ProjectRouting:
        """Each project's policy, audit share and calibration, as this process last read them."""
        if self._routing is None:
            self._routing = ProjectRouting(self.state, self.settings)
        return self._routing

    @property
    def annotator(self) -> Annotator:
        """What ``/predict`` runs, with this process's model store: labelling runs predict and route
        with it, so a run and ``/predict`` agree on every task."""
        if self._annotator is None:
            s = self.settings
            self._annotator = Annotator(
                self.models, policy_from_spec(s.policy), s.max_text_chars, routing=self.routing
            )
        return self._annotator

    def audit_path(self, uid: str) -> Path:
        return self.models.registry(uid).root / "audit.jsonl"

    def config(self, info: ProjectInfo) -> ProjectConfig:
        return project_config(info.label_config)[0]

    def info(self, uid: str) -> ProjectInfo:
        info = self.state.info(uid)
        if info is None:
            raise NotConfiguredError(
                f"project {uid} is unknown to this Redis (flushed?); Label Studio's next /setup or "
                "webhook records it again"
            )
        return info

    def label_studio(self, info: ProjectInfo) -> LabelStudio:
        url = self.settings.label_studio_url or info.ls_url
        if not self.settings.label_studio_api_key:
            raise NotConfiguredError(
                "LABEL_STUDIO_API_KEY is not set: the workers need it to write predictions and read "
                "annotations (a legacy token or a personal access token of a project member)"
            )
        if not url:
            raise NotConfiguredError(
                "LABEL_STUDIO_URL is not set and Label Studio sent no hostname to /setup"
            )
        return connect(url, self.settings.label_studio_api_key)

    def pool_path(self, uid: str) -> Path:
        return self.models.registry(uid).root / "pool.jsonl"

    def review_cache(self, uid: str) -> ReviewCache:
        """The project's cache of LLM answers, kept between jobs and brought up to date with what
        other workers appended (a worker that forks per job reads the whole file each time)."""
        path = self.models.registry(uid).root / "llm-cache.jsonl"
        cache = self._review_caches.get(uid)
        if cache is None or cache.path != path:
            cache = self._review_caches[uid] = ReviewCache(path)
        else:
            cache.refresh()
        return cache

    @contextmanager
    def task_data(self, uid: str) -> Iterator[None]:
        """Hold the project's task-data lock while writing ``aa_*`` fields into its tasks.

        Label Studio's bulk field update (the ``add_data_field`` action) is atomic per row on
        PostgreSQL (``jsonb_set``) but, on SQLite, reads the selected tasks' data, sets the field
        in Python and writes every row back: two such writes at once on the same task keep only
        one of them (a labelling run's votes erased the LLM label a review job had just written).
        Every writer of task data in this backend goes through this lock, per project.
        """
        wait = TASK_DATA_LOCK_WAIT_S
        with self.state.lock("taskdata", uid, timeout_s=wait, wait_s=wait) as got:
            if not got:
                raise LockTimeoutError(f"project {uid}: the task-data lock was not free within {wait:.0f}s")
            yield

    @contextmanager
    def pool(self, uid: str, labels: LabelSet) -> Iterator[VerifiedPool]:
        """The project's pool, up to date with its log, held under the project's pool lock.

        A worker keeps each project's pool between jobs and only reads what other workers appended
        since (:meth:`VerifiedPool.refresh`); replaying the whole log for every annotation would cost
        O(pool) per label. After a failure inside the block the kept pool is dropped and the next
        job reads the log again.
        """
        wait = self.settings.pool_lock_timeout_s
        with self.state.lock("pool", uid, timeout_s=wait, wait_s=wait) as got:
            if not got:
                raise LockTimeoutError(f"project {uid}: the pool lock was not free within {wait:.0f}s")
            path = self.pool_path(uid)
            pool = self._pools.get(uid)
            if pool is None or pool.labels != labels or pool.path != path:
                pool = self._pools[uid] = VerifiedPool(labels, path=path)
            else:
                pool.refresh()
            try:
                yield pool
            except BaseException:
                self._pools.pop(uid, None)
                raise
            self.state.put(uid, "pool_size", str(len(pool)))
            self.state.put(uid, "pool_growth", str(pool.growth_since_training()))
