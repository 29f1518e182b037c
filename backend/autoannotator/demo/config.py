"""What a demo run is told (:class:`DemoConfig`), the logins it makes once (:class:`Credentials`),
and the settings the backend and its workers get from both (:func:`backend_environment`).

Light on purpose: ``autoannotator demo``'s argparse reads its defaults from :class:`DemoConfig`
while it builds the parser, so importing this module must not start anything or load a model.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoannotator.errors import AutoAnnotatorError

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = REPO / "runs" / "demo"
LS_EXECUTABLE = REPO / ".venv-ls" / "bin" / "label-studio"
LS_USER = "admin@example.com"
BACKEND_USER = "demo"
# Faster defaults than the backend's, measured on 2 busy CPUs with 60 seed labels: the fine-tuned
# MiniLM member took 100 s to cold-start and half of each /predict, for 0.7 points of ensemble
# accuracy (its head barely leaves uniform probabilities after 6 epochs on 53 examples); and after so
# small a seed no task reaches the backend's default mean:0.75 (the highest mean probability was
# 0.75), so every task would go to review. A budget sends the least sure 30% of each batch instead.
DEMO_KINDS = ("embedding-linear", "ngram-linear")
DEMO_POLICY = "budget:0.3:mean"
# Variables of the caller's environment that would steer the backend or the workers away from what
# the demo sets.
_BACKEND_DROPPED = ("AUTOANNOTATOR_", "LABEL_STUDIO_", "BASIC_AUTH_")


class DemoError(AutoAnnotatorError):
    """The demo cannot go on; the message says what to do.

    Defined here, the module every other part of the demo imports, because each of them raises it.
    """


@dataclass(frozen=True)
class DemoConfig:
    """Everything a run can be told; the command line's defaults are these fields' defaults."""

    data_dir: Path = DEFAULT_DATA_DIR
    fresh: bool = False
    tasks: int = 600
    seed: int = 60
    random_seed: int = 0
    min_confidence: float = 0.7
    ls_port: int = 8080
    backend_port: int = 9090
    redis_port: int = 6379
    redis_db: int = 11
    kinds: tuple[str, ...] = DEMO_KINDS
    policy: str = DEMO_POLICY
    review_mode: str = "human"
    llm_base_url: str = ""
    llm_model: str = ""
    llm_api_key_env: str = "OPENAI_API_KEY"
    ls_executable: Path = LS_EXECUTABLE
    timeout_s: float = 1800.0
    exit_when_ready: bool = False
    # The loop: after the first labelling run, simulated reviewers answer this many tasks of the
    # Needs review tab (with the dataset's labels), which is one retraining (beta = reviews); the
    # new version relabels the project. As many times as rounds.
    reviews: int = 100
    rounds: int = 1

    @property
    def ls_url(self) -> str:
        return f"http://127.0.0.1:{self.ls_port}"

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{self.redis_db}"

    def project_params(self) -> dict[str, Any]:
        """What decides the project's tasks, models and routing: a reused project keeps its tasks,
        its model and its predictions, so it must have been made with the same."""
        return {
            "tasks": self.tasks,
            "seed": self.seed,
            "random_seed": self.random_seed,
            "min_confidence": self.min_confidence,
            "kinds": list(self.kinds),
            "policy": self.policy,
            "review_mode": self.review_mode,
        }


@dataclass(frozen=True)
class Credentials:
    """Made once per data dir and reused, so a second run logs into the same Label Studio."""

    ls_email: str
    ls_password: str
    ls_token: str
    backend_user: str
    backend_password: str

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        if path.is_file():
            try:
                return cls(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                raise DemoError(f"{path} is damaged ({exc}); run with --fresh to start over") from None
        made = cls(
            ls_email=LS_USER,
            ls_password=secrets.token_urlsafe(12),
            ls_token=secrets.token_hex(20),  # 40 hex chars: the legacy token format LS expects
            backend_user=BACKEND_USER,
            backend_password=secrets.token_urlsafe(12),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(made), fh, indent=2)
        return made

    def basic_auth(self) -> str:
        return base64.b64encode(f"{self.backend_user}:{self.backend_password}".encode()).decode()

    def secret_values(self) -> list[str]:
        """What must never reach the console, e.g. in a log tail shown after a failure."""
        return [self.ls_password, self.ls_token, self.backend_password]


def backend_environment(config: DemoConfig, creds: Credentials, seed_labels: int) -> dict[str, str]:
    """The settings (``autoannotator.settings``) the backend and both workers share."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_BACKEND_DROPPED)}
    env.update(
        {
            "AUTOANNOTATOR_MODEL_DIR": str(config.data_dir / "models"),
            "AUTOANNOTATOR_REDIS_URL": config.redis_url,
            "LABEL_STUDIO_URL": config.ls_url,
            "LABEL_STUDIO_API_KEY": creds.ls_token,
            "BASIC_AUTH_USER": creds.backend_user,
            "BASIC_AUTH_PASS": creds.backend_password,
            "AUTOANNOTATOR_SEED_LABELS": str(seed_labels),
            "AUTOANNOTATOR_REVIEW_MODE": config.review_mode,
            "AUTOANNOTATOR_POLICY": config.policy,
            "AUTOANNOTATOR_COLD_START_KINDS": ",".join(config.kinds),
            "AUTOANNOTATOR_RETRAIN_EVERY": str(max(1, config.reviews)),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if config.llm_base_url:
        env["AUTOANNOTATOR_LLM_BASE_URL"] = config.llm_base_url
    if config.llm_model:
        env["AUTOANNOTATOR_LLM_MODEL"] = config.llm_model
    key = os.environ.get(config.llm_api_key_env, "")
    if key:
        env["AUTOANNOTATOR_LLM_API_KEY"] = key
    return env
