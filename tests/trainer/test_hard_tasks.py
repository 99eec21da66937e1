"""Hard-task meta-batch (paper Alg. 1 lines 8-20)."""
import json
import os

import numpy as np
import pytest

import main
from data_generator.dataset_loader import ImageSet
from data_generator.hard_tasks import HardTaskPlanner, HardTaskSettings
from tests.helpers import make_npz


def _set(n_classes=10, per_class=12):
    labels = np.repeat(np.arange(n_classes), per_class)
    return ImageSet(images=np.zeros((len(labels), 4, 4, 3), np.uint8), labels=labels,
                    class_names=[f"cls{i}" for i in range(n_classes)], source="t")


def _sched(tmp_path, seed=0, way=3, shot=1, query=2, meta_batch=3):
    hs = HardTaskSettings(way=way, shot=shot, query=query, normal_tasks=meta_batch, hard_tasks=1, update="separate",
                          start_epoch=1, seed=seed)
    return HardTaskPlanner(hs, _set(), str(tmp_path))


def test_failure_class_is_the_lowest_accuracy(tmp_path):
    h = _sched(tmp_path)
    assert h.record(np.array([4, 7, 1]), np.array([0.9, 0.2, 0.5])) == 7
    assert h.failures == [7] and h.failure_acc == [0.2]


def test_ties_are_broken_at_random_but_seeded(tmp_path):
    picks = []
    for seed in (0, 0, 1, 2, 3, 4, 5):
        h = _sched(tmp_path, seed=seed)
        picks.append(tuple(h.record(np.array([0, 1, 2]), np.array([0.1, 0.1, 0.1])) for _ in range(5)))
    assert picks[0] == picks[1]                  # same seed, same choices
    assert len(set(picks[1:])) > 1               # the tie is not always resolved the same way


def test_hard_task_uses_only_failure_classes_when_enough(tmp_path):
    h = _sched(tmp_path)
    for classes, acc in (([0, 1, 2], [0.1, 0.5, 0.9]), ([3, 4, 5], [0.9, 0.0, 0.9]), ([6, 7, 8], [1, 1, 0.3]),
                         ([9, 0, 1], [0.2, 0.9, 0.9])):
        h.record(np.array(classes), np.array(acc))
    chosen, topped = h.hard_classes()
    assert topped == [] and len(chosen) == 3 and set(chosen) <= {0, 4, 8, 9}


def test_top_up_ranks_the_meta_batch_classes_by_accuracy(tmp_path):
    h = _sched(tmp_path)
    h.record(np.array([0, 1, 2]), np.array([0.1, 0.5, 0.9]))
    h.record(np.array([0, 3, 4]), np.array([0.0, 0.4, 1.0]))   # failure 0 again: only one distinct class
    chosen, topped = h.hard_classes()
    assert chosen[0] == 0 and topped == [3, 1]                   # 3 (0.4) before 1 (0.5); never 2 or 4


def test_hard_episode_has_fresh_images_and_sampler_layout(tmp_path):
    h = _sched(tmp_path, shot=2, query=3)
    ds = h.train_set
    used = np.concatenate([np.flatnonzero(ds.labels == c)[:6] for c in (2, 5, 7)])
    h.record(np.array([2, 5, 7]), np.array([0.3, 0.2, 0.1]), episode=used)
    ep = h.sample_episode([2, 5, 7])
    assert len(ep) == 3 * 5 and len(set(ep.tolist())) == 15
    assert not set(ep.tolist()) & set(used.tolist())
    labels = ds.labels[ep]
    assert list(labels[:6]) == [2, 5, 7, 2, 5, 7]                # support, interleaved by class
    assert list(labels[6:]) == [2, 5, 7] * 3                     # query


COMMON = ["--dataset", "custom", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper",
          "--quiet", "--num_val_episodes", "10", "--way", "3", "--shot", "1", "--train_query", "2",
          "--seed", "5", "--val_query", "3"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ht")
    data = make_npz(str(root / "d.npz"), size=16, per_class=12, classes=(8, 4, 4))
    logs = str(root / "logs")
    assert main.cli(["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_batch_size", "32",
                     "--pre_optimizer", "adam", "--pre_lr", "0.001", "--dataset_dir", data,
                     "--log_root", logs] + COMMON) == 0
    return data, logs


def _ht_run(data, logs, label, extra=()):
    argv = ["--phase", "meta_train", "--max_epoch", "2", "--num_batch", "3", "--update_step", "3",
            "--meta_batch_size", "2", "--hard_task", "--ht_hard_tasks", "2", "--dataset_dir", data,
            "--log_root", logs, "--meta_label", label] + COMMON + list(extra)
    assert main.cli(argv) == 0
    d = os.path.join(logs, "meta", f"custom_conv4_3way1shot_HT_{label}")
    with open(os.path.join(d, "hard_tasks.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_hard_task_log_is_complete_consistent_and_reproducible(pretrained):
    data, logs = pretrained
    a = _ht_run(data, logs, "a")
    assert [e["iteration"] for e in a] == [1, 2, 3, 4, 5, 6]      # one line per meta-batch
    for e in a:
        assert set(e) >= {"iteration", "failure_classes", "failure_accuracies", "topped_up", "hard_tasks"}
        assert len(e["failure_classes"]) == 2 == len(e["failure_accuracies"])
        assert len(e["hard_tasks"]) == 2
        for task in e["hard_tasks"]:
            assert len(task) == 3 == len(set(task))
            assert set(task) <= set(e["failure_classes"]) | set(e["topped_up"])
    b = _ht_run(data, logs, "b")
    assert a == b                                                  # reproducible from the seed


def test_shared_update_runs_too(pretrained):
    data, logs = pretrained
    log = _ht_run(data, logs, "shared", ["--ht_update", "shared", "--ht_start_epoch", "2"])
    assert [e["iteration"] for e in log] == [4, 5, 6]              # HT only from epoch 2
