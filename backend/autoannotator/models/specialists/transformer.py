"""A Hugging Face sequence classifier as a specialist: loaded once, batched, fine-tuned anew."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from autoannotator.core.labels import LabelSet, map_model_labels, project_columns
from autoannotator.errors import SpecialistLoadError, TrainingError
from autoannotator.models.specialists.base import (
    META_FILE,
    DescribedByMeta,
    SpecialistMeta,
    TrainConfig,
    check_texts,
    check_training_data,
    check_weights,
    read_meta,
    staged_dir,
    write_meta,
)
from autoannotator.models.specialists.batching import (
    length_batches,
    shared_tokenizer,
    token_ids,
    tokenizer_key,
    tokenizer_lock,
)
from autoannotator.models.specialists.compiled import (
    BATCH_ROWS,
    CompiledForward,
    LazyCompiled,
    WeightsOnDemand,
    uses_openvino,
)
from autoannotator.models.specialists.encoder import Encoder, concrete_encoder, resolve_model_source
from autoannotator.models.specialists.runtime import (
    configure_torch,
    default_device,
    inference_mode,
    usable_length,
    weights_dtype,
)
from autoannotator.models.specialists.trunk import (
    Trunk,
    base_of,
    frozen_depth,
    layer_view,
    layers_of,
    lower_modules,
    padded,
    same_weights,
)

logger = logging.getLogger(__name__)


def _served_weights(source: str, dtype: torch.dtype) -> PreTrainedModel:
    """A served member's torch weights, loaded when first needed (``TransformerSpecialist.model``)."""
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype)
    return model.to(default_device()).eval().requires_grad_(False)


# Parameters that conventionally get no weight decay (as in BERT's and HF Trainer's recipe).
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class TransformerSpecialist(DescribedByMeta):
    """Any ``AutoModelForSequenceClassification`` whose labels map onto the project's labels."""

    kind: ClassVar[str] = "transformer"
    incremental: ClassVar[bool] = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        meta: SpecialistMeta,
        targets: Sequence[int],
        directory: Path | None = None,
        batch_size: int = 32,
    ) -> None:
        # load() replaces it for a member served compiled: a skeleton whose weights load on first use.
        self._weights = WeightsOnDemand(model)
        self.tokenizer = tokenizer
        self.meta = meta
        self.targets = list(targets)
        self.directory = directory
        self.batch_size = batch_size
        device = next(model.parameters()).device
        self.device = default_device() if device.type == "meta" else device
        self.max_length = self._fit_length(int((meta.train_config or {}).get("max_length", 128)))
        # Tokenizers emit inputs (token_type_ids) that some architectures do not accept.
        self._model_inputs = set(inspect.signature(model.forward).parameters)
        self._tokenizer_key = tokenizer_key(tokenizer)
        # Set by share_trunk: the encoder's trunk this member runs on, and its own layers above it.
        self._shared: tuple[Trunk, torch.nn.Module] | None = None
        # Set by load(serving=True): the model will not change, so a compiled runtime may run it.
        self._serving = False
        self._compiled = LazyCompiled("logits", directory)

    @property
    def model(self) -> PreTrainedModel:
        """The torch model; for a member served compiled, loaded on first use (training, a shared
        trunk, the torch runtime), so that a compiled member holds its weights once, in OpenVINO."""
        return self._weights.get()

    @model.setter
    def model(self, model: PreTrainedModel) -> None:
        self._weights.set(model)

    @property
    def holds_weights(self) -> bool:
        """False while a member served compiled has not loaded its torch weights."""
        return self._weights.loaded

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        source: str | Path,
        labels: LabelSet,
        label_mapping: Mapping[str, str] | None = None,
        name: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        serving: bool = False,
    ) -> TransformerSpecialist:
        """Load a classifier from a hub id, a plain model directory or a specialist directory.

        The model's own labels (``config.id2label``) are mapped onto ``labels``; a model whose
        labels cannot be mapped is refused with a message naming the missing labels. ``serving``
        keeps the weights in the precision forward passes run in (half the memory in bf16); such a
        specialist predicts but cannot be fine-tuned or saved, and shares its tokenizer with the
        process's other serving models that cut text the same way (:func:`shared_tokenizer`).
        """
        configure_torch()
        src = resolve_model_source(source)
        meta = read_meta(Path(src)) if (Path(src) / META_FILE).is_file() else None
        dtype = weights_dtype(default_device()) if serving else torch.float32
        # Served compiled (a model file of its own, made from the weights on disk), the member needs
        # only the model's structure here; unless it froze lower layers to share the encoder's trunk.
        frozen = int(((meta.train_config if meta else None) or {}).get("frozen_layers", 0) or 0)
        compiled = serving and Path(src).is_dir() and not frozen and uses_openvino(default_device())
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
            if compiled:
                weights = WeightsOnDemand.skeleton(
                    AutoModelForSequenceClassification, src, functools.partial(_served_weights, src, dtype)
                )
                model = weights.structure
            else:
                model = AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise SpecialistLoadError(
                f"cannot load classifier {src!r}: {exc}. A hub id needs network access "
                "(HF_HUB_OFFLINE unset); offline, pass a local directory."
            ) from exc
        model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        targets = map_model_labels(model_labels, labels, label_mapping)
        if meta is None:
            meta = SpecialistMeta(
                kind=cls.kind,
                name=name or Path(src).name,
                labels=labels.names,
                base_model=src,
                train_config={"max_length": max_length},
                extra={"label_mapping": dict(label_mapping or {})},
            )
        else:
            meta = replace(meta, labels=labels.names, name=name or meta.name)
        if not compiled:
            model.to(default_device()).eval()
        if serving:
            model.requires_grad_(False)
            tokenizer = shared_tokenizer(tokenizer)
        directory = Path(src) if Path(src).is_dir() else None
        specialist = cls(model, tokenizer, meta, targets, directory, batch_size)
        specialist._serving = serving
        if compiled:
            specialist._weights = weights
        return specialist

    @classmethod
    def from_encoder(
        cls,
        encoder: str | Path,
        labels: LabelSet,
        name: str = "transformer",
        max_length: int = 128,
        batch_size: int = 32,
        seed: int = 0,
    ) -> TransformerSpecialist:
        """A new classification head on a pretrained encoder (cold start). It must be fit before use."""
        configure_torch()
        encoder = concrete_encoder(encoder)  # "auto" is recorded as what it picked here
        src = resolve_model_source(encoder)
        torch.manual_seed(seed)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
            model = AutoModelForSequenceClassification.from_pretrained(
                src,
                num_labels=len(labels),
                id2label=dict(enumerate(labels.names)),
                label2id={n: i for i, n in enumerate(labels.names)},
            )
        except (OSError, ValueError) as exc:
            raise SpecialistLoadError(f"cannot load encoder {src!r}: {exc}") from exc
        model.to(default_device()).eval()
        meta = SpecialistMeta(
            kind=cls.kind,
            name=name,
            labels=labels.names,
            base_model=str(encoder),
            train_config={"max_length": max_length},
        )
        return cls(model, tokenizer, meta, list(range(len(labels))), None, batch_size)

    def from_base(self, seed: int = 0) -> TransformerSpecialist | None:
        """A new head on the encoder this member's line was first built on (its ``base_model``), to
        be fit from scratch; ``None`` when the line began as a ready classifier (a model with its
        own head, loaded with a label mapping), which has no such encoder to start again from."""
        src = resolve_model_source(self.meta.base_model)
        try:
            architectures = AutoConfig.from_pretrained(src).architectures or []
        except (OSError, ValueError) as exc:
            raise SpecialistLoadError(f"cannot read the base model {src!r} of {self.name!r}: {exc}") from exc
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return None
        return type(self).from_encoder(
            self.meta.base_model,
            self.labels,
            name=self.name,
            max_length=int((self.meta.train_config or {}).get("max_length", 128)),
            batch_size=self.batch_size,
            seed=seed,
        )

    @property
    def frozen_layers(self) -> int:
        """How many lower layers (with the embeddings) this member kept from its encoder when it was
        last fine-tuned (``TrainConfig.frozen_layers`` as applied); 0 for one trained whole."""
        return int((self.meta.train_config or {}).get("frozen_layers", 0) or 0)

    @property
    def shared_depth(self) -> int:
        """The depth of the trunk it shares with an embedding member, 0 when it runs whole."""
        return 0 if self._shared is None else self._shared[0].depth

    def share_trunk(self, encoder: Encoder) -> int:
        """Run on ``encoder``'s trunk from now on, where this member's frozen lower layers are that
        encoder's weights, bit for bit, and both cut text into the same tokens; then hold the
        encoder's modules instead of its own copies. Returns the shared depth, 0 where nothing is
        shared (the member keeps running its whole model). For members loaded to serve."""
        if not self.frozen_layers:  # before touching the model, which a compiled member lacks
            return 0
        depth = frozen_depth(self.model, self.frozen_layers)
        own = layers_of(self.model)
        theirs = layers_of(encoder.model)
        if depth == 0 or own is None or theirs is None or len(theirs) <= depth:
            return 0
        if self._tokenizer_key != encoder.tokenizer_key or self.max_length != encoder.max_length:
            return 0
        trunk = encoder.trunk(depth)
        if not same_weights(lower_modules(self.model, depth), trunk.modules):
            return 0
        base_of(self.model).embeddings = base_of(encoder.model).embeddings
        for i in range(depth):
            own[i] = theirs[i]
        self._shared = (trunk, layer_view(self.model, depth, None))
        return depth

    def compile_for_serving(self) -> bool:
        """Compile this serving member's forward pass now where the runtime compiles it
        (``compiled``), so the first request does not wait for it; True if it is compiled."""
        return self._compiled_forward() is not None

    def _compiled_forward(self) -> CompiledForward | None:
        """The compiled model, where the runtime compiles and this member serves whole (loaded to
        serve, so it will not change, and not on a shared trunk); None where it runs torch."""
        if not self._serving or self._shared:
            return None
        return self._compiled.get(self.device)

    def _check_trainable(self, what: str) -> None:
        dtype = next(self.model.parameters()).dtype
        if dtype != torch.float32:
            raise TrainingError(
                f"{self.name!r} was loaded to serve, with {str(dtype).replace('torch.', '')} weights: "
                f"load it with serving=False to {what} it"
            )

    def _fit_length(self, wanted: int) -> int:
        return usable_length(self.model, self.tokenizer, wanted)

    # --------------------------------------------------------------- inference

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        with tokenizer_lock(self.tokenizer):
            enc = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        return {k: v.to(self.device) for k, v in enc.items() if k in self._model_inputs}

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, n_labels]`` probabilities in the project's label order.

        Batched by token length, in the process's inference precision (``runtime.inference_mode``).
        """
        clean = check_texts(texts)
        if not clean:
            return np.zeros((0, len(self.labels)))
        out = np.zeros((len(clean), len(self.targets)), dtype=np.float64)
        ids = token_ids(self.tokenizer, self._tokenizer_key, clean, self.max_length)
        pad_id = self.tokenizer.pad_token_id or 0
        compiled = self._compiled_forward()
        if compiled is not None:  # the torch model is not touched: a compiled member may not hold it
            rows = min(self.batch_size, BATCH_ROWS)
            for idx, batch in length_batches(ids, rows, pad_id, self.device, self.max_length):
                logits = torch.from_numpy(compiled(batch))
                out[idx] = torch.softmax(logits.float(), dim=-1).numpy()
            return project_columns(out, self.targets, len(self.labels))
        self.model.eval()
        with inference_mode(self.device):
            trunk, upper = self._shared or (None, self.model)
            states = trunk.states(clean) if trunk is not None else []
            for idx, batch in length_batches(ids, self.batch_size, pad_id, self.device, self.max_length):
                if trunk is None:
                    inputs = {k: v for k, v in batch.items() if k in self._model_inputs}
                    logits = upper(**inputs).logits
                else:
                    below = padded([states[i] for i in idx], batch["input_ids"].shape[1])
                    logits = upper(inputs_embeds=below, attention_mask=batch["attention_mask"]).logits
                out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return project_columns(out, self.targets, len(self.labels))

    def save(self, directory: Path) -> None:
        """Write this model as a specialist directory whose head is named with the project's labels.

        Only one-to-one label mappings can be saved this way (several model labels folded into one
        project label keep their original names, so the mapping would be lost on reload).
        """
        self._check_trainable("save")
        if sorted(self.targets) != list(range(len(self.labels))):
            raise TrainingError(
                f"{self.name!r} folds several model labels into one; keep loading it from its source"
            )
        model = copy.deepcopy(self.model)
        model.config.id2label = {col: self.labels.names[t] for col, t in enumerate(self.targets)}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        with staged_dir(Path(directory)) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_meta(tmp, self.meta)

    # ---------------------------------------------------------------- training

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        out_dir: Path,
        config: TrainConfig | None = None,
        weights: Sequence[float] | None = None,
    ) -> TransformerSpecialist:
        """Fine-tune a copy of this model with cross-entropy and AdamW; save it in ``out_dir``.

        ``self`` keeps serving untouched. Every field of ``config`` is used: learning rate, weight
        decay (not on biases and norms), epochs, batch size, max length, linear warm-up then decay,
        the seed that fixes initial shuffling, and ``frozen_layers``: the embeddings and that many
        lower layers keep their weights (at least one layer trains; an architecture that cannot be
        split trains whole), and the meta records the depth applied. ``weights`` scale each
        example's cross-entropy (the batch's loss is their weighted mean over the batch size, so
        all-1 weights change nothing).
        """
        self._check_trainable("fine-tune")
        config = config or TrainConfig()
        y = check_training_data(texts, labels, self.labels)
        clean = check_texts(texts)
        if sorted(self.targets) != list(range(len(self.labels))):
            raise TrainingError(
                f"{self.name!r} folds several model labels into one project label; fine-tuning "
                "needs a one-to-one label mapping"
            )
        inverse = {t: col for col, t in enumerate(self.targets)}
        y_model = torch.tensor([inverse[v] for v in y], dtype=torch.long)
        w_examples = check_weights(weights, len(clean))
        w_tensor = None if w_examples is None else torch.tensor(w_examples, dtype=torch.float32)

        started = time.perf_counter()
        torch.manual_seed(config.seed)
        model = copy.deepcopy(self.model)
        model.train()
        depth = frozen_depth(model, config.frozen_layers)
        if config.frozen_layers and not depth:
            logger.warning(
                "%s: %s has no lower layers to freeze (an architecture this backend cannot split, or "
                "a single layer); it trains whole",
                self.name,
                type(model).__name__,
            )
        model.requires_grad_(True)
        for module in lower_modules(model, depth):
            module.requires_grad_(False)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in trained if not any(k in n for k in _NO_DECAY)]
        no_decay = [p for n, p in trained if any(k in n for k in _NO_DECAY)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.learning_rate,
        )
        steps_per_epoch = math.ceil(len(clean) / config.batch_size)
        total = steps_per_epoch * config.epochs
        warmup = int(total * config.warmup_ratio)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        generator = torch.Generator().manual_seed(config.seed)
        epoch_losses = []
        saved_max_length, self.max_length = self.max_length, self._fit_length(config.max_length)
        try:
            bar = tqdm(total=total, desc=f"fine-tune {self.name}", unit="batch", leave=False)
            for _epoch in range(config.epochs):
                perm = torch.randperm(len(clean), generator=generator)
                running = 0.0
                for start in range(0, len(clean), config.batch_size):
                    idx = perm[start : start + config.batch_size]
                    batch = self._encode([clean[int(i)] for i in idx])
                    if w_tensor is None:
                        loss = model(**batch, labels=y_model[idx].to(self.device)).loss
                    else:
                        per_item = torch.nn.functional.cross_entropy(
                            model(**batch).logits.float(), y_model[idx].to(self.device), reduction="none"
                        )
                        loss = (per_item * w_tensor[idx].to(self.device)).mean()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    running += float(loss.detach()) * len(idx)
                    bar.update(1)
                epoch_losses.append(running / len(clean))
            bar.close()
        finally:
            self.max_length = saved_max_length
        model.eval()
        if not all(math.isfinite(v) for v in epoch_losses):
            raise TrainingError(
                f"fine-tuning {self.name!r} diverged (loss {epoch_losses}); nothing was saved"
            )

        # Save the head with the project's names so the directory reloads by plain name matching.
        model.config.id2label = {col: self.labels.names[t] for col, t in enumerate(self.targets)}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        meta = replace(
            self.meta,
            created_at=time.time(),
            n_train=len(clean),
            parent=str(self.directory) if self.directory else None,
            train_config=asdict(replace(config, frozen_layers=depth)),
            metrics={"train_loss": epoch_losses, "train_seconds": round(time.perf_counter() - started, 2)},
            extra={k: v for k, v in self.meta.extra.items() if k != "label_mapping"},
        )
        out_dir = Path(out_dir)
        with staged_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_meta(tmp, meta)
        logger.info(
            "fine-tuned %s on %d examples in %.1fs", self.name, len(clean), meta.metrics["train_seconds"]
        )
        return TransformerSpecialist(model, self.tokenizer, meta, self.targets, out_dir, self.batch_size)
