"""Typed settings, built once from the parsed flags (``config/options.py``) and passed whole to the trainers.

The data flow is ``run_experiment.py -> main.py -> settings -> trainer -> (sampler, model, head, evaluation)``:
``main.py`` parses the flags and calls :meth:`Settings.from_args`; the trainers read **only** typed settings (no raw
flag: ``tests/trainer/test_typed_settings.py`` checks their source), and every component below the trainer receives
the typed piece it needs, whole:

* the library's own types, defined where they are used: :class:`models.heads.InnerLoop` (Eq. 3),
  :class:`models.evaluate.EvalSettings` (one evaluation), :class:`data_generator.hard_tasks.HardTaskSettings`
  (Alg. 1), :class:`models.spec.ModelSpec` / :class:`models.spec.Expect` (the model, and what the flags say of a
  checkpoint's);
* this module's, which only the trainers and the entry points read: :class:`Runtime` (how the run computes, prints,
  and treats an earlier run: the "run control" flags), :class:`PreTrainSettings` / :class:`MetaTrainSettings` (each
  phase's optimizer, schedule, batches, epochs), :class:`ModelSettings` (the model flags, and the specs built from
  them), :class:`DataSettings` (the splits), :class:`RunPaths` (the log folder layout).

``Settings.args`` is the flat record of the flags only: what checkpoints, ``args.json`` and ``results.json`` store
(:meth:`Settings.record`) and what a ``--resume`` compares with the stored run (:meth:`Settings.check_resume`).
``run_experiment.py`` and the tools reuse these definitions (log folders, checkpoint paths) instead of copies.

This module sits above ``models`` and ``data_generator`` and below ``trainer`` (``tests/test_layering.py``): it builds
the library's types, and reads checkpoints (``models.loading``) for :func:`model_flags_from_checkpoint`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from typing import Any

from data_generator.hard_tasks import HardTaskSettings
from models.evaluate import EvalSettings
from models.heads import InnerLoop, inner_loss_scale
from models.loading import check_weights_path, read_weights
from models.spec import Expect, ModelSpec
from utils.errors import UserError
from utils.gpu_tools import amp_mode

from config.options import explicit_flags, resume_may_differ, settings_dict

__all__ = ["Runtime", "PreTrainSettings", "MetaTrainSettings", "ModelSettings", "RunPaths", "DataSettings",
           "Settings", "eval_checkpoint", "model_flags_from_checkpoint", "PredictSettings"]


@dataclass(frozen=True)
class Runtime:
    """How the run computes and what it prints, and what it does with an earlier run in its folder: the "run
    control" flags (``config/options.py``), each of which may change on ``--resume``. (The device request,
    ``--gpu`` and ``--dist_timeout`` are used by ``main.py`` before the settings exist: it hands the trainers the
    device it picked. There is no thread flag: torch's default, or ``OMP_NUM_THREADS``.)"""

    amp: str = "off"             # --amp / --amp_dtype as utils.gpu_tools.amp_mode: off | auto | bfloat16 (every path)
    channels_last: bool = False  # --channels_last (CUDA)
    compile: bool = False        # --compile: torch.compile the encoder of the training step (CUDA)
    deterministic: bool = False  # --deterministic CUDA kernels
    progress: bool = True        # progress bars (not --quiet; ranks other than 0 are quiet)
    resume: bool = False         # --resume: continue the run in the folder
    overwrite: bool = False      # --overwrite: move an earlier run aside and start afresh
    stop_after_epoch: int = 0    # (tests) stop after this epoch, as a kill would


@dataclass(frozen=True)
class PreTrainSettings:
    """Pre-training's optimizer, schedule and batches (paper Sec. 4.1; the flags ``--pre_*``)."""

    epochs: int           # --pre_max_epoch
    batch_size: int       # --pre_batch_size, per process (the global batch is this times the number of processes)
    iters_per_epoch: int  # --pre_iters_per_epoch; 0 = one pass over the training images
    optimizer: str        # --pre_optimizer: sgd (Nesterov) | adam
    lr: float             # --pre_lr
    momentum: float       # --pre_custom_momentum (SGD)
    weight_decay: float   # --pre_custom_weight_decay
    step_size: int        # --pre_step_size: the lr is multiplied by gamma every step_size epochs
    gamma: float          # --pre_gamma
    save_every: int       # --pre_save_every: keep epoch<N>.pth every N epochs
    sync_bn: bool         # --sync_bn: BatchNorm on the statistics of the global batch (torchrun)


@dataclass(frozen=True)
class MetaTrainSettings:
    """Meta-training's tasks, optimizer, schedule and start (paper Alg. 1-2, Eq. 3-5)."""

    epochs: int                # --max_epoch
    iterations: int            # --num_batch: meta-batches (outer updates) per epoch
    meta_batch: int            # --meta_batch_size: tasks per outer update
    way: int                   # --way
    shot: int                  # --shot
    query: int                 # --train_query: queries per class
    inner: InnerLoop           # Eq. 3 (--update_step, --base_lr, --inner_loss, --second_order)
    lr1: float                 # --meta_lr1: Adam on the SS parameters and BN affine (Eq. 4)
    lr2: float                 # --meta_lr2: Adam on the base learner's initialisation (Eq. 5)
    step_size: int             # --step_size: both lrs are multiplied by gamma every step_size epochs
    gamma: float               # --gamma
    lr_min: float              # --meta_lr_min: the floor of lr1 (lr2 floored in proportion)
    init_weights: str | None   # --init_weights: a checkpoint, "scratch", or None (the pre-train run's)
    init_epoch: int            # --pre_init_epoch: the pre-train snapshot to start from (0 = max_acc.pth)


@dataclass(frozen=True)
class ModelSettings:
    """The model flags; :meth:`pre_spec` / :meth:`meta_spec` are the specs the trainers build their models from and
    write into every checkpoint (``models/spec.py``), :meth:`expect` what a checkpoint read for this run must be."""

    backbone: str         # --backbone
    bn_mode: str          # --bn_mode
    way: int              # --way: the base learner's classes
    shortcut_ss: bool     # --shortcut_ss on
    pre_head: str         # --pre_head
    dropout_keep: float   # --pre_dropout_keep (pre-train)
    image_size: int       # --image_size
    preprocess: str       # --preprocess

    def pre_spec(self, num_classes: int) -> ModelSpec:
        """The pre-train model over ``num_classes`` base classes (read from the data), with its input."""
        return ModelSpec(kind="pre", backbone=self.backbone, bn_mode=self.bn_mode,
                         backbone_kwargs={"dropout_keep": float(self.dropout_keep)}, pre_head=self.pre_head,
                         num_classes=num_classes, image_size=self.image_size, preprocess=self.preprocess)

    def meta_spec(self) -> ModelSpec:
        """The meta model (SS encoder + ``way``-way base learner), with its input."""
        return ModelSpec(kind="meta", backbone=self.backbone, bn_mode=self.bn_mode, way=self.way,
                         shortcut_ss=self.shortcut_ss, image_size=self.image_size, preprocess=self.preprocess)

    def expect(self) -> Expect:
        """What a checkpoint this run reads must be: its backbone, BatchNorm mode and way (``ModelSpec.check``)."""
        return Expect(self.backbone, self.bn_mode, self.way)


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


def eval_checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint ``meta_eval`` tests: ``--eval_weights``, else the meta run's best (``max_acc.pth``)."""
    return args.eval_weights or RunPaths.from_args(args).meta_checkpoint


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, built once by :meth:`from_args`; ``args`` is only the record (module docstring)."""

    args: argparse.Namespace
    seed: int                  # --seed as resolved by main.py (0 on --resume: the stored run's, check_resume)
    run: Runtime
    paths: RunPaths
    data: DataSettings
    model: ModelSettings
    pre_train: PreTrainSettings
    meta_train: MetaTrainSettings
    pre_val: EvalSettings
    meta_val: EvalSettings
    test: EvalSettings
    hard: HardTaskSettings | None
    eval_weights: str | None   # --eval_weights as given (meta_eval)
    eval_checkpoint: str       # what meta_eval tests (eval_checkpoint)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        scale = inner_loss_scale(args.inner_loss, args.way)
        flip = bool(getattr(args, "test_flip_support", False))
        # --bn_mode tf: a feature depends on its batch, so no feature bank; each episode's support and query are
        # encoded as their own batches, as in the TF graph (models/bn_mode.py)
        mode = "episodic" if getattr(args, "bn_mode", "pytorch") == "tf" else args.eval_mode
        amp = amp_mode(args.amp, getattr(args, "amp_dtype", "auto"))  # the one source: every phase and path
        run = Runtime(amp=amp, channels_last=bool(args.channels_last), compile=bool(args.compile),
                      deterministic=bool(args.deterministic), progress=not args.quiet, resume=bool(args.resume),
                      overwrite=bool(args.overwrite), stop_after_epoch=args.stop_after_epoch)
        common = dict(way=args.way, shot=args.shot, seed=args.eval_seed, mode=mode,
                      batch_size=args.eval_batch_size, amp=amp, progress=run.progress)
        val = dict(common, query=args.val_query, episodes=args.num_val_episodes)
        test_query = getattr(args, "test_query", None) or args.val_query
        inner_train = InnerLoop(args.update_step, args.base_lr, scale, bool(args.second_order),
                                flags=("--update_step", "--base_lr"))
        return cls(
            args=args, seed=args.seed, run=run, paths=RunPaths.from_args(args), data=DataSettings.from_args(args),
            model=ModelSettings(args.backbone, args.bn_mode, args.way, args.shortcut_ss == "on", args.pre_head,
                                args.pre_dropout_keep, args.image_size, args.preprocess),
            pre_train=PreTrainSettings(
                args.pre_max_epoch, args.pre_batch_size, args.pre_iters_per_epoch, args.pre_optimizer, args.pre_lr,
                args.pre_custom_momentum, args.pre_custom_weight_decay, args.pre_step_size, args.pre_gamma,
                args.pre_save_every, bool(args.sync_bn)),
            meta_train=MetaTrainSettings(
                args.max_epoch, args.num_batch, args.meta_batch_size, args.way, args.shot, args.train_query,
                inner_train, args.meta_lr1, args.meta_lr2, args.step_size, args.gamma, args.meta_lr_min,
                args.init_weights, args.pre_init_epoch),
            pre_val=EvalSettings(**val, phase="pre-train validation",
                                 inner=InnerLoop(args.pre_val_update_step, args.pre_val_base_lr,
                                                 flags=("--pre_val_update_step", "--pre_val_base_lr"))),
            meta_val=EvalSettings(**val, phase="meta-validation", inner=replace(inner_train, second_order=False)),
            test=EvalSettings(**common, query=test_query, episodes=args.num_test_episodes,
                              classifier=args.eval_classifier, flip_support=flip, phase="meta-test",
                              inner=InnerLoop(args.test_update_step, args.base_lr,
                                              inner_loss_scale(args.inner_loss, args.way, 2 if flip else 1),
                                              flags=("--test_update_step", "--base_lr"))),
            hard=HardTaskSettings(args.way, args.shot, args.train_query, args.ht_normal_tasks or args.meta_batch_size,
                                  args.ht_hard_tasks, args.ht_update, args.ht_start_epoch, args.seed)
            if args.hard_task else None,
            eval_weights=args.eval_weights, eval_checkpoint=eval_checkpoint(args))

    # ----------------------------------------------------------------------------------- the record of the flags
    def record(self) -> dict[str, Any]:
        """The flags as a plain dict: what checkpoints, ``args.json`` and ``results.json`` store."""
        return settings_dict(self.args)

    def check_resume(self, stored: dict[str, Any], log_dir: str) -> "Settings":
        """``--resume``: every setting ``stored`` in the run's ``resume.pth`` must be this run's, but those that may
        change (:func:`config.options.resume_may_differ`); one line names the first that differs. With ``--seed 0``
        the run goes on with the seed it drew and stored: it is taken into the record, and the settings returned
        carry it (the streams it seeded are restored from ``resume.pth``)."""
        args = self.args
        if args.seed == 0 and "seed" in stored:
            args.seed = stored["seed"]
        may_differ = resume_may_differ()
        for k in sorted(stored):
            if k in may_differ or not hasattr(args, k):
                continue
            if stored[k] != getattr(args, k):
                raise UserError(f"--resume: the run in {log_dir} was started with --{k} {stored[k]}, "
                                f"not {getattr(args, k)}; use the same settings or another log folder")
        return replace(self, seed=args.seed)


# ------------------------------------------------------------------------------ meta-test: the model flags from a file
def model_flags_from_checkpoint(args: argparse.Namespace, skip: frozenset[str] = frozenset()) -> list[str]:
    """Meta-test: the model flags the command line left out (``--backbone``, ``--bn_mode``, ``--way``,
    ``--image_size``, ``--preprocess``) are set on ``args`` from the checkpoint's spec, before the settings are built
    (``main.py``, the ``meta_eval`` phase's preparation); a flag given that disagrees is one line (E11, E31, E58,
    E140; TF: E56, E57), and a given input size or preprocessing other than the one the model was trained on a
    ``warning:`` line. Without ``--eval_weights`` the checkpoint is found by the run folder, whose name holds
    ``--backbone`` and ``--way``: those two are then checked, not set. Returns the lines to print after the run's
    header: the warnings, and the one that says what the checkpoint set (none when nothing differed, or no
    checkpoint is there: ``meta_eval`` says so).

    Which flags were given is :func:`config.options.explicit_flags`; a namespace built otherwise counts every flag as
    given (only checked). ``skip``: model flags neither taken nor checked (``--phase predict`` reads its way from the
    support folder, so a 5-way checkpoint classifies a 3-class support)."""
    path = eval_checkpoint(args)
    if args.eval_weights:
        check_weights_path(path, "--eval_weights")  # (a missing file, or a run folder given as weights: E124, E125)
    if not (os.path.isfile(path) or os.path.isdir(path)):
        return []
    given = explicit_flags(args)
    if not args.eval_weights:
        given = given | {"backbone", "way"}
    spec = read_weights(path, Expect.from_args(args, only=given - skip)).spec
    taken = {"backbone": spec.backbone, "bn_mode": spec.bn_mode, "way": spec.way, "image_size": spec.image_size,
             "preprocess": spec.preprocess}
    taken = {k: v for k, v in taken.items() if k not in skip}
    changed, lines = [], []
    for flag, value in taken.items():
        if value is None:  # the file does not say (a pre checkpoint's way, the input of a file from other code)
            continue
        if flag in given:
            if flag in ("image_size", "preprocess") and getattr(args, flag) != value:
                lines.append(f"warning: {path} was trained with --{flag} {value}; it is evaluated with --{flag} "
                             f"{getattr(args, flag)} as given")
            continue
        if getattr(args, flag) != value:
            changed.append(f"--{flag} {value}")
            setattr(args, flag, value)
    if changed:
        lines.append(f"the checkpoint sets {' '.join(changed)} ({spec.describe()})")
    return lines


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
        given = getattr(args, "_explicit", None)  # (config.options.explicit_flags; None: every flag counts as given)
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
