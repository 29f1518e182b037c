"""Loading any specialist from its directory, and bringing a given model into a version."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from autoannotator.core.labels import LabelSet
from autoannotator.errors import LabelMappingError
from autoannotator.models.specialists.base import META_FILE, Specialist, read_meta, staged_dir
from autoannotator.models.specialists.transformer import TransformerSpecialist

if TYPE_CHECKING:
    from autoannotator.models.specialists.linear import _LinearSpecialist


def _linear_kinds() -> dict[str, type[_LinearSpecialist]]:
    """The linear kinds by name, imported when a version has one: scikit-learn, with the SciPy and
    pandas it imports, is ~110 MB of a process that serves transformer members only."""
    from autoannotator.models.specialists.linear import EmbeddingSpecialist, NgramSpecialist

    return {EmbeddingSpecialist.kind: EmbeddingSpecialist, NgramSpecialist.kind: NgramSpecialist}


def load_specialist(
    source: str | Path,
    labels: LabelSet,
    label_mapping: dict[str, str] | None = None,
    *,
    serving: bool = False,
) -> Specialist:
    """Load any specialist: a directory this package wrote, a plain HF model directory, or a hub id.
    ``serving``: for predictions only, weights in the forward passes' precision (see
    :meth:`TransformerSpecialist.load`), a small embedding cache (see :mod:`.encoder`)."""
    path = Path(str(source))
    if (path / META_FILE).is_file():
        meta = read_meta(path)
        linear = {} if meta.kind == TransformerSpecialist.kind else _linear_kinds()
        if meta.kind in linear:
            spec = linear[meta.kind].load(path, serving=serving)
            if spec.labels != labels:
                raise LabelMappingError(
                    f"{path} was trained for labels {list(spec.labels.names)!r}, "
                    f"not the project's {list(labels.names)!r}"
                )
            return spec
    return TransformerSpecialist.load(source, labels, label_mapping, serving=serving)


def import_member(
    source: str | Path, labels: LabelSet, directory: Path, label_mapping: dict[str, str] | None = None
) -> Specialist:
    """Bring a given model into a version directory of its own and return it loaded from there.

    A published version must hold every member it names, so that it can be reloaded, retrained or
    rolled back to whatever happens to ``source`` later. Specialist directories are copied; anything
    else (a plain HF directory, a hub id) is loaded, label-mapped and saved as a specialist.
    """
    path = Path(str(source))
    if (path / META_FILE).is_file():
        with staged_dir(directory) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        return load_specialist(directory, labels, label_mapping)
    spec = TransformerSpecialist.load(source, labels, label_mapping)
    spec.save(directory)
    return load_specialist(directory, labels)
