"""The fast paths compute the same numbers as the straightforward ones (issue #5).

* Lean meta-training step (``MtlLearner.meta_forward``: support encoded without a graph, closed-form inner
  loop, straight-through theta) and the batched meta-batch (``trainer.meta.meta_batch_forward``,
  ``MetaTrainer.run_tasks``) against a straightforward implementation of the official PyTorch step (support
  encoded with a graph, ``torch.autograd.grad`` inner loop without ``create_graph``, one task at a time, query
  then support through the encoder): equal query losses, equal gradients on every trainable parameter, equal BN
  running statistics.
* Second order: the batched meta-batch against the per-task loop.
* The pre-train step split into ``load_batch`` / ``train_step`` against a plain step.
* ``--compile`` never changes checkpoint keys.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_generator.dataset_loader import ImageSet
from data_generator.meta_data_generator import episode_labels, fixed_episodes
from models.mtl import MtlLearner
from trainer.meta import MetaTrainer, meta_batch_forward
from trainer.pre import PreTrainer
from utils.gpu_tools import maybe_compile
from utils.misc import Timer
from utils.options import parse_args

WAY, SHOT, QUERY, SIZE = 5, 2, 3, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is as fast, and far faster when other jobs share the CPU cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0, dtype=torch.float64) -> MtlLearner:
    torch.manual_seed(seed)
    m = MtlLearner("resnet12_slim", "meta", way=WAY).to(dtype)
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


def straightforward_step(model, x_s, y_s, x_q, y_q, steps, lr, loss_scale, weight):
    """The official PyTorch meta step written out plainly, one task at a time: query then support through the
    encoder (both with a graph), ``steps`` inner SGD steps with ``torch.autograd.grad`` (no ``create_graph``:
    the inner gradients are constants), query CE at the fast weights, ``backward`` of ``weight * loss``."""
    losses = []
    for i in range(x_s.shape[0]):
        emb_q = model.encoder(x_q[i])
        emb_s = model.encoder(x_s[i])
        fw, fb = model.base_learner.weight, model.base_learner.bias
        for _ in range(steps):
            loss_s = loss_scale * F.cross_entropy(F.linear(emb_s, fw, fb), y_s)
            gw, gb = torch.autograd.grad(loss_s, (fw, fb))
            fw, fb = fw - lr * gw, fb - lr * gb
        loss = F.cross_entropy(F.linear(emb_q, fw, fb), y_q)
        (loss * weight).backward()
        losses.append(loss.item())
    return losses


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def _assert_same_state(m1, m2, rtol, atol):
    g1, g2 = _grads(m1), _grads(m2)
    assert g1.keys() == g2.keys() and len(g1) > 10
    trainable = {n for n, p in m1.named_parameters() if p.requires_grad}
    assert set(g1) == trainable  # every trainable parameter got a gradient
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=rtol, atol=atol, msg=f"gradient of {n}")
    s1, s2 = _bn_stats(m1), _bn_stats(m2)
    for n in s1:
        torch.testing.assert_close(s1[n], s2[n], rtol=rtol, atol=atol, msg=f"BN buffer {n}")


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("loss_scale", [1.0, 5.0])
def test_lean_first_order_step_equals_straightforward(t, loss_scale):
    ref, lean, batched = _model(), _model(), _model()
    x_s, y_s, x_q, y_q = _tasks(t)
    steps, lr, weight = 15, 0.3, 1.0 / t
    want = straightforward_step(ref, x_s, y_s, x_q, y_q, steps, lr, loss_scale, weight)

    # the lean single-task path (MtlLearner.meta_forward), one task after another
    got = []
    for i in range(t):
        logits = lean.meta_forward(x_s[i], y_s, x_q[i], steps, lr, second_order=False, loss_scale=loss_scale)
        loss = F.cross_entropy(logits, y_q)
        (loss * weight).backward()
        got.append(loss.item())
    np.testing.assert_allclose(got, want, rtol=1e-10)
    _assert_same_state(lean, ref, rtol=1e-8, atol=1e-12)

    # the batched meta-batch: per-task encoder passes, one inner loop over the T tasks, one backward
    logits = meta_batch_forward(batched, x_s, y_s, x_q, steps, lr, second_order=False, loss_scale=loss_scale)
    assert logits.shape == (t, WAY * QUERY, WAY)
    losses = torch.stack([F.cross_entropy(lg, y_q) for lg in logits])
    (losses.sum() * weight).backward()
    np.testing.assert_allclose(losses.tolist(), want, rtol=1e-10)
    _assert_same_state(batched, ref, rtol=1e-8, atol=1e-12)
    assert any(p.grad.abs().sum() > 0 for n, p in batched.named_parameters() if "mtl_weight" in n)


def test_lean_step_float32_within_float_tolerance():
    """float32 at the official inner-loop settings (100 steps at lr 0.01). (With a step size far above the
    stable range for these unnormalised features, float32 rounding grows along the inner loop in *both*
    implementations; float64, above, shows the two are the same function.)"""
    ref, batched = _model(dtype=torch.float32), _model(dtype=torch.float32)
    x_s, y_s, x_q, y_q = _tasks(2, dtype=torch.float32)
    want = straightforward_step(ref, x_s, y_s, x_q, y_q, 100, 0.01, 1.0, 0.5)
    logits = meta_batch_forward(batched, x_s, y_s, x_q, 100, 0.01)
    losses = torch.stack([F.cross_entropy(lg, y_q) for lg in logits])
    (losses.sum() * 0.5).backward()
    np.testing.assert_allclose(losses.tolist(), want, rtol=1e-5)
    _assert_same_state(batched, ref, rtol=1e-4, atol=1e-6)


def test_batched_second_order_equals_per_task_loop():
    per_task, batched = _model(), _model()
    x_s, y_s, x_q, y_q = _tasks(3)
    want = []
    for i in range(3):
        logits = per_task.meta_forward(x_s[i], y_s, x_q[i], 5, 0.2, second_order=True, loss_scale=5.0)
        loss = F.cross_entropy(logits, y_q)
        (loss / 3).backward()
        want.append(loss.item())
    logits = meta_batch_forward(batched, x_s, y_s, x_q, 5, 0.2, second_order=True, loss_scale=5.0)
    losses = torch.stack([F.cross_entropy(lg, y_q) for lg in logits])
    (losses.sum() / 3).backward()
    np.testing.assert_allclose(losses.tolist(), want, rtol=1e-10)
    _assert_same_state(batched, per_task, rtol=1e-8, atol=1e-12)


def _imageset(n_classes=8, per_class=10, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (n_classes, size, size, 3))
    imgs = np.clip(protos[:, None] + rng.normal(0, 40, (n_classes, per_class, size, size, 3)), 0, 255)
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int64)
    return ImageSet(images=imgs.reshape(-1, size, size, 3).astype(np.uint8), labels=labels,
                    class_names=[f"c{i}" for i in range(n_classes)], source="synthetic")


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_trainer_run_tasks_equals_run_task_loop(second_order, tmp_path):
    """The trainer's meta-batch (one gather, batched step) equals the per-task ``run_task`` loop that the hard
    tasks use, and the straightforward step on the same transformed images (first order)."""
    flags = ["--backbone", "resnet12_slim", "--image_size", str(SIZE), "--preprocess", "paper", "--way", str(WAY),
             "--shot", str(SHOT), "--train_query", str(QUERY), "--update_step", "10", "--base_lr", "0.001",
             "--inner_loss", "sum", "--log_root", str(tmp_path), "--meta_batch_size", "3"]
    args = parse_args(flags + (["--second_order"] if second_order else []))
    ds = _imageset()
    episodes = list(fixed_episodes(ds.labels, 3, WAY, SHOT, QUERY, seed=5))
    trainers = []
    for _ in range(2):
        tr = MetaTrainer(args, torch.device("cpu"))
        tr.train_set = ds
        tr.model = _model(dtype=torch.float32)
        trainers.append(tr)
    batched, looped = trainers
    out = batched.run_tasks(episodes, 1.0 / 3, Timer())
    ref = [looped.run_task(ep, 1.0 / 3, Timer()) for ep in episodes]
    for (l1, c1), (l2, c2) in zip(out, ref):
        assert l1 == pytest.approx(l2, rel=1e-5)
        np.testing.assert_allclose(c1, c2)
        assert c1.shape == (WAY,)
    _assert_same_state(batched.model, looped.model, rtol=1e-4, atol=1e-6)
    if not second_order:
        plain = _model(dtype=torch.float32)
        n_s = WAY * SHOT
        xs, xq = [], []
        for ep in episodes:
            x = batched.data.eval_transform(torch.from_numpy(ds.images[ep]))
            xs.append(x[:n_s])
            xq.append(x[n_s:])
        want = straightforward_step(plain, torch.stack(xs), episode_labels(WAY, SHOT), torch.stack(xq),
                                    episode_labels(WAY, QUERY), 10, 0.001, float(WAY), 1.0 / 3)
        np.testing.assert_allclose([lv for lv, _ in out], want, rtol=1e-5)
        _assert_same_state(batched.model, plain, rtol=1e-4, atol=1e-6)


def test_pretrain_step_equals_plain_step(tmp_path):
    args = parse_args(["--backbone", "resnet12_slim", "--image_size", str(SIZE), "--preprocess", "pytorch",
                       "--pre_batch_size", "8", "--log_root", str(tmp_path), "--seed", "3"])
    ds = _imageset(size=round(SIZE * 92 / 80))
    tr = PreTrainer(args, torch.device("cpu"))
    tr.train_set = ds
    tr.labels_t = torch.from_numpy(ds.labels)
    torch.manual_seed(0)
    tr.model = MtlLearner("resnet12_slim", "pre", num_classes=8)
    plain = copy.deepcopy(tr.model)
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(3)
    for idx in (np.arange(8), np.arange(40, 48)):
        x, y = tr.load_batch(idx)
        xr = tr.data.train_transform(torch.from_numpy(ds.images[idx]), generator=gen)
        assert torch.equal(x, xr) and torch.equal(y, torch.from_numpy(ds.labels[idx]))
        lv, acc = tr.train_step(x, y)
        logits = plain.forward_pre(xr)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert lv == loss.item() and acc == (logits.argmax(1) == y).float().mean().item()
    for (n, p), q in zip(tr.model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), n


def test_compile_keeps_checkpoint_keys_clean():
    model = MtlLearner("resnet12_slim", "meta", way=5)
    keys = list(model.state_dict())
    assert maybe_compile(model.encoder, torch.device("cpu"), True) is model.encoder  # CPU: left alone
    assert maybe_compile(model.encoder, torch.device("cpu"), False) is model.encoder
    wrapped = maybe_compile(model.encoder, torch.device("cuda"), True)  # wrapping is lazy: no GPU needed
    assert wrapped is not model.encoder
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.encoder.parameters()}
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
