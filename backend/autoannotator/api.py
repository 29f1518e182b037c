"""The Label Studio ML backend protocol over Flask: parse, call the engine, serialize — nothing else.

Implemented here: ``GET /health``, ``POST /setup``, ``POST /predict`` and ``GET /versions``. Every
prediction is validated before it leaves (Label Studio stores whatever it is sent), one bad task
gets an empty prediction and keeps its place, and clients never see a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from functools import lru_cache
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from autoannotator.errors import AutoAnnotatorError, BadInputError, LabelMappingError, UnsupportedConfigError
from autoannotator.labelconfig import (
    PredictionValidator,
    ProjectConfig,
    empty_prediction,
    extract_texts,
    parse_label_config,
    prediction,
)
from autoannotator.router import Policy, policy_from_spec
from autoannotator.serving import WAITING_VERSION, ProjectModels
from autoannotator.settings import Settings

logger = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def _project_config(xml: str) -> tuple[ProjectConfig, PredictionValidator]:
    """Parsing a config (and building its validator) once per distinct config, not once per request."""
    config = parse_label_config(xml)
    return config, PredictionValidator(config)


def create_app(settings: Settings | None = None, projects: ProjectModels | None = None) -> Flask:
    settings = settings or Settings.from_env()
    projects = projects or ProjectModels(settings.model_dir)
    policy: Policy = policy_from_spec(settings.policy)
    app = Flask(__name__)

    @app.before_request
    def require_basic_auth() -> Response | None:
        if not settings.basic_auth_user:
            return None
        expected = base64.b64encode(
            f"{settings.basic_auth_user}:{settings.basic_auth_password}".encode()
        ).decode()
        given = request.headers.get("Authorization", "").removeprefix("Basic ").strip()
        if hmac.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
        ):
            return None
        response = jsonify({"error": "authentication required"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="autoannotator"'
        return response

    @app.get("/health")
    @app.get("/")
    def health() -> Response:
        return jsonify({"status": "UP", "model_class": "AutoAnnotator"})

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
        project = ProjectModels.check_project(body.get("project"))
        _project_config(_required(body, "schema"))
        return jsonify({"model_version": projects.current_version(project) or WAITING_VERSION})

    @app.post("/predict")
    def predict() -> Response:
        body = _json_body()
        project = ProjectModels.check_project(body.get("project"))
        config, validator = _project_config(_required(body, "label_config"))
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadInputError("'tasks' must be a list of Label Studio task objects")
        texts = extract_texts(tasks, config, max_chars=settings.max_text_chars)
        ensemble = projects.ensemble(project, config.labels)
        version = ensemble.version if ensemble else WAITING_VERSION
        results: list[dict[str, Any]] = [empty_prediction(version) for _ in tasks]
        good = [i for i, t in enumerate(texts) if t.ok]
        for t in texts:
            if not t.ok:
                logger.info("project %s: task %s gets no prediction: %s", project, t.task_id, t.problem)
        if ensemble is not None and good:
            decision = policy.decide(ensemble.predict_proba([texts[i].text or "" for i in good]))
            for j, i in enumerate(good):
                label = config.labels.names[int(decision.labels[j])]
                results[i] = prediction(config, label, float(decision.confidence[j]), version)
        for item in results:
            validator.check(item)
        logger.info(
            "project %s: %d predictions (%d without text) by %s",
            project,
            len(tasks),
            len(tasks) - len(good),
            version,
        )
        return jsonify({"results": results})

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

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify({"error": exc.description}), exc.code or 500

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> tuple[Response, int]:
        logger.error("%s failed", request.path, exc_info=exc)
        return jsonify({"error": "internal error; the backend's log has the details"}), 500

    return app


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
