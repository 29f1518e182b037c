"""Two members built on one encoder run its lower layers once between them.

The fine-tuned member and the embedding member of a cold-started version start from the same encoder.
When the fine-tuned member trains with its embeddings and lower ``k`` layers frozen
(``TrainConfig.frozen_layers``), those stay the encoder's own weights, bit for bit, in every version of
its line. A served version then computes them once per text for both members (a :class:`Trunk`), and
each member runs only its own upper layers on the result: with MiniLM's 6 layers and ``k = 3``, 9 layer
passes per text instead of 12, and the fine-tuned member holds no copy of the shared weights.

Whether two members share is decided by comparing the weights themselves when a version loads to
serve (:func:`same_weights`), never by trusting a recorded setting: a member whose lower layers moved
(trained unfrozen, or under another precision) simply runs its whole model, with the same result.

Splitting a model needs nothing of its internals but three names that BERT-like encoders share
(``embeddings``, ``encoder.layer``, and the pooler they may have): :func:`layer_view` returns a view of
the model whose layer list is a slice of the original's and whose embeddings pass their input through,
so the model still builds its own attention masks. Architectures without those names are run whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from autoannotator.models.specialists.batching import length_batches, token_ids

# (id of a trunk, text) -> the trunk's hidden states of that text, unpadded [tokens, hidden];
# set only inside shared_trunk_states(), which the ensemble wraps each call in.
_STATES: contextvars.ContextVar[dict[tuple[int, str], torch.Tensor] | None] = contextvars.ContextVar(
    "autoannotator_trunk_states", default=None
)


class _PassThrough(nn.Module):
    """Stands in for a model's embeddings: the hidden states given as ``inputs_embeds`` go straight to
    its first remaining layer."""

    def forward(self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("a model cut above its embeddings takes hidden states as inputs_embeds")
        return inputs_embeds


def base_of(model: nn.Module) -> Any:
    """The bare encoder of ``model``: itself for an ``AutoModel``, its body for a model with a head."""
    return getattr(model, "base_model", model)


def layers_of(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's layer list, where the architecture is one this module can split (BERT, RoBERTa,
    MPNet, ELECTRA and their kin), else None."""
    base = base_of(model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if hasattr(base, "embeddings") and isinstance(layers, nn.ModuleList):
        return layers
    return None


def frozen_depth(model: nn.Module, wanted: int) -> int:
    """How many lower layers of ``model`` can be frozen when ``wanted`` are: ``wanted``, but at least
    one layer always trains, and 0 for an architecture that cannot be split."""
    layers = layers_of(model)
    if wanted <= 0 or layers is None:
        return 0
    return min(wanted, len(layers) - 1)


def lower_modules(model: nn.Module, depth: int) -> list[nn.Module]:
    """The embeddings and the first ``depth`` layers: what a member frozen at ``depth`` keeps."""
    layers = layers_of(model)
    if layers is None or depth <= 0:
        return []
    return [base_of(model).embeddings, *list(layers)[:depth]]


def same_weights(a: Sequence[nn.Module], b: Sequence[nn.Module]) -> bool:
    """Whether two lists of modules hold the same tensors: names, dtypes and every value."""
    if len(a) != len(b):
        return False
    for ma, mb in zip(a, b, strict=True):
        sa, sb = ma.state_dict(), mb.state_dict()
        if sa.keys() != sb.keys():
            return False
        for name, ta in sa.items():
            tb = sb[name]
            if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb.to(ta.device)):
                return False
    return True


def _copy_module(module: nn.Module) -> nn.Module:
    """A shallow copy with a submodule table of its own, so replacing a child does not touch the
    original; parameters and buffers stay the same objects."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


def layer_view(model: nn.Module, start: int, stop: int | None, *, pooler: bool = True) -> nn.Module:
    """``model`` running only its layers ``[start:stop]``: from the token ids when ``start`` is 0,
    else from hidden states passed as ``inputs_embeds``. The view shares every weight with ``model``.
    ``pooler=False`` drops the pooler of a bare encoder's view (a trunk's output is per token)."""
    layers = layers_of(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no embeddings and encoder.layer to split")
    base = base_of(model)
    base_view: Any = _copy_module(base)
    encoder_view = _copy_module(base.encoder)
    encoder_view.layer = nn.ModuleList(list(layers)[start:stop])
    base_view.encoder = encoder_view
    if start > 0:
        base_view.embeddings = _PassThrough()
    if not pooler and "pooler" in base_view._modules:
        base_view.pooler = None
    if base is model:
        return base_view
    view = _copy_module(model)
    setattr(view, str(model.base_model_prefix), base_view)
    return view


class Trunk:
    """An encoder's embeddings and first ``depth`` layers, computed once per text per ensemble call
    (inside :func:`shared_trunk_states`) for every member that runs its upper layers on them."""

    def __init__(
        self,
        model: nn.Module,
        depth: int,
        tokenizer: Any,
        tokenizer_key: str,
        max_length: int,
        batch_size: int,
    ) -> None:
        self.model = model
        self.depth = depth
        self.view = layer_view(model, 0, depth, pooler=False)
        self.tokenizer = tokenizer
        self.tokenizer_key = tokenizer_key
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.modules = lower_modules(model, depth)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, self.tokenizer_key, texts, self.max_length)

    def states(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's hidden states after the trunk, unpadded (``[tokens, hidden]``). Call it inside
        the caller's inference mode. Texts another member of the same call already ran come back
        without a forward pass."""
        memo = _STATES.get()
        found: dict[str, torch.Tensor] = {}
        if memo is not None:
            found = {t: memo[(id(self), t)] for t in texts if (id(self), t) in memo}
        todo = [t for t in dict.fromkeys(texts) if t not in found]
        if todo:
            ids = self.ids(todo)
            pad_id = self.tokenizer.pad_token_id or 0
            for idx, batch in length_batches(ids, self.batch_size, pad_id, self.device, self.max_length):
                hidden = self.view(**batch).last_hidden_state
                lengths = batch["attention_mask"].sum(1).tolist()
                for row, i in enumerate(idx):
                    found[todo[int(i)]] = hidden[row, : lengths[row]]
            if memo is not None:
                memo.update({(id(self), t): found[t] for t in todo})
        return [found[t] for t in texts]


def padded(states: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """``[len(states), width, hidden]``: the states stacked, zeros after each text's last token (masked
    out of attention, so what they hold changes nothing)."""
    first = states[0]
    out = torch.zeros((len(states), width, first.shape[-1]), dtype=first.dtype, device=first.device)
    for row, s in enumerate(states):
        out[row, : s.shape[0]] = s
    return out


@contextlib.contextmanager
def shared_trunk_states() -> Iterator[None]:
    """Within this block, members that run on the same :class:`Trunk` compute it once per text."""
    token = _STATES.set({})
    try:
        yield
    finally:
        _STATES.reset(token)
