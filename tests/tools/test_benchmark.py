"""The benchmark runs end to end in its tiny configuration and writes every key the issue asks for."""
import json
import os

from tests.helpers import make_npz
from tools.benchmark import RESULT_KEYS, main


def test_benchmark_tiny_writes_all_keys(tmp_path):
    pack = make_npz(str(tmp_path / "glyphs.npz"), size=32, per_class=16, classes=(6, 6, 6))
    out = tmp_path / "bench"
    res = main(["--out", str(out), "--tiny", "--glyph_pack", pack, "--threads", "1"])
    with open(out / "benchmark.json") as f:
        saved = json.load(f)
    for k in RESULT_KEYS + ("loader_to_pretrain_ratio", "bank_equals_episodic", "glyph_bank_speedup", "settings",
                            "machine", "loadavg_start", "loadavg_end"):
        assert k in saved, k
    for k in RESULT_KEYS:
        assert isinstance(saved[k], float) and saved[k] > 0, k
    assert saved["bank_equals_episodic"] is True and saved["glyphs"]["episodes_equal"] == 2
    assert saved["precisions"]["fp32"]["meta_test"]["bank_equals_episodic"] is True
    assert saved["settings"]["backbone"] == "resnet12_slim" and len(saved["loadavg_start"]) == 3
    assert res["config"] == "cpu-default-tiny"
    table = (out / "benchmark.md").read_text()
    assert "backbone fraction of matmul peak" in table and "glyphs: bank speedup" in table
    assert not os.path.exists(out / "work")  # the generated data is removed


def test_benchmark_full_config_dry_run_on_cpu(tmp_path):
    """--full (the GPU configuration) with tiny sizes: every row (bf16, channels_last, compile) runs through its
    code on the CPU, where autocast / channels_last / compile are no-ops."""
    out = tmp_path / "bench"
    res = main(["--out", str(out), "--full", "--tiny", "--skip_glyphs", "--threads", "1", "--device", "cpu"])
    assert res["config"] == "gpu-full-tiny"
    assert set(res["precisions"]) == {"fp32", "bf16"}
    assert "pretrain_channels_last" in res["precisions"]["bf16"] and "pretrain_compiled" in res["precisions"]["bf16"]
    assert "glyphs" not in res and res["parts"] == ["main"]
    assert "| bf16 + compile |" in (out / "benchmark.md").read_text()


def test_full_without_gpu_is_refused(tmp_path):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no GPU is available"):
        main(["--out", str(tmp_path / "b"), "--full"])
    assert not (tmp_path / "b").exists()


def test_benchmark_parts(tmp_path):
    pack = make_npz(str(tmp_path / "glyphs.npz"), size=32, per_class=16, classes=(6, 6, 6))
    res = main(["--out", str(tmp_path / "b"), "--tiny", "--parts", "glyphs,official", "--glyph_pack", pack,
                "--threads", "1"])
    assert "precisions" not in res and res["glyphs"]["episodes_equal"] == 2
    assert res["official_resnet25"]["val_episode_s_episodic"] > 0


def test_benchmark_backbones_part(tmp_path):
    """--parts backbones: every chosen backbone gets its parameter counts, GFLOP and two throughputs per size."""
    import pytest
    from models.resnet_mtl import build_backbone
    from tools.benchmark import backbone_flops
    res = main(["--out", str(tmp_path / "b"), "--tiny", "--parts", "backbones", "--backbones", "conv4,resnet18",
                "--threads", "1"])
    assert res["parts"] == ["backbones"] and list(res["backbones"]) == ["conv4", "resnet18"]
    r18 = res["backbones"]["resnet18"]
    assert r18["params"] == 11_176_512 and r18["out_dim"] == 512  # torchvision's resnet18 minus fc
    assert list(r18["sizes"]) == ["16"]
    v = r18["sizes"]["16"]
    assert v["gflop_per_image"] == backbone_flops(build_backbone("resnet18", True), 16) / 1e9
    assert v["forward_images_per_s"] > 0 and v["train_step_images_per_s"] > 0
    table = (tmp_path / "b" / "benchmark.md").read_text()
    assert "| resnet18 | 11.18 | 1.39 | 16 |" in table and "| conv4 |" in table
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "c"), "--parts", "backbones", "--backbones", "resnet50"])
    assert e.value.code == 2 and not (tmp_path / "c").exists()


def test_backbone_table():
    res = main(["--backbone_table", "--backbones", "resnet18,wrn28_10"])
    rows = res["backbone_table"].splitlines()
    assert len(rows) == 4
    assert rows[2].startswith("| `resnet18` | 11,176,512 | 1,392,832 | 11x11 / 4x4 |")
    assert rows[3].startswith("| `wrn28_10` | 36,472,784 | 4,280,368 | 21x21 / 8x8 |")
