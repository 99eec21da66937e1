"""The fast paths compute the same numbers as the straightforward ones (issue #5).

* The lean first-order meta-training step (``models.mtl.MetaLearner.forward_tasks``: support encoded without a
  graph, closed-form inner loop, straight-through theta), one task at a time and batched over a meta-batch, and
  ``MetaTrainer.run_tasks`` against a straightforward implementation of the official PyTorch step (support
  encoded with a graph, ``torch.autograd.grad`` inner loop without ``create_graph``, one task at a time, query
  then support through the encoder): equal query losses, equal gradients on every trainable parameter, equal BN
  running statistics.
* Second order: the batched meta-batch against the per-task loop.
* The formulas are shown equal in float64 (:func:`tests.helpers.assert_close_f64`). In float32 (the trainer's
  dtype, at the official settings) each path is within the float32 noise bound of the exact result of the same
  float32 data (:func:`tests.helpers.float32_noise_floor`), a bound that holds whatever BLAS kernels, summation
  order or thread count a machine uses, and that a 1% error or one inner step fewer exceeds.
* The pre-train step split into ``load_batch`` / ``train_step`` against a plain step.
* ``--compile`` never changes checkpoint keys.
"""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config.options import parse_args
from config.settings import Settings
from data_generator.dataset_loader import ImageSet
from data_generator.meta_data_generator import episode_labels, fixed_episodes
from data_generator.transforms import BatchTransform
from models.heads import InnerLoop
from models.mtl import MetaLearner, PreLearner
from tests.helpers import (NO_NOISE, assert_close_f64, assert_within_float32_noise, float32_error_ratios,
                           float32_noise_floor)
from trainer.meta import MetaTrainer
from trainer.pre import PreTrainer
from utils.gpu_tools import maybe_compile
from utils.misc import Timer

WAY, SHOT, QUERY, SIZE = 5, 2, 3, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is as fast, and far faster when other jobs share the CPU cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0, dtype=torch.float64, way: int = WAY) -> MetaLearner:
    torch.manual_seed(seed)
    m = MetaLearner("resnet12_slim", way=way).to(dtype)
    with torch.no_grad():  # non-trivial SS parameters, BN affine and running statistics
        for name, p in m.named_parameters():
            if p.requires_grad and "base_learner" not in name:
                p.add_(0.05 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    m.train()
    return m


def _tasks(t: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(t, WAY * SHOT, 3, SIZE, SIZE, generator=g, dtype=dtype)
    x_q = torch.randn(t, WAY * QUERY, 3, SIZE, SIZE, generator=g, dtype=dtype)
    return x_s, episode_labels(WAY, SHOT), x_q, episode_labels(WAY, QUERY)


def straightforward_step(model, x_s, y_s, x_q, y_q, steps, lr, loss_scale, weight, second_order=False,
                         noise=NO_NOISE):
    """The official PyTorch meta step written out plainly, one task at a time: query then support through the
    encoder (both with a graph), ``steps`` inner SGD steps with ``torch.autograd.grad`` (no ``create_graph``:
    the inner gradients are constants; ``second_order``: with ``create_graph``, the official TF step), query CE
    at the fast weights, ``backward`` of ``weight * loss``. ``noise`` (float64 only, ``tests/helpers.py``)
    rounds the loop's iterates, logits and losses as float32 would; the caller puts the model under
    ``noise.on``. Returns the query losses and the query logits (T, n_q, way)."""
    losses, logits = [], []
    for i in range(x_s.shape[0]):
        emb_q = model.encoder(x_q[i])
        emb_s = model.encoder(x_s[i])
        fw, fb = model.base_learner.weight, model.base_learner.bias
        for _ in range(steps):
            loss_s = loss_scale * F.cross_entropy(noise(F.linear(emb_s, fw, fb)), y_s)
            gw, gb = torch.autograd.grad(loss_s, (fw, fb), create_graph=second_order)
            fw, fb = noise(fw - lr * noise(gw)), noise(fb - lr * noise(gb))
        lg = noise(F.linear(emb_q, fw, fb))
        loss = noise(F.cross_entropy(lg, y_q))
        (loss * weight).backward()
        losses.append(loss.item())
        logits.append(lg.detach())
    return losses, torch.stack(logits)


def _state(model, losses) -> dict[str, torch.Tensor]:
    """What a meta step produces, as float64 tensors by name: the query losses, the gradient of every trainable
    parameter (all of them must have one) and the BN running statistics."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) > 10 and all(p.grad is not None for p in trainable.values())
    out = {"query losses": torch.as_tensor(losses, dtype=torch.float64)}
    out.update({f"gradient of {n}": p.grad.detach().double().clone() for n, p in trainable.items()})
    out.update({f"BN buffer {n}": b.detach().double().clone() for n, b in model.named_buffers() if "running" in n})
    return out


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("loss_scale", [1.0, 5.0])
def test_lean_first_order_step_equals_straightforward(t, loss_scale):
    ref, lean, batched = _model(), _model(), _model()
    x_s, y_s, x_q, y_q = _tasks(t)
    steps, lr, weight = 15, 0.3, 1.0 / t
    want, _ = straightforward_step(ref, x_s, y_s, x_q, y_q, steps, lr, loss_scale, weight)
    want = _state(ref, want)

    # one task at a time through the same forward (T = 1), one task after another
    got = []
    for i in range(t):
        logits = lean.forward_tasks(x_s[i:i + 1], y_s, x_q[i:i + 1], InnerLoop(steps, lr, loss_scale))[0]
        loss = F.cross_entropy(logits, y_q)
        (loss * weight).backward()
        got.append(loss.item())
    assert_close_f64(_state(lean, got), want)

    # the batched meta-batch: per-task encoder passes, one inner loop over the T tasks, one backward
    logits = batched.forward_tasks(x_s, y_s, x_q, InnerLoop(steps, lr, loss_scale))
    assert logits.shape == (t, WAY * QUERY, WAY)
    losses = torch.stack([F.cross_entropy(lg, y_q) for lg in logits])
    (losses.sum() * weight).backward()
    assert_close_f64(_state(batched, losses.tolist()), want)
    assert any(p.grad.abs().sum() > 0 for n, p in batched.named_parameters() if "mtl_weight" in n)


# --------------------------------------------------------------------------------------------- float32
# Each float32 path is compared with the exact result of the same float32 data (its float64 evaluation) at
# sqrt(longest sum) x the float32 noise floor (tests/helpers.py, float32_noise_floor, which derives the bound).
# The longest sums of a resnet12_slim step on 16-px images: the BN statistics and conv weight gradients of the
# first block, over the query batch's N*H*W (a 3x3 conv sums C_in*9 <= 256*9 = 2304 terms, the head D = 256).
def _longest_sum(way: int, query: int) -> int:
    return max(way * query * SIZE * SIZE, 256 * 9)


class PoolBranches:
    """The window each ``MaxPool2d`` of a model picks, recorded in call order, or replayed.

    A max-pool is not differentiable at a tie: where a window's two largest inputs are within float32 rounding of
    each other, a float32 run may pick the other one (which one depends on the rounding of the machine's conv
    kernels), and its gradient then differs from the exact result's by O(1) in that window, not by rounding
    (measured: a top-two gap of 1.2e-6 in one of 1,536 windows gave 3-5 % errors in some gradients on an AVX-512
    CPU and none on AVX2). Either branch is exact for its side of the tie, so a float32 run is compared with the
    exact result *on the branch it took*: ``with PoolBranches().on(model) as rec`` records the indices
    (``rec.indices``, one ``(N, C, h, w)`` tensor per pool call), ``PoolBranches(indices).on(model64)`` makes the
    pools of the float64 computation take those windows (a differentiable gather of the input, so second order
    too). Enter it outside ``Float32Noise.on`` so that the noise applies to the replayed output."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        self.replay = replay
        self.indices: list[torch.Tensor] = []

    def _hook(self, mod, args, out):
        x = args[0]
        if self.replay is None:
            _, idx = F.max_pool2d(x.detach(), mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                                  return_indices=True)
            self.indices.append(idx)
            return None
        idx = self.replay[len(self.indices)]
        self.indices.append(idx)
        assert idx.shape == out.shape, (idx.shape, out.shape)
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    @contextlib.contextmanager
    def on(self, module: torch.nn.Module):
        hooks = [m.register_forward_hook(self._hook) for m in module.modules() if isinstance(m, torch.nn.MaxPool2d)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
        assert self.replay is None or len(self.indices) == len(self.replay), "the replayed run pooled differently"


def same_branches(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _exact_step(model32, x_s32, y_s, x_q32, y_q, steps, lr, loss_scale, weight, second_order=False, branches=None):
    """The straightforward step on float32 data, computed in float64: its exact result and noise floor
    (:func:`tests.helpers.float32_noise_floor`) as ``(reference, floor, logits, logits_floor, branches)``, the
    query logits (T, n_q, way) apart from the rest. Every max-pool takes the windows ``branches``
    (:class:`PoolBranches`; default: those of the exact computation itself, recorded first), in the noise draws
    too, so that the floor measures rounding, not a flipped tie."""
    def run(noise, pools):
        m = copy.deepcopy(model32).double()
        with pools.on(m), noise.on(m):
            losses, logits = straightforward_step(m, noise(x_s32.double()), y_s, noise(x_q32.double()), y_q,
                                                  steps, lr, loss_scale, weight, second_order, noise)
        state = _state(m, losses)
        state["query logits"] = logits
        return state

    if branches is None:
        rec = PoolBranches()
        run(NO_NOISE, rec)
        branches = rec.indices
    ref, floor = float32_noise_floor(lambda noise: run(noise, PoolBranches(branches)))
    return ref, floor, ref.pop("query logits"), floor.pop("query logits"), branches


def _trainer_flags(way, shot, query, steps, lr, inner_loss, tasks, second_order, log_root):
    return (["--recipe", "pytorch", "--backbone", "resnet12_slim", "--image_size", str(SIZE), "--preprocess",
             "paper", "--way", str(way), "--shot", str(shot), "--train_query", str(query), "--update_step",
             str(steps), "--base_lr", str(lr), "--inner_loss", inner_loss, "--meta_batch_size", str(tasks),
             "--log_root", str(log_root)] + (["--second_order"] if second_order else []))


def _trainer_case(way, shot, query, steps, lr, inner_loss, tasks, second_order, log_root):
    """A float32 meta-batch as the trainer sees it, and the exact result of its straightforward step.

    Returns a dict: ``args``, the image set ``ds`` and ``episodes``; the float32 ``model`` and ``x_s, y_s, x_q,
    y_q`` (the trainer's transform of the episodes' images); ``step`` (steps, lr, loss scale, weight); the exact
    ``ref`` / ``floor`` (:func:`_exact_step`) and its max-pool ``branches``; ``acc`` the per-class query
    accuracies (tasks, way) of the exact logits, which no float32 path can change: every query's top-two margin
    is more than twice the bound on a logit (asserted); ``longest_sum``, ``second_order``."""
    args = parse_args(_trainer_flags(way, shot, query, steps, lr, inner_loss, tasks, second_order, log_root))
    assert args.second_order == second_order and args.inner_loss == inner_loss  # the recipe changes neither
    ds = _imageset()
    episodes = list(fixed_episodes(ds.labels, tasks, way, shot, query, seed=5))
    x = BatchTransform(args.image_size, args.preprocess)(torch.from_numpy(ds.images[np.concatenate(episodes)]))
    x_s, x_q = x.view(tasks, way * (shot + query), *x.shape[1:]).split([way * shot, way * query], dim=1)
    y_s, y_q = episode_labels(way, shot), episode_labels(way, query)
    model = _model(dtype=torch.float32, way=way)
    step = (steps, lr, float(way) if inner_loss == "sum" else 1.0, 1.0 / tasks)
    ref, floor, logits, logits_floor, branches = _exact_step(model, x_s, y_s, x_q, y_q, *step,
                                                             second_order=second_order)
    longest = _longest_sum(way, query)
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 2 * math.sqrt(longest) * logits_floor
    acc = (logits.argmax(-1) == y_q).float().view(tasks, query, way).mean(1).numpy()
    return dict(args=args, ds=ds, episodes=episodes, model=model, x_s=x_s, y_s=y_s, x_q=x_q, y_q=y_q, step=step,
                ref=ref, floor=floor, acc=acc, longest_sum=longest, second_order=second_order, branches=branches)


@pytest.fixture(scope="module")
def official_float32(tmp_path_factory):
    """Two tasks at the official PyTorch inner loop (100 steps at lr 0.01 on the mean support CE), first order."""
    return _trainer_case(WAY, SHOT, QUERY, 100, 0.01, "mean", 2, False, tmp_path_factory.mktemp("official"))


def _check_float32(case, model, losses, what, branches=None):
    """``model``'s gradients and BN buffers and ``losses`` are within the float32 bound of the exact step on the
    max-pool branches the float32 run took (``branches``, recorded with :class:`PoolBranches`; ``None``: the
    exact run's own). Where the run took the exact run's windows everywhere (the usual case) the case's reference
    is used; where it broke a near-tie the other way, the exact step is recomputed on its windows."""
    ref, floor = case["ref"], case["floor"]
    if branches is not None and not same_branches(branches, case["branches"]):
        ref, floor, _, _, _ = _exact_step(case["model"], case["x_s"], case["y_s"], case["x_q"], case["y_q"],
                                          *case["step"], second_order=case["second_order"], branches=branches)
    return assert_within_float32_noise(_state(model, losses), ref, floor, case["longest_sum"], what)


def test_lean_step_float32_within_float_tolerance(official_float32):
    """float32 at the official inner-loop settings: the straightforward step and the batched lean step are each
    within the float32 noise bound of the exact result, so within twice that of each other. (float64, above,
    shows that the two are the same function; here the question is only float32 rounding, which differs
    between machines: BLAS kernels, summation order, thread count.)"""
    c = official_float32
    plain, batched = copy.deepcopy(c["model"]), copy.deepcopy(c["model"])
    with PoolBranches().on(plain) as rec:
        want, _ = straightforward_step(plain, c["x_s"], c["y_s"], c["x_q"], c["y_q"], *c["step"])
    _check_float32(c, plain, want, "straightforward float32 step", rec.indices)
    steps, lr, loss_scale, weight = c["step"]
    with PoolBranches().on(batched) as rec:
        logits = batched.forward_tasks(c["x_s"], c["y_s"], c["x_q"], InnerLoop(steps, lr, loss_scale))
    losses = torch.stack([F.cross_entropy(lg, c["y_q"]) for lg in logits])
    (losses.sum() * weight).backward()
    _check_float32(c, batched, losses.tolist(), "batched float32 step", rec.indices)


def test_float32_bound_is_tight_enough_to_fail(official_float32):
    """The float32 bound is no blanket: every gradient off by 1% exceeds it, and so do the losses and every
    gradient of the step with one inner step fewer (all in float64: this holds on every machine)."""
    c = official_float32
    ref, floor, n = c["ref"], c["floor"], c["longest_sum"]
    scaled = {k: v * 1.01 if k.startswith("gradient") else v for k, v in ref.items()}
    assert min(r for k, r in float32_error_ratios(scaled, ref, floor, n).items() if k.startswith("gradient")) > 1
    short = copy.deepcopy(c["model"]).double()
    steps, lr, loss_scale, weight = c["step"]
    losses, _ = straightforward_step(short, c["x_s"].double(), c["y_s"], c["x_q"].double(), c["y_q"], steps - 1,
                                     lr, loss_scale, weight)
    ratios = float32_error_ratios(_state(short, losses), ref, floor, n)
    assert min(r for k, r in ratios.items() if k.startswith("gradient")) > 1 and ratios["query losses"] > 1
    with pytest.raises(AssertionError, match="above sqrt"):
        _check_float32(c, short, losses, f"{steps - 1} inner steps")


def test_batched_second_order_equals_per_task_loop():
    per_task, batched = _model(), _model()
    x_s, y_s, x_q, y_q = _tasks(3)
    want = []
    for i in range(3):
        logits = per_task.forward_tasks(x_s[i:i + 1], y_s, x_q[i:i + 1], InnerLoop(5, 0.2, 5.0, True))[0]
        loss = F.cross_entropy(logits, y_q)
        (loss / 3).backward()
        want.append(loss.item())
    logits = batched.forward_tasks(x_s, y_s, x_q, InnerLoop(5, 0.2, 5.0, True))
    losses = torch.stack([F.cross_entropy(lg, y_q) for lg in logits])
    (losses.sum() / 3).backward()
    assert_close_f64(_state(batched, losses.tolist()), _state(per_task, want))


def _imageset(n_classes=8, per_class=10, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (n_classes, size, size, 3))
    imgs = np.clip(protos[:, None] + rng.normal(0, 40, (n_classes, per_class, size, size, 3)), 0, 255)
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int64)
    return ImageSet(images=imgs.reshape(-1, size, size, 3).astype(np.uint8), labels=labels,
                    class_names=[f"c{i}" for i in range(n_classes)], source="synthetic")


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_trainer_run_tasks_equals_run_task_loop(second_order, official_float32, tmp_path):
    """The trainer's meta-batch (one gather, batched step) and a loop of one-task ``run_tasks`` calls (how the
    hard tasks run), in float32 (the trainer's dtype), are each within the float32 noise bound of the exact straightforward
    step on the same transformed images, so within twice that of each other, and give its per-class accuracies.
    First order at the official settings (the fixture); second order (the TF step) with the summed support loss
    on a smaller meta-batch (3-way 1-shot)."""
    c = official_float32 if not second_order else _trainer_case(3, 1, 2, 10, 0.001, "sum", 2, True, tmp_path)
    trainers = []
    for _ in range(2):
        tr = MetaTrainer(Settings.from_args(c["args"]), torch.device("cpu"))
        tr.train_set = c["ds"]
        tr.model = copy.deepcopy(c["model"])
        tr.train_encoder = tr.model.encoder  # (what build() sets; no --compile)
        trainers.append(tr)
    batched, looped = trainers
    weight = c["step"][3]
    with PoolBranches().on(batched.model) as rec_batched:
        out = batched.run_tasks(c["episodes"], weight, Timer())
    with PoolBranches().on(looped.model) as rec_looped:
        per_task = [looped.run_tasks([ep], weight, Timer())[0] for ep in c["episodes"]]
    for name, tr, res, rec in (("run_tasks", batched, out, rec_batched), ("one-task loop", looped, per_task,
                                                                           rec_looped)):
        assert all(acc.shape == (c["args"].way,) for _, acc in res)
        np.testing.assert_array_equal(np.stack([acc for _, acc in res]), c["acc"])
        _check_float32(c, tr.model, [lv for lv, _ in res], name, rec.indices)


def test_pretrain_step_equals_plain_step(tmp_path):
    args = parse_args(["--backbone", "resnet12_slim", "--image_size", str(SIZE), "--preprocess", "pytorch",
                       "--pre_batch_size", "8", "--log_root", str(tmp_path), "--seed", "3"])
    ds = _imageset(size=round(SIZE * 92 / 80))
    tr = PreTrainer(Settings.from_args(args), torch.device("cpu"))
    tr.train_set = ds
    tr.labels_t = torch.from_numpy(ds.labels)
    torch.manual_seed(0)
    tr.model = PreLearner("resnet12_slim", num_classes=8)
    tr.train_encoder = tr.model.encoder  # (what build() sets; no --compile)
    plain = copy.deepcopy(tr.model)
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(3)
    for idx in (np.arange(8), np.arange(40, 48)):
        x, y = tr.load_batch(idx)
        xr = tr.data.train_transform(torch.from_numpy(ds.images[idx]), generator=gen)
        assert torch.equal(x, xr) and torch.equal(y, torch.from_numpy(ds.labels[idx]))
        lv, acc = tr.train_step(x, y)
        logits = plain(xr)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # train_step runs these very ops (forward, CE, backward, SGD step) on the same data in this process, so
        # bit equality is the expectation on any machine (no autocast or channels_last on the CPU)
        assert lv == loss.item() and acc == (logits.argmax(1) == y).float().mean().item()
    for (n, p), q in zip(tr.model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), n


def test_compile_keeps_checkpoint_keys_clean():
    model = MetaLearner("resnet12_slim", way=5)
    keys = list(model.state_dict())
    assert maybe_compile(model.encoder, torch.device("cpu"), True) is model.encoder  # CPU: left alone
    assert maybe_compile(model.encoder, torch.device("cpu"), False) is model.encoder
    wrapped = maybe_compile(model.encoder, torch.device("cuda"), True)  # wrapping is lazy: no GPU needed
    assert wrapped is not model.encoder
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.encoder.parameters()}
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
