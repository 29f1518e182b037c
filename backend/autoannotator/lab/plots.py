"""The picture of a simulation report: where a person would rather look than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: a report is a file, never a window

import matplotlib.pyplot as plt


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Three panels: final labels vs baselines; accuracy vs share reviewed; accuracy per model version."""
    llm_only = report["baselines"].get("llm_only")
    panels = 4 if llm_only and report.get("llm") else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.7 * panels, 5.2))
    final = report["final"]
    base = report["baselines"]

    # 1. Final labels against the baselines of the same run.
    names, accs, f1s = [], [], []
    for name, m in base["members_alone"].items():
        names.append(f"{name} alone")
        accs.append(m["accuracy"])
        f1s.append(m["macro_f1"])
    for key, title in (("majority_vote", "majority vote"), ("llm_only", "LLM only")):
        if key in base:
            names.append(title)
            accs.append(base[key]["accuracy"])
            f1s.append(base[key]["macro_f1"])
    names.append(f"AutoAnnotator ({final['review_share']:.0%} reviewed)")
    accs.append(final["accuracy"])
    f1s.append(final["macro_f1"])
    ax = axes[0]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], accs, width=0.4, label="accuracy", color="#4C72B0")
    ax.bar([x + 0.2 for x in xs], f1s, width=0.4, label="macro-F1", color="#DD8452")
    for x, a in zip(xs, accs, strict=True):
        ax.text(x - 0.2, a + 0.01, f"{a:.1%}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=7, rotation=20, ha="right")
    ax.set_ylim(0, 1.12)
    ax.set_title("Final labels vs. baselines (against gold)")
    ax.legend(loc="upper left", fontsize=8)

    # 2. The trade-off: accuracy reachable at each share reviewed (cold-start ensemble, perfect review).
    ax = axes[1]
    for name, curve in report.get("tradeoff", {}).get("curves", {}).items():
        ax.plot(curve["share"], curve["accuracy"], label=name)
    for pt in report.get("tradeoff", {}).get("epsilon_points", []):
        ax.scatter([pt["share"]], [pt["accuracy"]], marker="s", color="black", zorder=3)
        ax.annotate(
            f"ε={pt['epsilon']:.2f}",
            (pt["share"], pt["accuracy"]),
            textcoords="offset points",
            xytext=(5, -12),
            fontsize=8,
        )
    ax.scatter(
        [final["review_share"]],
        [final["accuracy"]],
        marker="*",
        s=200,
        color="crimson",
        zorder=4,
        label="this run (with retraining)",
    )
    ax.set_xlabel("share of the stream reviewed")
    ax.set_ylabel("final-label accuracy")
    ax.set_xlim(0, 1)
    ax.set_title("Accuracy vs. share reviewed\n(curves: cold-start members, perfect reviewer)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    # 3. Per served version: do retrainings help?
    ax = axes[2]
    versions = list(report["per_version"])
    acc_acc = [report["per_version"][v]["accepted_accuracy"] or 0 for v in versions]
    fin_acc = [report["per_version"][v]["final_accuracy"] for v in versions]
    items = [report["per_version"][v]["items"] for v in versions]
    ax.plot(versions, acc_acc, marker="o", label="accepted without review")
    ax.plot(versions, fin_acc, marker="o", label="final (after review)")
    for v, a, n in zip(versions, acc_acc, items, strict=True):
        ax.annotate(
            f"{n} items", (v, a), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8
        )
    ax.set_ylim(0.5, 1.0)
    ax.set_title("Accuracy per model version (retraining cycles)")
    ax.set_xlabel("version serving the items")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    # 4. What the routing saved: LLM calls and cost against labelling everything with the LLM.
    if panels == 4 and llm_only:
        ours = report["llm"]
        ax = axes[3]
        calls = [llm_only["calls"], ours.get("calls", 0)]
        bars = ax.bar(["LLM-only", "AutoAnnotator"], calls, color=["#999999", "#4C72B0"])
        costs = [llm_only.get("estimated_cost"), ours.get("cost")]
        for bar, n_calls, cost in zip(bars, calls, costs, strict=True):
            money = f"\n${cost:.4f}" if cost is not None else ""
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                n_calls,
                f"{n_calls} calls{money}",
                ha="center",
                va="bottom",
            )
        saved = 1 - calls[1] / calls[0] if calls[0] else 0.0
        ax.set_title(f"LLM calls: {saved:.0%} saved against LLM-only")
        ax.set_ylim(0, max(calls) * 1.25 + 1)
        ax.set_ylabel("LLM requests")

    llm = report.get("llm")
    subtitle = (
        f"{report['config']['stream_file']} — policy {report['config']['policy']}, reviewer "
        f"{report['config']['reviewer']}, {report['config']['n_seed']} seed labels, "
        f"{final['human_labels_total']} human labels in all"
    )
    if llm:
        subtitle += f", LLM calls {llm.get('calls', 0)} (${llm.get('cost', 0):.4f})"
    fig.suptitle(subtitle, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_certify(result: dict[str, Any], path: Path) -> Path:
    """``bench-certify``'s curves: the share reviewed against the number of calibration labels, per
    version and target, beside the oracle's share on the same items (dashed); bars are one sd."""
    targets = sorted({c["target"] for v in result["versions"] for c in v["costs"]})
    fig, axes = plt.subplots(1, len(targets), figsize=(6.2 * len(targets), 4.8), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for i, v in enumerate(result["versions"]):
            costs = [c for c in v["costs"] if c["target"] == target]
            if not costs:
                continue
            color = f"C{i % 10}"
            sizes = [c["calibration_labels"] for c in costs]
            name = f"{Path(v['stream']).parent.name} {v['version']} ({v['accuracy']:.0%} right)"
            ax.errorbar(
                sizes,
                [c["reviewed"]["mean"] for c in costs],
                yerr=[c["reviewed"]["sd"] for c in costs],
                marker="o",
                capsize=3,
                color=color,
                label=name,
            )
            ax.plot(sizes, [c["oracle"]["mean"] for c in costs], linestyle="--", color=color, alpha=0.7)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("calibration labels (audited, never trained on)")
        ax.set_ylabel("share reviewed")
        ax.set_title(f"target {target:.0%}: certified per label (solid) vs oracle (dashed)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"What a certified target reviews, {result['draws']} draws, δ = {result['delta']}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
