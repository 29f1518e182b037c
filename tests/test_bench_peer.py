"""``autoannotator bench-peer``'s harness, end to end, against a stand-in for the official example.

The official example cannot be installed here (it is a fetched repository with its own pinned
environment; nothing of it is in this project), so a stand-in plays it: a WSGI app written below,
with the example's file name (``_wsgi.py``), its routes and its answer's shape, that reads the
checkpoint folder the harness prepares. Our side is the real backend under real gunicorn. Nothing
about speed is asserted; the test checks that both servers got every request, that each answer was
read, and that the figures and the table come out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoannotator.cli import main
from autoannotator.core.labels import LabelSet
from autoannotator.errors import AutoAnnotatorError
from autoannotator.lab.bench_peer import PeerInstall, run_bench_peer, transformer_member
from autoannotator.models.specialists import NgramSpecialist, TransformerSpecialist
from autoannotator.storage.registry import Registry
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)

STAND_IN = """
import json, os, pathlib

CHECKPOINT = pathlib.Path(os.environ["MODEL_DIR"]) / os.environ["FINETUNED_MODEL_NAME"]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/health":
        body = {"status": "UP", "checkpoint": (CHECKPOINT / "config.json").is_file()}
    elif path == "/predict":
        request = json.loads(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
        value = {"choices": ["neutral"]}
        choice = {"from_name": "label", "to_name": "text", "type": "choices", "value": value}
        body = {"results": [{"result": [choice], "score": 0.5} for _ in request["tasks"]]}
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such route"]
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
"""


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    corpus = tiny.make_corpus(60, seed=3)
    texts, ys = [t for t, _ in corpus], [y for _, y in corpus]
    registry = Registry(tmp_path / "trained")
    clf = tiny.build_classifier(tmp_path / "clf", list(LABELS.names))
    version = registry.save_ensemble(
        LABELS,
        {
            "m0-transformer": lambda d: (
                TransformerSpecialist.load(clf, LABELS).save(d),
                TransformerSpecialist.load(d, LABELS),
            )[1],
            "m1-ngram": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d),
        },
        note="bench-peer test",
    )
    return registry.path(version)


@pytest.fixture
def stand_in(tmp_path: Path) -> PeerInstall:
    import sys

    example = tmp_path / "bert_classifier"
    example.mkdir()
    (example / "_wsgi.py").write_text(STAND_IN)
    return PeerInstall(example, Path(sys.executable))


def test_bench_peer_sends_both_servers_the_same_requests_and_reports_each(
    version_dir: Path, stand_in: PeerInstall, tmp_path: Path, redis_url: str, capsys
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in tiny.make_corpus(30, seed=4))
    )
    argv = [
        *("bench-peer", "--version-dir", str(version_dir), "--data", str(data)),
        *("--peer-dir", str(stand_in.example_dir), "--peer-python", str(stand_in.python)),
        *("--settings", "pinned,concurrent", "--single-n", "3", "--batches", "5", "--repeats", "2"),
        *("--clients", "2", "--concurrent-requests", "4", "--redis-url", redis_url),
        *("--out", str(tmp_path / "peer.json")),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "peer.json").read_text())
    pinned = result["pinned"]
    for side in ("ours", "official example"):
        assert pinned["single_ms"][side]["n"] == 3
        assert pinned["batch_tasks_per_s"]["5"][side] > 0
        assert pinned["worker_memory"][side]["rss_mb"] > 0
        assert result["concurrent"]["single_ms"][side]["n"] == 2 * 4
    table = capsys.readouterr().out
    assert "| pinned: 5 tasks |" in table and "2 clients, 2 workers each" in table


def test_bench_peer_refuses_a_folder_that_is_not_the_example(version_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AutoAnnotatorError, match=r"_wsgi\.py"):
        run_bench_peer(version_dir, ["a text"], PeerInstall(tmp_path, Path("/usr/bin/python3")))


def test_the_peer_serves_the_versions_fine_tuned_member(version_dir: Path) -> None:
    assert transformer_member(version_dir).name == "m0-transformer"
