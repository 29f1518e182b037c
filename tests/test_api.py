"""The ML backend protocol (/health, /setup, /predict, /versions) over real tiny models in a real registry."""

import base64

import pytest

from autoannotator.api import create_app
from autoannotator.labelconfig import PredictionValidator, parse_label_config
from autoannotator.labels import LabelSet
from autoannotator.serving import WAITING_VERSION, ProjectModels
from autoannotator.settings import Settings, settings_table
from autoannotator.specialists import EmbeddingSpecialist, NgramSpecialist
from tests import tiny

CONFIG = """<View>
  <Text name="text" value="$tweet"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="bearish"/><Choice value="bullish"/><Choice value="neutral"/>
  </Choices>
</View>"""
LABELS = LabelSet.of(tiny.LABELS)
PROJECT = "7.1700000000"


def publish(projects: ProjectModels, corpus, encoder, n=150):
    texts, ys = [t for t, _ in corpus[:n]], [y for _, y in corpus[:n]]
    return projects.registry(PROJECT).save_ensemble(
        LABELS,
        {
            "m0-embedding": lambda d: EmbeddingSpecialist.untrained(encoder, LABELS).fit(texts, ys, d),
            "m1-ngram": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d),
        },
        note="test",
    )


@pytest.fixture
def projects(tmp_path):
    return ProjectModels(tmp_path / "models")


@pytest.fixture
def client(projects, tmp_path):
    app = create_app(Settings(model_dir=tmp_path / "models", policy="mean:0.6"), projects)
    return app.test_client()


def predict(client, tasks, project=PROJECT, config=CONFIG):
    return client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config})


def test_health_and_setup_before_any_model(client):
    assert client.get("/health").get_json() == {"status": "UP", "model_class": "AutoAnnotator"}
    setup = client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json()
    assert setup == {"model_version": WAITING_VERSION}


def test_predict_waits_for_seed_labels_without_losing_tasks(client):
    body = predict(client, [{"id": 1, "data": {"tweet": "shares rally"}}]).get_json()
    assert body == {"results": [{"result": [], "score": 0.0, "model_version": WAITING_VERSION}]}


def test_predictions_one_per_task_in_order_validated_and_bad_tasks_keep_their_place(
    client, projects, tiny_corpus, tiny_encoder
):
    version = publish(projects, tiny_corpus, tiny_encoder)
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json() == {
        "model_version": version
    }
    good = [(t, y) for t, y in tiny_corpus[150:170]]
    tasks = [{"id": i, "data": {"tweet": t}} for i, (t, _) in enumerate(good)]
    tasks.insert(3, {"id": 100, "data": {"tweet": "   "}})  # empty text
    tasks.insert(5, {"id": 101, "data": {"text": "wrong field"}})  # no $tweet
    tasks.insert(7, {"id": 102, "data": {"tweet": "rally " * 50_000}})  # huge: clipped, still labelled
    response = predict(client, tasks)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    validator = PredictionValidator(parse_label_config(CONFIG))
    for item in results:
        assert validator.validate(item) == []
        assert item["model_version"] == version
    assert results[3]["result"] == [] and results[5]["result"] == []
    assert results[7]["result"][0]["value"]["choices"] == ["bullish"]
    labelled = [r for i, r in enumerate(results) if i not in (3, 5, 7)]
    right = sum(r["result"][0]["value"]["choices"] == [y] for r, (_, y) in zip(labelled, good, strict=True))
    assert right / len(good) > 0.7  # real models, real predictions
    assert all(0 <= r["score"] <= 1 for r in labelled)
    assert {r["result"][0]["from_name"] for r in labelled} == {"sentiment"}


def test_a_new_version_is_served_without_a_restart(client, projects, tiny_corpus, tiny_encoder):
    first = publish(projects, tiny_corpus, tiny_encoder)
    task = [{"id": 1, "data": {"tweet": "shares surge on record gains"}}]
    assert predict(client, task).get_json()["results"][0]["model_version"] == first
    second = publish(projects, tiny_corpus[::-1], tiny_encoder)
    assert second != first
    assert predict(client, task).get_json()["results"][0]["model_version"] == second
    assert client.get("/versions").get_json() == {"versions": [f"{PROJECT}/{first}", f"{PROJECT}/{second}"]}


@pytest.mark.parametrize(
    ("config", "status", "message"),
    [
        ('<View><Image name="i" value="$img"/></View>', 422, "no <Choices>"),
        (
            '<View><Text name="t" value="$text"/><Choices name="c" toName="t" choice="multiple">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            422,
            "multiple",
        ),
        ("not xml at all <", 422, "label config"),
    ],
)
def test_unsupported_configs_get_a_clear_error_at_setup(client, config, status, message):
    response = client.post("/setup", json={"project": PROJECT, "schema": config})
    assert response.status_code == status
    error = response.get_json()["error"]
    assert message in error and "Traceback" not in error


def test_malformed_requests_are_refused_plainly(client):
    assert client.post("/predict", data="nope", content_type="application/json").status_code == 400
    r = client.post("/predict", json={"tasks": "x", "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 400 and "'tasks' must be a list" in r.get_json()["error"]
    r = client.post("/setup", json={"project": "../../etc", "schema": CONFIG})
    assert r.status_code == 400 and "uid" in r.get_json()["error"]


def test_internal_errors_never_reach_the_client_as_tracebacks(
    client, projects, tiny_corpus, tiny_encoder, caplog
):
    publish(projects, tiny_corpus, tiny_encoder)
    # Corrupt the published member on disk: loading it fails inside the request.
    version_dir = projects.registry(PROJECT).path(projects.current_version(PROJECT))
    (version_dir / "m1-ngram" / "ngrams.json").write_text("{broken")
    r = predict(client, [{"id": 1, "data": {"tweet": "rally"}}])
    assert r.status_code == 500  # the model store is the server's problem, not the client's
    assert r.get_json() == {"error": "internal error; the backend's log has the details"}
    assert "ngrams.json is unreadable" in caplog.text


def test_basic_auth(tmp_path):
    app = create_app(Settings(model_dir=tmp_path, basic_auth_user="ls", basic_auth_password="s3cret"))
    c = app.test_client()
    assert c.get("/health").status_code == 401
    assert (
        c.get(
            "/health", headers={"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
        ).status_code
        == 401
    )
    ok = c.get("/health", headers={"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()})
    assert ok.status_code == 200


def test_settings_from_environment_keep_secrets_out_of_repr(tmp_path):
    s = Settings.from_env(
        {
            "AUTOANNOTATOR_MODEL_DIR": str(tmp_path),
            "AUTOANNOTATOR_MAX_TEXT_CHARS": " 500 ",
            "AUTOANNOTATOR_POLICY": "",  # empty keeps the default
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "very-secret-pass",
        }
    )
    assert s.model_dir == tmp_path and s.max_text_chars == 500 and s.policy == "mean:0.75"
    assert "very-secret-pass" not in repr(s)
    with pytest.raises(ValueError, match="AUTOANNOTATOR_MAX_TEXT_CHARS='many'"):
        Settings.from_env({"AUTOANNOTATOR_MAX_TEXT_CHARS": "many"})
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "u"})
    table = settings_table()
    assert (
        "| `BASIC_AUTH_PASS` | `` | its password |" in table
        and "| `AUTOANNOTATOR_POLICY` | `mean:0.75` |" in table
    )
