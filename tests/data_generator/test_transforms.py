"""Tests for data_generator.transforms.BatchTransform and its vectorised RandomResizedCrop."""

from __future__ import annotations

import pytest
import torch

from data_generator.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    BatchTransform,
    resized_crop,
    sample_crop_boxes,
    stored_size_for,
)


def _images(b=4, size=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


def test_stored_and_crop_sizes():
    t = BatchTransform(80)
    assert t.stored_size == 92 and t.crop_size == 88
    assert BatchTransform(84).stored_size == 97 and BatchTransform(84).crop_size == 92
    assert BatchTransform(84, "paper").stored_size == 84
    assert stored_size_for(80, "pytorch") == 92
    with pytest.raises(ValueError):
        BatchTransform(80, "tf")


@pytest.mark.parametrize("preprocess", ["pytorch", "paper"])
@pytest.mark.parametrize("augment", [False, True])
def test_shapes_dtypes(preprocess, augment):
    t = BatchTransform(20, preprocess, augment)
    x = _images(5, t.stored_size)
    y = t(x, torch.Generator().manual_seed(1))
    assert y.shape == (5, 3, 20, 20) and y.dtype == torch.float32 and y.device == x.device
    assert y.is_contiguous()
    assert torch.isfinite(y).all()
    assert t(x[:0]).shape == (0, 3, 20, 20)


def test_eval_pytorch_is_center_crop_and_normalise():
    t = BatchTransform(20, "pytorch")  # stored 23 -> offset round(1.5) = 2
    x = _images(3, t.stored_size)
    y = t(x)
    off = int(round((23 - 20) / 2))
    ref = x[:, off:off + 20, off:off + 20].permute(0, 3, 1, 2).float() / 255
    ref = (ref - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    # element-wise float32 (no sums): each of the ~4 ops rounds once, and another order or an FMA changes a
    # result by a few ulp of |y| <= ~4 (~1e-6; 5e-7 measured); 1e-5 is 10x that, and any wrong constant is far above
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_eval_paper_is_identity_over_255():
    t = BatchTransform(12, "paper")
    x = _images(2, 12)
    torch.testing.assert_close(t(x), x.permute(0, 3, 1, 2).float() / 255)


def test_eval_is_deterministic_and_ignores_generator():
    for pre in ("pytorch", "paper"):
        t = BatchTransform(16, pre, augment=False)
        x = _images(3, t.stored_size)
        a = t(x, torch.Generator().manual_seed(0))
        b = t(x, torch.Generator().manual_seed(99))
        assert torch.equal(a, b) and torch.equal(a, t(x))


@pytest.mark.parametrize("preprocess", ["pytorch", "paper"])
def test_augment_reproducible_under_generator(preprocess):
    t = BatchTransform(16, preprocess, augment=True)
    x = _images(16, t.stored_size)
    a = t(x, torch.Generator().manual_seed(7))
    b = t(x, torch.Generator().manual_seed(7))
    c = t(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(0)
    d = t(x, torch.Generator().manual_seed(7))  # the global RNG plays no part
    assert torch.equal(a, d)


def test_flip_actually_flips():
    t = BatchTransform(6, "paper", augment=True)
    img = torch.zeros(6, 6, 3, dtype=torch.uint8)
    img[:, :2] = 255  # bright left band: asymmetric
    x = img.expand(64, 6, 6, 3).contiguous()
    y = t(x, torch.Generator().manual_seed(3))
    plain = x.permute(0, 3, 1, 2).float() / 255
    same = (y == plain).flatten(1).all(1)
    flipped = (y == plain.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())  # every output is the image or its mirror
    assert 10 < int(flipped.sum()) < 54  # p = 0.5


def test_pytorch_augment_flip_and_crop_statistics():
    # A left-bright image: with RRC + flip, roughly half the outputs are brighter on the right.
    t = BatchTransform(16, "pytorch", augment=True)
    img = torch.zeros(t.stored_size, t.stored_size, 3, dtype=torch.uint8)
    img[:, : t.stored_size // 2] = 255
    y = t(img.expand(200, *img.shape).contiguous(), torch.Generator().manual_seed(0))
    left, right = y[..., :8].mean(dim=(1, 2, 3)), y[..., 8:].mean(dim=(1, 2, 3))
    frac_right = float((right > left).float().mean())
    assert 0.3 < frac_right < 0.7


def test_resized_crop_identity_and_box_content():
    # Bilinear resampling in float32 (no long sums: 4 weighted pixels per output): the sample positions carry a
    # few ulp of a pixel index (~4e-6 px), times a slope of at most 255 per pixel: <= ~1e-3 on any machine (9e-5
    # measured for the identity resize; a constant region only sees the weights' rounding, ~100 * 4 ulp). Hence
    # 5e-3 and 1e-3 here and 1e-2 against torchvision (4e-4 measured), while a box off by a pixel changes values
    # by tens.
    x = torch.rand(3, 3, 10, 10) * 255
    full = torch.tensor([[0, 0, 10, 10]]).repeat(3, 1)
    torch.testing.assert_close(resized_crop(x, full, 10), x, atol=5e-3, rtol=0)
    # a square box resized to its own size is the plain crop
    sq = torch.tensor([[2, 3, 5, 5]] * 3)
    torch.testing.assert_close(resized_crop(x, sq, 5), x[..., 2:7, 3:8], atol=5e-3, rtol=0)
    # only the box is sampled: a constant box surrounded by zeros stays constant after any resize
    const = torch.zeros(1, 3, 10, 10)
    const[..., 2:7, 3:7] = 100
    box = torch.tensor([[2, 3, 5, 4]])
    for size in (3, 5, 9):
        assert torch.allclose(resized_crop(const, box, size), torch.full((1, 3, size, size), 100.0), atol=1e-3)
    # keep= returns the center of the full resize
    full9 = resized_crop(x, sq, 9)
    torch.testing.assert_close(resized_crop(x, sq, 9, keep=(2, 5)), full9[..., 2:7, 2:7])


def test_resized_crop_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(4, 3, 23, 23) * 255
    boxes = sample_crop_boxes(4, 23, 23, torch.Generator().manual_seed(1))
    ours = resized_crop(x, boxes, 22)
    for k in range(4):
        top, left, h, w = boxes[k].tolist()
        ref = tvf.resized_crop(x[k], top, left, h, w, [22, 22], antialias=False)
        torch.testing.assert_close(ours[k], ref, atol=1e-2, rtol=0)


def test_crop_boxes_valid_and_fallback():
    b = sample_crop_boxes(500, 23, 30, torch.Generator().manual_seed(0))
    top, left, h, w = b.unbind(1)
    assert b.dtype == torch.int64
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= 23) & (left + w <= 30)).all())
    area = (h * w).double() / (23 * 30)
    assert 0.3 < float(area.mean()) < 0.7
    # a very wide image cannot fit any ratio in [3/4, 4/3] at most scales; fallback = torchvision's center crop
    fb = sample_crop_boxes(50, 4, 100, torch.Generator().manual_seed(0), scale=(0.9, 1.0))
    assert (fb == torch.tensor([0, 47, 4, 5])).all(dim=1).all()


def test_rejects_bad_input():
    t = BatchTransform(16)
    with pytest.raises(ValueError):
        t(torch.zeros(2, 18, 18, 3))  # float
    with pytest.raises(ValueError):
        t(torch.zeros(2, 3, 18, 18, dtype=torch.uint8))  # NCHW
    with pytest.raises(ValueError):
        t(torch.zeros(2, 10, 10, 3, dtype=torch.uint8))  # too small


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("augment", [False, True])
def test_cuda_matches_cpu(augment):
    t = BatchTransform(20, "pytorch", augment)
    x = _images(8, t.stored_size)
    cpu = t(x, torch.Generator().manual_seed(5))
    gpu = t(x.cuda(), torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-4)
