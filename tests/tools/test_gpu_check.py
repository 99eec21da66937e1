"""tools/gpu_check.py (issue #14) at toy sizes on the CPU: the same steps as on a GPU, one JSON of every figure."""
import json
import os

from tools import gpu_check


def test_gpu_check_tiny_pipeline_writes_checks_and_projection(tmp_path):
    res = gpu_check.main(["--tiny", "--out", str(tmp_path), "--steps", "pipeline,official", "--configs", "fp32,amp"])
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["device"] == res["device"] and on_disk["tiny"] is True
    assert set(on_disk["checks"]) == {"fp32_ok", "amp_ok", "official_ok", "amp_eval_within_tol",
                                      "amp_test_within_5_points_of_fp32"}
    assert on_disk["all_ok"] is True, on_disk["checks"]
    fp32 = on_disk["pipeline"]["fp32"]
    assert fp32["pre_s_per_iter"] > 0 and fp32["meta_s_per_iter"] > 0 and 0 <= fp32["test_mean"] <= 100
    assert len(fp32["train_losses"]) == 2  # one pre-train and one meta-train epoch
    amp = on_disk["amp_eval_of_fp32_checkpoint"]
    assert amp["episodes"] == gpu_check.TINY["test_episodes"]
    proj = on_disk["projection"]
    assert proj["paper"]["pre_20k_h"] == fp32["pre_s_per_iter"] * 20000 / 3600
    assert proj["official_pytorch"]["meta_100x100_h"] > 0
    assert os.path.getsize(tmp_path / "mini_synthetic.npz") > 0
