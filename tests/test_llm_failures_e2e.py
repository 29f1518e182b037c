"""README, *How it works*: in ``llm`` mode "an off-label answer, a timeout or a 5xx after retries
sends the task to the human queue instead" — here a rate limit that never clears (429 forever) and
an LLM slower than ``AUTOANNOTATOR_LLM_TIMEOUT``, against a real Label Studio, a real Redis, real
``autoannotator worker`` processes and the local OpenAI-compatible server.

Every routed task must end in Label Studio's "Needs review" tab (``aa_needs_review`` set, the tab the
backend creates lists it), keep the ensemble's prediction, stay out of the verified pool, and be
counted as a fallback in ``/status`` and ``/metrics``, with exactly as many LLM requests as the
reviewer's bounded retries allow (``LLMReviewer``'s default ``max_retries=3``: 4 attempts a task).
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from autoannotator.learning.pool import VerifiedPool
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests.e2e_data import CLEAR, CONFIG, LABELS, publish
from tests.flow import PASSWORD, USER, AppServer, Workers, backend_env, connect, drain, failed_jobs
from tests.openai_server import OpenAIServer, Reply

pytestmark = pytest.mark.e2e

ATTEMPTS = 4  # LLMReviewer(max_retries=3): the first request and three retries
TIMEOUT_S = 0.5  # AUTOANNOTATOR_LLM_TIMEOUT; the server sleeps six times longer
RATE_LIMITED = list(CLEAR)[:3]
TOO_SLOW = list(CLEAR)[3:5]


def _llm_env(
    tmp_path: Path, label_studio: Any, redis_url: str, llm: OpenAIServer, **extra: str
) -> dict[str, str]:
    """The backend in llm mode against the local server, every predicted task routed to review."""
    return backend_env(
        tmp_path / "models",
        label_studio,
        redis_url,
        AUTOANNOTATOR_REVIEW_MODE="llm",
        AUTOANNOTATOR_POLICY="budget:1.0:mean",
        AUTOANNOTATOR_LLM_BASE_URL=llm.base_url,
        AUTOANNOTATOR_LLM_MODEL="gpt-4o-mini",
        AUTOANNOTATOR_LLM_API_KEY="sk-e2e-llm",
        **extra,
    )


def _check_fell_back(ls: Any, project_id: int, texts: list[str]) -> dict[str, Any]:
    """Each task is flagged for humans as an LLM failure and keeps the ensemble's prediction."""
    tasks = {t.data["text"]: t for t in ls.tasks.list(project=project_id, fields="all")}
    for text in texts:
        task = tasks[text]
        assert task.data.get("aa_needs_review") == 1, (text, task.data)
        assert task.data.get("aa_review") == "human (LLM failed)", (text, task.data)
        assert "aa_llm_label" not in task.data, (text, task.data)
        assert re.fullmatch(r"\w+ 1", task.data["aa_votes"]), task.data["aa_votes"]  # k = 1
        assert [p.model_version for p in task.predictions] == ["v0001"]
    return tasks


def test_llm_rate_limited_forever_or_timing_out_sends_routed_tasks_to_needs_review(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    with OpenAIServer() as llm:
        env = _llm_env(tmp_path, label_studio, redis_url, llm, AUTOANNOTATOR_LLM_TIMEOUT=str(TIMEOUT_S))
        settings = Settings.from_env(env)
        ls = label_studio.client()
        with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
            project = ls_project(CONFIG)
            uid = connect(ls, project.id, app.url)
            publish(settings.model_dir, uid, c=1.0, note="served")
            drain(redis_client, workers)
            client = app.app.test_client()
            auth = _auth()

            # 1. The endpoint rate-limits every request, forever (with a short Retry-After).
            llm.always(Reply(status=429, retry_after=0.01))
            # Imported tasks get predictions from a labelling run of their own (TASKS_CREATED), which
            # routes them like /predict would: nobody presses Retrieve Predictions.
            ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in RATE_LIMITED])
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            tasks = _check_fell_back(ls, project.id, RATE_LIMITED)
            assert Counter(r.user_text for r in llm.completions) == {t: ATTEMPTS for t in RATE_LIMITED}
            assert {r.reply_status for r in llm.completions} == {429}
            counters = _counters(client, auth, uid)
            assert counters == {
                **counters,
                "labelled_tasks": 3,
                "llm_calls": 3 * ATTEMPTS,
                "llm_failures": 3,
                "reviewed_human_queue": 3,
                "reviewed_llm": 0,
                "llm_cache_hits": 0,
                "llm_cost_usd": 0,
                "llm_prompt_tokens": 0,
            }
            for text in RATE_LIMITED:
                why = _gave_up(workers, tasks[text].id)
                assert why == f"HTTP 429: (gave up after {ATTEMPTS} attempts)", why

            # 2. The endpoint answers, but later than the client's timeout.
            llm.always(Reply(delay_s=6 * TIMEOUT_S))
            asked = len(llm.completions)
            ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TOO_SLOW])
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            tasks = _check_fell_back(ls, project.id, RATE_LIMITED + TOO_SLOW)
            assert Counter(r.user_text for r in llm.completions[asked:]) == {t: ATTEMPTS for t in TOO_SLOW}
            counters = _counters(client, auth, uid)
            assert counters == {
                **counters,
                "labelled_tasks": 5,
                "llm_calls": 5 * ATTEMPTS,
                "llm_failures": 5,
                "reviewed_human_queue": 5,
                "reviewed_llm": 0,
                "llm_cost_usd": 0,
            }
            for text in TOO_SLOW:
                assert _gave_up(workers, tasks[text].id) == (
                    f"timed out after {TIMEOUT_S:g} s (gave up after {ATTEMPTS} attempts)"
                ), workers.logs()

            # Every one of them is in the backend's "Needs review" tab, and nowhere in the pool.
            views = ls.views.list(project=project.id)
            tabs = [v for v in views if (v.data or {}).get("title") == "Needs review"]
            assert len(tabs) == 1
            in_tab = [t.data["text"] for t in ls.tasks.list(project=project.id, view=tabs[0].id)]
            assert sorted(in_tab) == sorted(RATE_LIMITED + TOO_SLOW)
            root = ProjectModels(settings.model_dir).registry(uid).root
            assert len(VerifiedPool(LABELS, path=root / "pool.jsonl")) == 0
            # What a project manager reads: the fallbacks on /status, the raw counters on /metrics.
            page = client.get("/status", headers=auth).get_data(as_text=True)
            assert f"{5 * ATTEMPTS} calls, 0 cache hits, 5 fell back to humans, $0.0000" in page
            metrics = client.get("/metrics", headers=auth).get_data(as_text=True)
            assert f'autoannotator_llm_failures_total{{project="{uid}"}} 5' in metrics
            assert f'autoannotator_reviewed_human_queue_total{{project="{uid}"}} 5' in metrics
            assert f'autoannotator_llm_calls_total{{project="{uid}"}} {5 * ATTEMPTS}' in metrics


def _auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def _counters(client: Any, auth: dict[str, str], uid: str) -> dict[str, float]:
    status = client.get("/status.json", headers=auth).get_json()
    counters: dict[str, float] = next(p for p in status["projects"] if p["project"] == uid)["counters"]
    return counters


def _gave_up(workers: Workers, task_id: int) -> str:
    """Why the worker sent this task to humans, from its whole log (the detail without the body)."""
    log = (workers.log_dir / "worker-0.log").read_text(errors="replace")  # the ingest,review worker
    found = re.findall(rf"task {task_id} goes to the human queue: LLM failed \((.*)\)$", log, re.M)
    assert len(found) == 1, workers.logs()
    return re.sub(r"^(HTTP \d+): .*?(\(gave up)", r"\1: \2", found[0])


def test_an_unsure_llm_answer_goes_to_needs_review_and_a_sure_one_is_accepted(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str
) -> None:
    """The third tier: with AUTOANNOTATOR_LLM_MIN_CONFIDENCE set, the backend asks for token
    log-probabilities; an answer below the floor goes to a person, marked as unsure."""
    texts = list(CLEAR)[:4]
    unsure = set(texts[2:])
    with OpenAIServer(
        answer=CLEAR.__getitem__, probability=lambda text: 0.4 if text in unsure else 0.97
    ) as llm:
        env = _llm_env(tmp_path, label_studio, redis_url, llm, AUTOANNOTATOR_LLM_MIN_CONFIDENCE="0.8")
        settings = Settings.from_env(env)
        ls = label_studio.client()
        with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
            project = ls_project(CONFIG)
            uid = connect(ls, project.id, app.url)
            publish(settings.model_dir, uid, c=1.0, note="served")
            drain(redis_client, workers)
            ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
            assert all(r.body.get("logprobs") is True for r in llm.completions)
            tasks = {t.data["text"]: t for t in ls.tasks.list(project=project.id, fields="all")}
            for text in texts:
                data = tasks[text].data
                if text in unsure:
                    assert data.get("aa_review") == "human (LLM unsure)", data
                    assert data.get("aa_needs_review") == 1 and "aa_llm_label" not in data, data
                else:
                    assert data.get("aa_llm_label") == CLEAR[text], data
                    assert not data.get("aa_needs_review"), data
            counters = _counters(app.app.test_client(), _auth(), uid)
            assert counters == {**counters, "reviewed_llm": 2, "llm_failures": 2, "reviewed_human_queue": 2}
            root = ProjectModels(settings.model_dir).registry(uid).root
            pooled = VerifiedPool(LABELS, path=root / "pool.jsonl")
            assert sorted(it.text for it in pooled.items()) == sorted(set(texts) - unsure)
