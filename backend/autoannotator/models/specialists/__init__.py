"""Specialists: the small classifiers that vote. See ``base`` for the contract they share.

The torch-backed kinds load on first use (PEP 562), so that the contract, ``TrainConfig`` and the
kinds' names can be read by a process that never runs a model (the CLI's parser, the web app's
settings) without paying for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autoannotator.models.specialists.base import Specialist, SpecialistMeta, TrainConfig

if TYPE_CHECKING:
    from autoannotator.models.specialists.linear import EmbeddingSpecialist, NgramSpecialist
    from autoannotator.models.specialists.loading import import_member, load_specialist
    from autoannotator.models.specialists.transformer import TransformerSpecialist

__all__ = [
    "EmbeddingSpecialist",
    "NgramSpecialist",
    "Specialist",
    "SpecialistMeta",
    "TrainConfig",
    "TransformerSpecialist",
    "import_member",
    "load_specialist",
]

_LAZY = {
    "EmbeddingSpecialist": "linear",
    "NgramSpecialist": "linear",
    "TransformerSpecialist": "transformer",
    "import_member": "loading",
    "load_specialist": "loading",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
