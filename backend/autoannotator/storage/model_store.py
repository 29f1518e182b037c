"""Each project's served ensemble, loaded once per process and swapped when a new version is published.

The pointer to the served version is the registry's ``CURRENT`` file (replaced atomically by the
trainer). Every request reads it — one small file read — and a process whose cached ensemble is
older loads the new one and swaps a single reference, so every web worker follows a promotion
without a restart and without a per-process cache going stale.
"""

from __future__ import annotations

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
                served = registry.load(version, labels, serving=True)
                self._served[project] = served
        return served
