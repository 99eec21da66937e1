"""The seed's Todo backbones: ``resnet18`` / ``resnet34`` (torchvision's BasicBlock ResNets, few-shot stem) and
``wrn28_10`` (the WRN-28-10 of S2M2 / FEAT), each plain and with every conv as Conv2dMtl.

Parameter counts are derived by formula here, from the layouts (and, for the ResNets, checked against torchvision's
own models minus ``fc``). Equalities of two networks are compared in float64 (``assert_close_f64``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from models.conv2d_mtl import Conv2dMtl
from models.heads import InnerLoop
from models.mtl import MetaLearner
from models.resnet_mtl import ResNetTV, WideBlock, build_backbone, min_image_size
from tests.helpers import assert_close_f64

LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
NEW = ("resnet18", "resnet34", "wrn28_10")
OUT_DIM = {"resnet18": 512, "resnet34": 512, "wrn28_10": 640}
# final feature-map side at 84 px and at 32 px (module docstring of models/resnet_mtl.py)
FINAL_MAP = {"resnet18": {84: 11, 32: 4}, "resnet34": {84: 11, 32: 4}, "wrn28_10": {84: 21, 32: 8}}


# ------------------------------------------------------------------------------------------------ counts by formula
def _bn(c: int) -> int:
    return 2 * c  # affine weight + bias (running statistics are buffers)


def resnet_counts(layers: tuple[int, ...]) -> dict[str, int]:
    """torchvision BasicBlock ResNet without fc: conv weights, BN affine, SS weights (one per conv kernel slice,
    out x in; no conv has a bias, so no SS shift)."""
    conv = 3 * 64 * 7 * 7
    ss = 64 * 3
    bn = _bn(64)
    c = 64
    for p, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
        for i in range(n):
            cin = c if i == 0 else p
            conv += cin * p * 9 + p * p * 9
            ss += cin * p + p * p
            bn += 2 * _bn(p)
            if i == 0 and (stride != 1 or c != p):  # downsample: conv1x1 + BN
                conv += c * p
                ss += c * p
                bn += _bn(p)
        c = p
    return {"conv": conv, "bn": bn, "ss": ss}


def wrn_counts(depth: int = 28, k: int = 10) -> dict[str, int]:
    """S2M2's WRN-depth-k: stem conv3x3(3 -> 16), 3 groups of (depth - 4) / 6 pre-activation blocks, final BN."""
    n = (depth - 4) // 6
    conv, ss, bn = 3 * 16 * 9, 3 * 16, 0
    c = 16
    for p in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            cin = c if i == 0 else p
            bn += _bn(cin) + _bn(p)
            conv += cin * p * 9 + p * p * 9
            ss += cin * p + p * p
            if cin != p:  # 1x1 shortcut where the width changes
                conv += cin * p
                ss += cin * p
        c = p
    bn += _bn(c)
    return {"conv": conv, "bn": bn, "ss": ss}


COUNTS = {"resnet18": resnet_counts(LAYERS["resnet18"]), "resnet34": resnet_counts(LAYERS["resnet34"]),
          "wrn28_10": wrn_counts()}


@pytest.mark.parametrize("name", NEW)
def test_parameter_counts(name):
    c = COUNTS[name]
    plain = build_backbone(name, mtl=False)
    assert sum(p.numel() for p in plain.parameters()) == c["conv"] + c["bn"]
    assert all(p.requires_grad for p in plain.parameters())
    mtl = build_backbone(name, mtl=True)
    named = dict(mtl.named_parameters())
    assert sum(p.numel() for p in named.values()) == c["conv"] + c["bn"] + c["ss"]
    assert sum(p.numel() for n, p in named.items() if "mtl_" in n) == c["ss"]
    # the meta encoder trains SS and BN affine only; every conv weight is frozen
    assert sum(p.numel() for p in named.values() if p.requires_grad) == c["ss"] + c["bn"]
    assert not any(n.endswith("mtl_bias") for n in named)  # no conv has a bias


def test_resnet_counts_equal_torchvision_minus_fc():
    for name in LAYERS:
        tv = getattr(torchvision.models, name)(weights=None)
        n_tv = sum(p.numel() for k, p in tv.named_parameters() if not k.startswith("fc."))
        assert n_tv == COUNTS[name]["conv"] + COUNTS[name]["bn"]
    assert (COUNTS["resnet18"]["conv"] + COUNTS["resnet18"]["bn"], COUNTS["resnet34"]["conv"] +
            COUNTS["resnet34"]["bn"]) == (11_176_512, 21_284_672)
    # WRN-28-10: 36.5 M parameters in Zagoruyko & Komodakis (2016), Table 1 (with a 10-class head: 6,410 more)
    assert round((COUNTS["wrn28_10"]["conv"] + COUNTS["wrn28_10"]["bn"] + 640 * 10 + 10) / 1e5) == 365


# ------------------------------------------------------------------------------------------------ torchvision weights
def _randomize_bn_stats(model: nn.Module, seed: int) -> None:
    """Non-trivial BN running statistics and affine parameters (a fresh model has 0 / 1 / 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("name", list(LAYERS))
def test_torchvision_state_dict_loads_and_computes_the_same(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None)
    _randomize_bn_stats(tv, seed=1)
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    plain = build_backbone(name, mtl=False)
    assert set(plain.state_dict()) == set(sd)  # torchvision's names, nothing more, nothing less
    res = plain.load_state_dict(sd, strict=True)
    assert res.missing_keys == [] and res.unexpected_keys == []
    mtl = build_backbone(name, mtl=True)
    res = mtl.load_state_dict(sd, strict=False)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in tv.modules())
    assert res.unexpected_keys == [] and len(res.missing_keys) == n_convs
    assert all(k.endswith(".mtl_weight") for k in res.missing_keys)

    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # torchvision's own stem: the same network as torchvision's, output for output
        imnet = ResNetTV(LAYERS[name], imagenet_stem=True).double().eval()
        imnet.load_state_dict(sd)
        tv.double().eval()
        assert_close_f64(imnet(x), tv(x))
        # the few-shot stem = torchvision's with the stem conv at stride 1 and no max-pool
        tv.conv1.stride = (1, 1)
        tv.maxpool = nn.Identity()
        plain.double().eval()
        mtl.double().eval()
        ref = tv(x[..., :32, :32])
        assert_close_f64(plain(x[..., :32, :32]), ref)
        assert_close_f64(mtl(x[..., :32, :32]), ref)  # SS at its init (1) is the plain network


def test_imagenet_stem_sizes():
    net = ResNetTV(LAYERS["resnet18"], imagenet_stem=True).eval()
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)
    assert net.min_size == 32 and isinstance(net.maxpool, nn.MaxPool2d) and net.conv1.stride == (2, 2)
    few = build_backbone("resnet18", False)
    assert few.conv1.kernel_size == (7, 7) and few.conv1.stride == (1, 1) and isinstance(few.maxpool, nn.Identity)


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("mtl", [False, True])
def test_forward_shapes_84_and_32(name, mtl):
    torch.manual_seed(0)
    net = build_backbone(name, mtl).eval()
    assert net.out_dim == OUT_DIM[name] and min_image_size(name) == net.min_size
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2dMtl) == mtl for m in convs)
    seen = []
    hook = net.avgpool.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    for size, batch in ((84, 1), (32, 2)):
        with torch.no_grad():
            out = net(torch.randn(batch, 3, size, size))
        side = FINAL_MAP[name][size]
        assert out.shape == (batch, OUT_DIM[name]) and torch.isfinite(out).all()
        assert seen[-1] == (batch, OUT_DIM[name], side, side)
    hook.remove()
    s = net.min_size
    with torch.no_grad():
        assert net(torch.randn(2, 3, s, s)).shape == (2, OUT_DIM[name])
    with pytest.raises(ValueError, match=name):
        net(torch.randn(2, 3, s - 1, s - 1))


# ------------------------------------------------------------------------------------------------ WRN layout
def test_wrn_names_are_s2m2s():
    """S2M2's ``WideResNet`` state-dict keys (``conv1``, ``block{g}.layer.{i}.*``, ``bn1``; no ``linear``)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight"} | {f"bn1.{b}" for b in bn}
    for g in (1, 2, 3):
        for i in range(4):
            pre = f"block{g}.layer.{i}."
            expected |= {pre + "conv1.weight", pre + "conv2.weight"}
            expected |= {pre + f"bn{j}.{b}" for j in (1, 2) for b in bn}
            if i == 0:
                expected.add(pre + "convShortcut.weight")
    net = build_backbone("wrn28_10", False)
    assert set(net.state_dict()) == expected
    firsts = [getattr(net, f"block{g}").layer[0].conv1 for g in (1, 2, 3)]
    widths = [(c.in_channels, c.out_channels, c.stride) for c in firsts]
    assert widths == [(16, 160, (1, 1)), (160, 320, (2, 2)), (320, 640, (2, 2))]
    assert all(c.bias is None for c in net.modules() if isinstance(c, nn.Conv2d))
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 1 + 12 * 2 + 3  # 28 = depth


def test_wrn_block_is_pre_activation():
    """y = conv2(relu(bn2(conv1(a)))) + shortcut, a = relu(bn1(x)); the 1x1 shortcut sees a, the identity x."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    for cin, stride in ((8, 2), (16, 1)):
        blk = WideBlock(8 if cin == 8 else 16, 16, stride, mtl=False, dropout_keep=1.0).double()
        _randomize_bn_stats(blk, seed=3)
        blk.eval()
        xin = x if cin == 8 else torch.randn(2, 16, 6, 6, dtype=torch.float64)
        with torch.no_grad():
            a = F.relu(blk.bn1(xin))
            h = blk.conv2(F.relu(blk.bn2(blk.conv1(a))))
            ref = h + (blk.convShortcut(a) if blk.convShortcut is not None else xin)
            assert_close_f64(blk(xin), ref)
        assert (blk.convShortcut is None) == (cin == 16)
    with pytest.raises(ValueError):
        WideBlock(16, 16, 2, mtl=False, dropout_keep=1.0)


def test_dropout_placement():
    wrn = build_backbone("wrn28_10", False, dropout_keep=0.7)
    drops = [m for m in wrn.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 12 and all(abs(d.p - 0.3) < 1e-12 for d in drops)  # one per wide block, between its convs
    r18 = build_backbone("resnet18", False, dropout_keep=0.7)
    assert isinstance(r18.dropout, nn.Dropout) and sum(isinstance(m, nn.Dropout) for m in r18.modules()) == 1
    for name in NEW:
        assert not any(isinstance(m, nn.Dropout) for m in build_backbone(name, True).modules())


# ------------------------------------------------------------------------------------------------ meta-train smoke
WAY, SHOT, QUERY, SIZE = 3, 2, 2, 16


@pytest.mark.parametrize("name", NEW)
def test_meta_step_trains_only_ss_bn_and_base_learner(name):
    """One first-order meta step (forward_tasks, query CE, Adam): the trainable set is SS + BN affine + the base
    learner (the MTL wrapper freezes every conv weight), those with a gradient change and nothing else does."""
    torch.manual_seed(0)
    model = MetaLearner(name, way=WAY).train()
    ss_bn, fc = model.meta_parameters()
    allowed = set()
    for m in model.encoder.modules():
        if isinstance(m, Conv2dMtl):
            assert not m.weight.requires_grad and m.mtl_weight.requires_grad
            allowed.add(id(m.mtl_weight))
        elif isinstance(m, nn.BatchNorm2d):
            allowed |= {id(m.weight), id(m.bias)}
    assert {id(p) for p in ss_bn} == allowed
    assert sum(p.numel() for p in ss_bn) == COUNTS[name]["ss"] + COUNTS[name]["bn"]
    assert fc == [model.base_learner.weight, model.base_learner.bias]
    assert model.base_learner.weight.shape == (WAY, OUT_DIM[name])

    g = torch.Generator().manual_seed(1)
    x_s = torch.randn(1, WAY * SHOT, 3, SIZE, SIZE, generator=g)
    x_q = torch.randn(1, WAY * QUERY, 3, SIZE, SIZE, generator=g)
    y_s, y_q = torch.arange(WAY).repeat(SHOT), torch.arange(WAY).repeat(QUERY)
    opt = torch.optim.Adam([{"params": ss_bn}, {"params": fc, "lr": 1e-2}], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model.forward_tasks(x_s, y_s, x_q, InnerLoop(steps=3, lr=0.1))[0]
    assert logits.shape == (WAY * QUERY, WAY)
    F.cross_entropy(logits, y_q).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == with_grad and changed <= trainable
    assert "base_learner.weight" in changed and "encoder.conv1.mtl_weight" in changed
    assert not any(n.endswith(".weight") and "mtl_" not in n and before[n].dim() == 4 for n in changed)
