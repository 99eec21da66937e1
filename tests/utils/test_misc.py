import math
import random

import numpy as np
import pytest
import torch

from utils.misc import get_rng_state, mean_ci, resolve_seed, set_rng_state, write_json_atomic


def test_mean_ci_is_official_formula():
    acc = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    mean, ci = mean_ci(acc)
    assert mean == pytest.approx(0.6)
    # population std (np.std, ddof=0): sqrt(0.08) ; 1.96 * std / sqrt(5)
    assert ci == pytest.approx(1.96 * math.sqrt(0.08) / math.sqrt(5))


def test_mean_ci_of_constant_is_zero_and_empty_raises():
    assert mean_ci([0.5] * 600) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_rng_state_roundtrip_restores_every_generator():
    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_rng_state_survives_weights_only_load(tmp_path):
    state = get_rng_state()
    torch.save(state, tmp_path / "s.pth")
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)
    x = (np.random.rand(), torch.rand(1).item())
    set_rng_state(loaded)
    assert (np.random.rand(), torch.rand(1).item()) == x


def test_resolve_seed_keeps_nonzero_and_draws_for_zero():
    assert resolve_seed(7) == 7
    s = resolve_seed(0)
    assert isinstance(s, int) and s > 0


def test_write_json_atomic(tmp_path):
    p = tmp_path / "sub" / "x.json"
    write_json_atomic(str(p), {"a": 1})
    assert p.read_text().strip().startswith("{")
    assert not [f for f in p.parent.iterdir() if f.name.startswith(".tmp_")]
