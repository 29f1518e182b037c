"""Where specialists run: torch thread count and device, decided once per process, never at import."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from threadpoolctl import threadpool_limits

logger = logging.getLogger(__name__)

_configured = False


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
