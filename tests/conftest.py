"""Fixtures shared by the whole suite: tiny models built once per session, paths to shared data, a
private Redis per session, and one real Label Studio server per session for the end-to-end tests
(marker ``e2e``). The suite brings up every server it talks to and never touches one it did not start.

The web stack (Flask, redis-py, the Label Studio SDK) is imported by the fixtures that use it, not
here: the model tests (``test_trunk``, ``test_specialists``, ``test_coldstart`` ...) then run on a
machine that has only torch and transformers, such as a GPU box with its own PyTorch build."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import tiny

if TYPE_CHECKING:
    import redis

    from tests.ls_server import LabelStudioServer
    from tests.redis_server import RedisServer

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Forward passes run torch in the suite, in its processes and the servers and workers it starts, so
# that no result depends on whether CI's CPU has bf16 (AUTOANNOTATOR_RUNTIME's default, auto, picks
# OpenVINO where it lacks it); tests/test_compiled.py tests OpenVINO itself, on every machine.
os.environ.setdefault("AUTOANNOTATOR_RUNTIME", "torch")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


# Fixtures whose users must carry a marker: a real Label Studio is e2e, the shared datasets are slow.
MARKED_FIXTURES = {"label_studio": "e2e", "ls_project": "e2e", "shared_dataset": "slow"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers say the truth: a test that starts Label Studio (through its fixtures) is marked e2e,
    one that reads ../shared/datasets is marked slow, or the run stops before any test."""
    wrong = [
        f"{item.nodeid} uses {name} but is not marked {marker}"
        for item in items
        for name, marker in MARKED_FIXTURES.items()
        if name in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None
    ]
    if wrong:
        raise pytest.UsageError("\n".join(wrong))


@pytest.fixture(autouse=True)
def _torch_runtime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process too: each test starts on torch, and one that builds its settings in code
    (runtime auto by default) runs torch, as do the servers it starts with this process's runtime
    (``lab.benchmark.forward_settings``); unless it tests OpenVINO (``tests/test_compiled.py``)."""
    if request.module.__name__.endswith("test_compiled"):
        return
    from autoannotator.models.specialists import compiled

    monkeypatch.setattr(compiled, "_runtime", "torch")
    monkeypatch.setattr(compiled, "openvino_installed", lambda: False)


@pytest.fixture(scope="session", autouse=True)
def _server_like_test_client() -> Iterator[None]:
    """Flask apps in tests get :class:`tests.flask_client.ServerLikeClient` (nothing to do without Flask)."""
    try:
        from flask import Flask

        from tests.flask_client import ServerLikeClient
    except ImportError:  # a machine with only the model stack: no test there builds an app
        yield
        return
    previous = Flask.test_client_class
    Flask.test_client_class = ServerLikeClient
    yield
    Flask.test_client_class = previous


@pytest.fixture(autouse=True)
def _packaged_minilm_only_in_slow_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that loads the packaged MiniLM (autoannotator's default encoder: seconds to load, and
    a real model's inference) must be marked ``slow``, so that ``make test-fast`` loads none. In
    this process every load goes through ``packaged_minilm_path``; a test not marked slow that
    reaches it fails saying so. (Worker and CLI subprocesses are not watched: the e2e tests give
    their workers the tiny encoder or publish n-gram models.)"""
    if request.node.get_closest_marker("slow") is not None:
        return
    from autoannotator.models.specialists import encoder

    def refuse() -> str:
        raise AssertionError(f"{request.node.nodeid} loads the packaged MiniLM: mark it @pytest.mark.slow")

    monkeypatch.setattr(encoder, "packaged_minilm_path", refuse)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_corpus() -> list[tuple[str, str]]:
    return tiny.make_corpus(240, seed=1)


@pytest.fixture
def shared_dataset():
    """Path to a ``../shared/datasets/<name>`` folder, or a skip saying why it is absent."""

    def get(name: str) -> Path:
        path = SHARED_DATASETS / name
        if not (path / "train.jsonl").is_file():
            pytest.skip(f"{path} is absent: the shared benchmark datasets are not beside this checkout")
        return path

    return get


@pytest.fixture
def fp32() -> Iterator[None]:
    """Serving forward passes in fp32 for the test (where two ways of computing must agree to float
    rounding), and the process's precision back afterwards."""
    from autoannotator.models.specialists import runtime

    saved = runtime.configured_precision()
    runtime.configure_precision("fp32")
    yield
    runtime.configure_precision(saved)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's own ``redis-server`` on a free loopback port (see ``tests/redis_server.py``)."""
    from tests.redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of database 0 on the session's private Redis, emptied before the test. Give it to every
    app, worker and backend the test starts; a Redis on 6379 is never used."""
    redis_server.client().flushall()
    return redis_server.url(0)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of :func:`redis_url`'s (empty) database."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A running Label Studio, started once per session (cold start ~30-50 s) and stopped at its end.

    Gives ``url``, ``token`` (legacy API token), ``username``, ``password``, ``client()`` (an SDK
    ``LabelStudio`` client), ``startup_s`` and ``log_path`` (kept in pytest's temp dir for post-mortems).
    Skipped when ``.venv-ls`` was not built (``make install-ls``); ``make test`` always builds it.
    """
    from tests.ls_server import LS_EXECUTABLE, LabelStudioServer

    if not LS_EXECUTABLE.is_file():
        pytest.skip(f"{LS_EXECUTABLE} is absent: run `make install-ls` to run the Label Studio e2e tests")
    with LabelStudioServer(tmp_path_factory.mktemp("label-studio") / "data") as server:
        yield server


@pytest.fixture
def ls_project(label_studio: LabelStudioServer) -> Iterator[Callable[..., Any]]:
    """Factory: ``ls_project(label_config_xml, title=None, **fields)`` creates an LS project and returns
    it as the SDK answered (``.id``, ``.label_config``, ...); every project it made is deleted after
    the test, so tests sharing the session's server never see each other's projects."""
    from label_studio_sdk.errors import NotFoundError

    client = label_studio.client()
    created: list[int] = []

    def create(label_config: str, title: str | None = None, **fields: Any) -> Any:
        title = title or f"e2e {uuid.uuid4().hex[:8]}"
        project = client.projects.create(title=title, label_config=label_config, **fields)
        created.append(project.id)
        return project

    yield create
    for project_id in created:
        with contextlib.suppress(NotFoundError):  # the test may have deleted it itself
            client.projects.delete(id=project_id)
