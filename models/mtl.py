"""The MTL learners: the pre-train model and the meta model with the one batched task forward
(:meth:`MetaLearner.forward_tasks`), each buildable from its :class:`models.spec.ModelSpec`.

The base learner's inner loop (paper Eq. 3) is the ``finetune`` few-shot head (``models/heads.py``); the meta model
holds its meta-learned initialisation theta (``base_learner``) and adapts it through that head, the same head that
evaluation uses. Notation and the first / second order update: ``models/heads.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .bn_mode import apply_bn_mode
from .conv2d_mtl import Conv2dMtl
from .heads import FinetuneHead, InnerLoop, init_base_learner
from .resnet_mtl import build_backbone
from .spec import ModelSpec

__all__ = ["PreLearner", "MetaLearner", "build_encoder"]


def build_encoder(spec: ModelSpec) -> nn.Module:
    """The encoder a spec describes: the backbone (with SS convolutions for a meta model, Eq. 6) in its BatchNorm mode
    (``models/bn_mode.py``); for a pre-train model with its dropout (``backbone_kwargs``). (B, 3, S, S) -> (B, D)."""
    keep = float(spec.backbone_kwargs.get("dropout_keep", 1.0))
    return apply_bn_mode(build_backbone(spec.backbone, mtl=spec.kind == "meta", dropout_keep=keep), spec.bn_mode)


class _Learner(nn.Module):
    """What both learners share: the encoder's output width and the image -> feature map."""

    encoder: nn.Module

    @property
    def out_dim(self) -> int:
        return self.encoder.out_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> features (B, D)."""
        return self.encoder(x)

class PreLearner(_Learner):
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
        self.spec = ModelSpec(kind="pre", backbone=backbone, bn_mode=bn_mode,
                              backbone_kwargs={"dropout_keep": float(dropout_keep)}, pre_head=pre_head,
                              num_classes=num_classes)
        self.encoder = build_encoder(self.spec)
        d = self.encoder.out_dim
        if pre_head == "mlp":
            self.pre_fc = nn.Sequential(nn.Linear(d, 1000), nn.ReLU(), nn.Linear(1000, num_classes))
        elif pre_head == "linear":
            self.pre_fc = nn.Linear(d, num_classes)
            nn.init.xavier_uniform_(self.pre_fc.weight)
            nn.init.zeros_(self.pre_fc.bias)
        else:
            raise ValueError(f"pre_head must be 'mlp' or 'linear', got {pre_head!r}")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "PreLearner":
        """The pre-train model a ``pre`` spec describes (the one its checkpoint was saved from)."""
        if spec.kind != "pre" or spec.num_classes is None or spec.pre_head is None:
            raise ValueError(f"a pre-train model needs a 'pre' spec with pre_head and num_classes, got {spec}")
        return cls(spec.backbone, spec.num_classes, spec.pre_head, spec.backbone_kwargs.get("dropout_keep", 1.0),
                   spec.bn_mode)

    def forward(self, x: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """Classification over the base classes: images (B, 3, S, S) -> logits (B, num_classes). ``encoder``: the
        module that encodes (default ``self.encoder``; the trainer passes its ``torch.compile`` view)."""
        return self.pre_fc((self.encoder if encoder is None else encoder)(x))


class MetaLearner(_Learner):
    """The meta model (paper Sec. 4.2): ``encoder`` = the backbone with SS convs (Eq. 6; frozen W, b; trainable Phi
    and BN affine; no dropout) and ``base_learner`` = Linear(D, way), theta, initialised by
    :func:`models.heads.init_base_learner` (W ~ kaiming_normal_, fan_in, gain sqrt(2), as the official ``fc1_w``;
    b = 0). State-dict keys ``encoder.*``, ``base_learner.*`` (ours and, through ``models/loading.py``, the official
    PyTorch meta checkpoints load unchanged). ``bn_mode``: the encoder's BatchNorm semantics
    (:func:`models.bn_mode.apply_bn_mode`; ``tf`` = the TF code's batch-statistics BatchNorm, no BN parameters, and a
    conv bias with an SS shift on every 3x3 conv of a ResNet-12 block). ``shortcut_ss=False`` freezes the SS
    parameters of the 1x1 shortcut convs (``shortcut``, ``downsample.0``) at Phi_S1 = 1, Phi_S2 = 0, as the TF code,
    which gives the shortcut no SS (reference section 3.2)."""

    def __init__(self, backbone: str, way: int = 5, bn_mode: str = "pytorch", shortcut_ss: bool = True) -> None:
        super().__init__()
        if way < 2:
            raise ValueError(f"way must be >= 2, got {way}")
        self.way = way
        self.spec = ModelSpec(kind="meta", backbone=backbone, bn_mode=bn_mode, way=way, shortcut_ss=shortcut_ss)
        self.encoder = build_encoder(self.spec)
        if not shortcut_ss:
            for name, m in self.encoder.named_modules():
                if isinstance(m, Conv2dMtl) and (name.endswith("shortcut") or name.endswith("downsample.0")):
                    for p in (m.mtl_weight, m.mtl_bias):
                        if p is not None:
                            p.requires_grad_(False)
        self.base_learner = nn.Linear(self.encoder.out_dim, way)
        init_base_learner(self.base_learner.weight, self.base_learner.bias)
        self.check_trainable()

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "MetaLearner":
        """The meta model a ``meta`` spec describes (the one its checkpoint was saved from)."""
        if spec.kind != "meta" or spec.way is None:
            raise ValueError(f"a meta model needs a 'meta' spec with its way, got {spec}")
        return cls(spec.backbone, spec.way, spec.bn_mode, spec.shortcut_ss)

    forward = _Learner.encode

    def forward_tasks(self, x_s: torch.Tensor, y_s: torch.Tensor, x_q: torch.Tensor, inner: InnerLoop,
                      encoder: nn.Module | None = None) -> torch.Tensor:
        """The T tasks of a meta-batch (Alg. 2 lines 3-6): adapt theta on each support set (Eq. 3), classify each
        query at its adapted theta_T, through the ``finetune`` head (:class:`models.heads.FinetuneHead`) started
        at this model's ``base_learner``.

        Each task's query and support go through the encoder as separate forward passes, task after task and query
        before support (the official order), so train-mode BN uses the same batch statistics and updates its
        running statistics in the same order as the official one-task step. First order (official PyTorch) encodes
        the support without a graph and adapts with the closed-form gradient; a straight-through identity makes
        the query loss's gradient w.r.t. theta its gradient w.r.t. theta_T (SS/BN learn through the query path
        only, Eq. 4-5 first order). Second order (official TF) encodes the support with a graph and differentiates
        through the inner loop. One batched :func:`models.heads.inner_loop` adapts the T copies of theta; the
        tasks' losses are independent, so this is exact (``tests/trainer/test_speed_paths.py``). Under ``--amp``
        (bfloat16 autocast) only the encoder runs in bfloat16: the head runs in float32 with autocast off.

        Args:
            x_s: (T, way*shot, 3, S, S) support images; y_s: (way*shot,) long labels in [0, way), the same for
                every task (the episode layout).
            x_q: (T, n_q, 3, S, S) query images.
            inner: the inner loop (Eq. 3, :func:`models.heads.inner_loop`): steps, lr, loss scale, and whether the
                outer gradient goes through it (``second_order``).
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
            if inner.second_order:
                emb_s.append(enc(x_s[i]))
            else:
                with torch.no_grad():
                    emb_s.append(enc(x_s[i]))
        head = FinetuneHead(self.way, (self.base_learner.weight, self.base_learner.bias), inner)
        return head.fit(torch.stack(emb_s), y_s.unsqueeze(0).expand(t, -1)).logits(torch.stack(emb_q))

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
