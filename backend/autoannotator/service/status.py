"""What a project manager and Prometheus read: per-project status, the status page, ``/metrics``.

Counters live in Redis (every web and rq worker adds to them), versions and their history in the
model store. Nothing here writes anything; a status request costs a few Redis reads and file reads.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from autoannotator.core.guarantee import min_labels
from autoannotator.core.policies import TargetAccuracy
from autoannotator.errors import StateUnavailableError
from autoannotator.learning.audit import AuditLog, estimate, per_version
from autoannotator.review.llm import PriceTable
from autoannotator.service.calibration import calibration_labels
from autoannotator.service.routing import parsed_policy
from autoannotator.storage.label_runs import LabelRun, LabelRuns
from autoannotator.storage.redis_state import COUNTERS, QUEUES

if TYPE_CHECKING:
    from autoannotator.service.context import Context

_HELP = {
    "predictions": "tasks predicted by /predict",
    "invalid_predictions": "our predictions that failed validation and went out empty (see the log)",
    "routed": "predicted tasks the routing policy sent to review",
    "reviewed_llm": "routed tasks the LLM labelled",
    "reviewed_human_queue": "routed tasks put in the Needs review tab (human mode or LLM fallback)",
    "llm_calls": "LLM requests sent (retries included)",
    "llm_cache_hits": "routed tasks answered from the LLM cache",
    "llm_failures": "routed tasks the LLM could not label (off-label, unsure, errors): sent to humans",
    "llm_prompt_tokens": "LLM prompt tokens",
    "llm_completion_tokens": "LLM completion tokens",
    "llm_cost_usd": "LLM cost in US dollars (from the price table)",
    "human_labels": "human annotations added to (or changed in) the verified pool",
    "trainings_published": "trainings that published a new version",
    "trainings_rejected": "trainings whose candidate was worse on held-out labels",
    "trainings_failed": "trainings that failed (the old version kept serving)",
    "webhooks": "webhook events received",
    "labelled_tasks": "predictions written to Label Studio by labelling runs",
    "tab_entered": "tasks a labelling run put in the Needs review tab",
    "tab_left": "tasks a labelling run took out of the Needs review tab (now sure of them)",
    "audit_drawn": "predicted tasks drawn for the audit (marked, into the Needs review tab)",
    "audit_labels": "audit labels people gave (they measure, and never train, the versions)",
}
assert set(_HELP) == set(COUNTERS)


def project_status(ctx: Context, uid: str) -> dict[str, Any]:
    """One project's state as JSON: version, mode, pool, counters, trainings, derived savings."""
    registry = ctx.models.registry(uid)
    out: dict[str, Any] = {"project": uid, "version": registry.current(), "versions": registry.versions()}
    history = registry.history()
    out["trainings"] = [
        {
            k: entry.get(k)
            for k in (
                *("event", "version", "previous", "reason", "metrics_new", "metrics_old", "n_new"),
                "policy",  # the routing policy the gate judged with
                # how the first version's members were chosen
                *("given_models", "catalog_models", "catalog_skipped", "task_description"),
            )
            if k in entry
        }
        | ({"pruning": entry["pruning"]} if entry.get("pruning") else {})
        for entry in history[-10:]
    ]
    # Members a published refinement dropped because the vote was better without them.
    out["members_dropped"] = [
        {"version": entry.get("version"), **entry["pruning"]}
        for entry in history
        if entry.get("event") == "publish" and entry.get("pruning")
    ]
    try:
        state = ctx.state
        counters = state.counters(uid)
        out.update(
            review_mode=state.mode(uid),
            counters=counters,
            pool_size=int(state.get(uid, "pool_size") or 0),
            pool_growth=int(state.get(uid, "pool_growth") or 0),
            training_pending=state.training_pending(uid),
            last_training=state.get(uid, "last_training"),
            title=state.get(uid, "title"),
        )
        # What happened before the cold start: covering seed tasks for people, or for the LLM.
        out["seeds"] = {k: v for k in ("seed_tab", "llm_seeds") if (v := state.get(uid, k)) is not None}
        run = LabelRuns(state).current(uid)
        out["labelling"] = run.as_dict() if run else None
        out["routing"] = routing_status(ctx, uid, out["version"])
    except StateUnavailableError as exc:
        out["error"] = str(exc)
        return out
    predicted, routed = counters["predictions"], counters["routed"]
    calls = counters["llm_calls"]
    out["routed_share"] = round(routed / predicted, 4) if predicted else None
    # LLM-only annotation would have asked the LLM once per predicted task.
    out["llm_calls_saved"] = int(predicted - calls) if predicted else 0
    # Calls of a model without a known price are counted at $0: no saving can be claimed from them.
    s = ctx.settings
    priced = s.llm_prices() is not None or PriceTable.default().price(s.llm_model) is not None
    per_call = counters["llm_cost_usd"] / calls if calls and priced else None
    out["llm_cost_saved_usd"] = round(per_call * (predicted - calls), 6) if per_call is not None else None
    out["retrain_every"] = ctx.settings.retrain_every
    out["seed_labels"] = ctx.settings.seed_labels
    return out


def audit_status(ctx: Context, uid: str) -> dict[str, Any]:
    """The audit's estimates: overall and per version (accuracy of the auto-accepted labels with a
    95% exact interval, and the LLM's agreement with people on audited tasks it labelled)."""
    everything = AuditLog(ctx.audit_path(uid)).records()
    records = [r for r in everything if not r.is_seed]  # the seeds measure no version
    return {
        "labels": len(records),
        "calibration_seeds": len(everything) - len(records),
        "overall": estimate(records).as_dict(),
        "per_version": [e.as_dict() for e in per_version(records)],
    }


def routing_status(ctx: Context, uid: str, version: str | None) -> dict[str, Any]:
    """The project's policy and audit share, the audit's estimates and, for a target, what is
    certified for the served version or how many audit labels it still needs (read afresh)."""
    ctx.routing.forget(uid)
    spec, share, calibration = ctx.routing.choice(uid)
    out: dict[str, Any] = {"policy": spec, "audit_share": share, "audit": audit_status(ctx, uid)}
    policy = parsed_policy(spec)
    if isinstance(policy, TargetAccuracy):
        out["target"] = policy.target
        out["confidence"] = round(1 - policy.delta, 6)
        current = calibration if calibration and calibration.get("version") == version else None
        out["calibration"] = current
        out["message"] = _target_message(policy, current, version, out["audit"]["labels"])
    return out


def _target_message(
    policy: TargetAccuracy, calibration: dict[str, Any] | None, version: str | None, audited: int
) -> str:
    """What a project manager reads about the target: certified, or what it still takes."""
    goal = f"{policy.target:.0%} at {1 - policy.delta:.0%} confidence"
    if version is None:
        return f"target {goal}: no version serves yet"
    if calibration is None or not calibration.get("calibration"):
        least = min_labels(policy.target, policy.delta)
        return (
            f"target {goal}: not certified for {version} yet ({audited} audit labels); every task goes "
            f"to review until it is. It needs at least {least} audited labels of a label to certify it."
        )
    certs = calibration.get("certificates") or []
    done = [c for c in certs if c.get("threshold") is not None]
    parts = [
        f"{c['label']} above {float(c['threshold']):.3f} (bound {float(c['lower_bound']):.1%})" for c in done
    ]
    on = calibration_labels(int(calibration.get("calibration", 0)), int(calibration.get("seeds", 0)))
    text = f"target {goal} on {on}: "
    text += ("certified " + "; ".join(parts)) if parts else "nothing certified yet"
    waiting = [c for c in certs if c.get("threshold") is None]
    more = [c for c in waiting if c.get("needed")]
    if more:
        text += ". Needs " + "; ".join(f"{c['needed']} more audited labels for {c['label']}" for c in more)
    hopeless = [c["label"] for c in waiting if c.get("needed") is None and c.get("items")]
    if hopeless:
        text += f". Not accurate enough to certify: {', '.join(hopeless)} (their tasks go to review)"
    return text


class _Collector:
    """The Redis counters and the model store as Prometheus metrics, read afresh at each scrape:
    every web and rq worker adds to the same counters, so no process holds them in memory."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        state = self.ctx.state
        try:
            uids = state.projects()
            per_project = {uid: state.counters(uid) for uid in uids}
            depths = state.queue_depths()
            pools = {uid: int(state.get(uid, "pool_size") or 0) for uid in uids}
            runs = {uid: run for uid in uids if (run := LabelRuns(state).current(uid)) is not None}
            up = 1
        except StateUnavailableError:
            uids, per_project, depths, pools, runs, up = [], {}, {}, {}, {}, 0
        yield GaugeMetricFamily("autoannotator_redis_up", "whether Redis answered", value=up)
        for name in COUNTERS:
            counter = CounterMetricFamily(f"autoannotator_{name}", _HELP[name], labels=["project"])
            for uid in uids:
                counter.add_metric([uid], per_project[uid][name])
            yield counter
        queue = GaugeMetricFamily("autoannotator_queue_depth", "jobs waiting per rq queue", labels=["queue"])
        for q in QUEUES:
            if q in depths:
                queue.add_metric([q], depths[q])
        yield queue
        pool = GaugeMetricFamily("autoannotator_pool_size", "verified labels per project", labels=["project"])
        for uid in uids:
            pool.add_metric([uid], pools[uid])
        yield pool
        yield from _run_metrics(runs)
        yield from _audit_metrics(self.ctx, uids)
        info = GaugeMetricFamily(
            "autoannotator_model_info", "the version each project serves", labels=["project", "version"]
        )
        stored = {d.name.removeprefix("project-") for d in self.ctx.models.root.glob("project-*")}
        for uid in sorted(set(uids) | stored):
            version = self.ctx.models.registry(uid).current()
            if version:
                info.add_metric([uid, version], 1)
        yield info


def _run_metrics(runs: dict[str, LabelRun]) -> Iterator[Metric]:
    """Each project's latest labelling run: its tasks, how many are done, its rate and its state."""
    gauges = {
        "total": GaugeMetricFamily(
            "autoannotator_label_run_tasks", "tasks queued in the latest labelling run", labels=["project"]
        ),
        "done": GaugeMetricFamily(
            "autoannotator_label_run_done_tasks",
            "tasks the latest labelling run finished",
            labels=["project"],
        ),
        "rate": GaugeMetricFamily(
            "autoannotator_label_run_tasks_per_second", "the latest labelling run's rate", labels=["project"]
        ),
    }
    state = GaugeMetricFamily(
        "autoannotator_label_run_info",
        "the latest labelling run's version and state (planning, running, paused, done, cancelled)",
        labels=["project", "version", "state"],
    )
    for uid, run in sorted(runs.items()):
        gauges["total"].add_metric([uid], run.total)
        gauges["done"].add_metric([uid], run.done)
        gauges["rate"].add_metric([uid], run.tasks_per_s)
        state.add_metric([uid, run.version, run.state], 1)
    yield from gauges.values()
    yield state


def _audit_metrics(ctx: Context, uids: list[str]) -> Iterator[Metric]:
    """Per project and audited version: the audit labels of auto-accepted tasks, their accuracy and
    its 95% interval; per project, the LLM's agreement with people on audited tasks."""
    labels = ["project", "version"]
    gauges = {
        "accepted": GaugeMetricFamily(
            "autoannotator_audit_accepted_labels", "audit labels of auto-accepted tasks", labels=labels
        ),
        "accuracy": GaugeMetricFamily(
            "autoannotator_audit_accuracy", "audited accuracy of auto-accepted labels", labels=labels
        ),
        "low": GaugeMetricFamily(
            "autoannotator_audit_accuracy_lower", "its 95% exact interval's lower end", labels=labels
        ),
        "high": GaugeMetricFamily(
            "autoannotator_audit_accuracy_upper", "its 95% exact interval's upper end", labels=labels
        ),
    }
    agreement = GaugeMetricFamily(
        "autoannotator_audit_llm_agreement",
        "share of audited LLM-labelled tasks where people gave the LLM's label",
        labels=["project"],
    )
    for uid in uids:
        records = AuditLog(ctx.audit_path(uid)).audits()
        for e in per_version(records):
            gauges["accepted"].add_metric([uid, e.version], e.accepted)
            for key, value in (("accuracy", e.accuracy), ("low", e.low), ("high", e.high)):
                if value is not None:
                    gauges[key].add_metric([uid, e.version], value)
        overall = estimate(records)
        if overall.llm_agreement is not None:
            agreement.add_metric([uid], overall.llm_agreement)
    yield from gauges.values()
    yield agreement


def metrics_response(ctx: Context) -> tuple[bytes, str]:
    """``/metrics``: the body in Prometheus' text exposition format, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ctx))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def service_status(ctx: Context) -> dict[str, Any]:
    """``/status.json``: every project (without Redis the model store still says what each serves;
    the rest says why not), the queues and the settings that shape the routing."""
    stored = {d.name.removeprefix("project-") for d in ctx.models.root.glob("project-*")}
    problem: dict[str, str] = {}
    try:
        known, queues = set(ctx.state.projects()), ctx.state.queue_depths()
    except StateUnavailableError as exc:
        known, queues, problem = set(), {}, {"error": str(exc)}
    s = ctx.settings
    return {
        **problem,
        "queues": queues,
        "projects": [project_status(ctx, uid) for uid in sorted(known | stored)],
        "settings": {
            "policy": s.policy,
            "retrain_every": s.retrain_every,
            "seed_labels": s.seed_labels,
            "default_mode": s.review_mode,
        },
    }


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:72rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
th{background:#f3f3f3}.muted{color:#777}code{background:#f3f3f3;padding:0 .2rem}
"""


def status_page(status: dict[str, Any]) -> str:
    """The status page: one section per project, queue depths, and the settings in force."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>AutoAnnotator status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>AutoAnnotator</h1>",
        "<h2>Queues</h2><table><tr>" + "".join(f"<th>{e(q)}</th>" for q in status["queues"]) + "</tr><tr>",
        "".join(f"<td>{n}</td>" for n in status["queues"].values()) + "</tr></table>",
    ]
    if status.get("error"):
        parts.append(f"<p class='muted'>{e(str(status['error']))}</p>")
    if not status["projects"]:
        parts.append("<p class='muted'>No project has connected yet.</p>")
    for p in status["projects"]:
        parts.extend(_project_section(p))
    s = status["settings"]
    parts.append(
        f"<p class='muted'>policy <code>{e(str(s['policy']))}</code>, beta {s['retrain_every']}, "
        f"cold start after {s['seed_labels']} labels, default mode {e(str(s['default_mode']))}. "
        "<a href='/status.json'>JSON</a> · <a href='/metrics'>metrics</a></p></body></html>"
    )
    return "".join(parts)


def _project_section(p: dict[str, Any]) -> list[str]:
    """One project on the status page: named by its Label Studio title, then its table and curve."""
    e = html.escape
    uid = p["project"]
    title = (
        f"{e(p['title'])} <span class='muted'>({e(uid)})</span>" if p.get("title") else f"Project {e(uid)}"
    )
    parts = [f"<h2>{title}</h2>"]
    run = p.get("labelling")
    if run:
        parts.append(_run_html(uid, run))
    parts.append("<table>")
    for name, value in _project_rows(p):
        shown = value if name == "review mode" else e(str(value))
        parts.append(f"<tr><th>{e(name)}</th><td>{shown}</td></tr>")
    parts.append("</table>")
    parts.append(
        f"<p><img src='/projects/{e(uid)}/status.png' width='990' "
        "alt='accuracy against the share reviewed, and LLM calls saved against LLM-only'></p>"
    )
    if (p.get("routing") or {}).get("audit", {}).get("labels"):
        parts.append(
            f"<p><img src='/projects/{e(uid)}/audit.png' width='720' "
            "alt='audited accuracy of the auto-accepted labels per version, with its 95% interval'></p>"
        )
    if p.get("error"):
        parts.append(f"<p class='muted'>{e(p['error'])}</p>")
    return parts


def _run_html(uid: str, run: dict[str, Any]) -> str:
    """The labelling run as a progress bar and one line of figures."""
    e = html.escape
    total, done = int(run.get("total") or 0), int(run.get("done") or 0)
    state = str(run.get("state"))
    eta = run.get("eta_s")
    figures = [
        f"labelling with <b>{e(str(run.get('version')))}</b>: {state}",
        f"{done} of {total}{'' if run.get('planned') else '+'} tasks",
        f"{float(run.get('tasks_per_s') or 0):.1f} tasks/s",
        *([f"about {_duration(float(eta))} left"] if eta and state != "done" else []),
        f"{int(run.get('written') or 0)} predictions written",
        f"{int(run.get('moved_in') or 0)} into the Needs review tab, {int(run.get('moved_out') or 0)} out",
    ]
    spent = {k: int(run.get(f"{k}_ms") or 0) / 1000 for k in ("read", "predict", "forward", "write", "tab")}
    if any(spent.values()):
        figures.append(
            f"time in chunks: reading {spent['read']:.0f} s, predicting {spent['predict']:.0f} s "
            f"(forward passes {spent['forward']:.0f} s), writing {spent['write']:.0f} s, "
            f"the tab {spent['tab']:.0f} s"
        )
    note = f"<br><span class='muted'>{e(str(run['note']))}</span>" if run.get("note") else ""
    return (
        f"<p><progress max='{max(total, 1)}' value='{done}' style='width:30rem'></progress><br>"
        + " · ".join(figures)
        + f" <span class='muted'>({e(str(run.get('reason') or ''))})</span>{note}</p>"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _project_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    e = html.escape
    c = p.get("counters", {})
    share = p.get("routed_share")
    rows = [
        ("version served", p.get("version") or "waiting for seed labels"),
        *[
            (f"seed tasks ({'LLM' if k == 'llm_seeds' else 'Seed tab'})", e(v))
            for k, v in p.get("seeds", {}).items()
        ],
        (
            "review mode",
            f"{p.get('review_mode', '?')} (<a href='/projects/{e(p['project'])}/settings'>change, "
            "or label all tasks now</a>)",
        ),
        (
            "verified labels",
            f"{p.get('pool_size', 0)} ({p.get('pool_growth', 0)} new of beta={p.get('retrain_every')})",
        ),
        (
            "predicted / routed",
            f"{int(c.get('predictions', 0))} / {int(c.get('routed', 0))}"
            + (f" ({share:.1%} routed)" if share is not None else "")
            + f"; {int(c.get('labelled_tasks', 0))} written by labelling runs",
        ),
        (
            "LLM",
            f"{int(c.get('llm_calls', 0))} calls, {int(c.get('llm_cache_hits', 0))} cache hits, "
            f"{int(c.get('llm_failures', 0))} fell back to humans, ${c.get('llm_cost_usd', 0):.4f}",
        ),
        (
            "saved vs LLM-only",
            f"{p.get('llm_calls_saved', 0)} calls"
            + (f", ${p['llm_cost_saved_usd']:.4f}" if p.get("llm_cost_saved_usd") is not None else ""),
        ),
        ("human labels", str(int(c.get("human_labels", 0)))),
        (
            "trainings",
            f"{int(c.get('trainings_published', 0))} published, {int(c.get('trainings_rejected', 0))} "
            f"rejected, {int(c.get('trainings_failed', 0))} failed"
            + (" — one is queued or running" if p.get("training_pending") else ""),
        ),
        ("last training", p.get("last_training") or "—"),
    ]
    if p.get("members_dropped"):
        rows.append(("members dropped", "; ".join(_dropped(d) for d in p["members_dropped"])))
    routing = p.get("routing")
    if routing:
        rows.append(("routing", f"{routing['policy']}, audit share {routing['audit_share']:.0%}"))
        if routing.get("message"):
            rows.append(("target", routing["message"]))
        audit = routing["audit"]
        if audit["labels"]:
            rows.append(("audit", _audit_line(audit, int(c.get("audit_drawn", 0)))))
    return rows


def _audit_line(audit: dict[str, Any], drawn: int) -> str:
    """The audit in one line: labels, and the overall estimate of the auto-accepted labels."""
    o = audit["overall"]
    text = f"{audit['labels']} audit labels of {drawn} tasks drawn"
    if o["accepted"]:
        text += (
            f"; auto-accepted labels {o['accuracy']:.1%} right (95% interval {o['low']:.1%}–{o['high']:.1%}, "
            f"{o['correct']} of {o['accepted']})"
        )
    if o["llm_reviewed"]:
        text += f"; the LLM agreed with people on {o['llm_agreed']} of {o['llm_reviewed']}"
    return text


def _dropped(d: dict[str, Any]) -> str:
    """One pruning for the status page: which members, and the held-out figures that justified it."""
    return (
        f"{d.get('version')}: {', '.join(map(str, d.get('dropped', [])))} "
        f"(held-out {d.get('metric')} {float(d.get('without', 0)):.1%} without, "
        f"{float(d.get('with', 0)):.1%} with, {d.get('n_holdout')} items"
        + (f", sign test p = {float(d['p_value']):.2g})" if d.get("p_value") is not None else ")")
    )


def settings_page(
    uid: str,
    mode: str,
    modes: tuple[str, ...],
    saved: bool = False,
    *,
    policy: str = "",
    audit_share: float = 0.0,
) -> str:
    """A form with the project's review mode, routing policy and audit share. Posting it needs the
    backend's basic auth."""
    e = html.escape
    what = {
        "llm": "an LLM labels uncertain tasks; failures go to the Needs review tab",
        "human": "uncertain tasks go to the Needs review tab in Label Studio",
        "off": "pre-label only; nothing is routed",
    }
    options = "".join(
        f"<p><label><input type='radio' name='review_mode' value='{e(m)}'{' checked' if m == mode else ''}> "
        f"<b>{e(m)}</b> — {e(what.get(m, ''))}</label></p>"
        for m in modes
    )
    routing = (
        "<h2>Routing</h2>"
        f"<p><label>Policy <input name='policy' value='{e(policy)}' size='24'></label> "
        "<span class='muted'>for example <code>mean:0.75</code>, <code>budget:0.2:mean</code>, or "
        "<code>target:0.95</code>: auto-accept only labels certified, on audit labels, to be at "
        "least 95% right (with 95% confidence)</span></p>"
        f"<p><label>Audit share <input name='audit_share' value='{audit_share:g}' size='6'></label> "
        "<span class='muted'>the share of predicted tasks drawn at random for a person to label, "
        "marked in the <code>aa_audit</code> column of the Needs review tab: it measures the "
        "auto-accepted labels (0 to 0.5; a target needs more than 0)</span></p>"
    )
    note = (
        f"<p><b>Saved:</b> review mode is {e(mode)}, policy {e(policy)}, audit share {audit_share:g}, "
        "from the next prediction on.</p>"
        if saved
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Settings of {e(uid)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>Project {e(uid)}</h1>{note}"
        f"<form method='post'><h2>Review mode</h2>{options}{routing}"
        "<button type='submit'>Save</button></form>"
        f"<h2>Labelling run</h2><form method='post' action='/projects/{e(uid)}/label'>"
        "<p>Write the served version's predictions to every task no one has annotated yet, and "
        "bring the Needs review tab up to date. This also happens by itself whenever a new version "
        "is published.</p><p><label><input type='checkbox' name='all' value='1'> also route again the "
        "tasks that already carry this version's prediction</label></p>"
        "<button type='submit'>Label all tasks now</button></form>"
        "<p class='muted'><a href='/status'>status</a></p></body></html>"
    )
