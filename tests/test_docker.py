"""What can be checked of the Docker deployment without a Docker engine (none runs on this machine).

The compose file parses, its wiring is consistent (every variable it gives our services is one the
settings class reads, workers and backend share Redis and the model volume, Redis persists), and
every command the images run exists: the gunicorn app factory imports and builds an app, and the
worker command line parses with our CLI. Building and running the images is not tested here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import gunicorn.config
import yaml
from packaging.requirements import Requirement

from autoannotator import cli
from autoannotator.settings import Settings
from autoannotator.storage.redis_state import QUEUES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
OURS = ("backend", "review-worker", "label-worker", "train-worker")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def _dockerfile_cmd() -> list[str]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("CMD "))
    parsed: list[str] = yaml.safe_load(line.removeprefix("CMD "))  # the exec form is a JSON array
    return parsed


def test_compose_parses_and_wires_our_services_to_one_redis_and_one_model_store() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "label-studio", *OURS}
    for name in OURS:
        env = services[name]["environment"]
        assert env["AUTOANNOTATOR_REDIS_URL"] == "redis://redis:6379/0"
        assert env["AUTOANNOTATOR_MODEL_DIR"] == "/data/models"
        assert "models:/data" in services[name]["volumes"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"


def test_every_variable_compose_sets_for_our_services_is_a_setting() -> None:
    known = {f.metadata["env"] for f in fields(Settings)}
    for name in OURS:
        unknown = set(_compose()["services"][name]["environment"]) - known
        assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"


def test_label_studio_image_is_the_version_the_tests_run_against() -> None:
    pinned = re.search(r"^LS_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pinned is not None
    assert _compose()["services"]["label-studio"]["image"] == f"heartexlabs/label-studio:{pinned.group(1)}"
    env = _compose()["services"]["label-studio"]["environment"]
    # The measured pitfalls: without these LS refuses a backend on a private address.
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"


def test_worker_commands_parse_with_our_cli() -> None:
    services = _compose()["services"]
    parser = cli.build_parser()
    for name in ("review-worker", "label-worker", "train-worker"):
        command = services[name]["command"]
        assert command[0] == "autoannotator"
        args = parser.parse_args(command[1:])
        assert args.func is cli._worker
        assert set(args.queues.split(",")) <= set(QUEUES)
    workers = ("review-worker", "label-worker", "train-worker")
    covered = {q for n in workers for q in services[n]["command"][-1].split(",")}
    assert covered == set(QUEUES), "some queue has no worker"


def test_the_backend_command_is_gunicorn_serving_our_app_factory(tmp_path: Path, redis_url: str) -> None:
    command = _dockerfile_cmd()
    assert command[0] == "gunicorn"
    # gunicorn's own command-line parser takes the rest: every option exists, one app target last.
    args = gunicorn.config.Config().parser().parse_args(command[1:])
    assert args.bind == ["0.0.0.0:9090"] and args.control_socket_disable is True
    assert args.args == [command[-1]]
    target = command[-1]
    module, _, call = target.partition(":")
    assert call.endswith("()")
    factory = getattr(__import__(module, fromlist=["_"]), call.removesuffix("()"))
    app = factory(Settings(model_dir=tmp_path, redis_url=redis_url))
    assert app.test_client().get("/health").status_code == 200


def test_console_scripts_the_images_use_are_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"] == {"autoannotator": "autoannotator.cli:main"}
    required = {Requirement(r).name for r in project["dependencies"]}
    assert "gunicorn" in required  # the backend's CMD
    bindir = Path(sys.executable).parent  # and the install made both commands the images run
    assert (bindir / "autoannotator").is_file() and (bindir / "gunicorn").is_file()
