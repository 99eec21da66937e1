"""A short real run: pre-train -> meta-train -> meta-eval through main.py on a small generated folder
dataset (the official layout). The test accuracy must beat 5-way chance (20%) by a clear margin."""
import json
import os

import pytest

import main
from tests.helpers import make_folders

COMMON = ["--dataset", "custom", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper",
          "--seed", "3", "--quiet", "--num_val_episodes", "50", "--way", "5", "--shot", "1"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = make_folders(str(root / "data"), size=16, per_class=20, classes=(12, 6, 6))
    return data, str(root / "logs")


def test_pre_meta_eval_end_to_end(run_dirs, capsys):
    data, logs = run_dirs
    base = COMMON + ["--dataset_dir", data, "--log_root", logs]
    assert main.cli(["--phase", "pre_train", "--pre_max_epoch", "3", "--pre_batch_size", "32",
                     "--pre_optimizer", "adam", "--pre_lr", "0.001", "--pre_head", "linear"] + base) == 0
    pre_dir = os.path.join(logs, "pre", "custom_conv4")
    assert {"max_acc.pth", "last.pth", "resume.pth", "trlog.json", "args.json"} <= set(os.listdir(pre_dir))
    trlog = json.load(open(os.path.join(pre_dir, "trlog.json")))
    assert [r["epoch"] for r in trlog] == [1, 2, 3]
    assert trlog[-1]["train_loss"] < trlog[0]["train_loss"]

    meta = ["--max_epoch", "2", "--num_batch", "10", "--update_step", "10", "--base_lr", "0.1",
            "--meta_lr1", "0.001", "--meta_lr2", "0.001"]
    assert main.cli(["--phase", "meta_train"] + meta + base) == 0
    assert main.cli(["--phase", "meta_eval", "--num_test_episodes", "200"] + meta + base) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("test accuracy:")][-1]
    assert line.endswith("(200 episodes, 5-way 1-shot)")
    res = json.load(open(os.path.join(logs, "meta", "custom_conv4_5way1shot_exp1", "results.json")))
    assert res["episodes"] == 200 and res["way"] == 5 and res["shot"] == 1 and res["eval_seed"] == 1
    assert 0 < res["ci95"] < 5
    assert res["mean"] > 40.0, res          # chance is 20%
    assert f"{res['mean']:.2f} ± {res['ci95']:.2f}" in line


def test_ft_baseline_and_centroid_on_pretrained_checkpoint(run_dirs, capsys):
    data, logs = run_dirs
    pre_ckpt = os.path.join(logs, "pre", "custom_conv4", "max_acc.pth")
    if not os.path.exists(pre_ckpt):
        pytest.skip("needs the end-to-end test's pre-train run")
    base = COMMON + ["--dataset_dir", data, "--log_root", logs, "--eval_weights", pre_ckpt,
                     "--num_test_episodes", "100", "--update_step", "10", "--base_lr", "0.1"]
    assert main.cli(["--phase", "meta_eval"] + base) == 0
    assert main.cli(["--phase", "meta_eval", "--eval_classifier", "centroid"] + base) == 0
    pre_dir = os.path.dirname(pre_ckpt)
    ft = json.load(open(os.path.join(pre_dir, "results_pretrained_5way1shot.json")))
    nc = json.load(open(os.path.join(pre_dir, "results_pretrained_centroid_5way1shot.json")))
    assert ft["method"] == "pretrained" and nc["method"] == "pretrained+centroid"
    assert ft["mean"] > 35 and nc["mean"] > 35


def _official_meta_checkpoint(path, way=5, seed=0):
    """A checkpoint in the official PyTorch meta phase's layout: {'params': <official MtlLearner>.state_dict()} with the
    encoder under 'encoder.' and the base learner as fc1_w / fc1_b plus their aliases vars.0 / vars.1."""
    import torch
    from models.resnet_mtl import build_backbone
    torch.manual_seed(seed)
    enc = build_backbone("resnet25", mtl=True)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    w, b = torch.randn(way, 640) * 0.05, torch.zeros(way)
    sd.update({"base_learner.fc1_w": w, "base_learner.fc1_b": b, "base_learner.vars.0": w, "base_learner.vars.1": b})
    torch.save({"params": sd}, path)
    return path


def test_official_pytorch_checkpoints_load_through_main(tmp_path, capsys):
    import torch
    from models.resnet_mtl import build_backbone
    data = make_folders(str(tmp_path / "data"), size=16, per_class=8, classes=(6, 5, 5))
    common = ["--dataset", "custom", "--backbone", "resnet25", "--image_size", "16", "--preprocess", "pytorch",
              "--dataset_dir", data, "--log_root", str(tmp_path / "logs"), "--quiet", "--val_query", "3",
              "--num_test_episodes", "20", "--num_val_episodes", "5", "--update_step", "3", "--seed", "1"]
    meta_ck = _official_meta_checkpoint(str(tmp_path / "official_meta.pth"))
    assert main.cli(["--phase", "meta_eval", "--eval_weights", meta_ck] + common) == 0
    assert "test accuracy:" in capsys.readouterr().out
    # the official pre-train phase saves the plain encoder's state dict
    pre_ck = str(tmp_path / "official_pre.pth")
    torch.save({"params": build_backbone("resnet25", mtl=False).state_dict()}, pre_ck)
    assert main.cli(["--phase", "meta_train", "--init_weights", pre_ck, "--max_epoch", "1", "--num_batch", "1",
                     "--train_query", "2"] + common) == 0
    assert "meta-train starts from" in capsys.readouterr().out
    # the same checkpoint with another backbone: one clear line naming the backbone its keys and shapes are, exit 2
    assert main.cli(["--phase", "meta_eval", "--eval_weights", meta_ck] + common[:2] + ["--backbone", "resnet12"]
                    + common[4:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "holds a resnet25" in err and "pass --backbone resnet25" in err
    assert err.count("\n") == 1
