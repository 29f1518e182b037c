"""The live audit: a random share of predicted tasks that a person labels, to measure the labels
nobody reviews.

Why these labels, and only these, measure the auto-accepted ones:

* **Tasks routed for review are the hard ones.** The policy sent them because the specialists were
  unsure; how often a reviewer corrects them says how hard items go, not how good the accepted
  ones are. They train the specialists and never judge the accepted labels.
* **The seed annotations** are a fair sample of the project when they were taken in Label Studio's
  order, but the first version trains on them, so they cannot measure it, except the calibration
  seeds kept out of training (below).
* **An audit draw** is made for every unannotated task a version predicts, *whatever its route*:
  ``drawn(task, version, share)`` depends only on a hash of the two, never on the confidence, so
  the audited tasks are a uniform sample of what the version predicts, and those of them it
  auto-accepted are a uniform sample of what it auto-accepted. Drawing from every route (not only
  from accepted tasks) matters for the target policy: before it is certified it accepts nothing,
  and an audit of accepted tasks alone would never start.
* **No version trains on an audit label.** An audited task's annotation goes to this log, not to
  the verified pool, and the LLM's label of an audited task does not join the pool either. The
  labels stay fair calibration data for every later version: the target policy certifies its
  thresholds on them (:mod:`autoannotator.core.guarantee`).
* **Calibration seeds** (:data:`SEED` records): with a target policy, a share of the seed
  annotations (``drawn_for_calibration``, a hash of the task alone) goes to this log instead of the
  pool while no version exists yet. Taken in Label Studio's order before any model chose what
  people see, they are a fair sample of the project, and no version trains on them: they calibrate
  the target policy from the first version on, like the audit's labels. A task the "Seed" tab
  flagged was chosen by clustering, not at random, and is never drawn. The seeds measure no version
  (none predicted them), so the per-version estimates leave them out.

Each audit label records what the version said (its label, whether it accepted it, and the LLM's
label where the LLM reviewed the task), so the estimate per version is exact counting: the share of
audited accepted tasks whose label the person confirmed, with a two-sided exact (Clopper-Pearson)
interval, and the share of audited LLM-labelled tasks where the LLM agreed with the person.

The log is a JSONL file beside the pool's (one line per annotation, the latest per task wins, as an
annotator who edits an annotation means the edit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoannotator.core.guarantee import accuracy_interval
from autoannotator.errors import CorruptStoreError

logger = logging.getLogger(__name__)

ACCEPTED = "accepted"
ROUTED = "routed"
ROUTES = (ACCEPTED, ROUTED)
# The route and version of a calibration seed's record: annotated before any version predicted it.
SEED = "seed"

# The largest audit share a project may set: above it the audit is the review.
MAX_AUDIT_SHARE = 0.5


def check_share(share: float) -> float:
    """``share`` as a float in [0, MAX_AUDIT_SHARE], or a ValueError that says the range."""
    value = float(share)
    if not 0.0 <= value <= MAX_AUDIT_SHARE:
        raise ValueError(f"the audit share must be in [0, {MAX_AUDIT_SHARE}], got {share!r:.40}")
    return value


def _uniform(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: the same in every process, uniform over keys."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def drawn(task_id: int | str, version: str, share: float) -> bool:
    """Whether ``version``'s prediction of this task is audited: a uniform draw per (version, task),
    the same in every process and on every request, independent of anything the model said."""
    return share > 0.0 and _uniform(f"audit:{version}:{task_id}") < share


def drawn_for_calibration(task_id: int | str, share: float) -> bool:
    """Whether a seed annotation of this task is kept out of training to calibrate a target policy:
    a uniform draw per task, the same in every process, independent of its text and label."""
    return share > 0.0 and _uniform(f"calibration-seed:{task_id}") < share


@dataclass(frozen=True)
class AuditMark:
    """What a task's ``aa_audit`` field says: which version's label is audited, and its route.

    Written as ``"v0003 accepted: Positive"`` (the version, the route, the label), which is also
    what the annotator reads in the Data Manager column.
    """

    version: str
    route: str
    label: str

    def __post_init__(self) -> None:
        if self.route not in ROUTES or not self.version or " " in self.version:
            raise ValueError(f"bad audit mark {self!r}")

    @property
    def value(self) -> str:
        return f"{self.version} {self.route}: {self.label}"

    @classmethod
    def parse(cls, value: Any) -> AuditMark | None:
        """The mark in a task's data, or None for a missing or foreign value."""
        if not isinstance(value, str) or ": " not in value:
            return None
        head, label = value.split(": ", 1)
        version, _, route = head.partition(" ")
        try:
            return cls(version, route, label)
        except ValueError:
            return None


@dataclass(frozen=True)
class AuditRecord:
    """One audit label: the person's ``gold`` label for a task and what ``version`` had said."""

    task_id: int
    text: str
    gold: str
    version: str
    route: str
    predicted: str
    llm_label: str | None = None
    at: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.route == ACCEPTED

    @property
    def correct(self) -> bool:
        return self.predicted == self.gold

    @property
    def is_seed(self) -> bool:
        """A calibration seed: a person's label that no version predicted nor trained on."""
        return self.route == SEED

    @classmethod
    def seed(cls, task_id: int, text: str, gold: str) -> AuditRecord:
        return cls(task_id, text, gold, SEED, SEED, "")


# Each log's records as last parsed, by path, with the file's identity, size and mtime then.
_PARSED: dict[Path, tuple[tuple[int, int, int], list[AuditRecord]]] = {}


class AuditLog:
    """The project's audit labels, durable in a JSONL log (appended, flushed and fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def add(self, record: AuditRecord) -> None:
        line = json.dumps({**asdict(record), "at": record.at or time.time()}, ensure_ascii=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[AuditRecord]:
        """The latest label of every audited task, in the order tasks were first audited. The log is
        parsed again only when the file changed: every human annotation asks whether its task is a
        calibration seed, and the log grows with the project."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _PARSED.get(self.path)
        if cached is not None and cached[0] == key:
            return list(cached[1])
        records = self._parse()
        _PARSED[self.path] = (key, records)
        return list(records)

    def _parse(self) -> list[AuditRecord]:
        latest: dict[int, AuditRecord] = {}
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = AuditRecord(**json.loads(line))
                except (TypeError, ValueError) as exc:
                    if not line.endswith("\n"):  # a write cut short by a crash: the rest is whole
                        logger.warning("%s: ignoring a partial last line", self.path)
                        break
                    raise CorruptStoreError(f"{self.path}:{number}: not an audit record ({exc})") from exc
                latest[record.task_id] = record
        return list(latest.values())

    def __len__(self) -> int:
        return len(self.records())

    def audits(self) -> list[AuditRecord]:
        """The audit's labels alone, calibration seeds left out: what measures the versions."""
        return [r for r in self.records() if not r.is_seed]


@dataclass(frozen=True)
class Estimate:
    """Audited accepted labels of one version (or all): how many, how many right, and the exact
    interval for the accuracy of everything that version auto-accepted."""

    version: str
    audited: int  # audit labels of this version, every route
    accepted: int  # of them, tasks the version auto-accepted
    correct: int  # of those, labels the person confirmed
    low: float | None
    high: float | None
    llm_reviewed: int  # audited tasks the LLM had labelled
    llm_agreed: int  # of them, where the person gave the LLM's label

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.accepted if self.accepted else None

    @property
    def llm_agreement(self) -> float | None:
        return self.llm_agreed / self.llm_reviewed if self.llm_reviewed else None

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "accuracy": None if self.accuracy is None else round(self.accuracy, 4),
            "llm_agreement": None if self.llm_agreement is None else round(self.llm_agreement, 4),
        }


def estimate(records: Iterable[AuditRecord], version: str = "all", confidence: float = 0.95) -> Estimate:
    """The :class:`Estimate` of ``records`` (filter them by version first for a per-version one)."""
    items = list(records)
    accepted = [r for r in items if r.accepted]
    correct = sum(r.correct for r in accepted)
    low, high = accuracy_interval(correct, len(accepted), confidence) if accepted else (None, None)
    llm = [r for r in items if r.llm_label is not None]
    return Estimate(
        version,
        len(items),
        len(accepted),
        correct,
        None if low is None else round(low, 4),
        None if high is None else round(high, 4),
        len(llm),
        sum(r.llm_label == r.gold for r in llm),
    )


def per_version(records: Iterable[AuditRecord], confidence: float = 0.95) -> list[Estimate]:
    """One :class:`Estimate` per audited version, oldest first."""
    by_version: dict[str, list[AuditRecord]] = {}
    for r in records:
        by_version.setdefault(r.version, []).append(r)
    return [estimate(by_version[v], v, confidence) for v in sorted(by_version)]
