"""The Label Studio ML backend protocol over Flask: routes that parse, call and serialize.

- ``GET /health``, ``POST /setup``, ``POST /predict``, ``GET /versions``: the protocol. What
  ``/predict`` does is :meth:`Annotator.predict <autoannotator.service.annotator.Annotator.predict>`;
  the routed tasks go to an rq ``review`` job once the answer is sent, so ``/predict`` never waits
  on an LLM. Its ``Server-Timing`` header says where the request's time went.
- ``POST /webhook`` (and the legacy ``POST /train``): acknowledged at once; annotations and
  "Start Training" become rq jobs (:mod:`autoannotator.service.events`).
- ``GET|POST /projects/<uid>/settings``: the project's review mode, as JSON or a small form.
- ``GET /status`` (a page), ``GET /status.json``, ``GET /metrics`` (Prometheus text).

Redis may be down: predictions still answer (with the environment's default mode and no review
jobs); what needs a queue answers 503 and says so. Clients never see a traceback: their faults
are 4xx with the reason, ours 5xx.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from autoannotator.errors import (
    AutoAnnotatorError,
    BadInputError,
    LabelMappingError,
    StateUnavailableError,
    UnsupportedConfigError,
)
from autoannotator.labelstudio.client import basic_auth
from autoannotator.service import events
from autoannotator.service.annotator import Annotator, PredictionBatch
from autoannotator.service.context import Context, configure_runtime
from autoannotator.service.labelling import answers_beside_runs
from autoannotator.service.queueing import dispatch_review, request_calibration, request_labelling
from autoannotator.service.routing import check_routing, is_target
from autoannotator.service.status import (
    metrics_response,
    project_status,
    routing_status,
    service_status,
    settings_page,
    status_page,
)
from autoannotator.service.status_plot import read_holdout_tradeoff, render_audit
from autoannotator.service.status_plot import render as render_status_plot
from autoannotator.settings import REVIEW_MODES, Settings
from autoannotator.storage.model_store import ProjectModels
from autoannotator.storage.redis_state import State

logger = logging.getLogger(__name__)

routes = Blueprint("autoannotator", __name__)


@dataclass(frozen=True)
class Services:
    """What the routes of one app use, built once by :func:`create_app`."""

    ctx: Context
    annotator: Annotator

    @property
    def settings(self) -> Settings:
        return self.ctx.settings


def create_app(
    settings: Settings | None = None, projects: ProjectModels | None = None, state: State | None = None
) -> Flask:
    _log_like_gunicorn()
    settings = settings or Settings.from_env()
    configure_runtime(settings)
    projects = projects or ProjectModels(settings.model_dir)
    state = state or State.from_url(settings.redis_url, settings.review_mode)
    ctx = Context(settings, state, projects)
    app = Flask(__name__)
    app.extensions["autoannotator"] = Services(ctx, ctx.annotator)
    app.register_blueprint(routes)
    return app


def _services() -> Services:
    services: Services = current_app.extensions["autoannotator"]
    return services


@routes.before_app_request
def require_basic_auth() -> Response | None:
    s = _services().settings
    if not s.basic_auth_user:
        return None
    given = request.headers.get("Authorization", "").removeprefix("Basic ").strip()
    if _same(given, basic_auth(s.basic_auth_user, s.basic_auth_password).removeprefix("Basic ")):
        return None
    response = jsonify({"error": "authentication required"})
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="autoannotator"'
    return response


@routes.get("/health")
@routes.get("/")
def health() -> Response:
    up = _services().ctx.state.ping()
    return jsonify({"status": "UP", "model_class": "AutoAnnotator", "redis": "up" if up else "down"})


@routes.post("/setup")
def setup() -> Response:
    return jsonify(events.setup(_services().ctx, _json_body()))


@routes.post("/predict")
def predict() -> Response:
    body = _json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadInputError("'tasks' must be a list of Label Studio task objects")
    label_config = events.required(body, "label_config")
    services = _services()
    batch = services.annotator.predict(body.get("project"), tasks, label_config)
    response = jsonify({"results": answers_beside_runs(services.ctx.state, services.settings, batch, tasks)})
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={1000 * v:.3f}" for k, v in batch.timings.items())
    # Counting and queueing the review change nothing in the answer, so they run once it has been
    # sent (when the WSGI server closes the response): Label Studio waits on the forward pass, not
    # on Redis. A sync gunicorn worker still finishes them before its next request.
    response.call_on_close(lambda: _after_predictions(services, batch))
    return response


def _after_predictions(services: Services, batch: PredictionBatch) -> None:
    try:
        mode = dispatch_review(
            services.ctx.state,
            services.settings,
            batch.uid,
            batch.version,
            batch.routed,
            batch.cleared,
            predictions=batch.n,
            invalid=batch.invalid,
            audited=batch.audited,
        )
    except Exception:  # after the answer: nobody to tell but the log
        logger.exception("project %s: %d routed tasks not queued for review", batch.uid, len(batch.routed))
        return
    logger.info(
        "project %s: %d predictions (%d without text, %d routed, mode %s) by %s",
        batch.uid,
        batch.n,
        batch.unlabelled,
        len(batch.routed),
        mode,
        batch.version,
    )


@routes.post("/webhook")
def webhook() -> tuple[Response, int]:
    try:
        return jsonify(events.webhook(_services().ctx, _json_body())), 200
    except StateUnavailableError as exc:
        logger.error("webhook dropped: %s", exc)
        message = f"queue unavailable; the next sync from Label Studio recovers it ({exc})"
        return jsonify({"error": message}), 503


@routes.post("/train")
def train() -> Response:
    return jsonify(events.legacy_train(_services().ctx, _json_body()))


@routes.route("/projects/<uid>/settings", methods=["GET", "POST", "PUT"])
def project_settings(uid: str) -> Response | tuple[Response, int]:
    """The project's review mode, routing policy and audit share: a form, or JSON. Each field given
    is applied (an empty ``policy`` goes back to the environment's); the others stay."""
    uid = ProjectModels.check_project(uid)
    s, ctx = _services().settings, _services().ctx
    state = ctx.state
    if request.method != "GET":
        if not s.basic_auth_user:
            error = "changing settings needs authentication: set BASIC_AUTH_USER and BASIC_AUTH_PASS"
            return jsonify({"error": error}), 403
        given = (request.get_json(silent=True) if request.is_json else request.form) or {}
        _apply_settings(ctx, uid, given)
        if not request.is_json:
            return Response(_settings_html(ctx, uid, saved=True), mimetype="text/html")
    if request.method == "GET" and request.accept_mimetypes.best == "text/html":
        return Response(_settings_html(ctx, uid), mimetype="text/html")
    spec, share, _ = ctx.routing.choice(uid)
    return jsonify(
        {
            "project": uid,
            "review_mode": state.mode(uid),
            "modes": list(REVIEW_MODES),
            "default": s.review_mode,
            "policy": spec,
            "audit_share": share,
            "defaults": {"policy": s.policy, "audit_share": s.audit_share},
        }
    )


def _apply_settings(ctx: Context, uid: str, given: Any) -> None:
    """Validate every given field first, then apply them; a target policy is certified at once."""
    if not any(name in given for name in ("review_mode", "policy", "audit_share")):
        raise BadInputError("give one or more of review_mode, policy and audit_share")
    mode = str(given.get("review_mode", "")).strip().lower() if "review_mode" in given else None
    if mode is not None and mode not in REVIEW_MODES:
        raise BadInputError(f"review_mode must be one of {list(REVIEW_MODES)}, got {mode!r:.40}")
    routing = None
    if "policy" in given or "audit_share" in given:
        stored_spec, stored_share, _ = ctx.routing.choice(uid)
        spec = str(given.get("policy", stored_spec)).strip() or ctx.settings.policy
        try:
            share = float(given.get("audit_share", stored_share))
            routing = check_routing(spec, share)
        except ValueError as exc:
            raise BadInputError(str(exc)) from exc
    if mode is not None:
        ctx.state.set_mode(uid, mode)
    if routing is not None:
        spec, share = routing
        ctx.state.set_routing(
            uid,
            None if spec == ctx.settings.policy else spec,
            None if share == ctx.settings.audit_share else share,
        )
        ctx.routing.forget(uid)
        if is_target(spec) and ctx.state.info(uid) is not None:
            request_calibration(ctx, uid, f"policy {spec} chosen")


def _settings_html(ctx: Context, uid: str, saved: bool = False) -> str:
    spec, share, _ = ctx.routing.choice(uid)
    return settings_page(uid, ctx.state.mode(uid), REVIEW_MODES, saved=saved, policy=spec, audit_share=share)


@routes.post("/projects/<uid>/label")
def label_project(uid: str) -> Response | tuple[Response, int]:
    """Start a labelling run of the served version over the project's unannotated tasks ("Label all
    tasks now" on the settings page, or ``{"all": true}`` as JSON to route every task again)."""
    uid = ProjectModels.check_project(uid)
    services = _services()
    if not services.settings.basic_auth_user:
        error = "starting a labelling run needs authentication: set BASIC_AUTH_USER and BASIC_AUTH_PASS"
        return jsonify({"error": error}), 403
    given = request.get_json(silent=True) if request.is_json else request.form
    full = str((given or {}).get("all", "")).strip().lower() in {"1", "true", "yes", "on"}
    if services.ctx.state.info(uid) is None:
        raise BadInputError(f"project {uid} has not connected yet: Label Studio's /setup records it")
    run = request_labelling(services.ctx, uid, "started by hand", full=full)
    if run is None:
        return jsonify({"error": f"project {uid} has no version to label with yet"}), 409
    if not request.is_json:
        return Response(status=303, headers={"Location": "/status"})
    return jsonify({"project": uid, "run": run.as_dict()}), 202


@routes.get("/status.json")
def status_json() -> Response:
    return jsonify(service_status(_services().ctx))


@routes.get("/status")
def status() -> Response:
    return Response(status_page(service_status(_services().ctx)), mimetype="text/html")


@routes.get("/projects/<uid>/status.png")
def status_png(uid: str) -> Response:
    """Accuracy vs. share reviewed (held-out labels) and LLM calls saved, for the status page."""
    ctx = _services().ctx
    uid = ProjectModels.check_project(uid)
    curve = read_holdout_tradeoff(ctx.models.registry(uid).root)
    return Response(render_status_plot(project_status(ctx, uid), curve), mimetype="image/png")


@routes.get("/projects/<uid>/audit.png")
def audit_png(uid: str) -> Response:
    """The live audit per version: audited accuracy of auto-accepted labels, interval, target."""
    ctx = _services().ctx
    uid = ProjectModels.check_project(uid)
    version = ctx.models.registry(uid).current()
    return Response(render_audit(routing_status(ctx, uid, version)), mimetype="image/png")


@routes.get("/metrics")
def metrics() -> Response:
    body, content_type = metrics_response(_services().ctx)
    return Response(body, content_type=content_type)


@routes.get("/versions")
def versions() -> Response:
    projects = _services().ctx.models
    found = sorted(
        f"{d.name.removeprefix('project-')}/{v}"
        for d in projects.root.glob("project-*")
        for v in projects.registry(d.name.removeprefix("project-")).versions()
    )
    return jsonify({"versions": found})


@routes.app_errorhandler(BadInputError)
@routes.app_errorhandler(UnsupportedConfigError)
@routes.app_errorhandler(LabelMappingError)
def bad_request(exc: AutoAnnotatorError) -> tuple[Response, int]:
    """The client's input is at fault: say exactly what. Any other error is ours (a 5xx)."""
    status = 400 if isinstance(exc, BadInputError) else 422
    logger.warning("%s: %s", request.path, exc)
    return jsonify({"error": str(exc)}), status


@routes.app_errorhandler(StateUnavailableError)
def no_state(exc: StateUnavailableError) -> tuple[Response, int]:
    logger.error("%s: %s", request.path, exc)
    return jsonify({"error": str(exc)}), 503


@routes.app_errorhandler(HTTPException)
def http_error(exc: HTTPException) -> tuple[Response, int]:
    return jsonify({"error": exc.description}), exc.code or 500


@routes.app_errorhandler(Exception)
def internal_error(exc: Exception) -> tuple[Response, int]:
    logger.error("%s failed", request.path, exc_info=exc)
    return jsonify({"error": "internal error; the backend's log has the details"}), 500


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of two header values (hashed first, so lengths leak nothing)."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadInputError("the request body must be a JSON object")
    return body


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
