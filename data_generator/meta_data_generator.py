"""Episodic samplers: :class:`CategoriesSampler` (official layout, numpy Generator, resumable) and fixed episodes.

Episode layout (as the official PT ``CategoriesSampler``): an episode is an int64 array of ``way * (shot + query)``
image indices, **support first, then query, each interleaved by class**::

    [c0_0, c1_0, ..., c{way-1}_0,  c0_1, c1_1, ..., c{way-1}_1,  ...,  c0_{shot+query-1}, ..., c{way-1}_{shot+query-1}]
     \\__________________ shot rows: support _____________________/  \\____________ query rows __________________/

where ``ck_i`` is the i-th image drawn from the k-th class of the episode. So

* support = ``episode[: way * shot]`` with labels ``episode_labels(way, shot)`` = ``torch.arange(way).repeat(shot)``
  = ``[0, 1, ..., way-1, 0, 1, ...]`` (shape (way*shot,)),
* query = ``episode[way * shot:]`` with labels ``episode_labels(way, query)`` (shape (way*query,)),
* the dataset class of episode label k is ``labels[episode[k]]`` (see :func:`episode_classes`).

Each episode picks ``way`` distinct classes uniformly at random (in random order: that order defines the episode
labels) and, per class, ``shot + query`` distinct images uniformly at random, so the images of an episode are
distinct. All randomness comes from the sampler's own ``np.random.Generator(PCG64(seed))``; it is independent of
the global numpy / torch / python RNGs, and its state is saved by :meth:`CategoriesSampler.state_dict`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from data_generator.dataset_loader import check_counts

__all__ = ["CategoriesSampler", "episode_labels", "fixed_episodes", "episode_classes"]


def _to_jsonable(obj: Any) -> Any:
    """Copy of a bit-generator state with every int stored as str (128-bit ints survive json / weights_only)."""
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    return obj


def _from_jsonable(obj: Any, template: Any) -> Any:
    """Inverse of :func:`_to_jsonable`, guided by a state of the same bit generator."""
    if isinstance(template, dict):
        return {k: _from_jsonable(obj[k], v) for k, v in template.items()}
    if isinstance(template, (int, np.integer)) and not isinstance(template, bool):
        return int(obj)
    return obj


class CategoriesSampler:
    """Yields ``n_batch`` episodes of ``way`` classes x (``shot`` + ``query``) images per pass.

    Args:
        labels: int (N,) class id of every image (``ImageSet.labels``).
        n_batch: episodes per pass (``len(sampler)``).
        way, shot, query: classes per episode, support and query images per class.
        seed: seed of the sampler's ``np.random.Generator(PCG64(seed))``.

    Iterating yields int64 (way*(shot+query),) index arrays in the layout of the module docstring. Iteration keeps a
    position, so a pass that was interrupted and restored with :meth:`load_state_dict` yields exactly the remaining
    episodes; after a full pass the next ``iter()`` starts a new pass.

    Raises:
        UserError: way larger than the number of classes, or a class with fewer than shot + query images.
    """

    def __init__(self, labels: np.ndarray, n_batch: int, way: int, shot: int, query: int, seed: int) -> None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be an int (N,) array, got {labels.dtype} {labels.shape}")
        if n_batch < 0 or shot < 0 or query < 0:
            raise ValueError(f"n_batch, shot, query must be >= 0, got {n_batch}, {shot}, {query}")
        self.labels = labels.astype(np.int64)
        self.n_batch = int(n_batch)
        self.way = int(way)
        self.shot = int(shot)
        self.query = int(query)
        self.n_per_class = self.shot + self.query
        self.seed = int(seed)
        self.classes, counts = np.unique(self.labels, return_counts=True)  # (C,) sorted class ids
        order = np.argsort(self.labels, kind="stable")
        self._class_idx = dict(zip(self.classes.tolist(), np.split(order, np.cumsum(counts)[:-1])))
        check_counts(counts, [str(c) for c in self.classes.tolist()], self.way, self.n_per_class,
                     "episode sampler", f"the labels ({len(self.labels)} images)")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._pos = 0

    def __len__(self) -> int:
        """n_batch, the episodes of one full pass."""
        return self.n_batch

    @property
    def position(self) -> int:
        """Episodes already yielded in the current pass (0 <= position <= n_batch)."""
        return self._pos

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield the remaining episodes of the current pass: int64 (way*(shot+query),) each."""
        if self._pos >= self.n_batch:
            self._pos = 0
        while self._pos < self.n_batch:
            episode = self.sample()
            self._pos += 1
            yield episode
        self._pos = 0

    def _draw(self, classes: Sequence[int]) -> np.ndarray:
        """(len(classes)*(shot+query),) int64: per class shot+query distinct images, interleaved by class."""
        rng = self._rng
        n = self.n_per_class
        batch = np.empty((len(classes), n), dtype=np.int64)
        for k, c in enumerate(classes):
            idx = self._class_idx[int(c)]
            batch[k] = idx[rng.choice(len(idx), size=n, replace=False)]
        return batch.T.reshape(-1)

    def sample(self) -> np.ndarray:
        """One episode, int64 (way*(shot+query),): ``way`` random distinct classes, fresh images."""
        picked = self.classes[self._rng.choice(len(self.classes), size=self.way, replace=False)]
        return self._draw(picked.tolist())

    def sample_from_classes(self, classes: Sequence[int]) -> np.ndarray:
        """One episode on the given dataset class ids (fresh random images); episode label k is ``classes[k]``.

        Args:
            classes: (K,) distinct class ids (values of ``labels``), usually K == way.

        Returns:
            int64 (K*(shot+query),) indices in the standard layout with K in place of way.
        """
        cls = [int(c) for c in (classes.tolist() if hasattr(classes, "tolist") else classes)]
        if not cls:
            raise ValueError("sample_from_classes needs at least one class")
        if len(set(cls)) != len(cls):
            raise ValueError(f"sample_from_classes needs distinct classes, got {cls}")
        unknown = [c for c in cls if c not in self._class_idx]
        if unknown:
            raise ValueError(f"unknown class ids {unknown}; the labels hold {len(self.classes)} classes")
        return self._draw(cls)

    def state_dict(self) -> dict:
        """JSON-serialisable state: the generator state (ints as str), the position in the pass and the settings."""
        return {
            "bit_generator": _to_jsonable(self._rng.bit_generator.state),
            "position": self._pos,
            "n_batch": self.n_batch,
            "way": self.way,
            "shot": self.shot,
            "query": self.query,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next ``iter()`` yields the rest of the interrupted pass."""
        for key in ("way", "shot", "query", "n_batch"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key} = {state[key]}, this sampler has "
                                 f"{getattr(self, key)}")
        template = self._rng.bit_generator.state
        saved = state["bit_generator"]
        if saved.get("bit_generator") != template["bit_generator"]:
            raise ValueError(f"sampler state holds a {saved.get('bit_generator')} generator, expected "
                             f"{template['bit_generator']}")
        self._rng.bit_generator.state = _from_jsonable(saved, template)
        pos = int(state.get("position", 0))
        if not 0 <= pos <= self.n_batch:
            raise ValueError(f"sampler position {pos} outside 0..{self.n_batch}")
        self._pos = pos


def episode_labels(way: int, n_per_class: int) -> torch.Tensor:
    """int64 (way*n_per_class,) CPU tensor ``torch.arange(way).repeat(n_per_class)`` = [0, 1, ..., way-1, 0, ...]."""
    return torch.arange(way, dtype=torch.int64).repeat(n_per_class)


def fixed_episodes(labels: np.ndarray, n_episodes: int, way: int, shot: int, query: int, seed: int) -> np.ndarray:
    """int64 (n_episodes, way*(shot+query)) episodes from a private ``PCG64(seed)`` generator.

    The result depends only on (labels, n_episodes, way, shot, query, seed), not on any global RNG, so every
    evaluation (and every checkpoint compared) sees the same episodes.
    """
    sampler = CategoriesSampler(labels, n_episodes, way, shot, query, seed)
    if n_episodes == 0:
        return np.empty((0, way * (shot + query)), dtype=np.int64)
    return np.stack(list(sampler)).astype(np.int64, copy=False)


def episode_classes(episode: np.ndarray, labels: np.ndarray, way: int) -> np.ndarray:
    """int64 (way,): the dataset class id of each episode label 0..way-1 (``labels[episode[:way]]``)."""
    episode = np.asarray(episode.cpu() if isinstance(episode, torch.Tensor) else episode)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if episode.ndim != 1 or episode.shape[0] < way or episode.shape[0] % way:
        raise ValueError(f"episode of shape {episode.shape} does not hold a multiple of way = {way} images")
    return labels[episode[:way]].astype(np.int64)
