"""The ML backend protocol (/health, /setup, /predict, /versions) over real tiny models in a real registry;
the webhook, settings, routing to review jobs, /metrics and a Redis that is down, against a real Redis."""

import base64
import gc
import time
import weakref

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

from autoannotator.core.labels import LabelSet
from autoannotator.labelstudio.config import PredictionValidator, parse_label_config
from autoannotator.labelstudio.fields import ClearedTask, RoutedTask
from autoannotator.service import annotator, events, queueing
from autoannotator.service.app import create_app
from autoannotator.settings import Settings, settings_table
from autoannotator.storage.model_store import WAITING_VERSION, ProjectModels
from autoannotator.storage.redis_state import COUNTERS, State
from tests import scrape, tiny

CONFIG = """<View>
  <Text name="text" value="$tweet"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="bearish"/><Choice value="bullish"/><Choice value="neutral"/>
  </Choices>
</View>"""
LABELS = LabelSet.of(tiny.LABELS)
PROJECT = tiny.PROJECT


def publish(projects: ProjectModels, corpus, encoder, n=150):
    return tiny.publish_two_members(projects, corpus, encoder, n)


@pytest.fixture
def projects(tmp_path):
    return ProjectModels(tmp_path / "models")


@pytest.fixture
def client(projects, tmp_path, redis_url):
    app = create_app(
        Settings(model_dir=tmp_path / "models", policy="mean:0.6", redis_url=redis_url), projects
    )
    return app.test_client()


def predict(client, tasks, project=PROJECT, config=CONFIG):
    return client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config})


def test_health_and_setup_before_any_model(client):
    assert client.get("/health").get_json() == {"status": "UP", "model_class": "AutoAnnotator", "redis": "up"}
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


def test_a_served_version_is_frozen_out_of_the_collector_and_a_replaced_one_is_reclaimed(
    projects, tiny_corpus, tiny_encoder
):
    # A full collection walking a served ensemble's objects paused a request for ~0.5 s; after a load
    # they are frozen out of the collector, and unfrozen again at the next load so that the version
    # it replaces is reclaimed even where its objects form reference cycles.
    gc.unfreeze()
    try:
        publish(projects, tiny_corpus, tiny_encoder)
        first = projects.ensemble(PROJECT, LABELS)
        assert first is not None and gc.get_freeze_count() > 0
        assert all(o is not first for o in gc.get_objects())  # frozen objects are in no generation
        first.timings["cycle"] = first  # type: ignore[assignment]  # only the collector frees it now
        gone, version = weakref.ref(first), first.version
        del first
        gc.collect()
        assert gone() is not None  # frozen: a full collection leaves it alone
        publish(projects, tiny_corpus[::-1], tiny_encoder)
        second = projects.ensemble(PROJECT, LABELS)
        assert second is not None and second.version != version
        assert gone() is None
        assert all(o is not second for o in gc.get_objects())
    finally:
        gc.unfreeze()


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


def test_basic_auth(tmp_path, redis_url):
    app = create_app(
        Settings(
            model_dir=tmp_path,
            basic_auth_user="ls",
            basic_auth_password="s3cret",
            redis_url=redis_url,
        )
    )
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
    with pytest.raises(ValueError, match="AUTOANNOTATOR_AUDIT_SHARE > 0"):  # certified on audit labels
        Settings.from_env({"AUTOANNOTATOR_POLICY": "target:0.95"})
    assert Settings.from_env({"AUTOANNOTATOR_POLICY": "target:0.95", "AUTOANNOTATOR_AUDIT_SHARE": "0.05"})
    with pytest.raises(ValueError, match="AUTOANNOTATOR_AUDIT_SHARE must be in"):
        Settings.from_env({"AUTOANNOTATOR_AUDIT_SHARE": "0.9"})
    with pytest.raises(ValueError, match="AUTOANNOTATOR_LLM_SEEDS must be >= 0"):
        Settings.from_env({"AUTOANNOTATOR_LLM_SEEDS": "-5"})
    assert Settings.from_env({"AUTOANNOTATOR_ENCODER": "auto"}).encoder == "auto"
    with pytest.raises(ValueError, match="write it as 'auto'"):
        Settings.from_env({"AUTOANNOTATOR_ENCODER": "Auto"})
    table = settings_table()
    assert (
        "| `BASIC_AUTH_PASS` | (empty) | its password |" in table
        and "| `AUTOANNOTATOR_POLICY` | `mean:0.75` |" in table
    )


# ---------------------------------------------------------------------------- queues, modes, Redis
# These use the session's private Redis (flushed by each test) and inspect the rq queues directly.

DEAD_REDIS_URL = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
AUTH = {"Authorization": "Basic " + base64.b64encode(b"pm:s3cret").decode()}
# LS's project object in webhooks; 2023-11-14T22:13:20Z is 1700000000, so its uid is PROJECT.
LS_PROJECT = {"id": 7, "created_at": "2023-11-14T22:13:20.000000Z", "label_config": CONFIG, "title": "t"}
TASK = {"id": 11, "data": {"tweet": "shares rally on record gains"}}
ANNOTATION = {
    "id": 5,
    "result": [
        {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["bullish"]}}
    ],
}


@pytest.fixture
def rq_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_corpus, tiny_encoder):
    """A model store whose project PROJECT serves a tiny two-member ensemble (read-only in tests)."""
    projects = ProjectModels(tmp_path_factory.mktemp("published") / "models")
    return projects.root, publish(projects, tiny_corpus, tiny_encoder)


@pytest.fixture
def app_client(redis_url):
    """Factory: a test client of an app on the session's Redis, with ``settings`` on top."""

    def make(model_dir, **settings):
        return create_app(
            Settings(**{"model_dir": model_dir, "redis_url": redis_url, **settings})
        ).test_client()

    return make


def jobs_in(client_redis, queue):
    return Queue(queue, connection=client_redis).jobs


def webhook(client, action, **extra):
    return client.post("/webhook", json={"action": action, "project": LS_PROJECT, **extra})


def test_an_annotation_webhook_is_acknowledged_at_once_and_queued_for_ingest(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models")
    r = webhook(c, "ANNOTATION_CREATED", task=TASK, annotation=ANNOTATION)
    # Answered before any work: the job waits in the queue (no worker runs here), not done inline.
    assert r.status_code == 200 and r.get_json() == {"status": "queued", "action": "ANNOTATION_CREATED"}
    queued = jobs_in(rq_redis, "ingest")
    ingests = [j for j in queued if j.func_name.endswith("ingest_annotation")]
    assert len(ingests) == 1 and ingests[0].args == (PROJECT, TASK, ANNOTATION)
    # The first event of a project this Redis does not know also queues one rebuild from LS.
    assert [j.func_name.rsplit(".", 1)[1] for j in queued].count("sync_project") == 1
    r = webhook(c, "ANNOTATION_UPDATED", task=TASK, annotation=ANNOTATION)
    assert r.status_code == 200
    names = [j.func_name.rsplit(".", 1)[1] for j in jobs_in(rq_redis, "ingest")]
    assert sorted(names) == ["ingest_annotation", "ingest_annotation", "sync_project"]
    assert jobs_in(rq_redis, "train") == [] and jobs_in(rq_redis, "review") == []
    state = State(rq_redis, "human")
    assert state.counters(PROJECT)["webhooks"] == 2
    assert state.info(PROJECT).label_config == CONFIG  # the workers can parse the project's config


def test_tasks_imported_before_any_version_queue_the_choice_of_seed_tasks_once(
    rq_redis, tmp_path, app_client
):
    tasks = [{"id": 1}, {"id": 2}]

    def seed_jobs():
        return [
            j.func_name.rsplit(".", 1)[1]
            for j in [*jobs_in(rq_redis, "ingest"), *jobs_in(rq_redis, "review")]
        ]

    off = app_client(tmp_path / "models")
    assert webhook(off, "TASKS_CREATED", tasks=tasks).get_json()["status"] == "ignored"
    on = app_client(tmp_path / "models", seed_tab=True)
    r = webhook(on, "TASKS_CREATED", tasks=tasks)
    assert r.get_json() == {"status": "queued", "action": "TASKS_CREATED", "tasks": 2}
    assert webhook(on, "TASKS_CREATED", tasks=tasks).get_json()["status"] == "ignored"  # chosen once
    assert seed_jobs().count("mark_seed_tasks") == 1
    # In llm mode with the LLM-seeded start, the LLM labels the covering tasks: no Seed tab.
    state = State(rq_redis, "human")
    state.release_seed_tab(PROJECT)
    state.set_mode(PROJECT, "llm")
    llm = app_client(tmp_path / "models", seed_tab=True, llm_seeds=5)
    assert webhook(llm, "TASKS_CREATED", tasks=tasks).get_json()["status"] == "queued"
    assert seed_jobs().count("mark_seed_tasks") == 1 and seed_jobs().count("seed_with_llm") == 1
    # Configured specialists need no seed labels at all.
    state.set_mode(PROJECT, "human")
    given = app_client(tmp_path / "models", seed_tab=True, specialists=("some/model",))
    assert webhook(given, "TASKS_CREATED", tasks=tasks).get_json()["status"] == "ignored"
    assert seed_jobs().count("mark_seed_tasks") == 1


def test_webhooks_we_do_not_act_on_are_acknowledged(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models")
    r = webhook(c, "PROJECT_UPDATED")
    assert r.status_code == 200 and r.get_json() == {"status": "ignored", "action": "PROJECT_UPDATED"}
    r = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "task": TASK, "annotation": ANNOTATION})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    assert "no project" in r.get_json()["reason"]
    assert not [j for j in jobs_in(rq_redis, "ingest") if j.func_name.endswith("ingest_annotation")]


def test_malformed_webhooks_get_a_clear_400(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models")
    r = c.post("/webhook", data="{not json", content_type="application/json")
    assert r.status_code == 400 and r.get_json() == {"error": "the request body must be a JSON object"}
    r = c.post("/webhook", json=["ANNOTATION_CREATED"])
    assert r.status_code == 400
    r = webhook(c, "ANNOTATION_CREATED", task=TASK)  # no annotation
    assert r.status_code == 400 and "needs 'task' and 'annotation'" in r.get_json()["error"]
    r = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7}})
    assert r.status_code == 400 and "'id' and 'created_at'" in r.get_json()["error"]
    assert [j for j in jobs_in(rq_redis, "ingest") if j.func_name.endswith("ingest_annotation")] == []


def test_start_training_queues_one_training_until_it_ran(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models")
    r = webhook(c, "START_TRAINING")
    assert r.status_code == 200 and r.get_json() == {"status": "training queued"}
    r = webhook(c, "START_TRAINING")
    assert r.status_code == 200 and r.get_json() == {"status": "training already queued or running"}
    r = c.post("/train", json={"project": PROJECT, "label_config": CONFIG})  # legacy LS
    assert r.get_json() == {"status": "training already queued or running"}
    (job,) = jobs_in(rq_redis, "train")
    assert job.func_name.endswith("train_project") and job.args == (PROJECT, True)
    State(rq_redis, "human").release_training(PROJECT)  # what the job does at its end
    assert webhook(c, "START_TRAINING").get_json() == {"status": "training queued"}
    assert len(jobs_in(rq_redis, "train")) == 2


def test_legacy_train_endpoint_queues_one_training(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models")
    r = c.post("/train", json={"project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200 and r.get_json() == {"status": "training queued"}
    r = c.post("/train", json={"project": LS_PROJECT})  # the project object works too
    assert r.get_json() == {"status": "training already queued or running"}
    assert len(jobs_in(rq_redis, "train")) == 1
    assert c.post("/train", json={"project": "../x"}).status_code == 400


def test_basic_auth_guards_every_endpoint_including_the_webhook(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models", basic_auth_user="pm", basic_auth_password="s3cret")
    for method, path in [
        ("post", "/webhook"),
        ("post", "/predict"),
        ("post", "/setup"),
        ("post", "/train"),
        ("get", f"/projects/{PROJECT}/settings"),
        ("post", f"/projects/{PROJECT}/settings"),
        ("get", "/status"),
        ("get", "/status.json"),
        ("get", "/metrics"),
        ("get", "/versions"),
    ]:
        r = getattr(c, method)(path, json={"action": "START_TRAINING", "project": LS_PROJECT})
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert jobs_in(rq_redis, "train") == []
    assert webhook(c, "START_TRAINING").status_code == 401
    r = c.post("/webhook", json={"action": "START_TRAINING", "project": LS_PROJECT}, headers=AUTH)
    assert r.status_code == 200


def test_settings_page_shows_and_switches_the_review_mode(rq_redis, published, app_client):
    root, version = published
    c = app_client(root, basic_auth_user="pm", basic_auth_password="s3cret", policy="mean:0.99")
    url = f"/projects/{PROJECT}/settings"
    assert c.get(url, headers=AUTH).get_json() == {
        "project": PROJECT,
        "review_mode": "human",
        "modes": ["llm", "human", "off"],
        "default": "human",
        "policy": "mean:0.99",
        "audit_share": 0.0,
        "defaults": {"policy": "mean:0.99", "audit_share": 0.0},
    }
    page = c.get(url, headers={**AUTH, "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "<form method='post'>" in html and "value='human' checked" in html
    r = c.post(url, json={"review_mode": "llm"}, headers=AUTH)
    assert r.status_code == 200 and r.get_json()["review_mode"] == "llm"
    r = c.post(
        "/predict",
        json={"tasks": [TASK], "project": PROJECT, "label_config": CONFIG},
        headers=AUTH,
    )
    assert r.status_code == 200
    (job,) = jobs_in(rq_redis, "review")
    assert job.func_name.endswith("review_routed") and job.args[:3] == (PROJECT, version, "llm")
    # The HTML form posts form fields and gets the page back.
    r = c.post(url, data={"review_mode": "off"}, headers=AUTH)
    assert r.status_code == 200 and "review mode is off" in r.get_data(as_text=True)
    assert c.get(url, headers=AUTH).get_json()["review_mode"] == "off"


def test_a_project_chooses_its_own_policy_and_audit_share_and_predict_draws_its_audit(
    rq_redis, published, app_client
):
    """Per project, with no restart: a target policy without an audit is refused; with one, the
    uncalibrated target routes every task, and the audit draws about its share of the tasks, each
    drawn task handed to the review job with its mark (version, route, label)."""
    root, version = published
    c = app_client(root, basic_auth_user="pm", basic_auth_password="s3cret", policy="mean:0.0")
    url = f"/projects/{PROJECT}/settings"
    r = c.post(url, json={"policy": "target:0.9"}, headers=AUTH)
    assert r.status_code == 400 and "audit share > 0" in r.get_json()["error"]
    assert c.post(url, json={"policy": "target:2"}, headers=AUTH).status_code == 400
    assert c.post(url, json={"audit_share": 0.9}, headers=AUTH).status_code == 400
    tasks = [{"id": 100 + i, "data": {"tweet": f"shares move {i} points"}} for i in range(60)]

    def predict() -> tuple[list, list]:
        Queue("review", connection=rq_redis).empty()
        r = c.post(
            "/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG}, headers=AUTH
        )
        assert r.status_code == 200
        (job,) = jobs_in(rq_redis, "review")
        return job.args[3], job.args[5]

    # mean:0 accepts everything and nothing is audited: no review job at all.
    r = c.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG}, headers=AUTH)
    assert r.status_code == 200 and jobs_in(rq_redis, "review") == []

    r = c.post(url, json={"policy": "target:0.9", "audit_share": 0.25}, headers=AUTH)
    assert r.status_code == 200
    assert (r.get_json()["policy"], r.get_json()["audit_share"]) == ("target:0.9", 0.25)
    routed, audited = predict()
    assert len(routed) == 60  # uncalibrated: everything goes to review
    assert 5 <= len(audited) <= 25  # about a quarter, drawn by task and version
    for a in audited:
        assert a.mark.startswith(f"{version} routed: ") and a.mark.endswith(a.task.label)
    again = predict()[1]
    assert [a.task.task_id for a in again] == [a.task.task_id for a in audited]  # the same draw

    # Back to a threshold policy that accepts everything: the audit goes on, marked "accepted".
    r = c.post(url, json={"policy": "mean:0.0"}, headers=AUTH)
    routed, audited = predict()
    assert routed == [] and {a.mark.split(":")[0] for a in audited} == {f"{version} accepted"}
    # A task already carrying its mark is not drawn again; an empty policy is the environment's.
    marked = {a.task.task_id: a.mark for a in audited}
    tasks = [{**t, "data": {**t["data"], "aa_audit": marked.get(t["id"], "")}} for t in tasks]
    Queue("review", connection=rq_redis).empty()
    r = c.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG}, headers=AUTH)
    assert r.status_code == 200 and jobs_in(rq_redis, "review") == []
    r = c.post(url, json={"policy": "", "audit_share": 0}, headers=AUTH)
    assert r.get_json()["policy"] == "mean:0.0" and r.get_json()["audit_share"] == 0.0


def test_settings_refuse_an_invalid_mode_and_changes_without_authentication(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models", basic_auth_user="pm", basic_auth_password="s3cret")
    url = f"/projects/{PROJECT}/settings"
    r = c.post(url, json={"review_mode": "gpt-5"}, headers=AUTH)
    assert (
        r.status_code == 400 and "review_mode must be one of ['llm', 'human', 'off']" in r.get_json()["error"]
    )
    assert c.post(url, json={}, headers=AUTH).status_code == 400
    assert c.get(url, headers=AUTH).get_json()["review_mode"] == "human"
    assert c.get("/projects/not-a-uid/settings", headers=AUTH).status_code == 400
    open_app = app_client(tmp_path / "models")
    assert open_app.get(url).get_json()["review_mode"] == "human"  # reading needs no credentials
    r = open_app.post(url, json={"review_mode": "llm"})
    assert r.status_code == 403 and "BASIC_AUTH_USER and BASIC_AUTH_PASS" in r.get_json()["error"]
    assert open_app.get(url).get_json()["review_mode"] == "human"


def test_setup_applies_label_studios_extra_params_only_when_they_change(rq_redis, tmp_path, app_client):
    c = app_client(tmp_path / "models", basic_auth_user="pm", basic_auth_password="s3cret")
    url = f"/projects/{PROJECT}/settings"
    setup = {"project": PROJECT, "schema": CONFIG, "extra_params": '{"review_mode": "llm"}'}
    assert c.post("/setup", json=setup, headers=AUTH).status_code == 200
    assert c.get(url, headers=AUTH).get_json()["review_mode"] == "llm"
    c.post(url, json={"review_mode": "off"}, headers=AUTH)
    assert c.post("/setup", json=setup, headers=AUTH).status_code == 200  # LS polls /setup
    assert c.get(url, headers=AUTH).get_json()["review_mode"] == "off"
    r = c.post("/setup", json={**setup, "extra_params": "{oops"}, headers=AUTH)
    assert r.status_code == 400 and "extra params must be JSON" in r.get_json()["error"]
    r = c.post("/setup", json={**setup, "extra_params": {"review_mode": "robot"}}, headers=AUTH)
    assert r.status_code == 400 and "review_mode must be one of" in r.get_json()["error"]


def _routed_predict(c, tasks):
    r = c.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    return r.get_json()["results"]


def test_uncertain_tasks_are_handed_to_one_review_job(rq_redis, published, tiny_corpus, app_client):
    root, version = published
    c = app_client(root, policy="mean:0.99")
    tasks = [{"id": 100 + i, "data": {"tweet": t}} for i, (t, _) in enumerate(tiny_corpus[200:206])]
    tasks.append({"id": 200, "data": {"text": "no tweet field"}})  # no text: no prediction, no review
    results = _routed_predict(c, tasks)
    (job,) = jobs_in(rq_redis, "review")
    uid, job_version, mode, routed, cleared, audited = job.args
    assert audited == []  # no audit share set
    assert (uid, job_version, mode, cleared) == (PROJECT, version, "human", [])
    assert [e.task_id for e in routed] == [t["id"] for t in tasks[:6]]
    for entry, task, result in zip(routed, tasks, results, strict=False):
        assert isinstance(entry, RoutedTask)
        assert entry.text == task["data"]["tweet"] and entry.data == task["data"]
        assert sum(entry.votes.values()) == 2  # one vote per member
        assert set(entry.votes) <= set(tiny.LABELS) and entry.label in tiny.LABELS
        assert entry.label == result["result"][0]["value"]["choices"][0]
        assert entry.confidence == pytest.approx(result["score"], abs=1e-4) and entry.confidence < 0.99
    counters = State(rq_redis, "human").counters(PROJECT)
    assert counters["predictions"] == 7 and counters["routed"] == 6


def test_mode_off_queues_no_review(rq_redis, published, tiny_corpus, app_client):
    root, _ = published
    c = app_client(root, policy="mean:0.99", review_mode="off")
    results = _routed_predict(c, [{"id": 1, "data": {"tweet": tiny_corpus[0][0]}}])
    assert results[0]["result"]  # still pre-labelled
    assert jobs_in(rq_redis, "review") == []


def test_the_review_job_is_queued_after_the_answer_is_sent(rq_redis, published, tiny_corpus, app_client):
    """Label Studio waits on the forward pass, not on Redis: counting and queueing run when the WSGI
    server closes the response it has sent (here: the plain test client, closed by hand)."""
    root, _ = published
    c = app_client(root, policy="mean:0.99")
    tasks = [{"id": 300 + i, "data": {"tweet": t}} for i, (t, _) in enumerate(tiny_corpus[210:213])]
    r = c.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG}, buffered=False)
    assert r.status_code == 200 and len(r.get_json()["results"]) == 3
    assert jobs_in(rq_redis, "review") == []
    assert State(rq_redis, "human").counters(PROJECT)["predictions"] == 0
    r.close()
    (job,) = jobs_in(rq_redis, "review")
    assert [e.task_id for e in job.args[3]] == [300, 301, 302]
    assert State(rq_redis, "human").counters(PROJECT)["predictions"] == 3


def test_annotated_tasks_are_not_routed(rq_redis, published, tiny_corpus, app_client):
    root, _ = published
    c = app_client(root, policy="mean:0.99")
    text = tiny_corpus[0][0]
    tasks = [
        {"id": 1, "data": {"tweet": text}, "annotations": [ANNOTATION]},
        {"id": 2, "data": {"tweet": text}, "total_annotations": 1},
        {"id": 3, "data": {"tweet": text}, "annotations": [{"was_cancelled": True, "result": []}]},
        {"id": 4, "data": {"tweet": text}},
    ]
    results = _routed_predict(c, tasks)
    assert all(r["result"] for r in results)  # every task still gets its prediction
    (job,) = jobs_in(rq_redis, "review")
    assert [e.task_id for e in job.args[3]] == [3, 4]


def test_a_flagged_task_no_longer_routed_is_cleared(rq_redis, published, tiny_corpus, app_client):
    root, version = published
    c = app_client(root, policy="mean:0.0", review_mode="off")  # nothing is routed any more
    flagged = {"id": 9, "data": {"tweet": tiny_corpus[0][0], "aa_needs_review": True}}
    plain = {"id": 10, "data": {"tweet": tiny_corpus[1][0], "aa_needs_review": False}}
    _routed_predict(c, [flagged, plain])
    (job,) = jobs_in(rq_redis, "review")  # even in mode off the stale flag is taken down
    assert job.args == (PROJECT, version, "off", [], [ClearedTask(9, flagged["data"])], [])
    rq_redis.flushdb()
    _routed_predict(c, [plain])
    assert jobs_in(rq_redis, "review") == []


def test_without_redis_predictions_still_answer_and_queues_say_they_are_down(published, tiny_corpus):
    root, version = published
    c = create_app(Settings(model_dir=root, redis_url=DEAD_REDIS_URL, policy="mean:0.99")).test_client()
    assert c.get("/health").get_json()["redis"] == "down"
    assert c.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json() == {
        "model_version": version
    }
    results = _routed_predict(c, [{"id": 1, "data": {"tweet": tiny_corpus[0][0]}}])
    assert results[0]["model_version"] == version and results[0]["result"]
    for action, extra in [
        ("ANNOTATION_CREATED", {"task": TASK, "annotation": ANNOTATION}),
        ("START_TRAINING", {}),
    ]:
        r = webhook(c, action, **extra)
        assert r.status_code == 503
        error = r.get_json()["error"]
        assert "queue unavailable" in error and "127.0.0.1:1" in error and "hunter2" not in error
    r = c.post("/train", json={"project": PROJECT})
    assert r.status_code == 503 and "hunter2" not in r.get_json()["error"]
    r = c.get(f"/projects/{PROJECT}/settings")
    assert r.status_code == 503 and "unavailable" in r.get_json()["error"]
    metrics = c.get("/metrics")
    assert metrics.status_code == 200
    assert scrape.value(metrics.get_data(as_text=True), "autoannotator_redis_up") == 0
    assert (
        scrape.value(
            metrics.get_data(as_text=True), "autoannotator_model_info", project=PROJECT, version=version
        )
        == 1
    )
    status = c.get("/status.json")  # the model store still answers; the Redis parts say why not
    assert status.status_code == 200
    body = status.get_json()
    (project,) = body["projects"]
    assert project["version"] == version and "unavailable" in project["error"]
    assert "unavailable" in body["error"] and "hunter2" not in status.get_data(as_text=True)
    page = c.get("/status")
    assert page.status_code == 200 and version in page.get_data(as_text=True)


def test_metrics_are_valid_prometheus_text_with_project_labels(rq_redis, published, tiny_corpus, app_client):
    root, version = published
    c = app_client(root, policy="mean:0.99")
    _routed_predict(c, [{"id": i, "data": {"tweet": t}} for i, (t, _) in enumerate(tiny_corpus[:3])])
    webhook(c, "ANNOTATION_CREATED", task=TASK, annotation=ANNOTATION)
    State(rq_redis, "human").count(PROJECT, llm_cost_usd=0.0125)
    r = c.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    # Prometheus' own parser reads it; every counter is typed as one and named *_total.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counters = {name for name, f in families.items() if f.type == "counter"}
    assert {f"autoannotator_{name}" for name in COUNTERS} <= counters
    assert all(s.name.endswith("_total") for n in counters for s in families[n].samples)
    assert scrape.value(text, "autoannotator_redis_up") == 1
    assert scrape.value(text, "autoannotator_predictions_total", project=PROJECT) == 3
    assert scrape.value(text, "autoannotator_routed_total", project=PROJECT) == 3
    assert scrape.value(text, "autoannotator_webhooks_total", project=PROJECT) == 1
    assert scrape.value(text, "autoannotator_llm_cost_usd_total", project=PROJECT) == pytest.approx(0.0125)
    assert scrape.value(text, "autoannotator_queue_depth", queue="review") == 1
    assert scrape.value(text, "autoannotator_queue_depth", queue="ingest") == 2  # the annotation and a sync
    assert scrape.value(text, "autoannotator_model_info", project=PROJECT, version=version) == 1


# ---------------------------------------------------------------------------- bugs found in review


def test_a_webhook_created_at_without_a_zone_is_utc_whatever_the_servers_zone(monkeypatch):
    """Label Studio writes created_at in UTC; a stamp without a zone once read as local time gave a
    webhook a project uid other than /predict's on a server outside UTC."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        naive = events.uid_from_project({"id": 7, "created_at": "2023-11-14T22:13:20.000000"})
        zoned = events.uid_from_project({"id": 7, "created_at": "2023-11-14T22:13:20.000000Z"})
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert naive == zoned == PROJECT


def test_a_failed_first_training_is_not_queued_again_on_every_setup(rq_redis, tmp_path, app_client):
    """/setup asks for the first version of a project with configured specialists on each poll; after
    a failure it waits (60 s, doubling), then asks again."""
    c = app_client(tmp_path / "models", specialists=("/nonexistent/model",))
    body = {"project": PROJECT, "schema": CONFIG, "hostname": "http://ls.invalid"}
    assert c.post("/setup", json=body).status_code == 200
    assert [j.args for j in jobs_in(rq_redis, "train")] == [(PROJECT, False)]
    state = State(rq_redis, "human")
    # What the train job records when the first version fails (service/training.py), then frees.
    queueing.first_version_failed(state, PROJECT)
    state.release_training(PROJECT)
    Queue("train", connection=rq_redis).empty()
    for _ in range(3):  # Label Studio polls
        assert c.post("/setup", json=body).status_code == 200
    assert jobs_in(rq_redis, "train") == []
    failed_at = float(state.get(PROJECT, "first_failed_at") or 0)
    assert queueing.first_version_retry_in(state, PROJECT, now=failed_at + 59) == pytest.approx(1)
    assert queueing.first_version_retry_in(state, PROJECT, now=failed_at + 60) == 0
    queueing.first_version_failed(state, PROJECT, now=failed_at)  # a second failure doubles the wait
    assert queueing.first_version_retry_in(state, PROJECT, now=failed_at + 60) == pytest.approx(60)
    state.put(PROJECT, "first_failed_at", str(time.time() - 121))
    assert c.post("/setup", json=body).status_code == 200
    assert [j.args for j in jobs_in(rq_redis, "train")] == [(PROJECT, False)]


def test_an_invalid_prediction_of_ours_is_an_empty_prediction_for_that_task_not_a_400(
    rq_redis, published, tiny_corpus, app_client, monkeypatch
):
    """Our own bug must not be reported as the client's fault, nor cost the other tasks theirs."""
    root, version = published
    c = app_client(root, review_mode="off")
    real = annotator.prediction
    calls = []

    def second_one_broken(*args, **kwargs):
        item = real(*args, **kwargs)
        calls.append(item)
        if len(calls) == 2:
            item["result"][0]["value"]["choices"] *= 2  # two choices on a single-choice control
        return item

    monkeypatch.setattr(annotator, "prediction", second_one_broken)
    assert c.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200
    tasks = [{"id": i, "data": {"tweet": t}} for i, (t, _) in enumerate(tiny_corpus[:3])]
    r = c.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert [bool(x["result"]) for x in results] == [True, False, True]
    assert results[1] == {"result": [], "score": 0.0, "model_version": version}
    counters = State(rq_redis, "off").counters(PROJECT)
    assert (counters["predictions"], counters["invalid_predictions"]) == (3, 1)
    metrics = c.get("/metrics").get_data(as_text=True)
    assert scrape.value(metrics, "autoannotator_invalid_predictions_total", project=PROJECT) == 1
