"""Each project's routing: its policy (the environment's or its own), its audit share, and, for a
target policy, the thresholds certified for the version it serves.

A project manager sets ``policy`` and ``audit_share`` per project on ``/projects/<uid>/settings``
(Redis keeps them; without them the environment's ``AUTOANNOTATOR_POLICY`` and
``AUTOANNOTATOR_AUDIT_SHARE`` apply). A ``target:<accuracy>`` policy accepts nothing until a worker
has certified thresholds for the served version on the project's audit labels
(:func:`autoannotator.service.calibration.recalibrate`); a calibration of another version, another
spec or another label set is ignored, so a new version reviews everything until its own
calibration is stored (the training job stores it right after publishing).

Every ``/predict`` asks for its project's routing; a web process reads Redis for it at most once
per :data:`ROUTING_TTL_S` per project, so a change reaches every process within that time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from autoannotator.core.policies import Budget, MeanProbability, Policy, TargetAccuracy, policy_from_spec
from autoannotator.errors import StateUnavailableError
from autoannotator.learning.audit import check_share
from autoannotator.settings import Settings
from autoannotator.storage.redis_state import State

logger = logging.getLogger(__name__)

ROUTING_TTL_S = 2.0


@dataclass(frozen=True)
class Routing:
    """What ``/predict`` routes one project's tasks with."""

    spec: str  # the policy spec in force (the project's or the environment's)
    policy: Policy  # built from it; a target policy carries the served version's thresholds
    audit_share: float
    calibration: dict[str, Any] | None = None  # the stored calibration it used, if any

    @property
    def certified(self) -> bool:
        return isinstance(self.policy, TargetAccuracy) and any(t is not None for t in self.policy.thresholds)


@lru_cache(maxsize=256)
def parsed_policy(spec: str) -> Policy:
    """``policy_from_spec`` once per distinct spec (policies are immutable)."""
    return policy_from_spec(spec)


def is_target(spec: str) -> bool:
    return isinstance(parsed_policy(spec), TargetAccuracy)


def gate_policy(spec: str) -> Policy:
    """The policy the training gate judges a candidate with. A target policy's thresholds belong to
    a calibrated version, and uncalibrated it reviews everything (every candidate would look
    perfect): the gate then compares versions at a fixed 20% reviewed, by their mean probability."""
    policy = parsed_policy(spec)
    return Budget(MeanProbability(0.0), fraction=0.2) if isinstance(policy, TargetAccuracy) else policy


def check_routing(spec: str, audit_share: float) -> tuple[str, float]:
    """Validate a project's choice: a known spec, a share in range, and an audit for a target."""
    spec = spec.strip()
    parsed_policy(spec)  # a ValueError names the accepted specs
    share = check_share(audit_share)
    if is_target(spec) and share <= 0.0:
        raise ValueError(
            f"policy {spec}: a target is certified on audit labels, so it needs an audit share > 0 "
            "(for example 0.05: one predicted task in twenty goes to a person)"
        )
    return spec, share


def calibrated_policy(spec: str, calibration: dict[str, Any] | None, version: str, labels: int) -> Policy:
    """``spec``'s policy; for a target, with the thresholds ``calibration`` certified when it belongs
    to this spec, this version and this many labels, and uncalibrated (review everything) otherwise."""
    policy = parsed_policy(spec)
    if not isinstance(policy, TargetAccuracy) or calibration is None:
        return policy
    thresholds = calibration.get("thresholds")
    if (
        calibration.get("version") != version
        or calibration.get("policy") != spec
        or not isinstance(thresholds, list)
        or len(thresholds) != labels
    ):
        return policy
    return TargetAccuracy(
        policy.target, policy.delta, tuple(None if t is None else float(t) for t in thresholds)
    )


class ProjectRouting:
    """The routing of each project for this process, read from Redis at most every ``ttl_s``."""

    def __init__(self, state: State, settings: Settings, ttl_s: float = ROUTING_TTL_S) -> None:
        self.state = state
        self.settings = settings
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._raw: dict[str, tuple[float, tuple[str | None, str | None, str | None]]] = {}

    def choice(self, uid: str) -> tuple[str, float, dict[str, Any] | None]:
        """The project's spec, audit share and stored calibration (Redis down: the environment's)."""
        now = time.monotonic()
        with self._lock:
            cached = self._raw.get(uid)
        if cached is None or now - cached[0] > self.ttl_s:
            try:
                raw = self.state.routing(uid)
            except StateUnavailableError:
                raw = cached[1] if cached else (None, None, None)
            with self._lock:
                self._raw[uid] = (now, raw)
        else:
            raw = cached[1]
        return self._resolve(uid, *raw)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._raw.pop(uid, None)

    def __call__(self, uid: str, version: str, labels: int) -> Routing:
        spec, share, calibration = self.choice(uid)
        return Routing(spec, calibrated_policy(spec, calibration, version, labels), share, calibration)

    def _resolve(
        self, uid: str, policy: str | None, audit: str | None, calibration: str | None
    ) -> tuple[str, float, dict[str, Any] | None]:
        spec, share = self.settings.policy, self.settings.audit_share
        try:
            if policy is not None or audit is not None:
                spec, share = check_routing(policy or spec, float(audit) if audit is not None else share)
        except ValueError as exc:  # written by an older version of this backend, say
            logger.error("project %s: stored routing ignored: %s", uid, exc)
            spec, share = self.settings.policy, self.settings.audit_share
        stored = None
        if calibration:
            try:
                stored = json.loads(calibration)
            except ValueError:
                logger.error("project %s: stored calibration is not JSON; reviewing until recalibrated", uid)
        return spec, share, stored if isinstance(stored, dict) else None
