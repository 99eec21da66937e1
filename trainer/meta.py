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
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_generator.dataset_loader import check_episode_fit
from data_generator.meta_data_generator import CategoriesSampler, episode_classes, episode_labels, fixed_episodes
from models.mtl import MtlLearner, inner_loop
from models.resnet_mtl import build_backbone
from trainer.base import BaseTrainer, DataBundle, log_dir_meta, log_dir_pre, scheduled_lr
from trainer.evaluate import encode_split, evaluate_bank, evaluate_episodic, init_head
from utils.checkpoint import load_checkpoint, load_strict, read_weights
from utils.errors import UserError
from utils.gpu_tools import autocast, maybe_compile, to_channels_last, to_device, use_channels_last
from utils.misc import Averager, Timer, format_acc, mean_ci, write_json_atomic
from utils.options import settings_dict

SS_KEYS = ("mtl_weight", "mtl_bias")


def meta_batch_forward(model: MtlLearner, x_s: torch.Tensor, y_s: torch.Tensor, x_q: torch.Tensor,
                       update_step: int, base_lr: float, second_order: bool = False, loss_scale: float = 1.0,
                       encoder: torch.nn.Module | None = None) -> torch.Tensor:
    """:meth:`models.mtl.MtlLearner.meta_forward` for the T tasks of a meta-batch at once (Alg. 2 lines 3-6).

    Each task's query and support go through the encoder as separate forward passes, task after task and query
    before support (the official order), so train-mode BN uses the same batch statistics and updates its running
    statistics in the same order as T calls of ``meta_forward``; first order encodes the support without a graph.
    Then one batched :func:`models.mtl.inner_loop` adapts the T copies of theta (the closed-form gradient in first
    order, ``create_graph`` autograd in second order; the tasks' losses are independent, so this is exact), and
    each task's query is classified at its own theta_T. ``tests/trainer/test_speed_paths.py`` checks that the
    query losses and every gradient equal the per-task loop and a straightforward autograd implementation.

    Args:
        model: the meta-mode learner (its ``base_learner`` is theta's initialisation).
        x_s: (T, way*shot, 3, S, S) support images; y_s: (way*shot,) labels in [0, way), the same for every task.
        x_q: (T, n_q, 3, S, S) query images.
        encoder: the module that encodes the images (default ``model.encoder``; the trainer passes the
            ``torch.compile`` wrapper of the same encoder under ``--compile``).
    Returns:
        (T, n_q, way) query logits.
    """
    enc = model.encoder if encoder is None else encoder
    t = x_s.shape[0]
    emb_q, emb_s = [], []
    for i in range(t):
        emb_q.append(enc(x_q[i]))  # official order: query first, then support
        if second_order:
            emb_s.append(enc(x_s[i]))
        else:
            with torch.no_grad():
                emb_s.append(enc(x_s[i]))
    w0 = model.base_learner.weight.unsqueeze(0).expand(t, -1, -1)
    b0 = model.base_learner.bias.unsqueeze(0).expand(t, -1)
    w_t, b_t = inner_loop(torch.stack(emb_s), y_s.unsqueeze(0).expand(t, -1), w0, b0, update_step, base_lr,
                          order="second" if second_order else "first", loss_scale=loss_scale)
    return torch.stack([F.linear(q, w.to(q.dtype), b.to(q.dtype)) for q, w, b in zip(emb_q, w_t, b_t)])


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
        self.position = (0, 0, args.num_batch)  # (epoch, iteration in the epoch, iterations per epoch)

    # ----------------------------------------------------------------- setup
    def build(self) -> None:
        a = self.args
        self.train_set = self.data.load("meta_train")
        self.val_set = self.data.load("val")
        check_episode_fit(self.train_set, a.way, a.shot + a.train_query, "meta-train")
        self.val_episodes = self.fixed_val_episodes(self.val_set, a.num_val_episodes, a.val_query)
        self.model = MtlLearner(a.backbone, "meta", way=a.way).to(self.device)
        self.load_pretrained()
        if use_channels_last(self.device, a.channels_last):
            self.model = self.model.to(memory_format=torch.channels_last)
        # --compile (CUDA): a compiled view of the encoder for the training steps only; checkpoints save
        # self.model's own state dict, so their keys stay plain, and validation uses the uncompiled encoder.
        self.train_encoder = maybe_compile(self.model.encoder, self.device, a.compile)
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
        if a.init_weights == "scratch":  # the paper's "no pre-training" ablation: SS on a random backbone
            print(f"meta-train starts from a randomly initialised {a.backbone} (--init_weights scratch)", flush=True)
            return
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

    def iterations_per_epoch(self) -> int:
        return self.args.num_batch

    def set_lr(self, epoch: int) -> dict[str, float]:
        a = self.args
        floor_ratio = a.meta_lr_min / a.meta_lr1
        lr1 = scheduled_lr(a.meta_lr1, epoch, a.step_size, a.gamma, a.meta_lr1 * floor_ratio)
        lr2 = scheduled_lr(a.meta_lr2, epoch, a.step_size, a.gamma, a.meta_lr2 * floor_ratio)
        self.optimizer.param_groups[0]["lr"], self.optimizer.param_groups[1]["lr"] = lr1, lr2
        return {"lr1": lr1, "lr2": lr2}

    def lr_hint(self) -> str:
        a = self.args
        return f"--meta_lr1 (set to {a.meta_lr1:g}), --meta_lr2 (set to {a.meta_lr2:g}) or --base_lr (set to {a.base_lr:g})"

    # ----------------------------------------------------------------- one task (Alg. 2)
    def run_task(self, episode: np.ndarray, weight: float, timer: Timer) -> tuple[float, np.ndarray]:
        """Alg. 2 for one task: inner loop on the support, query loss at the adapted weights; the loss times
        ``weight`` is back-propagated (gradients accumulate until the caller's optimizer step).

        Returns:
            the query loss and the per-class query accuracy ``(way,)`` in episode label order.
        """
        return self.run_tasks([episode], weight, timer)[0]

    def run_tasks(self, episodes: list[np.ndarray], weight: float, timer: Timer) -> list[tuple[float, np.ndarray]]:
        """Alg. 2 for the tasks of a meta-batch together (:func:`meta_batch_forward`): one image gather and
        transform, per-task encoder passes, one batched inner loop, and one backward of
        ``weight * sum of the query losses`` (the same gradients as one backward per task).

        Returns:
            per task, the query loss and the per-class query accuracy ``(way,)`` in episode label order.
        """
        a = self.args
        t, n_s, n_q = len(episodes), a.way * a.shot, a.way * a.train_query
        timer.start("data")
        idx = np.concatenate([np.asarray(ep) for ep in episodes])
        x = self.data.eval_transform(to_device(torch.from_numpy(self.train_set.images[idx]), self.device))
        x = to_channels_last(x, self.device, a.channels_last).view(t, n_s + n_q, *x.shape[1:])
        y_s = episode_labels(a.way, a.shot).to(self.device)
        y_q = episode_labels(a.way, a.train_query).to(self.device)
        timer.stop("data")
        timer.start("compute")
        encoder = getattr(self, "train_encoder", None)
        with autocast(self.device, a.amp):
            logits = meta_batch_forward(self.model, x[:, :n_s], y_s, x[:, n_s:], a.update_step, a.base_lr,
                                        second_order=a.second_order, loss_scale=self.loss_scale,
                                        encoder=encoder)
        losses = F.cross_entropy(logits.float().reshape(t * n_q, -1), y_q.repeat(t), reduction="none")
        losses = losses.view(t, n_q).mean(1)                                      # (T,) per-task query CE
        (losses.sum() * weight).backward()
        correct = (logits.argmax(-1) == y_q).float().view(t, a.train_query, a.way).mean(1)   # (T, way)
        timer.stop("compute")
        values, correct = losses.tolist(), correct.cpu().numpy()
        for lv in values:
            self.check_loss(lv, *self.position)  # normal and hard tasks alike: stop before any outer step
        return [(lv, c) for lv, c in zip(values, correct)]

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
            self.position = (epoch, it + 1, a.num_batch)
            use_ht = self.hard is not None and epoch >= a.ht_start_epoch
            n_tasks = self.hard.normal_tasks if use_ht else a.meta_batch_size
            episodes = [self.sampler.sample() for _ in range(n_tasks)]
            for ep, (loss, per_class) in zip(episodes, self.run_tasks(episodes, 1.0 / n_tasks, timer)):
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
                                     loss_scale=self.loss_scale, progress=self.progress, amp=a.amp)
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
                                 args.test_update_step, args.base_lr, device, args.eval_classifier, scale, progress,
                                 amp=args.amp)
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
