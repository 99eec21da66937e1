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
    python run_experiment.py PREDICT     classify the images of QUERY_DIR with a head fitted on SUPPORT_DIR, by the
                                         meta-trained model TEST tests (main.py --phase predict; README "Few-shot
                                         on your own images")
    python run_experiment.py SUMMARY     the seed summary of the TEST results of every seed of SEEDS
                                         (<LOG_DIR>/seeds/<run>/summary.json, summary.md; python -m tools.report)

Options after the mode: ``--recipe paper|pytorch`` (default paper: the constants below; pytorch: the official
PyTorch code's settings, i.e. ``main.py``'s defaults, with only the folder/device constants applied),
``--dry_run`` (print the commands, run nothing), for BENCH ``--full`` (the GPU configuration), and for DEMO and
ABLATION ``--smoke`` (the same commands, shortened).

Edit the constants to change the experiment. Before anything runs (``--dry_run`` too) each constant is checked
(type, range, the constants that contradict each other, main.py's own checks of each command; ``check_constants``):
a wrong one is one line naming it and its line here, exit 2. Every command is printed before it runs, so each
experiment can be repeated by hand. The hyperparameters themselves are defined (with help texts and ranges) in
``config/options.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace

from config.options import (build_parser, gpu_list, image_px, keep_rate, momentum, nonneg_float, nonneg_int,
                            path_text, positive_float, positive_int, query_count, seed_int, timeout_seconds)
from config.settings import RunPaths


def _under(folder: object, *names: str) -> str | None:
    """``os.path.join(folder, *names)``, or None when ``folder`` is not a str: the check of the constants (which
    runs before anything else) then names the wrong constant, instead of a traceback at import."""
    return os.path.join(folder, *names) if isinstance(folder, str) else None


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
SEEDS = [1]                    # --seed of the runs. Several (e.g. [1, 2, 3]): PRE, META, TEST and META_LOAD run once
                               # per seed, each into its own <LOG_DIR>/seed<N>/ (one shared cache), and META, TEST
                               # and SUMMARY end with the summary across seeds (<LOG_DIR>/seeds/<run>/summary.json)
DOWNLOAD_DIR = _under(LOG_DIR, "download_weights")       # META_LOAD / TEST_LOAD read weights from here
PRE_WEIGHTS_FILE = "pretrain.pth"                           # a pre-trained encoder (ours or official PyTorch)
META_WEIGHTS_FILE = "meta_{shot}shot.pth"                   # a meta-trained model (ours or official PyTorch)
# PREDICT (issue 22): your own images, classified by the meta checkpoint of the constants above (what TEST tests)
SUPPORT_DIR = "./data/my_support"  # <SUPPORT_DIR>/<class>/<image>: a few labelled images per class (main.py --support)
QUERY_DIR = "./data/my_query"      # the images to classify, at any depth, or one image (main.py --query); in class
                                   # folders named like the support's, the accuracy is printed too
TF_WEIGHTS_FILE = "weights.npy"  # present in DOWNLOAD_DIR: META_LOAD / TEST_LOAD read the official TF files there
TF_PROTOCOL = False              # the TF BatchNorm and test protocol in every phase (TF_FLAGS); META_LOAD / TEST_LOAD
                                 # of TensorFlow weights switch it on by themselves
# The TF code's semantics: its BatchNorm (batch statistics at train and test, no scale/shift), no SS on the 1x1
# shortcuts, each support image and its flip in the meta-test support set, and `shot` queries per class at
# meta-test (reference sections 2.2, 3.2, 6.2).
TF_FLAGS = ["--bn_mode", "tf", "--shortcut_ss", "off", "--test_flip_support", "--test_query", "shot"]

# DEMO: the same code path, sized for 2 CPU cores and the embedded glyph pack (data/glyphs100.npz).
DEMO = {
    "dataset_dir": "data/glyphs100.npz", "log_root": _under(LOG_DIR, "demo"), "backbone": "conv4",
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
DEMO_SMOKE = {"log_root": _under(LOG_DIR, "demo_smoke"), "pre_max_epoch": 1, "max_epoch": 1, "num_batch": 3,
              "num_val_episodes": 20, "num_test_episodes": 50}

# ABLATION (issue #6): the five rows of the ablation on the ~1,000-class glyph benchmark (split by script), sized for
# 2 CPU cores (about an hour): one pre-training shared by every row, then for 1 and 5 shots: FT baseline,
# nearest class mean, MTL (SS, first order), MTL + HT, MTL from scratch; all tested on the same fixed episodes.
# The choices and why: docs/RESULTS.md. Each sub-dict is main.py flags (True = a bare flag).
ABLATION = {
    "benchmark": "data/glyphs1k", "benchmark_seed": 0,  # python -m tools.glyphs benchmark ... --ensure
    "shots": (1, 5), "scratch_row": True, "report_dir": "docs/results", "log_root": _under(LOG_DIR, "ablation"),
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
ABLATION_SMOKE = {"log_root": _under(LOG_DIR, "ablation_smoke"),
                  "report_dir": _under(LOG_DIR, "ablation_smoke", "report"),
                  "pre": {"pre_max_epoch": 1, "pre_iters_per_epoch": 20}, "meta": {"max_epoch": 2, "num_batch": 2},
                  "common": {"num_val_episodes": 50}, "test": {"num_test_episodes": 100}}

MODES = ("PRE", "META", "TEST", "META_LOAD", "TEST_LOAD", "DEMO", "BENCH", "ABLATION", "SUMMARY", "PREDICT")
# ------------------------------------------------------------------------------------------------------------


# main.py flag <- the constant that sets it, in command-line order (``common_flags``). A pair (TOTAL, STEP) sets
# TOTAL / STEP: an iteration count expressed in main.py's epochs of STEP iterations, so TOTAL must be a multiple.
COMMON_FLAGS = (("--log_root", "LOG_DIR"), ("--gpu", "GPU_ID"), ("--device", "DEVICE"), ("--dataset", "DATASET"),
                ("--pre_train_dir", "PRE_TRA_DIR"), ("--meta_train_dir", "META_TRA_DIR"),
                ("--meta_val_dir", "META_VAL_DIR"), ("--meta_test_dir", "META_TES_DIR"), ("--way", "WAY_NUM"),
                ("--shot", "SHOT_NUM"), ("--pre_label", "PRE_TRA_LABEL"), ("--meta_label", "META_LABEL"),
                ("--num_test_episodes", "NUM_TEST_EPISODES"))
PAPER_FLAGS = (("--backbone", "NET_ARCH"), ("--image_size", "IMAGE_SIZE"), ("--preprocess", "PREPROCESS"),
               ("--pre_lr", "PRE_LR"), ("--pre_dropout_keep", "PRE_TRA_DROP"), ("--pre_batch_size", "PRE_BATCH_SIZE"),
               ("--pre_iters_per_epoch", "PRE_EPOCH_ITERS"),
               ("--pre_max_epoch", ("PRE_TRA_ITER_MAX", "PRE_EPOCH_ITERS")),
               ("--pre_step_size", ("PRE_DROP_STEP", "PRE_EPOCH_ITERS")),
               ("--pre_init_epoch", ("PRE_ITER", "PRE_EPOCH_ITERS")),
               ("--pre_save_every", ("PRE_ITER", "PRE_EPOCH_ITERS")),
               ("--num_batch", "SAVE_STEP"), ("--max_epoch", ("MAX_MAX_ITER", "SAVE_STEP")),
               ("--step_size", ("LR_DROP_STEP", "SAVE_STEP")), ("--meta_batch_size", "META_BATCH_SIZE"),
               ("--meta_lr1", "META_LR"), ("--meta_lr2", "META_LR"), ("--meta_lr_min", "META_LR_MIN"),
               ("--update_step", "UPDATE_NUM"), ("--test_update_step", "TEST_UPDATE_NUM"), ("--base_lr", "BASE_LR"),
               ("--train_query", "TRAIN_QUERY"), ("--val_query", "TEST_QUERY"), ("--inner_loss", "INNER_LOSS"))


def _per(total: str, step: str) -> int:
    """The constant ``total`` in main.py epochs of ``step`` iterations (both names of constants)."""
    t, n = globals()[total], globals()[step]
    if t % n:
        _fail(f"{_at((total,))}: {total} = {t!r} is not a multiple of {step} = {n!r} (line {_line((step,))}): "
              f"main.py counts these iterations in epochs of {step}")
    return t // n


def _common(recipe: str) -> tuple[list[str], dict[str, tuple]]:
    """Flags every phase gets (the folders, device and logging constants, and with the paper recipe the
    hyperparameter constants mapped onto main.py's flags: :data:`COMMON_FLAGS`, :data:`PAPER_FLAGS`), and for
    each flag the constant it comes from (a key of :func:`constant_lines`)."""
    f, src = ["--recipe", recipe], {}
    for flag, const in COMMON_FLAGS + (PAPER_FLAGS if recipe == "paper" else ()):
        value = _per(*const) if isinstance(const, tuple) else globals()[const]
        f += [flag, value]
        src[flag] = ((const[0] if isinstance(const, tuple) else const),)
    if recipe == "paper":
        f.append("--second_order" if SECOND_ORDER else "--first_order")
        src["--second_order"] = src["--first_order"] = ("SECOND_ORDER",)
    if HARD_TASK:
        f.append("--hard_task")
    src["--hard_task"], src["--resume"], src["--overwrite"] = ("HARD_TASK",), ("RESUME",), ("OVERWRITE",)
    if TF_PROTOCOL:
        f += TF_FLAGS
    src.update({t: ("TF_FLAGS",) for t in TF_FLAGS if t.startswith("--")})
    return [str(x) for x in f], src


def common_flags(recipe: str) -> list[str]:
    """Flags every phase gets (:func:`_common`)."""
    return _common(recipe)[0]


# ------------------------------------------------------------------------------------------------------------
# The check of the constants: before any command runs (--dry_run included), each constant's type and range, then
# the relations between constants, then main.py's own checks of every command line the mode builds. The first
# problem stops with one line naming the constant and its line in this file, exit 2. A constant that sets a main.py
# flag is checked with that flag's type and range (config/options.py, their one definition); so are the entries of
# DEMO / ABLATION (main.py flags by name). The constants without a flag of their own:
OWN_CHECKS = {
    "PRE_TRA_ITER_MAX": positive_int, "PRE_DROP_STEP": positive_int, "PRE_ITER": positive_int,
    "PRE_EPOCH_ITERS": positive_int, "MAX_MAX_ITER": positive_int, "LR_DROP_STEP": positive_int,
    "SECOND_ORDER": bool, "HARD_TASK": bool, "RESUME": bool, "OVERWRITE": bool, "TF_PROTOCOL": bool,
    "DOWNLOAD_DIR": path_text, "PRE_WEIGHTS_FILE": path_text, "META_WEIGHTS_FILE": path_text,
    "TF_WEIGHTS_FILE": path_text, "SUPPORT_DIR": path_text, "QUERY_DIR": path_text, "TF_FLAGS": list, "DEMO": dict, "DEMO_SMOKE": dict, "ABLATION": dict,
    "ABLATION_SMOKE": dict,
}
# ABLATION's own entries (the rest are dicts of main.py flags); "shots" is a list of --shot values.
ABLATION_KEYS = {"benchmark": path_text, "benchmark_seed": seed_int, "shots": positive_int, "scratch_row": bool,
                 "report_dir": path_text, "log_root": path_text, "common": dict, "pre": dict, "meta": dict, "ht": dict,
                 "scratch": dict, "test": dict}
# what the commands read from the dicts themselves (RunPaths, the report)
NEEDED = {"DEMO": ("log_root", "backbone"), ("ABLATION", "common"): ("dataset", "backbone", "way"),
          ("ABLATION", "meta"): ("meta_label",), ("ABLATION", "scratch"): ("meta_label",)}
HINTS = {"GPU_ID": 'to run on the CPU: DEVICE = "cpu"'}
FILE = os.path.basename(__file__)
INT_TYPES = (positive_int, nonneg_int, seed_int, image_px)
FLOAT_TYPES = (positive_float, nonneg_float, keep_rate, momentum, timeout_seconds)


class ConstantError(Exception):
    """A constant of this file that cannot work; ``str()`` is the one line (without ``error: ``)."""


def _fail(msg: str) -> None:
    raise ConstantError(msg)


def constant_lines(path: str | None = None) -> dict[tuple, int]:
    """Where each constant, and each entry of a dict constant, is set in ``path`` (this file): ``(NAME,)`` and
    ``(NAME, key, ...)`` -> line number, read with ``ast`` (so an edited copy reports its own lines)."""
    import ast
    with open(path or __file__, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    out: dict[tuple, int] = {}

    def walk(node, key: tuple) -> None:
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    out.setdefault(key + (k.value,), k.lineno)
                    walk(v, key + (k.value,))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out.setdefault((t.id,), node.lineno)
                    walk(node.value, (t.id,))
    return out


_LINES: dict[tuple, int] = {}


def _line(key: tuple) -> int:
    """The line of ``key`` (or of the nearest enclosing entry that the file names)."""
    if not _LINES:
        _LINES.update(constant_lines())
    while key and key not in _LINES:
        key = key[:-1]
    return _LINES.get(key, 0)


def _show(key: tuple) -> str:
    return key[0] + "".join(f"[{k!r}]" for k in key[1:])


def _value(key: tuple) -> object:
    v = globals()[key[0]]
    for k in key[1:]:
        v = v[k]
    return v


def _at(key: tuple) -> str:
    return f"{FILE} line {_line(key)}"


def _a(value: object) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _range(check, value: object) -> str | None:
    """What ``check`` (a value type of config/options.py) says about ``value``, without main.py's wording."""
    try:
        check(str(value))
    except argparse.ArgumentTypeError as e:
        return re.sub(r", got .*$", "", str(e))
    return None


def problem(value: object, check) -> str | None:
    """Why ``value`` cannot be a constant checked by ``check`` (a main.py flag's argparse action, a value type of
    config/options.py, or bool / list / dict), or None: its type (:func:`type_problem`), then its range (the value
    type's own check). A bool is never a number here (``True`` is an int in Python); an int is a number where a
    float is needed."""
    why = type_problem(value, check)
    if why:
        return why
    if isinstance(check, argparse.Action):
        if check.nargs == 0:
            return None
        if check.choices is not None and value not in check.choices:
            return f"must be one of {', '.join(map(str, check.choices))}"
        check = check.type
    return _range(check, value) if callable(check) and check not in (bool, list, dict) else None


def _unquoted(value: object) -> str:
    return " (a number without quotes)" if isinstance(value, str) else ""


def type_problem(value: object, check) -> str | None:
    """The type half of :func:`problem`."""
    if isinstance(check, argparse.Action):
        check = bool if check.nargs == 0 else check.type  # a switch: True adds the bare flag, False leaves it out
    if check is bool:
        return None if isinstance(value, bool) else f"must be True or False (without quotes), not {_a(value)}"
    if check is list:
        if not isinstance(value, (list, tuple)):
            return f"must be a list of str (main.py flags and their values), not {_a(value)}"
        bad = [i for i, x in enumerate(value) if not isinstance(x, str)]
        return f"must be a list of str (main.py flags and their values); item {bad[0]} is {_a(value[bad[0]])}" \
            if bad else None
    if check is dict:
        return None if isinstance(value, dict) else f"must be a dict, not {_a(value)}"
    if check in INT_TYPES:
        if isinstance(value, bool):
            return "must be an int, not a bool (True and False are not numbers here)"
        if not isinstance(value, int):
            return f"must be an int{_unquoted(value)}, not {_a(value)}"
    elif check in FLOAT_TYPES:
        if isinstance(value, bool):
            return "must be a number, not a bool (True and False are not numbers here)"
        if not isinstance(value, (int, float)):
            return f"must be a number{_unquoted(value)}, not {_a(value)}"
    elif check is query_count:
        if isinstance(value, bool) or not (isinstance(value, int) or value == "shot"):
            return f"must be an int{_unquoted(value)} or 'shot', not {_a(value)}"
    elif check is gpu_list and isinstance(value, int) and not isinstance(value, bool):
        pass  # GPU_ID = 0 means "0"
    elif not isinstance(value, str):
        return f"must be a str (text in quotes), not {_a(value)}"
    return None


def _flag_actions() -> dict[str, argparse.Action]:
    return {o: a for a in build_parser()._actions for o in a.option_strings}


def _check(key: tuple, check, flag: str | None = None) -> None:
    value = _value(key)
    why = problem(value, check)
    if why:
        notes = [f"it sets main.py {flag}"] if flag and not type_problem(value, check) else []
        notes += [HINTS[key[0]]] if len(key) == 1 and key[0] in HINTS else []
        _fail(f"{_at(key)}: {_show(key)} = {value!r} {why}" + (f" ({'; '.join(notes)})" if notes else ""))


def _check_flag_dict(key: tuple, actions: dict[str, argparse.Action]) -> None:
    """A dict of main.py flags (DEMO, ABLATION's parts): each key a flag, each value of that flag's type
    (True = the bare flag, False / None = left out)."""
    for k in _value(key):
        action = actions.get(f"--{k}")
        if action is None or k in ("phase", "help"):
            why = "is set by each command itself" if action else "is not a main.py flag (see python main.py --help)"
            _fail(f"{_at(key + (k,))}: {_show(key + (k,))}: {k!r} {why}")
        if _value(key + (k,)) is not None:
            _check(key + (k,), action, f"--{k}")
    for need in NEEDED.get(key if len(key) > 1 else key[0], ()):
        if need not in _value(key) and not (key[0].endswith("_SMOKE")):
            _fail(f"{_at(key)}: {_show(key)} has no {need!r}, which the commands need")


def check_types() -> None:
    """Every constant has the type and range it needs (:func:`problem`), in the order of the file."""
    actions = _flag_actions()
    specs: dict[str, tuple] = {}
    for flag, const in COMMON_FLAGS + PAPER_FLAGS:
        if not isinstance(const, tuple):
            specs[const] = (actions[flag], flag)
    specs.update({name: (check, None) for name, check in OWN_CHECKS.items()})
    g = globals()
    missing = [n for n in specs if n not in g]
    if missing:
        _fail(f"{FILE}: the constant {missing[0]} is missing; restore it (README: The constants of run_experiment.py)")
    for name in sorted(specs, key=lambda n: _line((n,))):
        _check((name,), *specs[name])
    check_seeds()
    if _format_error(META_WEIGHTS_FILE):
        _fail(f"{_at(('META_WEIGHTS_FILE',))}: META_WEIGHTS_FILE = {META_WEIGHTS_FILE!r} must be a file name in "
              "which {shot} stands for SHOT_NUM (e.g. 'meta_{shot}shot.pth'), with no other {...}")
    for name in ("DEMO", "DEMO_SMOKE"):
        _check_flag_dict((name,), actions)
    for name in ("ABLATION", "ABLATION_SMOKE"):
        for k in g[name]:
            if k not in ABLATION_KEYS:
                _fail(f"{_at((name, k))}: {_show((name, k))}: {k!r} is not an ABLATION setting "
                      f"({', '.join(ABLATION_KEYS)})")
            if ABLATION_KEYS[k] is dict:
                _check((name, k), dict)
                _check_flag_dict((name, k), actions)
            elif k == "shots":
                shots = g[name][k]
                if not isinstance(shots, (list, tuple)) or not shots:
                    _fail(f"{_at((name, k))}: {_show((name, k))} = {shots!r} must be a list of shots, e.g. (1, 5)")
                for i in range(len(shots)):
                    _check((name, k, i), positive_int, "--shot")
            else:
                _check((name, k), ABLATION_KEYS[k])
        missing = [k for k in ABLATION_KEYS if k not in g[name]] if name == "ABLATION" else []
        if missing:
            _fail(f"{_at((name,))}: ABLATION has no {missing[0]!r}, which the commands need")


def _format_error(pattern: str) -> bool:
    try:
        pattern.format(shot=1)
    except (KeyError, IndexError, ValueError):
        return True
    return False


def check_relations(mode: str, recipe: str) -> None:
    """Constants that contradict each other: RESUME and OVERWRITE; the iteration counts that must be multiples of
    PRE_EPOCH_ITERS / SAVE_STEP (paper recipe: they become main.py epochs)."""
    if RESUME and OVERWRITE:
        _fail(f"{_at(('RESUME',))}: RESUME = True and OVERWRITE = True (line {_line(('OVERWRITE',))}) contradict "
              "each other: RESUME continues the runs in their folders, OVERWRITE moves them aside and starts afresh; "
              "set one of them to False")
    if mode in ("PRE", "META", "TEST", "META_LOAD", "TEST_LOAD", "PREDICT") and recipe == "paper":
        for _, const in PAPER_FLAGS:
            if isinstance(const, tuple):
                _per(*const)


def _main_refuses(flags: list[str]) -> str | None:
    """What main.py would refuse in ``flags`` before running anything (its parser and ``check_args``), or None."""
    import contextlib
    import io

    import main
    from config.options import explicit_flags, parse_args
    from utils.errors import UserError
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(flags)
    except SystemExit:
        return err.getvalue().strip().removeprefix("error: ").replace(" (see python main.py --help)", "")
    try:
        main.check_args(args, explicit_flags(flags))
    except UserError as e:
        return str(e)
    return None


def _blame(msg: str, sources: dict[str, tuple]) -> str | None:
    """The constants behind the flags ``msg`` names: ``LINE: NAME = value (with OTHER = value, line N)``."""
    keys = []
    for flag in re.findall(r"--[a-z0-9_]+", msg):
        if flag in sources and sources[flag] not in keys:
            keys.append(sources[flag])
    if not keys:
        return None
    others = ", ".join(f"{_show(k)} = {_value(k)!r}, line {_line(k)}" for k in keys[1:])
    return f"{_at(keys[0])}: {_show(keys[0])} = {_value(keys[0])!r}" + (f" (with {others})" if others else "")


def _mode_commands(mode: str, recipe: str, smoke: bool) -> list[tuple[list[str], dict[str, tuple]]]:
    if mode == "DEMO":
        return [(cmd, src) for _, cmd, src in _demo(smoke)]
    if mode == "ABLATION":
        return [(cmd, src) for _, cmd, src in _ablation(smoke)]
    if mode == "BENCH":
        return []
    return _commands(mode, recipe)


def check_commands(mode: str, recipe: str, smoke: bool) -> None:
    """main.py's own checks (flag ranges, conflicts, ``main.check_args``) of every command line of the mode, before
    the first one runs; a refusal names the constant(s) that set the flags it names."""
    for cmd, sources in _mode_commands(mode, recipe, smoke):
        if script("main.py") not in cmd:
            continue
        flags = cmd[cmd.index(script("main.py")) + 1:]
        msg = _main_refuses(flags)
        if msg:
            where = _blame(msg, sources) or f"{FILE} {mode}"
            _fail(f"{where}: main.py refuses it: {msg}")


def check_constants(mode: str, recipe: str = "paper", smoke: bool = False) -> None:
    """All of the above; raises :class:`ConstantError` (``cli`` prints it as one ``error:`` line, exit 2)."""
    check_types()
    check_relations(mode, recipe)
    check_commands(mode, recipe, smoke)


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


def predict_checkpoint(recipe: str = "paper") -> str:
    """PREDICT's model: the meta run's best checkpoint, ``max_acc.pth`` of the folder META writes (what TEST tests),
    of the first seed of SEEDS."""
    from config.options import parse_args
    return RunPaths.from_args(parse_args(_seeded(*_common(recipe), SEEDS[0])[0])).meta_checkpoint


def check_predict(recipe: str) -> None:
    """PREDICT: one line and exit 2 when the meta checkpoint of these constants is not there."""
    path = predict_checkpoint(recipe)
    if not os.path.isfile(path):
        print(f"error: PREDICT classifies with {path}, the model META trains with these constants, and it is not there: "
              "run META first, or set NET_ARCH, WAY_NUM, SHOT_NUM, META_LABEL (and LOG_DIR, DATASET) to those of a "
              "trained run", file=sys.stderr)
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


def _without(flags: list[str], flag: str) -> list[str]:
    """``flags`` without ``flag`` and its value."""
    if flag not in flags:
        return flags
    i = flags.index(flag)
    return flags[:i] + flags[i + 2:]


# ------------------------------------------------------------------------------------------------------------
# SEEDS (issue 23): one run per seed. With one seed the commands are the single run's (plus --seed); with several, each
# seed's commands get their own --log_root <LOG_DIR>/seed<N> (the decoded-image cache stays shared: --cache_dir
# <LOG_DIR>/cache, where the single run keeps it) and META, TEST and SUMMARY end with the summary across the seeds
# (python -m tools.report --seeds: per seed mean ± 95% interval, the mean over seeds, the std across them).
def check_seeds() -> None:
    """SEEDS: a non-empty list of --seed values, no seed twice, no 0 (a random draw) among several."""
    key = ("SEEDS",)
    if not isinstance(SEEDS, (list, tuple)) or not SEEDS:
        _fail(f"{_at(key)}: SEEDS = {SEEDS!r} must be a list of seeds, e.g. [1] or [1, 2, 3]")
    for i in range(len(SEEDS)):
        _check(("SEEDS", i), seed_int, "--seed")
    twice = next((x for i, x in enumerate(SEEDS) if x in SEEDS[:i]), None)
    if twice is not None:
        _fail(f"{_at(key)}: SEEDS = {SEEDS!r} names seed {twice} twice: each seed runs once, into its own folder "
              f"({_under(LOG_DIR, f'seed{twice}')}); remove the repeat")
    if len(SEEDS) > 1 and 0 in SEEDS:
        _fail(f"{_at(key)}: SEEDS = {SEEDS!r}: seed 0 draws a random seed in each run, which a list of several cannot "
              "name a folder by; use seeds >= 1")


def seed_log_root(seed: int) -> str:
    """Where the runs of ``seed`` go: ``LOG_DIR`` for a single seed, else ``<LOG_DIR>/seed<N>``."""
    return LOG_DIR if len(SEEDS) == 1 else os.path.join(LOG_DIR, f"seed{seed}")


def _seeded(flags: list[str], src: dict[str, tuple], seed: int) -> tuple[list[str], dict[str, tuple]]:
    """``flags`` with ``--seed`` and, for several seeds, the seed's --log_root and the shared --cache_dir."""
    flags = flags + ["--seed", str(seed)]
    if len(SEEDS) > 1:
        i = flags.index("--log_root")
        flags = flags[:i + 1] + [seed_log_root(seed)] + flags[i + 2:] + ["--cache_dir", os.path.join(LOG_DIR, "cache")]
    return flags, {**src, "--seed": ("SEEDS",), "--cache_dir": ("LOG_DIR",)}


def summary_command(recipe: str = "paper") -> tuple[list[str], dict[str, tuple]]:
    """``python -m tools.report --seeds <meta run of each seed> --out <LOG_DIR>/seeds/<run>``: the folders are where
    each seed's TEST command writes its results (read back from that command, config.settings.RunPaths)."""
    from config.options import parse_args
    dirs = []
    for seed in SEEDS:
        test = _seed_commands("TEST", recipe, seed)[0][0]
        dirs.append(RunPaths.from_args(parse_args(test[test.index(script("main.py")) + 1:])).meta_dir)
    out = os.path.join(LOG_DIR, "seeds", os.path.basename(dirs[0]))
    return [sys.executable, "-m", "tools.report", "--seeds", *dirs, "--out", out], {}


def _commands(mode: str, recipe: str = "paper") -> list[tuple[list[str], dict[str, tuple]]]:
    """:func:`commands`, each with the constant each of its flags comes from: the mode's commands for each seed of
    SEEDS (TEST_LOAD: the first, it tests one downloaded model; PREDICT: the first seed's model), then the seed summary (mode SUMMARY; META, TEST
    and META_LOAD with several seeds)."""
    out = []
    if mode != "SUMMARY":
        for seed in (SEEDS[:1] if mode in ("TEST_LOAD", "PREDICT") else SEEDS):
            out += _seed_commands(mode, recipe, seed)
    if mode == "SUMMARY" or (len(SEEDS) > 1 and mode in ("META", "TEST", "META_LOAD")):
        out.append(summary_command(recipe))
    return out


def _seed_commands(mode: str, recipe: str, seed: int) -> list[tuple[list[str], dict[str, tuple]]]:
    """The commands of ``mode`` for one seed (:func:`seed_log_root`)."""
    f, src = _seeded(*_common(recipe), seed)
    resume = ["--resume"] if RESUME else (["--overwrite"] if OVERWRITE else [])
    if mode == "PRE":
        return [(main_cmd("pre_train", f, resume), src)]
    if mode == "META":
        return [(main_cmd("meta_train", f, resume), src), (main_cmd("meta_eval", f), src)]
    if mode == "TEST":
        return [(main_cmd("meta_eval", f), src)]
    if mode == "PREDICT":  # issue 22: the checkpoint TEST tests; the way is the support folder's (no --way)
        flags = _without(f, "--way") + ["--eval_weights", predict_checkpoint(recipe), "--support", SUPPORT_DIR,
                                        "--query", QUERY_DIR]
        return [(main_cmd("predict", flags), {**src, "--support": ("SUPPORT_DIR",), "--query": ("QUERY_DIR",)})]
    tf = mode in ("META_LOAD", "TEST_LOAD") and downloaded_tf()
    if tf and not TF_PROTOCOL:
        f = f + TF_FLAGS  # TensorFlow weights are evaluated as the authors did (models/tf_weights.py)
        src = {**src, **{t: ("TF_WEIGHTS_FILE",) for t in TF_FLAGS if t.startswith("--")}}
    if mode == "META_LOAD":
        # TF: meta-train from weights.npy (the pre-trained encoder; fresh SS and base learner), as the TF META_LOAD
        init = DOWNLOAD_DIR if tf else os.path.join(DOWNLOAD_DIR, PRE_WEIGHTS_FILE)
        src = {**src, "--init_weights": ("DOWNLOAD_DIR",) if tf else ("PRE_WEIGHTS_FILE",)}
        # (the downloaded weights are the start: PRE_ITER's --pre_init_epoch, which would name another, is left out)
        return [(main_cmd("meta_train", _without(f, "--pre_init_epoch"), ["--init_weights", init] + resume), src),
                (main_cmd("meta_eval", f), src)]
    if mode == "TEST_LOAD":
        weights = DOWNLOAD_DIR if tf else os.path.join(DOWNLOAD_DIR, META_WEIGHTS_FILE.format(shot=SHOT_NUM))
        src = {**src, "--eval_weights": ("DOWNLOAD_DIR",) if tf else ("META_WEIGHTS_FILE",)}
        return [(main_cmd("meta_eval", f, ["--eval_weights", weights]), src)]
    raise ValueError(mode)


def commands(mode: str, recipe: str = "paper") -> list[list[str]]:
    """The main.py command lines of a mode (PRE, META, TEST, META_LOAD, TEST_LOAD)."""
    return [cmd for cmd, _ in _commands(mode, recipe)]


def demo_settings(smoke: bool = False) -> dict:
    return {**DEMO, **(DEMO_SMOKE if smoke else {})}


def _labels(smoke: bool, name: str, smoke_name: str, d: dict, part: str | None = None) -> dict[str, tuple]:
    """``--key`` -> the constant entry it comes from: ``(name, part, key)``, or ``smoke_name``'s when ``smoke``
    and that dict sets it."""
    path = (part,) if part else ()
    over = globals()[smoke_name] if smoke else {}
    over = over.get(part, {}) if part else over
    return {f"--{k}": ((smoke_name if k in over else name),) + path + (k,) for k in d}


def _demo(smoke: bool = False) -> list[tuple[str, list[str], dict[str, tuple]]]:
    """:func:`demo_commands`, each with the constant each flag comes from."""
    d = demo_settings(smoke)
    base = _flags(d) + ["--dataset", "glyphs", "--device", DEVICE]
    src = {**_labels(smoke, "DEMO", "DEMO_SMOKE", d), "--device": ("DEVICE",)}
    pre_ckpt = RunPaths(d["log_root"], "glyphs", d["backbone"]).pre_checkpoint()  # where main.py writes it
    again = ["--overwrite"]  # the DEMO always starts afresh (in a root it owns, claim_log_root: no earlier run there)
    out = [("pre-train", main_cmd("pre_train", base + again), src)]
    for shot in (1, 5):
        s = ["--shot", str(shot), "--meta_label", "demo"]
        out.append((f"{shot}-shot meta-train", main_cmd("meta_train", base + s + again), src))
        out.append((f"{shot}-shot MTL test", main_cmd("meta_eval", base + s), src))
        out.append((f"{shot}-shot FT baseline test", main_cmd("meta_eval", base + s + ["--eval_weights", pre_ckpt]),
                    src))
    return out


def demo_commands(smoke: bool = False) -> list[tuple[str, list[str]]]:
    """DEMO: pre-train once, then for 1 and 5 shots: meta-train, meta-test MTL, meta-test the FT baseline
    (the pre-trained encoder with only the linear base learner fine-tuned)."""
    return [(name, cmd) for name, cmd, _ in _demo(smoke)]


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


def _relay(proc: subprocess.Popen) -> bytes:
    """Copy the child's stderr to ours as it comes (progress bars included); return its last bytes."""
    out = getattr(sys.stderr, "buffer", None)
    tail = b""
    while True:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            return tail
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode(errors="replace"))
        tail = (tail + chunk)[-16384:]


def run_child(cmd: list[str]) -> tuple[int, bytes]:
    """Run ``cmd`` with its stderr relayed (:func:`_relay`); returns its exit status (128 + N when signal N ended
    it, as a shell says) and the end of its stderr. While it runs, this process outlives it, so nothing it prints is
    lost: Ctrl-C reaches it directly (the terminal signals the whole foreground process group), so SIGINT is ignored
    here; SIGTERM and SIGHUP, which a scheduler or ``kill`` may send to this process alone, are passed on to it
    (main.py ignores a repeat of the signal it is already stopping for)."""
    import signal
    import threading
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                previous[getattr(signal, name)] = signal.signal(getattr(signal, name),
                                                                lambda signum, frame: proc.send_signal(signum))
    try:
        tail = _relay(proc)
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return (128 - rc if rc < 0 else rc), tail


def source_note(stderr_tail: str, sources: dict[str, tuple]) -> str | None:
    """After main.py stopped with ``error: ...`` naming flags that constants of this file set: one line naming them
    (a message of main.py speaks of its flags; the user edits the constants)."""
    errors = [ln for ln in stderr_tail.splitlines() if ln.startswith("error: ")]
    if not errors:
        return None
    named = []
    for flag in re.findall(r"--[a-z0-9_]+", errors[-1]):
        if flag in sources and (flag, sources[flag]) not in named:
            named.append((flag, sources[flag]))
    if not named:
        return None
    return "note: in " + FILE + ", " + ", ".join(f"{flag} is {_show(k)} (line {_line(k)})" for flag, k in named[:4])


def run(cmd: list[str], dry: bool, sources: dict[str, tuple] | None = None) -> None:
    """Print ``cmd`` (and what it does to an earlier run), then run it; a failure ends this script with the same
    exit status, after a note naming the constants behind the flags main.py's message names (``sources``)."""
    shown = ["python"] + cmd[1:] if cmd[0] == sys.executable else cmd  # repeatable by hand as printed
    if shown[1:3] == TORCHRUN:
        shown = ["torchrun"] + shown[3:]
    print("$ " + " ".join(shlex.quote(c) for c in shown), flush=True)
    note = earlier_run_note(cmd)
    if note:
        print(note, flush=True)
    if dry:
        return
    rc, tail = run_child(cmd)
    if rc != 0:
        note = source_note(tail.decode(errors="replace"), sources or {})
        if note:
            print(note, file=sys.stderr, flush=True)
        sys.exit(rc)


# What DEMO and ABLATION wrote into their log roots before the roots were marked (utils.run_lock.OWNER_NAME): such
# an unmarked root is theirs too (claim_owned_folder).
DEMO_ENTRIES = ("pre", "meta", "summary.json")
ABLATION_ENTRIES = ("pre", "meta", "ablation_timing.json", "report")


def claim_log_root(owner: str, root: str, entries: tuple[str, ...], dry: bool) -> None:
    """DEMO and ABLATION own their log roots: each start keeps only the previous one's files, as
    ``<root>.previous`` (``utils.run_lock.claim_owned_folder``), so repeated runs leave no pile of
    ``.old-<time>`` folders; one printed line says what happened (under ``--dry_run``, what would)."""
    if dry:
        print(f"# {owner} owns {root}: before it runs, the previous {owner}'s files become {root}.previous and "
              "older ones are deleted", flush=True)
        return
    from utils.run_lock import claim_owned_folder
    print(claim_owned_folder(root, owner, entries), flush=True)


def demo(dry: bool, smoke: bool = False) -> None:
    import time
    t0 = time.perf_counter()
    claim_log_root("DEMO", demo_settings(smoke)["log_root"], DEMO_ENTRIES, dry)
    for _, cmd, src in _demo(smoke):
        run(cmd, dry, src)
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


def _ablation(smoke: bool = False) -> list[tuple[str, list[str], dict[str, tuple]]]:
    """:func:`ablation_commands`, each with the constant entry each main.py flag comes from."""
    a = ablation_settings(smoke)
    c = {**a["common"], "log_root": a["log_root"], "device": DEVICE}
    part = lambda name: _labels(smoke, "ABLATION", "ABLATION_SMOKE", a[name], name)  # noqa: E731
    src = {**part("common"), "--log_root": _labels(smoke, "ABLATION", "ABLATION_SMOKE", {"log_root": 0})["--log_root"],
           "--device": ("DEVICE",)}
    srcs = {name: {**src, **part(name)} for name in ("pre", "meta", "ht", "scratch", "test")}
    pre_ckpt = RunPaths(a["log_root"], c["dataset"], c["backbone"]).pre_checkpoint()  # the best by validation
    out = [("benchmark", [sys.executable, "-m", "tools.glyphs", "benchmark", "--out", a["benchmark"],
                          "--seed", str(a["benchmark_seed"]), "--ensure"], {}),
           ("pre-train", main_cmd("pre_train", _flags(c, a["pre"])), srcs["pre"])]
    for shot in a["shots"]:
        s = {"shot": shot}
        test = _flags(c, a["meta"], a["test"], s)
        tsrc = {**srcs["meta"], **srcs["test"], "--shot": ("ABLATION", "shots")}
        out.append((f"{shot}-shot row 1 FT", main_cmd("meta_eval", test + ["--eval_weights", pre_ckpt]), tsrc))
        out.append((f"{shot}-shot row 2 nearest mean", main_cmd("meta_eval", test + ["--eval_weights", pre_ckpt,
                                                                                     "--eval_classifier", "centroid"]),
                    tsrc))
        rows = [("row 3 MTL", {"init_weights": pre_ckpt}, {}),
                ("row 4 MTL+HT", {"init_weights": pre_ckpt, **a["ht"]}, srcs["ht"])]
        if a["scratch_row"]:
            rows.append(("row 5 MTL scratch", a["scratch"], srcs["scratch"]))
        for name, extra, xsrc in rows:
            msrc = {**srcs["meta"], **xsrc, "--shot": ("ABLATION", "shots")}
            out.append((f"{shot}-shot {name} meta-train", main_cmd("meta_train", _flags(c, a["meta"], extra, s)), msrc))
            out.append((f"{shot}-shot {name} test", main_cmd("meta_eval", _flags(c, a["meta"], a["test"], extra, s)),
                        {**msrc, **srcs["test"]}))
        # the rows against each other on the same episodes: paired differences and tests (--phase compare, issue 23)
        run = RunPaths(a["log_root"], c["dataset"], c["backbone"], c["way"], shot)
        metas = [replace(run, meta_label=lab, hard_task=ht).meta_checkpoint
                 for lab, ht, on in ((a["meta"]["meta_label"], False, True), (a["meta"]["meta_label"], True, True),
                                     (a["scratch"]["meta_label"], False, a["scratch_row"])) if on]
        out.append((f"{shot}-shot compare", main_cmd("compare", test + ["--eval_weights", pre_ckpt,
                                                                        f"{pre_ckpt}:centroid", *metas]), tsrc))
    out.append(("report", [sys.executable, "-m", "tools.report", "--log_root", a["log_root"], "--dataset",
                           c["dataset"], "--backbone", c["backbone"], "--way", str(c["way"]), "--shots",
                           *[str(s) for s in a["shots"]], "--label", a["meta"]["meta_label"], "--scratch_label",
                           a["scratch"]["meta_label"], "--out", a["report_dir"]], {}))
    return out


def ablation_commands(smoke: bool = False) -> list[tuple[str, list[str]]]:
    """ABLATION: ensure the benchmark, pre-train once, then per shot: test rows 1-2 on the pre-trained backbone,
    meta-train and test rows 3 (MTL), 4 (MTL + HT) and 5 (MTL from scratch); the report comes last."""
    return [(name, cmd) for name, cmd, _ in _ablation(smoke)]


def ablation(dry: bool, smoke: bool = False) -> None:
    """Run the ablation's commands in order (each printed first), time them into
    ``<log_root>/ablation_timing.json`` (the report records it), then the report."""
    import time
    cmds = _ablation(smoke)
    root = ablation_settings(smoke)["log_root"]
    claim_log_root("ABLATION", root, ABLATION_ENTRIES, dry)
    t_start, steps = time.perf_counter(), []
    for name, cmd, src in cmds:
        if name == "report" and not dry:
            os.makedirs(root, exist_ok=True)
            with open(os.path.join(root, "ablation_timing.json"), "w") as fh:
                json.dump({"wall_s": round(time.perf_counter() - t_start, 1), "cpu_count": os.cpu_count(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "steps": steps}, fh, indent=1)
        t0 = time.perf_counter()
        run(cmd, dry, src)
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
    smoke = "--smoke" in opts
    try:
        check_constants(mode, recipe, smoke)  # before any command runs or is printed
    except ConstantError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if mode == "DEMO":
        demo(dry, smoke=smoke)
    elif mode == "ABLATION":
        ablation(dry, smoke=smoke)
    elif mode == "BENCH":
        cmd = [sys.executable, "-m", "tools.benchmark", "--out", os.path.join(LOG_DIR, "bench")]
        if "--full" in opts:
            cmd.append("--full")
        run(cmd, dry)
    else:
        if mode in ("META_LOAD", "TEST_LOAD") and not dry:
            check_download(mode)
        if mode == "PREDICT" and not dry:
            check_predict(recipe)
        for cmd, src in _commands(mode, recipe):
            run(cmd, dry, src)


if __name__ == "__main__":
    cli(sys.argv[1:])
