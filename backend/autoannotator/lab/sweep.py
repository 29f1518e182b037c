"""``autoannotator sweep``: the paper's ε rule against another policy at the same review shares.

With k members the ε rule has only k - 1 operating points (review the items with at most 1, 2, ...
k - 1 votes short of unanimity). The sweep runs the full protocol (retraining on) at each of them,
then runs the challenger policy as a review budget at the share each ε run reviewed (rounded down to
whole items per chunk, so the challenger never reviews more), plus
any extra budgets asked for, and the target-accuracy policy at each target asked for (with the
run's audit). All runs share one cold start, so they differ only in routing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from autoannotator.core.labels import LabelSet
from autoannotator.core.policies import EpsilonRule, TargetAccuracy, policy_from_spec
from autoannotator.lab.simulate import ReviewSetup, SimulationConfig, run_simulation

logger = logging.getLogger(__name__)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    f = report["final"]
    return {
        "policy": report["config"]["policy"],
        "review_share": round(f["review_share"], 4),
        "accuracy": round(f["accuracy"], 4),
        "macro_f1": round(f["macro_f1"], 4),
        "human_labels_total": f["human_labels_total"],
        "retrainings": len(report["cycles"]),
        "promoted": sum(1 for c in report["cycles"] if c["promoted"]),
        "seconds": report["seconds"]["total"],
    }


def _target_summary(report: dict[str, Any]) -> dict[str, Any]:
    g = report["guarantee"]
    keys = (
        "target",
        "accepted_accuracy",
        "reached",
        "oracle_review_share",
        "review_to_oracle",
        "oracle_review_share_per_label",
        "review_to_oracle_per_label",
        "audit",
    )
    return {**_summary(report), "rule": "target", **{k: g.get(k) for k in keys}}


def run_sweep(
    config: SimulationConfig,
    challenger: str,
    make_review: Callable[[dict[str, str], LabelSet], ReviewSetup],
    k: int,
    extra_budgets: Sequence[float] = (),
    targets: Sequence[float] = (),
) -> dict[str, Any]:
    """Run every ε operating point, the challenger at the same shares, the extra budgets, and the
    target policy at each target."""
    out = Path(config.out_dir)
    first = run_simulation(replace(config, out_dir=out / "eps-1"), EpsilonRule(1 / k), make_review)
    if config.models:
        shared = config
    else:  # later runs start from the first run's cold-start members, so only routing differs
        initial = out / "eps-1" / "models" / "versions" / "v0001"
        shared = replace(config, models=tuple(str(initial / name) for name in first["start"]["members"]))
    runs: list[dict[str, Any]] = [{**_summary(first), "rule": "epsilon", "cold_start": first["start"]}]
    for votes in range(2, k):
        rep = run_simulation(
            replace(shared, out_dir=out / f"eps-{votes}"), EpsilonRule(votes / k), make_review
        )
        runs.append({**_summary(rep), "rule": "epsilon"})
    # Each ε twin becomes a whole number of items per chunk, rounded down, so a challenger run never
    # reviews more than its twin did; the extra budgets stay fractions of each chunk.
    twins = [f"{math.floor(r['review_share'] * config.chunk_size + 1e-9)}" for r in runs]
    budgets = twins + [repr(min(1.0, b)) for b in extra_budgets]
    for i, budget in enumerate(budgets):
        policy = policy_from_spec(f"budget:{budget}:{challenger}")
        rep = run_simulation(replace(shared, out_dir=out / f"challenger-{i}"), policy, make_review)
        runs.append({**_summary(rep), "rule": "challenger"})
    for target in targets:
        rep = run_simulation(
            replace(shared, out_dir=out / f"target-{target:g}"), TargetAccuracy(target), make_review
        )
        runs.append(_target_summary(rep))
    result = {
        "stream_file": str(config.stream_file),
        "n_seed": config.n_seed,
        "challenger": challenger,
        "runs": runs,
        "baselines": first["baselines"],
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    plot_sweep(result, out / "sweep.png")
    return result


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Accuracy and macro-F1 against share reviewed, one line per routing rule."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric in zip(axes, ("accuracy", "macro_f1"), strict=True):
        for rule, style in (("epsilon", "s--"), ("challenger", "o-")):
            pts = sorted((r["review_share"], r[metric]) for r in result["runs"] if r["rule"] == rule)
            label = "paper's ε rule" if rule == "epsilon" else f"budget over {result['challenger']}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for r in result["runs"]:
            if r["rule"] == "target":
                ax.plot(r["review_share"], r[metric], "D", color="tab:green")
                ax.annotate(f"target {r['target']:g}", (r["review_share"], r[metric]), fontsize=8,
                            xytext=(4, -10), textcoords="offset points")  # fmt: skip
        vote = result["baselines"]["majority_vote"][metric]
        ax.axhline(vote, color="grey", lw=1, ls=":", label="majority vote, no review")
        ax.set_xlabel("share of the stream reviewed")
        ax.set_ylabel(metric.replace("_", "-"))
        ax.set_xlim(0, min(1.02, max(0.5, max(r["review_share"] for r in result["runs"]) + 0.05)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{result['stream_file']} — {result['n_seed']} seed labels, oracle review, retraining on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
