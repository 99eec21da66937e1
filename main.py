"""Entry point: ``python main.py --phase {pre_train, meta_train, meta_eval, compare, predict, embed} [flags]``.

The flags (all of the official PyTorch ``main.py``'s, plus ours) are defined once in ``config/options.py``; the phases
are :data:`PHASES` (a name -> its runner; adding a phase is one function and its line there, plus its name in
``config.options.PHASES`` with its flags).
Errors caused by input (missing data, bad checkpoints, impossible settings, a full disk) print one ``error: ...``
line and exit with status 2; out of memory exits 3; a ``meta_eval`` that printed its accuracy but could not write its
results file exits 5. An interrupt (Ctrl-C = SIGINT, SIGTERM as ``timeout``, SLURM and Kubernetes send, SIGHUP) ends
the run like Ctrl-C: one line saying whether ``--resume`` continues it or nothing was saved, the run folder's lock
released, exit status 128 + the signal number (130, 143, 129). Under ``torchrun`` (one process per GPU,
docs/DISTRIBUTED.md) the same flags apply; a process whose peer died or did not answer within ``--dist_timeout``
exits with status 4. The codes are listed in docs/ERRORS.md.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from utils.errors import UserError

if TYPE_CHECKING:  # (annotations only: main.py imports the trainers when a phase runs)
    import argparse

    import torch

    from config.compare import CompareSettings
    from config.settings import PredictSettings, Settings


HT_OPTIONS = ("ht_normal_tasks", "ht_hard_tasks", "ht_update", "ht_start_epoch")
PREDICT_PHASES = ("predict", "embed")  # issue 22: your own images (trainer/predict.py)
PREDICT_FLAGS = {"support": ("predict",), "query": PREDICT_PHASES, "out": PREDICT_PHASES}  # flag -> its phases


def check_args(args, given: frozenset[str] = frozenset()) -> list[str]:
    """Checks that need more than one flag, the phase, or the backbone registry: a ``UserError`` for flags that
    contradict each other or ask for something the phase would silently not do; the returned lines are warnings
    for flags that are merely useless here (docs/ERRORS.md, "Flags that conflict"). ``given``: the flags given on
    the command line (:func:`config.options.explicit_flags`; a recipe's or the parser's default is not "given")."""
    from models.resnet_mtl import min_image_size
    warnings = []
    if args.way < 2:
        raise UserError(f"--way {args.way}: a few-shot task needs at least 2 classes")
    if args.image_size < min_image_size(args.backbone):
        raise UserError(f"--image_size {args.image_size} is too small for --backbone {args.backbone} "
                        f"(at least {min_image_size(args.backbone)} px)")
    if args.amp_dtype != "auto" and not args.amp:
        raise UserError(f"--amp_dtype {args.amp_dtype} chooses the precision of --amp, which is not given "
                        f"(add --amp, or drop --amp_dtype)")
    phase = args.phase
    if phase == "pre_train" and args.init_weights is not None:
        raise UserError(f"--init_weights {args.init_weights} is where --phase meta_train starts; pre_train always "
                        "trains its backbone from a random initialisation (drop --init_weights)")
    for flag, phases in PREDICT_FLAGS.items():  # issue 22: --support / --query / --out outside predict / embed
        if getattr(args, flag, None) is not None and phase not in phases:
            raise UserError(f"--{flag} {getattr(args, flag)} is read by --phase {' and '.join(phases)}; {phase} does "
                            f"not read it (drop --{flag})")
    if phase not in ("meta_eval", "compare") + PREDICT_PHASES and args.eval_weights is not None:
        start = " (meta_train starts from --init_weights)" if phase == "meta_train" else ""
        raise UserError(f"--eval_weights {args.eval_weights} names the checkpoint that --phase meta_eval tests; "
                        f"{phase} does not read it{start}")
    if phase == "meta_train":
        if args.init_weights is not None and "pre_init_epoch" in given:
            raise UserError(f"--init_weights {args.init_weights} and --pre_init_epoch {args.pre_init_epoch} both "
                            "choose the checkpoint meta_train starts from; give one of them")
        ht = [f"--{k}" for k in HT_OPTIONS if k in given]
        if ht and not args.hard_task:
            raise UserError(f"{', '.join(ht)} {'sets' if len(ht) == 1 else 'set'} the hard-task meta-batch, which "
                            f"is off: add --hard_task, or drop {', '.join(ht)}")
        if args.meta_lr_min > args.meta_lr1:
            src = "" if "meta_lr_min" in given else f" (the {args.recipe} recipe's)"
            raise UserError(f"--meta_lr_min {args.meta_lr_min:g}{src} is above --meta_lr1 {args.meta_lr1:g}: the "
                            f"floor would raise the meta learning rates; lower --meta_lr_min to at most "
                            f"{args.meta_lr1:g}")
        if args.hard_task and args.ht_start_epoch > args.max_epoch:
            warnings.append(f"warning: --ht_start_epoch {args.ht_start_epoch} is after the last epoch (--max_epoch "
                            f"{args.max_epoch}): no hard task will run")
        if args.hard_task and args.ht_hard_tasks == 0:
            warnings.append("warning: --hard_task with --ht_hard_tasks 0 records failure classes but runs no hard "
                            "task")
    if phase == "meta_eval" and args.init_weights is not None and args.eval_weights is None:
        from config.settings import RunPaths
        warnings.append(f"note: --init_weights is read by meta_train only; meta_eval tests "
                        f"{RunPaths.from_args(args).meta_checkpoint} (pass --eval_weights to test another checkpoint)")
    last = {"pre_train": args.pre_max_epoch, "meta_train": args.max_epoch}.get(phase)
    if last is not None and args.stop_after_epoch > last:
        warnings.append(f"warning: --stop_after_epoch {args.stop_after_epoch} is after the last epoch ({last}); "
                        "the run ends at its last epoch")
    if args.sync_bn and phase != "pre_train":
        warnings.append("warning: --sync_bn applies to pre_train only (meta-train normalises each task by its own "
                        "batch, as one process does)")
    return warnings


def validate_args(args, given: frozenset[str] = frozenset()) -> None:
    """:func:`check_args`, printing its warnings (one line each, on stdout like the run's other notes)."""
    for line in check_args(args, given):
        print(line, flush=True)


def join_processes(args, device):
    """Under torchrun: join the process group (``utils.distributed``), put this rank on its GPU, silence the
    standard output of ranks other than 0 (their errors still reach stderr), and record the world size (and
    pre-train's global batch) in the settings that ``args.json`` and the checkpoints store. Returns the device."""
    import os

    import torch

    from utils import distributed
    d = distributed.init_from_env(device.type, args.dist_timeout)
    args.world_size = d.world
    if args.phase == "pre_train":
        args.pre_global_batch = args.pre_batch_size * d.world
    if d.world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
        if not distributed.is_main():
            args.quiet = True
            sys.stdout = open(os.devnull, "w")
    return device


# ------------------------------------------------------------------------------------------------------ the phases
# (each runner imports its trainer when it runs: main.cli installs the signal handlers before the slow imports)
@dataclass(frozen=True)
class Phase:
    """One ``--phase``: ``run(settings, device)`` does it and returns its result (a checkpoint path, a results
    dict); ``prepare(args)``, where given, runs on the parsed flags before the settings are built and returns lines
    to print after the run's header. ``settings(args)`` builds the typed settings the runner takes
    (:meth:`config.settings.Settings.from_args` unless given); ``task``: the header names the way, the shot and the
    dataset (not for predict / embed, whose classes are the support folder's or none)."""

    run: Callable[[Any, "torch.device"], Any]
    prepare: Callable[["argparse.Namespace"], list[str]] | None = None
    settings: Callable[["argparse.Namespace"], Any] | None = None
    task: bool = True

    def typed(self, args: "argparse.Namespace") -> Any:
        """The runner's typed settings, built once from the parsed flags."""
        if self.settings is not None:
            return self.settings(args)
        from config.settings import Settings
        return Settings.from_args(args)


def pre_train(settings: "Settings", device: "torch.device") -> str:
    """Pre-train the backbone on the base classes (``trainer/pre.py``); returns the best checkpoint's path."""
    from trainer.pre import PreTrainer
    return PreTrainer(settings, device).run()


def meta_train(settings: "Settings", device: "torch.device") -> str:
    """Meta-train SS and the base learner's initialisation (``trainer/meta.py``); returns the best checkpoint's path."""
    from trainer.meta import MetaTrainer
    return MetaTrainer(settings, device).run()


def meta_eval(settings: "Settings", device: "torch.device") -> dict:
    """Meta-test a checkpoint on fixed test episodes (``trainer/meta.py``); returns the results dict."""
    from trainer.meta import meta_eval as run
    return run(settings, device)


def prepare_meta_eval(args: "argparse.Namespace") -> list[str]:
    """``meta_eval``'s preparation: the model flags left out come from the checkpoint's spec, given ones are checked
    (:func:`config.settings.model_flags_from_checkpoint`)."""
    from config.settings import model_flags_from_checkpoint
    return model_flags_from_checkpoint(args)


def compare(settings: "CompareSettings", device: "torch.device") -> dict:
    """Score several checkpoints / heads on one fixed episode set, with paired tests (``trainer/compare.py``)."""
    from trainer.compare import run_compare
    return run_compare(settings, device)


def prepare_compare(args: "argparse.Namespace") -> list[str]:
    """compare's preparation: the methods of ``--eval_weights``, the way they share, each one's model flags from its
    checkpoint (:func:`config.compare.plan_compare`)."""
    from config.compare import plan_compare
    return plan_compare(args)


def compare_settings(args: "argparse.Namespace") -> "CompareSettings":
    from config.compare import CompareSettings
    return CompareSettings.from_args(args)


def predict(settings: "PredictSettings", device: "torch.device") -> dict:
    """Classify your own query images with a head fitted on your support folder (``trainer/predict.py``, issue 22)."""
    from trainer.predict import predict as run
    return run(settings, device)


def embed(settings: "PredictSettings", device: "torch.device") -> dict:
    """The features of a folder of images or of a dataset's splits, to an ``.npz`` (``trainer/predict.py``)."""
    from trainer.predict import embed as run
    return run(settings, device)


def prepare_predict(args: "argparse.Namespace") -> list[str]:
    """predict's and embed's preparation: their required flags, then the model flags from the checkpoint's spec as for
    ``meta_eval`` (the way excepted: it is the support folder's)."""
    from trainer.predict import prepare
    return prepare(args)


def predict_settings(args: "argparse.Namespace") -> "PredictSettings":
    from config.settings import PredictSettings
    return PredictSettings.from_args(args)


# The phases, in the order of config.options.PHASES (--phase's choices; tests/test_phases.py checks that the two agree).
PHASES: dict[str, Phase] = {
    "pre_train": Phase(pre_train),
    "meta_train": Phase(meta_train),
    "meta_eval": Phase(meta_eval, prepare=prepare_meta_eval),
    "compare": Phase(compare, prepare=prepare_compare, settings=compare_settings),
    "predict": Phase(predict, prepare=prepare_predict, settings=predict_settings, task=False),
    "embed": Phase(embed, prepare=prepare_predict, settings=predict_settings, task=False),
}


def main(argv: Sequence[str] | None = None) -> Any:
    from config.options import describe_dataset, describe_recipe, explicit_flags, parse_args
    args = parse_args(argv)
    phase = PHASES[args.phase]
    prepared = phase.prepare(args) if phase.prepare is not None else []

    from utils.gpu_tools import set_gpu
    set_gpu(args.gpu)
    # (CUDA is initialised lazily, on first use, so CUDA_VISIBLE_DEVICES set here still applies)
    from utils.gpu_tools import pick_device
    from utils.misc import resolve_seed, seed_everything

    validate_args(args, explicit_flags(argv))
    device = pick_device(args.device)
    from utils import distributed
    device = join_processes(args, device)
    if not (args.resume and args.seed == 0 and args.phase != "meta_eval"):
        args.seed = resolve_seed(args.seed)  # (--resume with --seed 0 takes the seed stored in resume.pth)
    args.seed = distributed.broadcast_object(args.seed)  # every rank draws the same tasks (rank 0's seed)
    seed_everything(args.seed, args.deterministic)
    task = f"  {args.way}-way {args.shot}-shot" if phase.task else ""  # (predict: the support's way)
    print(f"phase {args.phase}  backbone {args.backbone}{task}  device {device}  "
          f"seed {args.seed or '(the one in resume.pth)'}", flush=True)
    if distributed.active():
        d = distributed.info()
        batch = (f"; pre-train global batch {args.pre_global_batch} = --pre_batch_size {args.pre_batch_size} x "
                 f"{d.world}" if args.phase == "pre_train" else "")
        print(f"torchrun: {d.world} processes ({d.backend}, --dist_timeout {d.timeout_s:g} s); rank 0 writes the "
              f"logs{batch}", flush=True)
    print(describe_recipe(args), flush=True)
    if phase.task:
        print(describe_dataset(args), flush=True)
    for line in prepared:
        print(line, flush=True)
    return phase.run(phase.typed(args), device)  # the typed settings, built once; the trainers get nothing else


def cli(argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and return the exit status (module docstring; 4: another process of a torchrun run failed).

    Under torchrun a process that ends normally meets the others at a barrier and leaves the process group; one
    that ends with an error exits at once with its status (``os._exit`` after flushing: the process group's
    threads may be waiting on a dead peer, and tearing it down could abort or hang), and torchrun's agent ends the
    other workers."""
    import os

    from utils import distributed
    rc = _cli(argv)
    if distributed.initialized():
        if rc == 0:
            try:
                distributed.barrier()
                distributed.shutdown()
            except distributed.PeerError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                rc = 4
        if rc != 0:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return rc


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like the KeyboardInterrupt of Ctrl-C, so that the same paths
    clean up (temporary files removed, the run folder's lock released) and ``_cli`` reports it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _install_signal_handlers() -> dict:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in this process (the first one; a repeat while the run
    is stopping is ignored, so that the cleanup finishes). A forked child (the decoding pool of the image cache)
    that inherited the handlers dies of the signal quietly instead: its parent reports. Returns the previous
    handlers (``cli`` restores them: main.cli also runs inside the tests' process). Outside the main thread Python
    allows no handlers, and nothing is changed."""
    import os
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    owner, seen = os.getpid(), []

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if seen:
            return
        seen.append(signum)
        raise Interrupted(signum)

    return {s: signal.signal(s, handler) for s in HANDLED_SIGNALS}


def _continue_hint(e: BaseException, default: str, resize: bool = False) -> str:
    """What the trainer said about going on (``BaseTrainer.continue_hint``), else ``default``."""
    return getattr(e, "resize_hint" if resize else "continue_hint", None) or default


def _cli(argv: Sequence[str] | None = None) -> int:
    from utils import distributed
    from utils.distributed import PeerError
    previous = _install_signal_handlers()
    try:
        main(argv)
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 4
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)  # 5: meta_eval printed its accuracy but could not write the results
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
        if distributed.is_main():  # under torchrun the agent stops every worker: one line, from rank 0
            print(f"interrupted by {name}; {_continue_hint(e, 'nothing was written: run the same command again')}",
                  file=sys.stderr, flush=True)
        return 128 + int(signum)
    except MemoryError as e:
        print(f"error: out of memory; lower --pre_batch_size, --eval_batch_size or the image size "
              f"({_continue_hint(e, 'nothing was written', resize=True)})", file=sys.stderr)
        return 3
    except RuntimeError as e:
        import torch
        if isinstance(e, torch.cuda.OutOfMemoryError):
            print("error: CUDA out of memory; lower --pre_batch_size, --eval_batch_size, --meta_batch_size or the "
                  f"image size ({_continue_hint(e, 'nothing was written', resize=True)})", file=sys.stderr, flush=True)
            return 3
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
