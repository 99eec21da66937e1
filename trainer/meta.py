"""Meta-train (paper Alg. 1 and 2, Eq. 3-5) and meta-test.

One meta-training step, as the data flows::

    sampler -> (support, query) images -> encoder with SS convs -> features
            -> inner loop fits the base learner on the support (Eq. 3, models.mtl.inner_loop)
            -> query logits at the adapted weights -> query loss
            -> Adam on {SS, BN affine} at meta_lr1 and on the base learner's initialisation at meta_lr2 (Eq. 4-5)

A meta-batch is ``meta_batch_size`` tasks whose query losses are averaged into one outer update (official
PyTorch: 1 task; TF / paper: 2). With ``--hard_task`` the hard-task meta-batch of Alg. 1 (lines 8-20) follows
each meta-batch (``trainer/hard_tasks.py``). Validation every epoch runs fixed episodes on the validation
classes; ``max_acc.pth`` keeps the best epoch. Meta-test (:func:`meta_eval`) runs ``--num_test_episodes`` fixed
episodes on the test classes and reports the mean with its 95% interval.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_generator.dataset_loader import check_episode_fit
from data_generator.meta_data_generator import CategoriesSampler, episode_classes, episode_labels, fixed_episodes
from models.mtl import MtlLearner
from models.resnet_mtl import build_backbone
from trainer.base import BaseTrainer, DataBundle, log_dir_meta, log_dir_pre, scheduled_lr
from trainer.evaluate import encode_split, evaluate_bank, evaluate_episodic, init_head
from utils.checkpoint import load_checkpoint, load_strict, read_weights
from utils.errors import UserError
from utils.gpu_tools import autocast, to_device
from utils.misc import Averager, Timer, format_acc, mean_ci, write_json_atomic
from utils.options import settings_dict

SS_KEYS = ("mtl_weight", "mtl_bias")


def default_pre_checkpoint(args: argparse.Namespace) -> str:
    """The pre-train checkpoint the meta phase starts from when ``--init_weights`` is not given: the same
    dataset, backbone and ``--pre_label``; ``max_acc.pth`` or ``epoch<pre_init_epoch>.pth``."""
    name = f"epoch{args.pre_init_epoch}.pth" if args.pre_init_epoch else "max_acc.pth"
    return os.path.join(log_dir_pre(args), name)


def check_backbone(ck: dict, args: argparse.Namespace, path: str) -> None:
    if "backbone" in ck and ck["backbone"] != args.backbone:
        raise UserError(f"checkpoint {path} was trained with --backbone {ck['backbone']}, "
                        f"not {args.backbone}; pass --backbone {ck['backbone']}")


def inner_loss_scale(args: argparse.Namespace) -> float:
    """``mean``: mean CE over the support (official PyTorch). ``sum``: TF's per-sample CE / shot summed over
    the support (``utils/misc.py xent``), i.e. ``way`` times the mean."""
    return float(args.way) if args.inner_loss == "sum" else 1.0


class MetaTrainer(BaseTrainer):
    kind = "meta"

    def __init__(self, args: argparse.Namespace, device: torch.device):
        super().__init__(args, device, log_dir_meta(args))
        self.max_epoch = args.max_epoch
        self.loss_scale = inner_loss_scale(args)

    # ----------------------------------------------------------------- setup
    def build(self) -> None:
        a = self.args
        self.train_set = self.data.load("meta_train")
        self.val_set = self.data.load("val")
        check_episode_fit(self.train_set, a.way, a.shot + a.train_query, "meta-train")
        self.val_episodes = self.fixed_val_episodes(self.val_set, a.num_val_episodes, a.val_query)
        self.model = MtlLearner(a.backbone, "meta", way=a.way).to(self.device)
        self.load_pretrained()
        ss_bn, head = self.model.meta_parameters()
        self.optimizer = torch.optim.Adam([{"params": ss_bn, "lr": a.meta_lr1},
                                           {"params": head, "lr": a.meta_lr2}])
        self.sampler = CategoriesSampler(self.train_set.labels, a.num_batch, a.way, a.shot, a.train_query, a.seed)
        self.hard = None
        if a.hard_task:
            from trainer.hard_tasks import HardTaskScheduler
            self.hard = HardTaskScheduler(a, self.train_set, self.sampler, self.log_dir)
            if not a.resume and os.path.exists(self.hard.log_path):
                os.unlink(self.hard.log_path)  # a fresh run starts a fresh log

    def load_pretrained(self) -> None:
        a = self.args
        path = a.init_weights or default_pre_checkpoint(a)
        if not os.path.isfile(path):
            raise UserError(f"no pre-trained checkpoint at {path}: run --phase pre_train first with the same "
                            "--dataset/--backbone/--pre_label, or pass --init_weights")
        ck = load_checkpoint(path)
        check_backbone(ck, a, path)
        kind, enc, head = read_weights(ck, path)
        load_strict(self.model.encoder, enc, f"pre-trained checkpoint {path}",
                    allow_missing=SS_KEYS if kind == "pre" else ())
        if kind == "meta":  # continue from meta-trained weights (e.g. META_LOAD with downloaded weights)
            load_strict(self.model.base_learner, head, f"base learner of {path}")
        print(f"meta-train starts from {path} ({kind})", flush=True)

    def set_lr(self, epoch: int) -> dict[str, float]:
        a = self.args
        floor_ratio = a.meta_lr_min / a.meta_lr1
        lr1 = scheduled_lr(a.meta_lr1, epoch, a.step_size, a.gamma, a.meta_lr1 * floor_ratio)
        lr2 = scheduled_lr(a.meta_lr2, epoch, a.step_size, a.gamma, a.meta_lr2 * floor_ratio)
        self.optimizer.param_groups[0]["lr"], self.optimizer.param_groups[1]["lr"] = lr1, lr2
        return {"lr1": lr1, "lr2": lr2}

    # ----------------------------------------------------------------- one task (Alg. 2)
    def run_task(self, episode: np.ndarray, weight: float, timer: Timer) -> tuple[float, np.ndarray]:
        """Alg. 2 for one task: inner loop on the support, query loss at the adapted weights; the loss times
        ``weight`` is back-propagated (gradients accumulate until the caller's optimizer step).

        Returns:
            the query loss and the per-class query accuracy ``(way,)`` in episode label order.
        """
        a = self.args
        n_s = a.way * a.shot
        timer.start("data")
        x = self.data.eval_transform(to_device(torch.from_numpy(self.train_set.images[episode]), self.device))
        y_s = episode_labels(a.way, a.shot).to(self.device)
        y_q = episode_labels(a.way, a.train_query).to(self.device)
        timer.stop("data")
        timer.start("compute")
        with autocast(self.device, a.amp):
            logits = self.model.meta_forward(x[:n_s], y_s, x[n_s:], a.update_step, a.base_lr,
                                             second_order=a.second_order, loss_scale=self.loss_scale)
        loss = F.cross_entropy(logits.float(), y_q)
        (loss * weight).backward()
        correct = (logits.argmax(1) == y_q).float().view(a.train_query, a.way).mean(0)
        timer.stop("compute")
        return loss.item(), correct.cpu().numpy()

    def outer_step(self) -> None:
        """Eq. 4-5: one Adam step on the accumulated query-loss gradients."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        a = self.args
        self.model.train()
        loss_avg, acc_avg, timer = Averager(), Averager(), Timer()
        self.optimizer.zero_grad(set_to_none=True)
        for it in tqdm(range(a.num_batch), desc=f"meta-train epoch {epoch}", disable=not self.progress,
                       leave=False):
            iteration = (epoch - 1) * a.num_batch + it + 1
            use_ht = self.hard is not None and epoch >= a.ht_start_epoch
            n_tasks = self.hard.normal_tasks if use_ht else a.meta_batch_size
            for _ in range(n_tasks):
                ep = self.sampler.sample()
                loss, per_class = self.run_task(ep, 1.0 / n_tasks, timer)
                if not math.isfinite(loss):
                    return {"train_loss": loss}
                loss_avg.add(loss)
                acc_avg.add(float(per_class.mean()))
                if use_ht:
                    self.hard.record(episode_classes(ep, self.train_set.labels, a.way), per_class, ep)
            if use_ht and a.ht_update == "shared":
                self.hard.run_hard_tasks(self, iteration, timer, shared=True)
                self.outer_step()
            else:
                self.outer_step()
                if use_ht:
                    self.hard.run_hard_tasks(self, iteration, timer, shared=False)
        return {"train_loss": loss_avg.item(), "train_acc": acc_avg.item(),
                "data_time": timer.seconds.get("data", 0.0), "compute_time": timer.seconds.get("compute", 0.0)}

    def validate(self, epoch: int) -> tuple[float, float]:
        a = self.args
        w, b = self.model.base_learner.weight.detach(), self.model.base_learner.bias.detach()
        if a.eval_mode == "episodic":
            accs = evaluate_episodic(self.model.encoder, self.val_set, self.data.eval_transform, self.val_episodes,
                                     a.way, a.shot, w, b, a.update_step, a.base_lr, self.device,
                                     loss_scale=self.loss_scale, progress=self.progress)
        else:
            feats = encode_split(self.model.encoder, self.val_set, self.data.eval_transform, self.device,
                                 a.eval_batch_size, a.amp, self.progress, desc="encode val")
            accs = evaluate_bank(feats, self.val_episodes, a.way, a.shot, w, b, a.update_step, a.base_lr,
                                 loss_scale=self.loss_scale)
        return mean_ci(accs)

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
        if self.hard is not None:
            self.hard.truncate_log((self.start_epoch - 1) * self.args.num_batch)


# --------------------------------------------------------------------- meta-test
def load_for_eval(args: argparse.Namespace, path: str, device: torch.device):
    """Build the encoder and the base learner's initialisation from a checkpoint.

    A meta checkpoint (ours or the official ``{'params': ...}`` of the meta phase) gives the SS encoder and the
    meta-learned initialisation theta. A pre-train checkpoint gives the plain encoder and a fresh head
    (:func:`trainer.evaluate.init_head`): the paper's "FT" baseline (pre-trained backbone, fine-tuned
    linear base learner, no meta-training).

    Returns:
        ``(encoder, init_w (way, D), init_b (way,), kind)``.
    """
    ck = load_checkpoint(path)
    check_backbone(ck, args, path)
    kind, enc_sd, head = read_weights(ck, path)
    encoder = build_backbone(args.backbone, mtl=(kind == "meta"))
    load_strict(encoder, enc_sd, f"checkpoint {path}")
    if kind == "meta":
        w, b = head["weight"].float(), head["bias"].float()
        if w.shape[0] != args.way:
            raise UserError(f"checkpoint {path} has a {w.shape[0]}-way base learner, but --way is {args.way}")
    else:
        w, b = init_head(args.way, encoder.out_dim, args.eval_seed)
    return encoder.to(device), w.to(device), b.to(device), kind


def meta_eval(args: argparse.Namespace, device: torch.device) -> dict:
    """Meta-test: ``--num_test_episodes`` fixed episodes from the test classes; prints
    ``test accuracy: MEAN ± CI (N episodes, W-way S-shot)`` and writes the results JSON next to the checkpoint."""
    path = args.eval_weights or os.path.join(log_dir_meta(args), "max_acc.pth")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint to evaluate at {path}: run --phase meta_train first with the same "
                        "settings, or pass --eval_weights")
    data = DataBundle(args)
    test_set = data.load("test")
    check_episode_fit(test_set, args.way, args.shot + args.val_query, "meta-test")
    encoder, w, b, kind = load_for_eval(args, path, device)
    episodes = fixed_episodes(test_set.labels, args.num_test_episodes, args.way, args.shot, args.val_query,
                              args.eval_seed)
    scale = inner_loss_scale(args)
    progress = not args.quiet
    if args.eval_mode == "episodic":
        accs = evaluate_episodic(encoder, test_set, data.eval_transform, episodes, args.way, args.shot, w, b,
                                 args.test_update_step, args.base_lr, device, args.eval_classifier, scale, progress)
    else:
        feats = encode_split(encoder, test_set, data.eval_transform, device, args.eval_batch_size, args.amp,
                             progress, desc="encode test")
        accs = evaluate_bank(feats, episodes, args.way, args.shot, w, b, args.test_update_step, args.base_lr,
                             args.eval_classifier, scale)
    mean, ci = mean_ci(accs)
    method = ("mtl" if kind == "meta" else "pretrained") + ("" if args.eval_classifier == "finetune" else "+centroid")
    result = {"mean": round(100 * mean, 4), "ci95": round(100 * ci, 4), "episodes": len(accs), "way": args.way,
              "shot": args.shot, "query": args.val_query, "method": method, "checkpoint": path,
              "classifier": args.eval_classifier, "eval_mode": args.eval_mode, "eval_seed": args.eval_seed,
              "inner_steps": args.test_update_step, "base_lr": args.base_lr, "settings": settings_dict(args)}
    name = "results.json" if kind == "meta" and args.eval_classifier == "finetune" else \
        f"results_{method.replace('+', '_')}_{args.way}way{args.shot}shot.json"
    out = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    write_json_atomic(out, result)
    print(f"test accuracy: {format_acc(mean, ci)} ({len(accs)} episodes, {args.way}-way {args.shot}-shot)",
          flush=True)
    print(f"results written to {out}", flush=True)
    result["path"] = out
    return result
