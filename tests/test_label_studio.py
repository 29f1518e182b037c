"""End to end against a real Label Studio 1.23.2 (tests/ls_server.py): what LS itself accepts and stores.

These pin the ground our backend stands on: the ready configs in ``label_config/`` are read the same
way by LS's parser and by ours, LS refuses a broken config with a readable reason, tasks and
predictions (string ``model_version``) survive a round trip, and the test harness's legacy token and
SDK client work. One server serves every test; each test's projects are deleted after it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from autoannotator.labelstudio.config import PredictionValidator, parse_label_config, prediction
from tests.ls_server import LabelStudioServer

pytestmark = pytest.mark.e2e

CONFIG_DIR = Path(__file__).resolve().parents[1] / "label_config"
CONFIGS = sorted(CONFIG_DIR.glob("*.xml"))
# What the product promises about its ready configs; generic.xml's labels are placeholders to rename.
EXPECTED_LABELS = {
    "sentiment.xml": ("Positive", "Negative", "Neutral"),
    "toxicity.xml": ("Toxic", "Not toxic"),
}


def test_legacy_token_works_through_the_sdk_and_raw_http(label_studio: LabelStudioServer) -> None:
    # The SDK sends a non-JWT api_key as "Authorization: Token <key>": the legacy scheme.
    assert label_studio.client().users.whoami().email == label_studio.username

    def whoami(authorization: str) -> dict:
        request = urllib.request.Request(
            f"{label_studio.url}/api/current-user/whoami", headers={"Authorization": authorization}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    assert whoami(f"Token {label_studio.token}")["email"] == label_studio.username
    with pytest.raises(urllib.error.HTTPError) as refused:
        whoami(f"Token {'0' * 40}")
    assert refused.value.code == 401
    with pytest.raises(ApiError) as sdk_refused:
        LabelStudio(base_url=label_studio.url, api_key="0" * 40).users.whoami()
    assert sdk_refused.value.status_code == 401


def test_the_product_ships_its_ready_configs() -> None:
    assert [p.name for p in CONFIGS] == ["generic.xml", "sentiment.xml", "toxicity.xml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_ready_config_is_read_alike_by_label_studio_and_by_us(
    path: Path, label_studio: LabelStudioServer, ls_project
) -> None:
    xml = path.read_text(encoding="utf-8")
    ours = parse_label_config(xml)
    if path.name in EXPECTED_LABELS:
        assert ours.labels.names == EXPECTED_LABELS[path.name]

    created = ls_project(xml, title=f"config {path.stem}")
    project = label_studio.client().projects.get(id=created.id)

    assert project.label_config.strip() == xml.strip()
    parsed = project.parsed_label_config
    choices = {name: control for name, control in parsed.items() if control["type"] == "Choices"}
    assert list(choices) == [ours.from_name]
    control = choices[ours.from_name]
    assert control["to_name"] == [ours.to_name]
    assert control["labels"] == list(ours.labels)
    assert [(i["type"], i["value"]) for i in control["inputs"]] == [("Text", ours.text_field)]


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        pytest.param(
            '<View><Text name="text" value="$text"/>'
            '<Choices name="label" toName="txt"><Choice value="A"/><Choice value="B"/></Choices></View>',
            'toName="txt" not found',
            id="toName-names-nothing",
        ),
        pytest.param('<View><Text name="text" value="$text"/', "unclosed token", id="broken-xml"),
    ],
)
def test_label_studio_refuses_an_invalid_config_and_says_why(
    xml: str, reason: str, label_studio: LabelStudioServer, ls_project
) -> None:
    client = label_studio.client()
    with pytest.raises(ApiError) as refused:
        ls_project(xml, title="refused config")
    assert refused.value.status_code == 400
    errors = refused.value.body["validation_errors"]["label_config"]
    assert any(reason in message for message in errors), errors
    assert "refused config" not in [p.title for p in client.projects.list()]


def test_imported_tasks_read_back_unchanged(label_studio: LabelStudioServer, ls_project) -> None:
    client = label_studio.client()
    project = ls_project((CONFIG_DIR / "sentiment.xml").read_text(encoding="utf-8"))
    texts = ["Shares jump 12% after earnings", "Très décevant… 😞", "x" * 5000]

    answer = client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])

    assert answer.task_count == len(texts)
    tasks = sorted(client.tasks.list(project=project.id), key=lambda task: task.id)
    assert [task.data for task in tasks] == [{"text": t} for t in texts]


def test_prediction_with_a_string_model_version_round_trips(
    label_studio: LabelStudioServer, ls_project
) -> None:
    client = label_studio.client()
    xml = (CONFIG_DIR / "sentiment.xml").read_text(encoding="utf-8")
    config = parse_label_config(xml)
    project = ls_project(xml)
    client.projects.import_tasks(id=project.id, request=[{"text": "Oil trades at 3-month high"}])
    (task,) = client.tasks.list(project=project.id)
    item = prediction(config, "Positive", 0.71, "autoannotator-e2e-1")
    assert PredictionValidator(config).validate(item) == []

    created = client.predictions.create(task=task.id, **item)

    (stored,) = client.predictions.list(task=task.id)
    assert stored.id == created.id
    assert (stored.result, stored.score, stored.model_version) == (
        item["result"],
        0.71,
        "autoannotator-e2e-1",
    )
    (on_task,) = client.tasks.get(id=task.id).predictions
    assert (on_task.result, on_task.model_version) == (item["result"], "autoannotator-e2e-1")
