"""The paper's job on a GPU, in one prepared run (issue #14): ``python -m tools.gpu_check --out logs/gpu_check``.

In about 8 minutes on one H200 it runs, in order, each step timed and recorded even when another one fails:

1. **the CUDA tests** (``pytest -m "not slow" -k cuda``-style selection: the tests that skip without a GPU);
2. **``run_experiment.py BENCH --full``** (``tools.benchmark``: pre-train images/s, meta-train episodes/s, meta-test
   bank vs per-episode, fp32 and bf16, and the backbone's fraction of the dense fp32 matmul peak);
3. **a miniImageNet-sized pipeline** on generated data (64 + 16 + 20 classes x 600 images at 84 px, one uncompressed
   ``.npz`` pack of the project's format, written in seconds): for each precision configuration (``fp32``,
   ``amp`` = ``--amp --channels_last``, ``compile`` = those plus ``--compile``), ``main.py`` pre-trains the paper's
   ResNet-12 (paper recipe) for ``PRE_ITERS`` iterations, meta-trains ``META_ITERS`` meta-batches of 2 tasks from that
   checkpoint, and meta-tests 600 episodes with 100 inner steps; then the fp32 meta checkpoint is tested again with
   ``--amp`` on the same episodes (the paired accuracy difference), and the official PyTorch recipe (ResNet-25,
   80 px) runs a shorter pre-train and meta-train for its own projection.

Checks (each a boolean in the JSON, ``all_ok`` their conjunction): every logged training loss is finite; the bf16
meta-test of the fp32 checkpoint is within ``AMP_TOL`` points of the fp32 one (paired over the same 600 episodes;
bf16 rounds the features to 8 bits of mantissa, and with the inner loop in fp32 that moves few predictions; a
larger gap means a bug, not noise); each AMP-trained pipeline's test accuracy is within ``AMP_TRAIN_TOL`` points of
the fp32 pipeline's (two trainings from the same seed drift apart, so this bound is loose by design).

Projections (``projection`` in the JSON), from the measured per-iteration times: the full paper pipeline (PRE 20k
iterations at batch 64; META 20k iterations at meta-batch 2 with 20 inner steps, second order; 600 test episodes
with 100 steps) and the official PyTorch recipe (pre-train 100 epochs over 38,400 images at batch 128; meta-train
100 x 100 tasks with 100 inner steps, first order; 600 test episodes).

Everything goes to ``<out>/gpu_check.json`` (device name, torch / CUDA versions, every figure). ``--tiny`` runs the
same steps at toy sizes on whatever device there is (the CPU dry run; ``tests/tools/test_gpu_check.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from config.options import parse_args
from config.settings import RunPaths, Settings
from data_generator.meta_data_generator import fixed_episodes
from models.evaluate import encode_split, evaluate_bank
from models.heads import make_head
from models.loading import load
from models.spec import Expect
from tools.benchmark import synthetic_split
from trainer.base import DataBundle
from utils.misc import mean_ci, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMP_TOL = 1.0        # points: bf16 vs fp32 meta-test of one checkpoint, same episodes
AMP_TRAIN_TOL = 5.0  # points: an AMP-trained pipeline vs the fp32-trained one
# "flags": main.py flags added to every run. FULL keeps the recipes' batch, query and inner-loop sizes (what the
# projections are of); TINY, which only checks that every step runs and the JSON holds every figure, shrinks them
# too: at the recipes' batch 64 / 128, 15 queries and the official recipe's 100 inner steps its 8 runs took 42 s of
# CPU time (in one process, OMP_NUM_THREADS=1, on the 2-core VM; tests/tools/test_gpu_check.py), at these 26 s.
FULL = {"classes": (64, 16, 20), "per_class": 600, "size": 84, "pre_iters": 300, "meta_iters": 150,
        "test_episodes": 600, "official_pre_iters": 100, "official_meta_iters": 50, "official_size": 80,
        "val_episodes": 100, "official_val_episodes": 20, "official_update_step": 100, "flags": []}
TINY = {"classes": (8, 5, 5), "per_class": 20, "size": 16, "pre_iters": 3, "meta_iters": 2, "test_episodes": 20,
        "official_pre_iters": 2, "official_meta_iters": 1, "official_size": 16,
        "val_episodes": 5, "official_val_episodes": 5, "official_update_step": 5,
        "flags": ["--pre_batch_size", "16", "--train_query", "3", "--val_query", "3"]}
CONFIGS = {"fp32": [], "amp": ["--amp", "--channels_last"], "compile": ["--amp", "--channels_last", "--compile"]}


def make_pack(path: str, cfg: dict) -> dict[str, Any]:
    """The miniImageNet-sized pack: ``<split>_images`` uint8 (N, S, S, 3), labels, classes; uncompressed."""
    t = time.perf_counter()
    arrays = {}
    for i, (split, n) in enumerate(zip(("train", "val", "test"), cfg["classes"])):
        imgs, labels = synthetic_split(n, cfg["per_class"], cfg["size"], seed=100 + i)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = imgs, labels
        arrays[f"{split}_classes"] = np.array([f"{split}{c:03d}" for c in range(n)])
    np.savez(path, **arrays)
    return {"path": path, "seconds": time.perf_counter() - t, "bytes": os.path.getsize(path),
            "images": int(sum(len(arrays[f"{s}_labels"]) for s in ("train", "val", "test")))}


def run_main(argv: list[str], log: list[dict]) -> dict[str, Any]:
    """``python main.py ARGV`` in a subprocess; its wall time, exit code and the tail of its output."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + argv, capture_output=True, text=True,
                       cwd=ROOT)
    rec = {"argv": argv, "rc": p.returncode, "seconds": time.perf_counter() - t,
           "tail": (p.stdout + p.stderr).strip().splitlines()[-3:]}
    log.append(rec)
    return rec


def _trlog(folder: str) -> list[dict]:
    path = os.path.join(folder, "trlog.json")
    return json.load(open(path)) if os.path.exists(path) else []


def train(common: list[str], root: str, backbone: str, pre_iters: int, meta_iters: int,
          log: list[dict]) -> dict[str, Any]:
    """``main.py`` pre-trains for ``pre_iters`` iterations (one epoch), then meta-trains ``meta_iters`` meta-batches
    from that checkpoint; the per-iteration times come from the runs' own ``trlog.json`` (training time only)."""
    paths = RunPaths(root, "custom", backbone)
    pre = run_main(["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_iters_per_epoch", str(pre_iters)]
                   + common, log)
    meta = run_main(["--phase", "meta_train", "--max_epoch", "1", "--num_batch", str(meta_iters),
                     "--init_weights", os.path.join(paths.pre_dir, "last.pth")] + common, log)
    pre_log, meta_log = _trlog(paths.pre_dir), _trlog(paths.meta_dir)
    losses = [r["train_loss"] for r in pre_log + meta_log]
    return {"ok": pre["rc"] == meta["rc"] == 0, "losses_finite": bool(losses) and all(map(math.isfinite, losses)),
            "train_losses": losses, "pre_wall_s": pre["seconds"], "meta_wall_s": meta["seconds"],
            "pre_s_per_iter": pre_log[0]["train_time"] / pre_iters if pre_log else None,
            "meta_s_per_iter": meta_log[0]["train_time"] / meta_iters if meta_log else None,
            "meta_checkpoint": paths.meta_checkpoint}


def pipeline(pack: str, out: str, cfg: dict, name: str, extra: list[str], log: list[dict]) -> dict[str, Any]:
    """Pre-train, meta-train and meta-test the paper's ResNet-12 under one precision configuration."""
    root = os.path.join(out, "runs", name)
    common = ["--dataset", "custom", "--dataset_dir", pack, "--backbone", "resnet12", "--recipe", "paper",
              "--image_size", str(cfg["size"]), "--log_root", root, "--seed", "1", "--quiet", "--overwrite",
              "--num_val_episodes", str(cfg["val_episodes"])] + extra + cfg["flags"]
    res = train(common, root, "resnet12", cfg["pre_iters"], cfg["meta_iters"], log)
    test = run_main(["--phase", "meta_eval", "--num_test_episodes", str(cfg["test_episodes"])]
                    + [a for a in common if a != "--overwrite"], log)
    res_path = os.path.join(os.path.dirname(res["meta_checkpoint"]), "results.json")
    result = json.load(open(res_path)) if os.path.exists(res_path) else {}
    res.update(ok=res["ok"] and test["rc"] == 0, test_wall_s=test["seconds"], test_mean=result.get("mean"),
               test_ci95=result.get("ci95"), common=common)
    return res


def amp_eval_of(run: dict, cfg: dict) -> dict[str, Any]:
    """The fp32 meta checkpoint tested again under ``--amp`` on the same episodes: per-episode paired difference."""
    settings = Settings.from_args(parse_args(["--phase", "meta_eval", "--num_test_episodes", str(cfg["test_episodes"])]
                                             + run["common"]))
    ev, device = settings.test, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = DataBundle(settings.data)
    test = data.load("test")
    episodes = fixed_episodes(test.labels, ev.episodes, ev.way, ev.shot, ev.query, ev.seed)
    model = load(run["meta_checkpoint"], device, Expect(backbone="resnet12", way=ev.way))
    head = make_head("finetune", ev.way, model.head_init(ev.way, ev.seed), ev.inner, order="first")
    accs = {}
    for amp in (False, True):
        feats = encode_split(model.encoder, test, data.eval_transform, device, ev.batch_size, amp)
        accs[amp] = evaluate_bank(feats, episodes, head, ev)
    diff = 100 * (accs[True] - accs[False])
    mean, ci = mean_ci(diff / 100)
    return {"fp32_mean": 100 * float(accs[False].mean()), "amp_mean": 100 * float(accs[True].mean()),
            "paired_diff_mean": 100 * mean, "paired_diff_ci95": 100 * ci, "episodes": len(diff),
            "episodes_equal": int((diff == 0).sum()), "within_tol": abs(100 * mean) <= AMP_TOL}


def official(pack: str, out: str, cfg: dict, log: list[dict]) -> dict[str, Any]:
    """The official PyTorch recipe (ResNet-25, 80 px, SGD pre-train, first-order meta-train of one task per outer
    update, 100 inner steps as its run script) for its projection: ``meta_s_per_iter`` is seconds per task."""
    root = os.path.join(out, "runs", "official")
    common = ["--dataset", "custom", "--dataset_dir", pack, "--backbone", "resnet25", "--recipe", "pytorch",
              "--image_size", str(cfg["official_size"]), "--log_root", root, "--seed", "1", "--quiet", "--overwrite",
              "--num_val_episodes", str(cfg["official_val_episodes"]), "--update_step",
              str(cfg["official_update_step"])] + cfg["flags"]
    return train(common, root, "resnet25", cfg["official_pre_iters"], cfg["official_meta_iters"], log)


def project(paper: dict, off: dict, test_wall_s: float | None) -> dict[str, Any]:
    """Wall time of the full pipelines from the measured per-iteration times (hours)."""
    def h(x):
        return None if x is None else x / 3600
    pre = paper.get("pre_s_per_iter")
    meta = paper.get("meta_s_per_iter")
    out = {"paper": {"pre_20k_h": h(pre and pre * 20000), "meta_20k_h": h(meta and meta * 20000),
                     "test_600_h": h(test_wall_s)}}
    opre, ometa = off.get("pre_s_per_iter"), off.get("meta_s_per_iter")
    out["official_pytorch"] = {"pre_100_epochs_h": h(opre and opre * 100 * 38400 / 128),
                               "meta_100x100_h": h(ometa and ometa * 100 * 100), "test_600_h": None}
    for k in out.values():
        parts = [v for v in k.values() if v is not None]
        k["total_h"] = sum(parts) if parts else None
    return out


def cuda_tests(log: list[dict]) -> dict[str, Any]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        "tests/data_generator/test_transforms.py", "tests/tools/test_benchmark.py"],
                       capture_output=True, text=True, cwd=ROOT)
    tail = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else []
    rec = {"rc": p.returncode, "seconds": time.perf_counter() - t, "summary": tail,
           "skipped": [ln for ln in p.stdout.splitlines() if ln.startswith("SKIPPED")]}
    log.append({"step": "cuda_tests", **rec})
    return rec


def bench(out: str, tiny: bool, log: list[dict]) -> dict[str, Any]:
    t = time.perf_counter()
    folder = os.path.join(out, "bench")
    p = subprocess.run([sys.executable, "-m", "tools.benchmark", "--out", folder, "--full"]
                       + (["--tiny"] if tiny else []), capture_output=True, text=True, cwd=ROOT)
    path = os.path.join(folder, "benchmark.json")
    rec = {"rc": p.returncode, "seconds": time.perf_counter() - t,
           "benchmark": json.load(open(path)) if os.path.exists(path) else None,
           "tail": (p.stdout + p.stderr).strip().splitlines()[-3:]}
    log.append({"step": "bench_full", "rc": rec["rc"], "seconds": rec["seconds"]})
    return rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="logs/gpu_check")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (the CPU dry run)")
    p.add_argument("--configs", default="fp32,amp,compile", help="precision configurations of the pipeline")
    p.add_argument("--steps", default="tests,bench,pipeline,official", help="which steps to run")
    opts = p.parse_args(argv)
    cfg = dict(TINY if opts.tiny else FULL)
    steps = opts.steps.split(",")
    os.makedirs(opts.out, exist_ok=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                           "tiny": opts.tiny, "sizes": cfg, "amp_tol_points": AMP_TOL,
                           "amp_train_tol_points": AMP_TRAIN_TOL, "log": []}
    log = res["log"]
    path = os.path.join(opts.out, "gpu_check.json")
    if "tests" in steps:
        res["cuda_tests"] = cuda_tests(log)
    if "bench" in steps:
        res["bench_full"] = bench(opts.out, opts.tiny, log)
    pack = os.path.join(opts.out, "mini_synthetic.npz")
    if "pipeline" in steps or "official" in steps:
        res["pack"] = make_pack(pack, cfg)
    runs: dict[str, Any] = {}
    if "pipeline" in steps:
        for name in opts.configs.split(","):
            runs[name] = pipeline(pack, opts.out, cfg, name, CONFIGS[name], log)
            write_json_atomic(path, res)
        res["pipeline"] = runs
        if runs.get("fp32", {}).get("ok"):
            res["amp_eval_of_fp32_checkpoint"] = amp_eval_of(runs["fp32"], cfg)
    off = official(pack, opts.out, cfg, log) if "official" in steps else {}
    res["official"] = off
    fp32 = runs.get("fp32", {})
    res["projection"] = project(fp32, off, fp32.get("test_wall_s"))
    checks = {f"{n}_ok": r["ok"] and r["losses_finite"] for n, r in runs.items()}
    if off:
        checks["official_ok"] = off["ok"] and off["losses_finite"]
    if "amp_eval_of_fp32_checkpoint" in res:
        checks["amp_eval_within_tol"] = res["amp_eval_of_fp32_checkpoint"]["within_tol"]
    for n, r in runs.items():
        if n != "fp32" and r.get("test_mean") is not None and fp32.get("test_mean") is not None:
            checks[f"{n}_test_within_{AMP_TRAIN_TOL:g}_points_of_fp32"] = \
                abs(r["test_mean"] - fp32["test_mean"]) <= AMP_TRAIN_TOL
    if "bench_full" in res:
        bj = res["bench_full"]["benchmark"] or {}
        checks["bench_ok"] = res["bench_full"]["rc"] == 0
        res["backbone_fraction_of_matmul_peak"] = bj.get("backbone_fraction_of_matmul_peak")
    if "cuda_tests" in res:
        checks["cuda_tests_ok"] = res["cuda_tests"]["rc"] == 0
    res["checks"] = checks
    res["all_ok"] = all(checks.values()) if checks else False
    res["wall_s"] = time.perf_counter() - t0
    write_json_atomic(path, res)
    print(json.dumps({"device": res["device"], "checks": checks, "projection": res["projection"],
                      "wall_s": round(res["wall_s"], 1)}, indent=1))
    print(f"written to {path}")
    return res


if __name__ == "__main__":
    main()
