"""Where specialists run: torch thread count, device and inference precision, decided once per
process, never at import."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from autoannotator.core.precision import PRECISIONS

logger = logging.getLogger(__name__)

_configured = False

_precision = "auto"


def available_cpus() -> int:
    """CPUs this process may use (respects taskset / container CPU sets, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def threads_per_process(threads: int = 0, sharers: int = 1, cpus: int | None = None) -> int:
    """``threads`` if set, else this process's share of the usable CPUs when ``sharers`` processes
    on the machine (gunicorn workers, rq workers) run forward passes at the same time: each gets
    ``cpus // sharers`` threads, at least one, so together they never ask for more than there is."""
    if threads > 0:
        return threads
    return max(1, (cpus or available_cpus()) // max(1, sharers))


def configure_torch(threads: int | None = None) -> None:
    """Give torch (and the BLAS/OpenMP pools numpy and scikit-learn use) ``threads`` intra-op
    threads, by default one per usable CPU; the first call decides, unless ``threads`` is given.

    torch's default can exceed the CPUs a container grants, and several processes each taking every
    core oversubscribe them: threads spin while other processes want the same cores (the service
    sizes it with :func:`threads_per_process`). Inter-op parallelism buys nothing for one forward
    pass at a time.
    """
    global _configured
    if _configured and threads is None:
        return
    n = threads or available_cpus()
    torch.set_num_threads(n)
    threadpool_limits(limits=n)
    _configured = True
    logger.debug("torch and BLAS use %d threads", n)


def default_device() -> torch.device:
    """A GPU when one is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def usable_length(model: Any, tokenizer: Any, wanted: int) -> int:
    """``wanted`` tokens, or fewer when the model has fewer positions (a huge text must not crash)."""
    limits = [wanted, int(getattr(model.config, "max_position_embeddings", wanted) or wanted)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max < 1_000_000:  # "no limit" is a huge sentinel
        limits.append(tok_max)
    return min(limits)


def configure_precision(precision: str) -> None:
    """How forward passes that serve (not training steps) compute: ``fp32``, ``bf16``, ``fp16``, or
    ``auto``: bf16 where the hardware computes it natively (a CPU with AVX512-BF16 or AMX, a GPU with
    bf16), fp16 on other GPUs, fp32 on other CPUs. Weights stay fp32 (autocast), so fine-tuning is
    unchanged and one copy of each model serves both."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _precision = precision
    logger.debug("inference precision: %s", precision)


def configured_precision() -> str:
    """What :func:`configure_precision` was last given (``auto`` until then)."""
    return _precision


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower
        than fp32. torch exposes the checks privately; without them the answer is no. Asked once per process:
    every forward pass consults it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def inference_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision forward passes on ``device`` run in, or None for fp32."""
    wanted = _precision
    if wanted == "auto":
        if device.type == "cuda":
            wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            wanted = "bf16" if device.type == "cpu" and native_cpu_bf16() else "fp32"
    if wanted == "fp16" and device.type == "cpu":
        wanted = "fp32"  # fp16 matmuls on a CPU are emulated: never faster, less exact
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(wanted)


def weights_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model that only serves keeps its weights in: the one its forward passes compute in.

    In bf16 a MiniLM takes 45 MB instead of 90, and autocast has nothing left to cast; the results are
    those of fp32 weights under autocast to the bf16 resolution, since autocast rounds each weight to
    bf16 before using it (the embeddings and norms, which it would have kept in fp32, move the
    probabilities by at most 0.02: BENCHMARKS.md, section 6c). Models that will be fine-tuned stay
    fp32.
    """
    return inference_dtype(device) or torch.float32


@contextlib.contextmanager
def inference_mode(device: torch.device) -> Iterator[None]:
    """No autograd, and autocast to :func:`inference_dtype` where it is not fp32."""
    dtype = inference_dtype(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        yield


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library is not glibc (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS. glibc keeps the buffers a large batch's activations
    freed, and a long-lived web or label worker's resident memory then grows with its largest batch
    (measured: 60-80 MB after 1,000 texts, BENCHMARKS.md section 7). A few milliseconds; a no-op
    without glibc."""
    if _TRIM is not None:
        _TRIM(0)
