"""What the demo tells its user: progress lines while it works (:class:`Console`) and, at the end,
a summary counted from what Label Studio itself holds (:func:`summarize`), not from what the
backend says it did.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from autoannotator.demo.tasks import GOLD_FIELD, REVIEW_TAB
from autoannotator.labelstudio.fields import REVIEWED_BY, in_tab


def _plain(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump())
    return dict(obj.dict())


def predicted_label(prediction: dict[str, Any]) -> str | None:
    for region in prediction.get("result") or []:
        choices = (region.get("value") or {}).get("choices") or []
        if region.get("type") == "choices" and choices:
            return str(choices[0])
    return None


def _annotated(task: dict[str, Any]) -> bool:
    if any(not a.get("was_cancelled") for a in (task.get("annotations") or []) if isinstance(a, dict)):
        return True
    return bool(task.get("total_annotations"))


@dataclass(frozen=True)
class Summary:
    """What Label Studio holds once the demo is ready, for the tasks nobody annotated yet.

    pre-labelled: a prediction of ``version`` with a label; sent to review: those flagged
    ``aa_needs_review`` (exactly the "Needs review" tab); auto-labelled: the rest of the
    pre-labelled ones. Accuracies compare the prediction with the dataset's own label.
    """

    version: str
    tasks: int
    annotated: int
    prelabelled: int
    auto_labelled: int
    to_review: int
    llm_labelled: int
    correct_all: int
    correct_auto: int
    correct_review: int
    in_review_tab: int | None = None

    @staticmethod
    def _share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    @property
    def accuracy_all(self) -> float | None:
        return self._share(self.correct_all, self.prelabelled)

    @property
    def accuracy_auto(self) -> float | None:
        return self._share(self.correct_auto, self.auto_labelled)

    @property
    def accuracy_review(self) -> float | None:
        return self._share(self.correct_review, self.to_review)

    @property
    def review_share(self) -> float | None:
        return self._share(self.to_review, self.prelabelled)

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "accuracy_all": self.accuracy_all,
            "accuracy_auto": self.accuracy_auto,
            "accuracy_review": self.accuracy_review,
            "review_share": self.review_share,
        }


def summarize(tasks: Iterable[Any], version: str, in_review_tab: int | None = None) -> Summary:
    """Count and score the tasks as Label Studio returned them (``ls.tasks.list(fields="all")``)."""
    n = annotated = prelabelled = auto = review = llm = 0
    correct_all = correct_auto = correct_review = 0
    for raw in tasks:
        task = _plain(raw)
        n += 1
        if _annotated(task):
            annotated += 1
            continue
        data = task.get("data") or {}
        mine = [
            p for p in (_plain(p) for p in task.get("predictions") or []) if p.get("model_version") == version
        ]
        label = predicted_label(mine[-1]) if mine else None
        if label is None:
            continue
        prelabelled += 1
        right = label == data.get(GOLD_FIELD)
        correct_all += right
        if in_tab(data):
            review += 1
            correct_review += right
        else:
            auto += 1
            correct_auto += right
            llm += data.get(REVIEWED_BY) == "llm"
    return Summary(
        version,
        n,
        annotated,
        prelabelled,
        auto,
        review,
        llm,
        correct_all,
        correct_auto,
        correct_review,
        in_review_tab,
    )


@dataclass(frozen=True)
class VersionRow:
    """One version of the loop, as Label Studio held it once that version's labelling run was done:
    its pre-labels' accuracy against the dataset's labels, the share it routed to review, the
    size of the Needs review tab, and the human labels (seed and reviews) so far."""

    version: str
    prelabelled: int
    accuracy: float | None
    routed_share: float | None
    in_review_tab: int | None
    human_labels: int

    @classmethod
    def of(cls, s: Summary) -> VersionRow:
        return cls(s.version, s.prelabelled, s.accuracy_all, s.review_share, s.in_review_tab, s.annotated)


def format_versions(rows: Iterable[VersionRow]) -> list[str]:
    """The loop, one line per version."""
    lines = ["  version  pre-labelled  accuracy  routed  Needs review  human labels"]
    for r in rows:
        tab = "?" if r.in_review_tab is None else str(r.in_review_tab)
        lines.append(
            f"  {r.version:7s}  {r.prelabelled:12d}  {_pct(r.accuracy):>8s}  {_pct(r.routed_share):>6s}"
            f"  {tab:>12s}  {r.human_labels:12d}"
        )
    return lines


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(s: Summary) -> list[str]:
    auto_share = s.auto_labelled / s.prelabelled if s.prelabelled else None
    lines = [
        f"  pre-labelled     {s.prelabelled:5d} tasks       accuracy {_pct(s.accuracy_all)}"
        " against the dataset's labels",
        f"  auto-labelled    {s.auto_labelled:5d} ({_pct(auto_share)})  accuracy {_pct(s.accuracy_auto)}",
        f"  sent to review   {s.to_review:5d} ({_pct(s.review_share)})  accuracy {_pct(s.accuracy_review)} "
        f'before review: the "{REVIEW_TAB}" tab lists them, least sure first',
    ]
    if s.llm_labelled:
        lines.insert(2, f"  of those, labelled by the LLM {s.llm_labelled}")
    return lines


class Console:
    """Timestamped lines, and one progress line redrawn in place on a terminal (every 10 s otherwise)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.tty = out.isatty()
        self._progress = ""
        self._last_plain = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self._clear()
        print(f"[{self.elapsed():6.1f}s] {text}", file=self.out, flush=True)

    def raw(self, text: str = "") -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"[:150]
        if self.tty:
            self.out.write("\r" + line.ljust(len(self._progress)))
            self.out.flush()
            self._progress = line
        elif time.monotonic() - self._last_plain >= 10:
            print(line, file=self.out, flush=True)
            self._last_plain = time.monotonic()

    def _clear(self) -> None:
        if self.tty and self._progress:
            self.out.write("\r" + " " * len(self._progress) + "\r")
            self.out.flush()
        self._progress = ""
        self._last_plain = 0.0


def bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * min(done, total) / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"
