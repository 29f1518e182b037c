"""Data the end-to-end tests share: the sentiment config, a seed set a project owner could label in
ten minutes, tasks no sensible model can miss, and a way to publish a version as the trainer would."""

from __future__ import annotations

from pathlib import Path

from autoannotator.core.labels import LabelSet
from autoannotator.models.specialists import NgramSpecialist
from autoannotator.storage.model_store import ProjectModels

CONFIG = (Path(__file__).resolve().parents[1] / "label_config" / "sentiment.xml").read_text(encoding="utf-8")
LABELS = LabelSet.of(("Positive", "Negative", "Neutral"))

# A seed set a project owner could label in ten minutes: 20 short sentences per label.
SEED = {
    "Positive": [
        "I love this phone, it is wonderful",
        "Great service and friendly staff",
        "What a fantastic movie, truly excellent",
        "The food was delicious and amazing",
        "Absolutely wonderful experience, highly recommend",
        "Best purchase I have made this year",
        "I am so happy with the results",
        "Excellent quality, works perfectly",
        "The team did a great job, love it",
        "Brilliant performance, I enjoyed every minute",
        "Superb hotel with a beautiful view",
        "Fantastic support, they solved everything fast",
        "This is awesome, thank you so much",
        "Delightful little cafe with great coffee",
        "Happy customer, excellent value for money",
        "The concert was amazing and the crowd loved it",
        "Perfect fit and lovely colour",
        "Wonderful book, I love the characters",
        "Great news, profits are up and everyone is happy",
        "Really enjoyed the trip, everything was excellent",
    ],
    "Negative": [
        "I hate this phone, it is terrible",
        "Awful service and rude staff",
        "What a horrible movie, truly boring",
        "The food was disgusting and cold",
        "Absolutely terrible experience, never again",
        "Worst purchase I have made this year",
        "I am so angry and disappointed",
        "Poor quality, broke after one day",
        "The team did a bad job, hate it",
        "Dreadful performance, I regret every minute",
        "Dirty hotel with a horrible smell",
        "Useless support, they ignored my complaint",
        "This is awful, a complete waste of money",
        "Miserable little cafe with bitter coffee",
        "Unhappy customer, terrible value for money",
        "The concert was a disaster and the crowd booed",
        "Bad fit and ugly colour",
        "Boring book, I hated the characters",
        "Bad news, losses are up and everyone is worried",
        "Really disliked the trip, everything was awful",
    ],
    "Neutral": [
        "The meeting is scheduled for Tuesday at ten",
        "The store opens at nine in the morning",
        "The report has twelve pages",
        "The train leaves from platform four",
        "Our office is on the third floor",
        "The package was delivered on Monday",
        "The museum is located near the station",
        "The form asks for your name and address",
        "The company released its quarterly report today",
        "The bus route changes next week",
        "The library closes at six on weekdays",
        "The manual describes the settings menu",
        "The event takes place in the main hall",
        "The price is listed on the website",
        "The new policy starts in January",
        "The book has three chapters",
        "The flight departs at noon",
        "The document was updated yesterday",
        "The parking lot is behind the building",
        "The survey contains ten questions",
    ],
}
# Tasks whose label no sensible model can miss, and neutral ones whose label is not asserted.
CLEAR = {
    "I love it, wonderful and excellent": "Positive",
    "Great food and friendly staff, highly recommend": "Positive",
    "Amazing, I am so happy": "Positive",
    "Terrible and awful, I hate it": "Negative",
    "Rude staff and disgusting food, never again": "Negative",
    "Horrible, I am so angry and disappointed": "Negative",
}
NEUTRAL = ["The meeting is on the third floor", "The report was released on Monday"]


def publish(model_dir: Path, uid: str, c: float, note: str) -> str:
    """Train and publish a version the way the trainer would: through a registry of its own, not
    through the server's objects, so the server can only learn of it from disk."""
    texts = [t for texts in SEED.values() for t in texts]
    ys = [label for label, texts in SEED.items() for _ in texts]
    return (
        ProjectModels(model_dir)
        .registry(uid)
        .save_ensemble(
            LABELS,
            {"ngram": lambda d: NgramSpecialist.untrained(LABELS, c=c).fit(texts, ys, d)},
            note=note,
        )
    )
