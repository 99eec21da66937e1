"""Run with the code BEFORE the architecture change (the i9 worktree): writes a pre and a meta checkpoint and the
per-episode accuracies the old code gives for them."""
import json, os, shutil, sys
import numpy as np, torch
import main
from trainer.meta import load_for_eval
from trainer.evaluate import encode_split, evaluate_bank
from trainer.base import DataBundle
from data_generator.meta_data_generator import fixed_episodes
from utils.options import parse_args
out = sys.argv[1]
logs = "/tmp/w/fx/logs"; shutil.rmtree(logs, ignore_errors=True)
common = ["--dataset", "glyphs", "--dataset_dir", "data/glyphs100.npz", "--backbone", "conv4", "--image_size", "16",
          "--preprocess", "paper", "--seed", "4", "--quiet", "--device", "cpu", "--log_root", logs,
          "--num_val_episodes", "20", "--update_step", "10", "--base_lr", "0.1", "--pre_val_update_step", "10",
          "--pre_val_base_lr", "0.1", "--cache_dir", "none"]
assert main.cli(["--phase", "pre_train", "--pre_max_epoch", "4", "--pre_iters_per_epoch", "30", "--pre_batch_size", "32",
                 "--pre_optimizer", "adam", "--pre_lr", "0.002", "--pre_head", "linear", "--pre_custom_weight_decay", "0"] + common) == 0
assert main.cli(["--phase", "meta_train", "--max_epoch", "2", "--num_batch", "10", "--train_query", "5"] + common) == 0
os.makedirs(out, exist_ok=True)
shutil.copy(f"{logs}/pre/glyphs_conv4/max_acc.pth", f"{out}/pre_conv4.pth")
shutil.copy(f"{logs}/meta/glyphs_conv4_5way1shot_exp1/max_acc.pth", f"{out}/meta_conv4_5way1shot.pth")
args = parse_args(["--phase", "meta_eval", "--num_test_episodes", "100", "--val_query", "5"] + common)
test = DataBundle(args).load("test")
eps = fixed_episodes(test.labels, 100, 5, 1, 5, 1)
res = {}
for name in ("pre_conv4.pth", "meta_conv4_5way1shot.pth"):
    enc, w, b, kind = load_for_eval(args, f"{out}/{name}", torch.device("cpu"))
    feats = encode_split(enc, test, DataBundle(args).eval_transform, torch.device("cpu"))
    accs = evaluate_bank(feats, eps, 5, 1, w, b, 10, 0.1)
    res[name] = {"kind": kind, "accuracies": [float(a) for a in accs], "mean": float(np.mean(accs))}
json.dump({"settings": "conv4, 16 px, glyphs100 test split, 100 fixed episodes (eval seed 1), 5-way 1-shot, 5 queries, "
           "10 inner steps at lr 0.1, written and evaluated by commit bf1d96f", **res}, open(f"{out}/expected.json", "w"), indent=1)
print({k: v["mean"] for k, v in res.items() if isinstance(v, dict)})
