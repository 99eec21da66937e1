"""Speed benchmark of the training and evaluation paths (issue #5).

    python run_experiment.py BENCH                # = python -m tools.benchmark --out logs/bench
    python -m tools.benchmark --out logs/bench [--full] [--official] [--glyph_episodic 600] [--tiny]

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (the same numbers as a table, also printed).

Everything is measured through the project's own code paths on generated data: ``PreTrainer.build`` /
``load_batch`` / ``train_step`` (pre-train step and loader), ``MetaTrainer.build`` / ``run_tasks`` / ``outer_step``
(one meta-training episode, first and second order), ``encode_split`` + ``evaluate_bank`` and
``evaluate_episodic`` (meta-test), on splits read through ``DataBundle.load`` (folder images through the
decoded-image cache, or an ``.npz`` pack). Times are medians of repeated runs; on CUDA every timed region ends
with ``torch.cuda.synchronize()``. Weights are randomly initialised (speed does not depend on them; equality of
the two evaluation paths is checked on the same episodes).

Configurations:

* default (CPU, about 3 minutes on 2 idle cores for the fp32 pass, plus the bf16 pass below): ResNet-12 at 84 px ("pytorch" preprocessing with the
  RandomResizedCrop augmentation), pre-train batch 16, 5-way 1-shot episodes with 5 queries per class in
  meta-train (as the DEMO; 15 with ``--full`` and ``--official``) and 15 in meta-test; the meta-test split is
  small (the feature bank's cost grows with the split, the per-episode path's with the episodes, so a
  miniImageNet-sized estimate is reported next to the measured number). Then the embedded glyph pack
  (``data/glyphs100.npz``) with the DEMO's settings (``run_experiment.DEMO``: backbone, 32 px, its meta-test
  inner loop) on an encoder given the DEMO's pre-training for a few steps (or ``--glyph_checkpoint``): the bank
  on all 600 fixed episodes, the per-episode path on the first ``--glyph_episodic`` of them (100 by default,
  600 for the full comparison), equal accuracies checked episode by episode.
  The main configuration runs twice, in fp32 and in bf16 (``--amp --amp_dtype bfloat16``), and the table puts
  the two side by side (``bf16_vs_fp32``: pre-train images/s, meta-train s/episode, meta-test encode images/s and
  bf16's speed-up). On a CPU with avx512_bf16 / amx_bf16 bf16 runs natively; on one without (``bf16.emulated``)
  torch would emulate it, 9-20x slower than fp32 on our AVX2 machine, so the bf16 pass is left out (``bf16.skipped``, one line)
  unless ``--precisions fp32,bf16`` asks for it (or ``--tiny``); it then measures the code path, not a speed-up.
* ``--full`` (a GPU, a few minutes): ResNet-12 at 84 px on miniImageNet-sized synthetic data (64 x 600 training
  and 20 x 600 test images): pre-train images/s (fp32, bf16, bf16 + channels_last, optionally compiled),
  meta-train episodes/s, the 600-episode meta-test (bank and per-episode), each in fp32 and bf16.
* ``--official``: adds the official PyTorch backbone (ResNet-25 at 80 px): one per-episode validation episode
  and one first-order meta-training episode (about a minute on 2 CPU cores).
* ``--parts backbones``: every registered backbone (``models.resnet_mtl.BACKBONES``) on a ready random batch at
  84 and 32 px: parameters, forward GFLOP per image, eval-mode forward images/s of the meta encoder (SS convs:
  the meta-test encode) and pre-train step images/s (plain backbone + the MLP head, forward + backward + SGD);
  ``--backbones a,b`` picks some. On the CPU about 6 minutes (360 s for five of them with 1 thread on a busy
  2-core VM; WRN-28-10 at 84 px is 72 GFLOP per image). ``--backbone_table`` prints the counts and GFLOP only.
* ``--tiny``: the same code with tiny sizes (tests, dry checks of ``--full`` without a GPU).

``backbone_fraction_of_matmul_peak`` = the backbone's forward FLOP rate (2 x the multiply-accumulates of its
convolutions and linear layers, counted with forward hooks, times the measured eval-mode forward images/s) over
the FLOP rate of a dense square fp32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import run_experiment
from config.options import parse_args
from config.settings import Settings
from data_generator.dataset_loader import load_split, split_spec
from data_generator.meta_data_generator import fixed_episodes
from data_generator.transforms import BatchTransform
from models.evaluate import EvalSettings, encode_split, evaluate_bank, evaluate_episodic
from models.heads import InnerLoop, fresh_init, make_head
from models.loading import load
from models.mtl import MetaLearner, PreLearner
from models.resnet_mtl import BACKBONES, build_backbone, min_image_size
from trainer.base import DataBundle
from trainer.meta import MetaTrainer
from trainer.pre import PreTrainer
from utils.gpu_tools import autocast, cpu_bf16_feature, pick_device
from utils.misc import Timer, write_json_atomic

BF16 = "bfloat16"                             # the bf16 rows: utils.gpu_tools.amp_mode, forced
BF16_FLAGS = ["--amp", "--amp_dtype", BF16]  # main.py's flags for it

RESULT_KEYS = ("pretrain_images_per_s", "loader_images_per_s", "meta_train_s_per_episode_first_order",
               "meta_train_s_per_episode_second_order", "meta_test_episodes_per_s_bank",
               "meta_test_episodes_per_s_episodic", "peak_rss_mb", "backbone_fraction_of_matmul_peak")

# Sizes. "reps" are timed repetitions (the median is reported), "warmup" untimed ones before them.
CPU_DEFAULT: dict[str, Any] = {
    "name": "cpu-default", "backbone": "resnet12", "image_size": 84, "preprocess": "pytorch",
    "data": "folders", "train_classes": 16, "train_per_class": 20, "val_classes": 5, "test_classes": 8,
    "eval_per_class": 16,
    "pre_batch": 16, "pre_warmup": 1, "pre_reps": 3, "loader_reps": 12,
    # meta-train with 5 queries per class on the CPU (as the DEMO); 15 (the official value) with --full and in
    # --official; the meta-test always uses 15
    "way": 5, "shot": 1, "query": 15, "train_query": 5, "meta_warmup": 0, "meta_reps": 3,
    "fo_update_step": 50, "fo_base_lr": 0.01, "so_update_step": 20, "so_base_lr": 0.001,
    "test_episodes": 600, "test_update_step": 100, "test_base_lr": 0.01, "episodic_episodes": 2,
    "fwd_batch": 16, "fwd_reps": 3, "matmul_n": 2048, "matmul_reps": 5,
    "glyph_episodes": 600, "glyph_episodic": 100, "glyph_pretrain_steps": 40, "glyph_update_step": 0,
    "precisions": ["fp32", "bf16"], "channels_last_row": False, "compile_row": False,
    "official": {"backbone": "resnet25", "image_size": 80, "update_step": 100, "base_lr": 0.01},
    "mini_test_images": 12000,
    # --parts backbones: every registered backbone at these sizes, on a ready batch
    "backbones": {"sizes": [84, 32], "batch": 4, "warmup": 1, "reps": 2},
}
GPU_FULL: dict[str, Any] = dict(
    CPU_DEFAULT, name="gpu-full", data="npz", train_query=15, train_classes=64, train_per_class=600, val_classes=16,
    test_classes=20, eval_per_class=600, pre_batch=128, pre_warmup=5, pre_reps=20, loader_reps=30,
    meta_warmup=3, meta_reps=10, episodic_episodes=100, fwd_batch=256, fwd_reps=10, matmul_n=8192,
    matmul_reps=10, glyph_episodic=600, precisions=["fp32", "bf16"], channels_last_row=True, compile_row=True,
    backbones={"sizes": [84, 32], "batch": 64, "warmup": 2, "reps": 5})
TINY: dict[str, Any] = {
    "backbone": "resnet12_slim", "image_size": 16, "train_classes": 6, "train_per_class": 8, "val_classes": 5,
    "test_classes": 5, "eval_per_class": 4, "pre_batch": 4, "pre_warmup": 1, "pre_reps": 2, "loader_reps": 3,
    "query": 2, "train_query": 2, "meta_warmup": 0, "meta_reps": 2, "fo_update_step": 5, "so_update_step": 3,
    "test_episodes": 12, "test_update_step": 5, "episodic_episodes": 3, "fwd_batch": 4, "fwd_reps": 2,
    "matmul_n": 128, "matmul_reps": 2, "glyph_episodes": 8, "glyph_episodic": 2, "glyph_update_step": 5,
    "glyph_pretrain_steps": 2,
    "official": {"backbone": "resnet25", "image_size": 16, "update_step": 5, "base_lr": 0.01},
    "mini_test_images": 12000,
    "backbones": {"sizes": [16], "batch": 2, "warmup": 0, "reps": 1},
}


# ------------------------------------------------------------------------------------------------ helpers
class Bench:
    """Timing with device synchronisation, a progress log with elapsed time, and the results dict."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], reps: int, warmup: int = 0) -> dict[str, Any]:
        """Median (and all samples) of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - t)
        return {"median_s": statistics.median(samples), "samples_s": [round(s, 5) for s in samples]}

    def log(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def backbone_flops(encoder: nn.Module, size: int) -> int:
    """Forward FLOPs of one (3, size, size) image: 2 x multiply-accumulates of every conv and linear layer,
    counted with forward hooks (BN, activations, pooling and the SS scaling are not counted)."""
    macs = [0]

    def hook(mod: nn.Module, inp, out) -> None:
        if isinstance(mod, nn.Conv2d):
            macs[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            macs[0] += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = encoder.training
    encoder.eval()
    p = next(encoder.parameters())
    with torch.no_grad():
        encoder(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    encoder.train(was)
    for h in handles:
        h.remove()
    return 2 * macs[0]


def matmul_flops_per_s(b: Bench, n: int, reps: int) -> dict[str, Any]:
    """Dense square fp32 matmul (n x n @ n x n) FLOP rate on the device."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g).to(b.device)
    y = torch.randn(n, n, generator=g).to(b.device)
    t = b.time(lambda: torch.mm(x, y), reps, warmup=2)
    return {"n": n, "flop_per_s": 2 * n ** 3 / t["median_s"], **t}


def synthetic_split(n_classes: int, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: per class a smooth random colour pattern, per image noise. uint8
    (N, size, size, 3) class-major, labels int64 (N,)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n_classes * per_class, size, size, 3), dtype=np.uint8)
    rep = -(-size // 4)
    for c in range(n_classes):
        proto = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((rep, rep, 1)))[:size, :size].astype(np.int16)
        noise = rng.integers(-40, 41, (per_class, size, size, 3), dtype=np.int16)
        images[c * per_class:(c + 1) * per_class] = np.clip(proto[None] + noise, 0, 255)
    return images, np.repeat(np.arange(n_classes), per_class).astype(np.int64)


def make_dataset(cfg: dict, stored: int, root: str) -> str:
    """Write the train/val/test splits; returns the --dataset_dir (a folder root, or an .npz pack)."""
    splits = {"train": (cfg["train_classes"], cfg["train_per_class"]), "val": (cfg["val_classes"],
              cfg["eval_per_class"]), "test": (cfg["test_classes"], cfg["eval_per_class"])}
    os.makedirs(root, exist_ok=True)
    if cfg["data"] == "npz":
        arrays = {}
        for i, (split, (c, n)) in enumerate(splits.items()):
            imgs, labels = synthetic_split(c, n, stored, seed=17 + i)
            arrays.update({f"{split}_images": imgs, f"{split}_labels": labels,
                           f"{split}_classes": np.array([f"{split}_{k:03d}" for k in range(c)])})
        path = os.path.join(root, "synthetic.npz")
        np.savez(path, **arrays)  # uncompressed: loads at disk speed
        return path
    first = 0  # class names numbered across the splits: real splits share no class (split hygiene refuses that)
    for i, (split, (c, n)) in enumerate(splits.items()):
        imgs, labels = synthetic_split(c, n, stored, seed=17 + i)
        for j, (img, lab) in enumerate(zip(imgs, labels)):
            d = os.path.join(root, split, f"n{first + lab:04d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{j:05d}.png"), compress_level=1)
        first += c
    return root


def main_args(cfg: dict, dataset_dir: str, log_root: str, extra: list[str] | None = None) -> Settings:
    """main.py's settings for the benchmark runs (parsed by config.options and built by ``Settings.from_args``, as
    ``main.py`` does, so every default is the project's)."""
    flags = ["--dataset", "custom", "--dataset_dir", dataset_dir, "--log_root", log_root,
             "--cache_dir", os.path.join(log_root, "cache"), "--backbone", cfg["backbone"],
             "--image_size", str(cfg["image_size"]), "--preprocess", cfg["preprocess"], "--way", str(cfg["way"]),
             "--shot", str(cfg["shot"]), "--train_query", str(cfg["train_query"]), "--val_query", str(cfg["query"]),
             "--pre_batch_size", str(cfg["pre_batch"]), "--num_val_episodes", "20", "--seed", "1", "--quiet",
             "--init_weights", "scratch"]
    return Settings.from_args(parse_args(flags + (extra or [])))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device)}
    if device.type == "cuda":
        info.update({"gpu": torch.cuda.get_device_name(device), "bf16_supported": torch.cuda.is_bf16_supported(),
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32})
    return info


# ------------------------------------------------------------------------------------------------ measurements
def bench_pretrain(b: Bench, cfg: dict, dataset_dir: str, log_root: str, amp: bool = False,
                   channels_last: bool = False, compile_: bool = False) -> dict[str, Any]:
    """PreTrainer's own build, ``load_batch`` (gather from the cached split + device copy + augmentation) and
    ``train_step`` (forward, backward, SGD step)."""
    extra = (BF16_FLAGS if amp else []) + (["--channels_last"] if channels_last else []) + \
        (["--compile"] if compile_ else [])
    tr = PreTrainer(main_args(cfg, dataset_dir, log_root, extra), b.device)
    t = time.perf_counter()
    tr.build()
    build_s = time.perf_counter() - t
    tr.model.train()
    rng = np.random.default_rng(0)
    n, bs = len(tr.train_set.labels), cfg["pre_batch"]
    batch = lambda: rng.permutation(n)[:bs] if n >= bs else rng.integers(0, n, bs)  # noqa: E731

    def step():
        x, y = tr.load_batch(batch())
        tr.train_step(x, y)

    loader = b.time(lambda: tr.load_batch(batch()), cfg["loader_reps"], warmup=2)
    st = b.time(step, cfg["pre_reps"], warmup=cfg["pre_warmup"])
    return {"pretrain_images_per_s": bs / st["median_s"], "loader_images_per_s": bs / loader["median_s"],
            "batch": bs, "step": st, "loader": loader, "build_s": build_s,
            "images_stored": list(tr.train_set.images.shape), "memmap": isinstance(tr.train_set.images, np.memmap)}


def bench_meta_train(b: Bench, cfg: dict, dataset_dir: str, log_root: str, second_order: bool,
                     amp: bool = False) -> dict[str, Any]:
    """MetaTrainer's own build (random backbone: ``--init_weights scratch``), then one meta-batch of one task:
    sample, ``run_tasks`` (gather, transform, encoder passes, inner loop, backward), ``outer_step`` (Adam)."""
    steps, lr = (cfg["so_update_step"], cfg["so_base_lr"]) if second_order else \
        (cfg["fo_update_step"], cfg["fo_base_lr"])
    extra = ["--update_step", str(steps), "--base_lr", str(lr), "--meta_batch_size", "1",
             "--second_order" if second_order else "--first_order"]
    if second_order:
        extra += ["--inner_loss", "sum"]
    tr = MetaTrainer(main_args(cfg, dataset_dir, log_root, extra + (BF16_FLAGS if amp else [])), b.device)
    tr.build()
    tr.model.train()
    timer = Timer()

    def episode():
        tr.run_tasks([tr.sampler.sample()], 1.0, timer)
        tr.outer_step()

    st = b.time(episode, cfg["meta_reps"], warmup=cfg["meta_warmup"])
    return {"s_per_episode": st["median_s"], "episodes_per_s": 1.0 / st["median_s"], "update_step": steps,
            "base_lr": lr, "inner_loss": tr.settings.args.inner_loss, **st}


def bench_meta_test(b: Bench, encoder: nn.Module, imageset, transform, w: torch.Tensor, bias: torch.Tensor,
                    episodes: np.ndarray, n_episodic: int, way: int, shot: int, steps: int, lr: float,
                    loss_scale: float = 1.0, amp: bool = False, batch_size: int = 256) -> dict[str, Any]:
    """The feature bank (encode the split once + all episodes batched) on every episode, and the per-episode
    path on the first ``n_episodic`` of them; their accuracies are compared on those episodes."""
    b.sync()
    t = time.perf_counter()
    feats = encode_split(encoder, imageset, transform, b.device, batch_size, amp)
    inner = InnerLoop(steps, lr, loss_scale)  # the finetune head: closed form on the bank, autograd per episode
    ev = EvalSettings(way, shot, (episodes.shape[1] - way * shot) // way, len(episodes), 0, inner, amp=amp)
    b.sync()
    t_enc = time.perf_counter() - t
    accs_bank = evaluate_bank(feats, episodes, make_head("finetune", way, (w, bias), inner, "first"), ev)
    b.sync()
    t_bank = time.perf_counter() - t
    n_ep = min(n_episodic, len(episodes))
    t = time.perf_counter()
    accs_epi = evaluate_episodic(encoder, imageset, transform, episodes[:n_ep],
                                 make_head("finetune", way, (w, bias), inner, "autograd"), ev, b.device)
    b.sync()
    t_epi = time.perf_counter() - t
    diff = np.abs(accs_bank[:n_ep] - accs_epi)
    return {"episodes": len(episodes), "split_images": int(len(imageset.labels)), "bank_s": t_bank,
            "bank_encode_s": t_enc, "bank_inner_s": t_bank - t_enc,
            "encode_images_per_s": len(imageset.labels) / t_enc,
            "bank_episodes_per_s": len(episodes) / t_bank, "episodic_episodes": n_ep, "episodic_s": t_epi,
            "episodic_s_per_episode": t_epi / n_ep, "episodic_episodes_per_s": n_ep / t_epi,
            "bank_equals_episodic": bool(np.all(diff <= 1e-6)), "episodes_equal": int((diff <= 1e-6).sum()),
            "max_abs_acc_diff": float(diff.max()) if n_ep else 0.0,
            "mean_acc_bank": float(accs_bank.mean()), "mean_acc_bank_on_episodic_episodes":
                float(accs_bank[:n_ep].mean()), "mean_acc_episodic": float(accs_epi.mean())}


def bench_forward(b: Bench, encoder: nn.Module, size: int, batch: int, reps: int, amp: bool = False) -> dict:
    """Eval-mode forward images/s of the encoder on a ready batch (the backbone alone, no data path)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(b.device)
    encoder.eval()

    def fwd():
        with torch.inference_mode(), autocast(b.device, amp):
            encoder(x)

    t = b.time(fwd, reps, warmup=1)
    return {"batch": batch, "images_per_s": batch / t["median_s"], **t}


def meta_test_setup(cfg: dict, dataset_dir: str, log_root: str, device: torch.device):
    """The test split through DataBundle, a meta-mode learner (SS encoder + base learner) and fixed episodes."""
    settings = main_args(cfg, dataset_dir, log_root)
    data = DataBundle(settings.data)
    test = data.load("test")
    torch.manual_seed(0)
    model = MetaLearner(cfg["backbone"], way=cfg["way"]).to(device)
    eps = fixed_episodes(test.labels, cfg["test_episodes"], cfg["way"], cfg["shot"], cfg["query"], settings.test.seed)
    return data, test, model, eps


def glyph_encoder(b: Bench, cfg: dict, pack: str, log_root: str, checkpoint: str | None):
    """The encoder and base-learner initialisation for the glyph comparison: a given checkpoint (read as
    ``meta_eval`` reads it), or the DEMO's pre-training (``PreTrainer.build`` / ``load_batch`` / ``train_step``,
    the DEMO's recipe) run for ``glyph_pretrain_steps`` steps, with the fresh head of the FT baseline. (Random
    weights map these mostly white images to nearly identical features; the inner loop at the DEMO's lr is then
    chaotic in float32, and any two implementations disagree on some episodes. See docs/BENCHMARKS.md.)"""
    demo = run_experiment.demo_settings()
    if checkpoint:
        model = load(checkpoint, b.device)  # the model its spec describes
        w, bias = model.head_init(cfg["way"], demo.get("eval_seed", 1))
        return model.encoder, w, bias, f"checkpoint {checkpoint} ({model.kind})"
    keep = ("backbone", "image_size", "preprocess", "pre_augment", "seed", "pre_optimizer", "pre_lr",
            "pre_custom_weight_decay", "pre_batch_size", "pre_head", "pre_dropout_keep")
    flags = []
    for k in keep:
        if k in demo:
            flags += [f"--{k}", str(demo[k])]
    args = parse_args(flags + ["--dataset", "glyphs", "--dataset_dir", pack, "--log_root", log_root, "--quiet",
                               "--way", str(cfg["way"]), "--shot", "1", "--num_val_episodes", "1"])
    tr = PreTrainer(Settings.from_args(args), b.device)
    tr.build()
    tr.model.train()
    batches = []
    while len(batches) < cfg["glyph_pretrain_steps"]:
        batches += tr.stream.epoch()
    for idx in batches[:cfg["glyph_pretrain_steps"]]:
        tr.train_step(*tr.load_batch(idx))
    w, bias = fresh_init(cfg["way"], tr.model.encoder.out_dim, args.eval_seed)
    return tr.model.encoder, w.to(b.device), bias.to(b.device), \
        f"the DEMO's pre-training, {cfg['glyph_pretrain_steps']} steps of batch {args.pre_batch_size}, fresh head"


def bench_glyphs(b: Bench, cfg: dict, pack: str, n_episodic: int, log_root: str,
                 checkpoint: str | None = None) -> dict[str, Any]:
    """Bank vs per-episode meta-test on the embedded glyph pack with the DEMO's meta-test settings (backbone,
    image size, preprocessing, 5-way 1-shot, its query count, inner steps and lr, fixed episodes of
    ``--eval_seed 1``): the bank on every episode, the per-episode path on the first ``n_episodic``."""
    demo = run_experiment.demo_settings()
    t = time.perf_counter()
    enc, w, bias, weights = glyph_encoder(b, cfg, pack, log_root, checkpoint)
    prep_s = time.perf_counter() - t
    tf = BatchTransform(int(demo["image_size"]), demo["preprocess"])
    test = load_split(split_spec(pack, "test"), tf.stored_size)
    query = int(demo["val_query"])
    steps = cfg["glyph_update_step"] or int(demo["test_update_step"])
    lr = float(demo["base_lr"])
    eps = fixed_episodes(test.labels, cfg["glyph_episodes"], cfg["way"], 1, query, seed=1)
    r = bench_meta_test(b, enc, test, tf, w, bias, eps, n_episodic, cfg["way"], 1, steps, lr)
    r["episodic_s_for_all_episodes" + ("_est" if r["episodic_episodes"] < len(eps) else "")] = \
        r["episodic_s_per_episode"] * len(eps)
    r["speedup"] = r["episodic_s_per_episode"] * len(eps) / r["bank_s"]
    r.update({"pack": pack, "backbone": demo["backbone"], "image_size": int(demo["image_size"]), "way": cfg["way"],
              "shot": 1, "query": query, "inner_steps": steps, "base_lr": lr, "eval_seed": 1, "weights": weights,
              "weights_prep_s": prep_s})
    return r


def bench_official(b: Bench, cfg: dict, log_root: str) -> dict[str, Any]:
    """The official PyTorch backbone (ResNet-25 at 80 px, "pytorch" preprocessing): one per-episode validation
    episode (our per-episode reference path: 80 images through the encoder, 100 autograd inner steps), the bank's
    cost per episode for a miniImageNet-sized split, and one first-order meta-training episode."""
    o = cfg["official"]
    ocfg = dict(cfg, backbone=o["backbone"], image_size=o["image_size"], preprocess="pytorch",
                meta_reps=1, meta_warmup=0, fo_update_step=o["update_step"], fo_base_lr=o["base_lr"],
                train_query=cfg["query"],
                train_classes=cfg["way"], train_per_class=cfg["shot"] + cfg["query"], val_classes=cfg["way"],
                test_classes=cfg["way"], eval_per_class=cfg["shot"] + cfg["query"], data="npz")
    root = os.path.join(log_root, "official_data")
    ds = make_dataset(ocfg, BatchTransform(o["image_size"], "pytorch").stored_size, root)
    data, test, model, _ = meta_test_setup(dict(ocfg, test_episodes=1), ds, log_root, b.device)
    eps = fixed_episodes(test.labels, 1, cfg["way"], cfg["shot"], cfg["query"], 1)
    fwd = bench_forward(b, model.encoder, o["image_size"], min(cfg["fwd_batch"], 16), 1)
    w, bias = model.base_learner.weight.detach(), model.base_learner.bias.detach()
    mt = bench_meta_test(b, model.encoder, test, data.eval_transform, w, bias, eps, 1, cfg["way"], cfg["shot"],
                         o["update_step"], o["base_lr"])
    tr = bench_meta_train(b, ocfg, ds, log_root, second_order=False)
    per_ep_bank = cfg["mini_test_images"] / fwd["images_per_s"] / 600 + mt["bank_inner_s"]
    return {"backbone": o["backbone"], "image_size": o["image_size"], "inner_steps": o["update_step"],
            "val_episode_s_episodic": mt["episodic_s_per_episode"],
            "val_episode_s_bank_est_miniimagenet": per_ep_bank,
            "meta_train_s_per_episode_first_order": tr["s_per_episode"],
            "forward_images_per_s": fwd["images_per_s"],
            "gflop_per_image": backbone_flops(model.encoder, o["image_size"]) / 1e9}


def bench_backbones(b: Bench, cfg: dict, names: list[str]) -> dict[str, Any]:
    """Per backbone: parameters (plain; SS on top), and at each size of ``cfg["backbones"]["sizes"]`` (those the
    backbone accepts) the forward GFLOP per image, the eval-mode forward images/s of the meta encoder (SS convs, as
    the meta-test encodes) and the pre-train step images/s of ``PreLearner`` (plain backbone + MLP head over 64
    classes, as the pytorch recipe pre-trains: forward, cross-entropy, backward, SGD step) on a ready batch."""
    o = cfg["backbones"]
    out: dict[str, Any] = {}
    for name in names:
        torch.manual_seed(0)
        meta = build_backbone(name, mtl=True).to(b.device)
        pre = PreLearner(name, num_classes=64).to(b.device).train()
        opt = torch.optim.SGD(pre.parameters(), lr=0.01, momentum=0.9)
        row: dict[str, Any] = {"params": sum(p.numel() for p in pre.encoder.parameters()),
                               "ss_params": sum(p.numel() for n, p in meta.named_parameters() if "mtl_" in n),
                               "out_dim": meta.out_dim, "sizes": {}}
        g = torch.Generator().manual_seed(0)
        for size in o["sizes"]:
            if size < min_image_size(name):
                continue
            x = torch.randn(o["batch"], 3, size, size, generator=g).to(b.device)
            y = torch.randint(0, 64, (o["batch"],), generator=g).to(b.device)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(pre(x), y).backward()
                opt.step()

            fwd = bench_forward(b, meta, size, o["batch"], o["reps"])
            st = b.time(step, o["reps"], warmup=o["warmup"])
            row["sizes"][str(size)] = {"gflop_per_image": backbone_flops(meta, size) / 1e9,
                                       "forward_images_per_s": fwd["images_per_s"],
                                       "train_step_images_per_s": o["batch"] / st["median_s"],
                                       "forward": fwd, "train_step": st}
            r = row["sizes"][str(size)]
            b.log(f"backbone {name} @ {size}px: {r['gflop_per_image']:.2f} GFLOP/image, forward "
                  f"{r['forward_images_per_s']:.1f} img/s, pre-train step {r['train_step_images_per_s']:.1f} img/s")
        out[name] = row
    return out


def backbone_table(names: list[str], sizes: tuple[int, ...] = (84, 32)) -> str:
    """The registry as Markdown, no timing: per backbone its parameters (plain), SS parameters, final feature-map
    side and forward GFLOP per image (``backbone_flops``) at each size, and the recipe it gets by default."""
    lines = ["| backbone | params (plain) | SS params | final map " + " / ".join(f"{s}" for s in sizes) + " px | "
             "GFLOP/image " + " / ".join(f"{s}" for s in sizes) + " px | recipe |", "|---|---|---|---|---|---|"]
    for name in names:
        plain, meta = build_backbone(name, mtl=False).eval(), build_backbone(name, mtl=True)
        n = sum(p.numel() for p in plain.parameters())
        ss = sum(p.numel() for k, p in meta.named_parameters() if "mtl_" in k)
        with torch.no_grad():
            maps = [plain.features(torch.zeros(1, 3, s, s)).shape[-1] for s in sizes]
        gflop = [backbone_flops(plain, s) / 1e9 for s in sizes]
        lines.append(f"| `{name}` | {n:,} | {ss:,} | " + " / ".join(f"{m}x{m}" for m in maps) + " | " +
                     " / ".join(f"{g:.2f}" for g in gflop) + f" | {BACKBONES[name].recipe} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ runner
def run(opts: argparse.Namespace) -> dict[str, Any]:

    cfg = dict(GPU_FULL if opts.full else CPU_DEFAULT)
    if opts.tiny:
        cfg.update(TINY, name=cfg["name"] + "-tiny")
    if opts.glyph_episodic is not None:
        cfg["glyph_episodic"] = opts.glyph_episodic
    device = pick_device(opts.device)
    b = Bench(device)
    load_start = os.getloadavg()
    out = os.path.abspath(opts.out)
    if opts.full and device.type != "cuda":
        if not (opts.tiny or opts.device == "cpu"):
            raise SystemExit("error: --full is the GPU configuration (hours on a CPU) and no GPU is available; "
                             "add --tiny for a dry run, or --device cpu to run it on the CPU anyway")
        b.log("warning: --full is the GPU configuration, but it runs on the CPU here")
    work = os.path.join(out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    # bf16 rows run bfloat16 forced (BF16_FLAGS): native on CUDA and on a CPU with avx512_bf16 / amx_bf16. Where it
    # would be emulated (9-20x slower than fp32 here) the bf16 pass is left out unless asked for (--precisions) or
    # --tiny (the dry run of the code); res["bf16"] says which
    parts = set(opts.parts)
    res: dict[str, Any] = {"config": cfg["name"], "parts": sorted(parts), "device": str(device),
                           "loadavg_start": list(load_start)}
    res["machine"] = machine_info(device)
    wanted = list(cfg["precisions"]) if opts.precisions is None else opts.precisions
    if "bf16" in wanted:
        res["bf16"] = bf16_info(device)
    precisions = choose_precisions(wanted, opts.precisions is not None, opts.tiny, res.get("bf16", {}).get("emulated"))
    if "bf16" in wanted and "bf16" not in precisions:
        res["bf16"]["skipped"] = True
        b.log("note: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16), so the bf16 pass is left out "
              "(emulated it is 9-20x slower than fp32 here); --precisions fp32,bf16 runs it anyway")
    elif "bf16" in precisions and res["bf16"]["emulated"]:
        b.log("note: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16): the bf16 rows are emulated, "
              "slower than fp32; they measure the code path, not the speed-up of a CPU with native bf16")
    b.log(f"config {cfg['name']} ({', '.join(sorted(parts))}) on {device} ({res['machine']['cpu_model']}, "
          f"{torch.get_num_threads()} threads; load average {load_start[0]:.2f})")
    res["machine_busy"] = load_start[0] >= 0.5 * (os.cpu_count() or 1)
    if res["machine_busy"]:
        b.log(f"warning: the machine is busy (load average {load_start[0]:.2f} on {os.cpu_count()} CPUs before this "
              "run): every time is inflated, and loops of small operations (the per-episode inner loop) with "
              f"{torch.get_num_threads()} torch threads far more than the rest; --threads 1 avoids the latter")
    if "main" in parts:
        run_main(b, cfg, precisions, work, res)
    if "glyphs" in parts:
        if not os.path.isfile(opts.glyph_pack):
            res["glyphs"] = {"skipped": f"{opts.glyph_pack} not found"}
            b.log(f"glyph comparison skipped ({res['glyphs']['skipped']})")
        else:
            threads = torch.get_num_threads()
            if opts.glyph_threads > 0:
                torch.set_num_threads(opts.glyph_threads)
            try:
                g = bench_glyphs(b, cfg, opts.glyph_pack, cfg["glyph_episodic"], work, opts.glyph_checkpoint)
            finally:
                g_threads = torch.get_num_threads()
                torch.set_num_threads(threads)
            g["torch_threads"] = g_threads
            res["glyphs"] = g
            res["bank_equals_episodic"] = g["bank_equals_episodic"]
            res["glyph_bank_speedup"] = g["speedup"]
            b.log(f"glyphs: bank {g['bank_s']:.2f}s for {g['episodes']} episodes, per-episode "
                  f"{g['episodic_s_per_episode'] * 1000:.0f} ms/episode on {g['episodic_episodes']}; speedup "
                  f"{g['speedup']:.0f}x; equal accuracies: {g['bank_equals_episodic']}")
    if "bank_equals_episodic" not in res and "precisions" in res:
        res["bank_equals_episodic"] = res["precisions"]["fp32"]["meta_test"]["bank_equals_episodic"]
    if "official" in parts:
        res["official_resnet25"] = bench_official(b, cfg, work)
        o = res["official_resnet25"]
        b.log(f"official ResNet-25 @ {o['image_size']}px: per-episode val {o['val_episode_s_episodic']:.1f} s, "
              f"bank (miniImageNet-size estimate) {o['val_episode_s_bank_est_miniimagenet']:.2f} s/episode, "
              f"first-order train episode {o['meta_train_s_per_episode_first_order']:.1f} s")

    if "backbones" in parts:
        res["backbones"] = bench_backbones(b, cfg, opts.backbones)

    res["peak_rss_mb"] = peak_rss_mb()
    res["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - b.t0
    res["settings"] = dict({k: v for k, v in cfg.items() if k != "official"},
                           official=cfg["official"] if "official" in parts else None, glyph_pack=opts.glyph_pack,
                           command=" ".join(["python", "-m", "tools.benchmark"] + opts.argv),
                           weights="random init (glyphs: see glyphs.weights)",
                           timing="median of the timed repetitions after warm-up; CUDA synchronised")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "benchmark.json"), res)
    table = format_table(res)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    b.log(f"wrote {os.path.join(out, 'benchmark.json')} and benchmark.md")
    return res


def run_main(b: Bench, cfg: dict, precisions: list[str], work: str, res: dict[str, Any]) -> None:
    """The main configuration: data, matmul peak, and per precision pre-train, loader, meta-train, meta-test."""
    device = b.device
    stored = BatchTransform(cfg["image_size"], cfg["preprocess"]).stored_size
    t = time.perf_counter()
    dataset_dir = make_dataset(cfg, stored, os.path.join(work, "data"))
    res["data_generation_s"] = time.perf_counter() - t
    b.log(f"synthetic data ({cfg['data']}, stored {stored}px) in {res['data_generation_s']:.1f}s")

    mm = matmul_flops_per_s(b, cfg["matmul_n"], cfg["matmul_reps"])
    res["matmul"] = mm
    b.log(f"fp32 matmul {cfg['matmul_n']}^3: {mm['flop_per_s'] / 1e9:.1f} GFLOP/s")

    rows: dict[str, dict[str, Any]] = {}
    for prec in precisions:
        amp = BF16 if prec == "bf16" else False
        row: dict[str, Any] = {}
        pre = bench_pretrain(b, cfg, dataset_dir, work, amp=amp)
        row["pretrain"] = pre
        b.log(f"[{prec}] pre-train {pre['pretrain_images_per_s']:.1f} img/s, loader "
              f"{pre['loader_images_per_s']:.0f} img/s (build incl. cache {pre['build_s']:.1f}s)")
        if amp and cfg["channels_last_row"]:
            row["pretrain_channels_last"] = bench_pretrain(b, cfg, dataset_dir, work, amp=True, channels_last=True)
            b.log(f"[{prec}+channels_last] pre-train "
                  f"{row['pretrain_channels_last']['pretrain_images_per_s']:.1f} img/s")
        if amp and cfg["compile_row"]:
            try:
                row["pretrain_compiled"] = bench_pretrain(b, cfg, dataset_dir, work, amp=True, channels_last=True,
                                                          compile_=True)
                b.log(f"[{prec}+channels_last+compile] pre-train "
                      f"{row['pretrain_compiled']['pretrain_images_per_s']:.1f} img/s")
            except Exception as e:  # a compiler problem must not lose the other numbers
                row["pretrain_compiled"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                b.log(f"[{prec}] torch.compile failed: {row['pretrain_compiled']['error']}")
        for order in ("first", "second"):
            m = bench_meta_train(b, cfg, dataset_dir, work, second_order=order == "second", amp=amp)
            row[f"meta_train_{order}_order"] = m
            b.log(f"[{prec}] meta-train {order} order: {m['s_per_episode']:.3f} s/episode "
                  f"({m['update_step']} inner steps)")
        data, test, model, eps = meta_test_setup(cfg, dataset_dir, work, device)
        fwd = bench_forward(b, model.encoder, cfg["image_size"], cfg["fwd_batch"], cfg["fwd_reps"], amp=amp)
        row["forward"] = fwd
        w, bias = model.base_learner.weight.detach(), model.base_learner.bias.detach()
        mt = bench_meta_test(b, model.encoder, test, data.eval_transform, w, bias, eps, cfg["episodic_episodes"],
                             cfg["way"], cfg["shot"], cfg["test_update_step"], cfg["test_base_lr"], amp=amp)
        mt["bank_600_s_est_miniimagenet"] = cfg["mini_test_images"] / mt["encode_images_per_s"] + \
            mt["bank_inner_s"] * 600 / len(eps)
        mt["episodic_600_s_est"] = mt["episodic_s_per_episode"] * 600
        row["meta_test"] = mt
        b.log(f"[{prec}] meta-test: bank {mt['bank_episodes_per_s']:.1f} episodes/s on {mt['split_images']} "
              f"images (miniImageNet-size estimate {mt['bank_600_s_est_miniimagenet']:.0f}s / 600), per-episode "
              f"{mt['episodic_s_per_episode']:.2f} s/episode; equal: {mt['bank_equals_episodic']}")
        rows[prec] = row

    fp = rows["fp32"]
    flops = backbone_flops(build_backbone(cfg["backbone"], mtl=True), cfg["image_size"])
    res.update({
        "pretrain_images_per_s": fp["pretrain"]["pretrain_images_per_s"],
        "loader_images_per_s": fp["pretrain"]["loader_images_per_s"],
        "loader_to_pretrain_ratio": fp["pretrain"]["loader_images_per_s"] / fp["pretrain"]["pretrain_images_per_s"],
        "meta_train_s_per_episode_first_order": fp["meta_train_first_order"]["s_per_episode"],
        "meta_train_s_per_episode_second_order": fp["meta_train_second_order"]["s_per_episode"],
        "meta_test_episodes_per_s_bank": fp["meta_test"]["bank_episodes_per_s"],
        "meta_test_episodes_per_s_episodic": fp["meta_test"]["episodic_episodes_per_s"],
        "meta_test_600_s_bank_est_miniimagenet": fp["meta_test"]["bank_600_s_est_miniimagenet"],
        "meta_test_600_s_episodic_est": fp["meta_test"]["episodic_600_s_est"],
        "backbone_gflop_per_image": flops / 1e9,
        "backbone_forward_gflop_per_s": flops * fp["forward"]["images_per_s"] / 1e9,
        "matmul_gflop_per_s": mm["flop_per_s"] / 1e9,
        "backbone_fraction_of_matmul_peak": flops * fp["forward"]["images_per_s"] / mm["flop_per_s"],
    })
    res["precisions"] = rows
    if "bf16" in rows:
        res["bf16_vs_fp32"] = side_by_side(rows)


SIDE_BY_SIDE = (  # (key, label, higher is faster): the fp32 and bf16 rates of one run, side by side
    ("pretrain_images_per_s", "pre-train images/s", True),
    ("meta_train_s_per_episode_first_order", "meta-train s/episode, first order", False),
    ("meta_train_s_per_episode_second_order", "meta-train s/episode, second order", False),
    ("meta_test_encode_images_per_s", "meta-test encode images/s (feature bank)", True),
)


def side_by_side(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per measurement of :data:`SIDE_BY_SIDE`: the fp32 and bf16 values and ``speedup`` = how many times faster
    bf16 is (> 1: faster; < 1: slower, as emulated bf16 on a CPU without native support)."""
    def values(row: dict[str, Any]) -> dict[str, float]:
        return {"pretrain_images_per_s": row["pretrain"]["pretrain_images_per_s"],
                "meta_train_s_per_episode_first_order": row["meta_train_first_order"]["s_per_episode"],
                "meta_train_s_per_episode_second_order": row["meta_train_second_order"]["s_per_episode"],
                "meta_test_encode_images_per_s": row["meta_test"]["encode_images_per_s"]}
    fp, bf = values(rows["fp32"]), values(rows["bf16"])
    return {k: {"fp32": fp[k], "bf16": bf[k], "speedup": bf[k] / fp[k] if higher else fp[k] / bf[k]}
            for k, _, higher in SIDE_BY_SIDE}


def choose_precisions(wanted: list[str], explicit: bool, tiny: bool, emulated: bool | None) -> list[str]:
    """The precisions the main configuration runs: ``wanted`` (the configuration's, or ``--precisions``), less
    bf16 where it would be emulated (``emulated``) unless it was asked for explicitly or the run is ``--tiny``."""
    if "bf16" in wanted and emulated and not explicit and not tiny:
        return [p for p in wanted if p != "bf16"]
    return list(wanted)


def bf16_info(device: torch.device) -> dict[str, Any]:
    """Whether the device runs bfloat16 natively: the CPU feature (``utils.gpu_tools.cpu_bf16_feature``) or the
    GPU's bf16 support; ``emulated`` where the bf16 rows are slower than fp32 by construction."""
    if device.type == "cuda":
        native = bool(torch.cuda.is_bf16_supported())
        return {"native_feature": "cuda bf16" if native else None, "emulated": not native}
    feature = cpu_bf16_feature()
    return {"native_feature": feature, "emulated": feature is None}


def _f(v: Any, nd: int = 2) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1000 or abs(v) < 10 ** -nd):
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v)


def format_table(r: dict[str, Any]) -> str:
    """The numbers of ``benchmark.json`` as Markdown."""
    s = r["settings"]
    m = r["machine"]
    la = r["loadavg_start"]
    lines = [f"Benchmark `{r['config']}` ({', '.join(r['parts'])}) on {r['device']} ({m['cpu_model']}, "
             f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads{', ' + m['gpu'] if 'gpu' in m else ''}; "
             f"torch {m['torch']}); load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1 / 5 / 15 min), "
             f"at end {r['loadavg_end'][0]:.2f}; {r['elapsed_s']:.0f} s in all; peak RSS "
             f"{r['peak_rss_mb']:.0f} MB.", ""]
    rows: list[tuple[str, Any]] = []
    if "precisions" in r:
        mt = r["precisions"]["fp32"]["meta_test"]
        lines += [f"Main configuration: {s['backbone']} at {s['image_size']} px ({s['preprocess']} preprocessing), "
                  f"{s['way']}-way {s['shot']}-shot episodes with {s['train_query']} queries per class in meta-train "
                  f"and {s['query']} in meta-test, random weights, fp32.", ""]
        rows += [
            (f"pre-train images/s (batch {s['pre_batch']}: load + forward + backward + SGD step)",
             r["pretrain_images_per_s"]),
            ("loader images/s (gather from the cached split + augmentation)", r["loader_images_per_s"]),
            ("loader / pre-train", r["loader_to_pretrain_ratio"]),
            (f"meta-train s/episode, first order ({s['fo_update_step']} inner steps)",
             r["meta_train_s_per_episode_first_order"]),
            (f"meta-train s/episode, second order ({s['so_update_step']} inner steps)",
             r["meta_train_s_per_episode_second_order"]),
            (f"meta-test episodes/s, feature bank ({mt['episodes']} episodes on a {mt['split_images']}-image split, "
             f"{s['test_update_step']} steps)", r["meta_test_episodes_per_s_bank"]),
            (f"meta-test episodes/s, per-episode path (measured on {mt['episodic_episodes']})",
             r["meta_test_episodes_per_s_episodic"]),
            (f"meta-test, 600 episodes on a {s['mini_test_images']}-image split, bank, s (estimate)",
             r["meta_test_600_s_bank_est_miniimagenet"]),
            ("meta-test, 600 episodes, per-episode path, s (estimate)", r["meta_test_600_s_episodic_est"]),
            ("bank = per-episode accuracies on the synthetic split", mt["bank_equals_episodic"]),
            ("backbone forward GFLOP/image", r["backbone_gflop_per_image"]),
            ("backbone forward GFLOP/s (eval, batch %d)" % s["fwd_batch"], r["backbone_forward_gflop_per_s"]),
            (f"fp32 matmul GFLOP/s ({s['matmul_n']}^3)", r["matmul_gflop_per_s"]),
            ("backbone fraction of matmul peak", r["backbone_fraction_of_matmul_peak"]),
        ]
    g = r.get("glyphs", {})
    if "skipped" in g:
        rows.append(("glyph pack bank vs per-episode", f"skipped ({g['skipped']})"))
    elif g:
        part = "" if g["episodic_episodes"] == g["episodes"] else f", measured on the first {g['episodic_episodes']}"
        rows += [(f"glyphs ({g['backbone']} {g['image_size']} px, {g['way']}-way 1-shot {g['query']}-query, "
                  f"{g['inner_steps']} steps at lr {g['base_lr']}): bank, s for {g['episodes']} episodes", g["bank_s"]),
                 (f"glyphs: per-episode path, s for {g['episodes']} episodes{part}",
                  g["episodic_s_per_episode"] * g["episodes"]),
                 ("glyphs: bank speedup", g["speedup"]),
                 (f"glyphs: bank_equals_episodic ({g['episodes_equal']}/{g['episodic_episodes']} episodes equal)",
                  g["bank_equals_episodic"]),
                 ("glyphs: mean accuracy bank / per-episode (same episodes)",
                  f"{100 * g['mean_acc_bank_on_episodic_episodes']:.2f}% / {100 * g['mean_acc_episodic']:.2f}%"),
                 ("glyphs: weights", g["weights"]),
                 ("glyphs: torch threads", g.get("torch_threads", ""))]
    o = r.get("official_resnet25")
    if o:
        rows += [(f"official {o['backbone']} {o['image_size']} px: per-episode validation episode, s "
                  f"({o['inner_steps']} steps)", o["val_episode_s_episodic"]),
                 (f"official {o['backbone']}: bank, s per validation episode (estimate, "
                  f"{s['mini_test_images']}-image split)", o["val_episode_s_bank_est_miniimagenet"]),
                 (f"official {o['backbone']}: meta-train s/episode, first order ({o['inner_steps']} steps)",
                  o["meta_train_s_per_episode_first_order"])]
    if rows:
        lines += ["| measurement | value |", "|---|---|"] + [f"| {k} | {_f(v)} |" for k, v in rows]
    if r.get("backbones"):
        bb = s["backbones"]
        lines += ([""] if lines[-1] else []) + [f"Backbones on a ready random batch of {bb['batch']} (fp32; forward = eval-mode meta encoder "
                      "with SS convs; pre-train step = plain backbone + MLP head, forward + backward + SGD):", "",
                  "| backbone | params (M) | SS params (M) | px | GFLOP/image | forward img/s | pre-train step img/s |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in r["backbones"].items():
            for size, v in row["sizes"].items():
                lines.append(f"| {name} | {row['params'] / 1e6:.2f} | {row['ss_params'] / 1e6:.2f} | {size} | "
                             f"{_f(v['gflop_per_image'])} | {_f(v['forward_images_per_s'], 1)} | "
                             f"{_f(v['train_step_images_per_s'], 1)} |")
    if "precisions" in r and (len(r["precisions"]) > 1 or r["device"].startswith("cuda")):
        lines += ["", "| precision | pre-train img/s | loader img/s | meta-train FO episodes/s | "
                      "meta-train SO episodes/s | meta-test 600 bank s (est.) | meta-test 600 per-episode s (est.) |",
                  "|---|---|---|---|---|---|---|"]
        for prec, row in r["precisions"].items():
            lines.append(f"| {prec} | {_f(row['pretrain']['pretrain_images_per_s'], 1)} | "
                         f"{_f(row['pretrain']['loader_images_per_s'], 0)} | "
                         f"{_f(row['meta_train_first_order']['episodes_per_s'])} | "
                         f"{_f(row['meta_train_second_order']['episodes_per_s'])} | "
                         f"{_f(row['meta_test']['bank_600_s_est_miniimagenet'], 1)} | "
                         f"{_f(row['meta_test']['episodic_600_s_est'], 1)} |")
            for k, label in (("pretrain_channels_last", "+ channels_last"), ("pretrain_compiled", "+ compile")):
                if k in row:
                    v = row[k].get("pretrain_images_per_s", row[k].get("error"))
                    lines.append(f"| {prec} {label} | {_f(v, 1)} | | | | | |")
    if r.get("bf16", {}).get("skipped"):
        lines += ["", "bf16: not run (this CPU has no native bfloat16, no avx512_bf16 / amx_bf16; "
                      "`--precisions fp32,bf16` runs it emulated, 9-20x slower than fp32 here)"]
    if "bf16_vs_fp32" in r:
        bf = r.get("bf16", {})
        how = (f"native bfloat16 ({bf['native_feature']})" if not bf.get("emulated", False) else
               "bfloat16 EMULATED (this CPU has no avx512_bf16 / amx_bf16), so slower than fp32 by construction")
        lines += ["", f"fp32 and bf16 side by side (`--amp --amp_dtype bfloat16`; {how}):", "",
                  "| measurement | fp32 | bf16 | bf16 speed-up |", "|---|---|---|---|"]
        for k, label, _ in SIDE_BY_SIDE:
            v = r["bf16_vs_fp32"][k]
            lines.append(f"| {label} | {_f(v['fp32'])} | {_f(v['bf16'])} | {v['speedup']:.2f}x |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="logs/bench", help="folder for benchmark.json and benchmark.md")
    p.add_argument("--full", action="store_true", help="the GPU configuration (miniImageNet-sized, fp32 and bf16)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: tests and dry checks")
    p.add_argument("--official", action="store_true",
                   help="add the official ResNet-25 at 80 px per-episode times (= --parts ...,official)")
    p.add_argument("--glyph_pack", default="data/glyphs100.npz", help="the embedded glyph pack")
    p.add_argument("--glyph_episodic", type=int, default=None,
                   help="glyph episodes through the per-episode path (default 100; 600 with --full)")
    p.add_argument("--glyph_checkpoint", default=None,
                   help="evaluate this checkpoint on the glyph pack (default: a short DEMO pre-training)")
    p.add_argument("--glyph_threads", type=int, default=1,
                   help="torch threads for the glyph comparison (default 1: its per-episode path is a loop of small "
                        "operations, which more threads only slow down when other jobs share the cores; "
                        "0 = the same as the rest)")
    p.add_argument("--skip_glyphs", action="store_true", help="leave out the glyph comparison")
    p.add_argument("--parts", default="main,glyphs",
                   help="comma-separated parts to run: main, glyphs, official, backbones (default main,glyphs)")
    p.add_argument("--backbones", default=",".join(BACKBONES),
                   help="with --parts backbones: which registered backbones (default: all)")
    p.add_argument("--backbone_table", action="store_true",
                   help="print the --backbones' parameter counts, final map sizes and GFLOP at 84 and 32 px "
                        "(no timing) and exit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precisions", default=None,
                   help="comma-separated precisions of the main configuration: fp32, bf16 (default both, side by "
                        "side; bf16 left out where the CPU would emulate it, except with --tiny)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    opts = p.parse_args(argv)
    opts.argv = list(argv)
    parts = [x for x in opts.parts.split(",") if x]
    bad = [x for x in parts if x not in ("main", "glyphs", "official", "backbones")]
    if bad:
        p.error(f"unknown part(s) {', '.join(bad)}; choose from main, glyphs, official, backbones")
    opts.backbones = [x for x in opts.backbones.split(",") if x]
    bad = [x for x in opts.backbones if x not in BACKBONES]
    if bad or not opts.backbones:
        p.error(f"--backbones: unknown backbone(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(BACKBONES)}")
    if opts.precisions is not None:
        opts.precisions = [x for x in opts.precisions.split(",") if x]
        if "fp32" not in opts.precisions or any(x not in ("fp32", "bf16") for x in opts.precisions):
            p.error(f"--precisions {','.join(opts.precisions)}: choose fp32 or fp32,bf16")
        opts.precisions = list(dict.fromkeys(opts.precisions))
    if opts.official and "official" not in parts:
        parts.append("official")
    if opts.skip_glyphs and "glyphs" in parts:
        parts.remove("glyphs")
    opts.parts = parts
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse(sys.argv[1:] if argv is None else list(argv))
    if opts.backbone_table:
        table = backbone_table(opts.backbones)
        print(table)
        return {"backbone_table": table}
    threads = torch.get_num_threads()
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    try:
        return run(opts)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
