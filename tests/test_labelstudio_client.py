"""The workers' Label Studio writes, where a real Label Studio cannot be made to misbehave.

A real server stores /predict's answer within milliseconds, so the wait for a prediction that never
arrives (LS dropped it) is exercised against a stand-in that lists no predictions, ever; what it
records is exactly the calls the SDK would have made. The calls themselves are covered against a
real Label Studio in tests/test_flow_e2e.py and tests/test_llm_failures_e2e.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from autoannotator.labelstudio import client
from autoannotator.labelstudio.client import PredictionWrite, replace_predictions


class _NeverStored:
    """``ls.predictions`` of a Label Studio that dropped every prediction of the version."""

    def __init__(self) -> None:
        self.listed: list[int] = []
        self.created: list[dict[str, Any]] = []

    def list(self, task: int) -> list[Any]:
        self.listed.append(task)
        return []

    def create(self, **fields: Any) -> None:
        self.created.append(fields)


def test_the_wait_for_stored_predictions_is_once_per_batch_not_once_per_task(monkeypatch):
    """100 routed tasks once waited up to 10 s each (17 minutes); now the batch waits 10 s in all."""
    sleeps: list[float] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(client.time, "sleep", sleep)
    monkeypatch.setattr(client.time, "monotonic", lambda: clock[0])
    predictions = _NeverStored()
    ls = SimpleNamespace(predictions=predictions)
    writes = [PredictionWrite(i, [{"value": {"choices": ["x"]}}], 0.5) for i in range(100)]
    assert replace_predictions(ls, "v0002", writes) == 100  # type: ignore[arg-type]
    assert sum(sleeps) <= client.PREDICTION_WAIT_S + client._POLL_S
    assert len(predictions.listed) == 100 * len(sleeps) + 100  # every task looked up each round
    assert sorted(c["task"] for c in predictions.created) == list(range(100))
    assert {c["model_version"] for c in predictions.created} == {"v0002"}
