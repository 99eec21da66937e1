"""Scaling & Shifting (SS) convolution, paper Eq. 6.

    SS(X; W, b; Phi_S1, Phi_S2) = (W ⊙ Phi_S1) X + (b + Phi_S2)

``W`` and ``b`` are the pre-trained, frozen conv weights (``requires_grad=False``). ``Phi_S1`` (``mtl_weight``) holds one
scalar per 2-D kernel slice, shape (out, in/groups, 1, 1), initialised to 1; ``Phi_S2`` (``mtl_bias``) has shape (out,),
initialised to 0, and exists only when the conv has a bias (as the official PyTorch code, reference §3.1).

State-dict keys are ``weight``, ``bias``, ``mtl_weight``, ``mtl_bias`` (the official names), so a plain ``nn.Conv2d``
state dict loads unchanged; with ``strict=False`` only the ``mtl_*`` keys are reported missing.

Note: ``module.requires_grad_(True)`` on an enclosing model would unfreeze ``weight``/``bias`` again; the learner never
does that and checks the trainable set (``models.mtl.MetaLearner.meta_parameters``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Conv2dMtl"]


class Conv2dMtl(nn.Conv2d):
    """``nn.Conv2d`` with frozen ``weight``/``bias`` and trainable SS parameters (Eq. 6).

    Constructor arguments are those of ``nn.Conv2d``; only ``padding_mode="zeros"`` is supported.
    forward: (B, in, H, W) -> (B, out, H', W'), identical to ``F.conv2d`` with the effective weight
    ``weight * mtl_weight`` (broadcast over the kernel) and bias ``bias + mtl_bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"Conv2dMtl supports padding_mode='zeros' only, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight.requires_grad_(False)
        self.mtl_weight = nn.Parameter(torch.ones(out_channels, in_channels // groups, 1, 1, **factory))
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.mtl_bias = nn.Parameter(torch.zeros(out_channels, **factory))
        else:
            self.register_parameter("mtl_bias", None)

    def reset_parameters(self) -> None:
        """W, b as ``nn.Conv2d``; Phi_S1 = 1, Phi_S2 = 0 (Alg. 1 line 6)."""
        super().reset_parameters()
        if getattr(self, "mtl_weight", None) is not None:  # not yet created while nn.Conv2d.__init__ runs
            with torch.no_grad():
                self.mtl_weight.fill_(1.0)
                if self.mtl_bias is not None:
                    self.mtl_bias.zero_()

    def effective_weight(self) -> torch.Tensor:
        """W ⊙ Phi_S1, shape (out, in/groups, kH, kW)."""
        return self.weight * self.mtl_weight

    def effective_bias(self) -> torch.Tensor | None:
        """b + Phi_S2, shape (out,), or None without bias."""
        if self.bias is None:
            return None
        return self.bias + self.mtl_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.effective_bias(), self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", mtl=True"
