"""The backend's configuration: the only module that reads the environment.

Every setting is one field with its variable name, default and meaning in the field's metadata, so
the README's configuration table and the error messages come from the same place as the values.
Secrets (LLM key, Label Studio key, basic-auth password) are kept out of ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


def _setting(env: str, default: Any, help: str, secret: bool = False) -> Any:
    return field(default=default, repr=not secret, metadata={"env": env, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Only settings that something reads; review modes, Redis, the LLM and Label Studio's API come
    with the features that use them."""

    model_dir: Path = _setting(
        "AUTOANNOTATOR_MODEL_DIR",
        Path("models"),
        "where every project's model versions live (share it between workers)",
    )
    policy: str = _setting(
        "AUTOANNOTATOR_POLICY", "mean:0.75", "routing policy spec (epsilon:0.34, mean:0.75, margin:0.2, ...)"
    )
    max_text_chars: int = _setting("AUTOANNOTATOR_MAX_TEXT_CHARS", 20_000, "longer task texts are clipped")
    basic_auth_user: str = _setting(
        "BASIC_AUTH_USER", "", "user Label Studio must send (basic auth); empty: off"
    )
    basic_auth_password: str = _setting("BASIC_AUTH_PASS", "", "its password", secret=True)

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ValueError(f"AUTOANNOTATOR_MAX_TEXT_CHARS must be >= 1, got {self.max_text_chars}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_password):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")

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


def _convert(default: Any, raw: str) -> Any:
    if isinstance(default, bool):
        return raw.lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
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
        rows.append(f"| `{f.metadata['env']}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(rows)
