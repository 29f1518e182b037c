"""``autoannotator bench-label`` end to end: its own Label Studio, Redis and label workers, a small
project, a whole labelling run, and every process it started stopped again (also on Ctrl-C).

The version is the n-gram member the e2e tests publish (``tests/e2e_data.publish``), the texts a
small JSONL written here: no MiniLM and no shared dataset, so the test is e2e but not slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoannotator.demo.processes import alive, group_members
from autoannotator.lab.bench_label import markdown_table, task_texts
from tests.e2e_data import SEED, publish
from tests.ls_server import LS_EXECUTABLE

pytestmark = pytest.mark.e2e

CLI = Path(sys.executable).with_name("autoannotator")
UID = "1.1700000000"


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A published n-gram version and a JSONL of 60 texts (fewer than the tasks: they repeat)."""
    if not LS_EXECUTABLE.is_file():
        pytest.skip(f"{LS_EXECUTABLE} is absent: run `make install-ls`")
    store = tmp_path / "store"
    version = publish(store, UID, 1.0, "bench-label test")
    data = tmp_path / "texts.jsonl"
    rows = [{"text": text, "label": label} for label, texts in SEED.items() for text in texts]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return store / f"project-{UID}" / "versions" / version, data


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _gone(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (or still leading a process group) a few seconds on."""
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in pids if alive(p) or group_members(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_task_texts_repeat_the_pool_with_a_suffix() -> None:
    assert task_texts(["a", "b"], 5) == ["a", "b", "a (2)", "b (2)", "a (3)"]
    assert task_texts(["a", "b", "c"], 2) == ["a", "b"]


def test_bench_label_measures_a_whole_run_and_stops_what_it_started(tmp_path: Path) -> None:
    version_dir, data = _inputs(tmp_path)
    out = tmp_path / "out"
    argv = [str(CLI), "bench-label", "--version-dir", str(version_dir), "--data", str(data)]
    argv += ["--tasks", "200", "--workers", "2", "--chunk", "25", "--out", str(out), "--json"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout)

    assert result["tasks"] == 200 and result["workers"] == 2 and result["chunk"] == 25
    run = result["run"]
    assert run["state"] == "done"
    assert run["done"] == run["total"] == run["written"] == result["tasks"]
    assert run["chunks_done"] == run["chunks"] == 8
    assert result["run_s"] > 0 and result["run_tasks_per_s"] > 0
    assert result["raw"]["s"] > 0 and result["raw"]["tasks_per_s"] > 0
    assert result["speed_over_raw"] > 0
    assert result["speed_over_raw"] == pytest.approx(result["raw"]["s"] / result["run_s"], abs=1e-4)
    assert result["forward_share"] == pytest.approx(run["forward_ms"] / 1000 / result["run_s"], abs=1e-3)
    assert 0 < result["forward_share"] < 2  # two workers' forward passes overlap in time
    writes = result["ls_writes"]
    assert writes["tasks"] == 200 and writes["requests_each"] == 8 and writes["deleted"] == 200
    assert writes["import_predictions_s_per_1000"] > 0 and writes["set_data_field_s_per_1000"] > 0
    memory = result["worker_memory"]
    assert len(memory) == 2 and all(m["peak_rss_mb"] > 0 for m in memory)
    assert sum(m["chunks"] for m in memory) == 8
    assert result["label_studio"]["version"] and result["redis"]["own"]

    # Everything it started is stopped: Label Studio's whole group, Redis, the workers.
    pids = [result["pids"]["label_studio"], result["pids"]["redis"], *result["pids"]["workers"]]
    assert _gone(pids) == []
    assert not (out / "pids.json").exists()
    assert json.loads((out / "bench-label.json").read_text()) == result
    table = markdown_table(result)
    assert "| 200 | 2 | 25 |" in table
    for point in result["worker_memory_trail"]:  # one every 10 s: a short run may have none
        assert 0 <= point["done"] <= 200 and len(point["rss_mb"]) == 2
    # The table's memory line shows eight points of the trail, the first and the last among them.
    trail = [{"done": 10 * i, "rss_mb": [800.0 + i, 700.0]} for i in range(20)]
    line = markdown_table({**result, "worker_memory_trail": trail}).splitlines()[-1]
    assert line.startswith("Label workers' resident memory") and line.count(";") == 7
    assert "0: 800, 700;" in line and line.endswith("190: 819, 700.")


def test_ctrl_c_stops_everything_the_benchmark_started(tmp_path: Path) -> None:
    version_dir, data = _inputs(tmp_path)
    out = tmp_path / "out"
    argv = [str(CLI), "bench-label", "--version-dir", str(version_dir), "--data", str(data)]
    argv += ["--tasks", "200", "--out", str(out)]
    bench = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        recorded: list[int] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and bench.poll() is None:
            try:
                children = json.loads((out / "pids.json").read_text())["children"]
            except (OSError, ValueError, KeyError):
                children = []
            if any(c["name"].startswith("worker") for c in children):
                recorded = [int(c["pid"]) for c in children]
                break
            time.sleep(0.5)
        assert recorded, f"no label worker was started:\n{bench.communicate(timeout=60)[1][-4000:]}"
        bench.send_signal(signal.SIGINT)
        _, stderr = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
    assert bench.returncode == 130, stderr[-4000:]
    assert "interrupted" in stderr
    assert len(recorded) == 3  # Redis, Label Studio, the worker
    assert _gone(recorded) == []
    assert not (out / "pids.json").exists()
