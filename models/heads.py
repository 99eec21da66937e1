"""Few-shot heads: the classifier a few-shot task fits on its support features and scores its queries with.

One interface, batched over T tasks (the easyfsl ``FewShotClassifier`` pattern, without the backbone inside)::

    head = HEADS[name](way, init=(W0 (way, D), b0 (way,)), inner=InnerLoop(...), order="first")
    head.fit(feat_s (T, n_s, D), y_s (T, n_s))        # labels in [0, way)
    head.logits(feat_q (T, n_q, D)) -> (T, n_q, way)

Every caller goes through it: meta-training (:meth:`models.mtl.MetaLearner.forward_tasks`), pre-train validation,
meta-validation and meta-test on the feature bank and episode by episode (``models/evaluate.py``), and the
benchmark tool. ``--eval_classifier`` offers the names of :data:`HEADS`, and a result's method name comes from its
head (:meth:`FewShotHead.method`). Adding a classifier is one subclass and its line in :data:`HEADS`.

The heads:

* ``finetune`` (:class:`FinetuneHead`): the MTL base learner theta = (W, b), a linear layer fitted by the inner
  loop, paper Eq. 3, from its initialisation (the meta-learned theta of a meta checkpoint, or a fresh one,
  :func:`fresh_init`, for a pre-trained encoder: the paper's "FT" baseline).
* ``centroid`` (:class:`CentroidHead`): nearest class mean, logits = minus the squared Euclidean distance to each
  class's mean support feature (ProtoNet's rule on frozen features).

The inner loop itself (Eq. 3: closed-form first order, autograd, second order) and its stable step are here too,
with the base learner's one initialisation (:func:`init_base_learner`).

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

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_generator.meta_data_generator import by_class

__all__ = ["InnerLoop", "inner_loss_scale", "ORDERS", "inner_loop", "stable_inner_lr", "straight_through",
           "init_base_learner", "fresh_init", "FewShotHead", "FinetuneHead", "CentroidHead", "HEADS", "make_head",
           "class_means"]

ORDERS = ("first", "autograd", "second")


@dataclass(frozen=True)
class InnerLoop:
    """The base learner's inner loop, paper Eq. 3: ``steps`` SGD steps at ``lr`` on ``loss_scale * mean CE``;
    ``second_order`` differentiates the outer loss through it (TF) instead of first order (official PyTorch).
    ``config/settings.py`` builds one per use from the flags (meta-train, pre-train validation, meta-validation,
    meta-test); the meta model (:meth:`models.mtl.MetaLearner.forward_tasks`) and the ``finetune`` head take it
    whole."""

    steps: int
    lr: float
    loss_scale: float = 1.0
    second_order: bool = False
    flags: tuple[str, str] = ("", "")  # the flags that set (steps, lr), named in the messages of non-finite values

    def hint(self) -> str:
        """``'--base_lr (set to 0.01) or --test_update_step (set to 100)'``: what to lower when it overflows."""
        steps, lr = self.flags
        if not lr:
            return "the inner loop's step size or number of steps"
        return f"{lr} (set to {self.lr:g}) or {steps} (set to {self.steps})"


def inner_loss_scale(inner_loss: str, way: int, support_copies: int = 1) -> float:
    """``mean``: mean CE over the support (official PyTorch). ``sum``: TF's per-sample CE / shot summed over the
    support (``tensorflow/utils/misc.py xent``), i.e. ``way`` times the mean; with the flipped support
    (``--test_flip_support``, ``support_copies = 2``) the TF sum runs over twice the images, still divided by shot
    (``xent`` divides by ``FLAGS.shot_num``, ``tensorflow/utils/misc.py`` L302-311), i.e. ``2 * way`` times the mean."""
    if inner_loss not in ("mean", "sum"):
        raise ValueError(f"inner_loss must be 'mean' or 'sum', got {inner_loss!r}")
    return float(way * support_copies) if inner_loss == "sum" else 1.0


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
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
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


def _differentiable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it requires grad (its graph is kept), else a detached leaf that does (for autograd.grad)."""
    return t if t.requires_grad else t.detach().requires_grad_(True)


def _inner_autograd(feat_s, y_s, weight, bias, steps, lr, loss_scale):
    ws, bs = [], []
    with torch.enable_grad():
        for t in range(feat_s.shape[0]):
            x = feat_s[t].detach()
            w, b = _differentiable(weight[t]), _differentiable(bias[t])
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
        w, b = _differentiable(weight), _differentiable(bias)
        for _ in range(steps):
            loss = _support_loss(feat_s, y_s, w, b, loss_scale)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
            w, b = w - lr * gw, b - lr * gb
    return w, b


# ------------------------------------------------------------------------------------------ the base learner's init
def init_base_learner(weight: torch.Tensor, bias: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """The base learner's initialisation theta_0, in place: W ~ ``kaiming_normal_`` (fan_in, gain sqrt(2): the
    official ``fc1_w`` init), b = 0. ``generator``: the random stream (default the global one, as the meta model
    draws it when it is built). The one definition: :class:`models.mtl.MetaLearner` and :func:`fresh_init` use it.

    Args:
        weight: (way, D); bias: (way,).
    """
    with torch.no_grad():
        nn.init.kaiming_normal_(weight, generator=generator)
        nn.init.zeros_(bias)


def fresh_init(way: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh base learner for an encoder that has none (pre-train validation, the "FT" baseline of a pre-trained
    checkpoint): :func:`init_base_learner` drawn from its own generator seeded with ``seed`` (``--eval_seed``), so
    every evaluation of every checkpoint starts from the same head.

    Returns:
        ``weight (way, dim)``, ``bias (way,)`` float32 on the CPU.
    """
    w, b = torch.empty(way, dim), torch.empty(way)
    init_base_learner(w, b, torch.Generator().manual_seed(seed))
    return w, b


# ------------------------------------------------------------------------------------------------------- the heads
class FewShotHead:
    """The interface: ``fit(feat_s, y_s)`` on T tasks' support features, then ``logits(feat_q)``.

    Subclasses set :attr:`name` (its key in :data:`HEADS`, the ``--eval_classifier`` value) and implement
    :meth:`fit` and :meth:`logits`; ``init`` (the base learner's initialisation), ``inner`` (the inner loop's settings)
    and ``order`` are there for the heads that use them. :meth:`method` names the results of an evaluation with this
    head, :meth:`nonfinite` what a non-finite logit says.
    """

    name: ClassVar[str] = ""

    def __init__(self, way: int, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                 inner: InnerLoop | None = None, order: str | None = None) -> None:
        if way < 2:
            raise ValueError(f"a few-shot head needs way >= 2, got {way}")
        self.way, self.init, self.inner, self.order = way, init, inner, order

    def fit(self, feat_s: torch.Tensor, y_s: torch.Tensor) -> "FewShotHead":
        """Fit on the support of T tasks: ``feat_s`` (T, n_s, D) features, ``y_s`` (T, n_s) long labels in
        [0, way). Returns ``self``."""
        raise NotImplementedError

    def logits(self, feat_q: torch.Tensor) -> torch.Tensor:
        """Score the queries of the T tasks fitted last: ``feat_q`` (T, n_q, D) -> (T, n_q, way)."""
        raise NotImplementedError

    @classmethod
    def method(cls, kind: str) -> str:
        """The method name of a result (``results.json`` ``method``, the results file's name): the model's kind
        (``mtl`` for a meta checkpoint, ``pretrained`` for a pre-trained encoder) plus ``+<name>``."""
        return ("mtl" if kind == "meta" else "pretrained") + f"+{cls.name}"

    @classmethod
    def nonfinite(cls, inner: InnerLoop | None) -> tuple[str, str]:
        """(what gave the non-finite logits, what to do): the parts of the one-line error of ``models/evaluate.py``."""
        return f"the {cls.name} classifier", "check the checkpoint"


class FinetuneHead(FewShotHead):
    """The MTL base learner: theta_0 = ``init`` adapted on each task's support by the inner loop (paper Eq. 3,
    :func:`inner_loop`: ``inner.steps`` steps at ``inner.lr`` on ``inner.loss_scale`` x the mean CE), then the query
    logits ``X W_T^T + b_T`` (:meth:`logits`). ``order``: ``first`` (closed form; official PyTorch), ``autograd`` (the per-task
    reference), ``second`` (differentiable through the loop; official TF); default ``second`` if
    ``inner.second_order`` else ``first``. With ``init`` requiring grad (meta-training) the logits carry the outer
    gradient to it (first order: straight through; second order: through the loop).

    The loop and the logits run in the wider of float32 and the features' / weights' dtype with autocast off (under
    ``--amp`` only the encoder runs in bfloat16).
    """

    name = "finetune"

    def __init__(self, way: int, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                 inner: InnerLoop | None = None, order: str | None = None) -> None:
        if init is None or inner is None:
            raise ValueError("the finetune head needs its initialisation (weight (way, D), bias (way,)) and the "
                             "inner loop's settings")
        super().__init__(way, init, inner, order or ("second" if inner.second_order else "first"))

    def fit(self, feat_s: torch.Tensor, y_s: torch.Tensor) -> "FinetuneHead":
        w0, b0 = self.init
        t = feat_s.shape[0]
        dt = _compute_dtype(feat_s, w0)
        w0 = w0.to(feat_s.device).unsqueeze(0).expand(t, -1, -1)
        b0 = b0.to(feat_s.device).unsqueeze(0).expand(t, -1)
        with torch.autocast(feat_s.device.type, enabled=False):
            self.weight, self.bias = inner_loop(feat_s.to(dt), y_s, w0.to(dt), b0.to(dt), self.inner.steps,
                                                self.inner.lr, order=self.order, loss_scale=self.inner.loss_scale)
        return self

    def logits(self, feat_q: torch.Tensor) -> torch.Tensor:
        """Per task ``X_t W_t^T + b_t``: one ``F.linear`` each, so a task's logits and their gradients do not depend on
        how many tasks are computed together (a meta-batch split over processes, a chunk of the bank), as one batched
        GEMM's may (its kernel, and so its rounding, can change with the batch count)."""
        with torch.autocast(feat_q.device.type, enabled=False):
            q = feat_q.to(self.weight.dtype)
            return torch.stack([F.linear(x, w, b) for x, w, b in zip(q, self.weight, self.bias)])

    @classmethod
    def method(cls, kind: str) -> str:
        return "mtl" if kind == "meta" else "pretrained"  # the paper's two methods: MTL, and FT of a pre-trained net

    @classmethod
    def nonfinite(cls, inner: InnerLoop | None) -> tuple[str, str]:
        return "the inner loop", f"Lower {inner.hint() if inner is not None else 'the inner step size or steps'}"


def class_means(feat_s: torch.Tensor, y_s: torch.Tensor, way: int) -> torch.Tensor:
    """Mean support feature of each class: ``feat_s`` (T, n_s, D), ``y_s`` (T, n_s) -> (T, way, D).

    With as many images of every class (every episode) the images are put in the episode layout (i-th image of
    class k at row ``i * way + k``; a no-op for an episode's own support) and averaged per class, the one reduction
    for every such support; otherwise a weighted sum by the one-hot labels. A class without support image is an error.
    """
    t, n_s, d = feat_s.shape
    counts = F.one_hot(y_s, way).sum(1)                                      # (T, way)
    if not bool((counts > 0).all()):
        raise ValueError(f"every class needs a support image; counts per class: {counts.tolist()}")
    if bool((counts == counts[:, :1]).all()):
        n = n_s // way
        order = torch.argsort(y_s, dim=1, stable=True).view(t, way, n).transpose(1, 2).reshape(t, n_s)
        x = torch.gather(feat_s, 1, order.unsqueeze(-1).expand(-1, -1, d))   # (T, n_s, D) in the episode layout
        return by_class(x, way, dim=1).mean(1)
    onehot = F.one_hot(y_s, way).to(feat_s.dtype)                           # (T, n_s, way)
    return onehot.transpose(1, 2) @ feat_s / counts.unsqueeze(-1).to(feat_s.dtype)


class CentroidHead(FewShotHead):
    """Nearest class mean: logits = ``-|q - c_k|^2`` for the mean support feature ``c_k`` of each class
    (:func:`class_means`); nothing is fitted but the means (``init`` and ``inner`` are not used)."""

    name = "centroid"

    def fit(self, feat_s: torch.Tensor, y_s: torch.Tensor) -> "CentroidHead":
        self.protos = class_means(feat_s, y_s, self.way)
        return self

    def logits(self, feat_q: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(feat_q, self.protos).pow(2)

    @classmethod
    def nonfinite(cls, inner: InnerLoop | None) -> tuple[str, str]:
        return ("the nearest-class-mean classifier",
                "The features are too large for float32 distances: check the checkpoint")


# The single list of few-shot heads: --eval_classifier's choices and every evaluation read it. One line per head.
HEADS: dict[str, type[FewShotHead]] = {
    "finetune": FinetuneHead,
    "centroid": CentroidHead,
}


def make_head(name: str, way: int, init: tuple[torch.Tensor, torch.Tensor] | None = None,
              inner: InnerLoop | None = None, order: str | None = None) -> FewShotHead:
    """The head registered as ``name`` in :data:`HEADS` (a ValueError naming the registered ones otherwise)."""
    if name not in HEADS:
        raise ValueError(f"unknown few-shot head {name!r}; registered: {', '.join(HEADS)}")
    return HEADS[name](way, init=init, inner=inner, order=order)
