"""The Label Studio ML backend protocol over Flask: parse, call the engine, enqueue — nothing slow.

- ``GET /health``, ``POST /setup``, ``POST /predict``, ``GET /versions``: the protocol. Every
  prediction is validated before it leaves (Label Studio stores whatever it is sent), one bad task
  gets an empty prediction and keeps its place. Tasks the routing policy is unsure of are handed to
  an rq ``review`` job (human queue or LLM, per the project's mode); /predict never waits on an LLM.
- ``POST /webhook`` (and the legacy ``POST /train``): acknowledged at once; annotations and
  "Start Training" become rq jobs.
- ``GET|POST /projects/<uid>/settings``: the project's review mode, as JSON or a small form.
- ``GET /status`` (a page), ``GET /status.json``, ``GET /metrics`` (Prometheus text).

Redis may be down: predictions still answer (with the environment's default mode and no review
jobs); what needs a queue answers 503 and says so. Clients never see a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from autoannotator.core.policies import Policy, policy_from_spec
from autoannotator.errors import AutoAnnotatorError, BadInputError, LabelMappingError, UnsupportedConfigError
from autoannotator.labelstudio.config import (
    PredictionValidator,
    ProjectConfig,
    empty_prediction,
    extract_texts,
    parse_label_config,
    prediction,
)
from autoannotator.service import jobs
from autoannotator.service.status import metrics_text, project_status, settings_page, status_page
from autoannotator.service.status_plot import read_holdout_tradeoff
from autoannotator.service.status_plot import render as render_status_plot
from autoannotator.settings import REVIEW_MODES, Settings
from autoannotator.storage.model_store import WAITING_VERSION, ProjectModels
from autoannotator.storage.redis_state import ProjectInfo, State, StateUnavailableError

logger = logging.getLogger(__name__)

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})


@lru_cache(maxsize=64)
def _project_config(xml: str) -> tuple[ProjectConfig, PredictionValidator]:
    """Parsing a config (and building its validator) once per distinct config, not once per request."""
    config = parse_label_config(xml)
    return config, PredictionValidator(config)


def create_app(
    settings: Settings | None = None, projects: ProjectModels | None = None, state: State | None = None
) -> Flask:
    _log_like_gunicorn()
    settings = settings or Settings.from_env()
    projects = projects or ProjectModels(settings.model_dir)
    state = state or State.from_url(settings.redis_url, settings.review_mode)
    ctx = jobs.Context(settings, state, projects)
    policy: Policy = policy_from_spec(settings.policy)
    app = Flask(__name__)

    def authorized() -> bool:
        if not settings.basic_auth_user:
            return True
        expected = base64.b64encode(
            f"{settings.basic_auth_user}:{settings.basic_auth_password}".encode()
        ).decode()
        given = request.headers.get("Authorization", "").removeprefix("Basic ").strip()
        return hmac.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
        )

    @app.before_request
    def require_basic_auth() -> Response | None:
        if authorized():
            return None
        response = jsonify({"error": "authentication required"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="autoannotator"'
        return response

    def remember(uid: str, ls_url: str, label_config: str) -> None:
        """Record what the workers need to reach the project; queue a pool rebuild after a flush."""
        state.remember(ProjectInfo(uid, int(uid.split(".")[0]), ls_url, label_config))
        jobs.request_sync(ctx, uid)

    @app.get("/health")
    @app.get("/")
    def health() -> Response:
        return jsonify(
            {"status": "UP", "model_class": "AutoAnnotator", "redis": "up" if state.ping() else "down"}
        )

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
        uid = ProjectModels.check_project(body.get("project"))
        _project_config(_required(body, "schema"))
        version = projects.current_version(uid)
        try:
            remember(uid, str(body.get("hostname") or ""), body["schema"])
            applied = state.mode_from_label_studio(uid, _extra_params(body.get("extra_params")))
            if applied:
                logger.info("project %s: review mode %s from Label Studio's extra params", uid, applied)
            if version is None and settings.specialists:
                jobs.request_training(ctx, uid, reason="configured specialists")
        except StateUnavailableError as exc:
            logger.warning("/setup for %s without Redis: %s", uid, exc)
        except ValueError as exc:
            raise BadInputError(str(exc)) from exc
        return jsonify({"model_version": version or WAITING_VERSION})

    @app.post("/predict")
    def predict() -> Response:
        body = _json_body()
        uid = ProjectModels.check_project(body.get("project"))
        config, validator = _project_config(_required(body, "label_config"))
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadInputError("'tasks' must be a list of Label Studio task objects")
        texts = extract_texts(tasks, config, max_chars=settings.max_text_chars)
        ensemble = projects.ensemble(uid, config.labels)
        version = ensemble.version if ensemble else WAITING_VERSION
        results: list[dict[str, Any]] = [empty_prediction(version) for _ in tasks]
        good = [i for i, t in enumerate(texts) if t.ok]
        for t in texts:
            if not t.ok:
                logger.info("project %s: task %s gets no prediction: %s", uid, t.task_id, t.problem)
        routed: list[dict[str, Any]] = []
        cleared: list[dict[str, Any]] = []
        if ensemble is not None and good:
            probs = ensemble.predict_proba([texts[i].text or "" for i in good])
            decision = policy.decide(probs)
            member_votes = probs.argmax(axis=2)  # [k, n]
            for j, i in enumerate(good):
                label = config.labels.names[int(decision.labels[j])]
                confidence = float(decision.confidence[j])
                results[i] = prediction(config, label, confidence, version)
                task = tasks[i]
                if _annotated(task):
                    continue  # a human already labelled it: nothing to review
                if bool(decision.review[j]):
                    votes = np.bincount(member_votes[:, j], minlength=len(config.labels))
                    routed.append(
                        {
                            "task_id": texts[i].task_id,
                            "data": task.get("data"),
                            "text": texts[i].text,
                            "label": label,
                            "confidence": round(confidence, 4),
                            "votes": {config.labels.names[c]: int(n) for c, n in enumerate(votes) if n},
                        }
                    )
                elif (task.get("data") or {}).get(jobs.NEEDS_REVIEW) is True:
                    cleared.append({"task_id": texts[i].task_id, "data": task.get("data")})
        for item in results:
            validator.check(item)
        response = jsonify({"results": results})
        # Counting and queueing the review change nothing in the answer, so they run once it has
        # been sent (when the WSGI server closes the response): Label Studio waits on the forward
        # pass, not on Redis. A sync gunicorn worker still finishes them before its next request.
        unlabelled = len(tasks) - len(good)
        response.call_on_close(
            lambda: _after_predictions(uid, version, routed, cleared, len(tasks), unlabelled)
        )
        return response

    def _after_predictions(
        uid: str,
        version: str,
        routed: list[dict[str, Any]],
        cleared: list[dict[str, Any]],
        n: int,
        unlabelled: int,
    ) -> None:
        try:
            mode = _count_and_enqueue_review(uid, version, routed, cleared, n)
        except Exception:  # after the answer: nobody to tell but the log
            logger.exception("project %s: %d routed tasks not queued for review", uid, len(routed))
            return
        logger.info(
            "project %s: %d predictions (%d without text, %d routed, mode %s) by %s",
            uid,
            n,
            unlabelled,
            len(routed),
            mode,
            version,
        )

    def _count_and_enqueue_review(
        uid: str, version: str, routed: list[dict[str, Any]], cleared: list[dict[str, Any]], n: int
    ) -> str:
        """Count, read the review mode (one Redis round trip) and queue the review job if there is
        one to do (a second); returns the mode. Without Redis: the default mode, nothing queued."""
        try:
            mode = state.count_predictions(uid, n, len(routed))
            if (routed and mode != "off") or cleared:
                state.enqueue(
                    "review",
                    jobs.review_routed,
                    uid,
                    version,
                    mode,
                    routed if mode != "off" else [],
                    cleared,
                    job_timeout=1800,
                    description=f"review {len(routed)} tasks of {uid} ({mode})",
                )
            return mode
        except StateUnavailableError as exc:
            logger.warning(
                "project %s: %s; review mode falls back to %s, %d routed tasks not queued for review",
                uid,
                exc,
                settings.review_mode,
                len(routed),
            )
            return settings.review_mode

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        body = _json_body()
        action = str(body.get("action") or "")
        project = body.get("project")
        if not isinstance(project, dict):
            return jsonify({"status": "ignored", "reason": "no project in the payload"}), 200
        uid = _uid_from_project(project)
        label_config = project.get("label_config")
        try:
            if isinstance(label_config, str) and label_config.strip():
                remember(uid, "", label_config)
            state.count(uid, webhooks=1)
            if action in ANNOTATION_ACTIONS:
                task, annotation = body.get("task"), body.get("annotation")
                if not isinstance(task, dict) or not isinstance(annotation, dict):
                    raise BadInputError(f"{action} needs 'task' and 'annotation' objects")
                state.enqueue(
                    "ingest",
                    jobs.ingest_annotation,
                    uid,
                    task,
                    annotation,
                    job_timeout=300,
                    description=f"{action} {uid}",
                )
                return jsonify({"status": "queued", "action": action}), 200
            if action == "ANNOTATIONS_DELETED":
                # The payload names annotation ids only: reconcile the pool with LS instead.
                state.enqueue(
                    "ingest", jobs.sync_project, uid, job_timeout=3600, description=f"{action} {uid}"
                )
                return jsonify({"status": "queued", "action": action}), 200
            if action == "START_TRAINING":
                queued = jobs.request_training(ctx, uid, force=True, reason="Start Training in Label Studio")
                return jsonify(
                    {"status": "training queued" if queued else "training already queued or running"}
                ), 200
        except StateUnavailableError as exc:
            logger.error("webhook %s for %s dropped: %s", action, uid, exc)
            return jsonify(
                {"error": f"queue unavailable; the next sync from Label Studio recovers it ({exc})"}
            ), 503
        return jsonify({"status": "ignored", "action": action}), 200

    @app.post("/train")
    def train() -> tuple[Response, int]:
        """Older Label Studio versions call ``/train`` instead of sending START_TRAINING to /webhook."""
        body = _json_body()
        project = body.get("project")
        uid = (
            _uid_from_project(project) if isinstance(project, dict) else ProjectModels.check_project(project)
        )
        try:
            if isinstance(body.get("label_config"), str):
                remember(uid, "", body["label_config"])
            queued = jobs.request_training(ctx, uid, force=True, reason="POST /train")
        except StateUnavailableError as exc:
            return jsonify({"error": str(exc)}), 503
        return jsonify({"status": "training queued" if queued else "training already queued or running"}), 200

    @app.route("/projects/<uid>/settings", methods=["GET", "POST", "PUT"])
    def project_settings(uid: str) -> Response | tuple[Response, int]:
        uid = ProjectModels.check_project(uid)
        if request.method != "GET":
            if not settings.basic_auth_user:
                return jsonify(
                    {
                        "error": "changing settings needs authentication: "
                        "set BASIC_AUTH_USER and BASIC_AUTH_PASS"
                    }
                ), 403
            given = request.get_json(silent=True) if request.is_json else request.form
            mode = str((given or {}).get("review_mode", "")).strip().lower()
            if mode not in REVIEW_MODES:
                raise BadInputError(f"review_mode must be one of {list(REVIEW_MODES)}, got {mode!r:.40}")
            state.set_mode(uid, mode)
            if not request.is_json:
                return Response(settings_page(uid, mode, REVIEW_MODES, saved=True), mimetype="text/html")
        mode = state.mode(uid)
        if request.method == "GET" and request.accept_mimetypes.best == "text/html":
            return Response(settings_page(uid, mode, REVIEW_MODES), mimetype="text/html")
        return jsonify(
            {
                "project": uid,
                "review_mode": mode,
                "modes": list(REVIEW_MODES),
                "default": settings.review_mode,
            }
        )

    @app.get("/status.json")
    def status_json() -> Response:
        return jsonify(_status())

    @app.get("/status")
    def status() -> Response:
        return Response(status_page(_status()), mimetype="text/html")

    @app.get("/projects/<uid>/status.png")
    def status_png(uid: str) -> Response:
        """Accuracy vs. share reviewed (held-out labels) and LLM calls saved, for the status page."""
        uid = ProjectModels.check_project(uid)
        curve = read_holdout_tradeoff(projects.registry(uid).root)
        return Response(render_status_plot(project_status(ctx, uid), curve), mimetype="image/png")

    def _status() -> dict[str, Any]:
        """Without Redis the model store still says what each project serves; the rest says why not."""
        stored = {d.name.removeprefix("project-") for d in projects.root.glob("project-*")}
        problem: dict[str, str] = {}
        try:
            known, queues = set(state.projects()), state.queue_depths()
        except StateUnavailableError as exc:
            known, queues, problem = set(), {}, {"error": str(exc)}
        return {
            **problem,
            "queues": queues,
            "projects": [project_status(ctx, uid) for uid in sorted(known | stored)],
            "settings": {
                "policy": settings.policy,
                "retrain_every": settings.retrain_every,
                "seed_labels": settings.seed_labels,
                "default_mode": settings.review_mode,
            },
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(metrics_text(ctx), mimetype="text/plain; version=0.0.4")

    @app.get("/versions")
    def versions() -> Response:
        found = sorted(
            f"{d.name.removeprefix('project-')}/{v}"
            for d in projects.root.glob("project-*")
            for v in projects.registry(d.name.removeprefix("project-")).versions()
        )
        return jsonify({"versions": found})

    @app.errorhandler(BadInputError)
    @app.errorhandler(UnsupportedConfigError)
    @app.errorhandler(LabelMappingError)
    def bad_request(exc: AutoAnnotatorError) -> tuple[Response, int]:
        """The client's input is at fault: say exactly what. Any other error is ours (a 500)."""
        status = 400 if isinstance(exc, BadInputError) else 422
        logger.warning("%s: %s", request.path, exc)
        return jsonify({"error": str(exc)}), status

    @app.errorhandler(StateUnavailableError)
    def no_state(exc: StateUnavailableError) -> tuple[Response, int]:
        logger.error("%s: %s", request.path, exc)
        return jsonify({"error": str(exc)}), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify({"error": exc.description}), exc.code or 500

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> tuple[Response, int]:
        logger.error("%s failed", request.path, exc_info=exc)
        return jsonify({"error": "internal error; the backend's log has the details"}), 500

    return app


def _log_like_gunicorn() -> None:
    """Under gunicorn nothing configures logging, and Python then drops INFO (our prediction and
    routing lines). Send the package's records where gunicorn's error log goes, at INFO, unless
    the application already configured logging."""
    ours = logging.getLogger("autoannotator")
    if logging.getLogger().handlers or ours.handlers:
        return
    gunicorn = logging.getLogger("gunicorn.error")
    if gunicorn.handlers:
        for handler in gunicorn.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _annotated(task: dict[str, Any]) -> bool:
    annotations = task.get("annotations")
    if isinstance(annotations, list) and any(
        isinstance(a, dict) and not a.get("was_cancelled") for a in annotations
    ):
        return True
    total = task.get("total_annotations")
    return isinstance(total, int) and total > 0


def _uid_from_project(project: dict[str, Any]) -> str:
    """Label Studio's project uid from a webhook's project object: ``<id>.<created_at unix seconds>``."""
    pid, created = project.get("id"), project.get("created_at")
    if not isinstance(pid, int) or not isinstance(created, str):
        raise BadInputError("the webhook's project needs 'id' and 'created_at'")
    try:
        stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise BadInputError(f"project created_at {created!r:.40} is not an ISO date") from None
    return ProjectModels.check_project(f"{pid}.{int(stamp.timestamp())}")


def _extra_params(raw: Any) -> Any:
    """LS's connection form sends the "extra params" textarea as a JSON string; the API as an object."""
    if isinstance(raw, str) and raw.strip():
        try:
            return json.loads(raw)
        except ValueError:
            raise BadInputError(
                'the ML backend\'s extra params must be JSON, e.g. {"review_mode": "llm"}'
            ) from None
    return raw


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadInputError("the request body must be a JSON object")
    return body


def _required(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"the request needs {key!r}: the project's label config XML")
    return value
