"""Tiny, real transformers and a small synthetic corpus for fast tests (no hub, no downloads).

The corpus is generated from word lists so a classifier can learn it in a few seconds: each
sentence mixes class words with shared filler, and a share of them carry a misleading word, so
that models are good but not perfect and disagree on some items.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    PreTrainedTokenizerFast,
)

LABELS = ("bearish", "bullish", "neutral")

CLASS_WORDS = {
    "bearish": ["plunge", "slump", "losses", "downgrade", "selloff", "weak", "cut", "fall", "miss", "fear"],
    "bullish": ["rally", "surge", "gains", "upgrade", "record", "strong", "beat", "rise", "soar", "boom"],
    "neutral": [
        "announces",
        "meeting",
        "schedule",
        "report",
        "files",
        "holds",
        "names",
        "update",
        "plans",
        "says",
    ],
}
FILLER = [
    "the",
    "company",
    "shares",
    "today",
    "market",
    "stock",
    "investors",
    "quarter",
    "after",
    "on",
    "a",
    "its",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_corpus(n: int, seed: int = 0, noise: float = 0.15) -> list[tuple[str, str]]:
    """``n`` (text, label) pairs; ``noise`` of them carry a word of another class too."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(CLASS_WORDS[label], 2) + rng.sample(FILLER, 4)
        if rng.random() < noise:
            other = rng.choice([lab for lab in LABELS if lab != label])
            words.append(rng.choice(CLASS_WORDS[other]))
        rng.shuffle(words)
        out.append((" ".join(words), label))
    rng.shuffle(out)
    return out


def vocabulary() -> list[str]:
    words = sorted({w for ws in CLASS_WORDS.values() for w in ws} | set(FILLER))
    return SPECIAL + words


def save_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    fast.save_pretrained(directory)
    return fast


def tiny_config(**kw: object) -> BertConfig:
    return BertConfig(
        vocab_size=len(vocabulary()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **kw,
    )


def build_encoder(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT encoder with its tokenizer, saved in ``directory``."""
    import torch

    torch.manual_seed(seed)
    save_tokenizer(directory)
    BertModel(tiny_config()).save_pretrained(directory)
    return directory


def build_classifier(directory: Path, labels: list[str], seed: int = 0) -> Path:
    """A tiny sequence classifier whose outputs are named ``labels`` (e.g. NEG/NEU/POS or LABEL_0...)."""
    import torch

    torch.manual_seed(seed)
    save_tokenizer(directory)
    cfg = tiny_config(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    BertForSequenceClassification(cfg).save_pretrained(directory)
    return directory


# The project uid the in-process app tests serve: 2023-11-14T22:13:20Z is 1700000000.
PROJECT = "7.1700000000"


def publish_two_members(projects: Any, corpus: list[tuple[str, str]], encoder: Path, n: int = 150) -> str:
    """Publish a tiny two-member ensemble (embeddings + LR, n-grams) for :data:`PROJECT` in the model
    store ``projects`` (a ``ProjectModels``), trained on the first ``n`` items of ``corpus``."""
    from autoannotator.core.labels import LabelSet
    from autoannotator.models.specialists import EmbeddingSpecialist, NgramSpecialist

    labels = LabelSet.of(LABELS)
    texts, ys = [t for t, _ in corpus[:n]], [y for _, y in corpus[:n]]
    return str(
        projects.registry(PROJECT).save_ensemble(
            labels,
            {
                "m0-embedding": lambda d: EmbeddingSpecialist.untrained(encoder, labels).fit(texts, ys, d),
                "m1-ngram": lambda d: NgramSpecialist.untrained(labels).fit(texts, ys, d),
            },
            note="test",
        )
    )
