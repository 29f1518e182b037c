"""A target policy's thresholds, certified for the served version on the project's audit labels.

:func:`recalibrate` runs in a worker: the served version predicts the text of every audit label and
calibration seed (no version trained on them, see :mod:`autoannotator.learning.audit`), and
:meth:`~autoannotator.core.policies.TargetAccuracy.calibrated` certifies one threshold per label.
The result goes to Redis, where every web process's routing reads it
(:mod:`autoannotator.service.routing`), and to ``calibration.json`` beside the versions, from which
a flushed Redis is refilled. It runs after every audit label, after every published version, and
when a project manager chooses a target; one job per project is queued at a time.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from autoannotator.core.policies import TargetAccuracy
from autoannotator.learning.audit import AuditLog
from autoannotator.service.context import Context
from autoannotator.service.routing import parsed_policy

logger = logging.getLogger(__name__)


def recalibrate(ctx: Context, uid: str) -> str:
    """Certify the project's target thresholds for its served version and store them; a project
    without a target policy has its stored calibration removed."""
    ctx.state.release_calibration(uid)
    ctx.routing.forget(uid)
    spec, _, _ = ctx.routing.choice(uid)
    policy = parsed_policy(spec)
    path = ctx.models.registry(uid).root / "calibration.json"
    if not isinstance(policy, TargetAccuracy):
        ctx.state.set_calibration(uid, None)
        path.unlink(missing_ok=True)
        return f"policy {spec}: nothing to calibrate"
    info = ctx.info(uid)
    labels = ctx.config(info).labels
    ensemble = ctx.models.ensemble(uid, labels)
    if ensemble is None:
        return "no version serves yet"
    records = [r for r in AuditLog(ctx.audit_path(uid)).records() if r.gold in labels]
    if records:
        probs = ensemble.predict_proba([r.text for r in records])
        gold = np.array([labels.index(r.gold) for r in records])
        calibrated, certificates = policy.calibrated(probs, gold)
        thresholds = list(calibrated.thresholds)
    else:
        certificates = []
        thresholds = [None] * len(labels)
    needed = [c.needed for c in certificates]
    stored: dict[str, Any] = {
        "version": ensemble.version,
        "policy": spec,
        "labels": list(labels.names),
        "thresholds": thresholds,
        "calibration": len(records),
        "seeds": sum(r.is_seed for r in records),
        "certificates": [
            {
                "label": name,
                "threshold": c.threshold,
                "items": c.calibration,
                "accepted": c.accepted,
                "correct": c.correct,
                "lower_bound": None if c.lower_bound is None else round(c.lower_bound, 4),
                "needed": c.needed,
            }
            for name, c in zip(labels.names, certificates, strict=False)  # none without records
        ],
        # The fewest more audit labels that could certify a label not yet certified: None when no
        # uncertified label is accurate enough for more labels to help.
        "needed": _fewest_needed(needed) if records else None,
        "at": round(time.time(), 3),
    }
    text = json.dumps(stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    ctx.state.set_calibration(uid, text)
    ctx.routing.forget(uid)
    certified = [c["label"] for c in stored["certificates"] if c["threshold"] is not None]
    on = calibration_labels(len(records), stored["seeds"])
    logger.info(
        "project %s: %s calibrated on %s for %s: certified %s",
        uid,
        spec,
        on,
        ensemble.version,
        certified or "nothing yet",
    )
    return f"{spec} for {ensemble.version} on {on}: certified {certified or 'nothing'}"


def calibration_labels(total: int, seeds: int) -> str:
    """``"120 audit labels"``, or ``"100 audit labels and 20 calibration seeds"``."""
    if not seeds:
        return f"{total} audit labels"
    return f"{total - seeds} audit labels and {seeds} calibration seeds"


def _fewest_needed(needed: list[int | None]) -> int | None:
    """The smallest positive estimate among labels not yet certified (0 when all are)."""
    if all(n == 0 for n in needed):
        return 0
    open_ = [n for n in needed if n]
    return min(open_) if open_ else None


def stored_calibration(ctx: Context, uid: str) -> dict[str, Any] | None:
    """The calibration Redis holds, or the one in the model store (after a flush)."""
    _, _, stored = ctx.routing.choice(uid)
    if stored is not None:
        return stored
    path = ctx.models.registry(uid).root / "calibration.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
