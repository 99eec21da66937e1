"""Tests for data_generator.meta_data_generator: episode layout, determinism, resume, fixed episodes, errors."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from data_generator.meta_data_generator import (
    CategoriesSampler,
    Task,
    by_class,
    episode_classes,
    episode_labels,
    fixed_episodes,
    layout,
)
from utils.errors import UserError

WAY, SHOT, QUERY = 5, 2, 3


def _labels(n_classes=8, per_class=12, shuffle=True):
    labels = np.repeat(np.arange(n_classes), per_class)
    if shuffle:  # classes interleaved in the dataset, as after loading several splits
        labels = np.random.default_rng(123).permutation(labels)
    return labels


def test_episode_layout_and_distinct_images():
    labels = _labels()
    s = CategoriesSampler(labels, 20, WAY, SHOT, QUERY, seed=0)
    assert len(s) == 20
    episodes = list(s)
    assert len(episodes) == 20
    n = SHOT + QUERY
    for ep in episodes:
        assert ep.dtype == np.int64 and ep.shape == (WAY * n,)
        assert len(set(ep.tolist())) == ep.size  # distinct images
        grid = labels[ep].reshape(n, WAY)  # row i = i-th image of each episode class
        assert (grid == grid[0]).all()  # position k always holds class classes[k]
        assert len(set(grid[0].tolist())) == WAY  # distinct classes
        classes = episode_classes(ep, labels, WAY)
        assert classes.tolist() == grid[0].tolist()
        # support / query labels as documented
        y_s, y_q = episode_labels(WAY, SHOT), episode_labels(WAY, QUERY)
        assert (classes[y_s.numpy()] == labels[ep[: WAY * SHOT]]).all()
        assert (classes[y_q.numpy()] == labels[ep[WAY * SHOT:]]).all()


def test_episode_labels():
    y = episode_labels(3, 2)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(y, torch.arange(3).repeat(2))


def test_all_classes_and_images_get_used():
    labels = _labels(6, 5, shuffle=False)
    eps = np.stack(list(CategoriesSampler(labels, 300, 3, 1, 1, seed=1)))
    assert set(eps.ravel().tolist()) == set(range(30))
    first = labels[eps[:, 0]]
    assert set(first.tolist()) == set(range(6))  # label position 0 takes every class


def test_determinism_and_seed_sensitivity():
    labels = _labels()
    a = np.stack(list(CategoriesSampler(labels, 10, WAY, SHOT, QUERY, seed=5)))
    b = np.stack(list(CategoriesSampler(labels, 10, WAY, SHOT, QUERY, seed=5)))
    c = np.stack(list(CategoriesSampler(labels, 10, WAY, SHOT, QUERY, seed=6)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_passes_continue_the_stream():
    labels = _labels()
    s = CategoriesSampler(labels, 4, WAY, SHOT, QUERY, seed=2)
    first, second = list(s), list(s)
    assert len(second) == 4
    assert not np.array_equal(np.stack(first), np.stack(second))
    ref = list(CategoriesSampler(labels, 8, WAY, SHOT, QUERY, seed=2))
    np.testing.assert_array_equal(np.stack(first + second), np.stack(ref))


def test_resume_mid_pass_gives_identical_remaining_episodes():
    labels = _labels()
    ref_sampler = CategoriesSampler(labels, 10, WAY, SHOT, QUERY, seed=3)
    ref = list(ref_sampler) + list(ref_sampler)

    s = CategoriesSampler(labels, 10, WAY, SHOT, QUERY, seed=3)
    it = iter(s)
    got = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state["position"] == 4
    # survives json and torch.save / torch.load(weights_only=True)
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save({"sampler": state}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["sampler"]

    resumed = CategoriesSampler(labels, 10, WAY, SHOT, QUERY, seed=999)  # the seed is overwritten by the state
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 6
    nxt = list(resumed)  # the next pass continues as well
    np.testing.assert_array_equal(np.stack(got + rest + nxt), np.stack(ref))


def test_resume_after_complete_pass_starts_new_pass():
    labels = _labels()
    s = CategoriesSampler(labels, 3, WAY, SHOT, QUERY, seed=4)
    it = iter(s)
    first = [next(it) for _ in range(3)]  # the generator is not exhausted yet
    state = s.state_dict()
    assert state["position"] == 3
    r = CategoriesSampler(labels, 3, WAY, SHOT, QUERY, seed=4)
    r.load_state_dict(state)
    assert len(list(r)) == 3
    ref = list(CategoriesSampler(labels, 6, WAY, SHOT, QUERY, seed=4))
    np.testing.assert_array_equal(np.stack(first), np.stack(ref[:3]))


def test_load_state_dict_rejects_other_settings():
    labels = _labels()
    state = CategoriesSampler(labels, 3, WAY, SHOT, QUERY, seed=4).state_dict()
    with pytest.raises(ValueError, match="way"):
        CategoriesSampler(labels, 3, 4, SHOT, QUERY, seed=4).load_state_dict(state)


def test_layout_task_and_by_class_agree_with_the_sampler():
    """The one layout: layout() of per-class draws, Task's split and labels, and by_class() grouping."""
    block = np.arange(3 * 4).reshape(3, 4) + 100        # 3 classes x (shot 1 + query 3), row k = class k's draws
    ep = layout(block, shot=1)
    assert ep.tolist() == [100, 104, 108, 101, 105, 109, 102, 106, 110, 103, 107, 111]
    task = Task.from_episode(ep, way=3, shot=1)
    assert task.support.tolist() == [100, 104, 108] and task.n_query == 3
    assert task.y_support.tolist() == [0, 1, 2] and task.y_query.tolist() == [0, 1, 2] * 3
    np.testing.assert_array_equal(task.episode, ep)
    grouped = by_class(torch.from_numpy(task.query), 3)          # (query, way)
    assert (grouped.numpy() == block[:, 1:].T).all()
    labels = _labels()
    s = CategoriesSampler(labels, 1, WAY, SHOT, QUERY, seed=0)
    ep = s.sample()
    t = Task.from_episode(ep, WAY, SHOT)
    np.testing.assert_array_equal(labels[t.support[:WAY]], labels[t.query[:WAY]])  # one class order in both halves
    np.testing.assert_array_equal(t.classes(labels), episode_classes(ep, labels, WAY))
    with pytest.raises(ValueError):
        Task.from_episode(ep[:-1], WAY, SHOT)


def test_resume_state_of_the_earlier_format_loads():
    """resume.pth files written before the shared generator_state helper keep loading."""
    labels = _labels()
    a = CategoriesSampler(labels, 5, WAY, SHOT, QUERY, seed=3)
    a.sample()
    st = a._rng.bit_generator.state
    old = {"bit_generator": {"bit_generator": "PCG64", "state": {"state": str(st["state"]["state"]),
                                                                 "inc": str(st["state"]["inc"])},
                             "has_uint32": str(st["has_uint32"]), "uinteger": str(st["uinteger"])},
           "position": 1, "n_batch": 5, "way": WAY, "shot": SHOT, "query": QUERY, "seed": 3}
    b = CategoriesSampler(labels, 5, WAY, SHOT, QUERY, seed=99)
    b.load_state_dict(old)
    np.testing.assert_array_equal(a.sample(), b.sample())


def test_fixed_episodes_independent_of_global_rngs():
    labels = _labels()
    np.random.seed(0)
    torch.manual_seed(0)
    random.seed(0)
    a = fixed_episodes(labels, 7, WAY, SHOT, QUERY, seed=11)
    np.random.seed(1)
    torch.manual_seed(1)
    random.seed(1)
    np.random.rand(10)
    torch.rand(10)
    b = fixed_episodes(labels, 7, WAY, SHOT, QUERY, seed=11)
    assert a.dtype == np.int64 and a.shape == (7, WAY * (SHOT + QUERY))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fixed_episodes(labels, 7, WAY, SHOT, QUERY, seed=12))
    assert fixed_episodes(labels, 0, WAY, SHOT, QUERY, seed=11).shape == (0, WAY * (SHOT + QUERY))


def test_errors():
    labels = _labels(4, 6)
    with pytest.raises(UserError, match=r"way = 5 is larger than the 4 classes"):
        CategoriesSampler(labels, 1, 5, 1, 1, seed=0)
    few = np.concatenate([labels, [9, 9]])  # class 9 has 2 images
    with pytest.raises(UserError, match=r"class '9' has 2 images, but shot \+ query = 3 are needed"):
        CategoriesSampler(few, 1, 3, 1, 2, seed=0)
    with pytest.raises(UserError):
        fixed_episodes(labels, 2, 2, 5, 5, seed=0)
