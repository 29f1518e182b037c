"""``autoannotator benchmark``: how fast the specialists label and learn on this machine.

Inference is timed on texts the members have not seen (the embedding cache would otherwise turn a
forward pass into a dictionary lookup), after one warm-up batch, as the median of several repeats.
Fine-tuning is timed once per kind on the same examples, with the configured epochs.

Memory is this process's resident set (RSS): before any member is loaded, once all are loaded and
warm (about what a web worker holds per project), and its peak while labelling and while each
member fine-tunes. On Linux the peak is reset before each phase (``/proc/self/clear_refs``), so
each phase's peak is its own; elsewhere it is the process's peak so far, and the result says so.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from autoannotator.core.labels import LabelSet
from autoannotator.models.specialists import Specialist, TrainConfig, load_specialist
from autoannotator.models.specialists.encoder import Encoder
from autoannotator.models.specialists.linear import EmbeddingSpecialist
from autoannotator.models.specialists.runtime import available_cpus


def _fresh(texts: Sequence[str], tag: str) -> list[str]:
    """The same texts made unseen by the embedding cache (a suffix costs at most a token or two)."""
    return [f"{t} ~{tag}" for t in texts]


def _status_kb(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """This process's resident memory now, in MiB (None where /proc cannot tell)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else round(kb / 1024, 1)


def process_memory_mb(pid: int) -> dict[str, float | None]:
    """Another process's resident memory now and its lifetime peak, in MiB (None where unknown)."""
    rss, peak = _status_kb("VmRSS", pid), _status_kb("VmHWM", pid)
    return {
        "rss_mb": None if rss is None else round(rss / 1024, 1),
        "peak_rss_mb": None if peak is None else round(peak / 1024, 1),
    }


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux 4.0+); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The peak resident memory in MiB since :func:`reset_peak`, else since the process began."""
    kb = _status_kb("VmHWM")
    if kb is None:  # no /proc: getrusage's lifetime peak (bytes on macOS, KiB elsewhere)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return round(kb / 1024, 1)


def _predict_rate(member: Specialist, texts: Sequence[str], repeats: int) -> float:
    rates = []
    for r in range(repeats):
        batch = _fresh(texts, f"r{r}") if isinstance(member, EmbeddingSpecialist) else list(texts)
        started = time.perf_counter()
        member.predict_proba(batch)
        rates.append(len(batch) / (time.perf_counter() - started))
    return statistics.median(rates)


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus_usable": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
    }


def run_benchmark(
    member_dirs: Sequence[Path],
    labels: LabelSet,
    texts: Sequence[str],
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    train_config: TrainConfig,
    repeats: int = 3,
) -> dict[str, Any]:
    """Inference rate of each member and of the whole ensemble; fine-tuning time of each member;
    the memory each phase takes (module docstring)."""
    memory: dict[str, Any] = {"rss_start_mb": rss_mb()}
    members = [load_specialist(d, labels) for d in member_dirs]
    for m in members:
        m.predict_proba(_fresh(texts[:32], "warm"))
    memory["rss_loaded_mb"] = rss_mb()
    memory["peak_is_per_phase"] = reset_peak()
    rows: list[dict[str, Any]] = []
    for m in members:
        rows.append(
            {
                "member": m.name,
                "kind": m.kind,
                "predict_texts_per_s": round(_predict_rate(m, texts, repeats), 1),
            }
        )
    memory["peak_predict_mb"] = peak_rss_mb()
    ensemble_s = sum(len(texts) / r["predict_texts_per_s"] for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        for m, row in zip(members, rows, strict=True):
            if isinstance(m, EmbeddingSpecialist):
                Encoder.shared(m.meta.base_model)._cache.clear()  # time the encoder too, as a refit would
            row["rss_before_fit_mb"] = rss_mb()
            reset_peak()
            started = time.perf_counter()
            m.fit(train_texts, train_labels, Path(tmp) / m.name, train_config)
            seconds = time.perf_counter() - started
            row["fit_peak_rss_mb"] = peak_rss_mb()
            row["fit_seconds"] = round(seconds, 2)
            row["fit_examples"] = len(train_texts)
            row["fit_epochs"] = train_config.epochs if m.kind == "transformer" else None
            row["fit_example_epochs_per_s"] = (
                round(len(train_texts) * train_config.epochs / seconds, 1)
                if m.kind == "transformer"
                else None
            )
    return {
        "machine": machine(),
        "n_texts": len(texts),
        "members": rows,
        "ensemble_predict_texts_per_s": round(len(texts) / ensemble_s, 1),
        "memory": memory,
    }


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Those loggers at WARNING while the block runs: one INFO line per HTTP request (httpx, the
    app's own under a benchmark) would bury the benchmark's lines."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def forward_settings() -> dict[str, str]:
    """The settings that make a server or worker compute as this process does (the CLI's
    ``--precision``, ``--runtime`` and ``--openvino-weights``), so its time is comparable with the
    raw forward pass here."""
    from autoannotator.models.specialists.compiled import configured_runtime, configured_weights
    from autoannotator.models.specialists.runtime import configured_precision

    return {
        "AUTOANNOTATOR_PRECISION": configured_precision(),
        "AUTOANNOTATOR_RUNTIME": configured_runtime(),
        "AUTOANNOTATOR_OPENVINO_WEIGHTS": configured_weights(),
    }
