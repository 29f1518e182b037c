"""What ``POST /predict`` does, without Flask: tasks in, one validated prediction per task out.

:meth:`Annotator.predict` is the whole request path between parsing the body and writing JSON:
read each task's text, ask the project's served ensemble, let the routing policy decide, build
and validate Label Studio predictions, and say which tasks go to review. The Flask route, the
``bench-predict`` benchmark and the tests all call it, so what is measured is what serves.

What happens after the answer (counting, queueing the review job) is :func:`dispatch_review`:
Label Studio waits on the forward pass, not on Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from autoannotator.core.policies import Policy
from autoannotator.labelstudio.config import (
    PredictionValidator,
    ProjectConfig,
    TaskText,
    empty_prediction,
    extract_texts,
    parse_label_config,
    prediction,
)
from autoannotator.labelstudio.fields import AUDIT, AuditedTask, ClearedTask, RoutedTask, audited, in_tab
from autoannotator.learning.audit import ACCEPTED, ROUTED, AuditMark, drawn
from autoannotator.service.routing import Routing
from autoannotator.storage.model_store import WAITING_VERSION, ProjectModels

logger = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def project_config(xml: str) -> tuple[ProjectConfig, PredictionValidator]:
    """Parsing a config (and building its validator) once per distinct config, not once per request."""
    config = parse_label_config(xml)
    return config, PredictionValidator(config)


@dataclass(frozen=True)
class PredictionBatch:
    """The answer to one ``/predict`` and what it hands on.

    ``results`` has one Label Studio prediction per task, in order (an empty one where a task had
    no usable text, or where our own prediction failed validation). ``timings`` holds the seconds
    each step took, ``forward`` being the members' forward passes.
    """

    uid: str
    version: str
    results: list[dict[str, Any]]
    routed: list[RoutedTask] = field(default_factory=list)
    cleared: list[ClearedTask] = field(default_factory=list)
    audited: list[AuditedTask] = field(default_factory=list)  # newly drawn for the audit
    unlabelled: int = 0  # tasks without usable text
    invalid: int = 0  # our predictions that failed validation and went out empty
    timings: Mapping[str, float] = field(default_factory=dict)
    votes: dict[int, str] = field(default_factory=dict)  # votes text per unannotated task id

    @property
    def n(self) -> int:
        return len(self.results)


RoutingFn = Callable[[str, str, int], Routing]
"""(project uid, served version, number of labels) -> the project's routing for that version."""


class Annotator:
    """The request path of one web process: its model store, routing and text limit.

    ``routing`` gives each project's policy and audit share
    (:class:`~autoannotator.service.routing.ProjectRouting`); without it every project is routed by
    ``policy`` and nothing is audited (benchmarks, tests).
    """

    def __init__(
        self, models: ProjectModels, policy: Policy, max_text_chars: int, routing: RoutingFn | None = None
    ) -> None:
        self.models = models
        self.policy = policy
        self.max_text_chars = max_text_chars
        self.routing = routing

    def routing_for(self, uid: str, version: str, labels: int) -> Routing:
        if self.routing is None:
            return Routing(self.policy.name, self.policy, 0.0)
        return self.routing(uid, version, labels)

    def predict(self, project: object, tasks: Sequence[Any], label_config: str) -> PredictionBatch:
        """One prediction per task of ``project`` (Label Studio's ``<id>.<created_at>`` uid, checked);
        ``label_config`` is parsed once per distinct config.

        Raises :class:`~autoannotator.errors.BadInputError` or an unsupported-config error for the
        client's faults; a task without usable text, or one whose prediction we got wrong, gets an
        empty prediction and keeps its place in the batch.
        """
        uid = ProjectModels.check_project(project)
        config, validator = project_config(label_config)
        clock = _Clock()
        texts = extract_texts(tasks, config, max_chars=self.max_text_chars)
        clock.lap("extract")
        for t in texts:
            if not t.ok:
                logger.info("project %s: task %s gets no prediction: %s", uid, t.task_id, t.problem)
        ensemble = self.models.ensemble(uid, config.labels)
        version = ensemble.version if ensemble else WAITING_VERSION
        results = [empty_prediction(version) for _ in tasks]
        good = [i for i, t in enumerate(texts) if t.ok]
        routed: list[RoutedTask] = []
        cleared: list[ClearedTask] = []
        drawn_now: list[AuditedTask] = []
        votes: dict[int, str] = {}
        invalid = 0
        if ensemble is not None and good:
            clock.lap("load")
            probs = ensemble.predict_proba([texts[i].text or "" for i in good])
            clock.lap("forward")
            routing = self.routing_for(uid, version, len(config.labels))
            decision = routing.policy.decide(probs)
            clock.lap("policy")
            member_votes = probs.argmax(axis=2)  # [k, n]
            for j, i in enumerate(good):
                label = config.labels.names[int(decision.labels[j])]
                confidence = float(decision.confidence[j])
                item = prediction(config, label, confidence, version)
                problems = validator.validate(item)
                if problems:  # our fault, not the client's: this task alone goes out empty
                    logger.error(
                        "project %s: task %s: invalid prediction %s", uid, texts[i].task_id, problems
                    )
                    invalid += 1
                    continue
                results[i] = item
                routed_task = _review_item(tasks[i], texts[i], label, confidence, member_votes[:, j], config)
                if routed_task is None:
                    continue
                votes[int(routed_task.task_id)] = routed_task.votes_text
                review = bool(decision.review[j])
                audit = drawn(routed_task.task_id, version, routing.audit_share)
                if audit:
                    mark = AuditMark(version, ROUTED if review else ACCEPTED, label).value
                    if routed_task.data.get(AUDIT) != mark:
                        drawn_now.append(AuditedTask(routed_task, mark))
                if review:
                    routed.append(routed_task)
                elif in_tab(routed_task.data) and not audit and not audited(routed_task.data):
                    cleared.append(ClearedTask(routed_task.task_id, routed_task.data))
            clock.lap("build")
        return PredictionBatch(
            uid,
            version,
            results,
            routed,
            cleared,
            drawn_now,
            len(tasks) - len(good),
            invalid,
            clock.laps,
            votes,
        )


def _review_item(
    task: Mapping[str, Any],
    text: TaskText,
    label: str,
    confidence: float,
    votes_of_members: np.ndarray,
    config: ProjectConfig,
) -> RoutedTask | None:
    """The task as review would see it, or None when a human already labelled it (and so no review
    can add anything)."""
    if _annotated(task) or text.task_id is None:
        return None
    votes = np.bincount(votes_of_members, minlength=len(config.labels))
    return RoutedTask(
        task_id=text.task_id,
        text=text.text or "",
        label=label,
        confidence=round(confidence, 4),
        votes={config.labels.names[c]: int(n) for c, n in enumerate(votes) if n},
        data=dict(task.get("data") or {}),
    )


def _annotated(task: Mapping[str, Any]) -> bool:
    annotations = task.get("annotations")
    if isinstance(annotations, list) and any(
        isinstance(a, dict) and not a.get("was_cancelled") for a in annotations
    ):
        return True
    total = task.get("total_annotations")
    return isinstance(total, int) and total > 0


class _Clock:
    """Seconds per step of one request, for the Server-Timing header and the benchmark."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
