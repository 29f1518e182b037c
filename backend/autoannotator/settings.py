"""The backend's configuration: the only module that reads the environment.

Every setting is one field with its variable name, default and meaning in the field's metadata, so
the README's configuration table and the error messages come from the same place as the values.
Secrets (LLM key, Label Studio key, basic-auth password) are kept out of ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from autoannotator.core.limits import MAX_TEXT_CHARS
from autoannotator.core.precision import OPENVINO_WEIGHTS, PRECISIONS, RUNTIMES
from autoannotator.models.specialists.base import RETRAIN_STRATEGIES

REVIEW_MODES = ("llm", "human", "off")
# AUTOANNOTATOR_ENCODER's names that are not a hub id or a dir (see models/specialists/encoder.py).
ENCODER_KEYWORDS = ("minilm", "auto")
# AUTOANNOTATOR_SPECIALISTS=catalog or catalog:K: the K best catalog models for the project (Eq. 1).
CATALOG_PREFIX = "catalog"
DEFAULT_CATALOG_TOP_K = 3


def _setting(env: str, default: Any, help: str, secret: bool = False) -> Any:
    return field(default=default, repr=not secret, metadata={"env": env, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting the backend, its workers and the demo read; nothing else."""

    model_dir: Path = _setting(
        "AUTOANNOTATOR_MODEL_DIR",
        Path("models"),
        "where every project's model versions live (share it between workers)",
    )
    policy: str = _setting(
        "AUTOANNOTATOR_POLICY",
        "mean:0.75",
        "default routing policy spec (epsilon:0.34, mean:0.75, budget:0.2:mean, target:0.95, ...; "
        "set per project at /projects/<uid>/settings)",
    )
    audit_share: float = _setting(
        "AUTOANNOTATOR_AUDIT_SHARE",
        0.0,
        "default share of predicted tasks drawn for the live audit (a person labels them, to measure "
        "the auto-accepted labels; a target policy needs it > 0)",
    )
    calibration_seeds: float = _setting(
        "AUTOANNOTATOR_CALIBRATION_SEEDS",
        0.2,
        "with a target policy, the share of seed annotations (taken before the first version) kept "
        "out of training to certify the target on from the first version on",
    )
    max_text_chars: int = _setting(
        "AUTOANNOTATOR_MAX_TEXT_CHARS", MAX_TEXT_CHARS, "longer task texts are clipped"
    )
    basic_auth_user: str = _setting(
        "BASIC_AUTH_USER", "", "user Label Studio must send (basic auth); empty: off"
    )
    basic_auth_password: str = _setting("BASIC_AUTH_PASS", "", "its password", secret=True)
    redis_url: str = _setting(
        "AUTOANNOTATOR_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis for queues, counters, locks and modes"
    )
    review_mode: str = _setting(
        "AUTOANNOTATOR_REVIEW_MODE",
        "human",
        "default review mode: llm, human or off (switched per project at /projects/<uid>/settings)",
    )
    retrain_every: int = _setting(
        "AUTOANNOTATOR_RETRAIN_EVERY", 100, "beta: retrain when this many new verified labels arrived"
    )
    min_holdout: int = _setting(
        "AUTOANNOTATOR_MIN_HOLDOUT",
        10,
        "held-out verified labels needed to judge a new version; with fewer it is promoted unjudged",
    )
    gate_alpha: float = _setting(
        "AUTOANNOTATOR_GATE_ALPHA",
        0.0,
        "0: a new version that is worse on the held-out labels is rejected (the paper's rule); above 0: "
        "only when an exact sign test on the items the two versions disagree about calls the drop "
        "significant at this level",
    )
    refine_lr: float = _setting(
        "AUTOANNOTATOR_REFINE_LR",
        2e-5,
        "learning rate of the fine-tuned members at each retraining (the paper's 2e-5)",
    )
    refine_epochs: int = _setting(
        "AUTOANNOTATOR_REFINE_EPOCHS",
        3,
        "epochs of the fine-tuned members at each retraining (the paper's 3)",
    )
    self_training: float = _setting(
        "AUTOANNOTATOR_SELF_TRAINING",
        0.0,
        "self-training: at each retraining, at most this many pseudo-labels per verified training item, "
        "the served version's labels of unannotated tasks that a threshold calibrated on held-out verified "
        "labels calls confident; never judging a version, never in the pool (0: off)",
    )
    pseudo_weight: float = _setting(
        "AUTOANNOTATOR_PSEUDO_WEIGHT", 0.5, "a pseudo-label's training weight (a verified label's is 1)"
    )
    pseudo_precision: float = _setting(
        "AUTOANNOTATOR_PSEUDO_PRECISION",
        0.95,
        "how often held-out verified items at or above the pseudo-labels' confidence threshold must be right",
    )
    retrain_strategy: str = _setting(
        "AUTOANNOTATOR_RETRAIN_STRATEGY",
        "continual",
        "how the fine-tuned members retrain: `continual` (on the new items and as many older ones, the "
        "paper's), `mix` (on every verified item, from their current weights) or `refit` (from their "
        "encoder with a new head, on every verified item, with the cold start's learning rate and epochs)",
    )
    seed_labels: int = _setting(
        "AUTOANNOTATOR_SEED_LABELS",
        40,
        "human annotations a project needs before its specialists are cold-started",
    )
    specialists: tuple[str, ...] = _setting(
        "AUTOANNOTATOR_SPECIALISTS",
        (),
        "comma-separated Hugging Face ids or local dirs to serve instead of a cold start; or "
        "catalog:K for the K catalog models closest to the project's task (the paper's Eq. 1)",
    )
    catalog: str = _setting(
        "AUTOANNOTATOR_CATALOG",
        "",
        "catalog JSON for AUTOANNOTATOR_SPECIALISTS=catalog:K (empty: the packaged one)",
    )
    task_description: str = _setting(
        "AUTOANNOTATOR_TASK",
        "",
        "what annotators label, for catalog selection (empty: the LS project's title and description)",
    )
    encoder: str = _setting(
        "AUTOANNOTATOR_ENCODER",
        "auto",
        "base encoder of cold-started specialists: minilm (packaged), a hub id, a dir, or auto "
        "(with a CUDA GPU, all-mpnet-base-v2 from encoders/all-mpnet-base-v2 under the working "
        "directory when `make encoder-mpnet` installed it there, else minilm; decided when a version "
        "is built, which records the concrete encoder)",
    )
    cold_start_kinds: tuple[str, ...] = _setting(
        "AUTOANNOTATOR_COLD_START_KINDS",
        ("transformer", "embedding-linear", "ngram-linear"),
        "kinds of the cold-started specialists, one member each",
    )
    cold_start_lr: float = _setting(
        "AUTOANNOTATOR_COLD_START_LR",
        5e-5,
        "learning rate of the fine-tuned member at the cold start (its head starts random)",
    )
    cold_start_epochs: int = _setting(
        "AUTOANNOTATOR_COLD_START_EPOCHS", 6, "epochs of the fine-tuned member at the cold start"
    )
    embedding_layers: int = _setting(
        "AUTOANNOTATOR_EMBEDDING_LAYERS",
        0,
        "the cold-started embedding member pools its encoder's states after this many layers instead of "
        "the last (fewer layers, less time per prediction; 0: the last)",
    )
    shared_layers: int = _setting(
        "AUTOANNOTATOR_SHARED_LAYERS",
        0,
        "lower encoder layers (with the embeddings) the fine-tuned member keeps frozen at the cold start "
        "and at every retraining, so that a served version runs them once per text for it and the "
        "embedding member on the same encoder (0: it trains whole, and runs whole)",
    )
    cold_start_contrastive: int = _setting(
        "AUTOANNOTATOR_COLD_START_CONTRASTIVE",
        0,
        "SetFit-style pairs per seed label that reshape the encoder before the cold start (0: off)",
    )
    cold_start_simcse: int = _setting(
        "AUTOANNOTATOR_COLD_START_SIMCSE",
        0,
        "before the cold start, adapt the encoder without labels (unsupervised SimCSE) to at most this "
        "many of the project's task texts (0: off)",
    )
    label_studio_url: str = _setting(
        "LABEL_STUDIO_URL", "", "Label Studio's URL for the workers (empty: the hostname LS sends to /setup)"
    )
    label_studio_api_key: str = _setting(
        "LABEL_STUDIO_API_KEY",
        "",
        "Label Studio API key (legacy token or personal access token)",
        secret=True,
    )
    llm_base_url: str = _setting(
        "AUTOANNOTATOR_LLM_BASE_URL", "https://api.openai.com/v1", "any OpenAI-compatible endpoint"
    )
    llm_model: str = _setting("AUTOANNOTATOR_LLM_MODEL", "gpt-4o-mini", "the chat model that reviews")
    llm_api_key: str = _setting("AUTOANNOTATOR_LLM_API_KEY", "", "the LLM endpoint's key", secret=True)
    llm_timeout_s: float = _setting("AUTOANNOTATOR_LLM_TIMEOUT", 30.0, "seconds per LLM request")
    llm_concurrency: int = _setting("AUTOANNOTATOR_LLM_CONCURRENCY", 4, "LLM requests in flight per worker")
    llm_min_confidence: float = _setting(
        "AUTOANNOTATOR_LLM_MIN_CONFIDENCE",
        0.0,
        "an LLM label whose probability (from the endpoint's token log-probabilities) is below this goes "
        "to the human queue; 0 accepts every label, as do endpoints that return no log-probabilities",
    )
    llm_seeds: int = _setting(
        "AUTOANNOTATOR_LLM_SEEDS",
        0,
        "the fully automatic start: in llm mode, a project without human labels cold-starts from this "
        "many tasks the LLM labels, one per cluster of the encoder's embeddings (0: off)",
    )
    seed_tab: bool = _setting(
        "AUTOANNOTATOR_SEED_TAB",
        False,
        "before the cold start, flag the tasks to label first (one per cluster of the encoder's "
        'embeddings, as many as the cold start still needs) and list them in a "Seed" tab',
    )
    llm_price: tuple[str, ...] = _setting(
        "AUTOANNOTATOR_LLM_PRICE",
        (),
        "USD per 1M input,output tokens (e.g. 0.15,0.60); empty: the built-in table",
    )
    # How long each kind of rq job may run before rq kills it (and the pool lock's wait): a job past
    # its limit is failed and kept in rq's failed registry, and the next event or sync retries it.
    ingest_timeout_s: int = _setting(
        "AUTOANNOTATOR_INGEST_TIMEOUT", 300, "seconds one annotation's ingest job may run"
    )
    review_timeout_s: int = _setting(
        "AUTOANNOTATOR_REVIEW_TIMEOUT", 1800, "seconds one /predict batch's review job may run"
    )
    sync_timeout_s: int = _setting(
        "AUTOANNOTATOR_SYNC_TIMEOUT", 3600, "seconds a rebuild of the pool from Label Studio may run"
    )
    train_timeout_s: int = _setting(
        "AUTOANNOTATOR_TRAIN_TIMEOUT", 4 * 3600, "seconds one training (fine-tune, judge, publish) may run"
    )
    pool_lock_timeout_s: float = _setting(
        "AUTOANNOTATOR_POOL_LOCK_TIMEOUT", 120.0, "seconds a job waits for a project's pool lock"
    )
    # CPU threads: a process that runs forward passes takes its share of the machine's CPUs.
    threads: int = _setting(
        "AUTOANNOTATOR_THREADS",
        0,
        "torch/BLAS threads per process (0: the usable CPUs divided by AUTOANNOTATOR_CPU_SHARERS)",
    )
    cpu_sharers: int = _setting(
        "AUTOANNOTATOR_CPU_SHARERS",
        1,
        "processes on this machine that run forward passes at once (gunicorn workers + rq workers)",
    )
    precision: str = _setting(
        "AUTOANNOTATOR_PRECISION",
        "auto",
        "forward passes that serve: auto (bf16 where the CPU or GPU computes it natively, else fp32; "
        "fp16 on GPUs without bf16), fp32, bf16 or fp16; training stays fp32",
    )
    runtime: str = _setting(
        "AUTOANNOTATOR_RUNTIME",
        "auto",
        "what runs serving forward passes on a CPU: auto (openvino where the openvino extra is "
        "installed and forward passes run in fp32, else torch), torch, or openvino (1.7-2 times "
        "torch's speed in fp32 at the same memory; BENCHMARKS.md 7f)",
    )
    openvino_weights: str = _setting(
        "AUTOANNOTATOR_OPENVINO_WEIGHTS",
        "int8",
        "how OpenVINO holds the weights: int8 (weight-only, a quarter of the memory; 7f) or fp32 "
        "(outputs equal to torch's); converted models are cached in AUTOANNOTATOR_MODEL_DIR/openvino",
    )
    # Labelling runs: every new version predicts the project's unannotated tasks in the background.
    label_chunk: int = _setting(
        "AUTOANNOTATOR_LABEL_CHUNK",
        500,
        "tasks per labelling job (a budget policy routes its share of each chunk)",
    )
    label_timeout_s: int = _setting(
        "AUTOANNOTATOR_LABEL_TIMEOUT",
        900,
        "seconds one labelling job may run; a killed worker's job is retried once this has passed",
    )
    label_pause_s: float = _setting(
        "AUTOANNOTATOR_LABEL_PAUSE", 600.0, "seconds a labelling job waits for an unreachable Label Studio"
    )
    delete_old_predictions: bool = _setting(
        "AUTOANNOTATOR_DELETE_OLD_PREDICTIONS",
        False,
        "after a labelling run, delete the older versions' predictions from Label Studio",
    )

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ValueError(f"AUTOANNOTATOR_MAX_TEXT_CHARS must be >= 1, got {self.max_text_chars}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_password):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if not 0.0 <= self.calibration_seeds <= 0.5:
            raise ValueError(
                f"AUTOANNOTATOR_CALIBRATION_SEEDS must be in [0, 0.5], got {self.calibration_seeds}"
            )
        if not 0.0 <= self.audit_share <= 0.5:
            raise ValueError(f"AUTOANNOTATOR_AUDIT_SHARE must be in [0, 0.5], got {self.audit_share}")
        if self.policy.strip().lower().startswith("target") and self.audit_share <= 0.0:
            raise ValueError(
                f"AUTOANNOTATOR_POLICY={self.policy!r}: a target policy is certified on audit labels; "
                "set AUTOANNOTATOR_AUDIT_SHARE > 0 too (for example 0.05), or it would review every task"
            )
        if self.review_mode not in REVIEW_MODES:
            raise ValueError(
                f"AUTOANNOTATOR_REVIEW_MODE must be one of {REVIEW_MODES}, got {self.review_mode!r}"
            )
        if not self.encoder.strip():
            raise ValueError("AUTOANNOTATOR_ENCODER must name an encoder: minilm, auto, a hub id or a dir")
        if self.encoder.strip().lower() in ENCODER_KEYWORDS and self.encoder not in ENCODER_KEYWORDS:
            raise ValueError(
                f"AUTOANNOTATOR_ENCODER={self.encoder!r}: write it as {self.encoder.strip().lower()!r}"
            )
        if self.cold_start_simcse < 0:
            raise ValueError(f"AUTOANNOTATOR_COLD_START_SIMCSE must be >= 0, got {self.cold_start_simcse}")
        if self.cold_start_contrastive < 0:
            raise ValueError(
                f"AUTOANNOTATOR_COLD_START_CONTRASTIVE must be >= 0, got {self.cold_start_contrastive}"
            )
        if self.min_holdout < 0:
            raise ValueError(f"AUTOANNOTATOR_MIN_HOLDOUT must be >= 0, got {self.min_holdout}")
        if not 0 <= self.gate_alpha < 1:
            raise ValueError(f"AUTOANNOTATOR_GATE_ALPHA must be in [0, 1) (0: off), got {self.gate_alpha}")
        for name in (
            *("ingest_timeout_s", "review_timeout_s", "sync_timeout_s", "train_timeout_s"),
            *("label_timeout_s", "label_chunk"),
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{_env(name)} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"AUTOANNOTATOR_THREADS must be >= 0 (0: automatic), got {self.threads}")
        if self.cpu_sharers < 1:
            raise ValueError(f"AUTOANNOTATOR_CPU_SHARERS must be >= 1, got {self.cpu_sharers}")
        if self.self_training < 0:
            raise ValueError(f"AUTOANNOTATOR_SELF_TRAINING must be >= 0 (0: off), got {self.self_training}")
        for name in ("pseudo_weight", "pseudo_precision"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{_env(name)} must be in (0, 1], got {getattr(self, name)}")
        if self.retrain_strategy not in RETRAIN_STRATEGIES:
            raise ValueError(
                f"AUTOANNOTATOR_RETRAIN_STRATEGY must be one of {RETRAIN_STRATEGIES}, "
                f"got {self.retrain_strategy!r}"
            )
        if self.runtime not in RUNTIMES:
            raise ValueError(f"AUTOANNOTATOR_RUNTIME must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.openvino_weights not in OPENVINO_WEIGHTS:
            raise ValueError(
                f"AUTOANNOTATOR_OPENVINO_WEIGHTS must be one of {OPENVINO_WEIGHTS}, "
                f"got {self.openvino_weights!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"AUTOANNOTATOR_PRECISION must be one of {PRECISIONS}, got {self.precision!r}")
        if self.label_pause_s < 0:
            raise ValueError(f"AUTOANNOTATOR_LABEL_PAUSE must be >= 0, got {self.label_pause_s}")
        if self.label_pause_s >= self.label_timeout_s:
            raise ValueError(
                f"AUTOANNOTATOR_LABEL_PAUSE ({self.label_pause_s:g} s) must be shorter than "
                f"AUTOANNOTATOR_LABEL_TIMEOUT ({self.label_timeout_s} s): rq kills a job past its timeout"
            )
        if self.pool_lock_timeout_s <= 0:
            raise ValueError(f"AUTOANNOTATOR_POOL_LOCK_TIMEOUT must be > 0, got {self.pool_lock_timeout_s}")
        for name in ("retrain_every", "seed_labels", "llm_concurrency", "refine_epochs", "cold_start_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_env(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("llm_timeout_s", "refine_lr", "cold_start_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_env(name)} must be > 0, got {getattr(self, name)}")
        if self.embedding_layers < 0:
            raise ValueError(
                f"AUTOANNOTATOR_EMBEDDING_LAYERS must be >= 0 (0: the last), got {self.embedding_layers}"
            )
        if self.shared_layers < 0:
            raise ValueError(f"AUTOANNOTATOR_SHARED_LAYERS must be >= 0 (0: off), got {self.shared_layers}")
        if self.llm_seeds < 0:
            raise ValueError(f"AUTOANNOTATOR_LLM_SEEDS must be >= 0 (0: off), got {self.llm_seeds}")
        if not 0.0 <= self.llm_min_confidence < 1.0:
            raise ValueError(
                f"AUTOANNOTATOR_LLM_MIN_CONFIDENCE must be in [0, 1), got {self.llm_min_confidence}"
            )
        if self.llm_price:
            self.llm_prices()  # refuses a malformed price now, not at the first review
        self.catalog_top_k()  # refuses a malformed catalog:K now, not at the first training

    def catalog_top_k(self) -> int | None:
        """K of ``AUTOANNOTATOR_SPECIALISTS=catalog:K`` (``catalog`` alone: 3), or None for a model list."""
        picks = [s for s in self.specialists if s.split(":", 1)[0].strip().lower() == CATALOG_PREFIX]
        if not picks:
            return None
        if len(self.specialists) > 1:
            raise ValueError(
                "AUTOANNOTATOR_SPECIALISTS is either catalog:K or a list of models, not both; "
                f"got {','.join(self.specialists)!r}"
            )
        _, _, k = picks[0].partition(":")
        try:
            top_k = int(k) if k.strip() else DEFAULT_CATALOG_TOP_K
        except ValueError:
            raise ValueError(
                f"AUTOANNOTATOR_SPECIALISTS=catalog:K needs a whole number K, got {picks[0]!r}"
            ) from None
        if top_k < 1:
            raise ValueError(f"AUTOANNOTATOR_SPECIALISTS=catalog:K needs K >= 1, got {top_k}")
        return top_k

    def llm_prices(self) -> tuple[float, float] | None:
        """The configured (input, output) price per million tokens, or None for the built-in table."""
        return parse_llm_price(self.llm_price, "AUTOANNOTATOR_LLM_PRICE") if self.llm_price else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default: the process environment); unset or empty variables keep
        their defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"], "").strip()
            if not raw:
                continue
            try:
                values[f.name] = _convert(f.default, raw)
            except ValueError as exc:
                raise ValueError(
                    f"{f.metadata['env']}={raw if not f.metadata['secret'] else '***'!r}: {exc}"
                ) from None
        return cls(**values)


def _env(name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == name)


def _convert(default: Any, raw: str) -> Any:
    if isinstance(default, bool):
        return raw.lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, tuple):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return raw


def settings_table() -> str:
    """The configuration table of the README, generated from the fields above."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = "" if f.default is MISSING else f.default
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        cell = f"`{shown}`" if shown else "(empty)"
        rows.append(f"| `{f.metadata['env']}` | {cell} | {f.metadata['help']} |")
    return "\n".join(rows)


def parse_llm_price(parts: Sequence[str] | str, name: str) -> tuple[float, float]:
    """``"IN,OUT"`` (USD per million input and output tokens) as two numbers; ``name`` is what the
    message calls the setting (an environment variable or a command-line flag)."""
    given = parts.split(",") if isinstance(parts, str) else list(parts)
    try:
        price_in, price_out = (float(x) for x in given)
    except ValueError:
        raise ValueError(
            f"{name} must be two numbers 'input,output' in USD per million tokens, got {','.join(given)!r}"
        ) from None
    if price_in < 0 or price_out < 0:
        raise ValueError(f"{name} must not be negative")
    return price_in, price_out
