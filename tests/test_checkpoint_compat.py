"""Checkpoints written before the architecture change (issue #10) still load and evaluate to the same accuracies.

``tests/data/checkpoints_v1/`` holds a conv4 pre-train and a meta checkpoint written by commit bf1d96f (the code
before the change) with ``make_fixture.py`` beside them, and the per-episode accuracies that code gave on 100 fixed
episodes of the embedded glyph pack's test split (``expected.json``). Today's code must give the same accuracy on
every episode none of whose queries is within float32 rounding of a tie (float64 margins, the bound of
``tests/trainer/test_evaluate.py``): on the machine that wrote the file that is every one of them; another CPU may
round the last bits differently, and only a near-tie could then flip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from data_generator.meta_data_generator import fixed_episodes
from tests.trainer.test_evaluate import _tie_free
from trainer.base import DataBundle
from trainer.evaluate import encode_split, evaluate_bank
from trainer.meta import load_for_eval
from utils.options import parse_args
from utils.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "checkpoints_v1"
FLAGS = ["--dataset", "glyphs", "--dataset_dir", str(ROOT / "data" / "glyphs100.npz"), "--backbone", "conv4",
         "--image_size", "16", "--preprocess", "paper", "--quiet", "--device", "cpu", "--cache_dir", "none",
         "--num_test_episodes", "100", "--val_query", "5", "--test_update_step", "10", "--base_lr", "0.1"]


@pytest.mark.parametrize("name", ["pre_conv4.pth", "meta_conv4_5way1shot.pth"])
def test_checkpoint_of_the_earlier_code_evaluates_the_same(name, tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())[name]
    settings = Settings.from_args(parse_args(FLAGS + ["--log_root", str(tmp_path)]))
    data = DataBundle(settings.data)
    test = data.load("test")
    enc, w, b, kind = load_for_eval(str(FIXTURE / name), "conv4", 5, 1, torch.device("cpu"))
    assert kind == expected["kind"]
    eps = fixed_episodes(test.labels, 100, 5, 1, 5, 1)
    feats = encode_split(enc, test, data.eval_transform, torch.device("cpu"))
    accs = evaluate_bank(feats, eps, 5, 1, w, b, 10, 0.1)
    want = np.asarray(expected["accuracies"], dtype=np.float32)
    clear = _tie_free(feats, eps, 5, 1, w, b, 10, 0.1, "finetune")
    assert clear.sum() >= 80, clear.sum()
    np.testing.assert_array_equal(accs[clear], want[clear])
    # and through main.py, as a user runs it: the same mean, up to the episodes that may flip
    out = tmp_path / name
    out.write_bytes((FIXTURE / name).read_bytes())
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(out), "--log_root", str(tmp_path)] + FLAGS) == 0
    res = json.loads(next(tmp_path.glob("results*.json")).read_text())
    assert res["episodes"] == 100
    assert abs(res["mean"] - 100 * expected["mean"]) <= 100 * (~clear).sum() / 100 + 1e-3
