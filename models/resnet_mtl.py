"""Feature extractors (the encoder Theta), plain (pre-train) or with SS convolutions (meta phase).

Every backbone maps images (B, 3, S, S) to features (B, D) and ends with a global average pool, so any
S >= ``min_image_size(name)`` works. ``.out_dim`` is D. With ``mtl=True`` every convolution (including 1x1
shortcuts) is a :class:`models.conv2d_mtl.Conv2dMtl`, whose pre-trained weights are frozen (Eq. 6); with
``mtl=False`` they are plain, trainable ``nn.Conv2d``. The two variants have the same state-dict keys apart
from the ``mtl_*`` entries, so a pre-train checkpoint loads into the meta encoder 1:1.

Backbones (reference §2):
* ``resnet12`` (paper / official TF, default): 4 residual blocks, widths 64-128-256-512; block =
  3 x [conv3x3 -> BN -> LeakyReLU(0.1)] + conv1x1 shortcut without BN, summed with no activation after the sum,
  then MaxPool2d(2) and Dropout(1 - keep) (pre-train only). 84 px -> 5x5 final map -> 512-d.
  Deviations from TF: convs have no bias (BN follows each one, so a bias is redundant), and BN is a standard
  PyTorch BatchNorm2d with affine parameters and running statistics (``--bn_mode tf``, ``models/bn_mode.py``,
  gives the TF BatchNorm and the conv biases back).
* ``resnet12_wide``: 64-160-320-640. ``resnet12_slim``: 32-64-128-256 (CPU demo size).
* ``resnet25``: the official PyTorch ``ResNetMtl`` (layers [4, 4, 4], 80-160-320-640) with the official state-dict
  key names (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``), so official
  checkpoints load 1:1. The official fixed AvgPool2d(10) (80 px input) is replaced by a global average pool, which
  is identical at 80 px. Official PT has no dropout; here ``dropout_keep < 1`` adds one Dropout on the layer3
  feature map (before pooling) and the default 1.0 is exactly the official network.
* ``conv4``: 4 x [conv3x3(64) -> BN -> ReLU -> MaxPool2d(2)] (MAML baseline) -> 64-d; Dropout after each block
  when ``dropout_keep < 1``.
* ``resnet18`` / ``resnet34`` (the seed's Todo): torchvision's ResNet with BasicBlocks, layers [2, 2, 2, 2] /
  [3, 4, 6, 3], widths 64-128-256-512 -> 512-d, with torchvision's module and state-dict names (``conv1``, ``bn1``,
  ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``): torchvision's ``resnet18().state_dict()``
  minus ``fc.*`` loads 1:1 into the plain backbone (and, with ``strict=False``, into the SS one, only ``mtl_*``
  missing). Few-shot stem: the 7x7 stem conv keeps its kernel (so ImageNet weights still fit) but runs at stride 1,
  and the 3x3/2 max-pool after it is left out. torchvision's stem divides the side by 4 for 224-px ImageNet images
  (224 -> 56 -> final 7x7); on few-shot inputs it would leave a 3x3 final map at 84 px and 1x1 at 32 px (layer4's
  3x3 convs then see mostly padding). Without that 4x reduction 84 px gives 84 -> 42 -> 21 -> 11 (the final map
  size of FEAT's ResNet-18, which uses a 3x3 stem for the same reason) and 32 px gives 32 -> 16 -> 8 -> 4 (the
  CIFAR ResNets' 4x4). ``imagenet_stem=True`` (not registered) builds torchvision's own stem, for 224-px inputs.
* ``wrn28_10``: WRN-28-10 (Zagoruyko & Komodakis 2016) as the few-shot papers use it (S2M2 / "Charting the right
  manifold", ``nupurkmr9/S2M2_fewshot`` ``wrn_mixup_model.py`` ``WideResNet``; the same layout as FEAT's
  ``model/networks/WRN28.py``): stem conv3x3(3 -> 16), three groups of 4 pre-activation wide blocks
  [BN -> ReLU -> conv3x3 -> BN -> ReLU -> (Dropout) -> conv3x3] at widths 160, 320, 640 with strides 1, 2, 2 (a 1x1
  shortcut conv on the pre-activated input where the width changes), then BN -> ReLU and the global pool -> 640-d.
  No conv has a bias (S2M2; FEAT's copy has biases). Module names are S2M2's (``conv1``, ``block{1,2,3}.layer.{i}.
  {bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``): its checkpoints' feature keys match once their ``module.`` prefix
  and ``linear.*`` are removed (checked against its code, not against a downloaded checkpoint). The stem is already the
  small-image one (WRN was designed for 32-px CIFAR): 84 px -> 84 -> 42 -> 21 (FEAT's ``avg_pool2d(out, 21)``),
  32 px -> 32 -> 16 -> 8. ``dropout_keep < 1`` is the WRN dropout between a block's two convs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .conv2d_mtl import Conv2dMtl

__all__ = ["BACKBONES", "BackboneSpec", "build_backbone", "min_image_size", "Backbone", "ResNet12", "ResNet25", "Conv4",
           "ResNetTV", "WideResNet"]


def _conv_cls(mtl: bool) -> type[nn.Conv2d]:
    return Conv2dMtl if mtl else nn.Conv2d


def _dropout(keep: float) -> nn.Module:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"dropout_keep must be in (0, 1], got {keep}")
    return nn.Dropout(p=1.0 - keep) if keep < 1.0 else nn.Identity()


def _init_weights(module: nn.Module, nonlinearity: str, a: float = 0.0) -> None:
    """Conv weights kaiming_normal_(fan_out); BN weight 1, bias 0. SS parameters keep their 1/0 init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=a, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Common interface: ``features(x)`` gives the final map (B, D, h, w); ``forward(x)`` pools it to (B, D)."""

    out_dim: int
    min_size: int
    name: str

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S) float -> features (B, D)."""
        if x.dim() != 4 or x.shape[-1] < self.min_size or x.shape[-2] < self.min_size:
            raise ValueError(f"backbone {self.name} needs input (B, 3, S, S) with S >= {self.min_size}, "
                             f"got shape {tuple(x.shape)}")
        return torch.flatten(self.avgpool(self.features(x)), 1)


# ----------------------------------------------------------------------------------------------------------- ResNet-12
class ResBlock12(nn.Module):
    """TF ResNet-12 block: h = [conv3x3-BN-LeakyReLU(0.1)] x 3; y = h + conv1x1(x); MaxPool2d(2); Dropout.

    (B, in, H, W) -> (B, out, H//2, W//2).
    """

    def __init__(self, in_ch: int, out_ch: int, mtl: bool, dropout_keep: float) -> None:
        super().__init__()
        conv = _conv_cls(mtl)
        self.conv1 = conv(in_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv3 = conv(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = conv(in_ch, out_ch, 1, stride=1, padding=0, bias=False)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.dropout = _dropout(dropout_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.bn2(self.conv2(h)))
        h = self.act(self.bn3(self.conv3(h)))
        return self.dropout(self.pool(h + self.shortcut(x)))


class ResNet12(Backbone):
    """ResNet-12 (paper / TF). (B, 3, S, S) -> (B, widths[-1]); S=84 gives a 5x5 final map."""

    def __init__(self, widths: tuple[int, int, int, int], mtl: bool = False, dropout_keep: float = 1.0,
                 name: str = "resnet12") -> None:
        super().__init__()
        self.name, self.min_size, self.out_dim = name, 16, widths[-1]
        chans = (3,) + tuple(widths)
        self.layer1 = ResBlock12(chans[0], chans[1], mtl, dropout_keep)
        self.layer2 = ResBlock12(chans[1], chans[2], mtl, dropout_keep)
        self.layer3 = ResBlock12(chans[2], chans[3], mtl, dropout_keep)
        self.layer4 = ResBlock12(chans[3], chans[4], mtl, dropout_keep)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, "leaky_relu", a=0.1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ----------------------------------------------------------------------------------------------------------- ResNet-25
class BasicBlock(nn.Module):
    """Official PT BasicBlock: conv3x3(s)-BN-ReLU-conv3x3-BN, + downsample(x) or x, ReLU. Key names as official."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, mtl: bool) -> None:
        super().__init__()
        conv = _conv_cls(mtl)
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


def basic_layer(inplanes: int, planes: int, blocks: int, stride: int, mtl: bool) -> nn.Sequential:
    """A stage of ``blocks`` BasicBlocks (the official PT and torchvision ``_make_layer``): the first has stride
    ``stride`` and, where the shape changes, ``downsample`` = conv1x1(stride, no bias) -> BN. (B, inplanes, H, W) ->
    (B, planes, ceil(H / stride), ceil(W / stride))."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(_conv_cls(mtl)(inplanes, planes, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample, mtl)]
    layers += [BasicBlock(planes, planes, 1, None, mtl) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet25(Backbone):
    """Official PT ``ResNetMtl`` (FEAT's wide ResNet), layers [4, 4, 4]. (B, 3, S, S) -> (B, 640); 80 px -> 10x10 map."""

    def __init__(self, mtl: bool = False, dropout_keep: float = 1.0, layers: tuple[int, int, int] = (4, 4, 4),
                 name: str = "resnet25") -> None:
        super().__init__()
        cfg = (160, 320, 640)
        self.name, self.min_size, self.out_dim = name, 8, cfg[-1]
        conv = _conv_cls(mtl)
        self.inplanes = cfg[0] // 2
        self.conv1 = conv(3, self.inplanes, 3, stride=1, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(cfg[0], layers[0], 2, mtl)
        self.layer2 = self._make_layer(cfg[1], layers[1], 2, mtl)
        self.layer3 = self._make_layer(cfg[2], layers[2], 2, mtl)
        self.dropout = _dropout(dropout_keep)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, "relu")

    def _make_layer(self, planes: int, blocks: int, stride: int, mtl: bool) -> nn.Sequential:
        layer = basic_layer(self.inplanes, planes, blocks, stride, mtl)
        self.inplanes = planes
        return layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.dropout(self.layer3(self.layer2(self.layer1(x))))


# --------------------------------------------------------------------------------------------------------------- Conv4
class Conv4(Backbone):
    """MAML Conv-4: 4 x [conv3x3(64, bias) -> BN -> ReLU -> MaxPool2d(2)]. (B, 3, S, S) -> (B, 64)."""

    def __init__(self, mtl: bool = False, dropout_keep: float = 1.0, width: int = 64, name: str = "conv4") -> None:
        super().__init__()
        self.name, self.min_size, self.out_dim = name, 16, width
        conv = _conv_cls(mtl)
        blocks = []
        for i in range(4):
            blocks.append(nn.Sequential(conv(3 if i == 0 else width, width, 3, padding=1, bias=True),
                                        nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                        _dropout(dropout_keep)))
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, "relu")
        for m in self.modules():  # conv biases start at 0
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# -------------------------------------------------------------------------------------------- ResNet-18 / ResNet-34
class ResNetTV(Backbone):
    """torchvision's BasicBlock ResNet (``torchvision.models.resnet18`` / ``resnet34`` without ``fc``), with its
    module names; widths 64-128-256-512, ``layers`` blocks per stage, strides 1, 2, 2, 2. (B, 3, S, S) -> (B, 512).

    Stem (see the module docstring for why): few-shot (default) = conv7x7(3 -> 64, stride 1, pad 3) -> BN -> ReLU,
    no max-pool, so 84 px -> final 11x11 map and 32 px -> 4x4; ``imagenet_stem=True`` = torchvision's conv7x7
    stride 2 + max-pool 3x3/2 (224 px -> 7x7). Both have the same parameters (the max-pool has none), so one state
    dict fits both. ``dropout_keep < 1`` adds one Dropout on the final map (as ``resnet25``); torchvision has none.
    """

    def __init__(self, layers: tuple[int, int, int, int], mtl: bool = False, dropout_keep: float = 1.0,
                 name: str = "resnet18", imagenet_stem: bool = False) -> None:
        super().__init__()
        widths = (64, 128, 256, 512)
        self.name, self.out_dim = name, widths[-1]
        self.min_size = 32 if imagenet_stem else 8  # each stride-2 stage keeps >= 1 pixel; 5 / 3 of them
        conv = _conv_cls(mtl)
        self.conv1 = conv(3, widths[0], 7, stride=2 if imagenet_stem else 1, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet_stem else nn.Identity()
        self.layer1 = basic_layer(widths[0], widths[0], layers[0], 1, mtl)
        self.layer2 = basic_layer(widths[0], widths[1], layers[1], 2, mtl)
        self.layer3 = basic_layer(widths[1], widths[2], layers[2], 2, mtl)
        self.layer4 = basic_layer(widths[2], widths[3], layers[3], 2, mtl)
        self.dropout = _dropout(dropout_keep)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, "relu")  # torchvision's: kaiming_normal_(fan_out, relu), BN 1 / 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.dropout(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


# ----------------------------------------------------------------------------------------------------------- WRN-28-10
class WideBlock(nn.Module):
    """Pre-activation wide basic block (WRN; S2M2's ``BasicBlock``, its names):
    a = ReLU(BN(x)); y = conv3x3(Dropout(ReLU(BN(conv3x3_s(a))))) + (x, or convShortcut(a) where the width changes).

    (B, in, H, W) -> (B, out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, mtl: bool, dropout_keep: float) -> None:
        super().__init__()
        if in_planes == out_planes and stride != 1:
            raise ValueError("a wide block with an identity shortcut must have stride 1")
        conv = _conv_cls(mtl)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = _dropout(dropout_keep)
        self.conv2 = conv(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.convShortcut = None if in_planes == out_planes else conv(in_planes, out_planes, 1, stride=stride,
                                                                      padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(a)))))
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class WideGroup(nn.Module):
    """``n`` wide blocks, the first with ``stride`` (S2M2's ``NetworkBlock``: the blocks are ``.layer``)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, mtl: bool, dropout_keep: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                                               mtl, dropout_keep) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(Backbone):
    """WRN-depth-k as in S2M2 (module docstring): conv3x3(3 -> 16), groups of (depth - 4) / 6 wide blocks at widths
    16k, 32k, 64k (strides 1, 2, 2), BN -> ReLU. (B, 3, S, S) -> (B, 64k); WRN-28-10: 84 px -> 21x21 final map."""

    def __init__(self, depth: int = 28, widen: int = 10, mtl: bool = False, dropout_keep: float = 1.0,
                 name: str = "wrn28_10") -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.name, self.min_size, self.out_dim = name, 4, widths[-1]
        self.conv1 = _conv_cls(mtl)(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, mtl, dropout_keep)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, mtl, dropout_keep)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, mtl, dropout_keep)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, "relu")  # S2M2: normal(0, sqrt(2 / (k * k * out))) = kaiming fan_out; BN 1 / 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))


# ------------------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class BackboneSpec:
    """One entry of the registry: ``build(mtl, dropout_keep)`` and the recipe it was published with
    (``config/options.py``: the default recipe when ``--recipe`` is not given). The smallest input side it accepts is
    the built network's ``min_size`` (one home: each class sets it from its own pooling stages), read by
    :func:`min_image_size`."""

    build: Callable[[bool, float], Backbone]
    recipe: str


# The single list of backbone names: main.py's --backbone choices and every other list are read from it. Adding a
# backbone: its class (a Backbone: ``features``, ``out_dim``, ``min_size``, ``name``) and one line here.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet12": BackboneSpec(lambda mtl, keep: ResNet12((64, 128, 256, 512), mtl, keep, name="resnet12"), "paper"),
    "resnet12_wide": BackboneSpec(lambda mtl, keep: ResNet12((64, 160, 320, 640), mtl, keep, name="resnet12_wide"),
                                  "paper"),
    "resnet12_slim": BackboneSpec(lambda mtl, keep: ResNet12((32, 64, 128, 256), mtl, keep, name="resnet12_slim"),
                                  "paper"),
    "resnet25": BackboneSpec(lambda mtl, keep: ResNet25(mtl, keep, name="resnet25"), "pytorch"),
    "conv4": BackboneSpec(lambda mtl, keep: Conv4(mtl, keep, name="conv4"), "pytorch"),
    "resnet18": BackboneSpec(lambda mtl, keep: ResNetTV((2, 2, 2, 2), mtl, keep, name="resnet18"), "pytorch"),
    "resnet34": BackboneSpec(lambda mtl, keep: ResNetTV((3, 4, 6, 3), mtl, keep, name="resnet34"), "pytorch"),
    "wrn28_10": BackboneSpec(lambda mtl, keep: WideResNet(28, 10, mtl, keep, name="wrn28_10"), "pytorch"),
}


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


@functools.lru_cache(maxsize=None)
def min_image_size(name: str) -> int:
    """Smallest square input side (px) the backbone accepts (every pooling stage keeps >= 1 pixel): the ``min_size``
    of the network its builder makes (built on the meta device: no memory, no random numbers drawn)."""
    _check_name(name)
    with torch.device("meta"):
        return BACKBONES[name].build(False, 1.0).min_size


def build_backbone(name: str, mtl: bool, dropout_keep: float = 1.0) -> Backbone:
    """Build backbone ``name``; forward (B, 3, S, S) -> (B, .out_dim). ``mtl=True``: every conv is Conv2dMtl (frozen
    W, b; trainable SS, Eq. 6). ``dropout_keep`` < 1 adds nn.Dropout modules (pre-train only; ``eval()`` disables them).
    """
    _check_name(name)
    return BACKBONES[name].build(bool(mtl), float(dropout_keep))
