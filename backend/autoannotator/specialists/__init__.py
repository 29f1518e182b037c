"""Specialists: the small classifiers that vote. See ``base`` for the contract they share."""

from __future__ import annotations

from pathlib import Path

from autoannotator.errors import LabelMappingError
from autoannotator.labels import LabelSet
from autoannotator.specialists.base import META_FILE, Specialist, SpecialistMeta, TrainConfig, read_meta
from autoannotator.specialists.linear import EmbeddingSpecialist, NgramSpecialist
from autoannotator.specialists.transformer import TransformerSpecialist

__all__ = [
    "EmbeddingSpecialist",
    "NgramSpecialist",
    "Specialist",
    "SpecialistMeta",
    "TrainConfig",
    "TransformerSpecialist",
    "load_specialist",
]

_LINEAR_KINDS = {EmbeddingSpecialist.kind: EmbeddingSpecialist, NgramSpecialist.kind: NgramSpecialist}


def load_specialist(
    source: str | Path, labels: LabelSet, label_mapping: dict[str, str] | None = None
) -> Specialist:
    """Load any specialist: a directory this package wrote, a plain HF model directory, or a hub id."""
    path = Path(str(source))
    if (path / META_FILE).is_file():
        meta = read_meta(path)
        if meta.kind in _LINEAR_KINDS:
            spec = _LINEAR_KINDS[meta.kind].load(path)
            if spec.labels != labels:
                raise LabelMappingError(
                    f"{path} was trained for labels {list(spec.labels.names)!r}, "
                    f"not the project's {list(labels.names)!r}"
                )
            return spec
    return TransformerSpecialist.load(source, labels, label_mapping)
