"""Labelled JSONL files (``{"text": ..., "label": ...}`` per line), read with line-numbered errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autoannotator.errors import BadInputError


@dataclass(frozen=True)
class Example:
    key: str
    text: str
    label: str


def read_jsonl(path: Path, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """Every line must be a JSON object with a non-empty text and a label; a bad line names itself."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path} does not exist")
    out = []
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
            text, label = row.get(text_field), row.get(label_field)
            if not isinstance(text, str) or not text.strip():
                raise BadInputError(f"{path}:{lineno}: field {text_field!r} is missing or empty")
            if not isinstance(label, str) or not label.strip():
                raise BadInputError(f"{path}:{lineno}: field {label_field!r} is missing or not a string")
            out.append(Example(key=f"{path.stem}:{lineno}", text=text, label=label))
    if not out:
        raise BadInputError(f"{path} holds no examples")
    return out
