"""The episode module: the episode layout, the task object, and the samplers that make them.

Everything that knows how an episode is laid out lives here: :func:`layout` (per-class draws -> an episode),
:class:`Task` (an episode's support, query, labels and class ids), :func:`episode_labels`, :func:`by_class` (rows of
the layout grouped per class); the samplers (:class:`CategoriesSampler`, :func:`fixed_episodes`) and the hard-task
planner (``data_generator/hard_tasks.py``) make episodes only through :func:`layout`, and evaluation, the
meta-trainer and the glyph baseline read them only through :class:`Task`, :func:`episode_labels` and
:func:`by_class`.

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

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data_generator.dataset_loader import check_counts
from utils.misc import generator_state, set_generator_state

__all__ = ["CategoriesSampler", "Task", "layout", "by_class", "episode_labels", "fixed_episodes", "episode_classes"]


# ------------------------------------------------------------------------------------------------ the layout
def layout(block: np.ndarray, shot: int) -> np.ndarray:
    """Per-class draws -> one episode in the layout above.

    Args:
        block: int (way, shot + query) image indices, row k = the k-th class's draws.
        shot: how many of each row are support.
    Returns:
        int64 (way * (shot + query),): support then query, each interleaved by class.
    """
    block = np.asarray(block, dtype=np.int64)
    return np.concatenate([block[:, :shot].T.reshape(-1), block[:, shot:].T.reshape(-1)])


def episode_labels(way: int, n_per_class: int) -> torch.Tensor:
    """int64 (way*n_per_class,) CPU tensor ``torch.arange(way).repeat(n_per_class)`` = [0, 1, ..., way-1, 0, ...]."""
    return torch.arange(way, dtype=torch.int64).repeat(n_per_class)


def by_class(x: torch.Tensor, way: int, dim: int = 0) -> torch.Tensor:
    """Group ``way * n`` rows in the layout's order by class: dim ``dim`` of size ``way * n`` becomes ``(n, way)``,
    so index ``[..., i, k, ...]`` is the i-th image of episode class k."""
    shape = list(x.shape)
    d = dim % x.dim()
    return x.reshape(shape[:d] + [shape[d] // way, way] + shape[d + 1:])


@dataclass(frozen=True)
class Task:
    """One N-way K-shot task (episode) in the layout above.

    Attributes:
        support: int64 (way*shot,) image indices; labels :attr:`y_support`.
        query: int64 (way*query,) image indices; labels :attr:`y_query`.
        way, shot: the task's shape (query per class = ``len(query) // way``).
    """

    support: np.ndarray
    query: np.ndarray
    way: int
    shot: int

    @classmethod
    def from_episode(cls, episode: np.ndarray, way: int, shot: int) -> "Task":
        ep = np.asarray(episode, dtype=np.int64)
        if ep.ndim != 1 or len(ep) < way * shot or len(ep) % way:
            raise ValueError(f"an episode of {way}-way {shot}-shot needs a multiple of way = {way} indices, at least "
                             f"way * shot; got shape {ep.shape}")
        return cls(ep[: way * shot], ep[way * shot:], way, shot)

    @property
    def episode(self) -> np.ndarray:
        """int64 (way*(shot+query),): the task as one index array, support first."""
        return np.concatenate([self.support, self.query])

    @property
    def n_query(self) -> int:
        """Query images per class."""
        return len(self.query) // self.way

    @property
    def y_support(self) -> torch.Tensor:
        return episode_labels(self.way, self.shot)

    @property
    def y_query(self) -> torch.Tensor:
        return episode_labels(self.way, self.n_query)

    def classes(self, labels: np.ndarray) -> np.ndarray:
        """int64 (way,): the dataset class id of each episode label 0..way-1."""
        return episode_classes(self.episode, labels, self.way)


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

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield the remaining episodes of the current pass: int64 (way*(shot+query),) each."""
        if self._pos >= self.n_batch:
            self._pos = 0
        while self._pos < self.n_batch:
            episode = self.sample()
            self._pos += 1
            yield episode
        self._pos = 0

    def sample(self) -> np.ndarray:
        """One episode, int64 (way*(shot+query),): ``way`` random distinct classes (their order = the episode
        labels), per class ``shot + query`` distinct random images, laid out by :func:`layout`."""
        rng = self._rng
        picked = self.classes[rng.choice(len(self.classes), size=self.way, replace=False)]
        block = np.empty((self.way, self.n_per_class), dtype=np.int64)
        for k, c in enumerate(picked.tolist()):
            idx = self._class_idx[int(c)]
            block[k] = idx[rng.choice(len(idx), size=self.n_per_class, replace=False)]
        return layout(block, self.shot)

    def state_dict(self) -> dict:
        """JSON-serialisable state: the generator state (ints as str), the position in the pass and the settings."""
        return {
            "bit_generator": generator_state(self._rng),
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
        saved = state["bit_generator"]
        if "bit_generator" in saved:  # the layout of resume files written before generator_state existed
            if saved["bit_generator"] != "PCG64":
                raise ValueError(f"sampler state holds a {saved['bit_generator']} generator, expected PCG64")
            saved = {**saved["state"], "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"]}
        set_generator_state(self._rng, saved)
        pos = int(state.get("position", 0))
        if not 0 <= pos <= self.n_batch:
            raise ValueError(f"sampler position {pos} outside 0..{self.n_batch}")
        self._pos = pos


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
