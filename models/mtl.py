"""The MTL learners: the base-learner inner loop (Eq. 3), the pre-train model and the meta model with the one
batched task forward (:meth:`MetaLearner.forward_tasks`).

Notation (paper): Theta = frozen encoder conv weights, Phi_S1/Phi_S2 = SS parameters (Eq. 6), theta = base learner
(FC classifier W, b). One meta step on a task T (Eq. 3-5):

    theta'  = theta - beta * grad_theta L_T(tr)([Theta; theta], Phi)      (Eq. 3, ``inner_loop``, repeated ``steps`` times)
    Phi    <- Phi   - gamma * grad_Phi   L_T(te)([Theta; theta'], Phi)     (Eq. 4, the trainer's Adam, lr meta_lr1)
    theta  <- theta - gamma * grad_theta L_T(te)([Theta; theta'], Phi)     (Eq. 5, the trainer's Adam, lr meta_lr2)

First order (the official PyTorch behaviour, reference §4.1): the inner gradients are constants, so
d theta_T / d theta = I and the support features receive no outer gradient; grad_theta L_te = grad_{theta_T} L_te.
This is implemented exactly with a straight-through identity (:func:`straight_through`).
Second order (the official TF behaviour, §4.2): the inner loop is differentiated through (``create_graph=True``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bn_mode import apply_bn_mode
from .conv2d_mtl import Conv2dMtl
from .resnet_mtl import build_backbone

__all__ = ["inner_loop", "stable_inner_lr", "straight_through", "PreLearner", "MetaLearner"]

_ORDERS = ("first", "autograd", "second")


def straight_through(init: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """Value of ``adapted`` (bit-exact), gradient identity to ``init``; nothing flows into ``adapted``'s graph.

    Written as ``adapted.detach() + (init - init.detach())`` (the second term is exactly 0), which equals
    ``init + (adapted - init).detach()`` in gradient but without any rounding of the value.
    """
    if not init.requires_grad:
        return adapted.detach()
    return adapted.detach() + (init - init.detach())


def _check_inner_inputs(feat_s: torch.Tensor, y_s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        steps: int, order: str) -> None:
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    if feat_s.dim() != 3 or weight.dim() != 3 or bias.dim() != 2 or y_s.dim() != 2:
        raise ValueError("inner_loop expects feat_s (T, n_s, D), y_s (T, n_s), weight (T, way, D), bias (T, way); "
                         f"got {tuple(feat_s.shape)}, {tuple(y_s.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    t, n_s, d = feat_s.shape
    if y_s.shape != (t, n_s) or weight.shape[0] != t or weight.shape[2] != d or bias.shape != weight.shape[:2]:
        raise ValueError("inner_loop shape mismatch: feat_s (T, n_s, D), y_s (T, n_s), weight (T, way, D), "
                         f"bias (T, way); got {tuple(feat_s.shape)}, {tuple(y_s.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def _support_loss(feat: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                  loss_scale: float) -> torch.Tensor:
    """loss_scale * sum over tasks of the per-task mean CE. feat (T, n, D), y (T, n), w (T, way, D), b (T, way)."""
    logits = torch.baddbmm(b.unsqueeze(1), feat, w.transpose(1, 2))  # (T, n, way)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return loss_scale * ce.view(y.shape).mean(dim=1).sum()


def inner_loop(feat_s: torch.Tensor, y_s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, steps: int,
               lr: float, order: str = "first", loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Base-learner adaptation, paper Eq. 3: theta <- theta - lr * grad_theta L_support, ``steps`` times, on T tasks.

    Args:
        feat_s: (T, n_s, D) support features.
        y_s: (T, n_s) long support labels in [0, way).
        weight: (T, way, D) initial FC weights theta = (W, b) per task; bias: (T, way).
        steps: number of gradient steps (0 returns the initial weights).
        lr: inner learning rate beta.
        order: ``"first"``: closed-form gradient of the mean CE, batched over the T tasks, computed on detached
            tensors (no autograd graph): G = (softmax(X W^T + b) - onehot(y)) * loss_scale / n_s,
            dW = G^T X, db = sum_n G. ``"autograd"``: the same loop with ``torch.autograd.grad`` (no create_graph),
            one task at a time (the reference implementation). ``"second"``: autograd with ``create_graph=True``;
            the result is differentiable w.r.t. ``feat_s``, ``weight`` and ``bias`` (full second order).
        loss_scale: the support loss is ``loss_scale * mean CE``; ``loss_scale = way`` reproduces the official TF
            loss (sum of per-sample CE / shot).

    Returns:
        (weight_T, bias_T) with shapes (T, way, D), (T, way). For ``"first"`` and ``"autograd"`` they carry the
        first-order gradient (identity Jacobian) to ``weight``/``bias`` when those require grad, and never a
        gradient to ``feat_s``, exactly as the official PyTorch inner loop (reference §4.1).
    """
    _check_inner_inputs(feat_s, y_s, weight, bias, steps, order)
    if order == "first":
        return _inner_first(feat_s, y_s, weight, bias, steps, lr, loss_scale)
    if order == "autograd":
        return _inner_autograd(feat_s, y_s, weight, bias, steps, lr, loss_scale)
    return _inner_second(feat_s, y_s, weight, bias, steps, lr, loss_scale)


def stable_inner_lr(feat_s: torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
    """The largest inner step for which Eq. 3's gradient descent is non-expansive, per task.

    The support loss ``loss_scale * mean CE`` of a linear head is convex with a Hessian bounded by
    ``loss_scale / n_s * X~^T X~ (x) (diag(p) - p p^T)``, where ``X~ = [X, 1]`` (the bias) and the softmax block has
    eigenvalues <= 1/2; so its gradient is L-Lipschitz with ``L = loss_scale * lambda_max(X~^T X~) / (2 n_s)``.
    For ``lr <= 2 / L`` a step maps two nearby heads no further apart, so rounding errors only add up (at most
    ``steps`` times one step's rounding) and two implementations of the loop (closed form and autograd, bank and
    per-episode) stay within float32 rounding of each other. Above it they may amplify errors at every step: with
    unnormalised features (squared norm ~1,600) at lr 0.01 the logits of the two paths drift apart by ~2 in 100
    steps.

    Args:
        feat_s: (T, n_s, D) support features.
    Returns:
        (T,) float64: ``2 / L = 4 n_s / (loss_scale * lambda_max(X~^T X~))`` for each task.
    """
    x = feat_s.detach().double()
    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)                 # (T, n_s, D + 1)
    gram = x @ x.transpose(1, 2)                                              # (T, n_s, n_s): same nonzero spectrum
    lam = torch.linalg.eigvalsh(gram)[:, -1]
    return 4.0 * x.shape[1] / (loss_scale * lam)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt  # never below float32 (features may come out of autocast as float16/bfloat16)


def _inner_first(feat_s, y_s, weight, bias, steps, lr, loss_scale):
    dt = _compute_dtype(feat_s, weight, bias)
    with torch.no_grad():
        x = feat_s.detach().to(dt)
        w = weight.detach().to(dt)
        b = bias.detach().to(dt)
        n_s, way = x.shape[1], w.shape[1]
        target = F.one_hot(y_s, way).to(dt)  # (T, n_s, way)
        scale = loss_scale / n_s
        for _ in range(steps):
            logits = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (T, n_s, way)
            g = (torch.softmax(logits, dim=-1) - target) * scale  # dL/dlogits
            w = w - lr * torch.bmm(g.transpose(1, 2), x)  # dW = G^T X, (T, way, D)
            b = b - lr * g.sum(dim=1)  # db = sum_n G, (T, way)
        w, b = w.to(weight.dtype), b.to(bias.dtype)
    return straight_through(weight, w), straight_through(bias, b)


def _inner_autograd(feat_s, y_s, weight, bias, steps, lr, loss_scale):
    ws, bs = [], []
    with torch.enable_grad():
        for t in range(feat_s.shape[0]):
            x = feat_s[t].detach()
            w, b = weight[t], bias[t]
            if not w.requires_grad:
                w = w.detach().requires_grad_(True)
            if not b.requires_grad:
                b = b.detach().requires_grad_(True)
            for _ in range(steps):
                loss = loss_scale * F.cross_entropy(F.linear(x, w, b), y_s[t])
                gw, gb = torch.autograd.grad(loss, (w, b))  # constants: no create_graph (first order)
                w, b = w - lr * gw, b - lr * gb
            ws.append(w)
            bs.append(b)
    w_t, b_t = torch.stack(ws), torch.stack(bs)
    if not weight.requires_grad:
        w_t = w_t.detach()
    if not bias.requires_grad:
        b_t = b_t.detach()
    return w_t, b_t


def _inner_second(feat_s, y_s, weight, bias, steps, lr, loss_scale):
    with torch.enable_grad():
        w, b = weight, bias
        if not w.requires_grad:
            w = w.detach().requires_grad_(True)
        if not b.requires_grad:
            b = b.detach().requires_grad_(True)
        for _ in range(steps):
            loss = _support_loss(feat_s, y_s, w, b, loss_scale)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
            w, b = w - lr * gw, b - lr * gb
    return w, b


class PreLearner(nn.Module):
    """The pre-train model (paper Sec. 4.1): ``encoder`` = plain backbone (trainable convs, optional dropout) and
    ``pre_fc`` over ``num_classes``: ``pre_head="mlp"`` = Linear(D, 1000) -> ReLU -> Linear(1000, C) (official PT,
    keys ``pre_fc.0``/``pre_fc.2``), ``"linear"`` = Linear(D, C) with xavier-uniform W and zero b (official TF).
    State-dict keys ``encoder.*``, ``pre_fc.*``. ``bn_mode``: the encoder's BatchNorm semantics
    (:func:`models.bn_mode.apply_bn_mode`; ``tf`` = the TF code's batch-statistics BatchNorm and conv biases)."""

    def __init__(self, backbone: str, num_classes: int, pre_head: str = "mlp", dropout_keep: float = 1.0,
                 bn_mode: str = "pytorch") -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"the pre-train model needs num_classes > 0, got {num_classes}")
        self.encoder = apply_bn_mode(build_backbone(backbone, mtl=False, dropout_keep=dropout_keep), bn_mode)
        d = self.encoder.out_dim
        if pre_head == "mlp":
            self.pre_fc = nn.Sequential(nn.Linear(d, 1000), nn.ReLU(), nn.Linear(1000, num_classes))
        elif pre_head == "linear":
            self.pre_fc = nn.Linear(d, num_classes)
            nn.init.xavier_uniform_(self.pre_fc.weight)
            nn.init.zeros_(self.pre_fc.bias)
        else:
            raise ValueError(f"pre_head must be 'mlp' or 'linear', got {pre_head!r}")

    @property
    def out_dim(self) -> int:
        return self.encoder.out_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> features (B, D)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """Classification over the base classes: images (B, 3, S, S) -> logits (B, num_classes). ``encoder``: the
        module that encodes (default ``self.encoder``; the trainer passes its ``torch.compile`` view)."""
        return self.pre_fc((self.encoder if encoder is None else encoder)(x))


class MetaLearner(nn.Module):
    """The meta model (paper Sec. 4.2): ``encoder`` = the backbone with SS convs (Eq. 6; frozen W, b; trainable Phi
    and BN affine; no dropout) and ``base_learner`` = Linear(D, way), theta, W ~ kaiming_normal_ (fan_in, gain
    sqrt(2), as the official ``fc1_w``), b = 0. State-dict keys ``encoder.*``, ``base_learner.*`` (ours and, through
    ``utils.checkpoint.read_weights``, the official PyTorch meta checkpoints load unchanged). ``bn_mode``: the
    encoder's BatchNorm semantics (:func:`models.bn_mode.apply_bn_mode`; ``tf`` = the TF code's batch-statistics
    BatchNorm, no BN parameters, and a conv bias with an SS shift on every 3x3 conv of a ResNet-12 block).
    ``shortcut_ss=False`` freezes the SS parameters of the 1x1 shortcut convs (``shortcut``, ``downsample.0``) at
    Phi_S1 = 1, Phi_S2 = 0, as the TF code, which gives the shortcut no SS (reference section 3.2)."""

    def __init__(self, backbone: str, way: int = 5, bn_mode: str = "pytorch", shortcut_ss: bool = True) -> None:
        super().__init__()
        if way < 2:
            raise ValueError(f"way must be >= 2, got {way}")
        self.way = way
        self.bn_mode = bn_mode
        self.encoder = apply_bn_mode(build_backbone(backbone, mtl=True, dropout_keep=1.0), bn_mode)
        if not shortcut_ss:
            for name, m in self.encoder.named_modules():
                if isinstance(m, Conv2dMtl) and (name.endswith("shortcut") or name.endswith("downsample.0")):
                    for p in (m.mtl_weight, m.mtl_bias):
                        if p is not None:
                            p.requires_grad_(False)
        self.base_learner = nn.Linear(self.encoder.out_dim, way)
        nn.init.kaiming_normal_(self.base_learner.weight)
        nn.init.zeros_(self.base_learner.bias)
        self.check_trainable()

    @property
    def out_dim(self) -> int:
        return self.encoder.out_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> features (B, D)."""
        return self.encoder(x)

    forward = encode

    def forward_tasks(self, x_s: torch.Tensor, y_s: torch.Tensor, x_q: torch.Tensor, update_step: int,
                      base_lr: float, second_order: bool = False, loss_scale: float = 1.0,
                      encoder: nn.Module | None = None) -> torch.Tensor:
        """The T tasks of a meta-batch (Alg. 2 lines 3-6): adapt theta on each support set (Eq. 3), classify each
        query at its adapted theta_T.

        Each task's query and support go through the encoder as separate forward passes, task after task and query
        before support (the official order), so train-mode BN uses the same batch statistics and updates its
        running statistics in the same order as the official one-task step. First order (official PyTorch) encodes
        the support without a graph and adapts with the closed-form gradient; a straight-through identity makes
        the query loss's gradient w.r.t. theta its gradient w.r.t. theta_T (SS/BN learn through the query path
        only, Eq. 4-5 first order). Second order (official TF) encodes the support with a graph and differentiates
        through the inner loop. One batched :func:`inner_loop` adapts the T copies of theta; the tasks' losses are
        independent, so this is exact (``tests/trainer/test_speed_paths.py``).

        Args:
            x_s: (T, way*shot, 3, S, S) support images; y_s: (way*shot,) long labels in [0, way), the same for
                every task (the episode layout).
            x_q: (T, n_q, 3, S, S) query images.
            update_step, base_lr, loss_scale: the inner loop (Eq. 3, :func:`inner_loop`).
            encoder: the module that encodes (default ``self.encoder``; the trainer passes the ``torch.compile``
                view of the same encoder under ``--compile``).
        Returns:
            (T, n_q, way) query logits.
        """
        enc = self.encoder if encoder is None else encoder
        t = x_s.shape[0]
        emb_q, emb_s = [], []
        for i in range(t):
            emb_q.append(enc(x_q[i]))  # official order: query first, then support
            if second_order:
                emb_s.append(enc(x_s[i]))
            else:
                with torch.no_grad():
                    emb_s.append(enc(x_s[i]))
        w0 = self.base_learner.weight.unsqueeze(0).expand(t, -1, -1)
        b0 = self.base_learner.bias.unsqueeze(0).expand(t, -1)
        # under --amp (bfloat16 autocast) only the encoder ran in bfloat16: the inner loop and the query logits run
        # in float32 (or the features' wider dtype), with autocast off, on CUDA and the CPU alike
        dt = _compute_dtype(emb_s[0], w0)
        with torch.autocast(x_q.device.type, enabled=False):
            w_t, b_t = inner_loop(torch.stack(emb_s).to(dt), y_s.unsqueeze(0).expand(t, -1), w0.to(dt), b0.to(dt),
                                  update_step, base_lr, order="second" if second_order else "first",
                                  loss_scale=loss_scale)
            return torch.stack([F.linear(q.to(dt), w, b) for q, w, b in zip(emb_q, w_t, b_t)])

    def check_trainable(self) -> None:
        """Only SS parameters (mtl_weight/mtl_bias), BN affine and the base learner may require grad."""
        allowed = set()
        for m in self.encoder.modules():
            if isinstance(m, Conv2dMtl):
                allowed.update(id(p) for p in (m.mtl_weight, m.mtl_bias) if p is not None)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                allowed.update((id(m.weight), id(m.bias)))
        allowed.update(id(p) for p in self.base_learner.parameters())
        wrong = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in allowed]
        if wrong:
            raise RuntimeError(f"meta model: frozen parameters require grad: {', '.join(wrong[:5])}"
                               f"{' ...' if len(wrong) > 5 else ''}")
        plain = [n for n, m in self.encoder.named_modules() if type(m) is nn.Conv2d]
        if plain:
            raise RuntimeError(f"meta model: encoder has plain convolutions: {', '.join(plain[:5])}")

    def meta_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The two Adam groups of the meta phase: (SS + BN affine params [meta_lr1], base-learner params [meta_lr2])."""
        self.check_trainable()
        ss_bn = [p for p in self.encoder.parameters() if p.requires_grad]
        return ss_bn, list(self.base_learner.parameters())
