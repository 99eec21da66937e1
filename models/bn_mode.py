"""BatchNorm semantics of a backbone: PyTorch's (default) or the official TensorFlow code's (``--bn_mode tf``).

``pytorch``: ``nn.BatchNorm2d`` as built by the backbones (learned scale and shift, running statistics used in
``eval()``; the official PyTorch code, reference section 3.1).

``tf``: the official TF ResNet-12 conv block, ``conv2d(x, W, 'SAME') + bias -> batch_norm -> activation``
(``tensorflow/utils/misc.py`` ``resnet_conv_block`` L217-241, ``normalize`` L257-276) with
``tf.contrib.layers.batch_norm``'s defaults as the TF code calls it: no scale (``scale=False``), a shift that is never
trained (no optimizer's ``var_list`` holds it, so it stays 0), ``epsilon=1e-3``, and ``is_training=True`` always, i.e.
**batch statistics at train and at test time** (the moving averages are never used). So every BatchNorm becomes
:class:`TFBatchNorm2d` (``affine=False``, ``track_running_stats=False``, ``eps=1e-3``), and every convolution that
feeds a BatchNorm of a conv block (``conv<k>`` followed by ``bn<k>`` in the same module, the naming the backbones
use) gets the TF conv bias (zeros at init; frozen with a trainable SS shift ``mtl_bias`` in a
:class:`models.conv2d_mtl.Conv2dMtl`, the TF meta graph's ``ss_weights[<block>_bias<k>]``, reference section 3.2).

Under batch statistics a per-channel constant before the BatchNorm cancels exactly (the batch mean removes it), so
the conv bias and the SS shift do not change the features; they exist so that the TF weight files map onto the
model tensor by tensor (``models/tf_weights.py``) and round-trip.

With ``tf`` a feature depends on the other images of its batch, so evaluation encodes each episode's support and
query as their own batches (``--eval_mode episodic``, which ``config.settings`` selects), as the TF test graph does.

This is a module swap applied after a backbone is built (:func:`apply_bn_mode`), so no backbone builder changes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .conv2d_mtl import Conv2dMtl

__all__ = ["BN_MODES", "TF_BN_EPS", "TFBatchNorm2d", "apply_bn_mode", "batch_dependent"]

BN_MODES = ("pytorch", "tf")
TF_BN_EPS = 1e-3  # tf.contrib.layers.batch_norm's default epsilon


class TFBatchNorm2d(nn.BatchNorm2d):
    """The TF code's BatchNorm: ``(x - mean_B) / sqrt(var_B + 1e-3)`` over (N, H, W) per channel, with the batch's
    own (biased) statistics in every mode, no scale and no shift. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=TF_BN_EPS, affine=False, track_running_stats=False)


def _add_conv_bias(conv: nn.Conv2d) -> None:
    """Give ``conv`` a zero bias (frozen + a trainable zero ``mtl_bias`` for a Conv2dMtl, trainable otherwise)."""
    if conv.bias is not None:
        return
    zeros = torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    if isinstance(conv, Conv2dMtl):
        conv.bias = nn.Parameter(zeros.clone(), requires_grad=False)
        conv.mtl_bias = nn.Parameter(zeros.clone())
    else:
        conv.bias = nn.Parameter(zeros.clone())


def apply_bn_mode(module: nn.Module, mode: str) -> nn.Module:
    """Switch ``module`` (a backbone) to BatchNorm semantics ``mode`` in place and return it (see the module doc).

    ``pytorch`` leaves it unchanged. ``tf`` replaces every ``nn.BatchNorm2d`` by :class:`TFBatchNorm2d` and gives
    each ``conv<k>`` that has a sibling ``bn<k>`` a conv bias.
    """
    if mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {mode!r}")
    if mode == "pytorch":
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and not isinstance(child, TFBatchNorm2d):
                setattr(parent, name, TFBatchNorm2d(child.num_features).to(
                    device=child.running_mean.device if child.running_mean is not None else None))
                if name.startswith("bn") and isinstance(getattr(parent, "conv" + name[2:], None), nn.Conv2d):
                    _add_conv_bias(getattr(parent, "conv" + name[2:]))
    module.bn_mode = "tf"
    return module


def batch_dependent(module: nn.Module) -> bool:
    """True if ``module``'s output for an image depends on the other images of the batch in ``eval()`` (a BatchNorm
    without running statistics): such an encoder cannot be evaluated through a feature bank."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in module.modules())
