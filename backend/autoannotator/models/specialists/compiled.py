"""Forward passes compiled by OpenVINO for the CPU (``AUTOANNOTATOR_RUNTIME=openvino``).

On a CPU, OpenVINO runs the same MiniLM in fp32 up to twice as fast as torch's eager forward pass
with the same single thread and the same batches, and with int8 weights faster still (BENCHMARKS.md,
sections 7e and 7f): it fuses attention and layer norms into a few oneDNN kernels where torch runs
each operator on its own. It is the default where forward passes run in fp32 (``auto``). Where
the CPU computes bf16 natively it follows the process's precision
(:func:`~autoannotator.models.specialists.runtime.inference_dtype`), as torch's autocast does.

**Weights.** By default (``AUTOANNOTATOR_OPENVINO_WEIGHTS=int8``) each linear and embedding layer's
weights are stored as int8 per output channel (NNCF's weight-only compression) and decompressed
inside the kernels, so a MiniLM holds 23 MB of weights instead of 91; activations are never
quantized, which is what made torch's dynamic int8 change one label in ten (BENCHMARKS 6c). Here
0.3-1.3% of a member's labels change, and the accuracy at 20% reviewed moved by -0.15 to +0.20
points over eight paired runs (7f). ``fp32`` keeps the weights as trained: the outputs equal
torch's to 1e-7.

**Where the model comes from.** A model is traced (``openvino.convert_model``, with dynamic batch
and sequence dimensions, so every batch width reuses one compiled model), compressed, and written
as an OpenVINO IR file into a cache (:func:`ir_file`), once per weights file, weight format and
OpenVINO version; every later process reads that file. The tracing and compression run in a child
process: they leave a couple of hundred MB in the heap of the process that runs them, which a
serving worker would otherwise hold for good. A model served this way never loads its torch
weights at all, unless something asks for them (training, a shared trunk, the torch runtime).

Only models that no longer change are compiled: members loaded to serve and the frozen encoder.
Training, GPUs, and members that share a trunk with the encoder keep torch.

OpenVINO is optional (``pip install 'autoannotator[openvino]'``, which brings NNCF too). Asked for
without it, the first forward pass raises :class:`~autoannotator.errors.SpecialistLoadError`, which
says what to install; ``auto`` uses it where it is installed, the device is a CPU and forward passes
run in fp32 (a CPU without native bf16, or ``AUTOANNOTATOR_PRECISION=fp32``): where the CPU computes
bf16, torch's bf16 is fast enough and holds less (7e).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoannotator.core.precision import OPENVINO_WEIGHTS, RUNTIMES
from autoannotator.errors import SpecialistLoadError
from autoannotator.models.specialists.batching import mean_pooled

logger = logging.getLogger(__name__)

_runtime = "torch"
_weights = "int8"
_cache_dir: Path | None = None

# The inputs every compiled model takes: what ``batching.length_batches`` yields.
_INPUTS = ("input_ids", "attention_mask")

# What a compiled model computes: a sequence classifier's logits, or an encoder's pooled vectors.
KINDS = ("logits", "pooled")

# Rows per compiled forward pass. OpenVINO keeps buffers for the largest batch it has run: for a
# MiniLM, 134 MB above its weights after batches of 32 texts up to 128 tokens, 62 MB with batches of
# 8; and batches of 8 run as fast per text as batches of 32 (3.37 against 3.38 ms, one thread).
BATCH_ROWS = 8

_INSTALL = "pip install 'autoannotator[openvino]' (or set AUTOANNOTATOR_RUNTIME=torch)"


def set_runtime(runtime: str, *, weights: str | None = None, cache_dir: Path | None = None) -> None:
    """Which library runs serving forward passes on a CPU: ``torch``, ``openvino``, or ``auto``
    (OpenVINO where it is installed and forward passes run in fp32); and, for OpenVINO, the weight
    format (``int8`` or ``fp32``) and the folder its model files are cached in (None: the user's
    cache folder). Takes effect at each model's next forward pass; a compiled model is kept, should
    the runtime come back to OpenVINO."""
    global _runtime, _weights, _cache_dir
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if weights is not None and weights not in OPENVINO_WEIGHTS:
        raise ValueError(f"OpenVINO weights must be one of {OPENVINO_WEIGHTS}, got {weights!r}")
    _runtime = runtime
    if weights is not None:
        _weights = weights
    if cache_dir is not None:
        _cache_dir = Path(cache_dir)


def configured_runtime() -> str:
    """What :func:`set_runtime` was last given (``torch`` until then)."""
    return _runtime


def configured_weights() -> str:
    """The weight format OpenVINO compiles with (``int8`` until :func:`set_runtime` says otherwise)."""
    return _weights


def cache_dir() -> Path:
    """Where converted models are kept: the folder :func:`set_runtime` named, else
    ``$XDG_CACHE_HOME/autoannotator/openvino`` (``~/.cache/...``)."""
    if _cache_dir is not None:
        return _cache_dir
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "autoannotator" / "openvino"


@functools.cache
def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def uses_openvino(device: torch.device) -> bool:
    """Whether frozen models on ``device`` run through OpenVINO under the configured runtime."""
    if device.type != "cpu" or _runtime == "torch":
        return False
    if _runtime == "openvino":
        return True
    from autoannotator.models.specialists.runtime import inference_dtype

    return openvino_installed() and inference_dtype(device) is None


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


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise SpecialistLoadError(
            f"AUTOANNOTATOR_RUNTIME=openvino needs the openvino package: {_INSTALL}"
        ) from exc
    return ov


def convert(source: str, kind: str, weights: str, out_dir: Path) -> Path:
    """Trace the model at ``source`` (a classifier for ``logits``, an encoder for ``pooled``) and
    write it as ``out_dir/model.xml`` in the ``weights`` format. What the child process of
    :func:`ir_file` runs; it loads the torch weights, so a serving process never calls it itself."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    ov = _import_openvino()
    loader = {"logits": AutoModelForSequenceClassification, "pooled": AutoModel}[kind]
    model = loader.from_pretrained(source, dtype=torch.float32).eval()
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
    if weights == "int8":
        import nncf

        # Per output channel, asymmetric; every linear and embedding layer (NNCF's default for int8).
        converted = nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)
    out = Path(out_dir) / "model.xml"
    ov.save_model(converted, out, compress_to_fp16=False)
    return out


def _stamp(source: str) -> list[Any]:
    """What identifies the weights at ``source``: its weight and config files' names, sizes and
    modification times (a hub id, not a folder, is its own stamp)."""
    folder = Path(source)
    if not folder.is_dir():
        return [source]
    files = [f for f in sorted(folder.iterdir()) if f.suffix in {".safetensors", ".bin", ".json"}]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def ir_file(source: str, kind: str, weights: str | None = None) -> Path:
    """The OpenVINO model file for ``source`` as ``kind`` in the ``weights`` format (the configured
    one by default), converted now in a child process where the cache lacks it. Processes that ask
    at once wait for one conversion (a file lock), and a conversion that fails leaves nothing."""
    ov = _import_openvino()
    weights = weights or _weights
    if weights == "int8" and importlib.util.find_spec("nncf") is None:
        raise SpecialistLoadError(f"AUTOANNOTATOR_OPENVINO_WEIGHTS=int8 needs the nncf package: {_INSTALL}")
    ident = {
        "kind": kind,
        "weights": weights,
        "openvino": ov.__version__,
        "source": source,
        "files": _stamp(source),
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_dir()
    model = root / key / "model.xml"
    if model.is_file():
        return model
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if model.is_file():  # another process converted it while this one waited
            return model
        for stale in root.glob(f".{key}-*"):  # staging folders of conversions killed halfway
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _convert_in_child(source, kind, weights, staging)
            (staging / "source.json").write_text(json.dumps(ident, indent=1))
            shutil.rmtree(root / key, ignore_errors=True)  # a folder whose model file went missing
            os.replace(staging, root / key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s (%s, %s weights) for OpenVINO into %s", source, kind, weights, model.parent)
    return model


def _convert_in_child(source: str, kind: str, weights: str, out_dir: Path) -> None:
    package_root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", __name__, source, kind, weights, str(out_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise SpecialistLoadError(
            f"cannot convert {source!r} for OpenVINO ({kind}, {weights} weights):\n{tail}"
        )


class CompiledForward:
    """One model's forward pass compiled by OpenVINO from its model file: ``self(batch)`` returns its
    output as a float32 array. ``kind`` is ``logits`` (a sequence classifier) or ``pooled`` (an
    encoder's sentence vectors). Safe to call from several threads: each gets its own request."""

    def __init__(self, model_file: Path, kind: str, threads: int, bf16: bool) -> None:
        ov = _import_openvino()
        config = {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        core = ov.Core()
        self._compiled = core.compile_model(core.read_model(model_file), "CPU", config)
        self._output = self._compiled.outputs[0]
        self._local = threading.local()
        self.kind = kind
        self.model_file = Path(model_file)
        self.precision = "bf16" if bf16 else "fp32"
        logger.debug("compiled %s with OpenVINO, %s, %d threads", model_file, self.precision, threads)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        feed = {name: batch[name].cpu().numpy() for name in _INPUTS}
        return np.array(request.infer(feed)[self._output], dtype=np.float32)


class WeightsOnDemand:
    """A torch model that may hold only its structure until its weights are asked for.

    A model served compiled needs its config, its layers' layout and its forward signature, never its
    torch weights: :meth:`skeleton` builds it on torch's meta device, which allocates nothing, and
    :meth:`get` loads the weights (``load``) the first time anything asks, once, whichever thread
    asks first. A model built with its weights is simply held."""

    def __init__(self, model: Any, load: Callable[[], Any] | None = None) -> None:
        self._model = model
        self._load = load
        self._lock = threading.Lock()

    @classmethod
    def skeleton(cls, auto_class: Any, source: str, load: Callable[[], Any]) -> WeightsOnDemand:
        """``auto_class`` (``AutoModel``, ``AutoModelForSequenceClassification``) built from the
        config at ``source`` without weights; ``load`` gives the real model."""
        from transformers import AutoConfig

        with torch.device("meta"):
            return cls(auto_class.from_config(AutoConfig.from_pretrained(source)), load)

    @property
    def structure(self) -> Any:
        """The model as it is now: enough for its config and layout, with or without weights."""
        return self._model

    @property
    def loaded(self) -> bool:
        return self._load is None

    def get(self) -> Any:
        """The model with its weights, loaded now if they were not yet."""
        if self._load is not None:
            with self._lock:
                if self._load is not None:
                    self._model = self._load()
                    self._load = None
        return self._model

    def set(self, model: Any) -> None:
        with self._lock:
            self._model, self._load = model, None


class LazyCompiled:
    """The compiled forward pass of the model at ``source`` (a folder or hub id; None for a model
    that is not on disk, which never compiles), made on first use: compiling takes seconds, and a
    model that never predicts never pays them. None where the runtime keeps torch.

    Under ``auto`` a model that cannot be converted or compiled (an architecture OpenVINO's tracer
    does not take, NNCF missing) is served by torch, with a warning, once per setting; under
    ``openvino``, asked for by name, the error reaches the caller."""

    def __init__(self, kind: str, source: str | Path | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.source = None if source is None else str(source)
        self._lock = threading.Lock()
        self._compiled: CompiledForward | None = None
        self._key: Any = None
        self._failed: Any = None  # the key under which compiling failed, under auto

    def get(self, device: torch.device) -> CompiledForward | None:
        if self.source is None or not uses_openvino(device):
            return None
        from autoannotator.models.specialists.runtime import inference_dtype

        # Compiled anew when the precision, thread count or weight format changes (a benchmark's).
        dtype = inference_dtype(device)
        key = (dtype, torch.get_num_threads(), _weights)
        with self._lock:
            if self._failed == key:
                return None
            if self._compiled is None or self._key != key:
                try:
                    model_file = ir_file(self.source, self.kind)
                    compiled = CompiledForward(
                        model_file, self.kind, torch.get_num_threads(), dtype == torch.bfloat16
                    )
                except Exception:
                    if _runtime != "auto":
                        raise
                    logger.warning(
                        "cannot compile %s with OpenVINO; torch serves it (AUTOANNOTATOR_RUNTIME=auto)",
                        self.source,
                        exc_info=True,
                    )
                    self._failed = key
                    return None
                self._compiled, self._key = compiled, key
            return self._compiled


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m autoannotator.models.specialists.compiled SOURCE KIND WEIGHTS OUT_DIR``: what
    :func:`ir_file` runs in a child process."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("weights", choices=OPENVINO_WEIGHTS)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    convert(args.source, args.kind, args.weights, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
