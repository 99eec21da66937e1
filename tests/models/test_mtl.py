import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.conv2d_mtl import Conv2dMtl
from models.heads import InnerLoop, inner_loop, straight_through
from models.mtl import MetaLearner, PreLearner


def _one_task(model, x_s, y_s, x_q, update_step, base_lr, second_order=False, loss_scale=1.0):
    """One task through the batched forward: (n_q, way) logits."""
    inner = InnerLoop(update_step, base_lr, loss_scale, second_order)
    return model.forward_tasks(x_s[None], y_s, x_q[None], inner)[0]
from tests.helpers import assert_close_f64


def _task_batch(t=3, way=5, shot=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(t, way * shot, d, generator=g, dtype=dtype)
    y = torch.arange(way).repeat(shot).expand(t, -1).contiguous()
    w = torch.randn(t, way, d, generator=g, dtype=dtype) * 0.1
    b = torch.randn(t, way, generator=g, dtype=dtype) * 0.1
    return feat, y, w, b


def _support_loss(feat, y, w, b):
    return torch.stack([F.cross_entropy(F.linear(feat[i], w[i], b[i]), y[i]) for i in range(feat.shape[0])])


# ------------------------------------------------------------------------------------------------------------ inner loop
# Equalities of formulas are checked in float64 (tests/helpers.py: assert_close_f64), where rounding cannot
# depend on the machine's BLAS kernels or summation order.
@pytest.mark.parametrize("loss_scale", [1.0, 5.0])
def test_closed_form_equals_autograd(loss_scale):
    feat, y, w, b = _task_batch(dtype=torch.float64)
    w1, b1 = inner_loop(feat, y, w, b, steps=10, lr=0.1, order="first", loss_scale=loss_scale)
    w2, b2 = inner_loop(feat, y, w, b, steps=10, lr=0.1, order="autograd", loss_scale=loss_scale)
    w3, b3 = inner_loop(feat, y, w, b, steps=10, lr=0.1, order="second", loss_scale=loss_scale)
    assert w1.shape == w.shape and b1.shape == b.shape
    assert_close_f64({"W": w1, "b": b1}, {"W": w2, "b": b2})
    assert_close_f64({"W": w3, "b": b3}, {"W": w2, "b": b2})
    assert not torch.allclose(w1, w)  # it actually moved
    # tasks are independent: the batched result equals one-task runs
    for i in range(3):
        wi, bi = inner_loop(feat[i:i + 1], y[i:i + 1], w[i:i + 1], b[i:i + 1], 10, 0.1, "first", loss_scale)
        assert_close_f64({"W": wi[0], "b": bi[0]}, {"W": w1[i], "b": b1[i]})


def test_loss_scale_is_a_learning_rate_factor():
    feat, y, w, b = _task_batch(dtype=torch.float64)
    wa, ba = inner_loop(feat, y, w, b, 5, 0.01, "first", loss_scale=5.0)
    wb, bb = inner_loop(feat, y, w, b, 5, 0.05, "first", loss_scale=1.0)
    assert_close_f64({"W": wa, "b": ba}, {"W": wb, "b": bb})


def test_one_step_matches_hand_gradient():
    feat, y, w, b = _task_batch(t=2, way=3, shot=4, d=6, dtype=torch.float64)
    w1, b1 = inner_loop(feat, y, w, b, steps=1, lr=0.5, order="first")
    p = torch.softmax(feat @ w.transpose(1, 2) + b[:, None], -1)
    g = (p - F.one_hot(y, 3).double()) / feat.shape[1]
    assert_close_f64({"W": w1, "b": b1}, {"W": w - 0.5 * g.transpose(1, 2) @ feat, "b": b - 0.5 * g.sum(1)})


def test_support_loss_decreases():
    feat, y, w, b = _task_batch()
    losses = [_support_loss(feat, y, *inner_loop(feat, y, w, b, s, 0.5, "first")) for s in (0, 5, 20, 50)]
    for a, c in zip(losses, losses[1:]):
        assert (c < a).all()
    assert (losses[-1] < 0.5 * losses[0]).all()


def test_zero_steps_returns_init():
    feat, y, w, b = _task_batch()
    for order in ("first", "autograd", "second"):
        w0, b0 = inner_loop(feat, y, w, b, 0, 0.1, order)
        assert torch.equal(w0, w) and torch.equal(b0, b)


def test_gradient_flow_first_vs_second_order():
    feat, y, w, b = _task_batch(t=2)
    feat.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    c = torch.randn_like(w)
    for order in ("first", "autograd"):
        wt, bt = inner_loop(feat, y, w, b, 5, 0.1, order)
        g_feat, g_w, g_b = torch.autograd.grad((wt * c).sum() + bt.sum(), (feat, w, b), allow_unused=True)
        assert g_feat is None  # support features get no outer gradient
        torch.testing.assert_close(g_w, c)  # d theta_T / d theta = I (first order)
        torch.testing.assert_close(g_b, torch.ones_like(b))
    wt, bt = inner_loop(feat, y, w, b, 5, 0.1, "second")
    g_feat, g_w = torch.autograd.grad((wt * c).sum() + bt.sum(), (feat, w))
    assert g_feat is not None and g_feat.abs().sum() > 0
    assert not torch.allclose(g_w, c)  # the true Jacobian is not the identity


def test_second_order_gradcheck():
    feat, y, w, b = _task_batch(t=2, way=3, shot=2, d=4, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (feat, w, b))
    assert torch.autograd.gradcheck(lambda f, ww, bb: inner_loop(f, y, ww, bb, 3, 0.5, "second"), inputs)


def test_first_order_without_grad_and_no_mutation():
    feat, y, w, b = _task_batch()
    w_copy, b_copy = w.clone(), b.clone()
    with torch.no_grad():
        wt, bt = inner_loop(feat, y, w, b, 3, 0.1, "first")
    assert not wt.requires_grad and torch.equal(w, w_copy) and torch.equal(b, b_copy)


def test_straight_through_value_exact():
    w0 = torch.randn(4, 5, requires_grad=True)
    wt = torch.randn(4, 5) * 1e3
    out = straight_through(w0, wt)
    assert torch.equal(out, wt)
    (out * 3).sum().backward()
    torch.testing.assert_close(w0.grad, torch.full_like(w0, 3.0))


def test_inner_loop_input_validation():
    feat, y, w, b = _task_batch()
    with pytest.raises(ValueError):
        inner_loop(feat[0], y, w, b, 1, 0.1)
    with pytest.raises(ValueError):
        inner_loop(feat, y[:, :3], w, b, 1, 0.1)
    with pytest.raises(ValueError):
        inner_loop(feat, y, w, b, 1, 0.1, order="third")


# -------------------------------------------------------------------------------------------------------------- learner
WAY, SHOT, QUERY, SIZE = 3, 2, 2, 16


def _episode(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(WAY * SHOT, 3, SIZE, SIZE, generator=g)
    x_q = torch.randn(WAY * QUERY, 3, SIZE, SIZE, generator=g)
    y_s = torch.arange(WAY).repeat(SHOT)
    y_q = torch.arange(WAY).repeat(QUERY)
    return x_s, y_s, x_q, y_q


def _meta_model(backbone="conv4", seed=0):
    torch.manual_seed(seed)
    return MetaLearner(backbone, way=WAY)


def test_meta_mode_trainable_set_and_groups():
    model = _meta_model("resnet12_slim")
    ss_bn, fc = model.meta_parameters()
    assert len(fc) == 2 and fc[0] is model.base_learner.weight and fc[1] is model.base_learner.bias
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in ss_bn} | {id(p) for p in fc} == {id(p) for p in model.parameters() if p.requires_grad}
    for n in trainable:
        assert "mtl_" in n or ".bn" in n or n.startswith("base_learner"), n
    n_convs = sum(isinstance(m, Conv2dMtl) for m in model.encoder.modules())
    assert sum(n.endswith("mtl_weight") for n in trainable) == n_convs == 16
    assert all(not m.weight.requires_grad for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model.encoder.layer1.conv1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="layer1.conv1.weight"):
        model.meta_parameters()


def test_base_learner_init():
    torch.manual_seed(0)
    model = MetaLearner("resnet25", way=5)
    w = model.base_learner.weight
    assert w.shape == (5, 640) and torch.equal(model.base_learner.bias, torch.zeros(5))
    assert abs(w.std().item() - (2 / 640) ** 0.5) < 0.01


@pytest.mark.parametrize("backbone", ["conv4", "resnet12_slim"])
def test_one_adam_step_updates_only_meta_params(backbone):
    model = _meta_model(backbone)
    model.train()
    x_s, y_s, x_q, y_q = _episode()
    ss_bn, fc = model.meta_parameters()
    opt = torch.optim.Adam([{"params": ss_bn}, {"params": fc, "lr": 1e-2}], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = _one_task(model, x_s, y_s, x_q, update_step=5, base_lr=0.1)
    assert logits.shape == (WAY * QUERY, WAY)
    loss = F.cross_entropy(logits, y_q)
    opt.zero_grad()
    loss.backward()
    enc = model.encoder
    first_conv = next(m for m in enc.modules() if isinstance(m, Conv2dMtl))
    first_bn = next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    assert first_conv.mtl_weight.grad is not None and first_conv.mtl_weight.grad.abs().sum() > 0
    assert first_bn.weight.grad is not None and first_bn.weight.grad.abs().sum() > 0
    assert first_conv.weight.grad is None
    opt.step()
    for n, p in model.named_parameters():
        if n.endswith(".weight") and "bn" not in n and not n.startswith("base_learner") and p.dim() == 4:
            assert torch.equal(p, before[n]), n  # frozen conv weights: bit-identical
        if n.endswith(".bias") and not p.requires_grad:
            assert torch.equal(p, before[n]), n
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("mtl_weight" in n for n in changed)
    assert "base_learner.weight" in changed and "base_learner.bias" in changed
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
                       and p.grad.abs().sum() > 0}


def test_support_gradient_first_vs_second_order():
    model = _meta_model()
    x_s, y_s, x_q, y_q = _episode()
    xs1 = x_s.clone().requires_grad_(True)
    F.cross_entropy(_one_task(model, xs1, y_s, x_q, 3, 0.1), y_q).backward()
    assert xs1.grad is None
    model.zero_grad()
    xs2 = x_s.clone().requires_grad_(True)
    F.cross_entropy(_one_task(model, xs2, y_s, x_q, 3, 0.1, second_order=True), y_q).backward()
    assert xs2.grad is not None and xs2.grad.abs().sum() > 0


def test_first_order_grad_equals_grad_at_adapted_weights():
    model = _meta_model("resnet12_slim").double()  # two formulas for one gradient: float64
    model.train()
    x_s, y_s, x_q, y_q = _episode(seed=3)
    x_s, x_q = x_s.double(), x_q.double()
    logits = _one_task(model, x_s, y_s, x_q, update_step=10, base_lr=0.1, loss_scale=2.0)
    F.cross_entropy(logits, y_q).backward()
    g_w, g_b = model.base_learner.weight.grad.clone(), model.base_learner.bias.grad.clone()
    # direct computation: theta_T by the autograd reference loop on detached features, grad of the query loss there
    with torch.no_grad():
        emb_q = model.encoder(x_q)
        emb_s = model.encoder(x_s)
    w_t, b_t = inner_loop(emb_s[None], y_s[None], model.base_learner.weight.detach()[None],
                          model.base_learner.bias.detach()[None], 10, 0.1, "autograd", loss_scale=2.0)
    w_t = w_t[0].detach().requires_grad_(True)
    b_t = b_t[0].detach().requires_grad_(True)
    assert_close_f64(logits.detach(), F.linear(emb_q, w_t, b_t).detach())
    d_w, d_b = torch.autograd.grad(F.cross_entropy(F.linear(emb_q, w_t, b_t), y_q), (w_t, b_t))
    assert_close_f64({"W": g_w, "b": g_b}, {"W": d_w, "b": d_b})
    assert g_w.abs().sum() > 0


def test_second_order_base_learner_grad_differs():
    model = _meta_model()
    x_s, y_s, x_q, y_q = _episode(seed=1)
    F.cross_entropy(_one_task(model, x_s, y_s, x_q, 5, 0.5), y_q).backward()
    g1 = model.base_learner.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(_one_task(model, x_s, y_s, x_q, 5, 0.5, second_order=True), y_q).backward()
    g2 = model.base_learner.weight.grad
    assert not torch.allclose(g1, g2, atol=1e-6)


def test_support_pass_updates_bn_running_stats_and_eval_no_grad():
    model = _meta_model()
    bn = next(m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    x_s, y_s, x_q, _ = _episode()
    model.train()
    n0 = int(bn.num_batches_tracked)
    _one_task(model, x_s, y_s, x_q, 2, 0.1)
    assert int(bn.num_batches_tracked) == n0 + 2  # query pass + support pass (under no_grad)
    model.eval()
    with torch.no_grad():  # first-order adaptation needs no autograd: evaluation runs under no_grad
        a = _one_task(model, x_s, y_s, x_q, 20, 0.1)
        b = _one_task(model, x_s, y_s, x_q, 20, 0.1)
    assert torch.equal(a, b) and int(bn.num_batches_tracked) == n0 + 2
    # adaptation helps on the support set itself
    with torch.no_grad():
        acc0 = (_one_task(model, x_s, y_s, x_s, 0, 0.1).argmax(1) == y_s).float().mean()
        acc = (_one_task(model, x_s, y_s, x_s, 100, 0.5).argmax(1) == y_s).float().mean()
    assert acc == 1.0 and acc >= acc0


def test_pre_mode_heads_and_checkpoint_transfer():
    torch.manual_seed(0)
    pre = PreLearner("resnet12_slim", num_classes=7, pre_head="mlp", dropout_keep=0.9)
    x = torch.randn(3, 3, SIZE, SIZE)
    assert pre(x).shape == (3, 7)
    assert pre.encode(x).shape == (3, 256)
    assert {"pre_fc.0.weight", "pre_fc.2.weight"} <= set(pre.state_dict())
    assert pre.pre_fc[0].out_features == 1000
    assert all(p.requires_grad for p in pre.parameters())
    assert any(isinstance(m, nn.Dropout) for m in pre.modules())
    lin = PreLearner("conv4", num_classes=7, pre_head="linear")
    assert isinstance(lin.pre_fc, nn.Linear) and lin(x).shape == (3, 7)
    meta = MetaLearner("resnet12_slim", way=WAY)
    res = meta.load_state_dict(pre.state_dict(), strict=False)
    assert all(k.startswith("pre_fc.") for k in res.unexpected_keys)
    assert all("mtl_" in k or k.startswith("base_learner.") for k in res.missing_keys)
    # with SS at init (1, 0) the meta encoder equals the pre-trained encoder
    pre.eval()
    meta.eval()
    with torch.no_grad():
        torch.testing.assert_close(meta.encode(x), pre.encode(x))
    with pytest.raises(ValueError):
        PreLearner("conv4", num_classes=0)
    with pytest.raises(ValueError):
        PreLearner("conv4", num_classes=5, pre_head="cosine")
    assert not hasattr(meta, "pre_fc") and not hasattr(pre, "base_learner")  # two models, no mode flag
