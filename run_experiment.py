"""Generate and run the ``main.py`` command lines of an experiment (the seed's interface).

    python run_experiment.py PRE         pre-train the backbone
    python run_experiment.py META        meta-train, then meta-test the kept checkpoint
    python run_experiment.py TEST        meta-test a meta-trained model
    python run_experiment.py META_LOAD   meta-train from weights in <LOG_DIR>/download_weights/ (the official
                                         TensorFlow weights.npy, or our / the official PyTorch pretrain.pth)
    python run_experiment.py TEST_LOAD   meta-test weights in <LOG_DIR>/download_weights/ (weights.npy,
                                         ss_weights.npy, fc_weights.npy, or meta_<SHOT>shot.pth)
    python run_experiment.py DEMO        the whole pipeline on the embedded glyph data, CPU-sized (< 5 min)
    python run_experiment.py BENCH       the speed benchmark, python -m tools.benchmark (<LOG_DIR>/bench/benchmark.json)
    python run_experiment.py ABLATION    the ablation on the glyph benchmark (built by python -m tools.glyphs), then
                                         its report (python -m tools.report)

Options after the mode: ``--recipe paper|pytorch`` (default paper: the constants below; pytorch: the official
PyTorch code's settings, i.e. ``main.py``'s defaults, with only the folder/device constants applied),
``--dry_run`` (print the commands, run nothing), for BENCH ``--full`` (the GPU configuration), and for DEMO and
ABLATION ``--smoke`` (the same commands, shortened).

Edit the constants to change the experiment. Every command is printed before it runs, so each experiment can
be repeated by hand. The hyperparameters themselves are defined (with help texts) in ``utils/options.py``.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from utils.settings import RunPaths

# ------------------------------------------------------------------------------------------------------------
# The seed's constants (defaults: the paper recipe with the ResNet-12, reference sections 4-6 and 7.3).
LOG_DIR = "./logs"             # folder for all logs, checkpoints and results (main.py --log_root)
GPU_ID = "0"                   # CUDA_VISIBLE_DEVICES (main.py --gpu); ignored on a CPU-only machine; several
                               # ("0,1,2,3") launch every phase through torchrun, one process per GPU
PRE_TRA_LABEL = "normal"       # label of the pre-train run (main.py --pre_label)
PRE_TRA_ITER_MAX = 20000       # pre-train iterations
PRE_TRA_DROP = 0.9             # dropout keep rate in pre-train (main.py --pre_dropout_keep)
PRE_DROP_STEP = 5000           # pre-train lr halves every this many iterations
PRE_LR = 0.001                 # pre-train learning rate (Adam)
SHOT_NUM = 1                   # shots per class (support images)
WAY_NUM = 5                    # classes per task
MAX_MAX_ITER = 20000           # meta-train iterations (outer updates)
META_BATCH_SIZE = 2            # tasks per outer update
PRE_ITER = 10000               # the pre-train iteration whose snapshot meta-training starts from
UPDATE_NUM = 20                # inner-loop steps in meta-train (and validation)
SAVE_STEP = 100                # meta iterations between validation + checkpoint (one meta "epoch")
META_LR = 0.001                # meta learning rate (SS parameters and base-learner init alike)
META_LR_MIN = 0.0001           # floor of the meta learning rate
LR_DROP_STEP = 1000            # meta lr halves every this many iterations
BASE_LR = 0.001                # inner-loop learning rate (on TF's summed loss, see INNER_LOSS)
PRE_TRA_DIR = "./data/mini-imagenet/train"   # pre-train images: <dir>/<class>/<image>
META_TRA_DIR = "./data/mini-imagenet/train"  # meta-train images
META_VAL_DIR = "./data/mini-imagenet/val"    # meta-validation images
META_TES_DIR = "./data/mini-imagenet/test"   # meta-test images

# What our main.py adds.
DATASET = "miniImageNet"       # name used in log folder names
NET_ARCH = "resnet12"          # backbone: resnet12, resnet12_wide, resnet12_slim, resnet25, conv4
IMAGE_SIZE = 84                # input size in pixels
PREPROCESS = "paper"           # paper: pixels / 255; pytorch: resize 92/80, centre crop, CIFAR mean/std
PRE_BATCH_SIZE = 64            # pre-train batch
PRE_EPOCH_ITERS = 1000         # pre-train iterations between validation + checkpoint (one pre "epoch")
TEST_UPDATE_NUM = 100          # inner-loop steps at meta-test
TRAIN_QUERY = 15               # queries per class in meta-train
TEST_QUERY = 15                # queries per class at validation / test (TF used SHOT_NUM; PyTorch 15)
INNER_LOSS = "sum"             # sum: TF's summed CE / shot; mean: official PyTorch
SECOND_ORDER = True            # differentiate through the inner loop (TF); False = first order (PyTorch)
NUM_TEST_EPISODES = 600        # meta-test episodes
HARD_TASK = False              # hard-task meta-batch (paper Alg. 1)
RESUME = False                 # continue interrupted runs (main.py --resume)
OVERWRITE = False              # re-run into a folder holding a run: move that run aside (main.py --overwrite)
DEVICE = "auto"                # auto, cpu or cuda
META_LABEL = "exp1"            # label of the meta-train run
DOWNLOAD_DIR = os.path.join(LOG_DIR, "download_weights")  # META_LOAD / TEST_LOAD read weights from here
PRE_WEIGHTS_FILE = "pretrain.pth"                           # a pre-trained encoder (ours or official PyTorch)
META_WEIGHTS_FILE = "meta_{shot}shot.pth"                   # a meta-trained model (ours or official PyTorch)
TF_WEIGHTS_FILE = "weights.npy"  # present in DOWNLOAD_DIR: META_LOAD / TEST_LOAD read the official TF files there
TF_PROTOCOL = False              # the TF BatchNorm and test protocol in every phase (TF_FLAGS); META_LOAD / TEST_LOAD
                                 # of TensorFlow weights switch it on by themselves
# The TF code's semantics: its BatchNorm (batch statistics at train and test, no scale/shift), no SS on the 1x1
# shortcuts, each support image and its flip in the meta-test support set, and `shot` queries per class at
# meta-test (reference sections 2.2, 3.2, 6.2).
TF_FLAGS = ["--bn_mode", "tf", "--shortcut_ss", "off", "--test_flip_support", "--test_query", "shot"]

# DEMO: the same code path, sized for 2 CPU cores and the embedded glyph pack (data/glyphs100.npz).
DEMO = {
    "dataset_dir": "data/glyphs100.npz", "log_root": os.path.join(LOG_DIR, "demo"), "backbone": "conv4",
    "image_size": 32, "preprocess": "paper", "pre_augment": "off", "seed": 1,
    # pre-train: Adam, 8 passes over the 64 base classes (3,840 images), lr x0.1 after epoch 5
    "pre_optimizer": "adam", "pre_lr": 0.001, "pre_custom_weight_decay": 0.0, "pre_batch_size": 64,
    "pre_max_epoch": 8, "pre_step_size": 6, "pre_gamma": 0.1, "pre_head": "linear", "num_val_episodes": 200,
    # meta-train: 12 x 25 tasks per shot, first order, 20 inner steps (100 at test, as the paper) at lr 0.1
    "max_epoch": 12, "num_batch": 25, "meta_batch_size": 1, "train_query": 5, "update_step": 20,
    "test_update_step": 100, "base_lr": 0.1, "meta_lr1": 0.001, "meta_lr2": 0.001, "step_size": 10,
    "val_query": 15, "num_test_episodes": 600,
}

# DEMO --smoke (CI): the same commands, shortened, under their own log folder.
DEMO_SMOKE = {"log_root": os.path.join(LOG_DIR, "demo_smoke"), "pre_max_epoch": 1, "max_epoch": 1, "num_batch": 3,
              "num_val_episodes": 20, "num_test_episodes": 50}

# ABLATION (issue #6): the five rows of the ablation on the ~1,000-class glyph benchmark (split by script), sized for
# 2 CPU cores (about an hour): one pre-training shared by every row, then for 1 and 5 shots: FT baseline,
# nearest class mean, MTL (SS, first order), MTL + HT, MTL from scratch; all tested on the same fixed episodes.
# The choices and why: docs/RESULTS.md. Each sub-dict is main.py flags (True = a bare flag).
ABLATION = {
    "benchmark": "data/glyphs1k", "benchmark_seed": 0,  # python -m tools.glyphs benchmark ... --ensure
    "shots": (1, 5), "scratch_row": True, "report_dir": "docs/results", "log_root": os.path.join(LOG_DIR, "ablation"),
    "common": {"dataset": "glyphs", "dataset_dir": "data/glyphs1k.npz", "backbone": "conv4", "image_size": 32,
               "preprocess": "paper", "way": 5, "seed": 1, "eval_seed": 1, "val_query": 15,
               "num_val_episodes": 600, "update_step": 100, "base_lr": 0.1, "inner_loss": "mean", "quiet": True},
    "pre": {"pre_optimizer": "adam", "pre_lr": 1e-3, "pre_batch_size": 64, "pre_max_epoch": 12, "pre_step_size": 5,
            "pre_gamma": 0.5, "pre_head": "linear", "pre_augment": "off", "pre_dropout_keep": 0.9,
            "pre_custom_weight_decay": 5e-4, "pre_val_update_step": 100, "pre_val_base_lr": 0.1,
            "overwrite": True},  # ABLATION re-runs from scratch: earlier runs are moved aside, not deleted
    "meta": {"max_epoch": 12, "num_batch": 50, "meta_batch_size": 5, "meta_lr1": 1e-3, "meta_lr2": 1e-3,
             "step_size": 6, "gamma": 0.5, "train_query": 10, "first_order": True, "meta_label": "ss",
             "overwrite": True},
    "ht": {"hard_task": True, "ht_normal_tasks": 5, "ht_hard_tasks": 1, "ht_update": "separate", "ht_start_epoch": 1},
    "scratch": {"init_weights": "scratch", "meta_label": "scratch"},
    "test": {"num_test_episodes": 2000, "test_update_step": 100},
}

# ABLATION --smoke: the same commands, tiny, under their own folders (a wiring check of a few minutes).
ABLATION_SMOKE = {"log_root": os.path.join(LOG_DIR, "ablation_smoke"),
                  "report_dir": os.path.join(LOG_DIR, "ablation_smoke", "report"),
                  "pre": {"pre_max_epoch": 1, "pre_iters_per_epoch": 20}, "meta": {"max_epoch": 2, "num_batch": 2},
                  "common": {"num_val_episodes": 50}, "test": {"num_test_episodes": 100}}

MODES = ("PRE", "META", "TEST", "META_LOAD", "TEST_LOAD", "DEMO", "BENCH", "ABLATION")
# ------------------------------------------------------------------------------------------------------------


def _per(total: int, step: int, what: str) -> int:
    if step <= 0 or total % step:
        raise SystemExit(f"error: {what}: {total} is not a positive multiple of {step}")
    return total // step


def common_flags(recipe: str) -> list[str]:
    """Flags every phase gets: the folders, device and logging constants, and (paper recipe) the
    hyperparameter constants mapped onto main.py's flags."""
    f = ["--recipe", recipe, "--log_root", LOG_DIR, "--gpu", GPU_ID, "--device", DEVICE, "--dataset", DATASET,
         "--pre_train_dir", PRE_TRA_DIR, "--meta_train_dir", META_TRA_DIR, "--meta_val_dir", META_VAL_DIR,
         "--meta_test_dir", META_TES_DIR, "--way", WAY_NUM, "--shot", SHOT_NUM, "--pre_label", PRE_TRA_LABEL,
         "--meta_label", META_LABEL, "--num_test_episodes", NUM_TEST_EPISODES]
    if recipe == "paper":
        f += ["--backbone", NET_ARCH, "--image_size", IMAGE_SIZE, "--preprocess", PREPROCESS,
              # pre-train, iteration constants expressed in pre "epochs" of PRE_EPOCH_ITERS iterations
              "--pre_lr", PRE_LR, "--pre_dropout_keep", PRE_TRA_DROP, "--pre_batch_size", PRE_BATCH_SIZE,
              "--pre_iters_per_epoch", PRE_EPOCH_ITERS,
              "--pre_max_epoch", _per(PRE_TRA_ITER_MAX, PRE_EPOCH_ITERS, "PRE_TRA_ITER_MAX"),
              "--pre_step_size", _per(PRE_DROP_STEP, PRE_EPOCH_ITERS, "PRE_DROP_STEP"),
              "--pre_init_epoch", _per(PRE_ITER, PRE_EPOCH_ITERS, "PRE_ITER"),
              "--pre_save_every", _per(PRE_ITER, PRE_EPOCH_ITERS, "PRE_ITER"),
              # meta-train, iteration constants expressed in meta "epochs" of SAVE_STEP iterations
              "--num_batch", SAVE_STEP, "--max_epoch", _per(MAX_MAX_ITER, SAVE_STEP, "MAX_MAX_ITER"),
              "--step_size", _per(LR_DROP_STEP, SAVE_STEP, "LR_DROP_STEP"),
              "--meta_batch_size", META_BATCH_SIZE, "--meta_lr1", META_LR, "--meta_lr2", META_LR,
              "--meta_lr_min", META_LR_MIN, "--update_step", UPDATE_NUM, "--test_update_step", TEST_UPDATE_NUM,
              "--base_lr", BASE_LR, "--train_query", TRAIN_QUERY, "--val_query", TEST_QUERY,
              "--inner_loss", INNER_LOSS, "--second_order" if SECOND_ORDER else "--first_order"]
    if HARD_TASK:
        f.append("--hard_task")
    if TF_PROTOCOL:
        f += TF_FLAGS
    return [str(x) for x in f]


def downloaded_tf() -> bool:
    """True when DOWNLOAD_DIR holds the official TensorFlow weights (``weights.npy``)."""
    return os.path.isfile(os.path.join(DOWNLOAD_DIR, TF_WEIGHTS_FILE))


def check_download(mode: str) -> None:
    """META_LOAD / TEST_LOAD: one line and exit 2 when DOWNLOAD_DIR holds none of the files they read."""
    pth = PRE_WEIGHTS_FILE if mode == "META_LOAD" else META_WEIGHTS_FILE.format(shot=SHOT_NUM)
    if not downloaded_tf() and not os.path.isfile(os.path.join(DOWNLOAD_DIR, pth)):
        print(f"error: {DOWNLOAD_DIR} holds neither the TensorFlow {TF_WEIGHTS_FILE} (with ss_weights.npy and "
              f"fc_weights.npy for TEST_LOAD) nor {pth}: download the weights into it", file=sys.stderr)
        sys.exit(2)


HERE = os.path.dirname(os.path.abspath(__file__))


def script(name: str) -> str:
    """A script of this repo, as a path relative to the working folder (``main.py`` when run from the repo)."""
    return os.path.relpath(os.path.join(HERE, name))


TORCHRUN = ["-m", "torch.distributed.run"]  # torchrun, from this interpreter (printed as ``torchrun``)


def n_processes() -> int:
    """One process per GPU of ``GPU_ID`` (1 on the CPU: ``DEVICE = "cpu"``)."""
    return 1 if DEVICE == "cpu" else len([g for g in str(GPU_ID).split(",") if g.strip()])


def main_cmd(phase: str, flags: list[str], extra: list[str] | None = None) -> list[str]:
    """``python main.py ...``, or ``torchrun --standalone --nproc_per_node=N main.py ...`` when ``GPU_ID`` names
    N > 1 GPUs (each process takes the GPU of its LOCAL_RANK among them; docs/DISTRIBUTED.md)."""
    n = n_processes()
    launcher = TORCHRUN + ["--standalone", f"--nproc_per_node={n}"] if n > 1 else []
    return [sys.executable] + launcher + [script("main.py"), "--phase", phase] + flags + (extra or [])


def commands(mode: str, recipe: str = "paper") -> list[list[str]]:
    """The main.py command lines of a mode (PRE, META, TEST, META_LOAD, TEST_LOAD)."""
    f = common_flags(recipe)
    resume = ["--resume"] if RESUME else (["--overwrite"] if OVERWRITE else [])
    if mode == "PRE":
        return [main_cmd("pre_train", f, resume)]
    if mode == "META":
        return [main_cmd("meta_train", f, resume), main_cmd("meta_eval", f)]
    if mode == "TEST":
        return [main_cmd("meta_eval", f)]
    tf = mode in ("META_LOAD", "TEST_LOAD") and downloaded_tf()
    if tf and not TF_PROTOCOL:
        f = f + TF_FLAGS  # TensorFlow weights are evaluated as the authors did (models/tf_weights.py)
    if mode == "META_LOAD":
        # TF: meta-train from weights.npy (the pre-trained encoder; fresh SS and base learner), as the TF META_LOAD
        init = DOWNLOAD_DIR if tf else os.path.join(DOWNLOAD_DIR, PRE_WEIGHTS_FILE)
        return [main_cmd("meta_train", f, ["--init_weights", init] + resume), main_cmd("meta_eval", f)]
    if mode == "TEST_LOAD":
        weights = DOWNLOAD_DIR if tf else os.path.join(DOWNLOAD_DIR, META_WEIGHTS_FILE.format(shot=SHOT_NUM))
        return [main_cmd("meta_eval", f, ["--eval_weights", weights])]
    raise ValueError(mode)


def demo_settings(smoke: bool = False) -> dict:
    return {**DEMO, **(DEMO_SMOKE if smoke else {})}


def demo_commands(smoke: bool = False) -> list[tuple[str, list[str]]]:
    """DEMO: pre-train once, then for 1 and 5 shots: meta-train, meta-test MTL, meta-test the FT baseline
    (the pre-trained encoder with only the linear base learner fine-tuned)."""
    d = demo_settings(smoke)
    base = []
    for k, v in d.items():
        base += [f"--{k}", str(v)]
    base += ["--dataset", "glyphs", "--device", DEVICE]
    pre_ckpt = RunPaths(d["log_root"], "glyphs", d["backbone"]).pre_checkpoint()  # where main.py writes it
    again = ["--overwrite"]  # the DEMO always starts afresh; an earlier DEMO's runs are moved aside, not deleted
    out = [("pre-train", main_cmd("pre_train", base + again))]
    for shot in (1, 5):
        s = ["--shot", str(shot), "--meta_label", "demo"]
        out.append((f"{shot}-shot meta-train", main_cmd("meta_train", base + s + again)))
        out.append((f"{shot}-shot MTL test", main_cmd("meta_eval", base + s)))
        out.append((f"{shot}-shot FT baseline test", main_cmd("meta_eval", base + s + ["--eval_weights", pre_ckpt])))
    return out


def earlier_run_note(cmd: list[str]) -> str | None:
    """What a training command does to an earlier run in its folder (printed under the command)."""
    if "--phase" not in cmd or cmd[cmd.index("--phase") + 1] not in ("pre_train", "meta_train"):
        return None
    if "--resume" in cmd:
        return "# continues the run in its folder (--resume)"
    if "--overwrite" in cmd:
        return "# an earlier run in its folder is moved aside to <folder>.old-<time>, not deleted (--overwrite)"
    return ("# if its folder already holds a run, this stops and leaves it as it is: set RESUME = True to continue "
            "it or OVERWRITE = True to move it aside")


def run(cmd: list[str], dry: bool) -> None:
    shown = ["python"] + cmd[1:] if cmd[0] == sys.executable else cmd  # repeatable by hand as printed
    if shown[1:3] == TORCHRUN:
        shown = ["torchrun"] + shown[3:]
    print("$ " + " ".join(shlex.quote(c) for c in shown), flush=True)
    note = earlier_run_note(cmd)
    if note:
        print(note, flush=True)
    if dry:
        return
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(rc)


def demo(dry: bool, smoke: bool = False) -> None:
    import time
    t0 = time.perf_counter()
    for _, cmd in demo_commands(smoke):
        run(cmd, dry)
    if dry:
        return
    d = demo_settings(smoke)
    root = d["log_root"]
    summary = {}
    for shot in (1, 5):
        run_paths = RunPaths(root, "glyphs", d["backbone"], 5, shot, meta_label="demo")
        meta_dir, pre_dir = run_paths.meta_dir, run_paths.pre_dir
        rows = {}
        for name, path in (("baseline", os.path.join(pre_dir, f"results_pretrained_5way{shot}shot.json")),
                           ("mtl", os.path.join(meta_dir, "results.json"))):
            with open(path) as fh:
                r = json.load(fh)
            rows[name] = {"mean": r["mean"], "ci95": r["ci95"], "episodes": r["episodes"]}
        summary[f"{shot}-shot"] = rows
    with open(os.path.join(root, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"\nDEMO finished in {time.perf_counter() - t0:.0f} s. 5-way test accuracy (%), mean ± 95% interval:")
    print(f"{'':8} {'FT baseline (pre-trained + fine-tuned head)':>44} {'MTL (SS meta-trained)':>24}")
    for k, rows in summary.items():
        b, m = rows["baseline"], rows["mtl"]
        print(f"{k:8} {b['mean']:>34.2f} ± {b['ci95']:.2f} ({b['episodes']} ep.) "
              f"{m['mean']:>10.2f} ± {m['ci95']:.2f} ({m['episodes']} ep.)")
    print(f"summary written to {os.path.join(root, 'summary.json')}")


def ablation_settings(smoke: bool = False) -> dict:
    """ABLATION with (``smoke``) ABLATION_SMOKE merged in, one level deep."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ABLATION.items()}
    if smoke:
        for k, v in ABLATION_SMOKE.items():
            out[k] = {**out[k], **v} if isinstance(v, dict) else v
    return out


def _flags(*dicts: dict) -> list[str]:
    """main.py flags from dicts of settings (later dicts win; True = a bare flag, False / None = left out)."""
    merged: dict = {}
    for d in dicts:
        merged.update(d)
    out = []
    for k, v in merged.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not False and v is not None:
            out += [f"--{k}", str(v)]
    return out


def ablation_commands(smoke: bool = False) -> list[tuple[str, list[str]]]:
    """ABLATION: ensure the benchmark, pre-train once, then per shot: test rows 1-2 on the pre-trained backbone,
    meta-train and test rows 3 (MTL), 4 (MTL + HT) and 5 (MTL from scratch); the report comes last."""
    a = ablation_settings(smoke)
    c = {**a["common"], "log_root": a["log_root"], "device": DEVICE}
    pre_ckpt = RunPaths(a["log_root"], c["dataset"], c["backbone"]).pre_checkpoint()  # the best by validation
    out = [("benchmark", [sys.executable, "-m", "tools.glyphs", "benchmark", "--out", a["benchmark"],
                          "--seed", str(a["benchmark_seed"]), "--ensure"]),
           ("pre-train", main_cmd("pre_train", _flags(c, a["pre"])))]
    for shot in a["shots"]:
        s = {"shot": shot}
        test = _flags(c, a["meta"], a["test"], s)
        out.append((f"{shot}-shot row 1 FT", main_cmd("meta_eval", test + ["--eval_weights", pre_ckpt])))
        out.append((f"{shot}-shot row 2 nearest mean", main_cmd("meta_eval", test + ["--eval_weights", pre_ckpt,
                                                                                     "--eval_classifier", "centroid"])))
        rows = [("row 3 MTL", {"init_weights": pre_ckpt}), ("row 4 MTL+HT", {"init_weights": pre_ckpt, **a["ht"]})]
        if a["scratch_row"]:
            rows.append(("row 5 MTL scratch", a["scratch"]))
        for name, extra in rows:
            out.append((f"{shot}-shot {name} meta-train", main_cmd("meta_train", _flags(c, a["meta"], extra, s))))
            out.append((f"{shot}-shot {name} test", main_cmd("meta_eval", _flags(c, a["meta"], a["test"], extra, s))))
    out.append(("report", [sys.executable, "-m", "tools.report", "--log_root", a["log_root"], "--dataset",
                           c["dataset"], "--backbone", c["backbone"], "--way", str(c["way"]), "--shots",
                           *[str(s) for s in a["shots"]], "--label", a["meta"]["meta_label"], "--scratch_label",
                           a["scratch"]["meta_label"], "--out", a["report_dir"]]))
    return out


def ablation(dry: bool, smoke: bool = False) -> None:
    """Run the ablation's commands in order (each printed first), time them into
    ``<log_root>/ablation_timing.json`` (the report records it), then the report."""
    import time
    cmds = ablation_commands(smoke)
    root = ablation_settings(smoke)["log_root"]
    t_start, steps = time.perf_counter(), []
    for name, cmd in cmds:
        if name == "report" and not dry:
            os.makedirs(root, exist_ok=True)
            with open(os.path.join(root, "ablation_timing.json"), "w") as fh:
                json.dump({"wall_s": round(time.perf_counter() - t_start, 1), "cpu_count": os.cpu_count(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "steps": steps}, fh, indent=1)
        t0 = time.perf_counter()
        run(cmd, dry)
        steps.append({"step": name, "seconds": round(time.perf_counter() - t0, 1)})
        if not dry:
            print(f"[ABLATION] {name}: {steps[-1]['seconds']:.0f} s (total {time.perf_counter() - t_start:.0f} s)",
                  flush=True)


def usage(msg: str) -> None:
    print(f"error: {msg}\nusage: python run_experiment.py MODE [--recipe paper|pytorch] [--dry_run] [--full] [--smoke]\n"
          f"modes: {', '.join(MODES)}", file=sys.stderr)
    sys.exit(2)


def cli(argv: list[str]) -> None:
    if not argv:
        usage("no mode given")
    mode, opts = argv[0], argv[1:]
    if mode not in MODES:
        usage(f"unknown mode {mode!r}")
    dry = "--dry_run" in opts
    recipe = "paper"
    if "--recipe" in opts:
        i = opts.index("--recipe")
        if i + 1 >= len(opts) or opts[i + 1] not in ("paper", "pytorch"):
            usage("--recipe takes paper or pytorch")
        recipe = opts[i + 1]
    if mode == "DEMO":
        demo(dry, smoke="--smoke" in opts)
    elif mode == "ABLATION":
        ablation(dry, smoke="--smoke" in opts)
    elif mode == "BENCH":
        cmd = [sys.executable, "-m", "tools.benchmark", "--out", os.path.join(LOG_DIR, "bench")]
        if "--full" in opts:
            cmd.append("--full")
        run(cmd, dry)
    else:
        if mode in ("META_LOAD", "TEST_LOAD") and not dry:
            check_download(mode)
        for cmd in commands(mode, recipe):
            run(cmd, dry)


if __name__ == "__main__":
    cli(sys.argv[1:])
