"""The TF semantics behind flags: ``--bn_mode tf``, ``--test_flip_support``, ``--test_query``; TF weights through
``main.py`` and ``run_experiment.py META_LOAD / TEST_LOAD``; our checkpoints exported to the TF files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import main
import run_experiment as rx
from config.options import parse_args
from config.settings import Settings
from data_generator.dataset_loader import ImageSet
from data_generator.meta_data_generator import fixed_episodes
from models.bn_mode import TFBatchNorm2d, apply_bn_mode, batch_dependent
from models.evaluate import EvalSettings, evaluate, evaluate_bank, hflip
from models.heads import InnerLoop, make_head
from models.mtl import MetaLearner
from tests.helpers import make_folders, make_npz
from tests.tf_files import SLIM, official_files

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ settings
def test_defaults_stay_as_today():
    s = Settings.from_args(parse_args(["--shot", "5"]))
    assert s.model.bn_mode == "pytorch" and s.test.mode == "bank" and not s.test.flip_support
    assert s.test.query == s.args.val_query == 15


def test_tf_flags_reach_the_settings():
    s = Settings.from_args(parse_args(["--backbone", "resnet12", "--shot", "5", "--bn_mode", "tf",
                                       "--test_flip_support", "--test_query", "shot", "--inner_loss", "sum"]))
    assert s.test.query == 5 and s.meta_val.query == 15        # the TF query count at meta-test only
    assert s.pre_val.mode == s.meta_val.mode == s.test.mode == "episodic"   # batch statistics: no feature bank
    assert s.test.flip_support and not s.meta_val.flip_support
    # TF xent = per-sample CE / shot, summed over the doubled support: 2 * way * mean CE
    assert s.test.inner.loss_scale == 10.0 and s.meta_val.inner.loss_scale == 5.0
    assert parse_args(["--test_query", "7"]).test_query == 7
    with pytest.raises(SystemExit):
        parse_args(["--test_query", "many"])


# ------------------------------------------------------------------ TF BatchNorm
def test_tf_batchnorm_is_batch_statistics_without_affine_in_every_mode():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3 + 2
    bn = TFBatchNorm2d(4).double()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-3)
    for train in (True, False):
        bn.train(train)
        torch.testing.assert_close(bn(x), want, rtol=1e-12, atol=1e-12)
    assert not list(bn.parameters()) and not list(bn.state_dict())


def test_apply_bn_mode_swaps_every_batchnorm_and_adds_the_tf_conv_biases():
    model = MetaLearner("resnet12_slim", bn_mode="tf")
    enc = model.encoder
    assert not [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d) and not isinstance(m, TFBatchNorm2d)]
    for k in range(1, 5):
        layer = getattr(enc, f"layer{k}")
        for j in range(1, 4):
            conv = getattr(layer, f"conv{j}")
            assert conv.bias is not None and not conv.bias.requires_grad and conv.mtl_bias.requires_grad
        assert layer.shortcut.bias is None                      # the TF shortcut has no bias
    assert batch_dependent(enc) and not batch_dependent(MetaLearner("resnet12_slim").encoder)
    assert not [k for k in enc.state_dict() if ".bn" in k]
    model.check_trainable()
    ss_bn, _ = model.meta_parameters()
    assert len(ss_bn) == 4 * (3 * 2 + 1)                    # mtl_weight + mtl_bias per 3x3 conv, mtl_weight shortcut
    # a per-channel constant before a batch-statistics BatchNorm cancels: the bias does not change the features
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    enc = enc.double()
    with torch.no_grad():
        before = enc(x)
        for p in [getattr(getattr(enc, f"layer{k}"), f"conv{j}").mtl_bias for k in range(1, 5) for j in range(1, 4)]:
            p.normal_()
        torch.testing.assert_close(enc(x), before, rtol=1e-9, atol=1e-9)
    assert apply_bn_mode(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "pytorch")[1].affine


def test_shortcut_ss_off_freezes_the_shortcut_scaling_as_tf():
    on, off = MetaLearner("resnet12_slim", bn_mode="tf"), MetaLearner("resnet12_slim", bn_mode="tf", shortcut_ss=False)
    assert len(on.meta_parameters()[0]) - len(off.meta_parameters()[0]) == 4
    assert not any(getattr(off.encoder, f"layer{k}").shortcut.mtl_weight.requires_grad for k in range(1, 5))
    r25 = MetaLearner("resnet25", shortcut_ss=False)
    assert not r25.encoder.layer1[0].downsample[0].mtl_weight.requires_grad
    assert r25.encoder.layer1[0].conv1.mtl_weight.requires_grad


def test_the_feature_bank_refuses_a_batch_dependent_encoder():
    enc = MetaLearner("resnet12_slim", bn_mode="tf").encoder
    imgs = ImageSet(np.zeros((10, 16, 16, 3), np.uint8), np.repeat(np.arange(5), 2), [str(i) for i in range(5)], "toy")
    ev = EvalSettings(way=5, shot=1, query=1, episodes=2, seed=0, inner=InnerLoop(1, 0.1), mode="bank")
    eps = fixed_episodes(imgs.labels, 2, 5, 1, 1, 0)
    with pytest.raises(ValueError, match="depend on the batch"):
        evaluate(enc, imgs, lambda x: x.permute(0, 3, 1, 2).float() / 255, eps, torch.zeros(5, 256),
                 torch.zeros(5), ev, torch.device("cpu"))


# ------------------------------------------------------------------ flipped support
class _ColumnEncoder(nn.Module):
    """A per-image encoder whose features see left and right: (B, 3, S, S) -> (B, S) column means of channel 0."""

    def forward(self, x):
        return x[:, 0].mean(1)


def _toy_split(seed=0, way=5, per_class=4, size=6):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (way * per_class, size, size, 3), dtype=np.uint8)
    return ImageSet(imgs, np.repeat(np.arange(way), per_class), [str(i) for i in range(way)], "toy")


def test_hflip_flips_the_width_axis():
    a = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    assert np.array_equal(hflip(a)[:, :, 0], a[:, :, 3]) and np.array_equal(hflip(a)[:, 0, :, 1], a[:, 0, ::-1, 1])


def test_flip_support_puts_each_support_image_and_its_flip_in_the_support_set():
    data, way, shot = _toy_split(), 5, 2
    tf = lambda x: x.permute(0, 3, 1, 2).double() / 255  # noqa: E731
    eps = fixed_episodes(data.labels, 8, way, shot, 2, seed=3)
    w0, b0 = torch.zeros(way, 6, dtype=torch.float64), torch.zeros(way, dtype=torch.float64)
    accs = {}
    for mode in ("bank", "episodic"):
        for flip in (False, True):
            ev = EvalSettings(way=way, shot=shot, query=2, episodes=8, seed=3, inner=InnerLoop(5, 0.5), mode=mode,
                              flip_support=flip)
            accs[mode, flip] = evaluate(_ColumnEncoder(), data, tf, eps, w0, b0, ev, torch.device("cpu"))[2]
    # the two paths agree with and without the flipped support
    assert np.array_equal(accs["bank", True], accs["episodic", True])
    assert np.array_equal(accs["bank", False], accs["episodic", False])
    # and the flipped support is what the inner loop sees: the bank with the support doubled by hand
    feats = _ColumnEncoder()(tf(torch.from_numpy(data.images)))
    flipped = _ColumnEncoder()(tf(torch.from_numpy(hflip(data.images))))
    by_hand = []
    n_s = way * shot
    y_s = torch.arange(way).repeat(2 * shot)[None]  # the support then its flips, labels position % way throughout
    for ep in eps:
        f_s = torch.cat([feats[ep[:n_s]], flipped[ep[:n_s]]])[None]
        logits = make_head("finetune", way, (w0, b0), InnerLoop(5, 0.5), "autograd").fit(f_s, y_s).logits(
            feats[ep[n_s:]][None])
        by_hand.append((logits[0].argmax(-1) == torch.arange(way).repeat(2)).double().mean().item())
    np.testing.assert_array_equal(accs["bank", True], np.asarray(by_hand, np.float32))
    bank_head = make_head("finetune", way, (w0, b0), InnerLoop(5, 0.5), "first")
    ev = EvalSettings(way=way, shot=shot, query=2, episodes=8, seed=3, inner=InnerLoop(5, 0.5), flip_support=True)
    np.testing.assert_array_equal(evaluate_bank(feats, eps, bank_head, ev, flipped_features=flipped),
                                  accs["bank", True])


# ------------------------------------------------------------------ main.py with TF weights and the exporter
COMMON = ["--dataset", "custom", "--backbone", "resnet12_slim", "--image_size", "16", "--preprocess", "paper",
          "--num_val_episodes", "5", "--num_test_episodes", "20", "--seed", "1", "--quiet", "--device", "cpu",
          "--update_step", "3", "--test_update_step", "5", "--val_query", "3", "--bn_mode", "tf"]


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    """A tiny --bn_mode tf pre-train + meta-train of resnet12_slim (16 px)."""
    base = tmp_path_factory.mktemp("tfrun")
    npz = make_npz(str(base / "d.npz"), per_class=12, classes=(8, 6, 6))
    argv = COMMON + ["--dataset_dir", npz, "--log_root", str(base / "logs")]
    assert main.cli(argv + ["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_iters_per_epoch", "3",
                            "--pre_batch_size", "16"]) == 0
    assert main.cli(argv + ["--phase", "meta_train", "--max_epoch", "1", "--num_batch", "2", "--train_query", "3",
                            "--pre_init_epoch", "0"]) == 0
    return {"base": base, "argv": argv, "meta": base / "logs/meta/custom_resnet12_slim_5way1shot_exp1/max_acc.pth",
            "pre": base / "logs/pre/custom_resnet12_slim/max_acc.pth"}


def _result(capsys) -> str:
    out = capsys.readouterr().out
    return [ln for ln in out.splitlines() if ln.startswith("test accuracy:")][-1]


def test_exported_checkpoint_evaluates_the_same_from_the_tf_files(tf_run, tmp_path, capsys):
    from tools.export_tf_weights import main as export_main
    assert export_main([str(tf_run["meta"]), str(tmp_path / "tf")]) == 0
    assert sorted(os.listdir(tmp_path / "tf")) == ["fc_weights.npy", "ss_weights.npy", "weights.npy"]
    ev = tf_run["argv"] + ["--phase", "meta_eval", "--test_flip_support", "--test_query", "shot"]
    assert main.cli(ev + ["--eval_weights", str(tf_run["meta"])]) == 0
    from_pth = _result(capsys)
    assert main.cli(ev + ["--eval_weights", str(tmp_path / "tf")]) == 0
    assert _result(capsys) == from_pth
    assert main.cli(ev + ["--eval_weights", str(tmp_path / "tf" / "weights.npy")]) == 0
    assert _result(capsys) == from_pth
    r = json.loads((tmp_path / "tf" / "results.json").read_text())
    assert r["query"] == 1 and r["flip_support"] is True and r["eval_mode"] == "episodic" and r["episodes"] == 20
    # the pre-train checkpoint exports to weights.npy (with its linear classifier as w5/b5)
    assert export_main([str(tf_run["pre"]), str(tmp_path / "pre")]) == 0
    from utils.safe_pickle import load_object_npy
    w = load_object_npy(str(tmp_path / "pre" / "weights.npy"))
    assert os.listdir(tmp_path / "pre") == ["weights.npy"] and w["w5"].shape == (256, 8) and len(w) == 4 * 7 + 2


def test_a_pytorch_batchnorm_checkpoint_does_not_export(tf_run, tmp_path, capsys):
    from tools.export_tf_weights import main as export_main
    ck = torch.load(tf_run["meta"], weights_only=True)
    ck["encoder"]["layer1.bn1.weight"] = torch.ones(32)
    torch.save(ck, tmp_path / "pt.pth")
    assert export_main([str(tmp_path / "pt.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "--bn_mode pytorch" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_meta_train_starts_from_tf_weights_npy(tf_run, tmp_path, capsys):
    official_files(str(tmp_path / "dl"), widths=SLIM, seed=1)
    argv = tf_run["argv"] + ["--phase", "meta_train", "--max_epoch", "1", "--num_batch", "1", "--train_query", "3",
                             "--meta_label", "fromtf", "--init_weights", str(tmp_path / "dl"), "--shortcut_ss", "off"]
    assert main.cli(argv) == 0
    assert "meta-train starts from" in capsys.readouterr().out
    ck = torch.load(tf_run["base"] / "logs/meta/custom_resnet12_slim_5way1shot_fromtf/last.pth", weights_only=True)
    from utils.safe_pickle import load_object_npy
    w = load_object_npy(str(tmp_path / "dl" / "weights.npy"))
    # the pre-trained conv weights are frozen: still the file's, after an outer update
    assert torch.equal(ck["encoder"]["layer3.conv2.weight"], torch.from_numpy(w["block3_conv2"]).permute(3, 2, 0, 1))
    # the SS scaling moved by the outer update, the shortcut's did not (--shortcut_ss off, as TF)
    assert not torch.equal(ck["encoder"]["layer3.conv2.mtl_weight"], torch.ones(128, 128, 1, 1))
    assert torch.equal(ck["encoder"]["layer3.shortcut.mtl_weight"], torch.ones(128, 64, 1, 1))


# ------------------------------------------------------------------ run_experiment.py META_LOAD / TEST_LOAD
def _rx_setup(monkeypatch, tmp_path):
    data = make_folders(str(tmp_path / "data"), size=16, per_class=8, classes=(8, 6, 6))
    logs = str(tmp_path / "logs")
    for name, value in {"LOG_DIR": logs, "DOWNLOAD_DIR": os.path.join(logs, "download_weights"),
                        "PRE_TRA_DIR": f"{data}/train", "META_TRA_DIR": f"{data}/train",
                        "META_VAL_DIR": f"{data}/val", "META_TES_DIR": f"{data}/test", "NET_ARCH": "resnet12_slim",
                        "IMAGE_SIZE": 16, "DEVICE": "cpu", "NUM_TEST_EPISODES": 20, "TEST_UPDATE_NUM": 5,
                        "UPDATE_NUM": 2, "SAVE_STEP": 2, "MAX_MAX_ITER": 2, "LR_DROP_STEP": 2, "TRAIN_QUERY": 2,
                        "TEST_QUERY": 2, "META_BATCH_SIZE": 1}.items():
        monkeypatch.setattr(rx, name, value)
    return os.path.join(logs, "download_weights")


def _run_rx(mode, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    try:
        rx.cli([mode])
        rc = 0
    except SystemExit as e:
        rc = e.code
    return rc, capfd.readouterr()


def test_test_load_meta_tests_downloaded_tf_weights(monkeypatch, tmp_path, capfd):
    dl = _rx_setup(monkeypatch, tmp_path)
    official_files(dl, widths=SLIM, seed=2)
    cmd = rx.commands("TEST_LOAD")[0]
    for flag in ("--bn_mode", "--shortcut_ss", "--test_flip_support", "--test_query", "--eval_weights"):
        assert flag in cmd
    rc, cap = _run_rx("TEST_LOAD", monkeypatch, capfd)
    assert rc == 0, cap.err
    line = [ln for ln in cap.out.splitlines() if ln.startswith("test accuracy:")]
    assert len(line) == 1 and " ± " in line[0] and "(20 episodes, 5-way 1-shot)" in line[0]
    r = json.loads(Path(dl, "results.json").read_text())
    assert r["query"] == 1 and r["flip_support"] and r["inner_steps"] == 5


def test_meta_load_meta_trains_from_downloaded_tf_weights(monkeypatch, tmp_path, capfd):
    dl = _rx_setup(monkeypatch, tmp_path)
    official_files(dl, widths=SLIM, seed=2, ss=False)   # a pre-trained weights.npy is all META_LOAD reads
    run = rx.run  # the seed has no constant for the validation episodes: main.py's 600 took 40 s of this test
    monkeypatch.setattr(rx, "run", lambda cmd, dry, sources=None: run(cmd + ["--num_val_episodes", "5"], dry, sources))
    rc, cap = _run_rx("META_LOAD", monkeypatch, capfd)
    assert rc == 0, cap.err
    assert "TensorFlow pre-trained weights" in cap.out
    assert len([ln for ln in cap.out.splitlines() if ln.startswith("test accuracy:")]) == 1


def test_load_modes_with_a_wrong_or_missing_file_stop_with_one_line(monkeypatch, tmp_path, capfd):
    dl = _rx_setup(monkeypatch, tmp_path)
    rc, cap = _run_rx("TEST_LOAD", monkeypatch, capfd)
    assert rc == 2 and cap.err.strip().startswith("error: ") and len(cap.err.strip().splitlines()) == 1
    assert "holds neither the TensorFlow weights.npy" in cap.err
    w, s, fc = official_files(dl, widths=SLIM, seed=2)
    os.unlink(os.path.join(dl, "fc_weights.npy"))
    rc, cap = _run_rx("TEST_LOAD", monkeypatch, capfd)
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "holds ss_weights.npy but not fc_weights.npy" in err[0]
    assert "Traceback" not in cap.err

