"""What Label Studio's calls and webhooks become: projects remembered, jobs queued — nothing slow.

Flask-free, like :mod:`.annotator`: the routes in :mod:`.app` parse the body and call these.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from autoannotator.errors import BadInputError, StateUnavailableError
from autoannotator.service.annotator import project_config
from autoannotator.service.context import Context
from autoannotator.service.queueing import (
    enqueue_annotation,
    request_first_version,
    request_labelling,
    request_llm_seeds,
    request_seed_tab,
    request_sync,
    request_training,
)
from autoannotator.storage.model_store import WAITING_VERSION, ProjectModels
from autoannotator.storage.redis_state import ProjectInfo

logger = logging.getLogger(__name__)

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})


def remember(ctx: Context, uid: str, ls_url: str, label_config: str) -> None:
    """Record what the workers need to reach the project; queue a pool rebuild after a flush."""
    ctx.state.remember(ProjectInfo(uid, int(uid.split(".")[0]), ls_url, label_config))
    request_sync(ctx, uid)


def setup(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /setup``: the project's served version; its review mode from LS's extra params; the
    first training queued when specialists are configured (with a back-off after a failure)."""
    uid = ProjectModels.check_project(body.get("project"))
    schema = required(body, "schema")
    project_config(schema)
    version = ctx.models.current_version(uid)
    try:
        remember(ctx, uid, str(body.get("hostname") or ""), schema)
        applied = ctx.state.mode_from_label_studio(uid, extra_params(body.get("extra_params")))
        if applied:
            logger.info("project %s: review mode %s from Label Studio's extra params", uid, applied)
        if version is None and ctx.settings.specialists:
            request_first_version(ctx, uid, reason="configured specialists")
        elif version is None:  # each asks for itself only where its setting and the mode call for it
            request_llm_seeds(ctx, uid, "project connected")
            request_seed_tab(ctx, uid, "project connected")
        elif version is not None:
            # A project connected to a backend that already has its version (or whose run record a
            # Redis flush lost): its tasks get that version's predictions. Once per version.
            request_labelling(ctx, uid, f"project connected with {version}", only_if_new=True)
    except StateUnavailableError as exc:
        logger.warning("/setup for %s without Redis: %s", uid, exc)
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc
    return {"model_version": version or WAITING_VERSION}


def webhook(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /webhook``: annotations become ingest jobs, deletions a sync, START_TRAINING a
    training. Raises :class:`StateUnavailableError` when nothing can be queued."""
    action = str(body.get("action") or "")
    project = body.get("project")
    if not isinstance(project, dict):
        return {"status": "ignored", "reason": "no project in the payload"}
    uid = uid_from_project(project)
    label_config = project.get("label_config")
    if isinstance(label_config, str) and label_config.strip():
        remember(ctx, uid, "", label_config)
    ctx.state.count(uid, webhooks=1)
    if action in ANNOTATION_ACTIONS:
        task, annotation = body.get("task"), body.get("annotation")
        if not isinstance(task, dict) or not isinstance(annotation, dict):
            raise BadInputError(f"{action} needs 'task' and 'annotation' objects")
        enqueue_annotation(ctx, uid, action, task, annotation)
        return {"status": "queued", "action": action}
    if action == "ANNOTATIONS_DELETED":
        # The payload names annotation ids only: reconcile the pool with LS instead.
        request_sync(ctx, uid, why=action, force=True)
        return {"status": "queued", "action": action}
    if action == "TASKS_CREATED":
        found = [t.get("id") for t in body.get("tasks") or [] if isinstance(t, dict)]
        ids = [i for i in found if isinstance(i, int) and not isinstance(i, bool)]
        run = request_labelling(ctx, uid, f"{len(ids)} tasks imported", task_ids=ids)
        seeding = run is None and (
            request_llm_seeds(ctx, uid, "tasks imported") or request_seed_tab(ctx, uid, "tasks imported")
        )
        return {"status": "queued" if run or seeding else "ignored", "action": action, "tasks": len(ids)}
    if action == "START_TRAINING":
        return train(ctx, uid, "Start Training in Label Studio")
    return {"status": "ignored", "action": action}


def legacy_train(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /train``: what older Label Studio versions call instead of sending START_TRAINING."""
    project = body.get("project")
    uid = uid_from_project(project) if isinstance(project, dict) else ProjectModels.check_project(project)
    if isinstance(body.get("label_config"), str):
        remember(ctx, uid, "", body["label_config"])
    return train(ctx, uid, "POST /train")


def train(ctx: Context, uid: str, reason: str) -> dict[str, Any]:
    queued = request_training(ctx, uid, force=True, reason=reason)
    return {"status": "training queued" if queued else "training already queued or running"}


def uid_from_project(project: dict[str, Any]) -> str:
    """Label Studio's project uid from a webhook's project object: ``<id>.<created_at unix seconds>``.

    Label Studio writes ``created_at`` in UTC; a stamp without a zone is read as UTC too (not as
    this server's local time), so the uid matches the one ``/predict`` receives on any server.
    """
    pid, created = project.get("id"), project.get("created_at")
    if not isinstance(pid, int) or not isinstance(created, str):
        raise BadInputError("the webhook's project needs 'id' and 'created_at'")
    try:
        stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise BadInputError(f"project created_at {created!r:.40} is not an ISO date") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return ProjectModels.check_project(f"{pid}.{int(stamp.timestamp())}")


def extra_params(raw: Any) -> Any:
    """LS's connection form sends the "extra params" textarea as a JSON string; the API as an object."""
    if isinstance(raw, str) and raw.strip():
        try:
            return json.loads(raw)
        except ValueError:
            raise BadInputError(
                'the ML backend\'s extra params must be JSON, e.g. {"review_mode": "llm"}'
            ) from None
    return raw


def required(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"the request needs {key!r}: the project's label config XML")
    return value
