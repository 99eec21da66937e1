"""``--amp`` on the CPU end to end (issue #16), with bfloat16 forced (``--amp --amp_dtype bfloat16``): it runs on
every CPU (emulated where there is no avx512_bf16 / amx_bf16, only slower), so these tests mean the same on both
kinds.

The bfloat16 tolerance of the features. bfloat16 keeps 8 significant bits, unit roundoff ``u = 2^-8 = 3.9e-3``.
Under autocast a convolution rounds its input and its weights to bfloat16 and accumulates in float32 (oneDNN), and
its output is rounded to bfloat16 again: at most ``3u`` relative error per layer in the norm of its output
(ReLU, max-pool and eval-mode BatchNorm with unit statistics do not amplify it). Through the ``L`` conv layers of
an encoder these add to at most ``3 L u``: 0.047 for Conv-4 (L = 4). Random rounding errors add in quadrature, so
the measured error is far below that bound (~``u`` for Conv-4); a relative error of at least ``u / 8`` proves that
bfloat16 really ran (float32 gives exactly 0 on the same machine and thread count).
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

import main
from models.heads import InnerLoop
from models.mtl import MetaLearner
from tests.helpers import make_npz
from utils import gpu_tools
from utils.checkpoint import load_checkpoint

U_BF16 = 2.0 ** -8
CONV4_LAYERS = 4
FEATURE_TOL = 3 * CONV4_LAYERS * U_BF16      # 0.047: the derivation above


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(gpu_tools, "_noted", set())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("mtl", [False, True])
def test_features_under_forced_bf16_stay_within_the_bf16_tolerance(mtl):
    from data_generator.dataset_loader import ImageSet
    from models.resnet_mtl import build_backbone
    from models.evaluate import encode_split
    torch.manual_seed(0)
    enc = build_backbone("conv4", mtl=mtl)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    split = ImageSet(images, np.repeat(np.arange(4), 10), list("abcd"), "test")
    to_float = lambda x: x.permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    cpu = torch.device("cpu")
    f32 = encode_split(enc, split, to_float, cpu, batch_size=16, amp=False)
    bf = encode_split(enc, split, to_float, cpu, batch_size=16, amp="bfloat16")
    assert f32.dtype == bf.dtype == torch.float32 and f32.shape == bf.shape == (40, enc.out_dim)
    err = _rel(bf, f32)
    assert U_BF16 / 8 <= err <= FEATURE_TOL, err
    # every row, not only the whole bank
    rows = ((bf - f32).norm(dim=1) / f32.norm(dim=1)).max().item()
    assert rows <= FEATURE_TOL, rows


def test_meta_forward_runs_the_inner_loop_and_query_logits_in_float32_under_autocast(monkeypatch):
    """Only the encoder runs in bfloat16: the inner loop sees float32 features with autocast off, and the query
    logits are float32 (as on CUDA)."""
    import models.heads as heads
    seen = []
    real = heads.inner_loop

    def spy(feat_s, y_s, weight, bias, *a, **k):
        seen.append((feat_s.dtype, weight.dtype, bias.dtype, torch.is_autocast_enabled("cpu")))
        w, b = real(feat_s, y_s, weight, bias, *a, **k)
        seen.append((w.dtype, b.dtype))
        return w, b

    monkeypatch.setattr(heads, "inner_loop", spy)
    torch.manual_seed(0)
    model = MetaLearner("conv4", way=5)
    x = torch.rand(2, 10, 3, 16, 16)
    y_s = torch.arange(5).repeat(1)
    for order in (False, True):
        seen.clear()
        with gpu_tools.autocast(torch.device("cpu"), "bfloat16"):
            emb = model.encoder(x[0, :5])
            logits = model.forward_tasks(x[:, :5], y_s, x[:, 5:], InnerLoop(3, 0.1, second_order=order))
        assert emb.dtype == torch.bfloat16                        # the encoder did run in bfloat16
        assert seen[0] == (torch.float32, torch.float32, torch.float32, False), seen
        assert seen[1] == (torch.float32, torch.float32)
        assert logits.dtype == torch.float32 and logits.shape == (2, 5, 5)
        logits.float().sum().backward()                           # the backward through bf16 activations works
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------- end to end
COMMON = ["--dataset", "custom", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper",
          "--seed", "3", "--quiet", "--num_val_episodes", "20", "--way", "5", "--shot", "1", "--device", "cpu",
          "--update_step", "10", "--base_lr", "0.1"]
PRE = ["--phase", "pre_train", "--pre_max_epoch", "3", "--pre_batch_size", "32", "--pre_optimizer", "adam",
       "--pre_lr", "0.001", "--pre_head", "linear", "--pre_val_update_step", "5"]
META = ["--phase", "meta_train", "--max_epoch", "1", "--num_batch", "4", "--meta_lr1", "0.001", "--meta_lr2", "0.001"]
EVAL = ["--phase", "meta_eval", "--num_test_episodes", "50"]
FORCE = ["--amp", "--amp_dtype", "bfloat16"]


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory):
    """pre-train, meta-train and meta-test, all under forced bfloat16."""
    root = tmp_path_factory.mktemp("amp")
    data = make_npz(str(root / "tiny.npz"), size=16, per_class=20, classes=(12, 6, 6))
    logs = str(root / "logs")
    base = COMMON + ["--dataset_dir", data, "--log_root", logs]
    gpu_tools._noted.clear()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rcs = [main.cli(PRE + base + FORCE), main.cli(META + base + FORCE), main.cli(EVAL + base + FORCE)]
    return {"base": base, "logs": logs, "rcs": rcs, "out": out.getvalue()}


def test_every_phase_runs_under_forced_bf16(amp_run):
    assert amp_run["rcs"] == [0, 0, 0], amp_run["out"][-2000:]
    logs = amp_run["logs"]
    pre_log = json.load(open(os.path.join(logs, "pre", "custom_conv4", "trlog.json")))
    meta_log = json.load(open(os.path.join(logs, "meta", "custom_conv4_5way1shot_exp1", "trlog.json")))
    assert len(pre_log) == 3 and len(meta_log) == 1
    assert all(np.isfinite(r["train_loss"]) for r in pre_log + meta_log)
    res = json.load(open(os.path.join(logs, "meta", "custom_conv4_5way1shot_exp1", "results.json")))
    assert res["episodes"] == 50 and res["mean"] > 30.0, res        # 5-way chance is 20%
    assert res["settings"]["amp"] is True and res["settings"]["amp_dtype"] == "bfloat16"
    if gpu_tools.cpu_bf16_feature() is None:   # the one line, once per process (this fixture ran three phases)
        assert amp_run["out"].count("note: --amp_dtype bfloat16: this CPU has no native bfloat16") == 1
    else:
        assert amp_run["out"].count("note: --amp: bfloat16 autocast on the CPU") == 1


@pytest.mark.parametrize("which", ["pre/custom_conv4/max_acc.pth", "pre/custom_conv4/resume.pth",
                                   "meta/custom_conv4_5way1shot_exp1/max_acc.pth",
                                   "meta/custom_conv4_5way1shot_exp1/resume.pth"])
def test_checkpoints_written_under_amp_are_float32(amp_run, which):
    ck = load_checkpoint(os.path.join(amp_run["logs"], which))
    tensors = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            tensors[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", ck)
    floats = {k: t.dtype for k, t in tensors.items() if t.is_floating_point()}
    assert len(floats) > 10
    assert set(floats.values()) == {torch.float32}, {k: d for k, d in floats.items() if d != torch.float32}


def test_the_amp_checkpoint_loads_and_tests_without_amp(amp_run, capsys):
    """The bf16-trained meta checkpoint meta-tested in float32, and the bf16 test of it: the same episodes, close
    accuracies (bf16 moves a few predictions, never the whole test)."""
    logs = amp_run["logs"]
    res_path = os.path.join(logs, "meta", "custom_conv4_5way1shot_exp1", "results.json")
    bf16 = json.load(open(res_path))
    assert main.cli(EVAL + amp_run["base"]) == 0
    f32 = json.load(open(res_path))
    assert f32["settings"]["amp"] is False and f32["episodes"] == bf16["episodes"] == 50
    assert abs(f32["mean"] - bf16["mean"]) <= 5.0, (f32["mean"], bf16["mean"])
    assert "note: --amp" not in capsys.readouterr().out


def test_amp_on_a_cpu_without_native_bf16_is_the_float32_run(amp_run, monkeypatch, capsys):
    """Plain ``--amp`` where the CPU has no native bfloat16 (monkeypatched, so on every CPU): one line, then the
    float32 numbers exactly."""
    monkeypatch.setattr(gpu_tools, "cpu_bf16_feature", lambda: None)
    res_path = os.path.join(amp_run["logs"], "meta", "custom_conv4_5way1shot_exp1", "results.json")
    assert main.cli(EVAL + amp_run["base"]) == 0
    f32 = json.load(open(res_path))
    capsys.readouterr()
    assert main.cli(EVAL + amp_run["base"] + ["--amp"]) == 0
    out = capsys.readouterr().out
    amp = json.load(open(res_path))
    assert out.count("note: --amp: this CPU has no native bfloat16") == 1
    assert (amp["mean"], amp["ci95"]) == (f32["mean"], f32["ci95"])
