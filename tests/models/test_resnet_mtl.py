import pytest
import torch
import torch.nn as nn

from models.conv2d_mtl import Conv2dMtl
from models.resnet_mtl import BACKBONES, build_backbone, min_image_size
from tests.helpers import assert_close_f64

OUT_DIM = {"resnet12": 512, "resnet12_wide": 640, "resnet12_slim": 256, "resnet25": 640, "conv4": 64,
           "resnet18": 512, "resnet34": 512, "wrn28_10": 640}


@pytest.mark.parametrize("name", sorted(OUT_DIM))
@pytest.mark.parametrize("mtl", [False, True])
def test_output_shape_and_conv_class(name, mtl):
    torch.manual_seed(0)
    assert name in BACKBONES
    net = build_backbone(name, mtl)
    assert net.out_dim == OUT_DIM[name]
    s = min_image_size(name)
    for size in (s, s + 8):
        out = net(torch.randn(2, 3, size, size))
        assert out.shape == (2, OUT_DIM[name])
        assert torch.isfinite(out).all()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2dMtl) == mtl for m in convs)
    with pytest.raises(ValueError):
        net(torch.randn(2, 3, s - 1, s - 1))


def test_every_registered_backbone_is_covered():
    assert set(OUT_DIM) == set(BACKBONES)


def test_unknown_name():
    with pytest.raises(ValueError, match="resnet12"):
        build_backbone("resnet50", False)
    with pytest.raises(ValueError):
        min_image_size("nope")


def test_resnet12_84px_gives_5x5_map():
    net = build_backbone("resnet12", False)
    fmap = net.features(torch.randn(1, 3, 84, 84))
    assert fmap.shape == (1, 512, 5, 5)
    net.eval().double()  # adaptive average pool vs mean: two formulas (two summation orders), so float64
    with torch.no_grad():
        x = torch.randn(1, 3, 84, 84, dtype=torch.float64)
        assert_close_f64(net(x), net.features(x).mean(dim=(2, 3)))


def test_resnet12_block_structure():
    net = build_backbone("resnet12", True, dropout_keep=0.9)
    blk = net.layer1
    # 3 convs 3x3 without bias, 1x1 shortcut without BN, LeakyReLU 0.1, dropout p=0.1
    assert [blk.conv1.kernel_size, blk.conv2.kernel_size, blk.conv3.kernel_size] == [(3, 3)] * 3
    assert blk.shortcut.kernel_size == (1, 1) and blk.conv1.bias is None
    assert blk.act.negative_slope == 0.1 and isinstance(blk.dropout, nn.Dropout) and abs(blk.dropout.p - 0.1) < 1e-9
    assert sum(isinstance(m, nn.BatchNorm2d) for m in blk.modules()) == 3
    # y = h + shortcut(x), then max-pool: check against a manual computation
    blk.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = blk.act(blk.bn1(blk.conv1(x)))
        h = blk.act(blk.bn2(blk.conv2(h)))
        h = blk.act(blk.bn3(blk.conv3(h)))
        ref = nn.functional.max_pool2d(h + blk.shortcut(x), 2)
        torch.testing.assert_close(blk(x), ref)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    net = build_backbone("resnet12_slim", False, dropout_keep=0.5)
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    torch.testing.assert_close(a, b)
    assert not any(isinstance(m, nn.Dropout) for m in build_backbone("resnet12_slim", False).modules())


def test_resnet25_counts_and_keys():
    plain = build_backbone("resnet25", False)
    assert sum(p.numel() for p in plain.parameters()) == 36_579_360
    mtl = build_backbone("resnet25", True)
    named = dict(mtl.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 4_321_440
    assert sum(p.numel() for n, p in named.items() if "mtl_" in n) == 4_301_120
    assert sum(p.numel() for n, p in trainable.items() if "bn" in n or "downsample.1" in n) == 20_320
    assert all("mtl_" in n or ".bn" in n or n.startswith("bn") or "downsample.1" in n for n in trainable)
    assert sum("mtl_" in n for n in named) == 29
    assert named["layer1.0.conv1.mtl_weight"].shape == (160, 80, 1, 1)
    assert "conv1.mtl_bias" in named and "layer1.0.conv1.mtl_bias" not in named
    # official key layout: plain state dict == mtl state dict minus the mtl_* keys
    keys_plain = set(plain.state_dict())
    keys_mtl = {k for k in mtl.state_dict() if "mtl_" not in k}
    assert keys_plain == keys_mtl
    for k in ("conv1.weight", "conv1.bias", "bn1.running_mean", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.weight", "layer3.3.conv2.weight", "layer3.3.bn2.bias"):
        assert k in keys_plain
    assert not any(k.startswith("layer4") or k.startswith("fc") for k in keys_plain)
    res = mtl.load_state_dict(plain.state_dict(), strict=False)
    assert res.unexpected_keys == [] and len(res.missing_keys) == 29


def test_resnet25_80px_map():
    net = build_backbone("resnet25", False)
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 80, 80)).shape == (1, 640, 10, 10)


def test_mtl_trainable_set_all_backbones():
    for name in OUT_DIM:
        net = build_backbone(name, True)
        for mod_name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                assert not m.weight.requires_grad and m.mtl_weight.requires_grad, mod_name
            if isinstance(m, nn.BatchNorm2d):
                assert m.weight.requires_grad and m.bias.requires_grad
        plain = build_backbone(name, False)
        assert all(p.requires_grad for p in plain.parameters())


def test_init_scheme():
    torch.manual_seed(0)
    net = build_backbone("resnet25", False)
    w = net.layer3[0].conv2.weight
    std = (2.0 / (640 * 9)) ** 0.5  # kaiming fan_out relu
    assert abs(w.std().item() - std) / std < 0.05
    assert torch.equal(net.bn1.weight, torch.ones(80)) and torch.equal(net.bn1.bias, torch.zeros(80))
