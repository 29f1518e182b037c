"""``autoannotator bench-predict`` end to end on tiny n-gram members: gunicorn, Redis, HTTP, the result.

No timing is asserted (the machine may be busy); only that every figure is there and positive, that
the server answered every request with the version it was given, and that the counters and review
queue moved as production would have moved them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from autoannotator.bench_predict import label_config_xml, model_store
from autoannotator.cli import main
from autoannotator.labelconfig import parse_label_config
from autoannotator.labels import LabelSet
from autoannotator.registry import Registry
from autoannotator.serving import ProjectModels
from autoannotator.specialists import NgramSpecialist
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    """A published 3-member n-gram ensemble, built the way the trainer builds one."""
    corpus = tiny.make_corpus(90, seed=2)
    texts, ys = [t for t, _ in corpus], [y for _, y in corpus]
    registry = Registry(tmp_path / "trained")
    version = registry.save_ensemble(
        LABELS,
        {
            f"m{i}-ngram": (lambda d, c=c: NgramSpecialist.untrained(LABELS, c=c).fit(texts, ys, d))
            for i, c in enumerate((0.05, 1.0, 8.0))
        },
        note="bench-predict test",
    )
    return registry.path(version)


def test_label_config_and_store_serve_the_version(version_dir: Path, tmp_path: Path) -> None:
    config = parse_label_config(label_config_xml(list(LABELS.names)))
    assert config.labels == LABELS
    assert config.text_field == "text"
    version = model_store(version_dir, tmp_path / "store", "7.1700000000")
    assert version == version_dir.name
    ensemble = ProjectModels(tmp_path / "store").ensemble("7.1700000000", config.labels)
    assert ensemble is not None and ensemble.k == 3 and ensemble.version == version


def test_bench_predict_end_to_end(
    version_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in tiny.make_corpus(60, seed=5))
    )
    out = tmp_path / "out" / "bench.json"
    single_n, batches, repeats = 4, (5, 20), 2
    code = main(
        [
            "bench-predict",
            "--version-dir",
            str(version_dir),
            "--data",
            str(data),
            "--single-n",
            str(single_n),
            "--batches",
            ",".join(map(str, batches)),
            "--repeats",
            str(repeats),
            "--redis-url",
            redis_url,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| human | 1 (p50) |" in table and "| off | 20 |" in table
    assert "The gunicorn worker (one project loaded): " in table

    result = json.loads(out.read_text())
    assert result["version"] == version_dir.name
    assert [m["kind"] for m in result["members"]] == ["ngram-linear"] * 3
    assert result["labels"] == list(LABELS.names)
    assert result["server"]["workers"] == 1 and "--worker-class sync" in result["server"]["command"]
    assert "bench_predict:served_app()" in result["server"]["command"]
    assert set(result["modes"]) == {"human", "off"}
    warmup = 3  # run_bench_predict's default: that many requests of 1 and of min(32, largest batch)
    for mode, m in result["modes"].items():
        s = m["single"]
        assert s["n"] == single_n
        for key in (
            "raw_ms",
            "in_process_ms",
            "http_ms",
            "http_server_forward_ms",
            "handler_excl_forward_ms",
        ):
            assert 0 < s[key]["p50"] <= s[key]["p95"], (mode, key)
        # The server's forward pass is part of the request the client timed.
        assert s["http_server_forward_ms"]["p50"] < s["http_ms"]["p50"]
        assert s["http_minus_server_forward_ms"]["p50"] > 0
        assert isinstance(s["paired_overhead_pct"], float)
        assert [b["batch"] for b in m["batches"]] == list(batches)
        for b in m["batches"]:
            assert b["repeats"] == repeats
            for key in (
                "raw_s",
                "in_process_s",
                "http_s",
                "http_server_forward_s",
                "raw_tasks_per_s",
                "http_tasks_per_s",
            ):
                assert b[key] > 0, (mode, b["batch"], key)
            assert b["http_minus_server_forward_s"] > 0
            assert b["handler_excl_forward_s"] > 0
            assert all(len(v) == repeats for v in b["all_s"].values())
            for key in ("overhead_pct", "overhead_best_pct", "paired_overhead_pct"):
                assert isinstance(b[key], float), (mode, b["batch"], key)
        # Both the in-process app and gunicorn count into the same Redis: every request is there.
        per_path = warmup * (1 + min(32, max(batches))) + single_n + repeats * sum(batches)
        assert m["predictions_counted"] == 2 * per_path
        assert 0 <= m["routed"] <= m["predictions_counted"]
        assert m["redis_undisturbed"] is True
    # Mode human enqueues a review job per request that routed something; mode off never does.
    human, off = result["modes"]["human"], result["modes"]["off"]
    assert (human["review_jobs_queued"] > 0) == (human["routed"] > 0)
    assert off["review_jobs_queued"] == 0
    assert set(result["components_ms"]) == {"1", *map(str, batches)}
    for steps in result["components_ms"].values():
        assert list(steps) == [
            "json_parse",
            "extract_texts",
            "forward_pass",
            "policy",
            "build_predictions",
            "validate",
            "redis",
            "json_out",
        ]
        assert steps["forward_pass"] > 0 and all(v >= 0 for v in steps.values())
    # The one gunicorn worker's memory, read from /proc while it still ran.
    worker = result["worker_memory"]
    assert worker["pid"] != os.getpid()
    assert 50 < worker["rss_mb"] <= worker["peak_rss_mb"]
    # The benchmark cleans up after itself.
    assert redis.Redis.from_url(redis_url).dbsize() == 0
