"""``python -m tools.amp_accuracy``: one checkpoint meta-tested in fp32 and in forced bf16 on the same episodes,
paired. On the v1 fixture checkpoint (``tests/data/checkpoints_v1``, conv4 at 16 px on the embedded glyph pack's test
split, 100 fixed episodes) its fp32 pass must reproduce the fixture's recorded accuracy, and the paired statistics
must be those of the two passes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools.amp_accuracy import main, paired
from utils import gpu_tools

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "checkpoints_v1"
FLAGS = ["--dataset", "glyphs", "--dataset_dir", str(ROOT / "data" / "glyphs100.npz"), "--backbone", "conv4",
         "--image_size", "16", "--preprocess", "paper", "--quiet", "--cache_dir", "none",
         "--num_test_episodes", "100", "--val_query", "5", "--test_update_step", "10", "--base_lr", "0.1"]
U_BF16 = 2.0 ** -8


def test_paired_statistics():
    a = np.array([0.2, 0.4, 0.6, 0.8])
    b = np.array([0.2, 0.44, 0.6, 0.76])
    p = paired(a, b)
    d = 100 * (b - a)                                  # [0, 4, 0, -4] points
    assert p["episodes"] == 4 and p["episodes_equal"] == 2
    assert p["diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert p["diff_ci95"] == pytest.approx(1.96 * d.std() / 2.0, rel=1e-12)
    with pytest.raises(ValueError):
        paired(a, b[:3])


def test_the_fixture_checkpoint_in_fp32_and_bf16(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_tools, "_noted", set())
    out = tmp_path / "amp.json"
    r = main(["--out", str(out), "--", *FLAGS, "--log_root", str(tmp_path),
              "--eval_weights", str(FIXTURE / "meta_conv4_5way1shot.pth")])
    saved = json.loads(out.read_text())
    assert saved["paired"] == r["paired"] and saved["kind"] == "meta" and saved["test_images"] == 1200
    expected = json.loads((FIXTURE / "expected.json").read_text())["meta_conv4_5way1shot.pth"]
    # fp32 is today's meta_eval: the fixture's mean (a point = 25 of the 2,500 queries, room for near-ties elsewhere)
    assert abs(r["fp32"]["mean"] - 100 * expected["mean"]) <= 1.0, (r["fp32"]["mean"], expected["mean"])
    p = r["paired"]
    assert p["episodes"] == 100 and 0 <= p["episodes_equal"] <= 100
    assert p["diff_mean"] == pytest.approx(r["bf16"]["mean"] - r["fp32"]["mean"], abs=1e-9)
    assert abs(p["diff_mean"]) <= 2.0 and p["diff_ci95"] >= 0
    # bf16 really ran, and stayed within the bf16 bound of tests/test_amp_cpu.py (3 u per conv layer, 4 layers)
    assert U_BF16 / 8 <= r["feature_max_rel_diff"] <= 3 * 4 * U_BF16, r["feature_max_rel_diff"]
    text = capsys.readouterr().out
    assert "paired bf16 - fp32:" in text and f"{p['episodes_equal']}/100 episodes equal" in text
