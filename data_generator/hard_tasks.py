"""The hard-task (HT) meta-batch, paper Alg. 1 lines 8-20 (and Alg. 2 lines 7-10).

After each normal task of a meta-batch has run (inner loop, outer update), its per-class query accuracy is
computed and the task's **failure class** (the class with the lowest accuracy, ties broken at random with a
seeded generator) is recorded. Then ``--ht_hard_tasks`` hard tasks are built from the recorded failure classes:
``way`` classes drawn from them, with **freshly sampled** support and query images (paper Sec. 4.3: re-sampling
images of the failure classes "works better in general" than reusing the failed ones), excluding every image
the meta-batch used. The record is emptied after each meta-batch.

The two halves of Alg. 1 have one home each: :class:`HardTaskPlanner` (this module: episode sampling, so it is
library code) records the failure classes and returns the hard tasks; the trainer (``trainer/meta.py``
``MetaTrainer.train_epoch``) runs them with the same inner loop, and owns their weights and the outer updates.

Choices the CVPR paper leaves open (reference section 10), as flags:

* ``--ht_normal_tasks`` (default ``--meta_batch_size``): normal tasks per meta-batch that feed the record;
* ``--ht_hard_tasks`` (default 1): hard tasks per meta-batch;
* ``--ht_update separate|shared`` (default separate): one outer update per hard task, or hard tasks join the
  meta-batch's single update (the mean over normal and hard tasks);
* ``--ht_start_epoch`` (default 1): first epoch with hard tasks.

When fewer than ``way`` distinct failure classes were recorded, the hard task is topped up with the meta-batch's
other classes ranked by their accuracy (lowest first); the log says which (``topped_up``).
Every meta-batch writes one JSON line to ``hard_tasks.jsonl`` in the run's log folder: the failure classes and their
query accuracies, the query accuracy of each normal task and of each hard task (how hard the hard tasks were: the run
report, ``trainer/run_report.py``, compares the two), the classes added by the top-up and the hard tasks' classes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from data_generator.image_cache import ImageSet
from data_generator.meta_data_generator import layout
from utils.misc import atomic_write, generator_state, set_generator_state, write_error

__all__ = ["HardTaskSettings", "HardTask", "HardTaskPlanner"]


@dataclass(frozen=True)
class HardTaskSettings:
    """The hard-task meta-batch, paper Alg. 1 (``config/settings.py`` builds it from the ``--ht_*`` flags): tasks of
    ``way`` x (``shot`` + ``query``); ``normal_tasks`` per meta-batch feed the failure-class record (the trainer
    runs them), then ``hard_tasks`` hard tasks follow, with one outer update each (``update`` ``separate``) or in the
    meta-batch's update (``shared``), from epoch ``start_epoch``; ``seed`` seeds the planner's generator."""

    way: int
    shot: int
    query: int
    normal_tasks: int
    hard_tasks: int
    update: str
    start_epoch: int
    seed: int


@dataclass(frozen=True)
class HardTask:
    """One hard task: ``classes`` (way,) dataset class ids in episode label order, ``topped_up`` those of them that
    are not failure classes (the top-up), and its ``episode`` (the sampler's layout, fresh images)."""

    classes: list[int]
    topped_up: list[int]
    episode: np.ndarray


class HardTaskPlanner:
    """Records the failure classes of a meta-batch and plans the hard tasks built from them (Alg. 1 lines 8-15)."""

    def __init__(self, hs: HardTaskSettings, train_set: ImageSet, log_dir: str):
        self.settings = hs
        self.way, self.shot, self.query = hs.way, hs.shot, hs.query
        self.train_set = train_set
        self.class_indices = train_set.class_indices()
        self.rng = np.random.Generator(np.random.PCG64(hs.seed + 7919))
        self.log_path = os.path.join(log_dir, "hard_tasks.jsonl")
        self.reset()

    def reset(self) -> None:
        self.failures: list[int] = []          # failure class of each normal task (dataset class ids)
        self.failure_acc: list[float] = []
        self.task_acc: list[float] = []        # query accuracy of each normal task
        self.hard_acc: list[float] = []        # query accuracy of each hard task (record_hard)
        self.class_acc: dict[int, list[float]] = {}   # every class seen in the meta-batch -> accuracies
        self.used: set[int] = set()            # image indices used by the meta-batch

    def record(self, classes: np.ndarray, per_class_acc: np.ndarray, episode: np.ndarray | None = None) -> int:
        """Alg. 2 lines 7-10: the failure class of one task.

        Args:
            classes: ``(way,)`` dataset class ids in episode label order.
            per_class_acc: ``(way,)`` query accuracy of each class.
            episode: the task's image indices (excluded from the hard tasks' images).
        Returns:
            the failure class (dataset id).
        """
        acc = np.asarray(per_class_acc, dtype=np.float64)
        lowest = np.flatnonzero(acc == acc.min())
        pick = int(lowest[self.rng.integers(len(lowest))])
        m = int(classes[pick])
        self.failures.append(m)
        self.failure_acc.append(float(acc[pick]))
        self.task_acc.append(float(acc.mean()))
        for c, v in zip(classes, acc):
            self.class_acc.setdefault(int(c), []).append(float(v))
        if episode is not None:
            self.used.update(int(i) for i in episode)
        return m

    def record_hard(self, per_class_acc: np.ndarray) -> None:
        """The query accuracy of a hard task that ran (``(way,)`` per class), for the log: how hard it was."""
        self.hard_acc.append(float(np.asarray(per_class_acc, dtype=np.float64).mean()))

    def hard_classes(self) -> tuple[list[int], list[int]]:
        """``way`` classes for one hard task (Alg. 1 line 15), and those added by the top-up."""
        distinct = list(dict.fromkeys(self.failures))
        if len(distinct) >= self.way:
            chosen = [distinct[i] for i in sorted(self.rng.choice(len(distinct), self.way, replace=False))]
            return chosen, []
        ranked = sorted((c for c in self.class_acc if c not in distinct),
                        key=lambda c: (float(np.mean(self.class_acc[c])), c))
        if len(distinct) + len(ranked) < self.way:  # a very small meta-batch: any other training class
            others = [c for c in self.rng.permutation(len(self.class_indices)).tolist()
                      if c not in distinct and c not in ranked]
            ranked += others
        topped = ranked[: self.way - len(distinct)]
        return distinct + topped, topped

    def sample_episode(self, classes: list[int]) -> np.ndarray:
        """A task on ``classes`` with fresh images: none of them was used by the meta-batch (when a class has
        too few unused images, the used ones are allowed again, never duplicates within the task)."""
        n = self.shot + self.query
        per_class = []
        for c in classes:
            idx = self.class_indices[c]
            fresh = np.array([i for i in idx if int(i) not in self.used], dtype=np.int64)
            pool = fresh if len(fresh) >= n else idx
            per_class.append(self.rng.choice(pool, n, replace=False))
        return layout(np.stack(per_class), self.shot)

    def plan(self) -> list[HardTask]:
        """Alg. 1 line 15: the ``--ht_hard_tasks`` hard tasks of this meta-batch, from the record."""
        tasks = []
        for _ in range(self.settings.hard_tasks):
            classes, topped = self.hard_classes()
            tasks.append(HardTask(classes, topped, self.sample_episode(classes)))
        return tasks

    def log(self, iteration: int, tasks: list[HardTask], write: bool = True) -> None:
        """One JSON line for the meta-batch in ``hard_tasks.jsonl`` (``write``: under torchrun rank 0 only, every
        rank holds the same record); then the record is emptied."""
        names = self.train_set.class_names
        topped_all: list[int] = []
        for t in tasks:
            topped_all.extend(c for c in t.topped_up if c not in topped_all)
        entry = {"iteration": iteration,
                 "failure_classes": [names[c] for c in self.failures],
                 "failure_accuracies": [round(a, 4) for a in self.failure_acc],
                 "task_accuracies": [round(a, 4) for a in self.task_acc],
                 "hard_task_accuracies": [round(a, 4) for a in self.hard_acc],
                 "topped_up": [names[c] for c in topped_all],
                 "hard_tasks": [[names[c] for c in t.classes] for t in tasks]}
        if write:
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError as e:  # a full disk, a read-only folder: one line (the trainer says what was kept)
                raise write_error(self.log_path, e) from e
        self.reset()

    def state_dict(self) -> dict:
        return generator_state(self.rng)

    def load_state_dict(self, s: dict) -> None:
        set_generator_state(self.rng, s)

    def truncate_log(self, last_iteration: int) -> None:
        """After a resume: drop log lines a killed run wrote past its last checkpoint."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["iteration"] <= last_iteration]
        atomic_write(self.log_path, lambda f: f.writelines(keep))  # a kill or a full disk leaves the old log
