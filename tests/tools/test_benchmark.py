"""The benchmark runs end to end in its tiny configuration and writes every key the issue asks for."""
import json
import os

from tests.helpers import make_npz
from tools.benchmark import RESULT_KEYS, SIDE_BY_SIDE, main
from utils.gpu_tools import cpu_bf16_feature


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
    # fp32 and bf16 side by side in the same run (issue #16): bf16 forced, native or emulated as the CPU has it
    assert set(saved["precisions"]) == {"fp32", "bf16"}
    side = saved["bf16_vs_fp32"]
    assert set(side) == {k for k, _, _ in SIDE_BY_SIDE}
    for k, _, higher in SIDE_BY_SIDE:
        v = side[k]
        assert v["fp32"] > 0 and v["bf16"] > 0, k
        assert abs(v["speedup"] - (v["bf16"] / v["fp32"] if higher else v["fp32"] / v["bf16"])) < 1e-9, k
    assert side["pretrain_images_per_s"]["bf16"] == saved["precisions"]["bf16"]["pretrain"]["pretrain_images_per_s"]
    assert side["meta_test_encode_images_per_s"]["fp32"] == \
        saved["precisions"]["fp32"]["meta_test"]["encode_images_per_s"]
    assert saved["bf16"]["emulated"] == (cpu_bf16_feature() is None)
    assert "fp32 and bf16 side by side" in table and "| meta-test encode images/s (feature bank) |" in table
    assert ("EMULATED" in table) == saved["bf16"]["emulated"]


def test_bf16_info_follows_the_cpu_detection(monkeypatch):
    import torch
    import tools.benchmark as tb
    monkeypatch.setattr(tb, "cpu_bf16_feature", lambda: None)
    assert tb.bf16_info(torch.device("cpu")) == {"native_feature": None, "emulated": True}
    monkeypatch.setattr(tb, "cpu_bf16_feature", lambda: "amx_bf16")
    assert tb.bf16_info(torch.device("cpu")) == {"native_feature": "amx_bf16", "emulated": False}


def test_benchmark_full_config_dry_run_on_cpu(tmp_path):
    """--full (the GPU configuration) with tiny sizes: every row (bf16, channels_last, compile) runs through its
    code on the CPU, where channels_last / compile are no-ops and bf16 is forced (emulated where not native)."""
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


def test_bf16_pass_is_left_out_only_where_emulated_and_not_asked_for():
    from tools.benchmark import choose_precisions
    both = ["fp32", "bf16"]
    assert choose_precisions(both, explicit=False, tiny=False, emulated=True) == ["fp32"]      # default BENCH, AVX2
    assert choose_precisions(both, explicit=False, tiny=False, emulated=False) == both         # avx512_bf16 / GPU
    assert choose_precisions(both, explicit=True, tiny=False, emulated=True) == both           # --precisions fp32,bf16
    assert choose_precisions(both, explicit=False, tiny=True, emulated=True) == both           # --tiny dry run
    assert choose_precisions(["fp32"], explicit=True, tiny=False, emulated=None) == ["fp32"]


def test_precisions_flag(tmp_path):
    import pytest
    from tools.benchmark import parse
    assert parse(["--precisions", "fp32,bf16,bf16"]).precisions == ["fp32", "bf16"]
    assert parse([]).precisions is None
    for bad in ("bf16", "fp16", "fp32,fp16"):
        with pytest.raises(SystemExit):
            parse(["--precisions", bad])


def test_fp32_only_run_has_no_bf16_rows(tmp_path):
    out = tmp_path / "bench"
    res = main(["--out", str(out), "--tiny", "--skip_glyphs", "--threads", "1", "--precisions", "fp32"])
    assert set(res["precisions"]) == {"fp32"} and "bf16_vs_fp32" not in res and "bf16" not in res
    assert "side by side" not in (out / "benchmark.md").read_text()


def test_default_run_on_an_emulating_cpu_says_bf16_was_left_out(tmp_path, monkeypatch):
    """What the default BENCH does on a CPU without native bf16 (simulated: --tiny would keep the pass)."""
    import tools.benchmark as tb
    monkeypatch.setattr(tb, "bf16_info", lambda device: {"native_feature": None, "emulated": True})
    real = tb.choose_precisions
    monkeypatch.setattr(tb, "choose_precisions",
                        lambda wanted, explicit, tiny, emulated: real(wanted, explicit, False, emulated))
    out = tmp_path / "bench"
    res = main(["--out", str(out), "--tiny", "--skip_glyphs", "--threads", "1"])
    assert set(res["precisions"]) == {"fp32"} and res["bf16"] == {"native_feature": None, "emulated": True,
                                                                  "skipped": True}
    assert "bf16: not run (this CPU has no native bfloat16" in (out / "benchmark.md").read_text()

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
