"""The one source of truth for hyperparameters: every ``main.py`` flag and the recipe presets.

``main.py`` parses these flags; ``run_experiment.py`` maps its seed constants onto them. The first block
repeats **every flag of the official PyTorch ``main.py`` with the same name, default and meaning**
(reference section 7.1), with its known bugs fixed:

* ``--gpu`` defaults to ``None`` (leave ``CUDA_VISIBLE_DEVICES`` alone) instead of ``'1'``, which hid the
  only GPU of a one-GPU machine;
* ``--dataset`` defaults to ``miniImageNet``, a value of its own ``choices`` (the official default was not);
* the meta phase finds the pre-train checkpoint by dataset, backbone and ``--pre_label`` instead of by a
  folder name that contains ``pre_max_epoch`` (the official run scripts disagreed on it, section 11.2);
* checkpoints are loaded strictly (see ``utils/checkpoint.py``).

``--seed 0`` keeps its official meaning ("no fixed seed"), but the seed actually drawn is printed and stored,
so the run can be repeated.

Recipes (``--recipe``) change defaults only; a flag given on the command line always wins. ``pytorch`` is
the official PyTorch code (the defaults of ``main.py`` already); ``paper`` is the paper / official TensorFlow
recipe with the ResNet-12 (reference sections 4-6 and 13). The table in the README lists the differences.

When ``--recipe`` is not given, the recipe follows ``--backbone`` (:data:`BACKBONE_RECIPE`): the TF ResNet-12
family gets the paper's recipe, ``resnet25`` (the official PyTorch backbone) and ``conv4`` the official PyTorch
one; with neither flag the run is the official PyTorch code's (``resnet25``). The reason: the TF ResNet-12 has no
BatchNorm on its 1x1 shortcuts, so the chain of four unnormalised shortcut convolutions diverges under the PyTorch
recipe's SGD at lr 0.1 (``training loss is nan`` within two epochs on small data), while Adam at 1e-3, the recipe
it was published with, trains it. For the same reason an explicit ``--recipe pytorch`` with a ResNet-12 backbone
pre-trains at lr 0.01 (:data:`RECIPE_BACKBONE_OVERRIDES`); everything else of that recipe is unchanged. The run's
header prints the recipe and why it was chosen, and ``args.json`` stores it (``recipe``, ``recipe_source``).
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Sequence

from models.bn_mode import BN_MODES
from models.heads import HEADS
from models.resnet_mtl import BACKBONES
from utils.gpu_tools import AMP_DTYPES

PHASES = ("pre_train", "meta_train", "meta_eval", "compare", "predict", "embed")  # compare: several --eval_weights (trainer/compare.py); predict, embed: issue 22
DATASETS = ("miniImageNet", "tieredImageNet", "FC100", "CIFAR-FS", "glyphs", "custom")

# What the paper / official code fixes per benchmark (docs/DATA.md). Nothing here is a flag default: the number of
# pre-train classes is read from the data (the official TF code's hand-set pretrain_class_num, reference 11.x, is
# not needed), and the input is the recipe's (--image_size 80 stored at 92 for --preprocess pytorch, the official
# PyTorch Resize(92) -> CenterCrop(80) for every dataset, 32-px images upsampled; 84 for the paper / TF recipe, to
# which the official author resizes FC100 too, reference 2.4). The preset is printed in the run header; it also
# picks FC100 or CIFAR-FS in a cifar-100-python folder. classes: (train, val, test); px: the source images' side.
DATASET_PRESETS: dict[str, dict[str, object]] = {
    "miniImageNet": {"px": 84, "classes": (64, 16, 20), "images": (38400, 9600, 12000)},
    "tieredImageNet": {"px": 84, "classes": (351, 97, 160), "images": (448695, 124261, 206209)},
    "FC100": {"px": 32, "classes": (60, 20, 20), "images": (36000, 12000, 12000)},
    "CIFAR-FS": {"px": 32, "classes": (64, 16, 20), "images": (38400, 9600, 12000)},
}
OFFICIAL_INPUT = {"pytorch": 80, "paper": 84}  # the official PyTorch / TF network input, for every dataset

# Values in which the two published recipes differ. main.py's own defaults are the "pytorch" column.
RECIPES: dict[str, dict[str, object]] = {
    "pytorch": {},
    "paper": {
        # backbone and input (reference 2.2, 2.4, 2.5)
        "backbone": "resnet12", "image_size": 84, "preprocess": "paper",
        # pre-train: Adam 1e-3 halved every 5k iterations, batch 64, dropout keep 0.9, single FC head,
        # 20k iterations, meta starts from the 10k snapshot (reference 5.2). One "epoch" = 1000 iterations.
        "pre_optimizer": "adam", "pre_lr": 1e-3, "pre_gamma": 0.5, "pre_batch_size": 64,
        "pre_iters_per_epoch": 1000, "pre_step_size": 5, "pre_max_epoch": 20, "pre_init_epoch": 10,
        "pre_save_every": 10, "pre_dropout_keep": 0.9, "pre_head": "linear", "pre_custom_weight_decay": 0.0,
        # meta: 20k iterations x 2 tasks, Adam 1e-3 for SS and FC alike, x0.5 every 1k iterations with a
        # floor of 1e-4, inner loop 20 steps (100 at test) at 1e-3 on the summed loss / shot (reference 4.2).
        # One "epoch" = 100 iterations (the TF save / validation step).
        "max_epoch": 200, "num_batch": 100, "meta_batch_size": 2, "meta_lr1": 1e-3, "meta_lr2": 1e-3,
        "step_size": 10, "gamma": 0.5, "meta_lr_min": 1e-4, "update_step": 20, "test_update_step": 100,
        "base_lr": 1e-3, "inner_loss": "sum", "second_order": True,
    },
}


# The recipe a backbone gets when --recipe is not given: the one it was published with (the backbone registry).
BACKBONE_RECIPE: dict[str, str] = {name: spec.recipe for name, spec in BACKBONES.items()}

# (recipe, backbone) -> defaults that replace the recipe's for that backbone. The TF ResNet-12's unnormalised shortcut
# chain diverges under SGD at the official lr 0.1 (measured: loss 9.3 then 1.4e5 then NaN in three 4-iteration epochs of
# resnet12_slim on 32-px data; at 0.01 it falls 3.0 -> 1.8 -> 1.1), so the PyTorch recipe pre-trains it at 0.01.
RECIPE_BACKBONE_OVERRIDES: dict[tuple[str, str], dict[str, object]] = {
    ("pytorch", name): {"pre_lr": 0.01} for name in BACKBONES if name.startswith("resnet12")}


# ------------------------------------------------------------------------------------------------------------
# Value types: each checks one flag's range at parse time and carries ``requirement`` (what it accepts, in words),
# so that argparse's message (``argument --shot: must be a positive integer, got 0``) and run_experiment.py's check
# of the constant that feeds the flag (``SHOT_NUM = 0 must be a positive integer``) read the same range from one place.
SEED_MAX = 2**32 - 1
"""The largest ``--seed`` / ``--eval_seed``: numpy's legacy seed range (``np.random.seed``, which the official code
seeds), so each seed gives its own numpy, torch and Python streams (a larger one would alias ``seed % 2**32`` in
numpy); torch and Python accept it, and so do the per-rank streams of torchrun (``seed + rank * 1_000_003``)."""
DIST_TIMEOUT_RANGE = (1.0, 1e9)
"""``--dist_timeout`` in seconds: below one second no rendezvous completes; above 1e9 s (31 years: "never")
Python's ``timedelta`` overflows near 8.6e13 s."""


def _requires(requirement: str):
    """Attach ``requirement`` (the accepted values in words, e.g. ``a positive integer``) to a value type."""
    def wrap(fn):
        fn.requirement = requirement
        return fn
    return wrap


def _refuse(fn, text: str):
    hint = getattr(fn, "hint", "")
    return argparse.ArgumentTypeError(f"must be {fn.requirement}, got {text if text.strip() else repr(text)}"
                                      + (f" ({hint})" if hint else ""))


INT_MAX = 2**63 - 1
"""The largest count any flag takes (int64: what numpy sizes, tqdm totals and torch accept)."""


FLOAT32_MAX = 3.4028234663852886e38
"""The largest magnitude a float flag takes: float32's (the parameters, optimizers and inner loop are float32)."""


def _int(fn, text: str) -> int:
    try:
        v = int(text)
    except ValueError:  # not a whole number ("", "1e3", "2.5", "nan")
        raise _refuse(fn, text) from None
    if v > INT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {INT_MAX} (2**63 - 1), got {text}")
    return v


def _float(fn, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _refuse(fn, text) from None
    if not math.isfinite(v):  # inf / nan: every float flag is a rate, a factor or a time
        raise _refuse(fn, text)
    if abs(v) > FLOAT32_MAX:  # the optimizers and the inner loop compute in float32
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.4g} (the float32 range), got {text}")
    return v


def _ranged(name: str, requirement: str, read, ok, doc: str = ""):
    """The value type ``name``: ``read`` (:func:`_int` or :func:`_float`) parses the text, ``ok`` is its range; a
    value outside it is refused with ``must be <requirement>, got <text>``."""
    def check(text: str):
        v = read(check, text)
        if not ok(v):
            raise _refuse(check, text)
        return v

    check.__name__ = check.__qualname__ = name
    check.__doc__ = doc or f"``{requirement}``."
    check.requirement = requirement  # type: ignore[attr-defined]
    return check


positive_int = _ranged("positive_int", "a positive integer", _int, lambda v: v > 0)
nonneg_int = _ranged("nonneg_int", "an integer >= 0", _int, lambda v: v >= 0)
seed_int = _ranged("seed_int", f"an integer in [0, {SEED_MAX}]", _int, lambda v: 0 <= v <= SEED_MAX,
                   "A seed (``--seed``, ``--eval_seed``): ``0 <= v <= SEED_MAX`` (:data:`SEED_MAX`).")
positive_float = _ranged("positive_float", "a finite number > 0", _float, lambda v: v > 0,
                         "A learning rate or a factor: finite and > 0 (``nan`` / ``inf`` are refused here; a huge "
                         "finite value is accepted, and a run it makes diverge stops with the non-finite check of its "
                         "phase).")
nonneg_float = _ranged("nonneg_float", "a finite number >= 0", _float, lambda v: v >= 0)
momentum = _ranged("momentum", "a number in (0, 1)", _float, lambda v: 0 < v < 1,
                   "SGD momentum: Nesterov (the official optimizer) needs it > 0; at 1 or more the velocity never "
                   "decays.")
keep_rate = _ranged("keep_rate", "a number in (0, 1]", _float, lambda v: 0 < v <= 1)
timeout_seconds = _ranged("timeout_seconds", "a number of seconds in [1, 1e9]", _float,
                          lambda v: DIST_TIMEOUT_RANGE[0] <= v <= DIST_TIMEOUT_RANGE[1])


@_requires("a positive integer or 'shot'")
def query_count(text: str) -> int | str:
    """A positive number of queries per class, or ``shot`` (as many as ``--shot``)."""
    if text == "shot":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise _refuse(query_count, text) from None


@_requires("a path (not empty)")
def path_text(text: str) -> str:
    """A file or folder flag: an empty string would silently mean the working folder (or nothing)."""
    if not text.strip():
        raise _refuse(path_text, text)
    return text


@_requires("a label without / or \\ (it becomes part of the log folder's name)")
def label_text(text: str) -> str:
    """``--pre_label`` / ``--meta_label``: a suffix of one folder name (a path separator would nest the run in
    other folders; the run's name would then depend on where the label points)."""
    if "/" in text or "\\" in text or text in (".", ".."):
        raise _refuse(label_text, text)
    return text


IMAGE_SIZE_MAX = 4096
"""The largest ``--image_size``: every split is decoded into memory at that size (one 4096-px image is 50 MB)."""


image_px = _ranged("image_px", f"a positive integer of pixels, at most {IMAGE_SIZE_MAX}", _int,
                   lambda v: 0 < v <= IMAGE_SIZE_MAX)


@_requires("GPU indices separated by commas (0 or 0,1) or GPU-/MIG- UUIDs")
def gpu_list(text: str) -> str:
    """``--gpu``: what ``CUDA_VISIBLE_DEVICES`` accepts as a list of devices: indices or ``GPU-``/``MIG-`` UUIDs.
    (CUDA stops reading the variable at the first entry it cannot parse and hides every GPU after it, so ``-1``,
    ``cpu`` or a typo would silently move the run to the CPU.)"""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        return ""  # as the default: CUDA_VISIBLE_DEVICES is left as it is (utils.gpu_tools.set_gpu)
    if not all(p.isdigit() or p.startswith(("GPU-", "MIG-")) for p in parts):
        raise _refuse(gpu_list, text)
    return ",".join(parts)


gpu_list.hint = "to run on the CPU: --device cpu"  # type: ignore[attr-defined]


# Flags that cannot be given together (argparse mutually exclusive groups) and why, for the one-line refusal.
EXCLUSIVE: dict[frozenset[str], str] = {
    frozenset({"--resume", "--overwrite"}): "--resume continues the run in its log folder, --overwrite moves that run "
                                            "aside and starts afresh; give one of them",
    frozenset({"--second_order", "--first_order"}): "both set one switch (differentiate through the inner loop or "
                                                    "not); give one of them",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (``error: ...``) and exits 2, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        pair = re.fullmatch(r"argument (\S+): not allowed with argument (\S+)", message)
        why = EXCLUSIVE.get(frozenset(pair.groups())) if pair else None
        if why:
            self.exit(2, f"error: {pair.group(2)} and {pair.group(1)} contradict each other: {why}\n")
        self.exit(2, f"error: {message} (see python main.py --help)\n")


def _flexible(add):
    """Wrap ``add_argument`` so that every flag it defines may differ on ``--resume`` (see :func:`flex`)."""
    return lambda *names, **kw: flex(add(*names, **kw))


def flex(action: argparse.Action) -> argparse.Action:
    """Mark a flag as one a resumed run may change: how long it runs, where and how fast it computes, what it
    prints, and the meta-test-only flags. Every other setting stored in ``resume.pth`` must match on ``--resume``
    (another backbone, way, learning rate, ... is an error, never a silent mix of two runs)."""
    action.resume_may_differ = True  # type: ignore[attr-defined]
    return action


def resume_may_differ() -> frozenset[str]:
    """The settings a resumed run may change: the flags marked with :func:`flex`, ``recipe_source`` and the number of
    processes (``world_size``; pre-train checks it itself, its global batch depends on it)."""
    return frozenset(a.dest for a in build_parser()._actions if getattr(a, "resume_may_differ", False)) | {
        "recipe_source", "world_size", "pre_global_batch"}  # (pre-train's world size: trainer.pre.check_resume)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Meta-Transfer Learning (Sun et al., CVPR 2019): pre-train, meta-train, meta-test.")
    a = p.add_argument

    g = p.add_argument_group("official PyTorch flags (same names, defaults and meanings)")
    a = g.add_argument
    a("--model_type", default="ResNet", choices=["ResNet"], help=argparse.SUPPRESS)  # official scripts pass it
    a("--dataset", default="miniImageNet", choices=DATASETS,
      help="dataset name (log folder names) and preset: the benchmark to read where --dataset_dir holds several "
           "(FC100 or CIFAR-FS from cifar-100-python); printed in the run header")
    a("--phase", default="meta_train", choices=PHASES)
    a("--seed", type=seed_int, default=0,
      help=f"0 = draw a random seed (printed and stored); N in 1..{SEED_MAX} = fully seeded run")
    flex(a("--gpu", type=gpu_list, default=None,
           help="CUDA_VISIBLE_DEVICES to set: GPU indices (0 or 0,1) or UUIDs (default, or empty: leave it alone)"))
    a("--dataset_dir", type=path_text, default="./data/mini/",
      help="root with train/ val/ test/ class folders, a .npz pack (e.g. data/glyphs100.npz), or the benchmark "
           "files of MetaOptNet/RFS, learn2learn, tieredImageNet, Ravi csv or cifar-100-python (detected; "
           "docs/DATA.md)")
    flex(a("--max_epoch", type=positive_int, default=100, help="meta-train epochs"))
    a("--num_batch", type=positive_int, default=100, help="meta-batches (outer updates) per meta-train epoch")
    a("--shot", type=positive_int, default=1)
    a("--way", type=positive_int, default=5)
    a("--train_query", type=positive_int, default=15, help="queries per class in meta-train")
    a("--val_query", type=positive_int, default=15, help="queries per class in validation and test")
    a("--meta_lr1", type=positive_float, default=1e-4, help="Adam lr of the SS parameters and BN affine")
    a("--meta_lr2", type=positive_float, default=1e-3, help="Adam lr of the base learner's initialisation")
    a("--base_lr", type=positive_float, default=0.01, help="inner-loop (base learner) SGD step, Eq. 3")
    a("--update_step", type=positive_int, default=50, help="inner-loop steps in meta-train and validation")
    a("--step_size", type=positive_int, default=10, help="meta lr decays every step_size epochs")
    a("--gamma", type=positive_float, default=0.5, help="meta lr decay factor")
    a("--init_weights", type=path_text, default=None,
      help="pre-trained encoder checkpoint for meta_train ('scratch': a random backbone, the no-pre-training ablation)")
    flex(a("--eval_weights", type=path_text, default=None, nargs="+",
           help="checkpoint to meta-test (meta, or pre = fine-tuned-head baseline); --phase compare: two or more, "
                "each PATH or PATH:HEAD (a head of --eval_classifier's choices), scored on the same episodes"))
    a("--meta_label", type=label_text, default="exp1", help="suffix of the meta-train log folder")
    flex(a("--pre_max_epoch", type=positive_int, default=100))
    a("--pre_batch_size", type=positive_int, default=128)
    a("--pre_lr", type=positive_float, default=0.1)
    a("--pre_gamma", type=positive_float, default=0.2)
    a("--pre_step_size", type=positive_int, default=30, help="pre-train lr decays every pre_step_size epochs")
    a("--pre_custom_momentum", type=momentum, default=0.9, help="SGD (Nesterov) momentum")
    a("--pre_custom_weight_decay", type=nonneg_float, default=5e-4)

    g = p.add_argument_group("model and data")
    a = g.add_argument
    flex(a("--recipe", default=None, choices=sorted(RECIPES),
      help="preset defaults (see the README table). Default: follows --backbone (" +
           ", ".join(f"{b} -> {r}" for b, r in BACKBONE_RECIPE.items()) +
           "); with neither flag: pytorch (the official PyTorch code, resnet25). With pytorch, the ResNet-12 "
           "backbones pre-train at --pre_lr 0.01 (their unnormalised shortcuts diverge at 0.1)"))
    a("--backbone", default="resnet25", choices=list(BACKBONE_RECIPE),
      help="encoder (default: the recipe's; resnet25 = official PyTorch, resnet12 = paper / TF)")
    a("--image_size", type=image_px, default=80, help="network input size in pixels")
    a("--preprocess", default="pytorch", choices=["pytorch", "paper"],
      help="pytorch: resize to 92/80 of the size, centre crop, CIFAR mean/std; paper: /255 only")
    a("--bn_mode", default="pytorch", choices=list(BN_MODES),
      help="BatchNorm in every phase. pytorch: learned scale/shift, running statistics at test time; tf: the official "
           "TF code's (no scale, shift 0, eps 1e-3, batch statistics at train AND test, conv biases before BN; "
           "evaluation then runs episode by episode). TF .npy weights need tf")
    a("--pre_train_dir", type=path_text, default=None, help="pre-train images (default: <dataset_dir>/train)")
    a("--meta_train_dir", type=path_text, default=None, help="meta-train images (default: <dataset_dir>/train)")
    a("--meta_val_dir", type=path_text, default=None, help="validation images (default: <dataset_dir>/val)")
    flex(a("--meta_test_dir", type=path_text, default=None, help="test images (default: <dataset_dir>/test)"))
    flex(a("--cache_dir", type=path_text, default=None,
           help="decoded-image cache (default: <log_root>/cache; 'none' disables)"))
    flex(a("--num_workers", type=nonneg_int, default=0, help="processes that decode images into the cache"))
    flex(a("--allow_split_overlap", action="store_true",
           help="run even when two splits share class names or identical images (a warning instead of the error; "
                "docs/DATA.md, split hygiene)"))

    g = p.add_argument_group("pre-train")
    a = g.add_argument
    a("--pre_optimizer", default="sgd", choices=["sgd", "adam"])
    a("--pre_head", default="mlp", choices=["mlp", "linear"],
      help="classifier head: mlp (official PyTorch, 1000 hidden) or linear (paper / TF)")
    a("--pre_dropout_keep", type=keep_rate, default=1.0, help="dropout keep rate after each block (resnet12)")
    a("--pre_augment", default="on", choices=["on", "off"], help="train-time augmentation of --preprocess")
    a("--pre_iters_per_epoch", type=nonneg_int, default=0,
      help="iterations per pre-train epoch; 0 = one pass over the training images (official)")
    flex(a("--pre_save_every", type=positive_int, default=10, help="keep epoch<N>.pth every N epochs"))
    a("--pre_init_epoch", type=nonneg_int, default=0,
      help="meta-train starts from pre-train epoch<N>.pth; 0 = the best by validation (max_acc.pth)")
    a("--pre_label", type=label_text, default="", help="extra label of the pre-train log folder")
    a("--pre_val_update_step", type=positive_int, default=100, help="head fine-tuning steps in pre-train val")
    a("--pre_val_base_lr", type=positive_float, default=0.01, help="head fine-tuning lr in pre-train val")
    a("--sync_bn", action="store_true",
      help="torchrun: train-mode BatchNorm uses the statistics of the global batch (all processes), so a run on N "
           "processes computes what one process with the same global batch computes")

    g = p.add_argument_group("meta-train and meta-test")
    a = g.add_argument
    a("--meta_batch_size", type=positive_int, default=1, help="tasks per outer update (official PyTorch: 1)")
    a("--meta_lr_min", type=nonneg_float, default=0.0,
      help="floor of meta_lr1 (meta_lr2 floored in proportion); at most --meta_lr1")
    order = g.add_mutually_exclusive_group()  # the two name one setting: both given is an error, not "last wins"
    order.add_argument("--second_order", action="store_true", help="differentiate through the inner loop")
    order.add_argument("--first_order", dest="second_order", action="store_false", help="official first-order update")
    a("--shortcut_ss", default="on", choices=["on", "off"],
      help="SS on the 1x1 shortcut convs: on (official PyTorch: every conv) or off (TF: the shortcut has none)")
    a("--inner_loss", default="mean", choices=["mean", "sum"],
      help="inner-loop loss: mean CE (official PyTorch) or sum CE / shot (TF; = way x mean)")
    flex(a("--test_update_step", type=positive_int, default=None, help="inner steps at meta-test (default update_step)"))
    flex(a("--test_query", type=query_count, default=None,
           help="queries per class at meta-test: a number, or 'shot' (the TF protocol: as many as --shot). "
                "Default: --val_query"))
    flex(a("--test_flip_support", action="store_true",
           help="meta-test: each support image and its horizontal flip are both in the support set (TF "
                "base_augmentation)"))
    a("--num_val_episodes", type=positive_int, default=600)
    flex(a("--num_test_episodes", type=positive_int, default=600))
    a("--eval_seed", type=seed_int, default=1, help=f"seed of the fixed validation / test episodes (0..{SEED_MAX})")
    a("--eval_mode", default="bank", choices=["bank", "episodic"],
      help="bank: encode each image once, batch all episodes (exact, fast); episodic: one episode at a time")
    flex(a("--eval_classifier", default="finetune", choices=list(HEADS),
      help="the few-shot head of meta-test (models/heads.py HEADS): finetune = the base learner's inner loop; "
           "centroid = nearest class mean of the features"))
    a("--hard_task", action="store_true", help="hard-task (HT) meta-batch, paper Alg. 1")
    a("--ht_normal_tasks", type=positive_int, default=None,
      help="normal tasks per meta-batch that feed the failure-class record (default: --meta_batch_size)")
    a("--ht_hard_tasks", type=nonneg_int, default=1, help="hard tasks per meta-batch")
    a("--ht_update", default="separate", choices=["separate", "shared"],
      help="separate: one outer update per hard task; shared: hard tasks join the meta-batch's update")
    a("--ht_start_epoch", type=positive_int, default=1, help="epoch from which hard tasks are used")

    # issue 22 (one block): your own images. --eval_weights names the model; --eval_classifier, --test_update_step,
    # --base_lr, --inner_loss, --test_flip_support, --eval_seed and --eval_batch_size apply as at meta-test.
    g = p.add_argument_group("predict and embed (your own images; README 'Few-shot on your own images')")
    a = _flexible(g.add_argument)
    a("--support", type=path_text, default=None,
      help="predict: a folder of class folders, <support>/<class>/<image> (1 or more images each, any size or format)")
    a("--query", type=path_text, default=None,
      help="predict / embed: a folder of images (searched recursively; in class folders named like the support's, "
           "the accuracy is reported too) or one image")
    a("--out", type=path_text, default=None,
      help="predict: the folder of predictions.csv/.json/.png (default <log_root>/predict/<query name>); embed: the "
           ".npz file (default <log_root>/embed/<name>.npz)")

    g = p.add_argument_group("run control")  # every flag of this group may change on --resume
    a = _flexible(g.add_argument)
    a("--log_root", type=path_text, default="./logs", help="all checkpoints, logs and results go under this folder")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    again = _flexible(g.add_mutually_exclusive_group().add_argument)  # continue, or move aside: not both
    again("--resume", action="store_true", help="continue the run in its log folder from its last checkpoint")
    again("--overwrite", action="store_true",
          help="start afresh in a log folder that holds an earlier run: that run is moved to <folder>.old-<time>")
    a("--deterministic", action="store_true", help="deterministic CUDA kernels (slower); CPU runs are already")
    a("--amp", action="store_true",
      help="bfloat16 autocast of the encoder (inner loop and losses stay float32), on CUDA and on a CPU with native "
           "bfloat16 (avx512_bf16 / amx_bf16); on a CPU without it, one line says so and the run is float32 "
           "(default float32)")
    a("--amp_dtype", default="auto", choices=list(AMP_DTYPES),
      help="with --amp: auto = bfloat16 where native, else float32; bfloat16 = bfloat16 even where the CPU emulates "
           "it (slower than float32; to measure the accuracy cost)")
    a("--channels_last", action="store_true", help="channels_last memory format on CUDA")
    a("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    a("--eval_batch_size", type=positive_int, default=256, help="images per batch when encoding a split")
    a("--quiet", action="store_true", help="no progress bars")
    a("--dist_timeout", type=timeout_seconds, default=600.0,
      help="torchrun: seconds a process waits for the others at a collective before the run stops with an error")
    a("--stop_after_epoch", type=nonneg_int, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def resolve_recipe(recipe: str | None, backbone: str | None) -> tuple[str, str]:
    """``(recipe, source)``: the explicit ``--recipe``; else the one of the explicit ``--backbone``
    (:data:`BACKBONE_RECIPE`); else ``pytorch``. ``source`` says which (``--recipe``, ``--backbone``, ``default``)."""
    if recipe is not None:
        return recipe, "--recipe"
    if backbone is not None:
        return BACKBONE_RECIPE[backbone], "--backbone"
    return "pytorch", "default"


def recipe_defaults(recipe: str, backbone: str) -> dict[str, object]:
    """The defaults a recipe sets for a backbone: :data:`RECIPES` plus :data:`RECIPE_BACKBONE_OVERRIDES`."""
    return {**RECIPES[recipe], **RECIPE_BACKBONE_OVERRIDES.get((recipe, backbone), {})}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the recipe's defaults applied first; explicit flags always win.

    The recipe is resolved by :func:`resolve_recipe` and stored as ``args.recipe`` with ``args.recipe_source``.
    """
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    explicit = _given(argv)
    recipe, source = resolve_recipe(getattr(known, "recipe") if "recipe" in explicit else None,
                                    known.backbone if "backbone" in explicit else None)
    backbone = known.backbone if "backbone" in explicit else str(RECIPES[recipe].get("backbone", known.backbone))
    parser.set_defaults(**recipe_defaults(recipe, backbone), recipe=recipe)
    args = parser.parse_args(argv)
    args.recipe_source = source
    args._explicit = explicit  # (not a setting: settings_dict leaves it out)
    if args.eval_weights is not None and args.phase != "compare":  # one checkpoint, a str, outside compare
        if len(args.eval_weights) > 1:
            parser.exit(2, f"error: --eval_weights names one checkpoint in --phase {args.phase}, got "
                           f"{len(args.eval_weights)} ({' '.join(args.eval_weights)}); several are compared by "
                           "--phase compare\n")
        args.eval_weights = args.eval_weights[0]
    if args.test_update_step is None:
        args.test_update_step = args.update_step
    if args.test_query is None:
        args.test_query = args.val_query
    elif args.test_query == "shot":
        args.test_query = args.shot
    return args


_UNSET = object()


def _given(argv: Sequence[str] | None) -> frozenset[str]:
    """The destinations of the flags ``argv`` gives explicitly: parsed with every default replaced by a marker, a
    destination that no longer holds it was set on the command line (``--first_order`` counts as ``second_order``)."""
    probe = build_parser()
    probe.set_defaults(**{a.dest: _UNSET for a in probe._actions if a.default is not argparse.SUPPRESS})
    given, _ = probe.parse_known_args(argv)
    return frozenset(k for k, v in vars(given).items() if v is not _UNSET)


def explicit_flags(source: "argparse.Namespace | Sequence[str] | None" = None) -> frozenset[str]:
    """The settings (``dest`` names, e.g. ``"backbone"``) given on the command line, as opposed to a default or a
    recipe's preset. ``source``: a namespace made by :func:`parse_args` (which records them), or the ``argv`` itself
    (for ``main.check_args`` and ``run_experiment.py``; call it after :func:`parse_args` accepted ``argv``). A
    namespace not made by :func:`parse_args` counts every setting as given."""
    if isinstance(source, argparse.Namespace):
        given = getattr(source, "_explicit", None)
        return given if given is not None else frozenset(k for k in vars(source) if not k.startswith("_"))
    return _given(source)


def describe_recipe(args: argparse.Namespace) -> str:
    """One line for the run's header: the recipe and why it was chosen."""
    why = {"--recipe": "given by --recipe", "--backbone": f"follows --backbone {args.backbone}",
           "default": "main.py's default"}[getattr(args, "recipe_source", "--recipe")]
    extra = RECIPE_BACKBONE_OVERRIDES.get((args.recipe, args.backbone))
    tail = "" if not extra else "; for this backbone " + ", ".join(f"--{k} {v}" for k, v in extra.items())
    return f"recipe {args.recipe} ({why}{tail}; flags given on the command line win)"


def describe_dataset(args: argparse.Namespace) -> str:
    """One line for the run's header: the --dataset preset (what the official code fixes for it)."""
    preset = DATASET_PRESETS.get(args.dataset)
    if preset is None:
        return f"dataset {args.dataset} (no preset; classes and sizes read from the data)"
    stored = int(round(args.image_size * 92 / 80)) if args.preprocess == "pytorch" else args.image_size
    official = OFFICIAL_INPUT[args.preprocess]
    how = (f"stored at {stored} px, centre crop {args.image_size}" if args.preprocess == "pytorch"
           else f"stored at {stored} px")
    px = preset["px"]
    resize = f"{px}-px images {'upsampled' if stored > px else 'resized'}" if stored != px else f"{px}-px images"
    note = "" if args.image_size == official else f"; the official {args.preprocess} input is {official}"
    tr, va, te = preset["classes"]
    return (f"dataset {args.dataset} preset: {resize}, {how} (--preprocess {args.preprocess}{note}); "
            f"published split {tr}/{va}/{te} classes; pre-train classes read from the data")


def settings_dict(args: argparse.Namespace) -> dict:
    """The settings as a plain dict (stored in checkpoints and results files); ``_``-names are bookkeeping, not
    settings."""
    return {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")}
