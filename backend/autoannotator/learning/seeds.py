"""Seed tasks that cover a project: one per cluster of the encoder's embeddings.

The paper's fully automatic start has an LLM label the seed set. Which tasks it labels matters more
than usual there: an LLM label costs money, and a few hundred labels must show the specialists every
kind of text in the project. :func:`choose_seeds` clusters the texts' unit embeddings with k-means
(scikit-learn's, k = the number of seeds wanted) and picks, in each cluster, the text nearest its
centre: a spread of typical texts instead of whatever order the tasks were imported in.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

# k-means over more texts than this draws them at random first (its cost grows with n * k).
MAX_CLUSTERED = 20_000


def choose_seeds(vectors: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` rows of ``vectors`` (``[N, dim]``), one nearest each k-means centre, in
    cluster order; all rows when ``n >= N``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, dim], got shape {vectors.shape}")
    total = vectors.shape[0]
    if n <= 0 or total == 0:
        return []
    if n >= total:
        return list(range(total))
    rng = np.random.default_rng(seed)
    pool = (
        np.sort(rng.choice(total, MAX_CLUSTERED, replace=False))
        if total > MAX_CLUSTERED
        else np.arange(total)
    )
    x = vectors[pool]
    km = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(x)
    chosen: list[int] = []
    taken: set[int] = set()
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        if not members.size:
            continue
        distance = np.linalg.norm(x[members] - km.cluster_centers_[c], axis=1)
        for j in members[np.argsort(distance)]:
            if int(pool[j]) not in taken:
                taken.add(int(pool[j]))
                chosen.append(int(pool[j]))
                break
    return chosen
