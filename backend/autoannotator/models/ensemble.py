"""k specialists behind one call: every member labels every text; the router decides what the votes mean."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.errors import LabelMappingError, SpecialistLoadError
from autoannotator.models.specialists import Specialist, load_specialist
from autoannotator.models.specialists.base import check_texts
from autoannotator.models.specialists.batching import shared_tokens
from autoannotator.models.specialists.runtime import release_freed_memory
from autoannotator.models.specialists.trunk import shared_trunk_states

ENSEMBLE_FILE = "ensemble.json"
# After a call with this many texts, the heap's freed activation buffers go back to the OS.
RELEASE_AFTER_TEXTS = 256
# Where members share a trunk, its hidden states are kept for the call (specialists.trunk): calls of
# more texts go through in slices of this many, which bounds that store (~20 MB in fp32 for MiniLM).
SHARED_TRUNK_SLICE = 256


@dataclass
class Ensemble:
    """The served model: members that share one label set, and the version string they were published as."""

    members: list[Specialist]
    labels: LabelSet
    version: str = "unversioned"
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an ensemble needs at least one specialist")
        for m in self.members:
            if m.labels != self.labels:
                raise LabelMappingError(
                    f"specialist {m.name!r} predicts {list(m.labels.names)!r}, "
                    f"the ensemble's labels are {list(self.labels.names)!r}"
                )

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``[k, n, L]``: each member's probabilities. Time per member is kept in ``timings``."""
        clean = check_texts(texts)
        out = np.zeros((self.k, len(clean), len(self.labels)))
        shares = any(getattr(m, "shared_depth", 0) for m in self.members)
        step = SHARED_TRUNK_SLICE if shares else max(1, len(clean))
        for start in range(0, len(clean), step):
            part = clean[start : start + step]
            # Members on the same encoder tokenize each text once between them, and members that
            # share its lower layers run those once.
            with shared_tokens(), shared_trunk_states():
                for i, m in enumerate(self.members):
                    started = time.perf_counter()
                    out[i, start : start + step] = m.predict_proba(part)
                    self.timings[m.name] = self.timings.get(m.name, 0.0) + time.perf_counter() - started
        if len(clean) >= RELEASE_AFTER_TEXTS:
            release_freed_memory()
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "labels": list(self.labels.names),
            "members": [
                {"name": m.name, "kind": m.kind, "base_model": m.meta.base_model, "n_train": m.meta.n_train}
                for m in self.members
            ],
        }


def load_ensemble(directory: Path, labels: LabelSet, *, serving: bool = False) -> Ensemble:
    """Load a published ensemble directory: ``ensemble.json`` names member sub-directories in vote order.
    ``serving``: to predict only, with weights in the forward passes' precision (it cannot be retrained)."""
    directory = Path(directory)
    desc = json.loads((directory / ENSEMBLE_FILE).read_text())
    members = [load_specialist(directory / sub, labels, serving=serving) for sub in desc["members"]]
    if serving:
        share_trunks(members)
        for member in members:  # where a compiled runtime serves, compile before the first request
            compile_now = getattr(member, "compile_for_serving", None)
            if compile_now is not None:
                compile_now()
    return Ensemble(members, labels, version=str(desc["version"]))


def share_trunks(members: Sequence[Specialist]) -> dict[str, int]:
    """Let each fine-tuned member whose frozen lower layers are an embedding member's encoder run on
    that encoder's trunk, computed once per text for both (``models.specialists.trunk``).
    Returns, per fine-tuned member that shares, the depth shared."""
    embedding: list[Any] = [m for m in members if hasattr(m, "trunk_depth")]
    shared: dict[str, int] = {}
    for member in members:
        share = getattr(member, "share_trunk", None)
        if share is None:
            continue
        for head in embedding:
            depth = int(share(head.encoder))
            if depth:
                head.trunk_depth = depth
                shared[member.name] = depth
                break
    return shared


def write_manifest(
    directory: Path,
    *,
    version: str,
    labels: LabelSet,
    members: Sequence[str],
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Write ``ensemble.json``, which makes ``directory`` loadable by :func:`load_ensemble`.

    ``members`` are the member sub-directories in vote order; they must exist already, so a manifest
    never names a member that is not there.
    """
    directory = Path(directory)
    missing = [m for m in members if not (directory / m).is_dir()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks the member directories {missing!r}")
    manifest = {
        "version": version,
        "labels": list(labels.names),
        "members": list(members),
        "created_at": time.time(),
        "parent": parent,
        "metrics": dict(metrics or {}),
        "note": note,
    }
    (directory / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The contents of ``directory/ensemble.json``, or :class:`SpecialistLoadError` saying what is wrong."""
    path = Path(directory) / ENSEMBLE_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecialistLoadError(f"{directory} is not an ensemble directory: no {ENSEMBLE_FILE}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecialistLoadError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), list):
        raise SpecialistLoadError(f"{path} does not list its members")
    return manifest
