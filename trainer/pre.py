"""Pre-train phase (paper Sec. 4.1, Alg. 1 lines 1-5): a backbone trained as an ordinary classifier on all
base classes, validated every epoch by few-shot episodes on the validation classes.

Official PyTorch recipe (reference 5.1, ``main.py`` defaults): SGD Nesterov (lr 0.1, momentum 0.9, weight
decay 5e-4), batch 128, lr x0.2 every 30 epochs, train-time augmentation, a 640-1000-C MLP head; every epoch
600 validation episodes in which a fresh 5-way linear head is fine-tuned for 100 steps at lr 0.01 on frozen
features. The best epoch by validation is kept as ``max_acc.pth``; ``epoch<N>.pth`` every ``pre_save_every``.
The paper's recipe (``--recipe paper``) uses Adam, batch 64, dropout and a linear head (reference 5.2).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config.settings import Settings
from models.evaluate import evaluate
from models.heads import fresh_init
from models.mtl import PreLearner
from trainer.base import BaseTrainer, scheduled_lr
from utils import distributed
from utils.errors import UserError
from utils.gpu_tools import autocast, maybe_compile, to_channels_last, to_device, use_channels_last
from utils.misc import Averager, Timer, generator_state, set_generator_state


class BatchStream:
    """Mini-batch indices from a resumable stream of seeded permutations of the training images.

    ``iters_per_epoch == 0``: an epoch is one pass over a fresh permutation (the last batch may be smaller,
    as the official DataLoader). Otherwise an epoch is that many full batches, drawn from consecutive
    permutations (iteration-based schedules of the paper recipe).
    """

    def __init__(self, n: int, batch_size: int, iters_per_epoch: int, seed: int):
        self.n, self.batch_size, self.iters = n, batch_size, iters_per_epoch
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.perm = np.zeros(0, dtype=np.int64)
        self.pos = 0

    def epoch(self) -> list[np.ndarray]:
        if self.iters == 0:
            perm = self.rng.permutation(self.n)
            return [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        out = []
        for _ in range(self.iters):
            need, parts = self.batch_size, []
            while need:
                if self.pos >= len(self.perm):
                    self.perm, self.pos = self.rng.permutation(self.n), 0
                take = self.perm[self.pos:self.pos + need]
                self.pos += len(take)
                need -= len(take)
                parts.append(take)
            out.append(np.concatenate(parts))
        return out

    def state_dict(self) -> dict:
        return {"rng": generator_state(self.rng), "perm": torch.from_numpy(self.perm.copy()), "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        set_generator_state(self.rng, s["rng"])
        self.perm = s["perm"].numpy().copy()
        self.pos = int(s["pos"])


class PreTrainer(BaseTrainer):
    kind = "pre"

    def __init__(self, settings: Settings, device: torch.device):
        super().__init__(settings, device, settings.paths.pre_dir, settings.pre_train)
        self.save_every = self.opt.save_every

    def build(self) -> None:
        opt, run, val = self.opt, self.settings.run, self.settings.pre_val
        self.train_set = self.data.load("pre_train")
        self.val_set = self.data.load("val")
        self.val_episodes = self.fixed_val_episodes(self.val_set, val)
        self.spec = self.settings.model.pre_spec(self.train_set.num_classes)  # (written into every checkpoint)
        self.model = PreLearner.from_spec(self.spec).to(self.device)
        if use_channels_last(self.device, run.channels_last):
            self.model = self.model.to(memory_format=torch.channels_last)
        # --compile (CUDA): a compiled view of the encoder for the training step only; checkpoints save
        # self.model's own state dict, so their keys stay plain, and validation uses the uncompiled encoder.
        self.train_encoder = maybe_compile(self.model.encoder, self.device, run.compile)
        self.build_distributed()
        params = [{"params": self.model.encoder.parameters()}, {"params": self.model.pre_fc.parameters()}]
        if opt.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=True,
                                             weight_decay=opt.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.stream = BatchStream(len(self.train_set.labels), self.global_batch, opt.iters_per_epoch,
                                  self.settings.seed)
        # validation's fresh head: the FT baseline's (the way and --eval_seed of the validation episodes)
        self.head_w, self.head_b = fresh_init(val.way, self.model.encoder.out_dim, val.seed)
        self.labels_t = torch.from_numpy(self.train_set.labels.astype(np.int64))

    def iterations_per_epoch(self) -> int:
        return self.opt.iters_per_epoch or -(-len(self.train_set.labels) // self.global_batch)

    # ----------------------------------------------------------------- torchrun
    @property
    def global_batch(self) -> int:
        """Images per optimizer step: ``--pre_batch_size`` per process times the number of processes."""
        return self.opt.batch_size * distributed.world()

    def build_distributed(self) -> None:
        """``--sync_bn``: BatchNorm with the global batch's statistics; under torchrun the model is wrapped in
        ``DistributedDataParallel`` (gradients averaged over the ranks at each backward), and each rank's global
        torch RNG (dropout) gets its own seed, as its ``aug_gen`` (``BaseTrainer``) does."""
        self.ddp = None
        if self.opt.sync_bn:
            distributed.convert_sync_bn(self.model)
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            # the model is built (the same on every rank); from here each rank's dropout masks are its own
            torch.manual_seed(self.settings.seed + distributed.RANK_SEED_STRIDE * distributed.rank())

    def check_resume(self, old: dict) -> None:
        """Pre-train resumes on the same number of processes only: the global batch, the shards of each batch and
        the augmentation draws depend on it (meta-train and meta-test resume on any number)."""
        was, now = old.get("world_size", 1), distributed.world()
        if was != now:
            raise UserError(f"--resume: the pre-train run in {self.log_dir} ran on {was} process(es) (global batch "
                            f"{old.get('pre_global_batch', old['pre_batch_size'])}), not {now}; resume it with "
                            f"torchrun --nproc_per_node={was} (or python main.py for 1)")

    def train_step_distributed(self, idx: np.ndarray) -> tuple[float, float]:
        """One step of the global batch ``idx`` under torchrun: this rank's contiguous shard through the DDP model,
        the loss ``world * (sum of the shard's CE) / len(idx)`` so that DDP's average over the ranks is the gradient
        of the global batch's mean CE (shards of unequal size included); returns the global loss and accuracy.
        A rank whose shard is empty (a last batch smaller than the world) runs one image at weight 0. The precision
        is the one of :meth:`train_step` (``Settings.run.amp``: ``--amp`` with its ``--amp_dtype``)."""
        lo, hi = distributed.shard_range(len(idx))
        mine = idx[lo:hi] if hi > lo else idx[:1]
        x, y = self.load_batch(mine)
        with autocast(self.device, self.settings.run.amp):
            logits = self.ddp(x, encoder=self.train_encoder)
            ce = F.cross_entropy(logits.float(), y, reduction="sum") * (1.0 if hi > lo else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        (ce * (distributed.world() / len(idx))).backward()
        self.step_optimizer()
        hits = (logits.argmax(1) == y).float().sum() * (1.0 if hi > lo else 0.0)
        sums = distributed.all_reduce_sum(torch.stack([ce.detach(), hits]).float())
        lv, acc = (sums / len(idx)).tolist()
        return lv, acc

    def set_lr(self, epoch: int) -> dict[str, float]:
        opt = self.opt
        lr = scheduled_lr(opt.lr, epoch, opt.step_size, opt.gamma)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return {"lr": lr}

    def lr_hint(self) -> str:
        return f"--pre_lr (set to {self.opt.lr:g})"

    def load_batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The data half of a step: gather the images (from memory or the memmapped cache), copy them to the
        device (pinned, non-blocking on CUDA), augment there. Returns x (B, 3, S, S) float, y (B,) long."""
        x = to_device(torch.from_numpy(self.train_set.images[idx]), self.device)
        y = self.labels_t[idx].to(self.device, non_blocking=True)
        x = self.data.train_transform(x, generator=self.aug_gen)
        return to_channels_last(x, self.device, self.settings.run.channels_last), y

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """The compute half of a step: forward, cross-entropy, backward, optimizer step.
        Returns the loss and the batch accuracy (one device sync for both)."""
        with autocast(self.device, self.settings.run.amp):
            logits = self.model(x, encoder=self.train_encoder)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.step_optimizer()
        lv, acc = torch.stack([loss.detach(), (logits.argmax(1) == y).float().mean()]).tolist()
        return lv, acc

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loss_avg, acc_avg, timer = Averager(), Averager(), Timer()
        batches = self.stream.epoch()
        for it, idx in enumerate(tqdm(batches, desc=f"pre-train epoch {epoch}", disable=not self.progress,
                                      leave=False)):
            self.position = (epoch, it + 1, len(batches))
            if self.ddp is not None:  # torchrun (data and compute in one timer: the shard is loaded in the step)
                timer.start("compute")
                lv, acc = self.train_step_distributed(idx)
                timer.stop("compute")
            else:
                timer.start("data")
                x, y = self.load_batch(idx)
                timer.stop("data")
                timer.start("compute")
                lv, acc = self.train_step(x, y)
                timer.stop("compute")
            self.check_loss(lv, epoch, it + 1, len(batches))
            loss_avg.add(lv, len(idx))
            acc_avg.add(acc, len(idx))
        return {"train_loss": loss_avg.item(), "train_acc": acc_avg.item(),
                "data_time": timer.seconds.get("data", 0.0), "compute_time": timer.seconds.get("compute", 0.0)}

    def validate(self, epoch: int) -> tuple[float, float]:
        """Few-shot validation of the encoder: a fresh linear head fine-tuned on each episode's support."""
        mean, ci, _ = evaluate(self.model.encoder, self.val_set, self.data.eval_transform, self.val_episodes,
                               self.head_w, self.head_b, self.settings.pre_val, self.device, desc="encode val")
        return mean, ci

    def model_checkpoint(self) -> dict:
        return {"encoder": self.model.encoder.state_dict(), "pre_fc": self.model.pre_fc.state_dict(),
                "num_classes": self.train_set.num_classes, "class_names": list(self.train_set.class_names)}

    def extra_state(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
