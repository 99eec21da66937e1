"""Typed settings, built once from the parsed flags (``utils/options.py``) and passed to the trainers and evaluation.

The data flow is ``run_experiment.py -> main.py -> settings -> trainer -> (sampler, model, evaluation)``: ``main.py``
parses the flags and calls :meth:`Settings.from_args`; every component below the trainer receives only the typed
piece it needs (:class:`InnerLoop` for Eq. 3, :class:`EvalSettings` for an evaluation, :class:`RunPaths` for the
folder layout, :class:`DataSettings` for the splits, :class:`HardTaskSettings` for Alg. 1). ``run_experiment.py`` and
the tools reuse these definitions (log folders, checkpoint paths, the inner loop) instead of copies.

``Settings.args`` keeps the flat namespace for what is only a number handed to an optimizer or a schedule, and as
the record that checkpoints, ``args.json`` and ``results.json`` store (:func:`utils.options.settings_dict`).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from utils.gpu_tools import amp_mode

__all__ = ["InnerLoop", "EvalSettings", "RunPaths", "DataSettings", "HardTaskSettings", "Settings",
           "inner_loss_scale", "PredictSettings"]


def inner_loss_scale(inner_loss: str, way: int, support_copies: int = 1) -> float:
    """``mean``: mean CE over the support (official PyTorch). ``sum``: TF's per-sample CE / shot summed over the
    support (``tensorflow/utils/misc.py xent``), i.e. ``way`` times the mean; with the flipped support
    (``--test_flip_support``, ``support_copies = 2``) the TF sum runs over twice the images, still divided by shot
    (``xent`` divides by ``FLAGS.shot_num``, ``tensorflow/utils/misc.py`` L302-311), i.e. ``2 * way`` times the mean."""
    if inner_loss not in ("mean", "sum"):
        raise ValueError(f"inner_loss must be 'mean' or 'sum', got {inner_loss!r}")
    return float(way * support_copies) if inner_loss == "sum" else 1.0


@dataclass(frozen=True)
class InnerLoop:
    """The base learner's inner loop, paper Eq. 3: ``steps`` SGD steps at ``lr`` on ``loss_scale * mean CE``;
    ``second_order`` differentiates the outer loss through it (TF) instead of first order (official PyTorch)."""

    steps: int
    lr: float
    loss_scale: float = 1.0
    second_order: bool = False
    flags: tuple[str, str] = ("", "")  # the flags that set (steps, lr), named in the messages of non-finite values

    def hint(self) -> str:
        """``'--base_lr (set to 0.01) or --test_update_step (set to 100)'``: what to lower when it overflows."""
        steps, lr = self.flags
        if not lr:
            return "the inner loop's step size or number of steps"
        return f"{lr} (set to {self.lr:g}) or {steps} (set to {self.steps})"


@dataclass(frozen=True)
class EvalSettings:
    """One few-shot evaluation (pre-train validation, meta-validation, meta-test): ``episodes`` fixed episodes of
    ``way`` x (``shot`` + ``query``) drawn with ``seed``; ``mode`` bank | episodic; ``classifier`` finetune (the
    inner loop) | centroid (nearest class mean); ``flip_support``: the support set also holds each support image's
    horizontal flip (the TF test protocol's ``base_augmentation``)."""

    way: int
    shot: int
    query: int
    episodes: int
    seed: int
    inner: InnerLoop
    mode: str = "bank"
    classifier: str = "finetune"
    batch_size: int = 256
    amp: bool | str = False  # utils.gpu_tools.amp_mode: off | auto | bfloat16 (a bool: --amp alone)
    progress: bool = False
    flip_support: bool = False
    phase: str = "evaluation"  # named in messages: pre-train validation, meta-validation, meta-test


@dataclass(frozen=True)
class RunPaths:
    """The folder layout of a run under ``log_root``: ``pre/<dataset>_<backbone>[_<pre_label>]`` and
    ``meta/<dataset>_<backbone>_<W>way<S>shot[_HT]_<meta_label>``."""

    log_root: str
    dataset: str
    backbone: str
    way: int = 5
    shot: int = 1
    pre_label: str = ""
    meta_label: str = "exp1"
    hard_task: bool = False

    @property
    def pre_dir(self) -> str:
        label = f"_{self.pre_label}" if self.pre_label else ""
        return os.path.join(self.log_root, "pre", f"{self.dataset}_{self.backbone}{label}")

    @property
    def meta_dir(self) -> str:
        ht = "_HT" if self.hard_task else ""
        return os.path.join(self.log_root, "meta",
                            f"{self.dataset}_{self.backbone}_{self.way}way{self.shot}shot{ht}_{self.meta_label}")

    def pre_checkpoint(self, init_epoch: int = 0) -> str:
        """The pre-train checkpoint a meta run starts from: ``epoch<N>.pth``, or ``max_acc.pth`` for N = 0."""
        return os.path.join(self.pre_dir, f"epoch{init_epoch}.pth" if init_epoch else "max_acc.pth")

    @property
    def meta_checkpoint(self) -> str:
        """The meta run's best checkpoint (what ``meta_eval`` tests by default)."""
        return os.path.join(self.meta_dir, "max_acc.pth")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunPaths":
        return cls(args.log_root, args.dataset, args.backbone, args.way, args.shot, args.pre_label, args.meta_label,
                   bool(args.hard_task))


@dataclass(frozen=True)
class DataSettings:
    """Where the splits are and how images are stored and transformed (``trainer.base.DataBundle``)."""

    dataset_dir: str
    image_size: int
    preprocess: str
    augment: bool
    cache_dir: str | None
    num_workers: int = 0
    pre_train_dir: str | None = None
    meta_train_dir: str | None = None
    meta_val_dir: str | None = None
    meta_test_dir: str | None = None
    dataset: str | None = None  # the --dataset preset: picks FC100 / CIFAR-FS in cifar-100-python (formats.py)
    allow_split_overlap: bool = False  # --allow_split_overlap: shared classes / images between splits only warn

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataSettings":
        cache = args.cache_dir if args.cache_dir is not None else os.path.join(args.log_root, "cache")
        return cls(args.dataset_dir, args.image_size, args.preprocess, args.pre_augment == "on",
                   None if cache == "none" else cache, args.num_workers, args.pre_train_dir, args.meta_train_dir,
                   args.meta_val_dir, args.meta_test_dir, getattr(args, "dataset", None),
                   bool(getattr(args, "allow_split_overlap", False)))


@dataclass(frozen=True)
class HardTaskSettings:
    """The hard-task meta-batch, paper Alg. 1 (``trainer/hard_tasks.py``)."""

    way: int
    shot: int
    query: int
    normal_tasks: int
    hard_tasks: int
    update: str
    start_epoch: int
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HardTaskSettings":
        return cls(args.way, args.shot, args.train_query, args.ht_normal_tasks or args.meta_batch_size,
                   args.ht_hard_tasks, args.ht_update, args.ht_start_epoch, args.seed)


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, built once by :meth:`from_args`."""

    args: argparse.Namespace
    paths: RunPaths
    data: DataSettings
    inner_train: InnerLoop
    pre_val: EvalSettings
    meta_val: EvalSettings
    test: EvalSettings
    hard: HardTaskSettings | None
    amp: str = "off"  # --amp / --amp_dtype as utils.gpu_tools.amp_mode: off | auto | bfloat16

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        scale = inner_loss_scale(args.inner_loss, args.way)
        flip = bool(getattr(args, "test_flip_support", False))
        # --bn_mode tf: a feature depends on its batch, so no feature bank; each episode's support and query are
        # encoded as their own batches, as in the TF graph (models/bn_mode.py)
        mode = "episodic" if getattr(args, "bn_mode", "pytorch") == "tf" else args.eval_mode
        amp = amp_mode(args.amp, getattr(args, "amp_dtype", "auto"))
        common = dict(way=args.way, shot=args.shot, seed=args.eval_seed, mode=mode,
                      batch_size=args.eval_batch_size, amp=amp, progress=not args.quiet)
        val = dict(common, query=args.val_query, episodes=args.num_val_episodes)
        test_query = getattr(args, "test_query", None) or args.val_query
        return cls(
            args=args, paths=RunPaths.from_args(args), data=DataSettings.from_args(args),
            inner_train=InnerLoop(args.update_step, args.base_lr, scale, bool(args.second_order),
                                  flags=("--update_step", "--base_lr")),
            pre_val=EvalSettings(**val, phase="pre-train validation",
                                 inner=InnerLoop(args.pre_val_update_step, args.pre_val_base_lr,
                                                 flags=("--pre_val_update_step", "--pre_val_base_lr"))),
            meta_val=EvalSettings(**val, phase="meta-validation",
                                  inner=InnerLoop(args.update_step, args.base_lr, scale,
                                                  flags=("--update_step", "--base_lr"))),
            test=EvalSettings(**common, query=test_query, episodes=args.num_test_episodes,
                              classifier=args.eval_classifier, flip_support=flip, phase="meta-test",
                              inner=InnerLoop(args.test_update_step, args.base_lr,
                                              inner_loss_scale(args.inner_loss, args.way, 2 if flip else 1),
                                              flags=("--test_update_step", "--base_lr"))),
            hard=HardTaskSettings.from_args(args) if args.hard_task else None, amp=amp)


# ------------------------------------------------------------------ issue 22: --phase predict / embed (one block)
PREDICT_STEPS = 100  # predict's inner steps unless --test_update_step is given (the paper's meta-test steps)


@dataclass(frozen=True)
class PredictSettings:
    """``--phase predict`` and ``--phase embed`` (``trainer/predict.py``): the checkpoint, the images, the head.

    ``steps``: ``--test_update_step`` when given, else :data:`PREDICT_STEPS` (not ``--update_step``: a prediction
    has no meta-training run whose validation steps it should repeat). ``image_size`` / ``preprocess``: the
    checkpoint's (``main.py`` takes them from its spec, as for ``meta_eval``), or the flags' where it does not record
    them. ``out``: ``--out``, else ``<log_root>/predict/<query name>`` (a folder) or ``<log_root>/embed/<name>.npz``.
    ``dataset_dir``: embed reads the splits of ``--dataset_dir`` when no ``--query`` is given."""

    phase: str
    weights: str
    support: str | None
    query: str | None
    dataset_dir: str | None
    out: str
    classifier: str
    steps: int
    lr: float
    inner_loss: str
    flip_support: bool
    image_size: int
    preprocess: str
    seed: int
    batch_size: int
    amp: str
    progress: bool
    cache_dir: str | None
    num_workers: int = 0
    dataset: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PredictSettings":
        given = getattr(args, "_explicit", None)  # (utils.options.explicit_flags; None: every flag counts as given)
        steps = args.test_update_step if given is None or "test_update_step" in given else PREDICT_STEPS
        source = args.query if args.query is not None or args.phase == "predict" else args.dataset_dir
        name = os.path.splitext(os.path.basename(os.path.normpath(source or "images")))[0] or "images"
        out = args.out or (os.path.join(args.log_root, "predict", name) if args.phase == "predict"
                           else os.path.join(args.log_root, "embed", f"{name}.npz"))
        cache = args.cache_dir if args.cache_dir is not None else os.path.join(args.log_root, "cache")
        return cls(args.phase, args.eval_weights, args.support, args.query,
                   args.dataset_dir if args.query is None else None, out, args.eval_classifier, steps, args.base_lr,
                   args.inner_loss, bool(args.test_flip_support), args.image_size, args.preprocess, args.eval_seed,
                   args.eval_batch_size, amp_mode(args.amp, getattr(args, "amp_dtype", "auto")), not args.quiet,
                   None if cache == "none" else cache, args.num_workers, getattr(args, "dataset", None))
