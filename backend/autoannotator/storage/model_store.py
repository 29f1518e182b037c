"""Each project's served ensemble, loaded once per process and swapped when a new version is published.

The pointer to the served version is the registry's ``CURRENT`` file (replaced atomically by the
trainer). Every request reads it — one small file read — and a process whose cached ensemble is
older loads the new one and swaps a single reference, so every web worker follows a promotion
without a restart and without a per-process cache going stale.

A loaded ensemble is hundreds of thousands of Python objects (modules, parameters, tokenizer
tables) that live as long as the version is served. Left to the cyclic garbage collector, each of
its full collections walks them all: 0.4–0.6 s in a web worker holding the MiniLM ensemble, a
request that happens to trigger one waits that long. So after each load the process collects once
and freezes what is left (:func:`settle_heap`, ``gc.freeze``): later collections skip those
objects. Before the next load everything is unfrozen first, so a replaced version's objects, and
anything else that became garbage meanwhile, are reclaimed then.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
from pathlib import Path

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError
from autoannotator.models.ensemble import Ensemble
from autoannotator.storage.registry import Registry

logger = logging.getLogger(__name__)

# Label Studio identifies a project as "<id>.<created_at unix time>"; a recreated project with a
# reused id is therefore a different project with its own models.
PROJECT_UID = re.compile(r"\d+(\.\d+)?")

# What /setup and /predict report while a project has no published specialists yet.
WAITING_VERSION = "waiting-for-seed-labels"


class ProjectModels:
    """Registries under ``root`` (one per project) and the ensembles this process serves from them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._served: dict[str, Ensemble] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check_project(project: object) -> str:
        uid = str(project)
        if not PROJECT_UID.fullmatch(uid):
            raise BadInputError(f"project must be Label Studio's '<id>.<created_at>' uid, got {uid!r:.40}")
        return uid

    def registry(self, project: str) -> Registry:
        return Registry(self.root / f"project-{self.check_project(project)}")

    def current_version(self, project: str) -> str | None:
        return self.registry(project).current()

    def ensemble(self, project: str, labels: LabelSet) -> Ensemble | None:
        """The project's published ensemble, or None while it waits for seed labels."""
        registry = self.registry(project)
        version = registry.current()
        if version is None:
            return None
        served = self._served.get(project)
        if served is not None and served.version == version and served.labels == labels:
            return served
        with self._lock:  # one load per new version, even when several requests see it at once
            served = self._served.get(project)
            if served is None or served.version != version or served.labels != labels:
                logger.info("project %s: loading version %s", project, version)
                gc.unfreeze()  # the version it replaces, if any, can be collected below
                served = registry.load(version, labels, serving=True)
                self._served[project] = served
                settle_heap()
        return served


def settle_heap() -> None:
    """Collect once, then freeze every surviving object out of the collector's later passes.

    Objects still referenced keep being freed by reference counting when dropped; only garbage
    cycles among frozen objects wait for the next ``gc.unfreeze()`` (the next load).
    """
    gc.collect()
    gc.freeze()
