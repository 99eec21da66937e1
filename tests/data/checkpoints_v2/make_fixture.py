"""Run with the code BEFORE the model-spec change (commit e418ecf, issue 21): writes a pre-train checkpoint
(--bn_mode pytorch) and a meta checkpoint trained with --bn_mode tf, neither holding a "spec", and the per-episode
accuracies that code gives for them through meta_eval's own path (load_for_eval + evaluate; the tf one episodic).

    python tests/data/checkpoints_v2/make_fixture.py tests/data/checkpoints_v2
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

import main
from data_generator.meta_data_generator import fixed_episodes
from trainer.base import DataBundle
from trainer.evaluate import evaluate
from trainer.meta import load_for_eval
from utils.options import parse_args
from utils.settings import Settings

out = sys.argv[1]
logs = "/tmp/fx2/logs"
shutil.rmtree(logs, ignore_errors=True)
common = ["--dataset", "glyphs", "--dataset_dir", "data/glyphs100.npz", "--backbone", "conv4", "--image_size", "16",
          "--preprocess", "paper", "--seed", "4", "--quiet", "--device", "cpu", "--log_root", logs,
          "--num_val_episodes", "20", "--update_step", "10", "--base_lr", "0.1", "--pre_val_update_step", "10",
          "--pre_val_base_lr", "0.1", "--cache_dir", "none"]
pre = ["--phase", "pre_train", "--pre_max_epoch", "3", "--pre_iters_per_epoch", "30", "--pre_batch_size", "32",
       "--pre_optimizer", "adam", "--pre_lr", "0.002", "--pre_head", "linear", "--pre_custom_weight_decay", "0"]
assert main.cli(pre + common) == 0
tf = ["--bn_mode", "tf", "--pre_label", "tf"]
assert main.cli(pre + common + tf) == 0
assert main.cli(["--phase", "meta_train", "--max_epoch", "2", "--num_batch", "10", "--train_query", "5",
                 "--shortcut_ss", "off"] + common + tf) == 0
os.makedirs(out, exist_ok=True)
shutil.copy(f"{logs}/pre/glyphs_conv4/max_acc.pth", f"{out}/pre_conv4.pth")
shutil.copy(f"{logs}/meta/glyphs_conv4_5way1shot_exp1/max_acc.pth", f"{out}/meta_conv4_tf_5way1shot.pth")
res = {}
for name, extra in (("pre_conv4.pth", []), ("meta_conv4_tf_5way1shot.pth", ["--bn_mode", "tf"])):
    args = parse_args(["--phase", "meta_eval", "--num_test_episodes", "100", "--val_query", "5",
                       "--test_update_step", "10"] + common + extra)
    settings = Settings.from_args(args)
    ev = settings.test
    data = DataBundle(settings.data)
    test = data.load("test")
    eps = fixed_episodes(test.labels, ev.episodes, ev.way, ev.shot, ev.query, ev.seed)
    enc, w, b, kind = load_for_eval(f"{out}/{name}", "conv4", 5, ev.seed, torch.device("cpu"), args.bn_mode)
    _, _, accs = evaluate(enc, test, data.eval_transform, eps, w, b, ev, torch.device("cpu"))
    res[name] = {"kind": kind, "eval_mode": ev.mode, "accuracies": [float(a) for a in accs],
                 "mean": float(np.mean(accs))}
json.dump({"settings": "conv4, 16 px, glyphs100 test split, 100 fixed episodes (eval seed 1), 5-way 1-shot, "
           "5 queries, 10 inner steps at lr 0.1; meta_conv4_tf_5way1shot.pth trained and evaluated with --bn_mode tf "
           "(episodic); written and evaluated by commit e418ecf (before the model spec)", **res},
          open(f"{out}/expected.json", "w"), indent=1)
print({k: (v["kind"], v["eval_mode"], v["mean"]) for k, v in res.items()})
