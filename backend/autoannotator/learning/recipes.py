"""What the cold start builds, readable without loading a model: the specialist kinds and the
cold-start recipe. The CLI's parser and the service's settings read these; ``coldstart`` runs them."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoannotator.models.specialists.base import TrainConfig

__all__ = ["KINDS", "ColdStartConfig"]

KINDS = ("transformer", "embedding-linear", "ngram-linear")


@dataclass(frozen=True)
class ColdStartConfig:
    """How the first specialists are built.

    The fine-tuned encoder gets a larger learning rate and more epochs than the paper's refinement
    defaults: at cold start its classification head is random, and 2e-5 for 3 epochs on a few
    hundred examples leaves it near chance. Later refinements use the paper's values, except a
    member that starts again from its encoder (the ``refit`` strategy), which uses this recipe.
    """

    encoder: str = "auto"  # MiniLM on a CPU; all-mpnet-base-v2 on a CUDA GPU when installed (encoder.py)
    kinds: tuple[str, ...] = KINDS
    transformer_train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-5, epochs=6))
    embedding_c: float = 4.0
    # The embedding member pools the encoder's states after this many layers (0: after the last).
    embedding_layers: int = 0
    ngram_c: float = 8.0
    min_per_label: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown specialist kinds {unknown!r}; choose from {list(KINDS)!r}")
        if not self.kinds:
            raise ValueError("cold start needs at least one specialist kind")
        if self.min_per_label < 1:
            raise ValueError("min_per_label must be >= 1")
