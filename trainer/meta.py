"""Meta-train (paper Alg. 1 and 2, Eq. 3-5) and meta-test.

One meta-training step, as the data flows::

    sampler -> (support, query) images -> encoder with SS convs -> features
            -> the finetune head fits the base learner on the support (Eq. 3, models.heads.FinetuneHead, inner_loop)
            -> query logits at the adapted weights -> query loss
            -> Adam on {SS, BN affine} at meta_lr1 and on the base learner's initialisation at meta_lr2 (Eq. 4-5)

A meta-batch is ``meta_batch_size`` tasks whose query losses are averaged into one outer update (official
PyTorch: 1 task; TF / paper: 2). With ``--hard_task`` the hard-task meta-batch of Alg. 1 (lines 8-20) follows
each meta-batch (the planner in ``data_generator/hard_tasks.py``; the runs and updates here). Validation every epoch
runs fixed episodes on the validation classes; ``max_acc.pth`` keeps the best epoch. Meta-test (:func:`meta_eval`)
runs ``--num_test_episodes`` fixed episodes on the test classes and reports the mean with its 95% interval.

The trainer reads typed settings only: ``Settings.meta_train`` (the tasks, Adam, the schedule, the start),
``Settings.hard`` (Alg. 1), ``Settings.run`` (precision, memory format, compile, resume), ``Settings.model`` (the
spec it builds); the meta-test reads ``Settings.test`` and the checkpoint to test.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config.settings import Settings
from data_generator.dataset_loader import check_episode_fit
from data_generator.hard_tasks import HardTaskPlanner
from data_generator.meta_data_generator import CategoriesSampler, Task, by_class, fixed_episodes
from models.evaluate import EvalSettings, class_accuracy, evaluate
from models.heads import HEADS
from models.loading import check_weights_path, init_meta_model, load, read_weights
from models.mtl import MetaLearner
from models.tf_weights import TENSORFLOW
from trainer.base import BaseTrainer, DataBundle, scheduled_lr
from trainer.run_report import write_run_report
from utils import distributed
from utils.errors import UserError
from utils.finite import all_finite, describe_nonfinite
from utils.gpu_tools import autocast, maybe_compile, to_channels_last, to_device, use_channels_last
from utils.misc import (Averager, Timer, WriteError, format_acc, listing, remove_orphaned_temporaries,
                        write_json_atomic)


class MetaTrainer(BaseTrainer):
    kind = "meta"

    def __init__(self, settings: Settings, device: torch.device):
        super().__init__(settings, device, settings.paths.meta_dir, settings.meta_train)
        self.inner = self.opt.inner
        self.position = (0, 0, self.opt.iterations)  # (epoch, iteration in the epoch, iterations per epoch)

    # ----------------------------------------------------------------- setup
    def build(self) -> None:
        opt, run = self.opt, self.settings.run
        self.train_set = self.data.load("meta_train")
        self.val_set = self.data.load("val")
        check_episode_fit(self.train_set, opt.way, opt.shot + opt.query, "meta-train")
        self.val_episodes = self.fixed_val_episodes(self.val_set, self.settings.meta_val)
        self.spec = self.settings.model.meta_spec()  # (written into every checkpoint)
        self.model = MetaLearner.from_spec(self.spec).to(self.device)
        self.load_pretrained()
        if use_channels_last(self.device, run.channels_last):
            self.model = self.model.to(memory_format=torch.channels_last)
        # --compile (CUDA): a compiled view of the encoder for the training steps only; checkpoints save
        # self.model's own state dict, so their keys stay plain, and validation uses the uncompiled encoder.
        self.train_encoder = maybe_compile(self.model.encoder, self.device, run.compile)
        ss_bn, head = self.model.meta_parameters()
        self.optimizer = torch.optim.Adam([{"params": ss_bn, "lr": opt.lr1},
                                           {"params": head, "lr": opt.lr2}])
        self.sampler = CategoriesSampler(self.train_set.labels, opt.iterations, opt.way, opt.shot, opt.query,
                                         self.settings.seed)
        self.hard = None
        if self.settings.hard is not None:
            self.hard = HardTaskPlanner(self.settings.hard, self.train_set, self.log_dir)

    def start_fresh(self) -> None:
        """A fresh run starts a fresh hard-task log (the lock is held; a finished run was refused or moved)."""
        if self.hard is not None and not self.settings.run.resume and os.path.exists(self.hard.log_path):
            os.unlink(self.hard.log_path)

    def load_pretrained(self) -> None:
        """Meta-training's start (``--init_weights``, else the pre-train run's checkpoint): any file
        :func:`models.loading.read_weights` reads, whose spec must agree with this run's ``--backbone``,
        ``--bn_mode`` and ``--way`` (the flags define the run: its folder is named after them)."""
        opt = self.opt
        if opt.init_weights == "scratch":  # the paper's "no pre-training" ablation: SS on a random backbone
            print(f"meta-train starts from a randomly initialised {self.spec.backbone} (--init_weights scratch)",
                  flush=True)
            return
        path = opt.init_weights or self.settings.paths.pre_checkpoint(opt.init_epoch)
        if opt.init_weights:
            check_weights_path(path, "--init_weights")
        elif not os.path.isfile(path):
            self.missing_pre_checkpoint(path)
        # TF folder / weights.npy: meta-training starts from weights.npy (the pre-trained encoder), with fresh SS and
        # base learner, as the TF META_LOAD (tensorflow/trainer/meta.py L82-94); the SS shift starts at the
        # pre-trained bias there, here Phi_S2 = 0 on the frozen bias: the same effective bias b + Phi_S2
        weights = read_weights(path, self.settings.model.expect(), parts="pre")
        init_meta_model(self.model, weights)
        if weights.source == TENSORFLOW:
            print(f"meta-train starts from {weights.path} (TensorFlow pre-trained weights)", flush=True)
        else:
            print(f"meta-train starts from {path} ({weights.kind})", flush=True)

    def missing_pre_checkpoint(self, path: str) -> None:
        """The pre-train checkpoint meta_train would start from is not there: one line saying which snapshots the
        pre-train run did keep (``--pre_init_epoch`` naming one it did not), or that there is no pre-train run."""
        epoch = self.opt.init_epoch
        folder = os.path.dirname(path)
        kept = sorted((f for f in os.listdir(folder) if f.startswith("epoch") and f.endswith(".pth")),
                      key=lambda f: int(f[5:-4]) if f[5:-4].isdigit() else -1) if os.path.isdir(folder) else []
        if epoch and (kept or os.path.isfile(os.path.join(folder, "max_acc.pth"))):
            has = f"it kept {listing(kept)}" if kept else "it kept none"
            raise UserError(f"--pre_init_epoch {epoch}: the pre-train run in {folder} has no "
                            f"epoch{epoch}.pth ({has}; pre-train keeps one every --pre_save_every epochs): "
                            "pass the epoch of one it kept, or --pre_init_epoch 0 for max_acc.pth (the best by "
                            "validation)")
        raise UserError(f"no pre-trained checkpoint at {path}: run --phase pre_train first with the same "
                        "--dataset/--backbone/--pre_label, or pass --init_weights")

    def iterations_per_epoch(self) -> int:
        return self.opt.iterations

    def set_lr(self, epoch: int) -> dict[str, float]:
        opt = self.opt
        floor_ratio = opt.lr_min / opt.lr1
        lr1 = scheduled_lr(opt.lr1, epoch, opt.step_size, opt.gamma, opt.lr1 * floor_ratio)
        lr2 = scheduled_lr(opt.lr2, epoch, opt.step_size, opt.gamma, opt.lr2 * floor_ratio)
        self.optimizer.param_groups[0]["lr"], self.optimizer.param_groups[1]["lr"] = lr1, lr2
        return {"lr1": lr1, "lr2": lr2}

    def lr_hint(self) -> str:
        opt = self.opt
        return (f"--meta_lr1 (set to {opt.lr1:g}), --meta_lr2 (set to {opt.lr2:g}) or --base_lr "
                f"(set to {opt.inner.lr:g})")

    # ----------------------------------------------------------------- the tasks of a meta-batch (Alg. 2)
    def run_tasks(self, episodes: list[np.ndarray], weight: float, timer: Timer) -> list[tuple[float, np.ndarray]]:
        """The tasks of a meta-batch (:meth:`run_local`), split across the ranks of a torchrun run: every rank holds
        the same ``episodes`` (the same sampler, seed and state), runs the contiguous block
        :func:`utils.distributed.shard` gives it, merges the BN running statistics into those one process would hold
        (:func:`utils.distributed.sync_bn_running_stats`) and gathers every task's result in task order, so the loss
        check, the log and the hard-task record see the whole meta-batch on every rank. The gradients are summed
        across ranks in :meth:`outer_step`. One process: exactly :meth:`run_local`.

        Returns:
            per task, the query loss and the per-class query accuracy ``(way,)`` in episode label order.
        """
        before = distributed.bn_state(self.model) if distributed.active() else None
        mine = distributed.shard(episodes)
        results = self.run_local(list(mine), weight, timer) if len(mine) else []
        if before is not None:
            distributed.sync_bn_running_stats(self.model, before)
            results = distributed.gather_shards(results)
        for lv, _ in results:
            self.check_loss(lv, *self.position)  # normal and hard tasks alike: stop before any outer step
        return results

    def run_local(self, episodes: list[np.ndarray], weight: float, timer: Timer) -> list[tuple[float, np.ndarray]]:
        """Alg. 2 for the tasks of a meta-batch together (:meth:`models.mtl.MetaLearner.forward_tasks`): one image
        gather and transform, per-task encoder passes, one batched inner loop on each support (Eq. 3), the query
        loss at the adapted weights, and one backward of ``weight * sum of the query losses`` (the same gradients
        as one backward per task; they accumulate until :meth:`outer_step`).

        Returns:
            per task, the query loss and the per-class query accuracy ``(way,)`` in episode label order.
        """
        way, shot = self.opt.way, self.opt.shot
        tasks = [Task.from_episode(ep, way, shot) for ep in episodes]
        t, n_s, n_q = len(tasks), way * shot, len(tasks[0].query)
        timer.start("data")
        idx = np.concatenate([task.episode for task in tasks])
        x = self.data.eval_transform(to_device(torch.from_numpy(self.train_set.images[idx]), self.device))
        x = to_channels_last(x, self.device, self.settings.run.channels_last).view(t, n_s + n_q, *x.shape[1:])
        y_s, y_q = tasks[0].y_support.to(self.device), tasks[0].y_query.to(self.device)
        timer.stop("data")
        timer.start("compute")
        with autocast(self.device, self.settings.run.amp):
            logits = self.model.forward_tasks(x[:, :n_s], y_s, x[:, n_s:], self.inner, encoder=self.train_encoder)
        losses = F.cross_entropy(logits.float().reshape(t * n_q, -1), y_q.repeat(t), reduction="none")
        losses = losses.view(t, n_q).mean(1)                                      # (T,) per-task query CE
        (losses.sum() * weight).backward()
        correct = by_class((logits.argmax(-1) == y_q).float(), way, dim=1).mean(1)   # (T, way)
        timer.stop("compute")
        values, correct = losses.tolist(), correct.cpu().numpy()
        return [(lv, c) for lv, c in zip(values, correct)]

    def outer_step(self) -> None:
        """Eq. 4-5: one Adam step on the accumulated query-loss gradients (under torchrun first summed over the
        ranks: each rank's tasks carry the meta-batch's weight, so the sum is the single-process gradient)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        distributed.all_reduce_grads(params)
        self.step_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        if not all_finite(params):  # one host sync: a finite query loss can still give non-finite weights
            names = {id(p): n for n, p in self.model.named_parameters()}
            bad = next(p for p in params if not all_finite(p))
            epoch, it, n = self.position
            raise UserError(f"the outer step gave non-finite parameters ({names.get(id(bad), '?')}: "
                            f"{describe_nonfinite(bad.detach())}) at epoch {epoch}, iteration {it}/{n} although the "
                            f"query loss was finite; {self.stopped()}. Lower {self.lr_hint()}")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """``num_batch`` meta-batches, each one outer update (Eq. 4-5) on the mean query loss of its tasks. With the
        hard-task meta-batch (Alg. 1 lines 8-20): each normal task's failure class is recorded, the planner returns
        the hard tasks, and they run after the meta-batch's update, one update each (``--ht_update separate``), or
        join its update with the same weight as every other task (``shared``)."""
        opt, hs = self.opt, self.settings.hard
        self.model.train()
        loss_avg, acc_avg, timer = Averager(), Averager(), Timer()
        self.optimizer.zero_grad(set_to_none=True)
        for it in tqdm(range(opt.iterations), desc=f"meta-train epoch {epoch}", disable=not self.progress,
                       leave=False):
            self.position = (epoch, it + 1, opt.iterations)
            use_ht = self.hard is not None and epoch >= hs.start_epoch
            n_tasks = hs.normal_tasks if use_ht else opt.meta_batch
            shared = use_ht and hs.update == "shared"
            weight = 1.0 / (n_tasks + hs.hard_tasks) if shared else 1.0 / n_tasks
            episodes = [self.sampler.sample() for _ in range(n_tasks)]
            for ep, (loss, per_class) in zip(episodes, self.run_tasks(episodes, weight, timer)):
                loss_avg.add(loss)
                acc_avg.add(float(per_class.mean()))
                if use_ht:
                    self.hard.record(Task.from_episode(ep, opt.way, opt.shot).classes(self.train_set.labels),
                                     per_class, ep)
            if not shared:
                self.outer_step()
            if use_ht:
                hard_tasks = self.hard.plan()
                for task in hard_tasks:
                    (_, hard_acc), = self.run_tasks([task.episode], weight if shared else 1.0, timer)
                    self.hard.record_hard(hard_acc)
                    if not shared:
                        self.outer_step()
                if shared:
                    self.outer_step()
                self.hard.log((epoch - 1) * opt.iterations + it + 1, hard_tasks, write=distributed.is_main())
        return {"train_loss": loss_avg.item(), "train_acc": acc_avg.item(),
                "data_time": timer.seconds.get("data", 0.0), "compute_time": timer.seconds.get("compute", 0.0)}

    def validate(self, epoch: int) -> tuple[float, float]:
        w, b = self.model.base_learner.weight.detach(), self.model.base_learner.bias.detach()
        mean, ci, _ = evaluate(self.model.encoder, self.val_set, self.data.eval_transform, self.val_episodes, w, b,
                               self.settings.meta_val, self.device, desc="encode val")
        return mean, ci

    def model_checkpoint(self) -> dict:
        return {"encoder": self.model.encoder.state_dict(), "base_learner": self.model.base_learner.state_dict()}

    def extra_state(self) -> dict:
        st = {"sampler": self.sampler.state_dict()}
        if self.hard is not None:
            st["hard"] = self.hard.state_dict()
        return st

    def load_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.hard is not None and "hard" in state:
            self.hard.load_state_dict(state["hard"])

    def load_resume(self) -> None:
        super().load_resume()
        if self.hard is not None and distributed.is_main():
            self.hard.truncate_log((self.start_epoch - 1) * self.opt.iterations)


# --------------------------------------------------------------------- meta-test
def meta_eval(settings: Settings, device: torch.device) -> dict:
    """Meta-test: ``--num_test_episodes`` fixed episodes from the test classes; prints
    ``test accuracy: MEAN ± CI (N episodes, W-way S-shot)`` and writes the results JSON next to the checkpoint.

    The model is what the checkpoint's spec says (:func:`models.loading.load`; the flags only verify it,
    :func:`config.settings.model_flags_from_checkpoint`): a meta checkpoint gives the SS encoder and the meta-learned
    base learner, a pre-train checkpoint the plain encoder and a fresh head (:func:`models.heads.fresh_init` with
    ``--eval_seed``): the paper's "FT" baseline (pre-trained backbone, fine-tuned linear base learner, no
    meta-training)."""
    ev, path = settings.test, settings.eval_checkpoint
    if settings.eval_weights:
        check_weights_path(path, "--eval_weights")
    elif not os.path.isfile(path):
        raise UserError(f"no checkpoint to evaluate at {path}: run --phase meta_train first with the same "
                        "settings, or pass --eval_weights")
    data = DataBundle(settings.data)
    test_set = data.load("test")
    check_episode_fit(test_set, ev.way, ev.shot + ev.query, "meta-test")
    model = load(path, device, settings.model.expect())
    w, b = model.head_init(ev.way, ev.seed)
    episodes = fixed_episodes(test_set.labels, ev.episodes, ev.way, ev.shot, ev.query, ev.seed)
    # a non-finite feature or logit stops here (utils.finite.NonFiniteError), before anything is written
    mean, ci, accs, class_accs = evaluate(model.encoder, test_set, data.eval_transform, episodes, w, b, ev, device,
                                          desc="encode test", return_class_acc=True)
    result = write_results(path, model.kind, mean, ci, len(accs), ev, settings.record(), write=distributed.is_main(),
                           episode_accs=accs,
                           class_accs=class_accuracy(class_accs, episodes, test_set.labels, test_set.class_names))
    if distributed.is_main():  # the folder's report.md, with this result (trainer/run_report.py)
        write_run_report(os.path.dirname(result["path"]))
    return result


class ResultsNotWritten(UserError):
    """The accuracy was computed and printed, but its results file could not be written: exit status 5
    (``main.cli``), so that a script can tell "no result" (2) from "a result, not saved" (5)."""

    exit_code = 5


def write_results(path: str, kind: str, mean: float, ci: float, n: int, ev: EvalSettings, settings: dict,
                  write: bool = True, episode_accs: np.ndarray | None = None,
                  class_accs: dict | None = None) -> dict:
    """Print the test line, then write the results JSON next to the checkpoint ``path`` (``write``: under torchrun
    rank 0 only; every rank returns the same dict). The accuracy is printed first, so that it is seen even when the
    folder cannot be written (:class:`ResultsNotWritten`, after the line).

    ``episode_accs`` ``(E,)`` in [0, 1] are stored rounded to 6 decimals (``episode_accs``: the run report's histogram,
    a paired comparison made afterwards; float32 accuracies carry 7 digits), ``class_accs`` as
    :func:`models.evaluate.class_accuracy` gives them (``class_accs``: the report's hardest and easiest classes)."""
    method = HEADS[ev.classifier].method(kind)  # e.g. mtl, pretrained, mtl+centroid
    result = {"mean": round(100 * mean, 4), "ci95": round(100 * ci, 4), "episodes": n, "way": ev.way,
              "shot": ev.shot, "query": ev.query, "method": method, "checkpoint": path,
              "classifier": ev.classifier, "eval_mode": ev.mode, "eval_seed": ev.seed,
              "inner_steps": ev.inner.steps, "base_lr": ev.inner.lr, "flip_support": ev.flip_support,
              "settings": settings}
    if episode_accs is not None:
        result["episode_accs"] = [round(float(a), 6) for a in episode_accs]
    if class_accs is not None:
        result["class_accs"] = class_accs
    name = "results.json" if method == "mtl" else f"results_{method.replace('+', '_')}_{ev.way}way{ev.shot}shot.json"
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))  # a TF weights folder: in it
    out = os.path.join(folder, name)
    print(f"test accuracy: {format_acc(mean, ci)} ({n} episodes, {ev.way}-way {ev.shot}-shot)", flush=True)
    if write:
        remove_orphaned_temporaries(folder)  # those of dead processes only: a training may be writing there
        try:
            write_json_atomic(out, result)
        except WriteError as e:
            raise ResultsNotWritten(
                f"the results could not be written to {out}: {e.reason} (the accuracy above is complete; {e.fix}, "
                "then run the same command again, or copy the checkpoint to a writable folder and pass the copy "
                "as --eval_weights)") from None
    print(f"results written to {out}", flush=True)
    result["path"] = out
    return result
