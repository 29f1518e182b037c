"""The fully automatic start through a real Label Studio, real workers and a local server speaking
the OpenAI API: a project in llm mode that nobody annotated gets its seed tasks chosen by
clustering and labelled by the LLM, the cold start trains on them, the new version labels the
project, and a person's annotation of a seed task overrides the LLM's label in the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autoannotator.learning.pool import Source, VerifiedPool
from autoannotator.service.app import create_app
from autoannotator.settings import Settings
from autoannotator.storage.model_store import ProjectModels
from tests.e2e_data import CONFIG, LABELS, SEED
from tests.flow import AppServer, Workers, backend_env, drain, failed_jobs, wait_for
from tests.flow import annotate as _annotate
from tests.flow import connect as _connect
from tests.openai_server import OpenAIServer

pytestmark = pytest.mark.e2e

SEEDS = 24
TEXTS = {f"{text}, take {i}": label for label, group in SEED.items() for text in group for i in range(2)}


def test_an_unannotated_project_in_llm_mode_cold_starts_from_llm_labelled_seed_tasks(
    tmp_path: Path, label_studio: Any, ls_project: Any, redis_client: Any, redis_url: str, tiny_encoder: Path
) -> None:
    with OpenAIServer(answer=lambda text: TEXTS.get(text, "Neutral")) as llm:
        env = backend_env(
            tmp_path / "models",
            label_studio,
            redis_url,
            AUTOANNOTATOR_REVIEW_MODE="llm",
            AUTOANNOTATOR_LLM_SEEDS=str(SEEDS),
            AUTOANNOTATOR_SEED_LABELS="100",  # more than the LLM seeds: they are enough on their own
            AUTOANNOTATOR_POLICY="mean:0.0",  # nothing routed: every LLM call below is a seed's
            AUTOANNOTATOR_LLM_BASE_URL=llm.base_url,
            AUTOANNOTATOR_LLM_API_KEY="sk-e2e",
            AUTOANNOTATOR_ENCODER=str(tiny_encoder),
            AUTOANNOTATOR_COLD_START_KINDS="ngram-linear",
            AUTOANNOTATOR_MIN_HOLDOUT="1000",
        )
        settings = Settings.from_env(env)
        ls = label_studio.client()
        project = ls_project(CONFIG)
        ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
        with AppServer(create_app(settings)) as app, Workers(env, tmp_path / "logs") as workers:
            uid = _connect(ls, project.id, app.url)
            registry = ProjectModels(settings.model_dir).registry(uid)
            wait_for("the LLM-seeded cold start to publish v0001", registry.current, 300, workers)
            drain(redis_client, workers)
            assert not failed_jobs(redis_client), failed_jobs(redis_client)

            asked = [r.user_text for r in llm.completions]
            assert len(asked) == SEEDS and len(set(asked)) == SEEDS
            pool = VerifiedPool(LABELS, path=registry.root / "pool.jsonl")
            items = pool.items()
            assert len(items) == SEEDS and {it.source for it in items} == {Source.LLM_SEED}
            assert {it.text for it in items} == set(asked)
            assert all(it.label == TEXTS[it.text] for it in items)
            assert {it.label for it in items} == set(LABELS.names)  # the clusters cover every label
            tasks = {
                t.data["text"]: t for t in ls.tasks.list(project=project.id, fields="all", page_size=500)
            }
            seeded = {t for t, task in tasks.items() if task.data.get("aa_review") == "llm seed"}
            assert seeded == set(asked)
            assert all(tasks[t].data["aa_llm_label"] == TEXTS[t] for t in seeded)
            # The version labelled the project; a seed task's prediction is the LLM's label.
            for text, task in tasks.items():
                (p,) = [p for p in task.predictions if p.model_version == "v0001"]
                if text in seeded:
                    assert p.result[0]["value"]["choices"] == [TEXTS[text]]

            # A person disagrees with the LLM on one seed task: the person's label wins.
            text = sorted(seeded)[0]
            other = next(x for x in LABELS.names if x != TEXTS[text])
            _annotate(ls, tasks[text].id, other)
            key = f"task:{tasks[text].id}"
            wait_for(
                "the human label to override the LLM seed",
                lambda: (
                    VerifiedPool(LABELS, path=registry.root / "pool.jsonl").get(key).source is Source.HUMAN
                ),
                120,
                workers,
            )
            item = VerifiedPool(LABELS, path=registry.root / "pool.jsonl").get(key)
            assert item is not None and item.label == other
            drain(redis_client, workers)
            assert len(llm.completions) == SEEDS  # nothing was seeded twice
            assert not failed_jobs(redis_client), failed_jobs(redis_client)
