"""The raw-pixel baseline of a pack: cosine nearest centroid on the ink values, no training.

It is scored on the models' own test episodes: ``fixed_episodes(labels, episodes, way, shot, query, eval_seed)``
with the evaluation seed of ``main.py --eval_seed`` (default 1), the episodes ``meta_eval`` and the ablation test
on (the first ``episodes`` of them: a longer run draws the same episodes first).
"""

from __future__ import annotations

import numpy as np

from data_generator.meta_data_generator import fixed_episodes
from utils.misc import mean_ci

EVAL_SEED = 1             # main.py's --eval_seed default: the DEMO's and the ablation's test episodes


def pixel_baseline(images: np.ndarray, labels: np.ndarray, way: int = 5, shot: int = 1, query: int = 15,
                   episodes: int = 600, eval_seed: int = EVAL_SEED) -> tuple[float, float]:
    """Cosine nearest-centroid accuracy on raw pixels, no training: mean and 95 % half-interval.

    Pixels are taken as ink (``1 - x / 255``), flattened; the episodes are ``fixed_episodes(labels, episodes,
    way, shot, query, eval_seed)``, the same ones the models are tested on with ``--eval_seed eval_seed``.
    """
    x = (1.0 - images.reshape(len(images), -1).astype(np.float32) / 255.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    eps = fixed_episodes(labels, episodes, way, shot, query, eval_seed)
    y = np.tile(np.arange(way), query)           # episode layout: image j of class k at position j * way + k
    acc = np.empty(len(eps))
    for e, ep in enumerate(eps):
        support = x[ep[:way * shot]].reshape(shot, way, -1).mean(0)
        support /= np.linalg.norm(support, axis=1, keepdims=True) + 1e-8
        acc[e] = ((x[ep[way * shot:]] @ support.T).argmax(1) == y).mean()
    return mean_ci(acc)


def baseline_report(path: str, split: str = "test", episodes: int = 600,
                    eval_seed: int = EVAL_SEED) -> dict[str, tuple[float, float]]:
    """5-way 1-shot and 5-shot pixel baselines on one split of a pack."""
    with np.load(path, allow_pickle=False) as data:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    return {f"5way_{k}shot": pixel_baseline(images, labels, 5, k, 15, episodes, eval_seed) for k in (1, 5)}


def print_baseline(path: str, split: str, episodes: int, eval_seed: int = EVAL_SEED) -> None:
    for name, (mean, ci) in baseline_report(path, split, episodes, eval_seed).items():
        print(f"pixel cosine nearest-centroid, {split}, {name}, {episodes} episodes (eval seed {eval_seed}): "
              f"{100 * mean:.2f} +- {100 * ci:.2f} %")
