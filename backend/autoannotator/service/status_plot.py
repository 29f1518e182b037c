"""The status page's picture of one project: what review buys, and what the routing saves.

Left: accuracy against the share reviewed for the served version, measured on held-out verified
labels when the version was trained (reviewing the least confident first, reviewers assumed
right), with the project's live routed share marked. Right: LLM calls and cost so far against
labelling every predicted task with the LLM.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.core.metrics import review_curve
from autoannotator.core.policies import policy_from_spec
from autoannotator.learning.pool import VerifiedItem
from autoannotator.models.ensemble import Ensemble

TRADEOFF_FILE = "tradeoff.json"
MIN_ITEMS = 5


def write_holdout_tradeoff(
    root: Path,
    version: str,
    ensemble: Ensemble,
    holdout: list[VerifiedItem],
    labels: LabelSet,
    policy: str,
) -> dict[str, Any] | None:
    """Measure the version's accuracy/review trade-off on held-out labels into ``root/tradeoff.json``,
    as the routing ``policy`` the project serves (a spec) labels and orders them: its labels, its
    confidence deciding what is reviewed first."""
    if len(holdout) < MIN_ITEMS:
        return None
    probs = ensemble.predict_proba([it.text for it in holdout])
    gold = np.array([labels.index(it.label) for it in holdout])
    decision = policy_from_spec(policy).decide(probs)
    curve = review_curve(decision.labels, decision.confidence, gold, steps=20)
    data = {"version": version, "n_holdout": len(holdout), "policy": policy, **curve}
    tmp = root / f".{TRADEOFF_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(root / TRADEOFF_FILE)
    return data


def read_holdout_tradeoff(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / TRADEOFF_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


def render(status: dict[str, Any], curve: dict[str, Any] | None) -> bytes:
    """PNG bytes of the two panels for one project's status (``status.project_status``).

    matplotlib is imported here, not with the module: the web app loads it only when a page asks
    for the picture. A bare ``Figure`` draws with Agg and keeps no global pyplot state between
    requests or threads."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    share = status.get("routed_share")
    if curve:
        left.plot(curve["share"], curve["accuracy"], marker=".", color="#4C72B0")
        if share is not None:
            expected = float(np.interp(share, curve["share"], curve["accuracy"]))
            left.scatter([share], [expected], s=160, marker="*", color="crimson", zorder=3)
            left.annotate(
                f"now: {share:.0%} routed → {expected:.0%}",
                (share, expected),
                textcoords="offset points",
                xytext=(8, -14),
            )
        left.set_title(
            f"{curve['version']}: accuracy vs. share reviewed\n"
            f"({curve['n_holdout']} held-out labels, routed by {curve.get('policy', 'mean probability')})"
        )
        left.set_ylim(min(curve["accuracy"]) - 0.05, 1.01)
    else:
        left.text(
            0.5, 0.5, "no held-out measurement yet\n(needs a trained version)", ha="center", va="center"
        )
        left.set_title("accuracy vs. share reviewed")
    left.set_xlim(0, 1)
    left.set_xlabel("share reviewed (least confident first)")
    left.set_ylabel("accuracy")
    left.grid(alpha=0.3)

    counters = status.get("counters") or {}
    predicted, calls = int(counters.get("predictions", 0)), int(counters.get("llm_calls", 0))
    bars = right.bar(["LLM-only", "AutoAnnotator"], [predicted, calls], color=["#999999", "#4C72B0"])
    cost = counters.get("llm_cost_usd", 0.0)
    per_call = cost / calls if calls else None
    labels = [
        f"{predicted} calls" + (f"\n${per_call * predicted:.4f}" if per_call is not None else ""),
        f"{calls} calls" + (f"\n${cost:.4f}" if calls else ""),
    ]
    for bar, text in zip(bars, labels, strict=True):
        right.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom")
    saved = 1 - calls / predicted if predicted else 0.0
    right.set_title(f"LLM calls: {saved:.0%} saved against LLM-only ({predicted} tasks predicted)")
    right.set_ylim(0, max(predicted, calls, 1) * 1.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    return out.getvalue()


def render_audit(routing: dict[str, Any]) -> bytes:
    """PNG bytes: per audited version, the audited accuracy of its auto-accepted labels with the
    95% exact interval as an error bar, the target as a line, and the LLM's agreement with people
    where the audit sampled LLM-labelled tasks (``status.routing_status``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    versions = [v for v in routing["audit"]["per_version"] if v["accepted"] or v["llm_reviewed"]]
    x = np.arange(len(versions))
    shown = [(i, v) for i, v in enumerate(versions) if v["accepted"]]
    if shown:
        xs = [i for i, _ in shown]
        acc = np.array([v["accuracy"] for _, v in shown])
        low = acc - np.array([v["low"] for _, v in shown])
        high = np.array([v["high"] for _, v in shown]) - acc
        ax.errorbar(
            xs,
            acc,
            yerr=np.vstack([low, high]),
            fmt="o",
            capsize=6,
            color="#4C72B0",
            label="auto-accepted (audit)",
        )
        for i, v in shown:
            ax.annotate(
                f"{v['correct']}/{v['accepted']}",
                (i, v["accuracy"]),
                textcoords="offset points",
                xytext=(8, 4),
            )
    llm = [(i, v) for i, v in enumerate(versions) if v["llm_reviewed"]]
    if llm:
        ax.scatter(
            [i for i, _ in llm],
            [v["llm_agreement"] for _, v in llm],
            marker="s",
            color="#DD8452",
            label="LLM agrees with people",
            zorder=3,
        )
    if routing.get("target") is not None:
        ax.axhline(
            routing["target"], color="crimson", linestyle="--", label=f"target {routing['target']:.0%}"
        )
    if not versions:
        ax.text(
            0.5, 0.5, "no audited auto-accepted label yet", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xticks(x, [v["version"] for v in versions])
    ax.set_xlim(-0.5, max(len(versions), 1) - 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy against people")
    ax.set_title(
        f"Live audit: {routing['audit']['labels']} labels, {routing['audit_share']:.0%} of predicted tasks"
    )
    ax.grid(alpha=0.3)
    if shown or llm or routing.get("target") is not None:
        ax.legend(loc="lower left")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    return out.getvalue()
