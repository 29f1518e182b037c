"""Forward passes compiled by OpenVINO for the CPU (``AUTOANNOTATOR_RUNTIME=openvino``).

On a CPU, OpenVINO runs the same MiniLM in fp32 about twice as fast as torch's eager forward pass
with the same single thread and the same batches, with outputs equal to 1e-7 (BENCHMARKS.md,
section 7e): it fuses attention and layer norms into a few oneDNN kernels where torch runs each
operator on its own. Where the CPU computes bf16 natively it follows the process's precision
(:func:`~autoannotator.models.specialists.runtime.inference_dtype`), as torch's autocast does.

A model is traced once (``openvino.convert_model``) with dynamic batch and sequence dimensions, so
every batch width the length batching makes reuses one compiled model, and compiled for this
process's thread count. Only models that no longer change are compiled: members loaded to serve and
the frozen encoder. Training, GPUs, and members that share a trunk with the encoder keep torch.

OpenVINO is optional (``pip install 'autoannotator[openvino]'``). Asked for without it, the first
forward pass raises :class:`~autoannotator.errors.SpecialistLoadError`, which says what to install;
``auto`` uses it where it is installed and the device is a CPU. The default is ``torch``: OpenVINO
holds about half as much memory again per worker (BENCHMARKS.md, 7e).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from autoannotator.core.precision import RUNTIMES
from autoannotator.errors import SpecialistLoadError
from autoannotator.models.specialists.batching import mean_pooled

logger = logging.getLogger(__name__)

_runtime = "torch"

# The inputs every compiled model takes: what ``batching.length_batches`` yields.
_INPUTS = ("input_ids", "attention_mask")

# Rows per compiled forward pass. OpenVINO keeps buffers for the largest batch it has run: for a
# MiniLM, 134 MB above its weights after batches of 32 texts up to 128 tokens, 62 MB with batches of
# 8; and batches of 8 run as fast per text as batches of 32 (3.37 against 3.38 ms, one thread).
BATCH_ROWS = 8


def set_runtime(runtime: str) -> None:
    """Which library runs serving forward passes on a CPU: ``torch``, ``openvino``, or ``auto``
    (OpenVINO where it is installed). Takes effect at each model's next forward pass; a compiled
    model is kept, should the runtime come back to OpenVINO."""
    global _runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    _runtime = runtime


def configured_runtime() -> str:
    """What :func:`set_runtime` was last given (``torch`` until then)."""
    return _runtime


@functools.cache
def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def uses_openvino(device: torch.device) -> bool:
    """Whether frozen models on ``device`` run through OpenVINO under the configured runtime."""
    if device.type != "cpu" or _runtime == "torch":
        return False
    return _runtime == "openvino" or openvino_installed()


class _Logits(torch.nn.Module):
    """A sequence classifier reduced to ``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _MeanPooled(torch.nn.Module):
    """An encoder reduced to its mean-pooled, L2-normalised sentence vectors (as ``Encoder.embed``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pooled(hidden, attention_mask)


class CompiledForward:
    """One model's forward pass compiled by OpenVINO: ``self(batch)`` returns its output as a
    float32 array. ``kind`` is ``logits`` (a sequence classifier) or ``pooled`` (an encoder's
    sentence vectors). Safe to call from several threads: each gets its own inference request."""

    def __init__(self, model: torch.nn.Module, kind: str, threads: int, bf16: bool) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise SpecialistLoadError(
                "AUTOANNOTATOR_RUNTIME=openvino needs the openvino package: "
                "pip install 'autoannotator[openvino]' (or set AUTOANNOTATOR_RUNTIME=torch)"
            ) from exc
        wrapper = {"logits": _Logits, "pooled": _MeanPooled}[kind](model).eval()
        # The example batch has a padded row: were every mask all ones, the model could trace a path
        # that drops the mask, and every later batch would attend to its padding.
        example = {
            "input_ids": torch.ones((2, 8), dtype=torch.long),
            "attention_mask": torch.ones((2, 8), dtype=torch.long),
        }
        example["attention_mask"][1, 5:] = 0
        # The tracer warns about shape checks it records as constants; for an encoder they are
        # constants (no cache, no causal mask), and the tests compare every width with torch.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            converted = ov.convert_model(
                wrapper,
                example_input=example,
                input=[(name, [-1, -1], ov.Type.i64) for name in _INPUTS],
            )
        config = {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        self._compiled = ov.Core().compile_model(converted, "CPU", config)
        self._output = self._compiled.outputs[0]
        self._local = threading.local()
        self.kind = kind
        self.precision = "bf16" if bf16 else "fp32"
        logger.debug(
            "compiled %s with OpenVINO, %s, %d threads", type(model).__name__, self.precision, threads
        )

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        feed = {name: batch[name].cpu().numpy() for name in _INPUTS}
        return np.array(request.infer(feed)[self._output], dtype=np.float32)


def compile_frozen(model: torch.nn.Module, kind: str) -> CompiledForward:
    """``model`` compiled for this process's threads and inference precision (a model that will not
    change again: the caller decides)."""
    from autoannotator.models.specialists.runtime import inference_dtype

    cpu = torch.device("cpu")
    return CompiledForward(model, kind, torch.get_num_threads(), inference_dtype(cpu) == torch.bfloat16)


class LazyCompiled:
    """A model's compiled forward pass, made on first use (compiling takes seconds, and a model that
    never predicts never pays them); None where the runtime keeps torch."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._compiled: CompiledForward | None = None
        self._key: Any = None

    def get(self, model: torch.nn.Module, device: torch.device) -> CompiledForward | None:
        if not uses_openvino(device):
            return None
        from autoannotator.models.specialists.runtime import inference_dtype

        # Compiled anew when the precision or thread count changes (a benchmark's switch).
        key = (inference_dtype(device), torch.get_num_threads())
        with self._lock:
            if self._compiled is None or self._key != key:
                self._compiled, self._key = compile_frozen(model, self.kind), key
            return self._compiled
