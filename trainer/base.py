"""What the pre-train and meta trainers share: data, log folders, the epoch loop with validation,
checkpoints (best, last, resume state), the per-epoch log, TensorBoard and the LR schedule.

A subclass provides ``build()`` (model, optimizer, samplers), ``train_epoch(epoch)``, ``validate(epoch)``,
``model_checkpoint()`` and the pieces of its state that a resume needs (``extra_state`` /
``load_extra_state``). The loop itself lives only here.

Faults (docs/ERRORS.md E90-E109): a non-finite training loss, model or validation result stops the run before
anything of the epoch is written (the files of the last finished epoch stay as they were); a file that cannot be
written (disk full, read-only folder, a file in the way) stops it with one line naming the file, and when that
happens in the first epoch's commit the files it had written are removed again, so the folder holds no half run; an
interrupt (Ctrl-C, SIGTERM, SIGHUP) carries :meth:`BaseTrainer.continue_hint` to ``main.cli``, which says whether
``--resume`` continues the run or nothing was saved.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from config.settings import DataSettings, MetaTrainSettings, PreTrainSettings, Settings
from data_generator.dataset_loader import (FOLDERS, ImageSet, SplitSpec, check_episode_fit, load_split, peek_split,
                                           role_spec, split_spec)
from data_generator.hygiene import SplitSummary, duplicate_classes, split_overlap
from data_generator.meta_data_generator import fixed_episodes
from data_generator.transforms import BatchTransform
from models.evaluate import EvalSettings
from models.spec import ModelSpec
from utils import distributed
from utils.checkpoint import FORMAT, load_checkpoint, save_atomic
from utils.errors import UserError
from utils.finite import NonFiniteError, describe_nonfinite, first_nonfinite_key
from utils.misc import (WriteError, format_acc, get_rng_state, remove_orphaned_temporaries, set_rng_state,
                        write_error, write_json_atomic)
from utils.run_lock import RunLock, holds_run, move_aside

from trainer.run_report import REPORT_MD, write_run_report

def scheduled_lr(lr0: float, epoch: int, step_size: int, gamma: float, floor: float = 0.0) -> float:
    """Step schedule with the official epoch semantics (reference section 12.1): the official code calls
    ``StepLR.step()`` at the *start* of each 1-indexed epoch, so epoch ``e`` trains at
    ``lr0 * gamma ** (e // step_size)`` (pre-train: epochs 1-29 at 0.1, 30-59 at 0.02, ...), never below
    ``floor``."""
    return max(lr0 * gamma ** (epoch // step_size), floor)


def ensure_writable(path: str) -> None:
    """Create ``path`` or fail with one line (an unwritable log root is a user error, not a traceback)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to the log folder {path}: {e.strerror or e}")


SPLIT_OF_ROLE = {"pre_train": "train", "meta_train": "train", "val": "val", "test": "test"}
DIR_FLAG_OF_ROLE = {"pre_train": "pre_train_dir", "meta_train": "meta_train_dir", "val": "meta_val_dir",
                    "test": "meta_test_dir"}


class DataBundle:
    """The transforms and the image splits of one run (:class:`config.settings.DataSettings`), loaded on demand.

    Every split loaded is checked (:mod:`data_generator.hygiene`): within itself (two classes with the same images:
    one warning line) and against the splits loaded before it (shared class names or images: UserError, unless
    ``--allow_split_overlap``). Pre-train and meta-train load train and val, so those two are compared; meta-test
    loads only test and compares it with train and val through :func:`peek_split` (their cache records, no
    decoding; docs/DATA.md, "Split hygiene")."""

    def __init__(self, data: DataSettings):
        self.settings = data
        self.eval_transform = BatchTransform(data.image_size, data.preprocess, augment=False)
        self.train_transform = BatchTransform(data.image_size, data.preprocess, augment=data.augment)
        self.cache_dir = data.cache_dir
        self.checked: dict[str, SplitSummary] = {}  # split name -> the summary of a split loaded and checked

    def spec(self, role: str) -> SplitSpec:
        d = self.settings
        explicit = {"pre_train": d.pre_train_dir, "meta_train": d.meta_train_dir, "val": d.meta_val_dir,
                    "test": d.meta_test_dir}[role]
        split = SPLIT_OF_ROLE[role]
        if explicit:  # e.g. --meta_test_dir at FC100 pickles (its test split), or at one class-folder split
            return role_spec(explicit, split, d.dataset)
        return split_spec(d.dataset_dir, split, d.dataset)

    def load(self, role: str) -> ImageSet:
        spec = self.spec(role)
        if spec.kind == FOLDERS and not os.path.isdir(spec.path):
            own = DIR_FLAG_OF_ROLE[role]  # the flag that named the folder (the message must name that one)
            flag = f"--{own}" if getattr(self.settings, own) else "--dataset_dir"
            raise UserError(
                f"dataset folder not found: {spec} (expected <root>/{{train,val,test}}/<class>/<image>; set "
                f"{flag}, or try the embedded data: python run_experiment.py DEMO)")

        def load() -> ImageSet:
            s = load_split(spec, self.eval_transform.stored_size, self.cache_dir, self.settings.num_workers)
            self.check(role, spec, s)
            return s

        if not distributed.active():
            return load()
        # torchrun: rank 0 loads first (and builds the decoded-image cache once); the others then read it
        first: list[ImageSet] = []
        distributed.on_main(lambda: first.append(load()))
        return first[0] if first else load()

    def check(self, role: str, spec: SplitSpec, imageset: ImageSet) -> None:
        """Split hygiene for the split just loaded (see the class docstring); prints warnings on rank 0. Splits of
        different names are compared even when they are the same folder (``--meta_val_dir`` at the train folder is
        the fullest overlap there is)."""
        allow = self.settings.allow_split_overlap
        split = SPLIT_OF_ROLE[role]
        summary = imageset.summary(split)
        lines = [duplicate_classes(summary)]
        others = [s for name, s in self.checked.items() if name != split]
        if role == "test":
            others += self._peek_training_splits(summary, lines)
        lines += [split_overlap(o, summary, allow) for o in others]  # raises unless allowed
        self.checked[split] = summary
        for line in lines:
            if line and distributed.is_main():
                print(line, flush=True)

    def _peek_training_splits(self, test: SplitSummary, lines: list) -> list[SplitSummary]:
        """Meta-test: the train and val splits' summaries from what is on disk, without decoding (a note line in
        ``lines`` names what could not be compared)."""
        found, missing, seen = [], [], set()
        for role in ("meta_train", "pre_train", "val"):
            split = SPLIT_OF_ROLE[role]
            try:
                spec = self.spec(role)
            except UserError:  # e.g. --meta_test_dir alone and a --dataset_dir that holds nothing
                continue
            if split in self.checked or spec in seen:
                continue
            seen.add(spec)
            if str(spec) == test.source:  # --meta_test_dir at the train or val folder
                found.append(replace(test, split=split))
                continue
            try:
                summary, why = peek_split(spec, self.eval_transform.stored_size, self.cache_dir, split)
            except UserError as exc:
                summary, why = None, f"it could not be read ({exc})"
            if summary is not None:
                found.append(summary)
            if why:
                missing.append(f"{split} ({spec}: {why})")
        if missing:
            lines.append(f"note: the test images were not compared with the images of the {'; '.join(missing)}; "
                         "a pre-train or meta-train with the same data flags writes the entry it needs")
        return found


class ScalarEvents:
    """A TensorBoard event file of scalars written synchronously with tensorboardX's protobufs and record writer.

    (tensorboardX's ``SummaryWriter`` hands events to a background thread and its ``flush`` does not wait for that
    thread, so a run killed right after an epoch could lose the epoch's points.) ``purge_step = s`` writes a
    ``SessionLog(START)`` at step ``s``: TensorBoard then hides the points that earlier files logged at steps >= s,
    i.e. what a killed run wrote after its last checkpoint, so the curves of a resumed run have neither gaps nor
    duplicates. Each writer gets its own file (a unique suffix: two runs within one second never share a name).
    """

    def __init__(self, folder: str, purge_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        self.path = folder
        try:
            os.makedirs(folder, exist_ok=True)
            self._event = Event
            self._writer = EventsWriter(os.path.join(folder, "events"), f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
            self.path = self._writer._file_name
            self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                           session_log=SessionLog(status=SessionLog.START)))
            self._writer.flush()
        except OSError as e:  # a full disk, a read-only folder, a file named tb: one line (utils.misc.WriteError)
            raise write_error(self.path, e) from e

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """One point per tag at ``step``, on disk when this returns (:class:`utils.misc.WriteError` if it cannot)."""
        from tensorboardX.summary import scalar
        try:
            for tag, value in scalars.items():
                self._writer.write_event(self._event(wall_time=time.time(), step=step,
                                                     summary=scalar(tag, float(value))))
            self._writer.flush()
        except OSError as e:
            raise write_error(self.path, e) from e

    def close(self) -> None:
        """Close the file (once; again is a no-op)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except (OSError, ValueError):  # what could not be written was reported by write()
            pass


class BaseTrainer:
    """The epoch loop shared by :class:`trainer.pre.PreTrainer` and :class:`trainer.meta.MetaTrainer`.

    It reads typed settings only (``self.settings``, :class:`config.settings.Settings`); the flags' record
    (``Settings.args``) goes into the files (:meth:`Settings.record`) and is compared on ``--resume``
    (:meth:`Settings.check_resume`), never read for a value."""

    kind = "base"

    def __init__(self, settings: Settings, device: torch.device, log_dir: str,
                 opt: PreTrainSettings | MetaTrainSettings):
        self.settings = settings
        self.opt = opt  # the phase's optimizer, schedule, batches and epochs
        self.max_epoch = opt.epochs
        self.device = device
        self.log_dir = log_dir
        self.data = DataBundle(settings.data)
        self.progress = settings.run.progress
        self.trlog: list[dict[str, Any]] = []
        self.best_acc = -1.0
        self.best_epoch = 0
        self.start_epoch = 1
        self.committed_epoch = 0  # the last epoch whose resume.pth is on disk (this run's, or the resumed one's)
        self.position = (0, 0, 0)  # (epoch, iteration in the epoch, iterations per epoch), named in messages
        # each rank augments its own shard: its own stream (rank 0's is the single-process one)
        self.aug_gen = torch.Generator().manual_seed(settings.seed
                                                     + distributed.RANK_SEED_STRIDE * distributed.rank())

    # ----------------------------------------------------------------- to implement
    save_every: int = 0  # keep epoch<N>.pth every N epochs (pre-train's --pre_save_every); 0: none
    spec: ModelSpec  # the model's, with the input it is trained on (set by build; written into every checkpoint)

    def build(self) -> None:
        raise NotImplementedError

    def set_lr(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def train_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def validate(self, epoch: int) -> tuple[float, float]:
        raise NotImplementedError

    def model_checkpoint(self) -> dict[str, Any]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ----------------------------------------------------------------- shared
    def fixed_val_episodes(self, imageset: ImageSet, ev: EvalSettings) -> np.ndarray:
        check_episode_fit(imageset, ev.way, ev.shot + ev.query, "validation")
        return fixed_episodes(imageset.labels, ev.episodes, ev.way, ev.shot, ev.query, ev.seed)

    def checkpoint(self, epoch: int, val_acc: float) -> dict[str, Any]:
        """A model checkpoint (``max_acc.pth``, ``last.pth``, ``epoch<N>.pth``): the weights and ``"spec"``, the
        model's :class:`models.spec.ModelSpec` (``self.spec``, set by ``build``), from which ``models.load`` rebuilds
        it; ``backbone`` and ``args`` stay for the readers of files from before the spec."""
        ck = {"format": FORMAT, "kind": self.kind, "backbone": self.spec.backbone,
              "args": self.settings.record(), "epoch": epoch, "val_acc": val_acc, "spec": self.spec.to_dict()}
        ck.update(self.model_checkpoint())
        return ck

    def rank_states(self) -> list[dict[str, Any]] | None:
        """Under torchrun: every rank's own random state (the global RNGs: dropout; ``aug_gen``: its shard's
        augmentation), gathered for rank 0's ``resume.pth`` (a collective: every rank calls it). ``None`` for one
        process."""
        if not distributed.active():
            return None
        return distributed.all_gather_objects({"rng": get_rng_state(), "aug_gen": self.aug_gen.get_state()})

    def resume_state(self, epoch: int, rank_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs (docs/REPRODUCIBILITY.md). The LR schedule is a pure function of the
        epoch and the stored settings (``set_lr``), so the epoch is its whole state. (``--amp`` is bf16 autocast
        only, ``utils.gpu_tools.autocast``, which needs no grad scaler.)"""
        best = os.path.join(self.log_dir, "max_acc.pth") if self.best_epoch else None
        return {"format": FORMAT, "kind": f"resume-{self.kind}", "args": self.settings.record(),
                "epoch": epoch, "iterations_per_epoch": self.iterations_per_epoch(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "best_checkpoint": best,
                "trlog": self.trlog, "rng": get_rng_state(), "aug_gen": self.aug_gen.get_state(),
                "extra": self.extra_state(), **({"rank_states": rank_states} if rank_states else {})}

    def iterations_per_epoch(self) -> int:
        return 0

    def stopped(self) -> str:
        """What a run stopped inside an epoch has kept: the middle part of every non-finite message."""
        if self.trlog:
            return (f"stopped; the last good checkpoint is {os.path.join(self.log_dir, 'last.pth')} "
                    f"(epoch {self.trlog[-1]['epoch']}), left untouched")
        return "stopped; no checkpoint of this run was written yet"

    def check_loss(self, loss: float, epoch: int, iteration: int, n_iterations: int) -> None:
        """Stop at once when the training loss is NaN or infinite: nothing of this epoch is saved, so the files
        of the last finished epoch (``last.pth``, ``resume.pth``, ``trlog.json``) stay as they were."""
        if math.isfinite(loss):
            return
        raise UserError(f"training loss is {loss} at epoch {epoch}, iteration {iteration}/{n_iterations}; "
                        f"{self.stopped()}. Lower {self.lr_hint()}, or check the data")

    def step_optimizer(self) -> None:
        """``optimizer.step()``; a learning rate so large that the step does not fit float32 (Adam's first step at
        ``lr / (1 - beta1)``, from about 3.4e37) stops the run with one line instead of torch's traceback."""
        try:
            self.optimizer.step()
        except RuntimeError as e:
            if "without overflow" not in str(e):  # torch: "value cannot be converted to type float without overflow"
                raise
            epoch, it, n = self.position
            raise UserError(f"the optimizer step overflows float32 at epoch {epoch}, iteration {it}/{n} "
                            f"({str(e).strip().splitlines()[0]}); {self.stopped()}. Lower {self.lr_hint()}") from None

    def check_model(self, epoch: int) -> None:
        """After the epoch's training, before validation: every parameter and buffer of the model is finite (one
        host synchronisation). A step can leave non-finite weights behind a finite loss (an optimizer step that
        overflows on the epoch's last iteration, BatchNorm statistics that overflow); validated, they would score at
        chance level, and saved, they would be the checkpoint."""
        sd = self.model.state_dict()
        key = first_nonfinite_key(sd)
        if key is not None:
            raise UserError(f"the model holds non-finite values after the training of epoch {epoch} ({key}: "
                            f"{describe_nonfinite(sd[key])}) although every training loss was finite; "
                            f"{self.stopped()}. Lower {self.lr_hint()}")

    def checked_validate(self, epoch: int) -> tuple[float, float]:
        """:meth:`validate`, with a non-finite feature or logit restated for the training: the epoch, what was kept,
        and the flags of the validation's inner loop and of the training."""
        try:
            return self.validate(epoch)
        except NonFiniteError as e:
            if e.kind == "features":
                advice = f"The training made the encoder overflow: lower {self.lr_hint()}"
            else:
                advice = f"{e.advice}; if the training diverged, lower {self.lr_hint()}"
            raise UserError(f"{e.what} at epoch {epoch}; {self.stopped()}. {advice}") from None

    def continue_hint(self, resize: bool = False) -> str:
        """How to go on after this run was interrupted now: ``--resume`` once an epoch is saved (``resume.pth``), the
        same command again when nothing of this run was saved. ``resize``: after running out of memory, when a
        smaller batch is needed (only ``--eval_batch_size`` may change on ``--resume``). Read by ``main.cli``."""
        if self.committed_epoch:
            if resize:
                return (f"the run is saved up to epoch {self.committed_epoch} in {self.log_dir}; --resume continues "
                        "it with a lower --eval_batch_size only")
            plus = "" if self.settings.run.resume else " plus --resume"
            return (f"{self.log_dir} holds the run up to epoch {self.committed_epoch}: continue it with the same "
                    f"command{plus}")
        if self.settings.run.resume:  # interrupted before the resumed state was read: the folder is as it was
            if resize:
                return (f"the run in {self.log_dir} is as it was; --resume continues it with a lower "
                        "--eval_batch_size only")
            return f"the run in {self.log_dir} is as it was: run the same command again"
        if resize:
            return "nothing of this run was saved: run the command again with the lower size"
        return "nothing of this run was saved: run the same command again"

    def write_failed(self, e: WriteError) -> UserError:
        """A file of the run could not be written: one line naming it, the run's state and what to do."""
        if self.committed_epoch:
            plus = "" if self.settings.run.resume else " plus --resume"
            state = (f"the run is saved up to epoch {self.committed_epoch} in {self.log_dir} (resume.pth, intact): "
                     f"{e.fix}, then continue with the same command{plus}")
        else:
            state = (f"nothing of this run was saved: {e.fix} (or choose another --log_root), then run the same "
                     "command again")
        return UserError(f"cannot write {e.path}: {e.reason}; {state}")

    def lr_hint(self) -> str:
        """The learning-rate flags of this phase with their values, for the NaN message."""
        raise NotImplementedError

    def load_resume(self) -> None:
        path = os.path.join(self.log_dir, "resume.pth")
        if not os.path.isfile(path):
            raise UserError(f"--resume: no checkpoint to resume from in {self.log_dir} (resume.pth is missing)")
        st = load_checkpoint(path)
        if st.get("kind") != f"resume-{self.kind}":
            raise UserError(f"--resume: {path} is not a {self.kind} resume checkpoint")
        old = st["args"]
        self.settings = self.settings.check_resume(old, self.log_dir)  # (--seed 0: the seed the run stored)
        self.check_resume(old)
        key = first_nonfinite_key(st["model"])
        if key is not None:
            raise UserError(f"{path} holds non-finite weights: {key} has {describe_nonfinite(st['model'][key])} (a "
                            "damaged file; a run stops before it saves non-finite weights); start the run afresh "
                            "with --overwrite")
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.best_acc, self.best_epoch = st["best_acc"], st["best_epoch"]
        self.trlog = list(st["trlog"])
        own = st.get("rank_states") or []  # torchrun: each rank's own state when the world size is the same
        mine = own[distributed.rank()] if len(own) == distributed.world() else st
        set_rng_state(mine["rng"])
        self.aug_gen.set_state(mine["aug_gen"])
        self.load_extra_state(st["extra"])
        self.start_epoch = st["epoch"] + 1
        self.committed_epoch = st["epoch"]
        best = st.get("best_checkpoint")
        if best and not os.path.isfile(best):
            print(f"warning: the best checkpoint so far, {best}, is missing; it is rewritten only when a later "
                  "epoch validates better", flush=True)
        print(f"resuming {self.log_dir} after epoch {st['epoch']} (best val {100 * self.best_acc:.2f}% "
              f"at epoch {self.best_epoch})", flush=True)

    def check_resume(self, old: dict[str, Any]) -> None:
        """Phase-specific resume checks on the stored settings ``old`` (after the common ones)."""

    def _tensorboard(self) -> "ScalarEvents | None":
        """The TensorBoard log ``<log_dir>/tb`` (the scalars of ``trlog.json``, one point per epoch), or ``None``
        with a one-line warning when tensorboardX is not installed (``trlog.json`` is the record)."""
        try:
            return ScalarEvents(os.path.join(self.log_dir, "tb"), purge_step=self.start_epoch)
        except ImportError:
            print("warning: tensorboardX is not installed, so no TensorBoard log is written "
                  "(pip install -r requirements.txt); trlog.json has every number", flush=True)
            return None

    def run(self) -> str:
        """Train, validate every epoch, keep ``max_acc.pth`` (best val) and ``last.pth``; return the best path.

        The run holds its folder's lock (:class:`utils.run_lock.RunLock`) from the moment the settings and the data
        have been checked until it ends, whichever way it ends; a folder that already holds a run is continued
        (``--resume``), moved aside (``--overwrite``) or left alone with a one-line error."""
        try:
            return self._run()
        except (KeyboardInterrupt, RuntimeError, MemoryError) as e:  # main.cli says how to go on
            e.continue_hint = self.continue_hint()  # type: ignore[attr-defined]
            e.resize_hint = self.continue_hint(resize=True)  # type: ignore[attr-defined]
            raise

    def _run(self) -> str:
        run = self.settings.run
        distributed.on_main(lambda: ensure_writable(self.log_dir))
        self.build()
        with ExitStack() as held:  # under torchrun rank 0 holds the lock and writes; the others only compute

            def claim() -> None:
                lock = RunLock(self.log_dir)
                held.callback(lock.release)  # registered before acquire: a signal inside it still removes the lock
                lock.acquire()
                if not run.resume and holds_run(self.log_dir):
                    if not run.overwrite and not os.path.isfile(os.path.join(self.log_dir, "resume.pth")):
                        # (a run killed after an epoch's first files, before its commit point: --resume would fail)
                        raise UserError(f"{self.log_dir} holds files of a run that saved no resume point (resume.pth "
                                        "is missing, so it cannot be continued); start afresh with --overwrite (the "
                                        f"earlier files are moved to {self.log_dir.rstrip(os.sep)}.old-<time>, nothing "
                                        "is deleted), or give this run another folder")
                    if not run.overwrite:
                        raise UserError(f"{self.log_dir} already holds a run (finished or interrupted); continue it "
                                        "with --resume, or start afresh with --overwrite (the earlier run is moved "
                                        f"to {self.log_dir.rstrip(os.sep)}.old-<time>, nothing is deleted)")
                    print(f"--overwrite: the earlier run in {self.log_dir} was moved to {move_aside(self.log_dir)}",
                          flush=True)
                # the half-written temporaries of killed writers (utils.misc.atomic_write): those of dead processes
                # always; with --resume also the unowned names of older versions (the lock keeps other runs out)
                removed = remove_orphaned_temporaries(self.log_dir, legacy=run.resume)
                if removed:
                    print(f"removed {len(removed)} temporary file(s) left in {self.log_dir} by a killed process",
                          flush=True)
                self.start_fresh()

            distributed.on_main(claim)
            if run.resume:
                self.load_resume()
            try:
                best = self._epochs()
            except WriteError as e:  # a checkpoint, log, TensorBoard or hard-task file could not be written
                raise self.write_failed(e) from None
            trained = self.start_epoch <= self.max_epoch  # (a resume of a finished run trains, and rewrites, nothing)
            if distributed.is_main() and (trained or not os.path.isfile(os.path.join(self.log_dir, REPORT_MD))):
                write_run_report(self.log_dir)  # report.md of the run (trainer/run_report.py: milliseconds, no picture)
            return best

    def start_fresh(self) -> None:
        """Called with the lock held, before the first epoch: remove what a fresh run must not append to."""

    def _commit(self, epoch: int, val_acc: float, improved: bool, record: dict[str, Any],
                rank_states: list[dict[str, Any]] | None, writer: "ScalarEvents | None") -> "ScalarEvents | None":
        """Write the epoch's files (rank 0), ``resume.pth`` last: it is the commit point. A kill before it re-runs
        this epoch on ``--resume``, and the files before it (one epoch ahead at most) are rewritten with the same
        content. Every file goes through :func:`utils.misc.atomic_write`, so a failure leaves each file old or new,
        never half written; when the run's first commit fails, the files it had created are removed again (the
        folder then holds no run, and the same command starts it afresh). Returns the TensorBoard writer."""
        created: list[str] = []

        def save(write, path: str) -> None:
            existed = os.path.exists(path)
            write(path)
            if not existed:
                created.append(path)

        try:
            if improved:
                save(lambda p: save_atomic(self.checkpoint(epoch, val_acc), p),
                     os.path.join(self.log_dir, "max_acc.pth"))
            if self.save_every and epoch % self.save_every == 0:
                save(lambda p: save_atomic(self.checkpoint(epoch, val_acc), p),
                     os.path.join(self.log_dir, f"epoch{epoch}.pth"))
            if writer is None:
                writer = self._tensorboard()
                if writer is not None and not self.committed_epoch:
                    created.append(writer.path)
            if writer is not None:
                writer.write(epoch, {f"{self.kind}/{k}": v for k, v in record.items()
                                     if k != "epoch" and isinstance(v, (int, float))})
            save(lambda p: save_atomic(self.checkpoint(epoch, val_acc), p), os.path.join(self.log_dir, "last.pth"))
            save(lambda p: write_json_atomic(p, self.trlog), os.path.join(self.log_dir, "trlog.json"))
            save(lambda p: write_json_atomic(p, self.settings.record()), os.path.join(self.log_dir, "args.json"))
            save(lambda p: save_atomic(self.resume_state(epoch, rank_states), p),
                 os.path.join(self.log_dir, "resume.pth"))
        except BaseException:
            if not self.committed_epoch:  # the first commit of the run failed: leave the folder as it was
                if writer is not None:
                    writer.close()
                for path in created:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            raise
        return writer

    def _epochs(self) -> str:
        """The epoch loop (the lock is held)."""
        run = self.settings.run
        # Nothing is written into the log folder before the first epoch has finished (a run that fails early
        # leaves an earlier run's files as they were); the TensorBoard writer is opened then too.
        writer = None
        best_path = os.path.join(self.log_dir, "max_acc.pth")
        try:
            for epoch in range(self.start_epoch, self.max_epoch + 1):
                t0 = time.perf_counter()
                lrs = self.set_lr(epoch)
                stats = self.train_epoch(epoch)  # raises (check_loss) as soon as a loss is NaN or infinite
                self.check_loss(stats.get("train_loss", 0.0), epoch, self.iterations_per_epoch(),
                                self.iterations_per_epoch())
                self.check_model(epoch)
                t1 = time.perf_counter()
                val_acc, val_ci = self.checked_validate(epoch)
                t2 = time.perf_counter()
                main = distributed.is_main()  # (every rank keeps the same record; rank 0 alone writes it)
                rank_states = self.rank_states()
                improved = val_acc > self.best_acc
                if improved:
                    self.best_acc, self.best_epoch = val_acc, epoch
                record = {"epoch": epoch, **lrs, **stats, "val_acc": val_acc, "val_ci95": val_ci,
                          "best_val_acc": self.best_acc, "best_epoch": self.best_epoch,
                          "train_time": t1 - t0, "val_time": t2 - t1}
                self.trlog.append(record)
                if main:
                    writer = self._commit(epoch, val_acc, improved, record, rank_states, writer)
                self.committed_epoch = epoch
                distributed.barrier()  # no rank starts the next epoch before the commit point is on disk
                loss, acc = stats.get("train_loss", float("nan")), stats.get("train_acc", float("nan"))
                print(f"[{self.kind}] epoch {epoch}/{self.max_epoch}  loss {loss:.4f}  "
                      f"train acc {100 * acc:.2f}%  val {format_acc(val_acc, val_ci)}%  "
                      f"(best {100 * self.best_acc:.2f}% @ {self.best_epoch})  data {stats.get('data_time', 0):.1f}s "
                      f"compute {stats.get('compute_time', 0):.1f}s val {t2 - t1:.1f}s", flush=True)
                if run.stop_after_epoch and epoch == run.stop_after_epoch:
                    print(f"stopping after epoch {epoch} (--stop_after_epoch)", flush=True)
                    break
        finally:  # on every exit path: an open event file would keep its folder busy
            if writer is not None:
                writer.close()
        return best_path
