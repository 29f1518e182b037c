"""Texts into padded batches for a transformer's forward pass: tokenized once per ensemble call, batched
by token length.

Batches of texts of similar *token* length waste little compute on padding. Sorting by characters, as
a first guess, leaves batches whose longest text has twice the tokens of its shortest (emoji, URLs and
hashtags split into many tokens): measured on tweets, 1.3 to 1.5 times the time per text (BENCHMARKS.md,
section 6c).

Members built on the same encoder share its tokenizer: the fine-tuned transformer and the frozen
encoder under a linear head cut the same texts into the same tokens. Models loaded only to predict
hold one tokenizer object between them (:func:`shared_tokenizer`: a MiniLM's is 11 MB), and inside
:func:`shared_tokens` (the ensemble wraps each call in it) a text is tokenized once per distinct
tokenizer, whichever member asks first.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

# (tokenizer key, max_length) -> text -> token ids; set only inside shared_tokens().
_SHARED: contextvars.ContextVar[dict[tuple[str, int], dict[str, list[int]]] | None] = contextvars.ContextVar(
    "autoannotator_shared_tokens", default=None
)


# Batch widths are rounded up to a multiple of this. oneDNN compiles and caches kernels per input
# shape (up to 1,024 of them), so a long-lived worker that sees every width from 1 to 128 keeps
# hundreds of kernels: measured, 140 MB of a web worker's memory after 1,000 texts. Eight times fewer
# widths keep it to a few MB, for ~4 padding tokens per text (BENCHMARKS.md, section 7).
PAD_MULTIPLE = 8
# A batch's token count (rows x width, the row count of every weight matmul, by which oneDNN keys
# the kernels it compiles and keeps: ~2 MB per distinct count) is rounded up to a multiple of this.
# One-text calls then pad to 32, 64, 96 or 128 tokens (4 shapes, not 16), a last batch of 3 or 5
# rows to a multiple of 32 tokens per row.
TOKEN_MULTIPLE = 32


# Tokenizers that serving models share, by tokenizer_key; an entry goes when no model holds it.
_TOKENIZERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
# One lock per tokenizer object, around every call that sets its truncation or padding.
_CALL_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()
# Where a serialised fast tokenizer's pipeline starts, past its per-call truncation and padding.
_AFTER_PER_CALL_SETTINGS = ',"added_tokens":'


def tokenizer_key(tokenizer: Any) -> str:
    """What makes two tokenizers cut text the same way: a fast tokenizer's serialised pipeline
    (vocabulary, normaliser, pre-tokeniser, post-processor), else its vocabulary and special tokens;
    with its class, length limit, truncation side and pad token.

    The pipeline's truncation and padding are left out: they are per-call settings (:func:`token_ids`
    passes its own), which a tokenizer file carries as whoever saved it last left them (the packaged
    MiniLM's pads to 128, a fine-tuned member's saved copy to the longest text).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = backend.to_str()
        # The serialisation opens with version, truncation and padding; parsing the rest (the whole
        # vocabulary) only to drop them would leave MBs of freed objects behind in a serving process.
        start = pipeline.find(_AFTER_PER_CALL_SETTINGS)
        pipeline = pipeline[start:] if start >= 0 else pipeline
    else:
        pipeline = repr((sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens))
    wrapper = [getattr(tokenizer, a, None) for a in ("model_max_length", "truncation_side", "pad_token_id")]
    text = f"{type(tokenizer).__name__} {wrapper!r} {pipeline}"
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def shared_tokenizer(tokenizer: Any) -> Any:
    """The one tokenizer object this process's serving models use for ``tokenizer``'s way of cutting
    text: the first such one loaded, for as long as a model holds it (``tokenizer`` itself if none).

    Only for models that predict: :func:`token_ids` and :func:`tokenizer_lock` keep calls to a shared
    object safe from several threads at once.
    """
    key = tokenizer_key(tokenizer)
    with _REGISTRY_LOCK:
        kept = _TOKENIZERS.get(key)
        if kept is None:
            _TOKENIZERS[key] = kept = tokenizer
    return kept


def tokenizer_lock(tokenizer: Any) -> threading.Lock:
    """The lock to hold while calling ``tokenizer``. A Hugging Face fast tokenizer's call first sets
    truncation and padding on its Rust tokenizer when they differ from the last call's, so two
    threads asking for different lengths would each cut with the other's (or fail with "Already
    borrowed") without it."""
    with _REGISTRY_LOCK:
        lock = _CALL_LOCKS.get(tokenizer)
        if lock is None:
            _CALL_LOCKS[tokenizer] = lock = threading.Lock()
    return lock


@contextlib.contextmanager
def shared_tokens() -> Iterator[None]:
    """Within this block, members whose tokenizers are the same tokenize each text once between them."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def token_ids(tokenizer: Any, key: str, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text's token ids (special tokens included, truncated to ``max_length``), unpadded."""
    shared = _SHARED.get()
    memo = None if shared is None else shared.setdefault((key, max_length), {})
    todo = list(dict.fromkeys(texts)) if memo is None else [t for t in dict.fromkeys(texts) if t not in memo]
    found: dict[str, list[int]] = {}
    if todo:
        with tokenizer_lock(tokenizer):
            ids = tokenizer(todo, truncation=True, max_length=max_length, return_attention_mask=False)[
                "input_ids"
            ]
        found = dict(zip(todo, ids, strict=True))
        if memo is not None:
            memo.update(found)
    if memo is not None:
        found = memo
    return [found[t] for t in texts]


def batch_width(rows: int, longest: int, max_width: int) -> int:
    """The width a batch of ``rows`` texts whose longest has ``longest`` tokens is padded to: a
    multiple of :data:`PAD_MULTIPLE` that makes ``rows * width`` a multiple of :data:`TOKEN_MULTIPLE`
    (never beyond ``max_width``, the model's usable length, unless the text is longer)."""
    step = math.lcm(PAD_MULTIPLE, TOKEN_MULTIPLE // math.gcd(rows, TOKEN_MULTIPLE))
    return min(-(-longest // step) * step, max(max_width, longest))


def length_batches(
    ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device, max_width: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """``(positions, {"input_ids", "attention_mask"})`` per batch, texts ordered by token count so each
    batch pads to a length its texts nearly share, rounded up to a multiple of :data:`PAD_MULTIPLE`
    (never beyond ``max_width``, the model's usable length). ``positions`` index ``ids``."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(ids), batch_size):
        idx = order[start : start + batch_size]
        width = batch_width(len(idx), int(lengths[idx].max()), max_width)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : lengths[i]] = torch.as_tensor(ids[i], dtype=torch.long)
            mask[row, : lengths[i]] = 1
        yield idx, {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence vectors: the mean of each text's token states over its unpadded tokens, L2-normalised
    (``Encoder.embed``'s vectors, in torch and in the compiled graph alike)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
