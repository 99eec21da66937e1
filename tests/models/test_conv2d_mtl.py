import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.conv2d_mtl import Conv2dMtl


def _randomise_ss(conv: Conv2dMtl) -> None:
    with torch.no_grad():
        conv.mtl_weight.uniform_(0.5, 1.5)
        if conv.mtl_bias is not None:
            conv.mtl_bias.normal_()


@pytest.mark.parametrize("kw", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=True),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=0, bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=2, dilation=2, groups=2, bias=True),
    dict(in_channels=6, out_channels=6, kernel_size=1, groups=3, bias=False),
])
def test_equals_plain_conv_with_effective_weights(kw):
    torch.manual_seed(0)
    conv = Conv2dMtl(**kw)
    _randomise_ss(conv)
    groups = kw.get("groups", 1)
    assert conv.mtl_weight.shape == (kw["out_channels"], kw["in_channels"] // groups, 1, 1)
    x = torch.randn(2, kw["in_channels"], 9, 9)
    plain = nn.Conv2d(**kw)
    with torch.no_grad():
        plain.weight.copy_(conv.weight * conv.mtl_weight)  # (W ⊙ Phi1), one scalar per 2-D kernel slice
        if kw["bias"]:
            plain.bias.copy_(conv.bias + conv.mtl_bias)  # b + Phi2
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-6)
    # the scale is not trivially 1: the output differs from the un-scaled conv
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert not torch.allclose(conv(x), ref, atol=1e-3)


def test_init_and_trainable_set():
    conv = Conv2dMtl(3, 5, 3, padding=1, bias=True)
    assert torch.equal(conv.mtl_weight, torch.ones(5, 3, 1, 1))
    assert torch.equal(conv.mtl_bias, torch.zeros(5))
    trainable = {n for n, p in conv.named_parameters() if p.requires_grad}
    assert trainable == {"mtl_weight", "mtl_bias"}
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    nob = Conv2dMtl(3, 5, 3, bias=False)
    assert nob.bias is None and nob.mtl_bias is None
    assert {n for n, p in nob.named_parameters() if p.requires_grad} == {"mtl_weight"}
    # at init the SS conv is exactly the plain conv
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_gradients_reach_only_ss_params():
    torch.manual_seed(1)
    conv = Conv2dMtl(3, 4, 3, padding=1, bias=True)
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert conv.weight.grad is None and conv.bias.grad is None
    assert conv.mtl_weight.grad is not None and conv.mtl_weight.grad.abs().sum() > 0
    assert conv.mtl_bias.grad is not None and conv.mtl_bias.grad.abs().sum() > 0


def test_plain_state_dict_loads():
    torch.manual_seed(2)
    plain = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    conv = Conv2dMtl(3, 4, 3, padding=1, bias=True)
    assert set(conv.state_dict()) == {"weight", "bias", "mtl_weight", "mtl_bias"}
    res = conv.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["mtl_bias", "mtl_weight"] and res.unexpected_keys == []
    assert torch.equal(conv.weight, plain.weight) and torch.equal(conv.bias, plain.bias)
    assert not conv.weight.requires_grad  # loading keeps the weights frozen
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(conv(x), plain(x))


def test_rejects_other_padding_modes():
    with pytest.raises(ValueError):
        Conv2dMtl(3, 4, 3, padding=1, padding_mode="reflect")
