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

from autoannotator.errors import StateUnavailableError
from autoannotator.review.llm import PriceTable
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
    "llm_failures": "routed tasks the LLM could not label (off-label, errors): sent to humans",
    "llm_prompt_tokens": "LLM prompt tokens",
    "llm_completion_tokens": "LLM completion tokens",
    "llm_cost_usd": "LLM cost in US dollars (from the price table)",
    "human_labels": "human annotations added to (or changed in) the verified pool",
    "trainings_published": "trainings that published a new version",
    "trainings_rejected": "trainings whose candidate was worse on held-out labels",
    "trainings_failed": "trainings that failed (the old version kept serving)",
    "webhooks": "webhook events received",
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
        )
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
            up = 1
        except StateUnavailableError:
            uids, per_project, depths, pools, up = [], {}, {}, {}, 0
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
        info = GaugeMetricFamily(
            "autoannotator_model_info", "the version each project serves", labels=["project", "version"]
        )
        stored = {d.name.removeprefix("project-") for d in self.ctx.models.root.glob("project-*")}
        for uid in sorted(set(uids) | stored):
            version = self.ctx.models.registry(uid).current()
            if version:
                info.add_metric([uid, version], 1)
        yield info


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
        c = p.get("counters", {})
        share = p.get("routed_share")
        parts.append(f"<h2>Project {e(p['project'])}</h2><table>")
        rows = [
            ("version served", p.get("version") or "waiting for seed labels"),
            (
                "review mode",
                f"{p.get('review_mode', '?')} (<a href='/projects/{e(p['project'])}/settings'>change</a>)",
            ),
            (
                "verified labels",
                f"{p.get('pool_size', 0)} ({p.get('pool_growth', 0)} new of beta={p.get('retrain_every')})",
            ),
            (
                "predicted / routed",
                f"{int(c.get('predictions', 0))} / {int(c.get('routed', 0))}"
                + (f" ({share:.1%} routed)" if share is not None else ""),
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
        for name, value in rows:
            shown = value if name == "review mode" else e(str(value))
            parts.append(f"<tr><th>{e(name)}</th><td>{shown}</td></tr>")
        parts.append("</table>")
        parts.append(
            f"<p><img src='/projects/{e(p['project'])}/status.png' width='990' "
            "alt='accuracy against the share reviewed, and LLM calls saved against LLM-only'></p>"
        )
        if p.get("error"):
            parts.append(f"<p class='muted'>{e(p['error'])}</p>")
    s = status["settings"]
    parts.append(
        f"<p class='muted'>policy <code>{e(str(s['policy']))}</code>, beta {s['retrain_every']}, "
        f"cold start after {s['seed_labels']} labels, default mode {e(str(s['default_mode']))}. "
        "<a href='/status.json'>JSON</a> · <a href='/metrics'>metrics</a></p></body></html>"
    )
    return "".join(parts)


def _dropped(d: dict[str, Any]) -> str:
    """One pruning for the status page: which members, and the held-out figures that justified it."""
    return (
        f"{d.get('version')}: {', '.join(map(str, d.get('dropped', [])))} "
        f"(held-out {d.get('metric')} {float(d.get('without', 0)):.1%} without, "
        f"{float(d.get('with', 0)):.1%} with, {d.get('n_holdout')} items)"
    )


def settings_page(uid: str, mode: str, modes: tuple[str, ...], saved: bool = False) -> str:
    """A form with one choice: the project's review mode. Posting it needs the backend's basic auth."""
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
    note = f"<p><b>Saved:</b> review mode is {e(mode)} from the next prediction on.</p>" if saved else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Review mode of {e(uid)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>Project {e(uid)}</h1>{note}"
        f"<form method='post'>{options}<button type='submit'>Save</button></form>"
        "<p class='muted'><a href='/status'>status</a></p></body></html>"
    )
