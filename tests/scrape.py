"""Reading ``/metrics`` as Prometheus does: the exposition text parsed by prometheus_client."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition ``text``: (name, labels) -> value. Raises on malformed text."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the text has no such sample."""
    return samples(text).get((name, frozenset(labels.items())))
